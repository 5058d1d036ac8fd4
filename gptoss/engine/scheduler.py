"""The scheduler: which tokens each step runs. Pure host code over a runner's Layout (slots, pages,
step bounds); it never touches a model.

Every step packs the decode token of each running sequence (in slot order) and then, within a token
budget, chunks of the prompts still being prefilled; a finished or aborted sequence's slot and pages
take the next request at once.

Memory: the full layers' KV cache is paged: a sequence holds pages for the positions it has reached,
so the batch is not sized for every sequence reaching its whole capacity at once. A request is
admitted when its promise (pages for its prompt and a share of its budget, Scheduler.promise) fits beside
what the running sequences were promised and do not hold yet. When a decoding sequence needs a page
and none is free, the most recently admitted sequence is preempted: its pages are freed and it goes
back to the head of the queue. Where the runner has room in host memory (Layout.swap_pages) its KV is
copied there (a KVSwap the next step carries) and copied back into new pages when it is admitted
again, and it goes on decoding; otherwise it is prefilled again (prompt + the tokens it generated) and
continued. The kernels are batch invariant, so a preempted sequence's tokens are the ones it would
have got without the preemption. With the whole budget promised (promise 1) no sequence is ever
preempted.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np

from ..batch import KVSwap, RowSampling, StepBatch
from ..kv_cache import PAGE
from .config import EngineConfig
from .pages import PagePool, pages_for
from .request import Job, Request, StepTokens
from .runner import Layout


@dataclass
class Prefill:
    """A sequence whose tokens (job.tokens) are not all in the KV cache yet."""
    job: Job
    slot: int
    cached: int = 0  # tokens already in the cache


class Slots:
    """Per-slot state of the running sequences, as arrays indexed by slot (one vector update per step
    instead of Python work per token)."""

    def __init__(self, n: int, history: int):
        self.request = np.full(n, -1, np.int64)  # the request id in the slot (-1: free)
        self.sequence = np.zeros(n, np.int64)  # its counter-RNG sequence id
        self.budget = np.zeros(n, np.int64)  # new tokens it may generate
        self.made = np.zeros(n, np.int64)  # new tokens generated so far (the sampler's step)
        self.cached = np.zeros(n, np.int64)  # positions in its KV cache
        self.pending = np.zeros(n, np.int32)  # its last sampled token, fed at the next step
        self.decoding = np.zeros(n, bool)  # its prompt is in the cache: one token per step
        self.admitted = np.zeros(n, np.int64)  # admission order (the preemption victim is the latest)
        self.promised = np.zeros(n, np.int64)  # pages admission counted on it reaching
        self.temperature = np.zeros(n, np.float32)  # its sampling params
        self.top_p = np.ones(n, np.float32)
        self.seed = np.zeros(n, np.uint32)
        self.stops = np.zeros(n, np.int64)  # its set of stop ids (an index into Scheduler.stop_sets)
        # its new tokens, kept for a preemption: up to `history` columns (1 where none can happen),
        # widened as sequences grow (`history` columns of every slot at once would be 512 MiB at 1,024
        # slots of 131,072 positions, its pages first touched by the steps' writes)
        self.history = max(history, 1)
        self.generated = np.zeros((n, min(self.history, 256)), np.int32)
        self.job: list = [None] * n  # the Job it runs

    def keep_room(self, made: int) -> None:
        """Columns in `generated` for `made` tokens (up to `history`): doubled when short."""
        width = self.generated.shape[1]
        if made > width and width < self.history:
            wider = np.zeros((len(self.generated), min(self.history, max(made, 2 * width))), np.int32)
            wider[:, :width] = self.generated
            self.generated = wider


@dataclass
class Scheduled:
    """A step to run, and what the scheduler must remember of it until its tokens come back."""
    batch: StepBatch
    rows: np.ndarray  # the slot of each logit row
    n_decode: int  # decode tokens (the first n_decode tokens of the batch)
    prefilled: np.ndarray  # slots whose prompt this step completes (their first token comes now)
    resumed: np.ndarray  # slots whose re-prefill after a preemption this step completes (no token now)


class Scheduler:
    def __init__(self, config: EngineConfig):
        self.config = config
        self.waiting: deque[Job] = deque()
        self.layout: Layout | None = None
        self.asked_slots = 0  # the slots the runner was asked for when it sized the cache
        self.state: Slots | None = None
        self.pool: PagePool | None = None
        self.free: list[int] = []  # free slots; pop() takes the next
        self.prefilling: list[Prefill] = []
        self.admitted = 0
        # the share of each budget admission promises (EngineConfig.promise; the engine picks it when None)
        self.promise = 1.0 if config.promise is None else config.promise
        self.swaps: list[KVSwap] = []  # the KV moves the next step carries
        self.stop_sets: dict[frozenset, int] = {}  # each distinct set of stop ids -> its index
        self.stop_arrays: list[np.ndarray] = []  # index -> the set's ids, sorted
        # steps with prompt chunks vs decode-only steps, the time each kind took (launch to sampled ids
        # on the host), the host's own time between steps, and how the cache was shared
        self.stats = {"slots": 0, "capacity": 0, "pages": 0, "mixed_steps": 0, "mixed_seconds": 0.0,
                      "prompt_tokens": 0, "decode_steps": 0, "decode_seconds": 0.0, "decode_tokens": 0,
                      "host_seconds": 0.0, "preemptions": 0, "recomputed_tokens": 0, "swaps": 0, "most_running": 0}

    # ---- requests ------------------------------------------------------------------------------------
    def add(self, req: Request) -> None:
        self.waiting.append(Job(req, req.prompt_ids))

    def abort(self, request_id: int) -> bool:
        """Drop the request wherever it is; a running one's slot and pages are free at once. False when
        the engine does not hold it (unknown, finished or already aborted)."""
        for job in self.waiting:
            if job.req.id == request_id:
                self.waiting.remove(job)
                self._forget_swap(job)
                return True
        if self.state is None:
            return False
        hit = np.flatnonzero(self.state.request == request_id)
        if not len(hit):
            return False
        slot = int(hit[0])
        self.prefilling[:] = [p for p in self.prefilling if p.slot != slot]
        self.state.decoding[slot] = False
        self._free_slot(slot)
        return True

    @property
    def swap_used(self) -> int:
        """Pages' worth of host memory the swapped-out sequences (all of them waiting) hold."""
        return sum(job.swapped for job in self.waiting)

    def idle(self) -> bool:
        """No sequence holds a slot."""
        return not self.prefilling and (self.state is None or not self.state.decoding.any())

    def has_unfinished(self) -> bool:
        return bool(self.waiting) or not self.idle()

    # ---- sizing the cache (only while idle) ----------------------------------------------------------
    def demand(self, promise: float | None = None) -> tuple[int, int, int]:
        """(capacity, slots, mean positions) the waiting requests need: the longest prompt + budget,
        a slot each (EngineConfig.max_seqs at most), and sequences of their prompt and the promised
        share of their budget (self.promise, or `promise`; at least half: a running sequence is on
        average halfway through it)."""
        reqs = [job.req for job in self.waiting]
        lengths = np.fromiter((len(r.prompt_ids) for r in reqs), np.int64, len(reqs))
        budgets = np.fromiter((r.budget for r in reqs), np.int64, len(reqs))
        share = max(self.promise if promise is None else promise, 0.5)
        slots = min(len(reqs), self.config.max_seqs or len(reqs))
        return int((lengths + budgets).max()), slots, int(np.mean(lengths + share * budgets)) + 1

    def covers(self, capacity: int, slots: int) -> bool:
        """Whether the cache serves this demand: long enough, and as many slots as asked for or as the
        runner could give when it was asked for at least as many."""
        return (self.layout is not None and self.layout.capacity >= capacity
                and max(self.layout.slots, self.asked_slots) >= slots)

    def bind(self, layout: Layout, asked_slots: int) -> None:
        """Start over on this layout (a cache sized for asked_slots), every slot and page free (only
        while idle)."""
        if not self.idle():
            raise RuntimeError("the KV cache can only be sized again while no sequence runs")
        self.layout, self.asked_slots = layout, asked_slots
        for job in self.waiting:  # host copies of KV from before: prefill those sequences again
            self._forget_swap(job)
        n = layout.slots
        # a preempted sequence resumes with its tokens so far (swapped back, or prefilled again); with
        # every budget promised in full no sequence is ever preempted, and nothing needs keeping
        self.state = Slots(n, layout.capacity if self.promise < 1 else 1)
        self.pool = PagePool(n + 1, layout.width, layout.pages)
        free = list(range(n))[::-1]
        self.free = free[-self.config.max_seqs:] if self.config.max_seqs else free
        self.stats.update(slots=n, capacity=layout.capacity, pages=layout.pages)

    # ---- one step ------------------------------------------------------------------------------------
    def schedule(self) -> Scheduled | None:
        """Admit what fits, give every decoding sequence the page of its next position (preempting when
        short), and pack the step. None when no sequence runs."""
        state, pool, cfg = self.state, self.pool, self.config
        busy = self._busy()
        running = len(busy)
        # pages the running sequences were promised and do not hold yet
        owed = int(np.maximum(state.promised[busy] - pool.held[busy], 0).sum())
        while self.waiting and self.free:
            job = self.waiting[0]
            req = job.req
            if len(req.prompt_ids) + req.budget > self.layout.capacity:
                break  # it waits for the engine to be idle and the cache to be sized again
            # its promise (pages for the prompt and a share of the budget) must fit beside the running
            # sequences' (nothing running: one sequence always fits)
            now = int(pages_for(len(job.tokens)))
            promise = max(now, int(pages_for(len(req.prompt_ids) + int(np.ceil(self.promise * req.budget)))))
            if running and pool.available - owed < promise:
                break
            self.waiting.popleft()
            self._admit(job, promise)
            running += 1
            owed += promise - now
        if self.idle():
            return None
        self.stats["most_running"] = max(self.stats["most_running"], running)
        # every decoding sequence gets the page of its next position; short of pages, the latest
        # admitted sequences make room (the earliest alone always fits: the cache holds one whole
        # sequence)
        while True:
            dec = np.flatnonzero(state.decoding)
            grow = dec[state.cached[dec] >= pool.held[dec] * PAGE]
            if len(grow) <= pool.available:
                break
            busy = self._busy()
            self._preempt(int(busy[np.argmax(state.admitted[busy])]))
        pool.grow(grow, state.cached[grow] + 1)
        return self._pack()

    def update(self, step: Scheduled, ids: np.ndarray) -> StepTokens:
        """The step's sampled ids (one per logit row) -> each row's request gets its token, or ends."""
        state = self.state
        state.decoding[step.resumed] = True  # prefilled again: decode from the next step, no new token here
        rows = step.rows
        if not len(rows):
            return StepTokens.empty()
        # every row's slot: its new token (none on a stop id), then who is done
        ids = np.asarray(ids, np.int64)
        stopped = self._stopped(rows, ids)
        state.keep_room(int(state.made[rows].max()) + 1)
        keep = np.minimum(state.made[rows], state.generated.shape[1] - 1)  # (column 0 when none is kept)
        state.generated[rows, keep] = ids
        state.made[rows] += ~stopped
        state.pending[rows] = ids
        done = stopped | (state.made[rows] >= state.budget[rows])
        state.decoding[step.prefilled] = True  # their first token came: decode from the next step
        out = StepTokens(state.request[rows], np.where(stopped, -1, ids), done, stopped)
        finished = rows[done]
        state.decoding[finished] = False
        for slot in finished.tolist():
            self.pool.release(slot)
        state.request[finished] = -1
        self.free.extend(finished.tolist())
        return out

    # ---- helpers -------------------------------------------------------------------------------------
    def _busy(self) -> np.ndarray:
        """The slots of the running sequences: decoding, then prefilling."""
        return np.concatenate([np.flatnonzero(self.state.decoding),
                               [p.slot for p in self.prefilling]]).astype(np.int64)

    def _admit(self, job: Job, promise: int) -> None:
        state, req = self.state, job.req
        slot = self.free.pop()
        self.pool.grow([slot], [len(job.tokens)])
        state.request[slot], state.sequence[slot], state.budget[slot] = req.id, req.sequence, req.budget
        state.made[slot] = job.made
        state.keep_room(job.made)
        state.generated[slot, :job.made] = job.generated
        state.job[slot], state.admitted[slot], state.promised[slot] = job, self.admitted, promise
        p = req.params
        state.temperature[slot], state.top_p[slot], state.seed[slot] = p.temperature, p.top_p, p.seed
        state.stops[slot] = self._stop_set(req.stop_ids)
        self.admitted += 1
        if job.swapped:  # its KV comes back from host memory into its new pages: it decodes from now on
            self.swaps.append(KVSwap("in", req.id, slot, self.pool.held_pages(slot)))
            state.cached[slot], state.pending[slot], state.decoding[slot] = len(job.tokens), job.generated[-1], True
        else:
            self.prefilling.append(Prefill(job, slot))

    def _preempt(self, slot: int) -> None:
        """Free the slot's pages and put its job back at the head of the queue: a decoding sequence's KV
        goes to host memory where the runner has room for it (its pages and rings), else (and a
        sequence still prefilling) it is prefilled again when it resumes."""
        state = self.state
        if state.decoding[slot]:
            job = Job.resumed(state.job[slot].req, state.generated[slot, :state.made[slot]].copy())
            state.decoding[slot] = False
            cost = int(self.pool.held[slot]) + self.layout.slot_pages
            if self.swap_used + cost <= self.layout.swap_pages:
                self.swaps.append(KVSwap("out", job.req.id, slot, self.pool.held_pages(slot)))
                job.swapped = cost
                self.stats["swaps"] += 1
        else:
            seq = next(p for p in self.prefilling if p.slot == slot)
            self.prefilling.remove(seq)
            job = seq.job
        self.stats["preemptions"] += 1
        if not job.swapped:
            self.stats["recomputed_tokens"] += len(job.tokens)
        self._free_slot(slot)
        self.waiting.appendleft(job)

    def _forget_swap(self, job: Job) -> None:
        """The job's host copy of KV (if any) is dropped: it is prefilled again if it runs."""
        if job.swapped:
            self.swaps.append(KVSwap("drop", job.req.id))
            job.swapped = 0

    def _free_slot(self, slot: int) -> None:
        self.pool.release(slot)
        self.state.request[slot] = -1
        self.state.job[slot] = None
        self.free.append(slot)

    def _stop_set(self, ids: frozenset) -> int:
        index = self.stop_sets.get(ids)
        if index is None:
            index = self.stop_sets[ids] = len(self.stop_arrays)
            self.stop_arrays.append(np.asarray(sorted(ids), np.int64))
        return index

    def _stopped(self, rows: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """Which rows' ids are a stop id of their request (one vector test per distinct stop set)."""
        if len(self.stop_arrays) == 1:
            stops = self.stop_arrays[0]
            return np.isin(ids, stops) if len(stops) else np.zeros(len(rows), bool)
        sets = self.state.stops[rows]
        stopped = np.zeros(len(rows), bool)
        for index in np.unique(sets).tolist():
            mine = sets == index
            stopped[mine] = np.isin(ids[mine], self.stop_arrays[index])
        return stopped

    def _pack(self) -> Scheduled:
        """Decode tokens first (the sequences whose prompt is in the cache, in slot order), then prompt
        chunks within the step's token budget; prefilling loses the sequences this step completes."""
        state, layout = self.state, self.layout
        dec = np.flatnonzero(state.decoding)
        n = len(dec)
        positions = state.cached[dec]
        state.cached[dec] += 1
        tokens, pos, slots = [state.pending[dec]], [positions], [dec]
        q_lens, seq_slots, seq_starts = [1] * n, dec.tolist(), positions.tolist()
        done_prefill, resumed, total = [], [], n  # (sequence, its logit row); tokens so far
        budget = min(layout.max_step_tokens - n, self.config.prefill_tokens)
        for seq in self.prefilling:
            if budget <= 0:
                break
            prompt, start = seq.job.tokens, seq.cached
            m = min(len(prompt) - start, layout.max_chunk, budget)
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
            self.prefilling[:] = [seq for seq in self.prefilling if id(seq) not in finished]
        prefilled = np.asarray([seq.slot for seq, _ in done_prefill], np.int64)
        rows = np.concatenate([dec, prefilled]).astype(np.int64)
        logit_rows = np.concatenate([np.arange(n), np.asarray([r for _, r in done_prefill], np.int64)])
        sampling = None
        if (state.temperature[rows] > 0).any():
            sampling = RowSampling(state.temperature[rows], state.top_p[rows], state.seed[rows],
                                   state.sequence[rows].astype(np.int32), state.made[rows].astype(np.int32))
        batch = StepBatch(np.concatenate(tokens).astype(np.int32), np.concatenate(pos).astype(np.int32),
                          np.concatenate(slots).astype(np.int32), q_lens, seq_slots, seq_starts,
                          logit_rows.astype(np.int32), sampling, *self.pool.take_changes(), tuple(self.swaps))
        self.swaps = []
        return Scheduled(batch, rows, n, prefilled, np.asarray([seq.slot for seq in resumed], np.int64))
