"""What the engine needs from a model runner (the GPU model in gpu_runner.py, the NumPy reference in
cpu_runner.py, a stand-in in the scheduler's tests): size a KV cache, then run steps on it."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from ..batch import StepBatch
from ..config import ModelConfig
from ..kv_cache import pages_per_slot
from .config import EngineConfig


@dataclass(frozen=True)
class Layout:
    """A runner's KV cache once sized: the bounds the scheduler works within."""
    slots: int  # sequences at once (the cache has one more row, a padding slot: the page table's last row)
    capacity: int  # positions per sequence
    pages: int  # KV pages of PAGE positions that the slots share (at least one sequence's worth)
    max_step_tokens: int  # tokens one step may carry
    max_chunk: int  # prompt tokens of one sequence one step may carry
    # pages' worth of KV the runner keeps in host memory for preempted sequences (0: none, a preempted
    # sequence is prefilled again); with some, it carries out StepBatch.swaps
    swap_pages: int = 0
    slot_pages: int = 0  # a sequence's per-slot KV (the sliding layers' rings) that a swap copies too, in pages

    @property
    def width(self) -> int:
        """Pages one sequence of `capacity` positions needs."""
        return pages_per_slot(self.capacity)


class ModelRunner(Protocol):
    name: str  # for messages and records: "gpu (NVIDIA H200)", "cpu (NumPy reference, float32)"
    model_config: ModelConfig
    config: EngineConfig  # the engine's settings it was built with (chunk, step budget, pages, ...)
    # (optional) True when step(batch, while_running=fn) calls fn once the step's work is queued on the
    # device and before it waits for the results, so that the host's other work (the server handing the
    # last step's tokens to its clients) runs while the device computes; the engine calls fn itself,
    # before the step, for a runner without it
    overlaps: bool

    def allocate(self, capacity: int, slots: int, mean_positions: int) -> Layout:
        """Size the KV cache for up to `slots` sequences of up to `capacity` positions, expected to
        hold `mean_positions` on average; any earlier cache and its contents are dropped."""

    def step(self, batch: StepBatch) -> np.ndarray:
        """Run one step: write its tokens' K/V, return the next token of each logit row (int32 [R])."""
