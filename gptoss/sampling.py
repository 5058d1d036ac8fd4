"""The CPU sampler: greedy, temperature and top-p, with the counter-based RNG of the GPU kernel.

The algorithm (docs/DESIGN.md "Sampling"), per row of logits, with u = sample_uniform(seed, sequence, step):
  1. temperature == 0: argmax, ties to the lowest id.
  2. p = softmax(logits / temperature) in float32.
  3. top_p < 1: keep K = {i : p_i >= tau}, tau the value at which the sorted (descending) running sum
     first reaches top_p; ties with that value stay in.
  4. target = u * sum_{i in K} p_i; walk ids in increasing order summing p_i over K; the first id
     whose running sum exceeds target wins (the last id of K if rounding leaves none).
A draw depends only on (seed, sequence, step) and its own row, never on the rows around it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

U32 = 0xFFFFFFFF


def sample_uniform(seed: int, sequence: int, step: int) -> float:
    """Uniform in [0, 1), bit-exact with sample_uniform in gptoss/kernels/common.h.

    All arithmetic is uint32 with wrap-around; the result is a multiple of 2^-24, exact in float32.
    """
    seed, sequence, step = seed & U32, sequence & U32, step & U32
    x = ((seed * 0x9E3779B1) ^ (sequence * 0x85EBCA77) ^ (step * 0xC2B2AE3D)) & U32
    x ^= x >> 16
    x = (x * 0x85EBCA6B) & U32
    x ^= x >> 13
    x = (x * 0xC2B2AE35) & U32
    x ^= x >> 16
    return (x >> 8) / 16777216.0


@dataclass(frozen=True)
class SamplingParams:
    """How one request generates (the fields vLLM's SamplingParams has under the same names).

    temperature 0 = greedy; top_p 1 = no nucleus cut; seed is a uint32 shared with the GPU kernel.
    max_tokens: most new tokens (generation also ends at the context's end).
    stop_token_ids: ids that end the request (not emitted), beside the model's end-of-sequence ids.
    ignore_eos: do not stop at the end-of-sequence ids (stop_token_ids still stop)."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    max_tokens: int = 256
    stop_token_ids: tuple = ()
    ignore_eos: bool = False

    def __post_init__(self):
        if not (math.isfinite(self.temperature) and self.temperature >= 0.0):
            raise ValueError(f"temperature must be a finite number >= 0 (got {self.temperature}); "
                             "use 0 for greedy decoding")
        if not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1] (got {self.top_p}); use 1 to sample from all tokens")
        if not (isinstance(self.seed, (int, np.integer)) and 0 <= self.seed <= U32):
            raise ValueError(f"seed must be an integer in 0..{U32} (got {self.seed!r})")
        if not (isinstance(self.max_tokens, (int, np.integer)) and self.max_tokens >= 1):
            raise ValueError(f"max_tokens must be an integer >= 1 (got {self.max_tokens!r})")
        ids = tuple(self.stop_token_ids)
        if not all(isinstance(i, (int, np.integer)) and i >= 0 for i in ids):
            raise ValueError(f"stop_token_ids must be token ids >= 0 (got {self.stop_token_ids!r})")
        object.__setattr__(self, "stop_token_ids", tuple(int(i) for i in ids))

    def stop_ids(self, eos_ids=()) -> frozenset:
        """The ids that end this request: stop_token_ids, and eos_ids unless ignore_eos."""
        return frozenset(self.stop_token_ids) | (frozenset() if self.ignore_eos else frozenset(eos_ids))


def softmax_f32(logits: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(logits / temperature) in float32 for one row."""
    x = logits.astype(np.float32) / np.float32(temperature)
    e = np.exp(x - x.max())
    return e / e.sum(dtype=np.float32)


def top_p_mask(p: np.ndarray, top_p: float) -> np.ndarray:
    """Boolean mask of the nucleus: every id whose probability is >= the value that closes the
    shortest descending prefix reaching top_p (all ids if rounding never reaches it)."""
    top_p = np.float32(top_p)
    if top_p >= 1.0:
        return np.ones(p.shape, dtype=bool)
    descending = np.sort(p)[::-1]
    # sums in float64: near-exact, like the GPU kernel's 64-bit fixed point (fp32 drifts over 201k ids)
    running = np.cumsum(descending, dtype=np.float64)
    reached = np.flatnonzero(running >= np.float64(top_p))
    if reached.size == 0:
        return np.ones(p.shape, dtype=bool)
    return p >= descending[reached[0]]


def sample_row(logits: np.ndarray, params: SamplingParams, sequence: int, step: int) -> int:
    """One draw from one row of logits [V]."""
    if params.temperature == 0.0:
        return int(np.argmax(logits))  # np.argmax takes the first of equal maxima: the lowest id
    p = softmax_f32(logits, params.temperature)
    kept = top_p_mask(p, params.top_p)
    running = np.cumsum(np.where(kept, p, np.float32(0.0)), dtype=np.float64)
    target = np.float64(sample_uniform(params.seed, sequence, step)) * running[-1]
    above = np.flatnonzero((running > target) & kept)
    if above.size:
        return int(above[0])
    return int(np.flatnonzero(kept)[-1])


def sample(logits: np.ndarray, params: SamplingParams, sequence, step):
    """Draw token ids. logits [V] -> int; logits [B, V] -> int64 array [B], where sequence and step
    are ints or per-row arrays of length B (row b draws with (sequence[b], step[b]))."""
    logits = np.asarray(logits)
    if logits.ndim == 1:
        return sample_row(logits, params, int(sequence), int(step))
    if logits.ndim != 2:
        raise ValueError(f"logits must be [V] or [B, V] (got shape {logits.shape})")
    rows = logits.shape[0]
    try:
        sequences = np.broadcast_to(np.asarray(sequence, dtype=np.int64), (rows,))
        steps = np.broadcast_to(np.asarray(step, dtype=np.int64), (rows,))
    except ValueError:
        raise ValueError(f"sequence and step must be ints or have one entry per row ({rows} rows)") from None
    return np.array([sample_row(logits[b], params, int(sequences[b]), int(steps[b])) for b in range(rows)],
                    dtype=np.int64)
