"""Continuous batching on the GPU: the backend run.py uses whenever a GPU is present.

Every step packs the decode token of each running sequence and, within a token budget, chunks of the
prompts still being prefilled; a finished sequence's slot takes the next prompt at once. The number
of slots comes from free GPU memory after the weights (KV cache per slot, activations per step
token, logits per row), capped by -b.
"""
from __future__ import annotations

import sys
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import numpy as np

from .engine import Request, TokenEvent, check_fits, clamp_new_tokens
from .model import (DeviceWeights, GPUModel, KVCache, ModelTooLargeError, SampleArgs, StepBatch, _gib,
                    activation_bytes_per_token, decode_batch_bucket, free_gpu_memory, logit_row_bytes)
from .sampling import SamplingParams

PREFILL_CHUNK = 256  # most prompt tokens of one sequence per step; sliding layers keep a ring of window + this
STEP_PREFILL_TOKENS = 4096  # most prefill tokens per step, over all sequences
HEADROOM = 1 << 30  # GPU memory left unplanned (CuPy pool fragmentation, kernels' own scratch)


@dataclass
class _Seq:
    req: Request
    slot: int
    budget: int
    cached: int = 0  # tokens already in the KV cache
    generated: list = field(default_factory=list)
    pending: int | None = None  # the last sampled token, fed at the next step
    prefilled: bool = False  # the whole prompt is in the cache


@dataclass
class Plan:
    slots: int
    capacity: int
    max_step_tokens: int
    kv_bytes: int
    activation_bytes: int


def plan_memory(cfg, free_bytes: int, capacity: int, wanted_slots: int) -> Plan:
    """Most slots that fit in free memory: the KV cache per slot (plus the padding slot), the step
    buffers (activations per step token, logits per row) and the decode graphs' attention partials."""
    from .ops.attention import decode_splits

    chunk = min(PREFILL_CHUNK, capacity)
    per_slot = KVCache.bytes_per_slot(cfg, capacity, chunk)
    per_token = activation_bytes_per_token(cfg)
    per_row = logit_row_bytes(cfg) + 16 * 4  # + sampling inputs
    partials = decode_splits(capacity, 0) * cfg.num_heads * 66 * 4

    def need(slots):
        rows = decode_batch_bucket(slots)
        step_tokens = max(slots + min(STEP_PREFILL_TOKENS, slots * chunk), rows)
        return ((slots + 1) * per_slot + step_tokens * per_token + rows * (per_row + partials),
                step_tokens)

    budget = free_bytes - HEADROOM
    lo, hi = 0, max(1, wanted_slots)
    while lo < hi:  # largest slot count whose need fits
        mid = (lo + hi + 1) // 2
        if need(mid)[0] <= budget:
            lo = mid
        else:
            hi = mid - 1
    if lo == 0:
        raise ModelTooLargeError(
            f"no room for even one sequence of {capacity} tokens: it needs "
            f"{_gib(need(1)[0])} of GPU memory beside the weights and {_gib(max(budget, 0))} is left. "
            "Lower -n or shorten the prompts.")
    total, step_tokens = need(lo)
    return Plan(lo, capacity, step_tokens, (lo + 1) * per_slot, total - (lo + 1) * per_slot)


