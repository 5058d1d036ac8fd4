"""The NumPy reference as a model runner: slow, exact, and available everywhere, so that the whole
engine (scheduling, paging, preemption, aborts) runs on the CPU in CI.

Each sequence of a step runs through its own reference KV cache one token at a time: every position's
arithmetic is then the same whatever the schedule (a T-row matrix product through BLAS may round
differently from T one-row products), so the CPU engine's tokens do not depend on the batch, on how a
prompt is cut into chunks, or on preemptions, like the GPU kernels' by design. Only the logit rows the
step asks for are unembedded. The pages the scheduler hands out are not needed here (the reference
cache grows per sequence) but are counted alike, so that paging and preemption run as on the GPU; a
swapped-out sequence's reference cache is set aside (the host memory is the CPU's own) and put back
into its new slot.
"""
from __future__ import annotations

import numpy as np

from ..batch import StepBatch
from ..kv_cache import pages_per_slot
from ..sampling import sample_row
from .config import EngineConfig
from .runner import Layout


class CPUModelRunner:
    name = "cpu (NumPy reference, float32)"

    def __init__(self, weights, config: EngineConfig | None = None, model=None):
        """model: what runs the forward (new_cache, hidden, unembed), default ReferenceModel(weights) (with
        K and V rounded to e4m3 when config.kv_cache_dtype is "fp8"); a tensor-parallel rank passes its
        share (gptoss.parallel.tp_runner), which has no fp8 cache."""
        from ..reference import ReferenceModel

        self.model_config = weights.config
        self.config = config = config or EngineConfig()
        if config.dense_experts:
            raise ValueError("dense_experts (--dense-experts) is for the GPU's expert kernels (H100/H200); "
                             "leave it off on the CPU reference")
        fp8 = config.kv_cache_dtype == "fp8"
        if model is not None and fp8:
            raise ValueError("the tensor-parallel CPU reference has no FP8 KV cache; run --kv-cache-dtype fp8 "
                             "on one CPU process or on GPUs")
        self.model = model if model is not None else ReferenceModel(weights, kv_fp8=fp8)
        if fp8:
            self.name = "cpu (NumPy reference, float32, K/V rounded to fp8 e4m3)"
        self.caches: list = []  # the reference KV cache of each slot
        self.swapped: dict = {}  # the caches of swapped-out sequences, by KVSwap key

    def free_bytes(self) -> None:
        """Memory is not planned on the CPU."""
        return None

    def allocate(self, capacity: int, slots: int, mean_positions: int | None = None, free_bytes=None) -> Layout:
        """`slots` slots (the engine asks for one per waiting request, EngineConfig.max_seqs at most) of
        `capacity` positions; pages for all of them, or EngineConfig.num_pages."""
        width = pages_per_slot(capacity)
        pages = slots * width if self.config.num_pages is None else self.config.num_pages
        if pages < width:
            raise ValueError(f"num_pages={pages} cannot hold one sequence of {capacity} positions "
                             f"({width} pages)")
        self.caches, self.swapped = [None] * slots, {}
        swap_pages = pages if self.config.swap_space > 0 else 0  # (as many as the cache: nothing is copied)
        return Layout(slots, capacity, pages, *self.config.step_tokens(slots, capacity), swap_pages=swap_pages)

    def _swap(self, moves) -> None:
        for move in moves:
            if move.kind == "out":
                self.swapped[move.key], self.caches[move.slot] = self.caches[move.slot], None
            elif move.kind == "in":
                self.caches[move.slot] = self.swapped.pop(move.key)
            else:
                self.swapped.pop(move.key, None)

    def step(self, batch: StepBatch) -> np.ndarray:
        self._swap(batch.swaps)
        row_of = {int(t): r for r, t in enumerate(batch.logit_rows.tolist())}  # token index -> logit row
        logits = np.empty((len(row_of), self.model_config.vocab_size), np.float32)
        t = 0
        for slot, start, n in zip(batch.seq_slots, batch.seq_starts, batch.q_lens):
            if start == 0:  # a new sequence in the slot (or one prefilled again after a preemption)
                self.caches[slot] = self.model.new_cache()
            cache = self.caches[slot]
            if cache is None or cache.length != start:
                raise RuntimeError(f"slot {slot}: the step continues at position {start}, its cache holds "
                                   f"{0 if cache is None else cache.length}")
            for _ in range(n):
                h = self.model.hidden(batch.tokens[t:t + 1], cache)
                if t in row_of:
                    logits[row_of[t]] = self.model.unembed(h)[0]
                t += 1
        s = batch.sampling
        if s is None:  # greedy: the first of equal maxima, as sample_row
            return logits.argmax(axis=1).astype(np.int32)
        return np.asarray([sample_row(logits[r], s.params(r), int(s.sequence[r]), int(s.step[r]))
                           for r in range(len(logits))], np.int32)
