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
from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np

from .engine import Request, StepTokens, TokenEvent, check_fits, clamp_new_tokens
from .model import (DeviceWeights, GPUModel, KVCache, ModelTooLargeError, SampleArgs, StepBatch, _gib,
                    activation_bytes_per_token, decode_batch_bucket, free_gpu_memory, logit_row_bytes)
from .sampling import SamplingParams

PREFILL_CHUNK = 256  # most prompt tokens of one sequence per step; sliding layers keep a ring of window + this
STEP_PREFILL_TOKENS = 4096  # most prefill tokens per step, over all sequences
HEADROOM = 1 << 30  # GPU memory left unplanned (CuPy pool fragmentation, kernels' own scratch)


@dataclass
class _Prefill:
    """A sequence whose prompt is not all in the KV cache yet."""
    req: Request
    slot: int
    cached: int = 0  # prompt tokens already in the cache


class _Slots:
    """Per-slot state of the running sequences, as arrays indexed by slot (one vector update per step
    instead of Python work per token)."""

    def __init__(self, n: int):
        self.index = np.zeros(n, np.int64)    # the request (input line) in the slot
        self.budget = np.zeros(n, np.int64)   # new tokens it may generate
        self.made = np.zeros(n, np.int64)     # new tokens generated so far (the sampler's step)
        self.cached = np.zeros(n, np.int64)   # positions in its KV cache
        self.pending = np.zeros(n, np.int32)  # its last sampled token, fed at the next step
        self.decoding = np.zeros(n, bool)     # its prompt is in the cache: one token per step


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
        """The TokenEvents of generate_steps, one by one (generate and chat stream them)."""
        for step in self.generate_steps(requests, sampling, stop_ids, ignore_eos, max_batch):
            yield from step.events()

    def generate_steps(self, requests: Iterable[Request], sampling: SamplingParams, stop_ids=(),
                       ignore_eos: bool = False, max_batch: int | None = None) -> Iterator[StepTokens]:
        """Continuous batching: one StepTokens per engine step (every running sequence's new token)."""
        cfg = self.config
        requests = list(requests)
        if not requests:
            return
        for r in requests:
            check_fits(len(r.prompt_ids), r.max_new, cfg.max_context)
        capacity = max(min(len(r.prompt_ids) + r.max_new, cfg.max_context) for r in requests)
        model = self._model_for(capacity, min(len(requests), max_batch or len(requests)))
        stops = np.asarray(sorted(set(() if ignore_eos else stop_ids)), np.int64)
        slots_free = list(range(model.slots))[::-1]
        if max_batch:
            slots_free = slots_free[-max_batch:]
        waiting = deque(requests)
        state = _Slots(model.slots)
        prefilling: list[_Prefill] = []
        st = self.stats = {"slots": model.slots, "capacity": model.capacity, "mixed_steps": 0,
                           "mixed_seconds": 0.0, "prompt_tokens": 0, "decode_steps": 0,
                           "decode_seconds": 0.0, "decode_tokens": 0, "host_seconds": 0.0}
        clock = time.perf_counter()

        while waiting or prefilling or state.decoding.any():
            while waiting and slots_free:
                req = waiting.popleft()
                budget = clamp_new_tokens(len(req.prompt_ids), req.max_new, cfg.max_context)
                if budget == 0:
                    yield StepTokens.of(TokenEvent(req.index, None, True, "length"))
                    continue
                slot = slots_free.pop()
                state.index[slot], state.budget[slot], state.made[slot] = req.index, budget, 0
                prefilling.append(_Prefill(req, slot))
            if not prefilling and not state.decoding.any():
                break
            step, rows, n_decode, prefilled = self._build_step(state, prefilling, model)
            args = SampleArgs(sampling.temperature, sampling.top_p, sampling.seed,
                              state.index[rows].astype(np.int32), state.made[rows].astype(np.int32))
            t0 = time.perf_counter()
            st["host_seconds"] += t0 - clock
            ids = model.step(step, args, use_graph=self.use_graphs)
            clock = time.perf_counter()
            kind = "decode" if n_decode == len(step.tokens) else "mixed"
            st[f"{kind}_steps"] += 1
            st[f"{kind}_seconds"] += clock - t0
            st["decode_tokens"] += n_decode
            st["prompt_tokens"] += len(step.tokens) - n_decode
            # every row's slot: its new token (none on a stop id), then who is done
            ids = np.asarray(ids, np.int64)
            stopped = np.isin(ids, stops) if len(stops) else np.zeros(len(rows), bool)
            state.made[rows] += ~stopped
            state.pending[rows] = ids
            done = stopped | (state.made[rows] >= state.budget[rows])
            state.decoding[prefilled] = True  # their first token came: decode from the next step
            finished = rows[done]
            state.decoding[finished] = False
            slots_free.extend(finished.tolist())
            yield StepTokens(state.index[rows], np.where(stopped, -1, ids), done, stopped)

    def _build_step(self, state: _Slots, prefilling: list, model: GPUModel):
        """Decode tokens first (the sequences whose prompt is in the cache, in slot order), then prompt
        chunks within the step's token budget. Returns (step, the slot of each logit row, the number of
        decode tokens, the slots whose prompt this step completes); prefilling loses those."""
        dec = np.flatnonzero(state.decoding)
        n = len(dec)
        positions = state.cached[dec]
        state.cached[dec] += 1
        tokens, pos, slots = [state.pending[dec]], [positions], [dec]
        q_lens, seq_slots, seq_starts = [1] * n, dec.tolist(), positions.tolist()
        done_prefill, total = [], n  # (sequence, its logit row); tokens so far
        budget = min(model.max_step_tokens - n, self.step_prefill_tokens)
        for seq in prefilling:
            if budget <= 0:
                break
            prompt, start = seq.req.prompt_ids, seq.cached
            m = min(len(prompt) - start, model.cache.max_chunk, budget)
            tokens.append(np.asarray(prompt[start:start + m], np.int32))
            pos.append(np.arange(start, start + m))
            slots.append(np.full(m, seq.slot))
            q_lens.append(m)
            seq_slots.append(seq.slot)
            seq_starts.append(start)
            seq.cached += m
            budget -= m
            total += m
            if seq.cached == len(prompt):  # the prompt is complete: its last token's logits give token 0
                state.cached[seq.slot] = seq.cached
                done_prefill.append((seq, total - 1))
        if done_prefill:
            finished = {id(seq) for seq, _ in done_prefill}
            prefilling[:] = [seq for seq in prefilling if id(seq) not in finished]
        prefilled = np.asarray([seq.slot for seq, _ in done_prefill], np.int64)
        rows = np.concatenate([dec, prefilled]).astype(np.int64)
        logit_rows = np.concatenate([np.arange(n), np.asarray([r for _, r in done_prefill], np.int64)])
        step = StepBatch(np.concatenate(tokens).astype(np.int32), np.concatenate(pos).astype(np.int32),
                         np.concatenate(slots).astype(np.int32), q_lens, seq_slots, seq_starts,
                         logit_rows.astype(np.int32))
        return step, rows, n, prefilled
