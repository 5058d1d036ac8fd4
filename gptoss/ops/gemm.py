"""Dense bf16 GEMM (gptoss/kernels/gemm.hip): out = x · wᵀ + bias with fp32 accumulation.

Used for the attention projections (QKV and output, with bias), the router and the unembedding. x is
[M, K] bf16, w the checkpoint's [N, K] ([out, in]) bf16, bias [N] bf16; out [M, N] bf16 or float32.

Variants (tile shapes of one kernel body) and how one is picked from (M, N):
- M <= 64 (decode): "d{BM}x{BN}": BM = 16/32/64 covers all rows in one row tile, BN is the widest of
  64/32/16 that still gives at least one CTA per SM (N = 2880 -> 16, 5120 -> 32, 201088 -> 64), 8 for the
  tiny N of the router; these stream W through a deep cp.async ring (memory bound).
- M > 64 with the wgmma kernels (H100/H200; KernelOptions.wgmma): where the driver can make tensor maps
  (ops/tma.py), the TMA kernels "wgt128x{256,128,64}" (tiles loaded by the tensor-memory accelerator from a
  producer warpgroup, wgmma with both operands in shared memory): 128 x 256 from half a wave of them,
  128 x 128 where that fills the last wave much better, 128 x 64 below half a wave (pick_variant). Without
  tensor maps "wg128x256" / "wg128x128", the same wgmma tiles loaded by cp.async.
- M > 64 elsewhere: "128x128" when it makes at least two waves of tiles, else "64x64" (measured on H100
  with benchmarks/kernel_gemm.py --sweep; "256x128" and "64x128" stay available for the sweep).
- The portable mode (KernelOptions.portable, and every AMD GPU) has the same variants but the wgmma
  ones, each running the portable FMA body over the same tiles; the same choice of names applies.
Every variant accumulates an element in the same order (one k16 step at a time in increasing k, mma.sync
or wgmma: bit-identical), so a row's result is the same whatever M is and whichever variant runs (batch
invariance; docs/DESIGN.md).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..kernels import WGMMA_SMEM_SLACK, KernelOptions, define, kernel, macro_rows, resolved, sm_count
from . import tma as _tma
from ._check import check, out_or_new


@dataclass(frozen=True)
class Variant:
    bm: int
    bn: int
    bk: int
    threads: int
    stages: int
    wgmma: bool = False  # sm_90a only (GEMM_WG_KERNEL in gemm.hip)
    tma: bool = False    # takes tensor maps of x and w (GEMM_TMA_KERNEL), not their addresses

    @property
    def smem(self) -> int:
        """Dynamic shared memory of the tensor-core path: the cp.async ring of x and w tiles (wgmma: plus
        1 KB of slack to align the ring to the 1 KB swizzle atoms)."""
        return self.stages * (self.bm + self.bn) * self.bk * 2 + (WGMMA_SMEM_SLACK if self.wgmma else 0)


def _variants() -> dict[str, Variant]:
    """The variants listed at the bottom of gemm.hip: GEMM_KERNEL(name, BM, BN, BK, WM, WN, STAGES,
    MIN_BLOCKS) with 32 * WM * WN threads; GEMM_WG_KERNEL(name, BN, STAGES, MIN_BLOCKS) and
    GEMM_TMA_KERNEL(name, BN, STAGES, MIN_BLOCKS) with the fixed GEMM_WG_BM x BN x GEMM_WG_BK tiles."""
    out = {}
    for name, bm, bn, bk, wm, wn, stages, _ in macro_rows("gemm", "GEMM_KERNEL"):
        out[name] = Variant(int(bm), int(bn), int(bk), 32 * int(wm) * int(wn), int(stages))
    bm, bk = define("gemm", "GEMM_WG_BM"), define("gemm", "GEMM_WG_BK")
    for name, bn, stages, _ in macro_rows("gemm", "GEMM_WG_KERNEL"):
        out[name] = Variant(bm, int(bn), bk, define("gemm", "GEMM_WG_THREADS"), int(stages), wgmma=True)
    for name, bn, stages, _ in macro_rows("gemm", "GEMM_TMA_KERNEL"):
        out[name] = Variant(bm, int(bn), bk, define("gemm", "GEMM_TMA_THREADS"), int(stages), wgmma=True,
                            tma=True)
    return out


VARIANTS = _variants()
# the variants for M > 64 (the "d" ones stream W for decode)
LARGE = tuple(name for name in VARIANTS if not name.startswith("d"))
_OUT_DTYPES = {"bf16": np.uint16, "f32": np.float32}


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _wave_fill(tiles: int, slots: int) -> float:
    """The share of `slots`-wide waves that `tiles` CTAs keep busy: tiles / (waves * slots)."""
    return tiles / (_cdiv(tiles, slots) * slots)


def pick_variant(M: int, N: int, sms: int = 132, wgmma: bool = False, tma: bool = False) -> str:
    """The variant linear() runs for an [M, K] x [N, K]ᵀ product on a GPU of `sms` multiprocessors
    (`wgmma`: the sm_90a variants run, KernelOptions.wgmma; `tma`: tensor maps can be made,
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
    if wgmma:
        wide_tiles = _cdiv(M, 128) * _cdiv(N, 256)
        if tma and N > 512:  # the TMA kernels (docs/notes/gemm.md, "Mid-size M"; the router's N keeps the rule below)
            if wide_tiles < sms // 2:  # under half a wave of 128 x 256: 128 x 64 tiles, two per SM
                return "wgt128x64"
            # 128 x 128 tiles (one per SM) where their last wave is much fuller than the 128 x 256 ones',
            # counting them as twice the wide tiles (M = 1,024, N = 5,120: 160 wide tiles fill 61% of two
            # waves, 320 narrow ones 81% of three)
            if _wave_fill(2 * _cdiv(M, 128) * _cdiv(N, 256), sms) >= 1.25 * _wave_fill(wide_tiles, sms):
                return "wgt128x128"
            return "wgt128x256"
        if tma and wide_tiles >= sms // 2:  # the router's N: the TMA tile from half a wave
            return "wgt128x256"
        # otherwise one CTA of 128 x 256 per SM once there is a wave of them; else 128 x 128, two per SM
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
    """The variants that can run: the wgmma ones only with `wgmma` (default: the default kernel options',
    kernels.default_kernels(): off in the portable mode), the TMA one where tensor maps can be made too.
    The portable build has every variant but the wgmma ones (each with the portable body)."""
    wgmma = resolved(None).wgmma if wgmma is None else wgmma
    tma = _tma.available() if tma is None else tma
    return [name for name, v in VARIANTS.items() if (wgmma or not v.wgmma) and (tma or not v.tma)]


def auto_variant(M: int, N: int, wgmma: bool) -> str:
    """The variant linear() picks for an M x N product on the current device (its multiprocessors; the
    TMA variant where tensor maps can be made) with the wgmma kernels on or off."""
    return pick_variant(M, N, sm_count(), wgmma, wgmma and _tma.available())


def linear(x, w, bias=None, out=None, out_dtype: str = "bf16", *, variant: str | None = None,
           kernels: KernelOptions | None = None):
    """out [M, N] = x [M, K] · w [N, K]ᵀ (+ bias [N]); bf16 inputs (uint16 bits), fp32 accumulation,
    one rounding at the end (out_dtype "bf16") or fp32 output ("f32"). K % 32 == 0; x and w 16-byte
    aligned. `variant` forces a tile shape (a key of VARIANTS; for tests and benchmarks). `kernels`: the
    kernel choices (default kernels.default_kernels(): GPTOSS_KERNELS / GPTOSS_WGMMA, else the wgmma
    variants where the device has them)."""
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

    opts = resolved(kernels)
    wgmma = opts.wgmma
    if variant is not None and VARIANTS[variant].wgmma and not wgmma:
        raise ValueError(f"variant {variant}: a wgmma kernel, which needs an sm_90a device (H100/H200), "
                         "KernelOptions.wgmma not False and the kernel mode not portable")
    if variant is not None and VARIANTS[variant].tma and not _tma.available():
        raise ValueError(f"variant {variant}: needs cuTensorMapEncodeTiled from the CUDA driver")
    name = variant or auto_variant(M, N, wgmma)
    v = VARIANTS[name]
    grid = _cdiv(M, v.bm) * _cdiv(N, v.bn)
    operands = (_tma.matrix_map(x, v.bm), _tma.matrix_map(w, v.bn)) if v.tma else (x, w)
    kernel("gemm", f"gemm_{name}", smem=v.smem, kernels=opts)(
        (grid,), (v.threads,),
        (*operands, bias if bias is not None else w, out, np.int32(M), np.int32(N), np.int32(K),
         np.int32(bias is not None), np.int32(out_dtype == "f32")))
    return out
