"""NumPy model of the MoE kernels' index math (gptoss/kernels/moe.hip, routing.hip), run on the CPU.

simulate_cta mirrors one CTA of the expert GEMM line by line (the loaders and their swizzles, the MXFP4
bit trick, the fragment layouts of mma.h, the epilogue's mapping) and must produce the right product
with bank-conflict-free shared loads; simulate_dispatch mirrors moe_dispatch. The GPU tests are in
tests/gpu/test_moe.py.
"""
from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest

from gptoss.weights.bf16 import from_bf16_bits, to_bf16_bits
from gptoss.weights.mxfp4 import FP4_VALUES, dequantize
from gptoss.ops import moe as M

# =====================================================================================================
# NumPy model of the kernels (CPU)
# =====================================================================================================

def prmt(a: int, b: int, sel: int) -> int:
    """PTX prmt.b32 (default mode): bytes {b, a} = 7..0; selector nibble bit 3 replicates the sign."""
    src = [(a >> (8 * i)) & 0xFF for i in range(4)] + [(b >> (8 * i)) & 0xFF for i in range(4)]
    out = 0
    for k in range(4):
        nib = (sel >> (4 * k)) & 0xF
        v = src[nib & 7]
        if nib & 8:
            v = 0xFF if v & 0x80 else 0
        out |= v << (8 * k)
    return out


def bf16_value(bits: int) -> float:
    return struct.unpack("<f", struct.pack("<I", (bits & 0xFFFF) << 16))[0]


def bf16_mul_exact(a_bits: int, b_bits: int) -> int:
    """fma.rn.bf16 a * b + (-0) where the product is exact (powers of two): bf16 bits of a * b (the -0
    addend keeps the sign of a zero product)."""
    p = bf16_value(a_bits) * bf16_value(b_bits)
    bits = struct.unpack("<I", struct.pack("<f", p))[0]
    assert bits & 0xFFFF == 0 and struct.unpack("<f", struct.pack("<I", bits))[0] == p, \
        "the dequantization product must be exact in bf16"
    return bits >> 16


def bf16x2_mul(a: int, b: int) -> int:
    lo = bf16_mul_exact(a & 0xFFFF, b & 0xFFFF)
    hi = bf16_mul_exact(a >> 16, b >> 16)
    return lo | (hi << 16)


def scale_m1(s: int) -> int:
    return ((min(s, 128) + 126) * 0x00800080) & 0xFFFFFFFF


def scale_m2(s: int) -> int:
    return ((max(s, 128) - 1) * 0x00800080) & 0xFFFFFFFF


def scale_placed(placed: int, s: int, big: bool) -> int:
    """moe.hip scale_placed: a placed word times the multipliers of scale byte s."""
    v = bf16x2_mul(placed, scale_m1(s))
    return bf16x2_mul(v, scale_m2(s)) if big else v


def fp4x8_to_bf16x2(w: int, s: int, big: bool) -> list[int]:
    """moe.hip fp4x8_to_bf16x2 on one 32-bit word: 4 bf16x2 words (lo nibble low half)."""
    lo, hi = w & 0x0F0F0F0F, (w >> 4) & 0x0F0F0F0F
    out = []
    for q in range(4):
        sel = q | ((8 | q) << 4) | ((4 + q) << 8) | ((12 + q) << 12)
        x = prmt(lo, hi, sel)
        out.append(scale_placed((x * 0x1040) & 0x81C081C0, s, big))
    return out


def wpos(n: int) -> int:
    return (n & ~15) | ((n & 1) << 3) | ((n >> 1) & 7)


