"""The engine: requests in, one step at a time, tokens out.

    engine = Engine(runner, EngineConfig(...))
    rid = engine.add_request(prompt_ids, SamplingParams(max_tokens=64))
    while engine.has_unfinished():
        for event in engine.step():  # TokenEvent(request_id, token, done, reason)
            ...

Requests can be added and aborted between any two steps. When the engine is idle and its waiting
requests need more than the KV cache holds, the cache is sized again (runner.allocate) and the
scheduler starts afresh: getp adds every prompt before the first step, so the cache is planned for all
of them at once. A step interrupted by an exception (Ctrl-C) leaves its requests in an unknown state:
abort them (LLM and the run.py modes do); once idle, the scheduler then starts afresh on the same cache.
"""
from __future__ import annotations

import time

import numpy as np

from ..sampling import SamplingParams
from .config import EngineConfig
from .request import Request, StepTokens, check_fits, clamp_new_tokens
from .runner import ModelRunner
from .scheduler import Scheduler

_INT32_MAX = 2**31 - 1
AUTO_PROMISES = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5)  # what EngineConfig.promise None tries, in this order


class Engine:
    """runner: a ModelRunner built with this engine's config (default: the runner's config).
    eos_token_ids: the ids that end every request unless its params say ignore_eos (the LLM passes
    harmony's <|return|>, <|call|> and <|endoftext|>)."""

    def __init__(self, runner: ModelRunner, config: EngineConfig | None = None, eos_token_ids=()):
        if config is not None and config != runner.config:
            raise ValueError("the runner was built with another EngineConfig than the engine's; build both "
                             "from one")
        self.runner = runner
        self.config = runner.config
        self.eos_token_ids = frozenset(int(i) for i in eos_token_ids)
        self.scheduler = Scheduler(self.config)
        self._next_id = 0
        self._clock = time.perf_counter()  # the end of the last step (host time is counted from it)
        self._interrupted = False  # a step raised (Ctrl-C) before it was through

    @property
    def stats(self) -> dict:
        """Where the time went (steps by kind, host vs model seconds) and how the cache was shared."""
        return self.scheduler.stats

    def add_request(self, prompt_ids, params: SamplingParams | None = None, sequence: int | None = None) -> int:
        """Queue a request; returns its id. sequence: the counter RNG's sequence id of its draws
        (default: the request id); getp passes the prompt's input line, so that a sampled answer does
        not depend on which prompts run beside it. Raises ContextError when the prompt cannot fit."""
        params = params or SamplingParams()
        cfg = self.runner.model_config
        ids = np.asarray(prompt_ids)
        if ids.ndim != 1 or (len(ids) and ids.dtype.kind not in "iu"):
            raise ValueError("prompt_ids must be a flat list of token ids")
        check_fits(len(ids), cfg.max_context)
        if ids.min() < 0 or ids.max() >= cfg.vocab_size:
            raise ValueError(f"token id {int(ids.max() if ids.max() >= cfg.vocab_size else ids.min())} is "
                             f"outside this model's vocabulary (0..{cfg.vocab_size - 1})")
        rid = self._next_id
        sequence = rid if sequence is None else int(sequence)
        if not 0 <= sequence <= _INT32_MAX:
            raise ValueError(f"sequence must be in 0..{_INT32_MAX} (got {sequence})")
        self._next_id += 1
        budget = clamp_new_tokens(len(ids), params.max_tokens, cfg.max_context)
        self.scheduler.add(Request(rid, ids.tolist(), params, sequence, budget, params.stop_ids(self.eos_token_ids)))
        return rid

    def abort(self, request_id: int) -> bool:
        """Drop a request, waiting or running: its slot and pages are free at once and it gets no more
        tokens. False when the engine does not hold it (unknown or finished)."""
        return self.scheduler.abort(request_id)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def reserve(self, capacity: int, slots: int, mean_positions: int | None = None) -> None:
        """Size the KV cache now for up to `slots` sequences of up to `capacity` positions (only while
        idle), so that requests arriving while others run join them instead of waiting for the engine to
        go idle and size it again (the server: its context for EngineConfig.max_seqs). mean_positions:
        what a sequence is planned to hold on average (default half the capacity); the slots share the
        KV pages, so one sequence can still grow to the whole capacity."""
        s = self.scheduler
        if not s.idle() or s.waiting:
            raise RuntimeError("the KV cache can only be reserved while no request is held")
        if capacity < 1 or slots < 1:
            raise ValueError(f"capacity and slots must be at least 1 (got {capacity} and {slots})")
        s.layout = None
        mean = capacity // 2 + 1 if mean_positions is None else max(1, min(mean_positions, capacity))
        s.bind(self.runner.allocate(capacity, slots, mean), slots)
        self._interrupted = False

    def _auto_promise(self, capacity: int, slots: int) -> float:
        """EngineConfig.promise None: the first of AUTO_PROMISES at which the runner's cache holds a slot
        for each of the `slots` waiting sequences (runner.slots_for), else 1."""
        slots_for = getattr(self.runner, "slots_for", None)
        if slots_for is None:
            return 1.0
        fits = (p for p in AUTO_PROMISES if slots_for(capacity, slots, self.scheduler.demand(p)[2]) >= slots)
        return next(fits, 1.0)

    def step(self, while_running=None) -> StepTokens:
        """Run one step: every running sequence's next token (iterate the result for TokenEvents, or
        read its arrays). Empty when nothing is waiting or running. while_running: called (no
        arguments) at most once, while the runner's device computes the step when the runner overlaps
        (ModelRunner.overlaps), else just before the step; not called when no step runs."""
        s = self.scheduler
        if s.waiting and s.idle():
            capacity, slots, mean = s.demand()
            if not s.covers(capacity, slots):  # a cache sized again for what waits
                if self.config.promise is None:
                    s.promise = self._auto_promise(capacity, slots)
                    mean = s.demand()[2]
                s.layout = None  # (the runner drops its cache first: nothing stays bound if allocate fails)
                s.bind(self.runner.allocate(capacity, slots, mean), slots)
            elif self._interrupted:  # the same cache, every slot and page free again
                s.bind(s.layout, s.asked_slots)
            self._interrupted = False
            self._clock = time.perf_counter()  # idle time is not the host's scheduling time
        if s.state is None:  # nothing was ever added
            return StepTokens.empty()
        self._interrupted = True  # until the step is through
        step = s.schedule()
        if step is None:
            if s.waiting:
                raise RuntimeError("no sequence runs and the next one does not fit in the KV cache")
            self._interrupted = False
            return StepTokens.empty()
        st = s.stats
        t0 = time.perf_counter()
        st["host_seconds"] += t0 - self._clock
        if while_running is None:
            ids = self.runner.step(step.batch)
        elif getattr(self.runner, "overlaps", False):
            ids = self.runner.step(step.batch, while_running=while_running)
        else:
            while_running()
            ids = self.runner.step(step.batch)
        self._clock = time.perf_counter()
        kind = "decode" if step.n_decode == len(step.batch.tokens) else "mixed"
        st[f"{kind}_steps"] += 1
        st[f"{kind}_seconds"] += self._clock - t0
        st["decode_tokens"] += step.n_decode
        st["prompt_tokens"] += len(step.batch.tokens) - step.n_decode
        out = s.update(step, ids)
        self._interrupted = False
        return out
