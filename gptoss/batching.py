"""Continuous batching on the GPU: the backend run.py uses whenever a GPU is present.

Every step packs the decode token of each running sequence and, within a token budget, chunks of the
prompts still being prefilled; a finished sequence's slot takes the next prompt at once.

Memory: a slot costs its sliding layers' rings and its share of the step buffers; the full layers'
KV cache is paged (model.KVCache): a sequence holds pages for the positions it has reached, so the
batch is not sized for every sequence reaching its whole capacity at once. A prompt is admitted when
its prompt's pages fit beside a reserve for the running sequences' growth; when a decoding sequence
needs a page and none is free, the most recently admitted sequence is preempted: its pages are freed
and it goes back to the head of the queue, to be prefilled again (prompt + the tokens it generated) and
continued. The kernels are batch invariant, so a preempted sequence's tokens are the ones it would
have got without the preemption.
"""
from __future__ import annotations

import sys
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import numpy as np

from .engine import Request, StepTokens, TokenEvent, check_fits, clamp_new_tokens
from .model import (PAGE, DeviceWeights, GPUModel, KVCache, ModelTooLargeError, SampleArgs, StepBatch, _gib,
                    activation_bytes_per_token, decode_batch_bucket, free_gpu_memory, logit_row_bytes)
from .sampling import SamplingParams

PREFILL_CHUNK = 256  # most prompt tokens of one sequence per step; sliding layers keep a ring of window + this
STEP_PREFILL_TOKENS = 4096  # most prefill tokens per step, over all sequences
HEADROOM = 1 << 30  # GPU memory left unplanned (CuPy pool fragmentation, kernels' own scratch)
PROMISE = 1.0  # admission promises each sequence pages for its prompt and this fraction of its budget


def pages_for(positions) -> np.ndarray:
    """Pages that hold `positions` positions (vectorised)."""
    return -(-np.asarray(positions, np.int64) // PAGE)


@dataclass
class _Job:
    """A request waiting for a slot: its prompt, or after a preemption its prompt + the tokens it had
    generated but the last (fed back as the first decode token after this prefill)."""
    req: Request
    tokens: list
    made: int = 0  # new tokens generated before a preemption (0: a fresh request)
    generated: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))  # those tokens

    @classmethod
    def resumed(cls, req: Request, generated: np.ndarray) -> "_Job":
        return cls(req, list(req.prompt_ids) + generated[:-1].tolist(), len(generated), generated)


@dataclass
class _Prefill:
    """A sequence whose prompt (job.tokens) is not all in the KV cache yet."""
    job: _Job
    slot: int
    cached: int = 0  # tokens already in the cache


class _Slots:
    """Per-slot state of the running sequences, as arrays indexed by slot (one vector update per step
    instead of Python work per token)."""

    def __init__(self, n: int, history: int):
        self.index = np.zeros(n, np.int64)    # the request (input line) in the slot
        self.budget = np.zeros(n, np.int64)   # new tokens it may generate
        self.made = np.zeros(n, np.int64)     # new tokens generated so far (the sampler's step)
        self.cached = np.zeros(n, np.int64)   # positions in its KV cache
        self.pending = np.zeros(n, np.int32)  # its last sampled token, fed at the next step
        self.decoding = np.zeros(n, bool)     # its prompt is in the cache: one token per step
        self.admitted = np.zeros(n, np.int64)  # admission order (the preemption victim is the latest)
        self.promised = np.zeros(n, np.int64)  # pages admission counted on it reaching
        # its new tokens, kept for a preemption (`history` columns: 1 where none can happen)
        self.generated = np.zeros((n, max(history, 1)), np.int32)
        self.job: list = [None] * n           # the _Job it runs


