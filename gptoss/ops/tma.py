"""Tensor maps for the tensor-memory accelerator (TMA, H100/H200): the driver's 128-byte CUtensorMap that
a kernel's cp.async.bulk.tensor reads, made with cuTensorMapEncodeTiled from libcuda (gptoss.kernels.driver:
CuPy does not wrap it) and passed to the kernel by value (a numpy.void of 128 bytes; the kernel takes
`const __grid_constant__ TensorMap`, kernels/mma.h).

Only what the kernels use: 2-D bf16 row-major matrices, boxes of 64 elements (128 bytes) along the
row by `box_rows` rows, landing in shared memory in the 128-byte swizzle the wgmma descriptors read;
elements outside the matrix arrive as zeros.
"""
from __future__ import annotations

import ctypes
import functools

import numpy as np

from ..kernels import driver

_BFLOAT16 = 9         # CU_TENSOR_MAP_DATA_TYPE_BFLOAT16
_INTERLEAVE_NONE = 0
_SWIZZLE_128B = 3
_L2_PROMOTION_256B = 3
_OOB_FILL_ZERO = 0    # CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE: zeros
BOX_COLS = 64         # 64 bf16 = 128 bytes: the swizzle's row


def _encode_fn():
    u64p, u32p = ctypes.POINTER(ctypes.c_uint64), ctypes.POINTER(ctypes.c_uint32)
    return driver.function("cuTensorMapEncodeTiled",
                           (ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32, ctypes.c_void_p, u64p, u64p, u32p, u32p,
                            ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int))


def available() -> bool:
    """True when the CUDA driver has cuTensorMapEncodeTiled (CUDA 12+ drivers)."""
    return _encode_fn() is not None


@functools.lru_cache(maxsize=4096)
def _encode(ptr: int, rows: int, cols: int, row_bytes: int, box_rows: int) -> np.void:
    fn = _encode_fn()
    if fn is None:
        raise RuntimeError("cuTensorMapEncodeTiled not found in libcuda.so.1 (needs a CUDA 12+ driver)")
    raw = ctypes.create_string_buffer(128 + 64)  # the driver writes the map to a 64-byte aligned address
    addr = (ctypes.addressof(raw) + 63) // 64 * 64
    dims = (ctypes.c_uint64 * 2)(cols, rows)          # innermost first
    strides = (ctypes.c_uint64 * 1)(row_bytes)        # of every dimension but the innermost
    box = (ctypes.c_uint32 * 2)(BOX_COLS, box_rows)
    elem = (ctypes.c_uint32 * 2)(1, 1)
    err = fn(ctypes.c_void_p(addr), _BFLOAT16, 2, ctypes.c_void_p(ptr), dims, strides, box, elem,
             _INTERLEAVE_NONE, _SWIZZLE_128B, _L2_PROMOTION_256B, _OOB_FILL_ZERO)
    if err:
        raise RuntimeError(f"cuTensorMapEncodeTiled failed with CUresult {err} (matrix {rows} x {cols} "
                           f"at {ptr:#x}, row pitch {row_bytes} B, box {box_rows} x {BOX_COLS})")
    return np.frombuffer(ctypes.string_at(addr, 128), dtype="V128")[0]


def matrix_map(a, box_rows: int) -> np.void:
    """The tensor map of a bf16 (uint16) matrix `a` [rows, cols] (CuPy, rows contiguous, 16-byte aligned
    base and row pitch) with boxes of box_rows x 64. Cached by address and shape."""
    rows, cols = a.shape
    if a.dtype.itemsize != 2 or a.strides[1] != 2:
        raise ValueError("matrix_map: a 2-byte matrix with contiguous rows")
    if a.data.ptr % 16 or a.strides[0] % 16:
        raise ValueError("matrix_map: base address and row pitch must be multiples of 16 bytes")
    if not 1 <= box_rows <= 256:
        raise ValueError(f"matrix_map: box_rows = {box_rows}, a box has 1..256 rows")
    return _encode(int(a.data.ptr), int(rows), int(cols), int(a.strides[0]), int(box_rows))
