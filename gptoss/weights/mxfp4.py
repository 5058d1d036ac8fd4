"""MXFP4: blocks of 32 values along the input dimension share one power-of-two scale (E8M0 byte, bias
127); each value is a 4-bit E2M1 code, two codes per byte, the low nibble holding the even element."""
from __future__ import annotations

import numpy as np

FP4_VALUES = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
                       -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], dtype=np.float32)
BLOCK = 32


def dequantize(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """blocks [..., R, K/32, 16] uint8 and scales [..., R, K/32] uint8 -> float32 [..., R, K].

    value[r, j] = FP4_VALUES[nibble(j)] * 2^(scales[r, j // 32] - 127), nibble(j) = low nibble of byte
    j // 2 within its block when j is even, the high nibble when j is odd.
    """
    blocks = np.asarray(blocks)
    scales = np.asarray(scales)
    if blocks.shape[:-1] != scales.shape or blocks.shape[-1] != 16:
        raise ValueError(f"MXFP4 blocks {blocks.shape} do not match scales {scales.shape}")
    lo = FP4_VALUES[blocks & 0x0F]
    hi = FP4_VALUES[blocks >> 4]
    values = np.stack([lo, hi], axis=-1).reshape(*blocks.shape[:-1], BLOCK)  # [..., R, K/32, 32]
    factor = np.ldexp(np.float32(1.0), scales.astype(np.int32) - 127).astype(np.float32)
    values = values * factor[..., None]
    return values.reshape(*scales.shape[:-1], scales.shape[-1] * BLOCK)


def quantize(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float [..., R, K] -> (blocks uint8 [..., R, K/32, 16], scales uint8 [..., R, K/32]).

    Each block's scale is the power of two that maps its largest magnitude to at most 6 (the largest
    E2M1 value); each value then takes the nearest code. dequantize(quantize(w)) is close to w, and
    exact when w already holds MXFP4-representable values.
    """
    w = np.asarray(w, dtype=np.float32)
    if w.shape[-1] % BLOCK:
        raise ValueError(f"last dimension {w.shape[-1]} is not a multiple of {BLOCK}")
    blk = w.reshape(*w.shape[:-1], w.shape[-1] // BLOCK, BLOCK)
    amax = np.abs(blk).max(axis=-1)
    with np.errstate(divide="ignore"):
        exp = np.where(amax > 0, np.ceil(np.log2(np.maximum(amax, 1e-38) / 6.0)), -127)
    exp = np.clip(exp, -127, 127).astype(np.int32)
    scaled = blk / np.ldexp(np.float32(1.0), exp)[..., None]
    # nearest code by magnitude, sign in bit 3
    mags = FP4_VALUES[:8]
    code = np.abs(np.abs(scaled)[..., None] - mags).argmin(axis=-1).astype(np.uint8)
    code |= np.where(scaled < 0, np.uint8(8), np.uint8(0)).astype(np.uint8) * (code > 0)
    packed = (code[..., 0::2] | (code[..., 1::2] << 4)).astype(np.uint8)
    return packed, (exp + 127).astype(np.uint8)
