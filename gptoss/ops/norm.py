"""RMSNorm of the fp32 residual stream into bf16, alone or fused with the residual add before it
(gptoss/kernels/norm.hip). fp32 math: t = bf16(x / sqrt(mean(x^2) + eps) * scale)."""
from __future__ import annotations

import numpy as np

from ..kernels import KernelOptions, define, kernel, resolved
from ._check import check, out_or_new

THREADS = define("norm", "NORM_THREADS")  # the kernels' block size
_NAMES = {np.dtype(np.uint16): "bf16", np.dtype(np.float32): "f32"}


def _dtype_name(arr, name: str, shape: tuple) -> str:
    """'bf16' or 'f32' for a bf16 (uint16 bits) or float32 array of the given shape."""
    import cupy

    if not isinstance(arr, cupy.ndarray) or arr.dtype not in _NAMES:
        got = arr.dtype if isinstance(arr, cupy.ndarray) else type(arr).__name__
        raise TypeError(f"{name}: expected a cupy bf16 (uint16) or float32 array, got {got}")
    check(arr, name, arr.dtype, shape)
    return _NAMES[arr.dtype]


def _aligned(arr, nbytes: int) -> bool:
    return arr.data.ptr % nbytes == 0


def _vec4(H: int, x, out, *others) -> bool:
    """4-wide loads apply: H % 4 == 0 and each array aligned to 4 of its elements."""
    return H % 4 == 0 and _aligned(x, 16) and _aligned(out, 8) and all(_aligned(a, 4 * a.itemsize) for a in others)


def _out32(out_f32, T: int, H: int):
    """The optional fp32 copy of the result: (kernel argument, vec4-able)."""
    import cupy

    if out_f32 is None:
        return np.uint64(0), True  # a null pointer: the kernel skips the fp32 store
    check(out_f32, "out_f32", cupy.float32, (T, H))
    return out_f32, _aligned(out_f32, 16)


def rmsnorm(x, scale, eps: float, out=None, out_f32=None, kernels: KernelOptions | None = None):
    """t [T, H] bf16 = rmsnorm(x [T, H] float32) * scale [H] (bf16 or float32); the same values
    unrounded into out_f32 [T, H] float32 when given."""
    import cupy

    check(x, "x", cupy.float32, ndim=2)
    T, H = x.shape
    sname = _dtype_name(scale, "scale", (H,))
    out = out_or_new(out, "out", (T, H), cupy.uint16)
    o32, ok32 = _out32(out_f32, T, H)
    if T == 0 or H == 0:
        return out
    vec = _vec4(H, x, out, scale) and ok32
    kernel("norm", f"rmsnorm_{sname}", kernels=resolved(kernels))(
        (T,), (THREADS,), (x, scale, out, o32, np.int32(H), np.float32(eps), np.int32(vec)))
    return out


def add_rmsnorm(x, delta, scale, eps: float, out=None, out_f32=None, kernels: KernelOptions | None = None):
    """x += delta (in place; delta [T, H] bf16 or float32), then t [T, H] bf16 = rmsnorm(x) * scale
    (unrounded into out_f32 too when given)."""
    import cupy

    check(x, "x", cupy.float32, ndim=2)
    T, H = x.shape
    dname = _dtype_name(delta, "delta", (T, H))
    sname = _dtype_name(scale, "scale", (H,))
    out = out_or_new(out, "out", (T, H), cupy.uint16)
    o32, ok32 = _out32(out_f32, T, H)
    if T == 0 or H == 0:
        return out
    vec = _vec4(H, x, out, delta, scale) and ok32
    kernel("norm", f"add_rmsnorm_{dname}_{sname}", kernels=resolved(kernels))(
        (T,), (THREADS,), (x, delta, scale, out, o32, np.int32(H), np.float32(eps), np.int32(vec)))
    return out


def combine_rmsnorm(x, expert_out, k: int, scale, eps: float, out=None, kernels: KernelOptions | None = None):
    """The MoE combine and the next norm in one pass: x [T, H] float32 += sum over j (increasing) of
    expert_out [T*k, H] float32 rows t*k + j, then t [T, H] bf16 = rmsnorm(x) * scale. The same bits as
    ops.moe.combine_add followed by rmsnorm (which it falls back to when the 4-wide path does not apply)."""
    import cupy

    check(x, "x", cupy.float32, ndim=2)
    T, H = x.shape
    check(expert_out, "expert_out", cupy.float32, (T * k, H))
    sname = _dtype_name(scale, "scale", (H,))
    out = out_or_new(out, "out", (T, H), cupy.uint16)
    if T == 0 or H == 0:
        return out
    if not _vec4(H, x, out, scale) or not _aligned(expert_out, 16):
        from .moe import combine_add

        combine_add(x, expert_out)
        return rmsnorm(x, scale, eps, out=out)
    kernel("norm", f"combine_rmsnorm_{sname}", kernels=resolved(kernels))(
        (T,), (THREADS,), (x, expert_out, np.int32(k), scale, out, np.int32(H), np.float32(eps)))
    return out