class PagePool:
    """The full layers' KV pages: a free list, and the pages each slot holds (the first `held[slot]`
    entries of its row of the page table, model.PageTable)."""

    def __init__(self, table):
        self.table = table
        table.clear()  # a generation abandoned half-way (an interrupted chat turn) left its pages there
        self.free = list(range(table.pages))[::-1]  # pop() hands out low pages first
        self.held = np.zeros(table.slots, np.int64)

    @property
    def available(self) -> int:
        return len(self.free)

    def grow(self, slots, positions) -> None:
        """Give each of `slots` the pages for its first `positions` positions (it keeps what it has)."""
        slots = np.asarray(slots, np.int64).reshape(-1)
        want = np.maximum(pages_for(positions).reshape(-1) - self.held[slots], 0)
        total = int(want.sum())
        if total == 0:
            return
        if total > len(self.free):
            raise RuntimeError(f"the KV cache is out of pages ({total} wanted, {len(self.free)} free)")
        pages = self.free[-total:][::-1]
        del self.free[-total:]
        first = np.cumsum(want) - want  # where each slot's new pages start in `pages`
        cols = np.repeat(self.held[slots] - first, want) + np.arange(total)
        self.table.assign(np.repeat(slots, want), cols, pages)
        self.held[slots] += want

    def release(self, slot: int) -> None:
        n = int(self.held[slot])
        self.free.extend(self.table.host[slot, :n][::-1].tolist())
        self.held[slot] = 0
        self.table.release(slot)


@dataclass
class Plan:
    slots: int
    pages: int
    capacity: int
    max_step_tokens: int
    kv_bytes: int
    activation_bytes: int