class GPUBackend:
    name = "gpu"

    def __init__(self, weights, progress: bool = True):
        import cupy

        self.device_name = cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()
        self.name = f"gpu ({self.device_name})"
        self.weights = DeviceWeights(weights, progress=progress)
        from .kernels import compile_all

        t0 = time.perf_counter()
        compile_all()  # NVRTC on the first run (tens of seconds), CuPy's disk cache afterwards
        if progress and time.perf_counter() - t0 > 2:
            print(f"compiled the GPU kernels in {time.perf_counter() - t0:.0f} s (cached for later runs)",
                  file=sys.stderr)
        self.config = weights.config
        self.model: GPUModel | None = None
        self.use_graphs = True
        self.step_prefill_tokens = STEP_PREFILL_TOKENS
        # seconds and counts of the last generate(): steps with prompt chunks vs decode-only steps
        # (graph replays), the time each kind took (launch to sampled ids on the host), and the host's
        # own scheduling time between steps
        self.stats: dict = {}

    def peak_memory_bytes(self) -> int:
        import cupy

        return cupy.get_default_memory_pool().total_bytes()

    def _model_for(self, capacity: int, wanted_slots: int) -> GPUModel:
        m = self.model
        if m is not None and m.capacity >= capacity and m.slots >= wanted_slots:
            return m
        import cupy

        self.model = None
        cupy.get_default_memory_pool().free_all_blocks()
        free, _ = free_gpu_memory()
        plan = plan_memory(self.config, free, capacity, wanted_slots)
        self.model = GPUModel(self.weights, plan.slots, capacity, plan.max_step_tokens,
                              min(PREFILL_CHUNK, capacity))
        return self.model

    def generate(self, requests: Iterable[Request], sampling: SamplingParams, stop_ids=(),
                 ignore_eos: bool = False, max_batch: int | None = None) -> Iterator[TokenEvent]:
        cfg = self.config
        requests = list(requests)
        if not requests:
            return
        for r in requests:
            check_fits(len(r.prompt_ids), r.max_new, cfg.max_context)
        capacity = max(min(len(r.prompt_ids) + r.max_new, cfg.max_context) for r in requests)
        model = self._model_for(capacity, min(len(requests), max_batch or len(requests)))
        stop_ids = frozenset(() if ignore_eos else stop_ids)
        slots_free = list(range(model.slots))[::-1]
        if max_batch:
            slots_free = slots_free[-max_batch:]
        waiting = deque(requests)
        running: list[_Seq] = []
        st = self.stats = {"slots": model.slots, "capacity": model.capacity, "mixed_steps": 0,
                           "mixed_seconds": 0.0, "prompt_tokens": 0, "decode_steps": 0,
                           "decode_seconds": 0.0, "decode_tokens": 0, "host_seconds": 0.0}
        clock = time.perf_counter()

        while waiting or running:
            while waiting and slots_free:
                req = waiting.popleft()
                budget = clamp_new_tokens(len(req.prompt_ids), req.max_new, cfg.max_context)
                if budget == 0:
                    yield TokenEvent(req.index, None, True, "length")
                    continue
                running.append(_Seq(req, slots_free.pop(), budget))
            if not running:
                break
            step, order, n_decode = self._build_step(running, model)
            args = SampleArgs(sampling.temperature, sampling.top_p, sampling.seed,
                              np.asarray([s.req.index for s in order], np.int32),
                              np.asarray([len(s.generated) for s in order], np.int32))
            t0 = time.perf_counter()
            st["host_seconds"] += t0 - clock
            ids = model.step(step, args, use_graph=self.use_graphs)
            clock = time.perf_counter()
            kind = "decode" if n_decode == len(step.tokens) else "mixed"
            st[f"{kind}_steps"] += 1
            st[f"{kind}_seconds"] += clock - t0
            st["decode_tokens"] += n_decode
            st["prompt_tokens"] += len(step.tokens) - n_decode
            finished = []
            for seq, token in zip(order, ids.tolist()):
                if token in stop_ids:
                    yield TokenEvent(seq.req.index, None, True, "stop")
                    finished.append(seq)
                    continue
                seq.generated.append(token)
                seq.pending = token
                done = len(seq.generated) >= seq.budget
                yield TokenEvent(seq.req.index, token, done, "length" if done else None)
                if done:
                    finished.append(seq)
            if finished:
                gone = {id(seq) for seq in finished}
                running = [seq for seq in running if id(seq) not in gone]
                slots_free.extend(seq.slot for seq in finished)

    def _build_step(self, running: list[_Seq], model: GPUModel):
        """Decode tokens first (sequences whose prompt is in the cache), then prompt chunks within the
        step's token budget. Returns (step, the sequences that get a token, in logit-row order,
        the number of decode tokens)."""
        dec = [s for s in running if s.prefilled]
        n = len(dec)
        tokens = [s.pending for s in dec]
        positions = [s.cached for s in dec]
        slots = [s.slot for s in dec]
        for s in dec:
            s.cached += 1
        q_lens, seq_slots, seq_starts = [1] * n, list(slots), list(positions)
        logit_rows, order = list(range(n)), dec
        budget = min(model.max_step_tokens - n, self.step_prefill_tokens)
        for seq in running:
            if budget <= 0:
                break
            if seq.prefilled:
                continue
            prompt = seq.req.prompt_ids
            start = seq.cached
            m = min(len(prompt) - start, model.cache.max_chunk, budget)
            tokens.extend(prompt[start:start + m])
            positions.extend(range(start, start + m))
            slots.extend([seq.slot] * m)
            q_lens.append(m)
            seq_slots.append(seq.slot)
            seq_starts.append(start)
            seq.cached += m
            budget -= m
            if seq.cached == len(prompt):  # the prompt is complete: its last token's logits give token 0
                seq.prefilled = True
                logit_rows.append(len(tokens) - 1)
                order.append(seq)
        step = StepBatch(np.asarray(tokens, np.int32), np.asarray(positions, np.int32),
                         np.asarray(slots, np.int32), q_lens, seq_slots, seq_starts,
                         np.asarray(logit_rows, np.int32))
        return step, order, n
