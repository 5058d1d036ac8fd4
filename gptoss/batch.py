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
class RunOrder:
    """A step's tokens reordered for caches that take at most `run` positions of one sequence per
    launch (the sliding layers' rings: window + run positions per slot). Every sequence's tokens are cut
    into runs of `run` (the last one shorter); the runs are listed run-major (every sequence's first
    run, then every second run, ...), so piece k -- the k-th runs of all sequences -- is one contiguous
    range of the reordered tokens and holds at most `run` tokens of any sequence. A sliding layer
    writes and attends piece by piece; every other operation treats a token alone and runs once over
    all of them. A run of a prompt chunk is attended exactly as the same tokens would be as a chunk of
    their own (docs/notes/attention.md, batch invariance), so the order changes no bits."""
    order: np.ndarray  # [T] int64: the original index of each reordered token
    q_lens: list  # tokens per run, run-major
    seq_slots: list  # slot per run
    seq_starts: list  # position of each run's first token
    pieces: list  # (first token, end token, first run, end run) of each piece, in order

    @classmethod
    def split(cls, q_lens, seq_slots, seq_starts, run: int) -> "RunOrder | None":
        """The run order of sequences with these token counts (contiguous, in order), slots and start
        positions; None when no sequence has more than `run` tokens (one piece, the original order)."""
        if run < 1:
            raise ValueError(f"a run needs at least one position, got {run}")
        lens = np.asarray(q_lens, np.int64).reshape(-1)
        if not len(lens) or lens.max() <= run:
            return None
        offsets = np.concatenate([[0], np.cumsum(lens)[:-1]])
        count = -(-lens // run)  # runs per sequence
        # runs as (k, sequence), ordered by k then sequence: the sequences with a k-th run, for each k
        having = [np.flatnonzero(count > j) for j in range(int(count.max()))]
        seq = np.concatenate(having)
        k = np.repeat(np.arange(len(having)), [len(h) for h in having])
        first = k * run
        n = np.minimum(lens[seq] - first, run)
        order = np.concatenate([np.arange(o, o + m) for o, m in zip(offsets[seq] + first, n)])
        ends = np.cumsum(n)
        bounds = np.flatnonzero(np.diff(k)) + 1  # the first run of each piece after the first
        run_edges = np.concatenate([[0], bounds, [len(seq)]])
        token_edges = np.concatenate([[0], ends])[run_edges]
        pieces = [(int(token_edges[i]), int(token_edges[i + 1]), int(run_edges[i]), int(run_edges[i + 1]))
                  for i in range(len(run_edges) - 1)]
        slots = np.asarray(seq_slots, np.int64)[seq]
        starts = np.asarray(seq_starts, np.int64)[seq] + first
        return cls(order, n.tolist(), slots.tolist(), starts.tolist(), pieces)
