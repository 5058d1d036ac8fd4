"""Token sampling on the GPU (gptoss/kernels/sampling.hip): the algorithm of docs/DESIGN.md "Sampling",
bit-compatible in its random draws with the CPU sampler gptoss/sampling.py. One CTA per row; rows are
independent, so a row's draw never depends on the batch around it.

Rows with temperature <= 0 are greedy. NaN logits never win an argmax.
"""
from __future__ import annotations

import numpy as np

from ..kernels import KernelOptions, define, kernel, resolved
from ._check import check, out_or_new

SAMPLE_THREADS = define("sampling", "SAMPLE_THREADS")  # = RADIX_BINS: the kernel needs exactly this block size
ARGMAX_THREADS = define("sampling", "ARGMAX_THREADS")


def _logits(logits):
    import cupy

    check(logits, "logits", cupy.float32, ndim=2)
    B, V = logits.shape
    if V == 0:
        raise ValueError("logits: empty vocabulary")
    if V > 2**30:
        raise ValueError(f"logits: vocabulary of {V} is too large for int32 ids")
    vec = V % 4 == 0 and logits.data.ptr % 16 == 0
    return B, V, np.int32(vec)


def argmax(logits, out=None, kernels: KernelOptions | None = None):
    """ids [B] int32 = argmax over each row of logits [B, V] float32, ties to the lowest id."""
    import cupy

    B, V, vec = _logits(logits)
    out = out_or_new(out, "out", (B,), cupy.int32)
    if B:
        kernel("sampling", "argmax_rows", kernels=resolved(kernels))(
            (B,), (ARGMAX_THREADS,), (logits, out, np.int32(V), vec))
    return out


def sample(logits, temperature, top_p, seed, sequence, step, out=None, kernels: KernelOptions | None = None):
    """One token id per row of logits [B, V] float32 -> ids [B] int32.

    temperature, top_p: [B] float32 (temperature 0 = greedy, top_p 1 = no nucleus cut);
    seed: an int (uint32, the same for all rows) or a [B] uint32 / int32 array;
    sequence, step: [B] int32 — the draw of row b is sample_uniform(seed, sequence[b], step[b]).
    """
    import cupy

    B, V, vec = _logits(logits)
    check(temperature, "temperature", cupy.float32, (B,))
    check(top_p, "top_p", cupy.float32, (B,))
    check(sequence, "sequence", cupy.int32, (B,))
    check(step, "step", cupy.int32, (B,))
    if isinstance(seed, cupy.ndarray):
        if seed.dtype == cupy.int32:
            seed = seed.view(cupy.uint32)
        seeds, scalar, per_row = check(seed, "seed", cupy.uint32, (B,)), np.uint32(0), np.int32(1)
    else:
        # the pointer is never read when per_row is 0; any device array will do
        seeds, scalar, per_row = temperature, np.uint32(int(seed) & 0xFFFFFFFF), np.int32(0)
    out = out_or_new(out, "out", (B,), cupy.int32)
    if B:
        kernel("sampling", "sample_rows", kernels=resolved(kernels))(
            (B,), (SAMPLE_THREADS,),
            (logits, temperature, top_p, seeds, scalar, per_row, sequence, step, out, np.int32(V), vec))
    return out
