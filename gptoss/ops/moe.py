"""The mixture-of-experts block on the GPU: router (top-k + softmax), dispatch (tokens grouped by expert,
on the device), the grouped expert GEMMs with MXFP4 (or bf16) weights, and the combine.

Kernels: gptoss/kernels/routing.hip (router, dispatch, combine) and gptoss/kernels/moe.hip (expert
GEMMs); design notes in docs/notes/moe.md. Nothing here synchronizes or copies to the host, and every
grid size comes from host-known sizes (T, k, E, H, I), so a whole MoE block can be captured in a CUDA
graph.

Expert weights (`w1`, `w2`) may be given as
  - an object with `.format` ("mxfp4" or "bf16") and `.blocks`/`.scales` or `.weight`
    (gptoss.gpu_weights.ExpertWeights),
  - a tuple `(blocks, scales)`: MXFP4, blocks uint8 [E, R, C/32, 16], scales uint8 [E, R, C/32],
  - a cupy uint16 array [E, R, C]: bf16 bit patterns,
for a matrix of R rows (outputs) by C columns (inputs) per expert: w1 is [E, 2I, H], w2 is [E, H, I].
MXFP4 ExpertWeights may also carry `.dense`, the same weights as bf16 (dense_expert_copy), which the
128-row tiles of large steps read instead (the dense kernels: no dequantization, the same bits).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from ..kernels import KernelOptions, define, kernel, macro_rows, resolved, sm_count, warp_size
from . import tma as _tma
from ._check import check, out_or_new

# routing.hip's sizes: H is summed in ROUTER_SPLITS fixed slices (enough CTAs at T = 1; batch invariance
# needs a fixed order) by CTAs of ROUTER_THREADS over ROUTER_TT tokens x ROUTER_TE experts
ROUTER_SPLITS = define("routing", "ROUTER_SPLITS")
ROUTER_TT = define("routing", "ROUTER_TT")
ROUTER_TE = define("routing", "ROUTER_TE")
ROUTER_THREADS = define("routing", "ROUTER_THREADS")
TOPK_MAX = define("routing", "TOPK_MAX")
DISPATCH_THREADS = define("routing", "DISPATCH_THREADS")
MAX_EXPERTS = define("routing", "DISPATCH_MAX_E")
# route_dispatch's last CTA sums this many logits (T*E) per round (routing.hip explains the number);
# fused_routing() takes the one launch only for smaller steps (FUSED_ROUTING_MAX_LOGITS)
FUSED_MAX_LOGITS = define("routing", "FUSED_MAX_LOGITS")
TOPK_THREADS = 256      # router_topk and moe_combine_add take any block of whole warps: our choice
COMBINE_THREADS = 256
TILE_BMS = (16, 64, 128)  # tile heights the dispatch schedules (128: the MXFP4 wgmma kernels only)


# ---- the GEMM variants, read from the MOE_KERNEL / MOE_WG_KERNEL lines of moe.hip --------------------

@dataclass(frozen=True)
class Variant:
    name: str       # kernel name
    nt: int         # token n8 tiles: BM = 8 * nt
    mw: int         # weight m16 tiles per warp: a warp owns 16 * mw columns
    warps_n: int    # BN = 16 * mw * warps_n, threads = 32 * warps_n
    ksub: int       # BK = 32 * ksub
    stages: int
    fp4: bool
    mlp1: bool
    wgmma: bool = False  # sm_90a warpgroup kernel (MOE_WG_KERNEL): stages start 1 KB-aligned
    lag: int = 0         # wgmma kernels: > 0 = mbarrier ring (mlp2's token rows then come by TMA)
    dense: bool = False  # MOE_DENSE_KERNEL: bf16 weights from ExpertWeights.dense, by TMA (fp4 False)
    std: bool = False    # MOE_STD_KERNEL: mma.sync in the wgmma kernels' k order (their bits; sm_90a builds)

    @property
    def sm90a(self) -> bool:
        """Built only in the sm_90a pass (ops/moe.py picks it only where the wgmma kernels run)."""
        return self.wgmma or self.std

    @property
    def bm(self) -> int:
        return 8 * self.nt

    @property
    def bn(self) -> int:
        return 16 * self.mw * self.warps_n

    @property
    def bk(self) -> int:
        return 32 * self.ksub

    @property
    def threads(self) -> int:
        return 32 * self.warps_n

    def shared_bytes(self, K: int) -> int:
        """Dynamic shared memory for inner dimension K: pipeline stages (+ the tile's scale rows)."""
        a = self.bm * self.bk * 2
        b = self.bn * self.bk // 2 if self.fp4 else self.bn * self.bk * 2
        smem = self.stages * (a + b)
        if self.fp4:  # BN rows of K/32 scale bytes, copied in aligned 16-byte pieces (+ misalignment)
            smem += (self.bn * (K // 32) + 32 + 15) // 16 * 16
        # the mlp1 epilogue stages BM x BN/2 bf16 in the pipeline buffers
        return max(smem, self.bm * self.bn)  # (the wgmma kernels' 1 KB alignment is declared: no slack)


def _variants() -> dict[str, Variant]:
    """MOE_KERNEL(name, NT, MW, WARPS_N, KSUB, STAGES, FP4, MLP1, MIN_BLOCKS), MOE_WG_KERNEL(name, NT,
    WARPS_N, KSUB, STAGES, LAG, MLP1, MIN_BLOCKS), MOE_STD_KERNEL(name, NT, MW, WARPS_N, KSUB, STAGES, MLP1,
    MIN_BLOCKS) and MOE_DENSE_KERNEL(name, NT, WARPS_N, STAGES, MLP1, MIN_BLOCKS) lines (a wgmma kernel is
    MXFP4 with MW = 1: its macro's MoeCfg<NT, 1, ..., true, true, LAG>; a standard-order one MXFP4
    mma.sync, MoeCfg<..., true, false, 0, true>; a dense one MoeCfg<NT, 1, WARPS_N, 2, STAGES, false, true,
    1>)."""
    out = {}
    for name, nt, mw, wn, ks, st, fp4, mlp1, _ in macro_rows("moe", "MOE_KERNEL"):
        out[name] = Variant(name, int(nt), int(mw), int(wn), int(ks), int(st), fp4 == "true", mlp1 == "true")
    for name, nt, wn, ks, st, lag, mlp1, _ in macro_rows("moe", "MOE_WG_KERNEL"):
        out[name] = Variant(name, int(nt), 1, int(wn), int(ks), int(st), True, mlp1 == "true", wgmma=True,
                            lag=int(lag))
    for name, nt, mw, wn, ks, st, mlp1, _ in macro_rows("moe", "MOE_STD_KERNEL"):
        out[name] = Variant(name, int(nt), int(mw), int(wn), int(ks), int(st), True, mlp1 == "true", std=True)
    for name, nt, wn, st, mlp1, _ in macro_rows("moe", "MOE_DENSE_KERNEL"):
        out[name] = Variant(name, int(nt), 1, int(wn), 2, int(st), False, mlp1 == "true", wgmma=True, lag=1,
                            dense=True)
    return out


VARIANTS = _variants()


def variant_pair(name: str) -> tuple[Variant, Variant]:
    """The (mlp1, mlp2) kernels of one tile, from either one's name (moe.hip defines them in pairs, named
    alike but for the stage)."""
    return VARIANTS[name.replace("_mlp2_", "_mlp1_")], VARIANTS[name.replace("_mlp1_", "_mlp2_")]


def uses_wgmma(fmt: str, kernels: KernelOptions | None = None) -> bool:
    """Whether the expert GEMMs of `fmt` weights run the wgmma kernels under `kernels` (default
    kernels.default_kernels()): MXFP4 experts, KernelOptions.wgmma on (never in the portable mode), and
    tensor maps from the driver (ops/tma.py)."""
    return fmt == "mxfp4" and bool(resolved(kernels).wgmma) and _tma.available()


def _uses_wgmma(fmt: str, wgmma: bool | None) -> bool:
    """`wgmma`: the wgmma kernels run (uses_wgmma); None: uses_wgmma(fmt) on this device."""
    return uses_wgmma(fmt) if wgmma is None else fmt == "mxfp4" and wgmma


def tile_heights(fmt: str, wgmma: bool | None = None) -> tuple[int, ...]:
    """The tile heights with a kernel for weights `fmt`: 16 and 64 everywhere, 128 with wgmma (whether
    the wgmma kernels run, uses_wgmma(); None: on this device by default)."""
    return TILE_BMS if _uses_wgmma(fmt, wgmma) else (16, 64)


def variant_for(stage: str, fmt: str, bm: int, wgmma: bool | None = None, dense: bool = False) -> Variant:
    """The kernel of mlp1/mlp2 ("mlp1" | "mlp2") for weights "mxfp4" | "bf16" and tile height bm: with
    the wgmma kernels (KernelOptions.wgmma) the MXFP4 ones are the wgmma variants for 64 and 128 rows
    (the dense kernels when the weights carry a dense copy, `dense`, at 128) and the mma.sync kernels in
    their k order for 16 rows (MOE_STD_KERNEL): all of them give the same bits."""
    wg = _uses_wgmma(fmt, wgmma)
    heights = tile_heights(fmt, wg)
    if bm not in heights:
        raise ValueError(f"tile height {bm}: expected one of {heights} for {fmt} experts here "
                         f"(128 needs MXFP4 experts and the sm_90a wgmma kernels)")
    if dense and bm == 128:
        return VARIANTS[f"moe_{stage}_dense_m128_wg"]
    name = f"moe_{stage}_{'fp4' if fmt == 'mxfp4' else 'bf16'}_m{bm}"
    if wg:  # the 16-row tiles: mma.sync in the wgmma kernels' k order (faster there than a wgmma tile)
        name += "_std" if bm == 16 else "_wg"
    return VARIANTS[name]


# Average rows per expert from which the 128-row tiles (where they exist) beat the 64-row ones. Both
# multiply only a tile's rows rounded up to a quarter of its height (moe.hip, tile_width): 16 rows for
# the 64-row tiles, 32 for the 128-row ones. Per layer on an H200 (mlp1 + mlp2, 64-row against 128-row
# tiles, queued over 3 weight copies: benchmarks/kernel_moe.py --copies 3 --variants): 20b 286 / 328 µs
# at 32 rows, 340 / 353 at 48, 651 / 533 at 128; 120b 1,020 / 1,157 µs at 32 rows, 1,231 / 1,284 at 48,
# 1,493 / 1,431 at 64.
BM128_MIN_ROWS = 64
# The same for the dense kernels (bf16 copies of the weights, ExpertWeights.dense), which read 4x the
# weight bytes but skip the dequantization. From 64 rows on they are 1.2-1.35x faster than the MXFP4
# 128-row kernels (benchmarks/kernel_moe.py --dense). At 32 rows (T = 256 on 20b) the layer alone ran
# 1.16x faster than the 64-row MXFP4 tiles, but a whole decode step at batch 256 was 9% slower with them
# (bench_decode.py: 16.46 against 15.10 ms), so they start at 64 rows.
DENSE_MIN_ROWS = 64


def pick_bm(num_slots: int, num_experts: int, fmt: str = "mxfp4", wgmma: bool | None = None,
            dense: bool = False) -> int:
    """Tile height: 16 (decode: stream the weights of the experts in use) when the average expert gets
    at most 16 rows, 128 when it gets BM128_MIN_ROWS or more (DENSE_MIN_ROWS with a `dense` copy of the
    weights) and the 128-row kernels exist, else 64. All give bit-identical results."""
    if num_slots <= 16 * num_experts:
        return 16
    min_rows = DENSE_MIN_ROWS if dense else BM128_MIN_ROWS
    if 128 in tile_heights(fmt, wgmma) and num_slots >= min_rows * num_experts:
        return 128
    return 64


# ---- host-side index math ---------------------------------------------------------------------------

_M = np.uint32(0x81C081C0)


def _rotl(x: np.ndarray, n: int) -> np.ndarray:
    return (x << np.uint32(n)) | (x >> np.uint32(32 - n))


def _placed(byte: np.ndarray) -> np.ndarray:
    """fp4x8_to_bf16x2's placed word of each byte (uint32): lo nibble bits 0-2 at bits 6-8, bit 3 at 15;
    the hi nibble's the same 16 bits up."""
    x = (byte & np.uint32(15)) | ((byte >> np.uint32(4)) << np.uint32(16))
    return ((x << np.uint32(6)) | (x << np.uint32(12))) & _M


def _unplaced(p: np.ndarray) -> np.ndarray:
    u = np.uint32
    return (((p >> u(6)) & u(7)) | ((p >> u(12)) & u(8)) | ((p >> u(18)) & u(0x70)) | ((p >> u(24)) & u(0x80)))


def wgmma_order_host(blocks: np.ndarray, inverse: bool = False) -> np.ndarray:
    """NumPy twin of wgmma_order_blocks (a new array): MXFP4 blocks uint8 [..., 16] into the wgmma order,
    or back (inverse). Word t of a block becomes W with rotr(W, 0 / 4 / 10) & M = the placed words of
    bytes t, t+4, t+8 and (rotr(W, 6) & 0x81808180) | (rotr(W, 14) & 0x00400040) that of byte t+12."""
    u = np.uint32
    b = np.ascontiguousarray(blocks, dtype=np.uint8)
    shape = b.shape
    if shape[-1] != 16:
        raise ValueError(f"blocks: [..., 16] expected, got {shape}")
    if inverse:
        W = b.reshape(-1, 4, 4).view("<u4").reshape(-1, 4).astype(u)  # [block, t]
        p = [W & _M, _rotl(W, 28) & _M, _rotl(W, 22) & _M,
             (_rotl(W, 26) & u(0x81808180)) | (_rotl(W, 18) & u(0x00400040))]
        out = np.stack([_unplaced(x) for x in p], axis=2).astype(np.uint8)  # [block, t, q] = byte t + 4q
        return np.ascontiguousarray(out.transpose(0, 2, 1)).reshape(shape)
    q = b.reshape(-1, 4, 4).astype(u)  # [block, q, t] = byte 4q + t
    p = [_placed(q[:, i, :]) for i in range(4)]  # [block, t]
    W = (p[0] | _rotl(p[1], 4) | _rotl(p[2], 10) | _rotl(p[3] & u(0x81808180), 6)
         | _rotl(p[3] & u(0x00400040), 14))
    return np.ascontiguousarray(W.astype("<u4")).view(np.uint8).reshape(shape)


def tile_bound(num_slots: int, num_experts: int, bm: int) -> int:
    """Launch bound on the number of bm-row tiles: sum_e ceil(M_e / bm) <= ceil(S / bm) + min(E, S),
    since each expert with rows wastes less than one tile and at most min(E, S) experts have rows."""
    return -(-num_slots // bm) + min(num_experts, num_slots)


# ---- kernels ---------------------------------------------------------------------------------------

_NO_MAP = np.zeros(1, dtype="V128")[0]  # the tensor-map argument of the wgmma kernels that read none
_dummies: dict[tuple, object] = {}


def _dummy(dtype):
    """A small device array standing for an argument a kernel variant does not read."""
    import cupy

    key = (cupy.cuda.runtime.getDevice(), np.dtype(dtype).str)
    if key not in _dummies:
        _dummies[key] = cupy.zeros(16, dtype=dtype)
    return _dummies[key]


def _aligned16(arr, name: str):
    if arr.data.ptr % 16:
        raise ValueError(f"{name}: base address must be 16-byte aligned")


@dataclass
class ExpertMatrix:
    """Normalised view of one layer's expert matrix [E, R, C]."""
    format: str
    E: int
    R: int
    C: int
    blocks: object = None
    scales: object = None
    weight: object = None
    dense: object = None  # MXFP4 only: the bf16 copy in the wgmma row order (dense_expert_copy), or None
    wgmma_order: bool = False  # MXFP4 only: blocks in the wgmma order (to_wgmma_order), not the file's


def expert_matrix(w, name: str) -> ExpertMatrix:
    import cupy

    fmt = getattr(w, "format", None)
    if fmt is not None:
        if fmt == "mxfp4":
            dense = getattr(w, "dense", None)
            m = expert_matrix((w.blocks, w.scales), name)
            m.wgmma_order = bool(getattr(w, "wgmma_order", False))
            if dense is not None:
                check(dense, f"{name}.dense", cupy.uint16, (m.E, m.R, m.C))
                _aligned16(dense, f"{name}.dense")
                m.dense = dense
            return m
        elif fmt == "bf16":
            w = w.weight
        else:
            raise ValueError(f"{name}: unknown expert format {fmt!r}")
    if isinstance(w, tuple):
        if len(w) != 2:
            raise ValueError(f"{name}: MXFP4 weights are a (blocks, scales) pair")
        blocks, scales = w
        check(blocks, f"{name}.blocks", cupy.uint8, ndim=4)
        E, R, KB, sixteen = blocks.shape
        if sixteen != 16:
            raise ValueError(f"{name}.blocks: last dimension must be 16, got {blocks.shape}")
        check(scales, f"{name}.scales", cupy.uint8, (E, R, KB))
        _aligned16(blocks, f"{name}.blocks")
        _aligned16(scales, f"{name}.scales")
        return ExpertMatrix("mxfp4", E, R, KB * 32, blocks=blocks, scales=scales)
    if isinstance(w, cupy.ndarray):
        check(w, name, cupy.uint16, ndim=3)
        _aligned16(w, name)
        E, R, C = w.shape
        if C % 32:
            raise ValueError(f"{name}: inner dimension {C} must be a multiple of 32")
        return ExpertMatrix("bf16", E, R, C, weight=w)
    raise TypeError(f"{name}: expected ExpertWeights, a (blocks, scales) tuple or a bf16 cupy array, "
                    f"got {type(w).__name__}")


WGMMA_ORDER_THREADS = 256


def wgmma_order_blocks(blocks, inverse: bool = False, kernels: KernelOptions | None = None):
    """Rewrite MXFP4 blocks (uint8 device array [..., 16], contiguous) in place into the wgmma order, the
    layout the wgmma and m16_std expert kernels read (moe.hip's header: word t of each 16-byte block holds
    the codes of its bytes t, t+4, t+8, t+12, bit-placed for a cheaper dequantization), or back to the
    file's order (inverse). Returns blocks. The same weights either way; wgmma_order_host is its NumPy
    twin."""
    import cupy

    check(blocks, "blocks", cupy.uint8)  # (C-contiguous)
    if blocks.shape[-1] != 16:
        raise ValueError(f"blocks: a [..., 16] array expected, got {blocks.shape}")
    _aligned16(blocks, "blocks")
    n = blocks.size // 16
    if n:
        kernel("moe", "moe_wg_order", kernels=resolved(kernels))(
            (-(-n // WGMMA_ORDER_THREADS),), (WGMMA_ORDER_THREADS,), (blocks, np.int64(n), np.int32(inverse)))
    return blocks


def to_wgmma_order(w, kernels: KernelOptions | None = None):
    """ExpertWeights `w` (MXFP4) with its blocks rewritten in place into the wgmma order and
    w.wgmma_order set, once, where the wgmma expert kernels run (uses_wgmma under `kernels`); otherwise
    w unchanged. expert_mlp1/2 read such weights as they are; blocks in the file's order are re-laid out
    into a temporary copy on every call of a wgmma kernel."""
    if getattr(w, "format", None) != "mxfp4" or getattr(w, "wgmma_order", False) or not uses_wgmma("mxfp4", kernels):
        return w
    wgmma_order_blocks(w.blocks, kernels=kernels)
    w.wgmma_order = True
    return w


def _blocks_for(v: Variant, w: ExpertMatrix, kernels: KernelOptions) -> ExpertMatrix:
    """w with its MXFP4 blocks in the order variant v reads: the wgmma order for the sm_90a kernels
    (wgmma, m16_std), the file's for the others (the dense kernels read neither)."""
    import cupy

    if w.format != "mxfp4" or v.dense or w.wgmma_order == v.sm90a:
        return w
    if w.wgmma_order:
        raise ValueError("the MXFP4 blocks are in the wgmma order (ExpertWeights.wgmma_order), which only the "
                         "wgmma expert kernels read; make the weights with the model's KernelOptions")
    if cupy.cuda.get_current_stream().is_capturing():
        raise ValueError("MXFP4 blocks in the file's order are re-laid out for the wgmma kernels on every call, "
                         "which a CUDA graph cannot capture: lay them out once with ops.moe.to_wgmma_order")
    return replace(w, blocks=wgmma_order_blocks(w.blocks.copy(), kernels=kernels), wgmma_order=True)


DENSE_COPY_THREADS = 256


def dense_expert_copy(w, out=None, kernels: KernelOptions | None = None):
    """bf16 bits [E, R, C] (uint16) of MXFP4 expert weights `w` (any form expert_matrix takes), the rows
    of each 16 in the order the wgmma kernels keep them in shared memory (even rows first: row n at
    16 (n // 16) + 8 (n % 2) + (n % 16) // 2), for the dense expert kernels (expert_mlp1/2 take
    ExpertWeights.dense). Exact: every MXFP4 weight is a bf16. out: where to write it (allocated when
    None). kernels: as in expert_mlp1."""
    import cupy

    m = expert_matrix(w, "w")
    if m.format != "mxfp4":
        raise ValueError("dense_expert_copy: the weights are not MXFP4")
    if m.R % 16:
        raise ValueError(f"dense_expert_copy: {m.R} rows per expert, expected a multiple of 16")
    out = out_or_new(out, "out", (m.E, m.R, m.C), cupy.uint16)
    blocks = m.E * m.R * (m.C // 32)
    if blocks:
        kernel("moe", "moe_dense_copy", kernels=resolved(kernels))(
            (-(-blocks // DENSE_COPY_THREADS),), (DENSE_COPY_THREADS,),
            (m.blocks, m.scales, out, np.int64(m.E * m.R), np.int32(m.C // 32), np.int32(m.wgmma_order)))
    return out


# ---- route -------------------------------------------------------------------------------------------

def _router_sizes(t, router_w, router_b, k: int) -> tuple[int, int, int]:
    """(T, H, E) of the router's arguments (route's checks)."""
    import cupy

    if t.dtype != cupy.float32:
        check(t, "t", cupy.uint16, ndim=2)
    check(t, "t", t.dtype, ndim=2)
    T, H = t.shape
    check(router_w, "router_w", cupy.uint16, ndim=2)
    E = router_w.shape[0]
    check(router_w, "router_w", cupy.uint16, (E, H))
    check(router_b, "router_b", cupy.uint16, (E,))
    if H % 32:
        raise ValueError(f"hidden size {H} must be a multiple of 32")
    if not 1 <= k <= min(TOPK_MAX, E):
        raise ValueError(f"k = {k} must be in 1..min({TOPK_MAX}, E = {E})")
    if E > MAX_EXPERTS:
        raise ValueError(f"at most {MAX_EXPERTS} experts are supported, got {E}")
    for a, n, align in ((t, "t", 4 * t.itemsize), (router_w, "router_w", 8)):
        if a.data.ptr % align:
            raise ValueError(f"{n}: base address must be {align}-byte aligned")
    return T, H, E


def _router_scratch(scratch, T: int, E: int):
    """The partial sums' buffer: `scratch` checked, or a new one."""
    import cupy

    if scratch is None:
        return cupy.empty(ROUTER_SPLITS * T * E, dtype=cupy.float32)
    if scratch.dtype != cupy.float32 or scratch.size < ROUTER_SPLITS * T * E or not scratch.flags.c_contiguous:
        raise ValueError(f"scratch: need a contiguous float32 array of at least {ROUTER_SPLITS * T * E}")
    return scratch


def _router_grid(T: int, E: int) -> tuple[int, int, int]:
    return (-(-T // ROUTER_TT), -(-E // ROUTER_TE), ROUTER_SPLITS)


# The register-tiled router kernels (routing.hip ROUTER_SUMS_KERNEL lines): tile name -> (tokens TT,
# experts TE, per thread RT x RE). Each runs with Z = ROUTER_SPLITS (a slice of H per
# CTA, partials) or Z = 1 (all of H per CTA, the sum). route() names a choice "<tile>:<Z>", or LOGITS for
# router_logits (4 x 1 outputs per thread, Z = ROUTER_SPLITS); every choice gives the same bits.
ROUTER_TILES = {name.removeprefix("router_sums_"): tuple(int(v) for v in rest)
                for name, *rest in macro_rows("routing", "ROUTER_SUMS_KERNEL")}
LOGITS = "logits"


def router_choices() -> list[str]:
    """Every router kernel choice route() takes: LOGITS, then "<tile>:<Z>" for each tile and Z."""
    return [LOGITS] + [f"{name}:{z}" for name in ROUTER_TILES for z in (ROUTER_SPLITS, 1)]


def _router_choice(choice: str) -> tuple[str, int]:
    """(tile, Z) of a router choice (LOGITS: ("", ROUTER_SPLITS)); ValueError for an unknown one."""
    if choice == LOGITS:
        return "", ROUTER_SPLITS
    tile, _, z = choice.partition(":")
    if tile not in ROUTER_TILES or z not in (str(ROUTER_SPLITS), "1"):
        raise ValueError(f"router kernel {choice!r}: one of {', '.join(router_choices())}")
    return tile, int(z)


# router_choice's thresholds, from benchmarks/kernel_routing.py --routers all on the H200 (docs/notes/moe.md,
# "Router kernels"): router_logits below ROUTER_TILED_MIN_LOGITS logits a step (T = 256 at E = 128: the
# 4 x 4 tile already 11% faster; T = 256 at E = 32: router_logits 13% faster); all of H per CTA (Z = 1) from
# ROUTER_WHOLE_H_MIN_WAVES CTAs per multiprocessor (120b, T = 9,216: 576 CTAs, 419 against 435 us a layer;
# T = 4,096: 256 CTAs, 239 against 201).
ROUTER_TILED_MIN_LOGITS = 32768
ROUTER_WHOLE_H_MIN_WAVES = 3
ROUTER_WIDE_TILE, ROUTER_NARROW_TILE = "64x64_4x4", "64x32_8x4"  # the narrow one also runs all of H


def router_choice(num_tokens: int, num_experts: int, sms: int) -> str:
    """The router kernel route() takes for a step of num_tokens tokens over num_experts experts on `sms`
    multiprocessors (all choices give the same bits): router_logits for small steps; else a slice of H per
    CTA with the wide tile (the narrow one where the experts do not fill the wide one's), or all of H per
    CTA with the narrow tile when its CTAs fill ROUTER_WHOLE_H_MIN_WAVES per multiprocessor."""
    if num_tokens * num_experts < ROUTER_TILED_MIN_LOGITS:
        return LOGITS
    tt, te = ROUTER_TILES[ROUTER_NARROW_TILE][:2]
    if -(-num_tokens // tt) * -(-num_experts // te) >= ROUTER_WHOLE_H_MIN_WAVES * sms:
        return f"{ROUTER_NARROW_TILE}:1"
    wide = num_experts >= ROUTER_TILES[ROUTER_WIDE_TILE][1]
    return f"{ROUTER_WIDE_TILE if wide else ROUTER_NARROW_TILE}:{ROUTER_SPLITS}"


def route(t, router_w, router_b, k: int, out=None, scratch=None, kernels: KernelOptions | None = None,
          router: str | None = None):
    """experts [T, k] int32, weights [T, k] float32 for t [T, H] bf16 or float32, router_w [E, H] bf16,
    router_b [E] bf16: logits in fp32 (summed in a fixed order), top k by decreasing logit (ties to the
    lower expert index), softmax over the k. `out` = (experts, weights) to fill; `scratch` float32
    [ROUTER_SPLITS * T * E] for the partial sums (allocated when None). kernels: as in expert_mlp1 (the
    routing family's build: portable or not). router: the logits kernel, one of router_choices() (default
    router_choice's pick; every choice gives the same bits). Two launches (the logits, router_topk);
    route_dispatch does this and the dispatch in one."""
    import cupy

    T, H, E = _router_sizes(t, router_w, router_b, k)
    experts, weights = (None, None) if out is None else out
    experts = out_or_new(experts, "experts", (T, k), cupy.int32)
    weights = out_or_new(weights, "weights", (T, k), cupy.float32)
    if router is not None:
        _router_choice(router)  # an unknown name fails before any work
    if T == 0:
        return experts, weights
    scratch = _router_scratch(scratch, T, E)
    f32 = "_f32" if t.dtype == cupy.float32 else ""
    kernels = resolved(kernels)
    tile, splits = _router_choice(router if router is not None else router_choice(T, E, sm_count()))
    args = (t, router_w, scratch, np.int32(T), np.int32(E), np.int32(H))
    if not tile:
        kernel("routing", "router_logits" + f32, kernels=kernels)(_router_grid(T, E), (ROUTER_THREADS,), args)
    else:
        tt, te, rt, re = ROUTER_TILES[tile]
        kernel("routing", f"router_sums_{tile}{f32}", kernels=kernels)(
            (-(-T // tt), -(-E // te), splits), (tt * te // (rt * re),), args)
    per_block = TOPK_THREADS // warp_size()  # one warp per token
    kernel("routing", "router_topk" if splits > 1 else "router_topk_summed", kernels=kernels)(
        (-(-T // per_block),), (TOPK_THREADS,), (scratch, router_b, experts, weights, np.int32(T), np.int32(E),
                                                 np.int32(k)))
    return experts, weights


# ---- dispatch ----------------------------------------------------------------------------------------

@dataclass
class Dispatch:
    """The slots s = t*k + j grouped by expert (device arrays; the ints are host-known sizes).

    offsets [E + 1] int32: expert e's rows are offsets[e] .. offsets[e + 1] - 1 of the sorted order;
    sorted_slots [T*k] int32: the slot of each sorted row, increasing inside an expert;
    tiles {bm: [tile_bound(T*k, E, bm), 2] int32}: (expert, first row) of each bm-row tile, (-1, 0) past
    the last one (the expert GEMMs launch the bound and let the extra CTAs exit).
    """
    offsets: object
    sorted_slots: object
    tiles: dict = field(default_factory=dict)
    num_tokens: int = 0
    top_k: int = 0
    num_experts: int = 0

    @property
    def num_slots(self) -> int:
        return self.num_tokens * self.top_k


def _dispatch_out(out: Dispatch | None, T: int, k: int, E: int) -> tuple[Dispatch, dict]:
    """`out` checked (or new arrays) for T*k slots over E experts, with its sizes set; and the tile bounds."""
    import cupy

    if not 1 <= E <= MAX_EXPERTS:
        raise ValueError(f"num_experts = {E} must be in 1..{MAX_EXPERTS}")
    S = T * k
    bounds = {bm: tile_bound(S, E, bm) for bm in TILE_BMS}
    if out is None:
        out = Dispatch(cupy.empty(E + 1, dtype=cupy.int32), cupy.empty(S, dtype=cupy.int32),
                       {bm: cupy.empty((n, 2), dtype=cupy.int32) for bm, n in bounds.items()})
    else:
        check(out.offsets, "out.offsets", cupy.int32, (E + 1,))
        check(out.sorted_slots, "out.sorted_slots", cupy.int32, (S,))
        for bm, n in bounds.items():
            check(out.tiles.get(bm), f"out.tiles[{bm}]", cupy.int32, (n, 2))
    out.num_tokens, out.top_k, out.num_experts = T, k, E
    return out, bounds


def _tile_args(d: Dispatch, bounds: dict) -> tuple:
    """The (bm, tiles, ntiles) triples of the three schedules, as the kernels take them."""
    return tuple(a for bm in TILE_BMS for a in (np.int32(bm), d.tiles[bm], np.int32(bounds[bm])))


def dispatch(experts, num_experts: int, out: Dispatch | None = None, kernels: KernelOptions | None = None) -> Dispatch:
    """Group the T*k slots of experts [T, k] int32 by expert, stably, on the GPU (one CTA). kernels: as
    in expert_mlp1 (the portable build ranks a warp's slots by shuffles instead of __match_any_sync)."""
    import cupy

    check(experts, "experts", cupy.int32, ndim=2)
    T, k = experts.shape
    out, bounds = _dispatch_out(out, T, k, int(num_experts))
    kernel("routing", "moe_dispatch", kernels=resolved(kernels))((1,), (DISPATCH_THREADS,), (
        experts, np.int32(T * k), np.int32(out.num_experts), out.offsets, out.sorted_slots, *_tile_args(out, bounds)))
    return out


# ---- route + dispatch in one launch --------------------------------------------------------------------

# The largest T*E routed by route_dispatch. Measured on the H200 (benchmarks/kernel_routing.py, 20b, E = 32,
# 24 layers in a graph): one launch 9.9 us per layer against 13.0 for three at T = 1, 10.4 against 13.5 at
# T = 8, but 27.8 against 13.7 at T = 64, where the lone last CTA's top-k and dispatch outweigh the two
# launches saved. 256 = T <= 8 on 20b, T <= 2 on 120b (E = 128).
FUSED_ROUTING_MAX_LOGITS = 256


def fused_routing(num_tokens: int, num_experts: int) -> bool:
    """Whether a step of num_tokens tokens over a router of num_experts experts routes with route_dispatch
    (one launch) rather than route + dispatch (three): for small steps (FUSED_ROUTING_MAX_LOGITS), which
    always fit one round of the fused launch's last CTA (FUSED_MAX_LOGITS). Both give the same bits."""
    return 1 <= num_tokens and num_tokens * num_experts <= FUSED_ROUTING_MAX_LOGITS


def new_route_counter():
    """The arrival counter route_dispatch needs: one uint32 of device memory holding 0 (each launch
    leaves it 0 again)."""
    import cupy

    return cupy.zeros(1, dtype=cupy.uint32)


def route_dispatch(t, router_w, router_b, k: int, *, num_experts: int | None = None, first_expert: int = 0,
                   local=None, out=None, scratch=None, dispatch_out: Dispatch | None = None, counter=None,
                   kernels: KernelOptions | None = None):
    """route() then dispatch() in one launch (routing.hip route_dispatch): (experts, weights, Dispatch),
    the same bits as the three launches, for any T (fused_routing says when it is the faster way).

    The dispatch groups the ids expert - first_expert over num_experts experts (default: the router's E,
    first_expert 0); ids outside 0..num_experts-1 get no row (a tensor-parallel rank's view: its experts
    first_expert.. are its 0..num_experts-1, as ops.tensor_parallel.local_experts writes them). `local`
    [T, k] int32 receives those ids (allocated when first_expert != 0 and None; without it and with
    first_expert 0 the dispatch reads `experts`). out, scratch: as in route(); dispatch_out: as dispatch()'s
    out. counter: uint32 device memory whose first element is 0 (new_route_counter(), MoEWorkspace.counter),
    the launch's arrival count; 0 again when the launch ends, so the same counter serves every launch on
    one stream and every graph replay (allocated when None). kernels: as in route()."""
    import cupy

    T, H, E = _router_sizes(t, router_w, router_b, k)
    Ed = E if num_experts is None else int(num_experts)
    first = int(first_expert)
    if T == 0:  # no grid to launch: the two-step path writes the empty outputs
        experts, weights = route(t, router_w, router_b, k, out=out, scratch=scratch, kernels=kernels)
        if local is not None:
            check(local, "local", cupy.int32, (0, k))
        return experts, weights, dispatch(experts, Ed, out=dispatch_out, kernels=kernels)
    experts, weights = (None, None) if out is None else out
    experts = out_or_new(experts, "experts", (T, k), cupy.int32)
    weights = out_or_new(weights, "weights", (T, k), cupy.float32)
    if local is None:
        local = experts if first == 0 else cupy.empty((T, k), dtype=cupy.int32)
    else:
        check(local, "local", cupy.int32, (T, k))
    scratch = _router_scratch(scratch, T, E)
    d, bounds = _dispatch_out(dispatch_out, T, k, Ed)
    if counter is None:
        counter = new_route_counter()
    elif counter.dtype != cupy.uint32 or counter.size < 1:
        raise ValueError("counter: need a uint32 device array (new_route_counter())")
    name = "route_dispatch_f32" if t.dtype == cupy.float32 else "route_dispatch"
    kernel("routing", name, kernels=resolved(kernels))(_router_grid(T, E), (ROUTER_THREADS,), (
        t, router_w, router_b, scratch, counter, experts, weights, local, np.int32(first), np.int32(Ed),
        d.offsets, d.sorted_slots, *_tile_args(d, bounds), np.int32(T), np.int32(E), np.int32(H), np.int32(k)))
    return experts, weights, d


# ---- expert GEMMs ------------------------------------------------------------------------------------

def _launch_gemm(a, d: Dispatch, w: ExpertMatrix, bias, rw, y, outf, limit, alpha, v: Variant,
                 kernels: KernelOptions):
    """Launch variant v (kernels: resolved options: its sm_90a build or not, its extra defines)."""
    import cupy

    S, E = d.num_slots, d.num_experts
    N, K = w.R, w.C
    kern = kernel("moe", v.name, smem=v.shared_bytes(K), kernels=kernels)
    ntiles = d.tiles[v.bm].shape[0]
    if ntiles > 65535:
        raise ValueError(f"{S} slots need {ntiles} row tiles, more than a grid dimension holds")
    grid = (-(-N // v.bn), ntiles)
    wq = w.blocks if w.format == "mxfp4" else _dummy(cupy.uint8)
    ws = w.scales if w.format == "mxfp4" else _dummy(cupy.uint8)
    wb = w.weight if w.format == "bf16" else w.dense if v.dense else _dummy(cupy.uint16)
    rwv = rw if rw is not None else _dummy(cupy.float32)
    yv = y if y is not None else _dummy(cupy.uint16)
    ov = outf if outf is not None else _dummy(cupy.float32)
    # every MOE_WG_KERNEL takes a tensor map of its token rows; only mlp2 of 128-row tiles reads it
    amap = ((_tma.matrix_map(a, v.bm) if v.bm >= 128 and not v.mlp1 else _NO_MAP),) if v.wgmma else ()
    if v.dense:  # and the weights' map, [E * N, K] in boxes of BN rows
        amap += (_tma.matrix_map(w.dense.reshape(E * N, K), v.bn),)
    kern(grid, (v.threads,), (
        *amap, a, wq, ws, wb, bias, d.offsets, d.sorted_slots, d.tiles[v.bm], rwv, yv, ov,
        np.int32(N), np.int32(K), np.int32(d.top_k), np.int32(S), np.int32(E),
        np.int64(ws.nbytes), np.float32(limit), np.float32(alpha)))


def _pick_variant(stage: str, d: Dispatch, w: ExpertMatrix, bm: int | None, kernels: KernelOptions) -> Variant:
    wg = uses_wgmma(w.format, kernels)
    dense = wg and w.dense is not None
    bm = pick_bm(d.num_slots, d.num_experts, w.format, wg, dense) if bm is None else bm
    return variant_for(stage, w.format, bm, wg, dense=dense)


def expert_mlp1(t, dispatch: Dispatch, w1, b1, limit: float, alpha: float, out=None, bm: int | None = None,
                kernels: KernelOptions | None = None):
    """y [T*k, I] bf16: row r = swiglu(t[token of sorted_slots[r]] . W1_e^T + b1_e), e = the expert of
    row r; interleaved gate/linear columns, clamped SwiGLU, rounded to bf16. bm forces a tile height
    (one of tile_heights(); default by rows per expert, pick_bm): results are bit-identical either way;
    the 128-row tiles of MXFP4 weights with a dense copy (ExpertWeights.dense) read that. kernels:
    the kernel choices (default kernels.default_kernels(): GPTOSS_KERNELS / GPTOSS_WGMMA, else the wgmma
    kernels where the device has them; the portable mode runs the portable body of the same variants)."""
    import cupy

    d = dispatch
    check(t, "t", cupy.uint16, (d.num_tokens, None))
    H = t.shape[1]
    w = expert_matrix(w1, "w1")
    if w.E != d.num_experts or w.C != H or w.R % 2:
        raise ValueError(f"w1 [{w.E}, {w.R}, {w.C}] does not match E = {d.num_experts}, H = {H} (2I rows)")
    check(b1, "b1", cupy.uint16, (w.E, w.R))
    _aligned16(t, "t")
    if b1.data.ptr % 4:
        raise ValueError("b1: base address must be 4-byte aligned")
    I = w.R // 2
    out = out_or_new(out, "out", (d.num_slots, I), cupy.uint16)
    _aligned16(out, "out")
    if d.num_slots == 0:
        return out
    kernels = resolved(kernels)
    v = _pick_variant("mlp1", d, w, bm, kernels)
    w = _blocks_for(v, w, kernels)
    _launch_gemm(t, d, w, b1, None, out, None, limit, alpha, v, kernels)
    return out


def expert_mlp2(y, dispatch: Dispatch, w2, b2, weights, out=None, bm: int | None = None,
                kernels: KernelOptions | None = None):
    """out [T*k, H] float32: row slot = (y[r] . W2_e^T + b2_e) * weights[slot] for the sorted row r
    holding that slot; y [T*k, I] bf16 in sorted order (expert_mlp1's output). bm and kernels as in
    expert_mlp1."""
    import cupy

    d = dispatch
    check(y, "y", cupy.uint16, (d.num_slots, None))
    I = y.shape[1]
    w = expert_matrix(w2, "w2")
    if w.E != d.num_experts or w.C != I:
        raise ValueError(f"w2 [{w.E}, {w.R}, {w.C}] does not match E = {d.num_experts}, I = {I}")
    H = w.R
    check(b2, "b2", cupy.uint16, (w.E, H))
    if b2.data.ptr % 4:
        raise ValueError("b2: base address must be 4-byte aligned")
    check(weights, "weights", cupy.float32, (d.num_tokens, d.top_k))
    _aligned16(y, "y")
    out = out_or_new(out, "out", (d.num_slots, H), cupy.float32)
    if out.data.ptr % 8:
        raise ValueError("out: base address must be 8-byte aligned")
    if d.num_slots == 0:
        return out
    kernels = resolved(kernels)
    v = _pick_variant("mlp2", d, w, bm, kernels)
    w = _blocks_for(v, w, kernels)
    _launch_gemm(y, d, w, b2, weights, None, out, 0.0, 0.0, v, kernels)
    return out


# ---- combine -----------------------------------------------------------------------------------------

def combine_add(x, expert_out, kernels: KernelOptions | None = None):
    """x [T, H] float32 += sum over j (in increasing j) of expert_out [T*k, H] rows t*k + j; in place.
    kernels: as in expert_mlp1."""
    import cupy

    check(x, "x", cupy.float32, ndim=2)
    T, H = x.shape
    check(expert_out, "expert_out", cupy.float32, ndim=2)
    if T == 0:
        return x
    if expert_out.shape[1] != H or expert_out.shape[0] % T:
        raise ValueError(f"expert_out {expert_out.shape} does not match x {x.shape} (rows must be T*k)")
    k = expert_out.shape[0] // T
    if H % 4 or x.data.ptr % 16 or expert_out.data.ptr % 16:
        raise ValueError("combine_add needs H % 4 == 0 and 16-byte aligned arrays")
    n4 = T * H // 4
    blocks = min(-(-n4 // COMBINE_THREADS), 65535)
    kernel("routing", "moe_combine_add", kernels=resolved(kernels))(
        (blocks,), (COMBINE_THREADS,), (x, expert_out, np.int32(T), np.int32(H), np.int32(k)))
    return x


# ---- the whole block ---------------------------------------------------------------------------------

class MoEWorkspace:
    """Preallocated buffers for moe() up to max_tokens tokens (for CUDA graph capture, or to skip the
    allocations): the same object can serve every layer of a model (launched in order on one stream:
    route_dispatch's `counter` is 0 between launches)."""

    def __init__(self, max_tokens: int, num_experts: int, top_k: int, hidden: int, intermediate: int):
        import cupy

        self.max_tokens, self.num_experts, self.top_k = max_tokens, num_experts, top_k
        arrays = {name: cupy.empty(n, dtype=dtype)
                  for name, (n, dtype) in self.sizes(max_tokens, num_experts, top_k, hidden, intermediate).items()}
        self.tiles = {bm: arrays.pop(f"tiles{bm}") for bm in TILE_BMS}
        for name, a in arrays.items():
            setattr(self, name, a)
        self.counter.fill(0)  # route_dispatch's arrival count: 0 between launches (one fixed address)

    @staticmethod
    def sizes(max_tokens: int, num_experts: int, top_k: int, hidden: int, intermediate: int) -> dict:
        """name -> (elements, NumPy dtype) of every buffer (what memory plans count)."""
        T, E = max_tokens, num_experts
        S = T * top_k
        i32, f32, u16 = np.dtype(np.int32), np.dtype(np.float32), np.dtype(np.uint16)
        return {"experts": (S, i32), "weights": (S, f32), "scratch": (ROUTER_SPLITS * T * E, f32),
                "counter": (1, np.dtype(np.uint32)),
                "offsets": (E + 1, i32), "sorted_slots": (S, i32),
                **{f"tiles{bm}": (2 * tile_bound(S, E, bm), i32) for bm in TILE_BMS},
                "y": (S * intermediate, u16), "out": (S * hidden, f32)}

    @classmethod
    def nbytes(cls, max_tokens: int, num_experts: int, top_k: int, hidden: int, intermediate: int) -> int:
        return sum(n * dtype.itemsize for n, dtype in cls.sizes(max_tokens, num_experts, top_k, hidden,
                                                              intermediate).values())

    def views(self, T: int, H: int, I: int, dispatch_experts: int | None = None):
        """(routed (experts, weights), router scratch, Dispatch, y, out) for T tokens. dispatch_experts:
        the experts the dispatch groups by, when fewer than the router's (a tensor-parallel rank's own)."""
        if T > self.max_tokens:
            raise ValueError(f"{T} tokens exceed the workspace's {self.max_tokens}")
        k, E = self.top_k, self.num_experts
        if dispatch_experts is not None:
            if not 1 <= dispatch_experts <= E:
                raise ValueError(f"dispatch_experts {dispatch_experts}: expected 1..{E}")
            E = dispatch_experts
        S = T * k
        d = Dispatch(self.offsets[:E + 1], self.sorted_slots[:S],
                     {bm: a[: 2 * tile_bound(S, E, bm)].reshape(-1, 2) for bm, a in self.tiles.items()})
        return ((self.experts[:S].reshape(T, k), self.weights[:S].reshape(T, k)), self.scratch, d,
                self.y[: S * I].reshape(S, I), self.out[: S * H].reshape(S, H))


def _layer_attr(layer, *names):
    for n in names:
        if hasattr(layer, n):
            return getattr(layer, n)
        if isinstance(layer, dict) and n in layer:
            return layer[n]
    raise AttributeError(f"layer has none of {names}")


def moe(x, t, layer, cfg=None, *, k: int | None = None, limit: float | None = None, alpha: float | None = None,
        workspace: MoEWorkspace | None = None, bm: int | None = None, router_input=None,
        combine: bool = True, mark=None, kernels: KernelOptions | None = None):
    """x [T, H] float32 += sum_j weight_j * expert_j(t), t [T, H] bf16 (the normed input).
    router_input: the same normed input unrounded, float32 [T, H], for the router (default t).
    combine=False leaves x alone and returns the weighted expert outputs [T*k, H] float32 instead (for
    ops.norm.combine_rmsnorm, which adds them and applies the next norm in one pass).

    `layer` has router_w (or gate_w) [E, H], router_b (or gate_b) [E], w1 [E, 2I, H] and w2 [E, H, I]
    (expert matrices in any form listed in the module docstring), b1 [E, 2I], b2 [E, H], all on the
    GPU (attributes or dict keys; gptoss.gpu_weights.LayerWeights works as is). k, limit and alpha come from
    cfg (a ModelConfig) unless given. The routing is one launch (route_dispatch) where fused_routing(T, E)
    says so, else route + dispatch: the same bits. mark(name), when given, is called after each stage's
    launches (gptoss.model.Profile.mark; with the one routing launch "router" times it and "moe dispatch"
    nothing). bm and kernels as in expert_mlp1. Returns x.
    """
    mark = mark or (lambda name: None)
    router_w = _layer_attr(layer, "router_w", "gate_w")
    router_b = _layer_attr(layer, "router_b", "gate_b")
    w1, w2 = _layer_attr(layer, "w1"), _layer_attr(layer, "w2")
    b1, b2 = _layer_attr(layer, "b1"), _layer_attr(layer, "b2")
    k = k if k is not None else cfg.experts_per_token
    limit = limit if limit is not None else (cfg.swiglu_limit if cfg is not None else 7.0)
    alpha = alpha if alpha is not None else (cfg.swiglu_alpha if cfg is not None else 1.702)
    T, H = t.shape
    E = router_w.shape[0]
    I = expert_matrix(w2, "w2").C
    routed, scratch, d, y, out = workspace.views(T, H, I) if workspace is not None else (None,) * 5
    kernels = resolved(kernels)
    rin = t if router_input is None else router_input
    if fused_routing(T, E):
        experts, weights, d = route_dispatch(rin, router_w, router_b, k, out=routed, scratch=scratch, dispatch_out=d,
                                             counter=None if workspace is None else workspace.counter,
                                             kernels=kernels)
        mark("router")
        mark("moe dispatch")
    else:
        experts, weights = route(rin, router_w, router_b, k, out=routed, scratch=scratch, kernels=kernels)
        mark("router")
        d = dispatch(experts, E, out=d, kernels=kernels)
        mark("moe dispatch")
    y = expert_mlp1(t, d, w1, b1, limit, alpha, out=y, bm=bm, kernels=kernels)
    mark("moe mlp1 (gate/up + swiglu)")
    out = expert_mlp2(y, d, w2, b2, weights, out=out, bm=bm, kernels=kernels)
    mark("moe mlp2 (down)")
    if not combine:
        return out
    combine_add(x, out, kernels)
    mark("moe combine + norm")
    return x