def plan_memory(cfg, free_bytes: int, capacity: int, wanted_slots: int, mean_positions: int | None = None) -> Plan:
    """Slots and KV pages that fit in free memory. A slot costs its sliding-layer rings and table row,
    the step buffers (activations per step token, logits per row) and the decode graphs' attention
    partials; the full layers' pages are shared. The slot count is the largest for which every slot
    can hold `mean_positions` positions (a running sequence's expected length; default `capacity`,
    i.e. no sharing) and one sequence its whole capacity; every byte left then goes to pages."""
    from .ops.attention import decode_splits

    chunk = min(PREFILL_CHUNK, capacity)
    width = int(pages_for(capacity))
    mean_pages = int(pages_for(max(1, min(mean_positions or capacity, capacity))))
    per_slot = KVCache.slot_bytes(cfg, capacity, chunk)
    per_page = KVCache.page_bytes(cfg)
    per_token = activation_bytes_per_token(cfg)
    per_row = logit_row_bytes(cfg) + 16 * 4  # + sampling inputs
    partials = decode_splits(capacity, 0) * cfg.num_heads * 66 * 4

    def fixed(slots):  # everything but the pages
        rows = decode_batch_bucket(slots)
        step_tokens = max(slots + min(STEP_PREFILL_TOKENS, slots * chunk), rows)
        return ((slots + 1) * per_slot + step_tokens * per_token + rows * (per_row + partials),
                step_tokens)

    def need(slots):  # + the pages the slots need (and the spare page)
        return fixed(slots)[0] + (max(width, slots * mean_pages) + 1) * per_page

    budget = free_bytes - HEADROOM
    lo, hi = 0, max(1, wanted_slots)
    while lo < hi:  # largest slot count whose need fits
        mid = (lo + hi + 1) // 2
        if need(mid) <= budget:
            lo = mid
        else:
            hi = mid - 1
    if lo == 0:
        raise ModelTooLargeError(
            f"no room for even one sequence of {capacity} tokens: it needs "
            f"{_gib(need(1))} of GPU memory beside the weights and {_gib(max(budget, 0))} is left. "
            "Lower -n or shorten the prompts.")
    rest, step_tokens = fixed(lo)
    pages = min((budget - rest) // per_page - 1, lo * width)  # all that is left (a slot uses at most width)
    kv = (lo + 1) * per_slot + (pages + 1) * per_page
    return Plan(lo, int(pages), capacity, step_tokens, kv, rest + (pages + 1) * per_page - kv)


class GPUBackend:
    name = "gpu"

    def __init__(self, weights, progress: bool = True, memory_limit: int | None = None):
        """memory_limit: the most GPU bytes this run may hold in all (weights included); default all
        that is free."""
        import cupy

        self.device_name = cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()
        self.name = f"gpu ({self.device_name})"
        self.memory_limit = memory_limit
        if memory_limit is not None:
            from .model import weight_bytes

            if weight_bytes(weights) + HEADROOM >= memory_limit:
                raise ModelTooLargeError(
                    f"a GPU memory limit of {_gib(memory_limit)} leaves no room beside the weights "
                    f"({_gib(weight_bytes(weights))}); raise --gpu-memory")
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
        self.promise = PROMISE
        # seconds and counts of the last generate(): steps with prompt chunks vs decode-only steps
        # (graph replays), the time each kind took (launch to sampled ids on the host), and the host's
        # own scheduling time between steps
        self.stats: dict = {}

    def peak_memory_bytes(self) -> int:
        import cupy

        return cupy.get_default_memory_pool().total_bytes()

    def _model_for(self, capacity: int, wanted_slots: int, mean_positions: int | None = None) -> GPUModel:
        m = self.model
        if m is not None and m.capacity >= capacity and m.slots >= wanted_slots:
            return m
        import cupy

        self.model = None
        pool = cupy.get_default_memory_pool()
        pool.free_all_blocks()
        free, _ = free_gpu_memory()
        if self.memory_limit is not None:
            free = min(free, self.memory_limit - pool.used_bytes())
        plan = plan_memory(self.config, free, capacity, wanted_slots, mean_positions)
        self.model = GPUModel(self.weights, plan.slots, capacity, plan.max_step_tokens,
                              min(PREFILL_CHUNK, capacity), pages=plan.pages)
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
        budgets = [clamp_new_tokens(len(r.prompt_ids), r.max_new, cfg.max_context) for r in requests]
        capacity = max(len(r.prompt_ids) + b for r, b in zip(requests, budgets))
        # slots for sequences of their prompt and the promised share of their budget (at least half:
        # a running sequence is on average halfway through it)
        share = max(self.promise, 0.5)
        mean = int(np.mean([len(r.prompt_ids) + share * b for r, b in zip(requests, budgets)])) + 1
        model = self._model_for(capacity, min(len(requests), max_batch or len(requests)), mean)
        stops = np.asarray(sorted(set(() if ignore_eos else stop_ids)), np.int64)
        slots_free = list(range(model.slots))[::-1]
        if max_batch:
            slots_free = slots_free[-max_batch:]
        waiting = deque(_Job(r, r.prompt_ids) for r in requests)
        # a preempted sequence is prefilled again with its tokens so far; with every budget promised in
        # full no sequence is ever preempted, and nothing needs keeping
        state = _Slots(model.slots, max(budgets) if self.promise < 1 else 1)
        pool = PagePool(model.cache.page_table)
        prefilling: list[_Prefill] = []
        st = self.stats = {"slots": model.slots, "capacity": model.capacity, "pages": model.cache.page_table.pages,
                           "mixed_steps": 0, "mixed_seconds": 0.0, "prompt_tokens": 0, "decode_steps": 0,
                           "decode_seconds": 0.0, "decode_tokens": 0, "host_seconds": 0.0,
                           "preemptions": 0, "recomputed_tokens": 0, "most_running": 0}
        clock = time.perf_counter()
        admitted = 0

        def busy() -> np.ndarray:
            """The slots of the running sequences: decoding, then prefilling."""
            return np.concatenate([np.flatnonzero(state.decoding), [p.slot for p in prefilling]]).astype(np.int64)

        def preempt(slot: int) -> None:
            """Free the slot's pages and put its job back at the head of the queue."""
            if state.decoding[slot]:
                if state.generated.shape[1] < state.made[slot]:
                    raise RuntimeError("a sequence was preempted although its pages were promised")
                job = _Job.resumed(state.job[slot].req, state.generated[slot, :state.made[slot]].copy())
                state.decoding[slot] = False
            else:
                seq = next(p for p in prefilling if p.slot == slot)
                prefilling.remove(seq)
                job = seq.job
            st["preemptions"] += 1
            st["recomputed_tokens"] += len(job.tokens)
            pool.release(slot)
            slots_free.append(slot)
            waiting.appendleft(job)

        while waiting or prefilling or state.decoding.any():
            slots = busy()
            running = len(slots)
            # pages the running sequences were promised and do not hold yet
            owed = int(np.maximum(state.promised[slots] - pool.held[slots], 0).sum())
            while waiting and slots_free:
                job = waiting[0]
                budget = clamp_new_tokens(len(job.req.prompt_ids), job.req.max_new, cfg.max_context)
                if budget == 0:
                    waiting.popleft()
                    yield StepTokens.of(TokenEvent(job.req.index, None, True, "length"))
                    continue
                # its promise (pages for the prompt and a share of the budget) must fit beside the
                # running sequences' (nothing running: one sequence always fits)
                now = int(pages_for(len(job.tokens)))
                promise = max(now, int(pages_for(len(job.req.prompt_ids) + int(np.ceil(self.promise * budget)))))
                if running and pool.available - owed < promise:
                    break
                waiting.popleft()
                slot = slots_free.pop()
                pool.grow([slot], [len(job.tokens)])
                state.index[slot], state.budget[slot], state.made[slot] = job.req.index, budget, job.made
                state.generated[slot, :job.made] = job.generated
                state.job[slot], state.admitted[slot], state.promised[slot] = job, admitted, promise
                admitted += 1
                running += 1
                owed += promise - now
                prefilling.append(_Prefill(job, slot))
            if not prefilling and not state.decoding.any():
                if waiting:
                    raise RuntimeError("no sequence runs and the next one does not fit in the KV cache")
                break
            st["most_running"] = max(st["most_running"], running)
            # every decoding sequence gets the page of its next position; short of pages, the latest
            # admitted sequences make room
            while True:
                dec = np.flatnonzero(state.decoding)
                grow = dec[state.cached[dec] >= pool.held[dec] * PAGE]
                if len(grow) <= pool.available:
                    break
                slots = busy()
                preempt(int(slots[np.argmax(state.admitted[slots])]))
            if not prefilling and not state.decoding.any():
                continue  # (not reached: one sequence always fits)
            pool.grow(grow, state.cached[grow] + 1)
            step, rows, n_decode, prefilled, resumed = self._build_step(state, prefilling, model)
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
            state.decoding[resumed] = True  # prefilled again: decode from the next step, no new token here
            if not len(rows):
                continue
            # every row's slot: its new token (none on a stop id), then who is done
            ids = np.asarray(ids, np.int64)
            stopped = np.isin(ids, stops) if len(stops) else np.zeros(len(rows), bool)
            keep = np.minimum(state.made[rows], state.generated.shape[1] - 1)  # (column 0 when none is kept)
            state.generated[rows, keep] = ids
            state.made[rows] += ~stopped
            state.pending[rows] = ids
            done = stopped | (state.made[rows] >= state.budget[rows])
            state.decoding[prefilled] = True  # their first token came: decode from the next step
            finished = rows[done]
            state.decoding[finished] = False
            for slot in finished.tolist():
                pool.release(slot)
            slots_free.extend(finished.tolist())
            yield StepTokens(state.index[rows], np.where(stopped, -1, ids), done, stopped)

    def _build_step(self, state: _Slots, prefilling: list, model: GPUModel):
        """Decode tokens first (the sequences whose prompt is in the cache, in slot order), then prompt
        chunks within the step's token budget. Returns (step, the slot of each logit row, the number of
        decode tokens, the slots whose prompt this step completes, the slots whose re-prefill after a
        preemption this step completes); prefilling loses both kinds."""
        dec = np.flatnonzero(state.decoding)
        n = len(dec)
        positions = state.cached[dec]
        state.cached[dec] += 1
        tokens, pos, slots = [state.pending[dec]], [positions], [dec]
        q_lens, seq_slots, seq_starts = [1] * n, dec.tolist(), positions.tolist()
        done_prefill, resumed, total = [], [], n  # (sequence, its logit row); tokens so far
        budget = min(model.max_step_tokens - n, self.step_prefill_tokens)
        for seq in prefilling:
            if budget <= 0:
                break
            prompt, start = seq.job.tokens, seq.cached
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
            if seq.cached == len(prompt):
                state.cached[seq.slot] = seq.cached
                if seq.job.made:  # a preempted sequence: its next input is the last token it generated
                    state.pending[seq.slot] = seq.job.generated[-1]
                    resumed.append(seq)
                else:  # the prompt is complete: its last token's logits give token 0
                    done_prefill.append((seq, total - 1))
        if done_prefill or resumed:
            finished = {id(seq) for seq, _ in done_prefill} | {id(seq) for seq in resumed}
            prefilling[:] = [seq for seq in prefilling if id(seq) not in finished]
        prefilled = np.asarray([seq.slot for seq, _ in done_prefill], np.int64)
        rows = np.concatenate([dec, prefilled]).astype(np.int64)
        logit_rows = np.concatenate([np.arange(n), np.asarray([r for _, r in done_prefill], np.int64)])
        step = StepBatch(np.concatenate(tokens).astype(np.int32), np.concatenate(pos).astype(np.int32),
                         np.concatenate(slots).astype(np.int32), q_lens, seq_slots, seq_starts,
                         logit_rows.astype(np.int32))
        return step, rows, n, prefilled, np.asarray([seq.slot for seq in resumed], np.int64)
