"""Argument checks shared by the launch wrappers: clear errors instead of silent memory corruption."""
from __future__ import annotations


def check(arr, name: str, dtype, shape: tuple | None = None, ndim: int | None = None):
    import cupy

    if not isinstance(arr, cupy.ndarray):
        raise TypeError(f"{name}: expected a cupy.ndarray, got {type(arr).__name__}")
    if arr.dtype != dtype:
        raise TypeError(f"{name}: expected dtype {cupy.dtype(dtype)}, got {arr.dtype}")
    if not arr.flags.c_contiguous:
        raise ValueError(f"{name}: must be C-contiguous")
    if ndim is not None and arr.ndim != ndim:
        raise ValueError(f"{name}: expected {ndim} dimensions, got shape {arr.shape}")
    if shape is not None:
        if len(shape) != arr.ndim or any(s is not None and s != a for s, a in zip(shape, arr.shape)):
            raise ValueError(f"{name}: expected shape {shape}, got {arr.shape}")
    return arr


def out_or_new(out, name: str, shape: tuple, dtype):
    import cupy

    if out is None:
        return cupy.empty(shape, dtype=dtype)
    return check(out, name, dtype, shape)
