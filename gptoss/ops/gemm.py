"""Dense bf16 GEMM (gptoss/kernels/gemm.hip): out = x · wᵀ + bias with fp32 accumulation.

Used for the attention projections (QKV and output, with bias), the router and the unembedding. x is
[M, K] bf16, w the checkpoint's [N, K] ([out, in]) bf16, bias [N] bf16; out [M, N] bf16 or float32.

Variants (tile shapes of one kernel body) and how one is picked from (M, N):
- M <= 64 (decode): "d{BM}x{BN}": BM = 16/32/64 covers all rows in one row tile, BN is the widest of
  64/32/16 that still gives at least one CTA per SM (N = 2880 -> 16, 5120 -> 32, 201088 -> 64), 8 for the
  tiny N of the router; these stream W through a deep cp.async ring (memory bound).
- M > 64 on H100/H200 (sm_90a, kernels.wgmma_available): "wg128x256" / "wg128x128", wgmma with both
  operands in shared memory (see pick_variant for which); where the driver can make tensor maps
  (ops/tma.py), "wgt128x256" instead of "wg128x256": the same tiles, loaded by the tensor-memory
  accelerator from a producer warpgroup.
- M > 64 elsewhere: "128x128" when it makes at least two waves of tiles, else "64x64" (measured on H100
  with benchmarks/kernel_gemm.py --sweep; "256x128" and "64x128" stay available for the sweep).
Every variant accumulates an element in the same order (one k16 step at a time in increasing k, mma.sync
or wgmma: bit-identical), so a row's result is the same whatever M is and whichever variant runs (batch
invariance; docs/DESIGN.md).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from ..kernels import WGMMA_SMEM_SLACK, kernel, wgmma_available
from . import tma as _tma
from ._check import check, out_or_new


@dataclass(frozen=True)
class Variant:
    bm: int
    bn: int
    bk: int
    warps_m: int
    warps_n: int
    stages: int
    wgmma: bool = False  # sm_90a only (GEMM_WG_KERNEL in gemm.hip)
    tma: bool = False    # takes tensor maps of x and w (GEMM_TMA_KERNEL), not their addresses

    @property
    def threads(self) -> int:
        return 32 * self.warps_m * self.warps_n

    @property
    def smem(self) -> int:
        """Dynamic shared memory of the tensor-core path: the cp.async ring of x and w tiles (wgmma: plus
        1 KB of slack to align the ring to the 1 KB swizzle atoms)."""
        return self.stages * (self.bm + self.bn) * self.bk * 2 + (WGMMA_SMEM_SLACK if self.wgmma else 0)


# Must match the GEMM_KERNEL / GEMM_WG_KERNEL / GEMM_TMA_KERNEL lists at the bottom of gemm.hip (name ->
# BM, BN, BK, WM, WN, STAGES; the wgmma ones as 2 x 4 warps = 2 warpgroups of 64 rows, the TMA one as
# 3 x 4: a producer warpgroup and two consumers).
VARIANTS = {
    "wgt128x256": Variant(128, 256, 64, 3, 4, 4, wgmma=True, tma=True),
    "wg128x256": Variant(128, 256, 64, 2, 4, 4, wgmma=True),
    "wg128x128": Variant(128, 128, 64, 2, 4, 3, wgmma=True),
    "256x128": Variant(256, 128, 64, 4, 2, 4),
    "128x128": Variant(128, 128, 64, 2, 2, 3),
    "64x128": Variant(64, 128, 64, 2, 2, 4),
    "64x64": Variant(64, 64, 64, 2, 2, 4),
    "d16x8": Variant(16, 8, 128, 1, 1, 12),
    "d16x16": Variant(16, 16, 128, 1, 2, 12),
    "d16x32": Variant(16, 32, 128, 1, 4, 8),
    "d16x64": Variant(16, 64, 128, 1, 4, 4),
    "d32x8": Variant(32, 8, 128, 2, 1, 9),
    "d32x16": Variant(32, 16, 128, 2, 2, 8),
    "d32x32": Variant(32, 32, 128, 1, 4, 6),
    "d32x64": Variant(32, 64, 128, 1, 4, 4),
    "d64x8": Variant(64, 8, 128, 4, 1, 5),
    "d64x16": Variant(64, 16, 128, 2, 2, 4),
    "d64x32": Variant(64, 32, 128, 2, 2, 4),
    "d64x64": Variant(64, 64, 128, 2, 2, 3),
}
LARGE = ("wgt128x256", "wg128x256", "wg128x128", "256x128", "128x128", "64x128", "64x64")
_OUT_DTYPES = {"bf16": np.uint16, "f32": np.float32}


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def pick_variant(M: int, N: int, sms: int = 132, wgmma: bool = False, tma: bool = False) -> str:
    """The variant linear() runs for an [M, K] x [N, K]ᵀ product on a GPU of `sms` multiprocessors
    (`wgmma`: the sm_90a variants exist, kernels.wgmma_available(); `tma`: tensor maps can be made,
    ops.tma.available())."""
    if M <= 64:
        bm = 16 if M <= 16 else 32 if M <= 32 else 64
        if N <= 512:  # the router (E = 32 or 128): as many CTAs as we can get
            bn = 8
        else:
            bn = next((c for c in (64, 32) if _cdiv(N, c) >= sms), 16)
            # each column tile re-reads the M real rows of x from L2: keep that below ~2x W's bytes
            bn = max(bn, min(64, bm // 2))
        return f"d{bm}x{bn}"
    if wgmma:  # one CTA of 128 x 256 per SM once there is a wave of them; else 128 x 128, two per SM
        # (the TMA kernel from half a wave on: 1.18x the 128 x 128 one at 96 tiles, M = 1,024, N = 2,880)
        wide_tiles = _cdiv(M, 128) * _cdiv(N, 256)
        if tma and wide_tiles >= sms // 2:
            return "wgt128x256"
        if wide_tiles >= sms:
            return "wg128x256"
        if _cdiv(M, 128) * _cdiv(N, 128) >= sms:
            return "wg128x128"
    # Measured on H100 (benchmarks/kernel_gemm.py --sweep, docs/notes/gemm.md): 128x128 (2 CTAs per SM)
    # is the fastest once it has two waves of tiles; with fewer, 64x64 (3 per SM) fills the GPU better.
    if _cdiv(M, 128) * _cdiv(N, 128) >= 2 * sms:
        return "128x128"
    return "64x64"


def available_variants(wgmma: bool | None = None, tma: bool | None = None) -> list[str]:
    """The variants this device can run: the wgmma ones only where kernels.wgmma_available(), the TMA
    one where tensor maps can be made too."""
    wgmma = wgmma_available() if wgmma is None else wgmma
    tma = _tma.available() if tma is None else tma
    return [name for name, v in VARIANTS.items() if (wgmma or not v.wgmma) and (tma or not v.tma)]


@functools.lru_cache(maxsize=None)
def _sm_count(device_id: int) -> int:
    import cupy

    return int(cupy.cuda.runtime.getDeviceProperties(device_id)["multiProcessorCount"])


@functools.lru_cache(maxsize=None)
def _launcher(name: str, device_id: int):
    """(kernel, dynamic smem bytes) of a variant; raises the kernel's shared-memory limit once."""
    import cupy

    k = kernel("gemm", f"gemm_{name}")
    if cupy.cuda.runtime.is_hip:
        return k, 0  # the portable path uses static shared memory only
    smem = VARIANTS[name].smem
    if smem > 48 * 1024:
        k.max_dynamic_shared_size_bytes = smem
    return k, smem


