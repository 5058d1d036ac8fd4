"""The full layers' KV pages (gptoss/kv_cache.py): which are free, which each slot holds, and the page
table that says so. This pool owns the only host copy of the table; a step that follows a change
carries the change to the runner, which applies it to the device's copy: the entries that changed
(StepBatch.page_updates: a few per step while serving, where the whole table of 1,024 slots x 2,048
pages at a 131,072-token context is 8 MiB) or, the first time and after many changes, the whole table
(StepBatch.page_table)."""
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
        self.whole = True  # the runner's copy may differ anywhere: send the whole table next
        self.touched: list[np.ndarray] = []  # flat indices of the entries changed since the last take

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
        rows = np.repeat(slots, want)
        self.table[rows, cols] = np.asarray(pages, np.int32)
        self.held[slots] += want
        self.touched.append(rows * self.table.shape[1] + cols)

    def held_pages(self, slot: int) -> np.ndarray:
        """The slot's pages, in position order (a copy)."""
        return self.table[slot, :self.held[slot]].copy()

    def release(self, slot: int) -> None:
        """The slot's pages go back to the free list; its row points at the spare page again."""
        n = int(self.held[slot])
        self.free.extend(self.table[slot, :n][::-1].tolist())
        self.held[slot] = 0
        self.table[slot, :n] = self.spare  # (the rest of the row points there already)
        self.touched.append(slot * self.table.shape[1] + np.arange(n))

    def take_changes(self) -> tuple[np.ndarray | None, np.ndarray | None]:
        """What changed since the last call, for the next step to carry: (the whole table, None) the
        first time or when more than an eighth of it changed, (None, updates) when some entries did
        (updates [2, n] int32: their flat indices into the table, each once, and their values now),
        (None, None) when nothing did."""
        touched, self.touched = self.touched, []
        if self.whole:
            self.whole = False
            return self.table, None
        if not touched:
            return None, None
        index = np.unique(np.concatenate(touched))
        if len(index) > self.table.size // 8:
            return self.table, None
        return None, np.stack([index, self.table.reshape(-1)[index]]).astype(np.int32)
