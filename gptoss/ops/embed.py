"""Token embedding into the fp32 residual stream (gptoss/kernels/embed.hip).

An id outside [0, V) reads nothing: its row of the output is NaN (so the error is loud downstream).
"""
from __future__ import annotations

import numpy as np

from ..kernels import KernelOptions, define, kernel, resolved
from ._check import check, out_or_new

THREADS = define("embed", "EMBED_THREADS")  # the kernels' block size


def embed(tokens, table, out=None, kernels: KernelOptions | None = None):
    """x [T, H] float32 = table[tokens] for tokens [T] int32 and a bf16 table [V, H] (uint16 bits)."""
    import cupy

    check(tokens, "tokens", cupy.int32, ndim=1)
    check(table, "table", cupy.uint16, ndim=2)
    (T,), (V, H) = tokens.shape, table.shape
    out = out_or_new(out, "out", (T, H), cupy.float32)
    if T == 0 or H == 0:
        return out
    vec8 = H % 8 == 0 and table.data.ptr % 16 == 0 and out.data.ptr % 16 == 0
    kernel("embed", "embed_bf16", kernels=resolved(kernels))(
        (T,), (THREADS,), (tokens, table, out, np.int32(H), np.int32(V), np.int32(vec8)))
    return out


def gather_rows(rows, src, out=None, kernels: KernelOptions | None = None):
    """out [R, H] float32 = src [T, H] float32 rows `rows` [R] int32 (NaN rows for indices outside T)."""
    import cupy

    check(rows, "rows", cupy.int32, ndim=1)
    check(src, "src", cupy.float32, ndim=2)
    (R,), (T, H) = rows.shape, src.shape
    out = out_or_new(out, "out", (R, H), cupy.float32)
    if R and H:
        kernel("embed", "gather_rows_f32", kernels=resolved(kernels))(
            (R,), (THREADS,), (rows, src, out, np.int32(H), np.int32(T)))
    return out