def linear(x, w, bias=None, out=None, out_dtype: str = "bf16", *, variant: str | None = None):
    """out [M, N] = x [M, K] · w [N, K]ᵀ (+ bias [N]); bf16 inputs (uint16 bits), fp32 accumulation,
    one rounding at the end (out_dtype "bf16") or fp32 output ("f32"). K % 32 == 0; x and w 16-byte
    aligned. `variant` forces a tile shape (a key of VARIANTS; for tests and benchmarks)."""
    import cupy

    check(x, "x", cupy.uint16, ndim=2)
    check(w, "w", cupy.uint16, ndim=2)
    M, K = x.shape
    N = w.shape[0]
    if w.shape[1] != K:
        raise ValueError(f"w: expected shape ({N}, {K}) to match x {x.shape}, got {w.shape}")
    if K == 0 or K % 32:
        raise ValueError(f"K = {K}: must be a positive multiple of 32")
    if bias is not None:
        check(bias, "bias", cupy.uint16, (N,))
    if out_dtype not in _OUT_DTYPES:
        raise ValueError(f"out_dtype: expected one of {sorted(_OUT_DTYPES)}, got {out_dtype!r}")
    dtype = _OUT_DTYPES[out_dtype]
    out = out_or_new(out, "out", (M, N), dtype)
    for arr, name, align in ((x, "x", 16), (w, "w", 16), (out, "out", 2 * out.itemsize)):
        if arr.data.ptr % align:
            raise ValueError(f"{name}: must be {align}-byte aligned (got address {arr.data.ptr:#x})")
    if variant is not None and variant not in VARIANTS:
        raise ValueError(f"variant: expected one of {', '.join(VARIANTS)}, got {variant!r}")
    if M == 0 or N == 0:
        return out

    dev = cupy.cuda.runtime.getDevice()
    wgmma = wgmma_available()
    if variant is not None and VARIANTS[variant].wgmma and not wgmma:
        raise ValueError(f"variant {variant}: a wgmma kernel, which needs an sm_90a device (H100/H200)")
    if variant is not None and VARIANTS[variant].tma and not _tma.available():
        raise ValueError(f"variant {variant}: needs cuTensorMapEncodeTiled from the CUDA driver")
    name = variant or pick_variant(M, N, _sm_count(dev), wgmma, wgmma and _tma.available())
    v = VARIANTS[name]
    k, smem = _launcher(name, dev)
    grid = _cdiv(M, v.bm) * _cdiv(N, v.bn)
    operands = (_tma.matrix_map(x, v.bm), _tma.matrix_map(w, v.bn)) if v.tma else (x, w)
    k((grid,), (v.threads,),
      (*operands, bias if bias is not None else w, out, np.int32(M), np.int32(N), np.int32(K),
       np.int32(bias is not None), np.int32(out_dtype == "f32")),
      shared_mem=smem)
    return out
