"""StepBatch: what one forward of the model computes, as host arrays. The scheduler (gptoss/engine) builds
it; the GPU model (gptoss/model.py) and the CPU runner (gptoss/engine/cpu_runner.py) run it.

A step's tokens come from several sequences at once, each at its own position: decode tokens (one per
sequence) and prefill chunks (several consecutive tokens of one sequence) mixed freely. A sequence
lives in a slot of the KV cache; its tokens are contiguous in the batch.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .sampling import SamplingParams


@dataclass
class RowSampling:
    """How to pick each logit row's next token (gptoss/sampling.py's algorithm), one entry per row:
    temperature 0 = greedy; the draw of row r is sample_uniform(seed[r], sequence[r], step[r])."""
    temperature: np.ndarray  # [R] float32
    top_p: np.ndarray  # [R] float32
    seed: np.ndarray  # [R] uint32
    sequence: np.ndarray  # [R] int32: the counter RNG's sequence id (getp: the prompt's input line)
    step: np.ndarray  # [R] int32: tokens the row's request generated so far

    @classmethod
    def uniform(cls, params: SamplingParams, sequence, step) -> "RowSampling":
        """The same params for every row."""
        sequence = np.asarray(sequence, np.int32).reshape(-1)
        n = len(sequence)
        return cls(np.full(n, params.temperature, np.float32), np.full(n, params.top_p, np.float32),
                   np.full(n, params.seed, np.uint32), sequence, np.asarray(step, np.int32).reshape(-1))

    def params(self, row: int) -> SamplingParams:
        return SamplingParams(temperature=float(self.temperature[row]), top_p=float(self.top_p[row]),
                              seed=int(self.seed[row]))


@dataclass(frozen=True)
class KVSwap:
    """One sequence's KV moving between the cache and host memory, done before the step's kernels run
    and in the order the step lists them: "out" copies the slot's sliding-layer rings and the rows of
    `pages` (its full-layer pages, in position order) to host memory kept under `key`; "in" copies the
    copy under `key` back into `slot`'s rings and `pages` and forgets it; "drop" forgets it."""
    kind: str  # "out", "in" or "drop"
    key: int  # names the host copy (the request id)
    slot: int = -1
    pages: np.ndarray | None = None  # int32


@dataclass
class StepBatch:
    """One forward's tokens; sequences are contiguous runs of tokens."""
    tokens: np.ndarray  # [T] int32
    positions: np.ndarray  # [T] int32
    slots: np.ndarray  # [T] int32
    q_lens: list  # tokens per sequence, in order
    seq_slots: list  # slot per sequence
    seq_starts: list  # position of each sequence's first token in this step
    logit_rows: np.ndarray  # [R] int32: rows of T whose next-token logits are wanted
    sampling: RowSampling | None = None  # None: every row greedy
    page_table: np.ndarray | None = None  # [slots, pages per slot] int32 when it changed since the last step
    # or only these entries of it changed: [2, n] int32, flat indices into the table and their new values
    page_updates: np.ndarray | None = None
    swaps: tuple = ()  # KVSwap moves to do first, in order (a runner that swaps: Layout.swap_pages > 0)

    @classmethod
    def decode(cls, tokens, positions, slots) -> "StepBatch":
        """One token per sequence (every row's logits wanted)."""
        tokens, positions, slots = (np.asarray(a, np.int32).reshape(-1) for a in (tokens, positions, slots))
        n = len(tokens)
        return cls(tokens, positions, slots, [1] * n, slots.tolist(), positions.tolist(), np.arange(n, dtype=np.int32))

    @classmethod
    def prefill(cls, prompts, slots, starts=None) -> "StepBatch":
        """Whole chunks: prompts[i] (token ids) at positions starts[i].. of slot slots[i]; logits of
        each chunk's last token."""
        starts = [0] * len(prompts) if starts is None else list(starts)
        tokens = np.concatenate([np.asarray(p, np.int32) for p in prompts])
        positions = np.concatenate([np.arange(s, s + len(p), dtype=np.int32) for p, s in zip(prompts, starts)])
        slot_ids = np.concatenate([np.full(len(p), s, np.int32) for p, s in zip(prompts, slots)])
        lens = [len(p) for p in prompts]
        return cls(tokens, positions, slot_ids, lens, list(slots), starts,
                   (np.cumsum(lens) - 1).astype(np.int32))

    @property
    def decode_only(self) -> bool:
        """One token per sequence, every row's logits wanted, in order (a captured decode graph's shape)."""
        T = len(self.tokens)
        return len(self.q_lens) == T and np.array_equal(self.logit_rows, np.arange(T))


@dataclass
class StageGroup:
    """Staged sequences of a step that one sliding-layer launch takes (WindowPlan): tokens [first, end)
    and sequences [seq_first, seq_end) of the reordered step. The staging cache is paged (PAGE positions
    a page): row r of `table` holds the pages of the group's r-th sequence, for its positions from
    window - 1 before its chunk to the chunk's end (`spare` elsewhere). Cache rows below are flat rows of
    the caches seen as [rows, Hkv, D]: slot * window + p % window in a ring, page * PAGE + p % PAGE in
    the staging cache."""
    first: int
    end: int
    seq_first: int
    seq_end: int
    table: np.ndarray  # [sequences, width] int32: the staging pages
    token_rows: np.ndarray  # [end - first] int32: each token's row of `table` (its "slot" while staged)
    fill: np.ndarray  # [2, n] int32: (ring row, staging row) of the older keys the chunks' queries read
    keep: np.ndarray  # [2, n] int32: (staging row, ring row) of the chunks' keys the ring keeps