class SharedLoads:
    """Records the lane addresses of each shared load and checks bank conflicts."""

    def __init__(self):
        self.conflicts = []

    def check(self, kind: str, addrs: list[int], width: int):
        # 4-byte loads: one phase of 32 lanes; 16-byte loads (and ldmatrix rows): phases of 8 lanes
        phases = [addrs] if width <= 4 else [addrs[p:p + 8] for p in range(0, len(addrs), 8)]
        for ph in phases:
            banks: dict[int, set] = {}
            for a in ph:
                for w in range(max(width, 4) // 4):
                    word = a // 4 + w
                    banks.setdefault(word % 32, set()).add(word)
            if any(len(words) > 1 for words in banks.values()):
                self.conflicts.append(kind)
                return


def u32_at(buf: np.ndarray, off: int) -> int:
    return int(buf[off:off + 4].view(np.uint32)[0])


def mma(acc: np.ndarray, a_regs, b_regs):
    """mma.sync m16n8k16 over a warp: a_regs[lane] = 4 words, b_regs[lane] = 2 words, acc [32, 4]
    (float64), layouts of mma.h."""
    A = np.zeros((16, 16))
    B = np.zeros((16, 8))
    av = from_bf16_bits(np.array(a_regs, dtype=np.uint32).view(np.uint16)).reshape(32, 4, 2)  # lo, hi
    bv = from_bf16_bits(np.array(b_regs, dtype=np.uint32).view(np.uint16)).reshape(32, 2, 2)
    for lane in range(32):
        g, t = lane // 4, lane % 4
        A[g, 2 * t:2 * t + 2] = av[lane, 0]
        A[g + 8, 2 * t:2 * t + 2] = av[lane, 1]
        A[g, 2 * t + 8:2 * t + 10] = av[lane, 2]
        A[g + 8, 2 * t + 8:2 * t + 10] = av[lane, 3]
        B[2 * t:2 * t + 2, g] = bv[lane, 0]
        B[2 * t + 8:2 * t + 10, g] = bv[lane, 1]
    D = A @ B
    for lane in range(32):
        g, t = lane // 4, lane % 4
        acc[lane] += [D[g, 2 * t], D[g, 2 * t + 1], D[g + 8, 2 * t], D[g + 8, 2 * t + 1]]


def simulate_cta(v: M.Variant, tok: np.ndarray, rows: int, wq=None, ws=None, wb=None, shift: int = 0,
                 big: bool = False, loads: SharedLoads | None = None) -> np.ndarray:
    """One CTA of moe.hip's GEMM: tok [BM, K] bf16 bits (the tile's gathered rows; rows >= `rows` are
    never read), weights of the tile's Nv <= BN columns: MXFP4 wq [Nv, K/32, 16] + ws [Nv, K/32] (the
    scale rows start `shift` bytes into the CTA's scale buffer) or bf16 wb [Nv, K]. Returns the fp64
    accumulators as out[r, n] (token row, column) through the epilogue's mapping."""
    BM, BN, BK, KSUB = v.bm, v.bn, v.bk, v.ksub
    KCH, T = BK // 8, v.threads
    K = tok.shape[1]
    KB, KT = K // 32, -(-K // BK)
    Nv = (wq if v.fp4 else wb).shape[0]
    A_STEP = T // KCH
    A_ITERS = -(-BM // A_STEP)
    B_STEP = T // KSUB if v.fp4 else T // KCH
    B_ITERS = BN // B_STEP
    a_bytes = BM * BK * 2
    rng = np.random.default_rng(1)
    if v.fp4:  # the scale buffer: garbage around the tile's rows, as in shared memory
        sc = rng.integers(0, 256, BN * KB + 64).astype(np.uint8)
        sc[shift:shift + Nv * KB] = ws.reshape(-1)
    MW = v.mw
    acc = np.zeros((v.warps_n, MW, BM // 8, 32, 4))  # [warp][j][i][lane][4]
    loads = loads or SharedLoads()
    for kt in range(KT):
        sa = np.full(a_bytes, 0xAB, dtype=np.uint8)   # stale bytes must never be read
        sb = np.full(BN * BK // 2 if v.fp4 else BN * BK * 2, 0xCD, dtype=np.uint8)
        for tid in range(T):  # load_stage, every thread
            a_ch = tid % KCH
            for i in range(A_ITERS):
                r = tid // KCH + i * A_STEP
                if r >= BM:
                    continue
                sw = a_ch ^ ((r & 1) << 2) if v.fp4 else a_ch ^ (r & 7)
                dst = r * BK * 2 + sw * 16
                k = kt * BK + a_ch * 8
                chunk = tok[r, k:k + 8] if (k < K and r < rows) else np.zeros(8, np.uint16)
                sa[dst:dst + 16] = chunk.view(np.uint8)
            if v.fp4:
                b_x, b_n = tid % KSUB, tid // KSUB
                for i in range(B_ITERS):
                    n, kb = b_n + i * B_STEP, kt * KSUB + b_x
                    dst = (b_x * BN + wpos(b_n)) * 16 + i * B_STEP * 16
                    assert dst == (b_x * BN + wpos(n)) * 16
                    sb[dst:dst + 16] = wq[n, kb] if (n < Nv and kb < KB) else 0
            else:
                b_x, b_n = tid % KCH, tid // KCH
                for i in range(B_ITERS):
                    n, k = b_n + i * B_STEP, kt * BK + b_x * 8
                    dst = n * BK * 2 + ((b_x ^ ((n >> 1) & 7)) * 16)
                    chunk = wb[n, k:k + 8] if (n < Nv and k < K) else np.zeros(8, np.uint16)
                    sb[dst:dst + 16] = chunk.view(np.uint8)
        for w in range(v.warps_n):  # compute_stage, every warp
            nw = 16 * MW * w
            if v.fp4:
                for kk in range(KSUB):
                    kb = kt * KSUB + kk
                    af = [[[None] * 32 for _ in range(2)] for _ in range(MW)]  # [j][s][lane]
                    for j in range(MW):
                        addr0, addr1 = [], []
                        for lane in range(32):
                            g, t4 = lane // 4, lane % 4
                            pr = nw + 16 * j + g
                            assert pr == wpos(nw + 16 * j + 2 * g) and pr + 8 == wpos(nw + 16 * j + 2 * g + 1)
                            o0, o1 = (kk * BN + pr) * 16 + 4 * t4, (kk * BN + pr + 8) * 16 + 4 * t4
                            addr0.append(o0)
                            addr1.append(o1)
                            row0 = shift + (nw + 16 * j + 2 * g) * KB
                            s0, s1 = int(sc[row0 + kb]), int(sc[row0 + KB + kb])
                            c0 = fp4x8_to_bf16x2(u32_at(sb, o0), s0, big)
                            c1 = fp4x8_to_bf16x2(u32_at(sb, o1), s1, big)
                            for s in range(2):
                                af[j][s][lane] = [c0[2 * s], c1[2 * s], c0[2 * s + 1], c1[2 * s + 1]]
                        loads.check("weights lds32", addr0, 4)
                        loads.check("weights lds32", addr1, 4)
                    for i in range(BM // 8):
                        bregs = [None] * 32
                        addrs = []
                        for lane in range(32):
                            g, t4 = lane // 4, lane % 4
                            a_rd = g * BK * 2 + (((4 * kk + t4) ^ ((g & 1) << 2)) * 16)
                            r = 8 * i + g  # the kernel's a_rd assumes row 8i + g has g's swizzle
                            assert a_rd + i * 8 * BK * 2 == r * BK * 2 + (((4 * kk + t4) ^ ((r & 1) << 2)) * 16)
                            off = a_rd + i * 8 * BK * 2
                            addrs.append(off)
                            words = sa[off:off + 16].view(np.uint32)
                            bregs[lane] = [int(x) for x in words]
                        loads.check("tokens lds128", addrs, 16)
                        for j in range(MW):
                            mma(acc[w, j, i], af[j][0], [b[0:2] for b in bregs])
                            mma(acc[w, j, i], af[j][1], [b[2:4] for b in bregs])
            else:
                for ks in range(2 * KSUB):
                    af = []
                    for j in range(MW):
                        addrs = []
                        for lane in range(32):
                            q, li = lane // 8, lane % 8
                            n, ch = nw + 16 * j + 2 * li + (q & 1), 2 * ks + (q >> 1)
                            addrs.append(n * BK * 2 + ((ch ^ ((n >> 1) & 7)) * 16))
                        loads.check("weights ldmatrix", addrs, 16)
                        af.append(ldmatrix_x4(sb, addrs))
                    for ip in range(BM // 16):
                        addrs = []
                        for lane in range(32):
                            q, li = lane // 8, lane % 8
                            r, ch = 16 * ip + 8 * (q >> 1) + li, 2 * ks + (q & 1)
                            addrs.append(r * BK * 2 + ((ch ^ (r & 7)) * 16))
                        loads.check("tokens ldmatrix", addrs, 16)
                        bq = ldmatrix_x4(sa, addrs)
                        for j in range(MW):
                            mma(acc[w, j, 2 * ip], af[j], [b[0:2] for b in bq])
                            mma(acc[w, j, 2 * ip + 1], af[j], [b[2:4] for b in bq])
    out = np.full((BM, BN), np.nan)
    for w in range(v.warps_n):  # epilogue mapping
        for j in range(MW):
            for i in range(BM // 8):
                for lane in range(32):
                    g, t4 = lane // 4, lane % 4
                    n = 16 * MW * w + 16 * j + 2 * g
                    for h in range(2):
                        r = 8 * i + 2 * t4 + h
                        out[r, n] = acc[w, j, i, lane, h]
                        out[r, n + 1] = acc[w, j, i, lane, 2 + h]
    return out


def ldmatrix_x4(buf: np.ndarray, addrs: list[int]):
    """ldmatrix.x4: lanes 8q..8q+7 give matrix q's row addresses; lane (g, t) gets word t of row g."""
    regs = []
    for lane in range(32):
        g, t = lane // 4, lane % 4
        regs.append([u32_at(buf, addrs[8 * q + g] + 4 * t) for q in range(4)])
    return regs


def _random_fp4(rng, N, K, lo=118, hi=127):
    blocks = rng.integers(0, 256, (N, K // 32, 16)).astype(np.uint8)
    scales = rng.integers(lo, hi + 1, (N, K // 32)).astype(np.uint8)
    return blocks, scales


@pytest.mark.parametrize("name, K, rows, Nv, shift", [
    ("moe_mlp1_fp4_m64", 96, 37, 150, 5),     # K tail (BK 64), partial rows and columns
    ("moe_mlp2_fp4_m64", 128, 64, 192, 0),
    ("moe_mlp1_fp4_m16", 160, 3, 64, 11),     # BK 128: two stages, the second mostly tail
    ("moe_mlp1_bf16_m64", 96, 50, 170, 0),
    ("moe_mlp2_bf16_m16", 160, 16, 40, 0),
])
def test_kernel_model_cpu(name, K, rows, Nv, shift):
    v = M.VARIANTS[name]
    rng = np.random.default_rng(zlib.crc32(name.encode()) + K)
    tok = to_bf16_bits(rng.standard_normal((v.bm, K)).astype(np.float32))
    loads = SharedLoads()
    if v.fp4:
        wq, ws = _random_fp4(rng, Nv, K)
        W = dequantize(wq, ws)
        got = simulate_cta(v, tok, rows, wq=wq, ws=ws, shift=shift, loads=loads)
    else:
        wb = to_bf16_bits(rng.standard_normal((Nv, K)).astype(np.float32))
        W = from_bf16_bits(wb)
        got = simulate_cta(v, tok, rows, wb=wb, loads=loads)
    ref = from_bf16_bits(tok[:rows]).astype(np.float64) @ W.astype(np.float64).T
    np.testing.assert_allclose(got[:rows, :Nv], ref, rtol=1e-9, atol=1e-9)
    assert not loads.conflicts, f"bank conflicts in {sorted(set(loads.conflicts))}"


def test_kernel_model_big_scales_cpu():
    """The BIG path (scales > 128) computes the same exact products."""
    v = M.VARIANTS["moe_mlp2_fp4_m16"]
    rng = np.random.default_rng(3)
    K, Nv = 128, 64
    tok = to_bf16_bits((rng.standard_normal((v.bm, K)) * 2.0**-20).astype(np.float32))
    wq, ws = _random_fp4(rng, Nv, K, lo=120, hi=140)
    got = simulate_cta(v, tok, 16, wq=wq, ws=ws, shift=3, big=True)
    ref = from_bf16_bits(tok).astype(np.float64) @ dequantize(wq, ws).astype(np.float64).T
    np.testing.assert_allclose(got[:, :Nv], ref, rtol=1e-9)


def test_fp4_bit_trick_exhaustive_cpu():
    """Every byte and a spread of scales: the prmt/multiply/mask placement and the bf16 scale multiply
    give exactly E2M1 * 2^(s - 127) (the fast path for s <= 128, the BIG path for all s)."""
    for s in (0, 1, 2, 100, 119, 127, 128, 129, 130, 200, 250):  # 6 * 2^(s-127) stays finite
        for base in range(0, 256, 4):
            w = base | (base + 1) << 8 | (base + 2) << 16 | (base + 3) << 24
            for big in ((False, True) if s <= 128 else (True,)):
                out = fp4x8_to_bf16x2(w, s, big)
                for q in range(4):
                    byte = base + q
                    want = FP4_VALUES[[byte & 15, byte >> 4]].astype(np.float64) * 2.0 ** (s - 127)
                    got = from_bf16_bits(np.array([out[q] & 0xFFFF, out[q] >> 16], dtype=np.uint16))
                    np.testing.assert_array_equal(got, want.astype(np.float32), err_msg=f"byte {byte} s {s}")


def test_shared_memory_budget_cpu():
    """Every variant fits an H100 SM (227 KB per CTA) for the real K, two of each getp variant fit
    together, and the variants picked by tile height and path are exactly those moe.hip defines."""
    for v in M.VARIANTS.values():
        assert v.shared_bytes(2880) <= 227 * 1024, v.name
        assert v.bn % 16 == 0 and v.bm % 16 == 0, v.name
        if not v.wgmma:  # the 64-column-per-warpgroup wgmma tiles may leave a partial column tile
            assert 2880 % v.bn == 0 and 5760 % v.bn == 0, v.name
    for wg in (False, True):
        for bm in (64, 128) if wg else (64,):
            assert 2 * M.variant_for("mlp1", "mxfp4", bm, wgmma=wg).shared_bytes(2880) <= 228 * 1024
    picked = {M.variant_for(s, f, bm, wgmma=wg, dense=dense).name for s in ("mlp1", "mlp2")
              for f in ("mxfp4", "bf16") for wg in (False, True) for bm in M.tile_heights(f, wgmma=wg)
              for dense in (False, True)}
    assert picked == set(M.VARIANTS)
    # decode tiles where the wgmma kernels run: mma.sync in their k order (their bits, measured faster)
    assert all(M.variant_for(s, "mxfp4", 16, wgmma=True).std for s in ("mlp1", "mlp2"))
    assert not any(M.variant_for(s, "mxfp4", bm, wgmma=wg).std for s in ("mlp1", "mlp2") for wg, bm in
                   ((False, 16), (True, 64), (True, 128)))
    assert all(v.dense == (v.name.split("_")[2] == "dense") for v in M.VARIANTS.values())
    assert M.tile_heights("bf16", wgmma=True) == (16, 64) and M.tile_heights("mxfp4", wgmma=False) == (16, 64)
    with pytest.raises(ValueError, match="tile height 128"):
        M.variant_for("mlp1", "mxfp4", 128, wgmma=False)


def test_every_variant_has_its_twin_cpu():
    """ops.moe.variant_pair: each kernel's mlp1 and mlp2 of the same tile, from either name."""
    for name, v in M.VARIANTS.items():
        v1, v2 = M.variant_pair(name)
        assert v in (v1, v2) and v1.mlp1 and not v2.mlp1
        assert (v1.bm, v1.bn, v1.bk, v1.stages, v1.wgmma, v1.std, v1.dense) == \
            (v2.bm, v2.bn, v2.bk, v2.stages, v2.wgmma, v2.std, v2.dense)


def test_pick_bm_cpu():
    assert M.pick_bm(4 * 64, 32) == 16            # decode: <= 16 rows per expert
    assert M.pick_bm(4 * 1024, 32) == 64          # no 128-row kernels without a GPU
    assert M.pick_bm(4 * 4096, 32, "bf16") == 64
    assert M.pick_bm(4 * 512, 32, wgmma=True) == 128          # 64 rows per expert
    assert M.pick_bm(4 * 256, 32, wgmma=True) == 64           # 32 rows: 64-row tiles (faster there)
    assert M.pick_bm(4 * 384, 32, wgmma=True) == 64           # 48 rows: still the 64-row tiles
    assert M.pick_bm(4 * 192, 32, wgmma=True) == 64           # 24 rows
    assert M.pick_bm(4 * 512, 32, wgmma=True, dense=True) == 128
    assert M.pick_bm(4 * 256, 32, wgmma=True, dense=True) == 64
    assert M.pick_bm(4 * 128, 32, wgmma=True, dense=True) == 16


def tile_schedule(offsets: np.ndarray, bm: int, ntiles: int) -> np.ndarray:
    """The [ntiles, 2] int32 table moe_dispatch writes (ops.moe.Dispatch.tiles): (expert, first sorted
    row) per tile, experts in order, then (-1, 0) for the unused tail."""
    offsets = np.asarray(offsets, dtype=np.int64)
    table = np.zeros((ntiles, 2), dtype=np.int32)
    table[:, 0] = -1
    i = 0
    for e in range(len(offsets) - 1):
        for r in range(int(offsets[e]), int(offsets[e + 1]), bm):
            table[i] = (e, r)
            i += 1
    assert i <= ntiles, "tile bound violated"
    return table


def simulate_dispatch(experts: np.ndarray, E: int, bms=M.TILE_BMS, nwarps: int = 32, warp: int = 32):
    """routing.hip dispatch_block, step by step (per-warp spans, counts, scans, ranked placement, tile
    binary search) for a CTA of nwarps warps of `warp` lanes (moe_dispatch: 1024 threads, route_dispatch's
    last CTA: 256). Ids outside 0..E-1 (a tensor-parallel rank's view) get no row; sorted_slots entries
    past offsets[E] stay -1 (unwritten)."""
    flat = experts.reshape(-1)
    S = flat.size
    steps = -(-S // (nwarps * warp))
    span = steps * warp
    cnt = np.zeros((nwarps, E), dtype=np.int64)
    for w in range(nwarps):
        for s in range(w * span, min(w * span + span, S)):
            if 0 <= flat[s] < E:
                cnt[w, flat[s]] += 1
    totals = cnt.sum(axis=0)
    first = np.cumsum(cnt, axis=0) - cnt  # exclusive over warps
    off = np.concatenate([[0], np.cumsum(totals)])
    base = first + off[:E]
    sorted_slots = np.full(S, -1, dtype=np.int64)
    for w in range(nwarps):
        for it in range(steps):
            lanes = [w * span + it * warp + l for l in range(warp)]
            es = [flat[s] if s < min(w * span + span, S) else -1 for s in lanes]
            placed = {}
            for l, (s, e) in enumerate(zip(lanes, es)):
                if not 0 <= e < E:
                    continue
                rank = sum(1 for l2 in range(l) if es[l2] == e)
                sorted_slots[base[w, e] + rank] = s
                placed[e] = placed.get(e, 0) + 1
            for e, c in placed.items():
                base[w, e] += c
    tiles = {}
    for bm in bms:
        st = np.concatenate([[0], np.cumsum(-(-totals // bm))])
        n = M.tile_bound(S, E, bm)
        table = np.zeros((n, 2), dtype=np.int64)
        for i in range(n):
            if i >= st[E]:
                table[i] = (-1, 0)
                continue
            lo, hi = 0, E
            while hi - lo > 1:
                mid = (lo + hi) // 2
                lo, hi = (mid, hi) if st[mid] <= i else (lo, mid)
            table[i] = (lo, off[lo] + (i - st[lo]) * bm)
        tiles[bm] = table
    return off, sorted_slots, tiles


@pytest.mark.parametrize("T, E, used", [(1, 32, 32), (5, 4, 3), (333, 32, 20), (700, 128, 128)])
def test_dispatch_model_cpu(T, E, used):
    rng = np.random.default_rng(T * 31 + E)
    experts = rng.choice(rng.permutation(E)[:used], size=(T, 4)).astype(np.int32)
    off, slots, tiles = simulate_dispatch(experts, E)
    np.testing.assert_array_equal(slots, np.argsort(experts.reshape(-1), kind="stable"))
    np.testing.assert_array_equal(off, np.searchsorted(np.sort(experts.reshape(-1)), np.arange(E + 1)))
    for bm, table in tiles.items():
        np.testing.assert_array_equal(table, tile_schedule(off, bm, M.tile_bound(T * 4, E, bm)))


@pytest.mark.parametrize("T, E, used, first, E_d", [
    (1, 32, 32, 0, 32), (7, 32, 32, 0, 32), (64, 32, 32, 0, 32), (65, 32, 9, 0, 32), (16, 128, 128, 0, 128),
    (17, 128, 128, 32, 32), (64, 32, 32, 8, 8), (5, 32, 32, 0, 8)])  # E_d < E: a rank's view
def test_dispatch_model_any_block_size_cpu(T, E, used, first, E_d):
    """dispatch_block's outputs do not depend on the CTA: moe_dispatch's 1024 threads and route_dispatch's
    256, with 32- or 64-wide warps, give the stable sort, for the whole router's ids and for a rank's view
    (ids - first over fewer experts: the others' slots skipped)."""
    rng = np.random.default_rng(T * 7 + E + first)
    experts = np.stack([rng.choice(rng.permutation(E)[:used], 4, replace=False) for _ in range(T)]).astype(np.int32)
    ids = experts - first
    runs = [simulate_dispatch(ids, E_d, nwarps=threads // warp, warp=warp)
            for threads in (M.DISPATCH_THREADS, M.ROUTER_THREADS) for warp in (32, 64)]
    flat = ids.reshape(-1)
    mine = np.nonzero((flat >= 0) & (flat < E_d))[0]
    want_slots = mine[np.argsort(flat[mine], kind="stable")]
    want_off = np.searchsorted(np.sort(flat[mine]), np.arange(E_d + 1))
    for off, slots, tiles in runs:
        np.testing.assert_array_equal(off, want_off)
        np.testing.assert_array_equal(slots[:off[-1]], want_slots)
        assert (slots[off[-1]:] == -1).all()
        for bm, table in tiles.items():
            np.testing.assert_array_equal(table, tile_schedule(off, bm, M.tile_bound(T * 4, E_d, bm)))


def test_fused_routing_sizes_cpu():
    """route_dispatch's last CTA (routing.hip): a round of FUSED_MAX_LOGITS logits holds a whole token at
    any E, the rounds cover every token once, its dispatch's register cache covers every step
    fused_routing sends it with k <= E/2, and the model takes the one launch only for steps one round holds."""
    from gptoss.kernels import define

    assert M.FUSED_MAX_LOGITS >= M.MAX_EXPERTS
    assert M.FUSED_ROUTING_MAX_LOGITS <= M.FUSED_MAX_LOGITS
    # S = T*k <= T*E/2 for k <= E/2 (gpt-oss: k = 4, E = 32 or 128)
    assert define("routing", "FUSED_CACHE") * M.ROUTER_THREADS >= M.FUSED_MAX_LOGITS // 2
    for E in (4, 32, 128, 256):
        for T in (1, 7, M.FUSED_MAX_LOGITS // E, M.FUSED_MAX_LOGITS // E + 1, 1000):
            per_round = M.FUSED_MAX_LOGITS // E
            covered = [t0 + j for t0 in range(0, T, per_round) for j in range(min(per_round, T - t0))]
            assert covered == list(range(T))
            assert M.fused_routing(T, E) == (T * E <= M.FUSED_ROUTING_MAX_LOGITS)
            assert not M.fused_routing(T, E) or -(-T // per_round) == 1
    assert not M.fused_routing(0, 32)
    assert M.fused_routing(8, 32) and not M.fused_routing(9, 32)  # 20b: decode up to batch 8
    assert M.fused_routing(2, 128) and not M.fused_routing(3, 128)  # 120b: up to 2


def test_route_counter_wraps_to_zero_cpu():
    """The arrival count of route_dispatch: atomicInc(counter, n - 1) over the n CTAs of a launch (any
    order, any grid size from launch to launch) picks exactly one last CTA and leaves 0 behind."""
    def atomic_inc(cell, limit):  # CUDA/HIP atomicInc: old >= limit ? 0 : old + 1, returns old
        old = cell[0]
        cell[0] = 0 if old >= limit else old + 1
        return old

    counter = [0]
    for n in (32, 64, 128, 32, 4096, 32):
        last = [atomic_inc(counter, n - 1) == n - 1 for _ in range(n)]
        assert sum(last) == 1 and last[-1] and counter[0] == 0


def test_tile_bound_cpu():
    rng = np.random.default_rng(0)
    for _ in range(300):
        E = int(rng.integers(1, 200))
        S = int(rng.integers(0, 5000))
        counts = np.bincount(rng.integers(0, E, S), minlength=E) if S else np.zeros(E, int)
        for bm in M.TILE_BMS:
            need = int(np.sum(-(-counts // bm)))
            assert need <= M.tile_bound(S, E, bm)
    # tight cases: every expert one row past a tile; a single expert; no slots
    assert M.tile_bound(32 * 17, 32, 16) == 34 + 32 and np.sum(-(-np.full(32, 17) // 16)) == 64
    assert M.tile_bound(5, 32, 64) == 1 + 5
    assert M.tile_bound(0, 8, 16) == 0
    table = tile_schedule(np.array([0, 0, 17, 17, 20]), 16, M.tile_bound(20, 4, 16))
    np.testing.assert_array_equal(table, [[1, 0], [1, 16], [3, 17]] + [[-1, 0]] * 3)


def rotr(x: int, n: int) -> int:
    return ((x >> n) | (x << (32 - n))) & 0xFFFFFFFF


def fp4_wg_word_to_bf16x2(W: int, s: int, big: bool) -> list[int]:
    """moe.hip fp4_wg_word_to_bf16x2 on one word of the wgmma order."""
    M_ = 0x81C081C0
    placed = [W & M_, rotr(W, 4) & M_, rotr(W, 10) & M_, (rotr(W, 6) & 0x81808180) | (rotr(W, 14) & 0x00400040)]
    return [scale_placed(p, s, big) for p in placed]


def test_wgmma_order_fragments_cpu():
    """moe.hip issue_stage_wg / compute_stage_fp4_std: lane t's word of a block in the wgmma order
    (ops.moe.wgmma_order_host) gives, through fp4_wg_word_to_bf16x2, the pairs 8s + t (q = 2s) and
    8s + t + 4 (q = 2s + 1) of k16 step s: the standard mma A-fragment k order the tokens use. Every byte
    value at every position of a block, both scale paths."""
    rng = np.random.default_rng(5)
    blocks = (np.arange(256)[:, None] + 17 * np.arange(16)[None, :]) % 256  # byte j of block v: v + 17j
    blocks = np.concatenate([blocks, rng.integers(0, 256, (32, 16))]).astype(np.uint8)
    laid = M.wgmma_order_host(blocks)
    np.testing.assert_array_equal(M.wgmma_order_host(laid, inverse=True), blocks)
    for block, words in zip(blocks, laid.view("<u4")):
        for t in range(4):
            for sc, big in ((127, False), (128, False), (118, True), (140, True)):
                out = fp4_wg_word_to_bf16x2(int(words[t]), sc, big)
                for s in range(2):
                    for r, pair in ((0, 8 * s + t), (1, 8 * s + t + 4)):
                        byte = int(block[pair])  # k = 2 * pair (lo nibble), 2 * pair + 1 (hi nibble)
                        want = FP4_VALUES[[byte & 15, byte >> 4]].astype(np.float64) * 2.0 ** (sc - 127)
                        v = out[2 * s + r]
                        got = from_bf16_bits(np.array([v & 0xFFFF, v >> 16], dtype=np.uint16))
                        np.testing.assert_array_equal(got, want.astype(np.float32), err_msg=f"t {t} s {s} r {r}")


def test_wgmma_order_is_the_placed_bytes_cpu():
    """Each word of the wgmma order is exactly the four placed words fp4x8_to_bf16x2 makes from the
    bytes t, t+4, t+8, t+12 it replaced (so the kernels' bits cannot change), over random blocks."""
    rng = np.random.default_rng(6)
    blocks = rng.integers(0, 256, (200, 16), dtype=np.uint8)
    laid = M.wgmma_order_host(blocks)
    for block, words in zip(blocks, laid.view("<u4")):
        for t in range(4):
            w = int(block[t]) | int(block[t + 4]) << 8 | int(block[t + 8]) << 16 | int(block[t + 12]) << 24
            assert fp4_wg_word_to_bf16x2(int(words[t]), 127, False) == fp4x8_to_bf16x2(w, 127, False)
            assert fp4_wg_word_to_bf16x2(int(words[t]), 135, True) == fp4x8_to_bf16x2(w, 135, True)


class _MBarrier:
    """An mbarrier: a phase completes when `count` arrivals are in; try_wait.parity(P) succeeds when
    the current phase's parity differs from P."""

    def __init__(self, count):
        self.count, self.pending, self.phase = count, count, 0

    def arrive(self):
        self.pending -= 1
        if self.pending == 0:
            self.phase, self.pending = self.phase + 1, self.count

    def try_wait(self, use):
        # a wait for a slot's `use`-th phase must find the barrier at phase use or use + 1; anything
        # else would make the parity ambiguous (or deadlock)
        assert use <= self.phase <= use + 1, (use, self.phase)
        return self.phase % 2 != use % 2


def _ring_run(KT, S, LAG, warps, rng):
    """moe.hip mainloop_mb, one agent per warp, in a random interleaving; copies land at random later
    times. Returns the k-tiles each warp read, in order."""
    full = [_MBarrier(warps) for _ in range(S)]
    empty = [_MBarrier(warps) for _ in range(S)]
    slot = [[None] * warps for _ in range(S)]  # k-tile whose copy (per warp part) has landed
    in_flight = []  # (warp, slot, k-tile) copies not landed yet

    def load(w, b, kt):
        assert all(not (x[1] == b) for x in in_flight if x[0] == w)
        in_flight.append((w, b, kt))

    reads = [[] for _ in range(warps)]
    readers = [set() for _ in range(S)]  # warps still between reading a slot and releasing it
    state = [dict(kt=0, step="refill") for _ in range(warps)]
    for w in range(warps):  # prologue: every slot
        for s in range(min(S, KT)):
            load(w, s, s)
    idle = 0  # scheduling rounds without progress: a deadlock if it grows
    while any(st["kt"] < KT for st in state) or in_flight:
        idle += 1
        assert idle < 10_000, "deadlock: no warp can proceed and no copy is in flight"
        if in_flight and rng.random() < 0.4:  # a copy lands; its thread's arrival follows
            w, b, kt = in_flight.pop(rng.integers(len(in_flight)))
            slot[b][w] = kt
            full[b].arrive()
            idle = 0
            continue
        w = int(rng.integers(warps))
        st = state[w]
        kt = st["kt"]
        if kt >= KT:
            continue
        if st["step"] == "refill":
            j = kt - LAG
            if kt >= LAG and j + S < KT:
                if not empty[j % S].try_wait(j // S):
                    continue
                assert not readers[j % S], "slot refilled while a warp reads it"
                load(w, j % S, j + S)
            st["step"] = "wait"
            idle = 0
        elif st["step"] == "wait":
            if not full[kt % S].try_wait(kt // S):
                continue
            assert slot[kt % S] == [kt] * warps, "read before every part of the k-tile landed"
            readers[kt % S].add(w)
            reads[w].append(kt)
            st["step"] = "release"
            idle = 0
        else:  # the warp's wgmmas on the slot are done
            readers[kt % S].discard(w)
            empty[kt % S].arrive()
            st.update(kt=kt + 1, step="refill")
            idle = 0
    return reads


@pytest.mark.parametrize("S, LAG", [(4, 2), (5, 2), (4, 1), (4, 3)])
def test_mbarrier_ring_protocol_cpu(S, LAG):
    """The k-tile ring of the wgmma MoE kernels (moe.hip mainloop_mb, LAG 1..STAGES-1) under random
    warp speeds and copy latencies: every warp reads every k-tile in order, only after all its copies
    landed; no slot is refilled while a warp still reads it; every parity wait is unambiguous."""
    rng = np.random.default_rng(S * 10 + LAG)
    for KT in (1, 2, S - 1, S, S + 1, 45):
        for _ in range(20):
            reads = _ring_run(KT, S, LAG, warps=8, rng=rng)
            assert reads == [list(range(KT))] * 8


def test_router_choice_names_a_router_kernel_and_keeps_small_steps_on_router_logits():
    """router_choice returns one of router_choices() for every step; router_logits below the tiled
    threshold (decode of up to 255 sequences on 120b, 1,023 on 20b), a register tile above it, and all of
    H per CTA only with enough CTAs for every multiprocessor several times over."""
    choices = M.router_choices()
    assert choices[0] == M.LOGITS and len(set(choices)) == len(choices)
    for E in (4, 32, 128):
        for T in (1, 2, 64, 255, 256, 1023, 1024, 2048, 4096, 8192, 9216, 10240, 65536):
            for sms in (66, 132):
                got = M.router_choice(T, E, sms)
                assert got in choices
                assert (got == M.LOGITS) == (T * E < M.ROUTER_TILED_MIN_LOGITS)
                if got.endswith(":1"):
                    tt, te = M.ROUTER_TILES[got.split(":")[0]][:2]
                    assert -(-T // tt) * -(-E // te) >= M.ROUTER_WHOLE_H_MIN_WAVES * sms
    assert M.router_choice(255, 128, 132) == M.LOGITS and M.router_choice(1024, 128, 132) != M.LOGITS
    assert M.router_choice(1023, 32, 132) == M.LOGITS and M.router_choice(2048, 32, 132) != M.LOGITS
    with pytest.raises(ValueError, match="router kernel"):
        M._router_choice("64x64_4x4:2")  # only ROUTER_SPLITS or 1 slices per launch give the same bits
