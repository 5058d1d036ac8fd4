"""The full layers' KV pages (gptoss/kv_cache.py): which are free, which each slot holds, and the page
table that says so. This pool owns the only host copy of the table; a step that follows a change
carries it to the runner (StepBatch.page_table), which copies it to the device."""
from __future__ import annotations

import numpy as np

from ..kv_cache import PAGE


def pages_for(positions) -> np.ndarray:
    """Pages that hold `positions` positions (vectorised)."""
    return -(-np.asarray(positions, np.int64) // PAGE)


class PagePool:
    """`pages` pages for `rows` slots of up to `width` pages each. table[slot, j] is the page of
    positions PAGE*j .. PAGE*j + PAGE-1 of the slot; its first held[slot] entries are the slot's pages,
    every other entry points at the spare page (= pages), where stray writes land."""

    def __init__(self, rows: int, width: int, pages: int):
        if pages < 1:
            raise ValueError(f"a page pool needs at least one page, got {pages}")
        self.pages = self.spare = pages
        self.table = np.full((rows, width), self.spare, np.int32)
        self.free = list(range(pages))[::-1]  # pop() hands out low pages first
        self.held = np.zeros(rows, np.int64)
        self.changed = True  # the runner's copy may differ from the table

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
        self.table[np.repeat(slots, want), cols] = np.asarray(pages, np.int32)
        self.held[slots] += want
        self.changed = True

    def release(self, slot: int) -> None:
        """The slot's pages go back to the free list; its row points at the spare page again."""
        n = int(self.held[slot])
        self.free.extend(self.table[slot, :n][::-1].tolist())
        self.held[slot] = 0
        self.table[slot] = self.spare
        self.changed = True

    def take_table(self) -> np.ndarray | None:
        """The table if it changed since the last call (for the next step to carry), else None."""
        if not self.changed:
            return None
        self.changed = False
        return self.table