@dataclass
class WindowPlan:
    """A step's sliding layers over rings of exactly `window` positions per slot (position p at row
    p % window). A sequence with one token of the step writes its key over the one that leaves its
    window and attends its ring directly. A longer chunk cannot: its first query needs keys that its
    later keys would overwrite. So the chunks are staged, per sliding layer and per group of at most
    `group_seqs` sequences: the window - 1 keys before each chunk are copied from its ring into a paged
    staging cache (`fill`), the chunk's keys are written there and attended as on a full layer with a
    window, and the last `window` of them go back into the ring (`keep`). Same keys, same tiles: the
    bits are those of a ring long enough for the chunk.

    The step's tokens are reordered: the one-token sequences first (tokens [0, ring_end)), then each
    group's; every other operation treats a token alone, so the order changes no bits."""
    order: np.ndarray  # [T] int64: the original index of each reordered token
    q_lens: list  # tokens per sequence, reordered
    seq_slots: list
    seq_starts: list
    ring_end: int  # the one-token sequences' tokens: [0, ring_end)
    ring_seqs: int  # and their count (the first ring_seqs sequences)
    groups: list  # StageGroup, in order

    @classmethod
    def build(cls, q_lens, seq_slots, seq_starts, window: int, page: int, width: int, spare: int,
              group_seqs: int) -> "WindowPlan | None":
        """The plan of a step of sequences with these token counts (contiguous, in order), slots and start
        positions, for a staging cache of `spare` pages of `page` positions (and a spare one after them,
        where the page tables' unused entries point), page tables `width` wide; None when no sequence
        has more than one token."""
        lens = np.asarray(q_lens, np.int64).reshape(-1)
        slots, starts = np.asarray(seq_slots, np.int64), np.asarray(seq_starts, np.int64)
        if not len(lens) or lens.max() <= 1:
            return None
        if window < 1 or group_seqs < 1:
            raise ValueError(f"a window plan needs a window and group size of at least 1 (got {window}, {group_seqs})")
        offsets = np.concatenate([[0], np.cumsum(lens)[:-1]])
        single, staged = np.flatnonzero(lens == 1), np.flatnonzero(lens > 1)
        seqs = np.concatenate([single, staged])
        order = np.concatenate([np.arange(offsets[i], offsets[i] + lens[i]) for i in seqs])
        token_edges = np.concatenate([[0], np.cumsum(lens[seqs])])
        groups = []
        for g0 in range(len(single), len(seqs), group_seqs):
            g1 = min(g0 + group_seqs, len(seqs))
            groups.append(_stage_group(lens[seqs[g0:g1]], slots[seqs[g0:g1]], starts[seqs[g0:g1]], window, page,
                                       width, spare, int(token_edges[g0]), int(token_edges[g1]), g0, g1))
        return cls(order, lens[seqs].tolist(), slots[seqs].tolist(), starts[seqs].tolist(),
                   int(token_edges[len(single)]), len(single), groups)

    @staticmethod
    def pages(tokens: int, window: int, page: int, group_seqs: int) -> int:
        """Staging pages that any group of at most group_seqs sequences and `tokens` tokens needs: a
        sequence of n tokens spans at most (n + window - 2) // page + 2 pages (window - 1 older keys)."""
        return -(-tokens // page) + group_seqs * (-(-(window - 2) // page) + 2)


def _stage_group(lens, slots, starts, window: int, page: int, width: int, spare: int, first: int, end: int,
                 seq_first: int, seq_end: int) -> StageGroup:
    table = np.full((len(lens), width), spare, np.int32)
    fill, keep = [], []
    used = 0
    for r, (n, slot, start) in enumerate(zip(lens, slots, starts)):
        lo, stop = max(0, start - window + 1), start + n  # the keys its queries read: [lo, stop)
        first_page, last_page = lo // page, (stop - 1) // page
        if used + last_page - first_page + 1 > spare:
            raise ValueError(f"a staged group needs more than the staging cache's {spare} pages")
        table[r, first_page:last_page + 1] = np.arange(used, used + last_page - first_page + 1)
        used += last_page - first_page + 1

        def rows(p):  # (ring rows, staging rows) of positions p
            return slot * window + p % window, table[r, p // page].astype(np.int64) * page + p % page

        ring, stage = rows(np.arange(lo, start))
        fill.append(np.stack([ring, stage]))
        ring, stage = rows(np.arange(max(start, stop - window), stop))
        keep.append(np.stack([stage, ring]))
    token_rows = np.repeat(np.arange(len(lens)), lens).astype(np.int32)
    return StageGroup(first, end, seq_first, seq_end, table, token_rows,
                      np.concatenate(fill, axis=1).astype(np.int32), np.concatenate(keep, axis=1).astype(np.int32))
