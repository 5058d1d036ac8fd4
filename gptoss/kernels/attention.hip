// Attention of gpt-oss: YaRN RoPE fused with the KV-cache write, then attention with learned sinks, GQA
// and an optional sliding window, over a varlen batch of sequences whose keys live in a cache of blocks
// [blocks, L, Hkv, D]. Without a page table (table_w = 0) block s is slot s's whole cache, position p at
// row p % L (a ring when L is shorter than the sequence). With one, the cache is paged: position p of
// slot s sits in block table[s][p / L] at row p % L, so a sequence holds only the blocks it reaches.
//
// Kernels
//   rope_and_cache        grid (T, Y), 256 threads: RoPE on q (to q_out) and k, k and v into the caches.
//   attn_prefill_g{4,8}   grid (query blocks, Hkv), 32*G threads (fast path, D = 64; the sequences with
//                         more than one query): one CTA = 16 consecutive queries of one sequence x the
//                         G q heads of one kv head, so its 16*G rows ((query, head) pairs, 16 per warp)
//                         share every K/V tile it loads.
//   attn_decode_g{4,8}    grid (Hkv, SD, splits), 32 threads (fast path; the SD sequences with one query):
//                         one warp = the G heads of one kv head over one segment of the keys; writes
//                         fp32 partial (m, l, acc) to a workspace.
//   attn_decode_combine   folds a query's partials in segment order and writes the output.
//   attn_simple           grid (T, Hq), 128 threads: portable path (any even D <= 128; AMD).
//
// The canonical computation (why a query's output never depends on the rest of the launch)
// Keys are cut at fixed absolute positions: tiles of 64 keys (positions 64i..64i+63) grouped into
// segments of ATTN_SEG = 256 keys. For one (query, head) row:
//   1. per segment, an online softmax over its tiles in increasing order, from (m = -inf, l = 0, o = 0),
//      every tile processed by the same warp-level routine (attend_tile) with the same instruction
//      sequence; a tile with no visible key for the row leaves the state bit-identical, so it does
//      not matter which extra tiles a launch happens to load for other rows;
//   2. the segments are folded in increasing order into (M = sink, L = 1, ACC = 0) by merge_coeffs /
//      merge_value (explicit __fmaf_rn / __fmul_rn, no compiler contraction); a segment with no
//      visible key folds as the identity;
//   3. out = ACC / L, rounded to bf16.
// The prefill kernel does 1-3 in one CTA (the segment state in registers, the running state in shared
// memory); the decode kernel does step 1 for one segment per CTA and attn_decode_combine does 2-3: the
// same bits either way. So a query
// gets the same output alone or with other sequences, prefilled in one chunk or in many, and as a
// decode token or inside a prefill chunk. (The portable attn_simple is invariant as well -- it handles
// every (query, head) on its own -- but its bits differ from the tensor-core path's.)
//
// All softmax arithmetic is in the log2 domain: scores are multiplied by log2(e) / sqrt(D) and the
// sink by log2(e), so exp2f does the exponentials.
//
// FP8 cache (the *_fp8 kernels; ops/attention.py picks them when the caches are uint8): K and V are
// stored as OCP e4m3 bytes (bias 7, max 448, no infinities, NaN = s1111111), scale 1. rope_and_cache_fp8
// rounds the fp32 k (after RoPE) and the bf16 v to nearest even, saturating at +-448. The tensor-core
// kernels cp.async the fp8 tiles (half the bytes) into a staging ring and convert each tile once into the
// same swizzled bf16 tile the bf16 kernels read (every e4m3 value is a bf16 value: exact), so attend_tile
// and the canonical computation above are unchanged, and so is batch invariance. attn_simple_fp8 decodes
// each byte with the portable e4m3_to_float.
#include "common.h"
#include "mma.h"

#define ATTN_TILE 64      // keys per tile (fast path)
#define ATTN_SEG 256      // keys per segment: decode's split unit, fixed absolute cut points
#define ATTN_BLOCK_Q 16   // queries per prefill CTA
#define ATTN_PREFILL_STAGES 2  // K/V tile buffers of the prefill kernels' cp.async ring
#define ATTN_LOG2E 1.4426950408889634f

// Index of the first cache row of the block holding position pos of `slot` (see the top of this file):
// slot * L without a page table, the page table[slot][pos / L] times L with one ([slots, table_w] int32).
// The position's row is this + pos % L.
DEVICE long long block_row0(const int* __restrict__ table, int table_w, int slot, int L, int pos) {
    return (long long)(table_w > 0 ? table[(long long)slot * table_w + pos / L] : slot) * L;
}

// ---------------------------------------------------------------------------------------------------
// e4m3 <-> float, portable (both vendors, no intrinsics). The NumPy twins: gptoss/reference.py e4m3_*.
#define E4M3_MAX 448.0f

// Round to the nearest e4m3 value, ties to the even mantissa; |f| > 448 (infinity too) saturates to 448;
// NaN gives the NaN code. Normals: round the fp32 mantissa to 3 bits in place (carry into the exponent
// is the next binade), then rebias 127 -> 7. Below 2^-6 the values are multiples of 2^-9: rint(|f| 2^9)
// is the code itself (8 = the smallest normal, 0x08).
DEVICE u8 float_to_e4m3(float f) {
    const u32 sign = (__float_as_uint(f) >> 24) & 0x80u;
    const float a = fabsf(f);
    if (!(a == a)) return (u8)(sign | 0x7fu);
    if (a > E4M3_MAX) return (u8)(sign | 0x7eu);
    if (a < 0.015625f) return (u8)(sign | (u32)rintf(a * 512.0f));  // a * 2^9 is exact
    u32 x = __float_as_uint(a);
    x += 0x7ffffu + ((x >> 20) & 1u);  // round the 23-bit mantissa to 3 bits, nearest even
    return (u8)(sign | (((x >> 23) - 120u) << 3) | ((x >> 20) & 7u));
}

DEVICE float e4m3_to_float(u8 c) {
    const u32 e = (c >> 3) & 15u, m = c & 7u;
    float mag = e ? __uint_as_float(((e + 120u) << 23) | (m << 20)) : (float)m * 0.001953125f;  // m 2^-9
    if ((c & 0x7fu) == 0x7fu) mag = __uint_as_float(0x7fc00000u);
    return (c & 0x80u) ? -mag : mag;
}

// A cache element as a float: bf16 bits (bf16_t) or an e4m3 byte (u8).
DEVICE float kv_to_float(bf16_t x) { return bf16_to_float(x); }
DEVICE float kv_to_float(u8 x) { return e4m3_to_float(x); }

// ---------------------------------------------------------------------------------------------------
// RoPE + cache write. qkv [T, (Hq + 2 Hkv) D] (q heads, k heads, v heads); table [n_positions, D/2, 2]
// holds (cos, sin) with the YaRN concentration applied. Pairs (i, i + D/2) rotate:
//   a' = a cos - b sin,  b' = b cos + a sin.
// q goes to q_out [T, Hq, D]; k and v go to the cache row of (slot, pos) (block_row0). A token whose
// position, slot or page is out of range gets NaN q and writes nothing to the caches (a visible failure
// instead of a stray write). page_table [table_rows, table_w]; table_w = 0: no page table.
// KV: the cache element, bf16_t (k rounded from fp32 to bf16, v copied) or u8 (e4m3: k rounded from fp32,
// v from its bf16 value).
template <typename KV>
DEVICE void rope_and_cache_body(
    const bf16_t* __restrict__ qkv, const int* __restrict__ positions, const int* __restrict__ slots,
    const float* __restrict__ table, bf16_t* __restrict__ q_out, KV* __restrict__ k_cache,
    KV* __restrict__ v_cache, int Hq, int Hkv, int D, int L, int n_positions, int n_blocks,
    const int* __restrict__ page_table, int table_rows, int table_w)
{
    GPTOSS_WAIT_PRIOR_GRID();
    GPTOSS_LAUNCH_DEPENDENTS();
    const int tok = blockIdx.x, half = D / 2;
    const int pos = positions[tok], slot = slots[tok];
    int block = -1;  // the cache block this token's K/V go to
    if (pos >= 0 && pos < n_positions && slot >= 0) {
        if (table_w == 0) block = slot;
        else if (slot < table_rows && pos / L < table_w) block = page_table[(long long)slot * table_w + pos / L];
    }
    const bool ok = block >= 0 && block < n_blocks;
    const bf16_t* x = qkv + (long long)tok * (Hq + 2 * Hkv) * D;
    bf16_t* qo = q_out + (long long)tok * Hq * D;
    const long long crow = ok ? ((long long)block * L + pos % L) * Hkv * D : 0;  // cache row of this token
    const float* cs = table + (long long)(ok ? pos : 0) * D;                    // [half][2]
    const int n_rope = (Hq + Hkv) * half, n_all = n_rope + Hkv * half;
    // grid.y CTAs share a token's pairs (decode: a few tokens, so more CTAs shorten the load chain)
    for (int j = blockIdx.y * blockDim.x + threadIdx.x; j < n_all; j += blockDim.x * gridDim.y) {
        const int h = j / half, i = j - h * half;  // h runs over q heads, then k heads, then v heads
        const bf16_t* xh = x + h * D;
        if (j < n_rope) {
            const float a = bf16_to_float(xh[i]), b = bf16_to_float(xh[i + half]);
            const float c = cs[2 * i], s = cs[2 * i + 1];
            if constexpr (sizeof(KV) == 2) {  // bf16 cache
                const bf16_t ra = float_to_bf16(a * c - b * s), rb = float_to_bf16(b * c + a * s);
                if (h < Hq) {
                    qo[h * D + i] = ok ? ra : (bf16_t)0x7fc0;
                    qo[h * D + i + half] = ok ? rb : (bf16_t)0x7fc0;
                } else if (ok) {
                    KV* kd = k_cache + crow + (h - Hq) * D;
                    kd[i] = ra;
                    kd[i + half] = rb;
                }
            } else {  // fp8 cache: k rounded once, from fp32
                const float fa = a * c - b * s, fb = b * c + a * s;
                if (h < Hq) {
                    qo[h * D + i] = ok ? float_to_bf16(fa) : (bf16_t)0x7fc0;
                    qo[h * D + i + half] = ok ? float_to_bf16(fb) : (bf16_t)0x7fc0;
                } else if (ok) {
                    KV* kd = k_cache + crow + (h - Hq) * D;
                    kd[i] = float_to_e4m3(fa);
                    kd[i + half] = float_to_e4m3(fb);
                }
            }
        } else if (ok) {
            KV* vd = v_cache + crow + (h - Hq - Hkv) * D;
            if constexpr (sizeof(KV) == 2) {  // bf16: copied bit for bit
                vd[i] = xh[i];
                vd[i + half] = xh[i + half];
            } else {
                vd[i] = float_to_e4m3(bf16_to_float(xh[i]));
                vd[i + half] = float_to_e4m3(bf16_to_float(xh[i + half]));
            }
        }
    }
}

#define ROPE_ARGS(KV)                                                                                     \
    const bf16_t* __restrict__ qkv, const int* __restrict__ positions, const int* __restrict__ slots,    \
        const float* __restrict__ table, bf16_t* __restrict__ q_out, KV* __restrict__ k_cache,            \
        KV* __restrict__ v_cache, int Hq, int Hkv, int D, int L, int n_positions, int n_blocks,           \
        const int* __restrict__ page_table, int table_rows, int table_w
#define ROPE_CALL \
    qkv, positions, slots, table, q_out, k_cache, v_cache, Hq, Hkv, D, L, n_positions, n_blocks, page_table, table_rows, table_w
extern "C" __global__ void __launch_bounds__(256) rope_and_cache(ROPE_ARGS(bf16_t)) {
    GPTOSS_WAIT_PRIOR_GRID();
    GPTOSS_LAUNCH_DEPENDENTS();
    rope_and_cache_body<bf16_t>(ROPE_CALL);
}
extern "C" __global__ void __launch_bounds__(256) rope_and_cache_fp8(ROPE_ARGS(u8)) {
    GPTOSS_WAIT_PRIOR_GRID();
    GPTOSS_LAUNCH_DEPENDENTS();
    rope_and_cache_body<u8>(ROPE_CALL);
}

// K and V rows copied from one pair of caches to another (the sliding layers' staged prompt chunks,
// gptoss/batch.py WindowPlan): rows [2, n] = (source row, destination row) of the caches seen as
// [rows, Hkv * D] elements, `units` 16-bit words a row (bf16: Hkv D; e4m3: Hkv D / 2). Block (i, 0)
// copies row pair i of K, block (i, 1) of V. A pair with a row outside its cache (src_rows, dst_rows)
// copies nothing.
extern "C" __global__ void __launch_bounds__(128) copy_kv_rows(
    const bf16_t* __restrict__ k_src, const bf16_t* __restrict__ v_src, bf16_t* __restrict__ k_dst,
    bf16_t* __restrict__ v_dst, const int* __restrict__ rows, int n, int units, int src_rows, int dst_rows)
{
    GPTOSS_WAIT_PRIOR_GRID();
    GPTOSS_LAUNCH_DEPENDENTS();
    const int i = blockIdx.x;
    if ((unsigned)rows[i] >= (unsigned)src_rows || (unsigned)rows[n + i] >= (unsigned)dst_rows) return;
    const bf16_t* src = blockIdx.y ? v_src : k_src;
    bf16_t* dst = blockIdx.y ? v_dst : k_dst;
    const long long from = (long long)rows[i] * units, to = (long long)rows[n + i] * units;
    for (int u = threadIdx.x; u < units; u += blockDim.x) dst[to + u] = src[from + u];
}

// ---------------------------------------------------------------------------------------------------
// Portable attention: one CTA of 128 threads per (query token, q head), any even D <= 128. Keys in
// chunks of 128 aligned to absolute positions; thread j scores key base + j, thread d accumulates
// output dimension d. Starts from the sink (m = sink, l = 1, acc = 0).
// KV: the cache element (bf16_t, or u8 = e4m3 for attn_simple_fp8).
template <typename KV>
DEVICE void attn_simple_body(
    const bf16_t* __restrict__ q, const KV* __restrict__ kc, const KV* __restrict__ vc,
    const float* __restrict__ sinks, const int* __restrict__ cu_q, const int* __restrict__ seq_slot,
    const int* __restrict__ seq_start, bf16_t* __restrict__ out, int S, int Hq, int Hkv, int D, int L,
    int window, float scale_log2, const int* __restrict__ page_table, int table_w)
{
    GPTOSS_WAIT_PRIOR_GRID();
    GPTOSS_LAUNCH_DEPENDENTS();
    __shared__ float qs[128], ps[128], scratch[BLOCK_SCRATCH];
    const int tok = blockIdx.x, h = blockIdx.y, tid = threadIdx.x;
    int a = 0, b = S - 1;  // the sequence holding this token: the last s with cu_q[s] <= tok
    while (a < b) {
        const int mid = (a + b + 1) >> 1;
        if (cu_q[mid] <= tok) a = mid; else b = mid - 1;
    }
    const int s = a;
    const int p = seq_start[s] + tok - cu_q[s];
    const int lo = window > 0 ? max(0, p - window + 1) : 0;
    const int kvh = h / (Hq / Hkv);
    const int slot = seq_slot[s];
    if (tid < D) qs[tid] = bf16_to_float(q[((long long)tok * Hq + h) * D + tid]);
    __syncthreads();

    float m = __fmul_rn(sinks[h], ATTN_LOG2E), l = 1.0f, acc = 0.0f;
    for (int base = (lo / 128) * 128; base <= p; base += 128) {
        const int kp = base + tid;
        const bool visible = kp >= lo && kp <= p;
        float score = NEG_INF_F;
        if (visible) {
            const KV* k = kc + ((block_row0(page_table, table_w, slot, L, kp) + kp % L) * Hkv + kvh) * D;
            float dot = 0.0f;
            for (int d = 0; d < D; ++d) dot += qs[d] * kv_to_float(k[d]);
            score = dot * scale_log2;
        }
        const float m_new = fmaxf(m, block_max(score, scratch));  // finite: m starts at the sink
        const float alpha = exp2f(m - m_new);
        const float pj = visible ? exp2f(score - m_new) : 0.0f;
        l = l * alpha + block_sum(pj, scratch);
        ps[tid] = pj;
        __syncthreads();
        if (tid < D) {
            float o = acc * alpha;
            const int j_lo = max(lo - base, 0), j_hi = min(p - base, 127);
            for (int j = j_lo; j <= j_hi; ++j) {
                const int vpos = base + j;
                const long long row = block_row0(page_table, table_w, slot, L, vpos) + vpos % L;
                o += ps[j] * kv_to_float(vc[(row * Hkv + kvh) * D + tid]);
            }
            acc = o;
        }
        m = m_new;
        __syncthreads();
    }
    if (tid < D) out[((long long)tok * Hq + h) * D + tid] = float_to_bf16(acc / l);
}

#define ATTN_SIMPLE_ARGS(KV)                                                                              \
    const bf16_t* __restrict__ q, const KV* __restrict__ kc, const KV* __restrict__ vc,                   \
        const float* __restrict__ sinks, const int* __restrict__ cu_q, const int* __restrict__ seq_slot,  \
        const int* __restrict__ seq_start, bf16_t* __restrict__ out, int S, int Hq, int Hkv, int D, int L, \
        int window, float scale_log2, const int* __restrict__ page_table, int table_w
#define ATTN_SIMPLE_CALL \
    q, kc, vc, sinks, cu_q, seq_slot, seq_start, out, S, Hq, Hkv, D, L, window, scale_log2, page_table, table_w
extern "C" __global__ void __launch_bounds__(128) attn_simple(ATTN_SIMPLE_ARGS(bf16_t)) {
    GPTOSS_WAIT_PRIOR_GRID();
    GPTOSS_LAUNCH_DEPENDENTS();
    attn_simple_body<bf16_t>(ATTN_SIMPLE_CALL);
}
extern "C" __global__ void __launch_bounds__(128) attn_simple_fp8(ATTN_SIMPLE_ARGS(u8)) {
    GPTOSS_WAIT_PRIOR_GRID();
    GPTOSS_LAUNCH_DEPENDENTS();
    attn_simple_body<u8>(ATTN_SIMPLE_CALL);
}

#if GPTOSS_HAS_MMA
// ---------------------------------------------------------------------------------------------------
// Tensor-core path, D = 64. Fragment layouts: see mma.h (g = lane / 4, t = lane % 4; a thread holds rows
// g and g + 8 of a warp's 16 rows).

DEVICE u32 pack_bf16x2_rn(float lo, float hi) {  // cvt packs its first source into the high half
    u32 r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;\n" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}

// Element offset of 16-byte chunk ch (0..7) of row `row` in a [64][64] bf16 tile. Chunks are XOR-swizzled
// by row % 8, so the 8 row addresses of one ldmatrix 8x8 matrix hit 8 different 16-byte bank groups.
DEVICE int swz(int row, int ch) { return row * 64 + ((ch ^ (row & 7)) << 3); }

// cp.async the K and V rows of keys 64*tile .. 64*tile + 63 of one (slot, kv head) into sK, sV, with
// NTHREADS threads: thread tid copies 16-byte chunk tid % 8 of key rows tid / 8 + (NTHREADS / 8) j.
// kp / vp point at this thread's chunk of cache row 0 of the kv head; rows are `stride` apart; the tile's
// keys sit in the block starting at row row0 (block_row0 of its first key: a 64-key tile never spans two
// pages, since a paged cache's L is a multiple of 64).
// Keys outside [lo, hi] are zero-filled: their cache rows may be stale or never written, and although
// they are masked, a NaN there would poison P.V (0 * NaN).
template <int NTHREADS>
DEVICE void load_kv_tile(bf16_t* sK, bf16_t* sV, const bf16_t* kp, const bf16_t* vp, int stride, int L,
                         long long row0, int tile, int lo, int hi, int tid)
{
    const int key0 = tile * ATTN_TILE, base = key0 % L, ch = tid & 7;
    #pragma unroll
    for (int j = 0; j < ATTN_TILE * 8 / NTHREADS; ++j) {
        const int row = (tid >> 3) + (NTHREADS / 8) * j, pos = key0 + row;
        const bool valid = pos >= lo && pos <= hi;
        int idx = base + row;  // pos % L
        if (idx >= L) idx = L >= ATTN_TILE ? idx - L : idx % L;
        const long long off = valid ? (row0 + idx) * stride : 0;
        const int n = valid ? 16 : 0;
        cp_async_16(sK + swz(row, ch), kp + off, n);
        cp_async_16(sV + swz(row, ch), vp + off, n);
    }
}

// This thread's chunk (tid % 8) of cache row 0 of kv head kvh in a [blocks, L, Hkv, 64] cache.
DEVICE const bf16_t* cache_chunk(const bf16_t* cache, int kvh, int tid) {
    return cache + kvh * 64 + (tid & 7) * 8;
}

// ---- FP8 (e4m3) tiles: staged as bytes, converted once per tile into the bf16 tile attend_tile reads ----
// An fp8 cache row of one kv head is 64 bytes: 4 chunks of 16. This thread's chunk (tid % 4) of row 0.
DEVICE const u8* cache_chunk(const u8* cache, int kvh, int tid) {
    return cache + kvh * 64 + (tid & 3) * 16;
}

// load_kv_tile for an fp8 cache: chunk tid % 4 of key rows tid / 4 + (NTHREADS / 4) j into the staging
// tiles rK, rV ([64 keys][64 bytes], plain row-major: each byte is read once, by convert_kv_tile).
template <int NTHREADS>
DEVICE void load_kv_tile_fp8(u8* rK, u8* rV, const u8* kp, const u8* vp, int stride, int L, long long row0,
                             int tile, int lo, int hi, int tid)
{
    const int key0 = tile * ATTN_TILE, base = key0 % L, ch = tid & 3;
    #pragma unroll
    for (int j = 0; j < ATTN_TILE * 4 / NTHREADS; ++j) {
        const int row = (tid >> 2) + (NTHREADS / 4) * j, pos = key0 + row;
        const bool valid = pos >= lo && pos <= hi;
        int idx = base + row;  // pos % L
        if (idx >= L) idx = L >= ATTN_TILE ? idx - L : idx % L;
        const long long off = valid ? (row0 + idx) * stride : 0;
        const int n = valid ? 16 : 0;  // zero-filled outside [lo, hi]: e4m3 0x00 = +0
        cp_async_16(rK + row * 64 + ch * 16, kp + off, n);
        cp_async_16(rV + row * 64 + ch * 16, vp + off, n);
    }
}

// 4 e4m3 bytes (w, element 0 in the low byte) -> 4 bf16 as two bf16x2 words (lo = elements 0, 1), exact.
// The sign bit and the 7 magnitude bits placed as a bf16's sign and bits 10..4 form the bf16 whose value
// is the e4m3 value times 2^-120 (the exponents' bias differs by 120; for the e4m3 subnormals it is a bf16
// subnormal of the same mantissa), so one bf16x2 multiply by 2^120 (0x7b80; fma with -0 keeps the sign of
// zeros) finishes it. The NaN codes (magnitude 0x7f) then get all exponent and mantissa bits set.
DEVICE void e4m3x4_to_bf16x4(u32 w, u32& lo, u32& hi) {
    u32 r[2];
    #pragma unroll
    for (int k = 0; k < 2; ++k) {
        const u32 y = __byte_perm(w, 0u, k ? 0x3424 : 0x1404);  // bytes 2k, 2k+1 into bits 15..8, 31..24
        const u32 mag = y & 0x7f007f00u;
        u32 b = (y & 0x80008000u) | (mag >> 4);
        asm("fma.rn.bf16x2 %0, %1, %2, %3;\n" : "=r"(b) : "r"(b), "r"(0x7b807b80u), "r"(0x80008000u));
        const u32 nan = (mag + 0x01000100u) & 0x80008000u;  // bit 15 of a half set iff its magnitude is 0x7f
        r[k] = b | (nan - (nan >> 15));
    }
    lo = r[0];
    hi = r[1];
}

// The staged fp8 tiles rK, rV into the swizzled bf16 tiles sK, sV (the layout load_kv_tile writes):
// thread tid converts chunk c = tid % 4 (dims 16c..16c+15) of rows tid / 4 + (NTHREADS / 4) j, which
// are bf16 chunks 2c and 2c + 1 of the row.
template <int NTHREADS>
DEVICE void convert_kv_tile(const u8* rK, const u8* rV, bf16_t* sK, bf16_t* sV, int tid) {
    const int c = tid & 3;
    #pragma unroll
    for (int j = 0; j < ATTN_TILE * 4 / NTHREADS; ++j) {
        const int row = (tid >> 2) + (NTHREADS / 4) * j;
        #pragma unroll
        for (int kv = 0; kv < 2; ++kv) {
            const uint4 w = *(const uint4*)((kv ? rV : rK) + row * 64 + c * 16);
            uint4 a, b;
            e4m3x4_to_bf16x4(w.x, a.x, a.y);
            e4m3x4_to_bf16x4(w.y, a.z, a.w);
            e4m3x4_to_bf16x4(w.z, b.x, b.y);
            e4m3x4_to_bf16x4(w.w, b.z, b.w);
            bf16_t* dst = kv ? sV : sK;
            *(uint4*)(dst + swz(row, 2 * c)) = a;
            *(uint4*)(dst + swz(row, 2 * c + 1)) = b;
        }
    }
}

// One ring stage (the K tile, then the V tile) in bf16 elements: 64 x 64 of each, at sizeof(KV) bytes.
#define KV_STAGE_ELEMS(KV) (ATTN_TILE * 64 * (int)sizeof(KV))

// Tile `tile` into the ring stage at `stage`: bf16 straight into the swizzled tiles, fp8 into the staging
// tiles (4 KB of K, then 4 KB of V).
template <int NTHREADS, typename KV>
DEVICE void load_stage(bf16_t* stage, const KV* kp, const KV* vp, int stride, int L, long long row0,
                       int tile, int lo, int hi, int tid)
{
    if constexpr (sizeof(KV) == 1)
        load_kv_tile_fp8<NTHREADS>((u8*)stage, (u8*)stage + ATTN_TILE * 64, kp, vp, stride, L, row0, tile, lo, hi,
                                   tid);
    else
        load_kv_tile<NTHREADS>(stage, stage + ATTN_TILE * 64, kp, vp, stride, L, row0, tile, lo, hi, tid);
}

// The fp8 stage at `stage` converted into the bf16 tiles at sConv (K, then V), by NTHREADS threads.
template <int NTHREADS>
DEVICE void convert_stage(const bf16_t* stage, bf16_t* sConv, int tid) {
    convert_kv_tile<NTHREADS>((const u8*)stage, (const u8*)stage + ATTN_TILE * 64, sConv, sConv + ATTN_TILE * 64,
                              tid);
}

DEVICE float quad_max(float v) {
    v = fmaxf(v, WARP_SHFL_XOR(v, 1));
    return fmaxf(v, WARP_SHFL_XOR(v, 2));
}

// Sum over the 4 lanes of a quad; (v0 + v1) + (v2 + v3) on every lane (fp add is commutative, so all
// four lanes hold the same bits).
DEVICE float quad_sum(float v) {
    v = v + WARP_SHFL_XOR(v, 1);
    return v + WARP_SHFL_XOR(v, 2);
}

// Folding a segment (m, l, x) into the running state (M, L, X): Mn = max(M, m),
// X' = X * 2^(M - Mn) + x * 2^(m - Mn). Shared by the prefill kernel and attn_decode_combine.
// A coefficient is exactly 1 where its max did not move (not left to exp2f(0)), so that folding an empty
// segment (m = -inf, l = 0, x = 0) is exactly the identity.
DEVICE void merge_coeffs(float M, float m, float& Mn, float& a, float& b) {
    Mn = fmaxf(M, m);  // M is finite (it starts at the sink); m = -inf gives b = 0
    a = Mn == M ? 1.0f : exp2f(M - Mn);
    b = Mn == m ? 1.0f : exp2f(m - Mn);
}
DEVICE float merge_value(float X, float x, float a, float b) { return __fmaf_rn(x, b, __fmul_rn(X, a)); }

// One warp's 16 rows against one 64-key tile in shared memory (online softmax step, log2 domain).
// sQ: the warp's 16 Q rows, [16][64] swizzled. State: m[r] (row max, quad-uniform), l[r] (this
// thread's partial row sum: its 16 columns only; quad_sum at the end of the segment), o: the 16x64
// output as 8 C fragments (dims 8nt..8nt+7). qpos_a / qpos_b: positions of rows g and g + 8.
// MODE (ATTN_MMA_SYNC, ATTN_WG_S, ATTN_WG_SPV): which products run on wgmma (sm_90a; the whole warpgroup
// must call with the same tile): S = Q K^T with the warp's Q fragments from registers and K by descriptor
// (the 64-key tile is a K-major B operand in the 128-byte swizzle as stored), and with ATTN_WG_SPV also
// O += P V with P from registers and V by descriptor (N-major). Each wgmma runs the same k16 steps in the
// same order on the same values as the mma.sync code, which gives the same bits (tests:
// tests/gpu/test_attention.py::test_batch_invariance, prefill against the mma.sync decode kernel).
#define ATTN_MMA_SYNC 0
#define ATTN_WG_S 1
#define ATTN_WG_SPV 2
template <int MODE>
DEVICE void attend_tile(const bf16_t* sQ, const bf16_t* sK, const bf16_t* sV, int key0, int qpos_a,
                        int qpos_b, int window, bool need_mask, float scale_log2, float m[2], float l[2],
                        float o[8][4], int lane)
{
    const int t = lane & 3;
    // S = Q K^T, in two halves of D (k-steps 2h, 2h + 1), so s[nt] accumulates k-steps 0, 1, 2, 3 in order.
    // A fragment of k-step kk: ldmatrix x4 with lane -> row lane % 16, chunk 2kk + lane / 16 (matrices:
    // rows 0-7 / 8-15 of dims 16kk..+7, then of dims 16kk+8..+15 = a[0..3] of mma.h).
    // B fragment of n-tile nt (keys 8nt..8nt+7): b[0] = K[8nt + g][16kk + 2t..], b[1] = K[8nt + g][16kk + 8 +
    // 2t..] -- rows of K as stored, so a plain ldmatrix; one x4 over the 4 consecutive 8-dim chunks
    // 4h..4h+3 (lane -> key row 8nt + lane % 8, chunk 4h + lane / 8) gives the b of k-steps 2h and 2h + 1.
    float s[8][4];
    #pragma unroll
    for (int nt = 0; nt < 8; ++nt) s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.0f;
    if constexpr (MODE == ATTN_MMA_SYNC) {
        #pragma unroll
        for (int h = 0; h < 2; ++h) {
            u32 qa[4], qb[4];
            ldmatrix_x4(qa, sQ + swz(lane & 15, 4 * h + (lane >> 4)));
            ldmatrix_x4(qb, sQ + swz(lane & 15, 4 * h + 2 + (lane >> 4)));
            #pragma unroll
            for (int nt = 0; nt < 8; ++nt) {
                u32 kb[4];
                ldmatrix_x4(kb, sK + swz(nt * 8 + (lane & 7), 4 * h + (lane >> 3)));
                mma_bf16_16816(s[nt], qa, kb);
                mma_bf16_16816(s[nt], qb, kb + 2);
            }
        }
    } else {
#if GPTOSS_HAS_WGMMA
        // k-step kk: A = Q dims 16kk..16kk+15 (the mma.sync A fragment), B = K's 64 rows from byte 32 kk on
        u32 qf[4][4];
        #pragma unroll
        for (int kk = 0; kk < 4; ++kk) ldmatrix_x4(qf[kk], sQ + swz(lane & 15, 2 * kk + (lane >> 4)));
        const u32 k_addr = smem_u32(sK);
        wgmma_fence();
        #pragma unroll
        for (int kk = 0; kk < 4; ++kk) wgmma_bf16_rs<64>(&s[0][0], qf[kk], wgmma_desc_sw128(k_addr + 32 * kk));
        wgmma_commit();
        wgmma_wait<0>();
        #pragma unroll
        for (int nt = 0; nt < 8; ++nt) {
            #pragma unroll
            for (int e = 0; e < 4; ++e) reg_fence(s[nt][e]);
        }
#endif
    }
    // s[nt][e] is the score of row (e < 2 ? g : g + 8) and key key0 + 8nt + 2t + (e & 1).
    if (need_mask) {
        #pragma unroll
        for (int nt = 0; nt < 8; ++nt) {
            #pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int kpos = key0 + nt * 8 + 2 * t + (e & 1);
                const int qp = e < 2 ? qpos_a : qpos_b;
                if (kpos > qp || (window > 0 && qp - kpos >= window)) s[nt][e] = NEG_INF_F;
            }
        }
    }
    float mx[2] = {NEG_INF_F, NEG_INF_F};
    #pragma unroll
    for (int nt = 0; nt < 8; ++nt) {
        mx[0] = fmaxf(mx[0], fmaxf(s[nt][0], s[nt][1]));
        mx[1] = fmaxf(mx[1], fmaxf(s[nt][2], s[nt][3]));
    }
    float alpha[2], mu[2];
    #pragma unroll
    for (int r = 0; r < 2; ++r) {
        const float m_new = fmaxf(m[r], __fmul_rn(quad_max(mx[r]), scale_log2));  // scale > 0 keeps the max
        mu[r] = m_new == NEG_INF_F ? 0.0f : m_new;  // nothing visible yet: avoid -inf - -inf
        // exactly 1 when the max did not move, so a tile with nothing visible to the row leaves it as it was
        alpha[r] = m_new == m[r] ? 1.0f : exp2f(m[r] - mu[r]);
        m[r] = m_new;
    }
    float ls[2] = {0.0f, 0.0f};
    #pragma unroll
    for (int nt = 0; nt < 8; ++nt) {
        #pragma unroll
        for (int e = 0; e < 4; ++e) {
            const float p = exp2f(__fmaf_rn(s[nt][e], scale_log2, -mu[e >> 1]));
            s[nt][e] = p;
            ls[e >> 1] += p;
        }
    }
    #pragma unroll
    for (int r = 0; r < 2; ++r) l[r] = __fmaf_rn(l[r], alpha[r], ls[r]);
    #pragma unroll
    for (int nt = 0; nt < 8; ++nt) {
        o[nt][0] = __fmul_rn(o[nt][0], alpha[0]);
        o[nt][1] = __fmul_rn(o[nt][1], alpha[0]);
        o[nt][2] = __fmul_rn(o[nt][2], alpha[1]);
        o[nt][3] = __fmul_rn(o[nt][3], alpha[1]);
    }
    // O += P V. The A fragment of k-step kk (keys 16kk..16kk+15) is the C fragments of n-tiles 2kk and
    // 2kk + 1: a[0] = P[g][16kk+2t..] = s[2kk][0..1], a[1] = P[g+8][..] = s[2kk][2..3],
    // a[2] = P[g][16kk+8+2t..] = s[2kk+1][0..1], a[3] = s[2kk+1][2..3].
    // B = V[key][dim] stored key-major: ldmatrix.trans. Matrices of one x4: keys 16kk+0..7 / 16kk+8..15
    // of dim chunk 2np, then the same of chunk 2np + 1 -> b of dim n-tiles 2np and 2np + 1.
    if constexpr (MODE != ATTN_WG_SPV) {
        #pragma unroll
        for (int kk = 0; kk < 4; ++kk) {
            u32 pa[4];
            pa[0] = pack_bf16x2_rn(s[2 * kk][0], s[2 * kk][1]);
            pa[1] = pack_bf16x2_rn(s[2 * kk][2], s[2 * kk][3]);
            pa[2] = pack_bf16x2_rn(s[2 * kk + 1][0], s[2 * kk + 1][1]);
            pa[3] = pack_bf16x2_rn(s[2 * kk + 1][2], s[2 * kk + 1][3]);
            #pragma unroll
            for (int np = 0; np < 4; ++np) {
                u32 vb[4];
                ldmatrix_x4_trans(vb, sV + swz(16 * kk + (lane & 15), 2 * np + (lane >> 4)));
                mma_bf16_16816(o[2 * np], pa, vb);
                mma_bf16_16816(o[2 * np + 1], pa, vb + 2);
            }
        }
    } else {
#if GPTOSS_HAS_WGMMA
        // k-step kk: A = P keys 16kk..16kk+15 (as above), B = V rows 16kk.. (two 1 KB atoms from byte 2048 kk)
        u32 pa[4][4];
        #pragma unroll
        for (int kk = 0; kk < 4; ++kk) {
            pa[kk][0] = pack_bf16x2_rn(s[2 * kk][0], s[2 * kk][1]);
            pa[kk][1] = pack_bf16x2_rn(s[2 * kk][2], s[2 * kk][3]);
            pa[kk][2] = pack_bf16x2_rn(s[2 * kk + 1][0], s[2 * kk + 1][1]);
            pa[kk][3] = pack_bf16x2_rn(s[2 * kk + 1][2], s[2 * kk + 1][3]);
        }
        const u32 v_addr = smem_u32(sV);
        wgmma_fence();
        #pragma unroll
        for (int kk = 0; kk < 4; ++kk) wgmma_bf16_rs_n64_tb(&o[0][0], pa[kk], wgmma_desc_sw128(v_addr + 2048 * kk));
        wgmma_commit();
        wgmma_wait<0>();
        #pragma unroll
        for (int nt = 0; nt < 8; ++nt) {
            #pragma unroll
            for (int e = 0; e < 4; ++e) reg_fence(o[nt][e]);
        }
#endif
    }
}

// cp.async a warp's 16 Q rows into sQ ([16][64], swizzled); row r is token row tok(r), head head(r), or
// zeros where valid(r) is false. Lane handles rows lane / 8 + 4 i, chunk lane % 8.
template <typename RowFn>
DEVICE void load_q_rows(bf16_t* sQ, const bf16_t* __restrict__ q, int Hq, int lane, RowFn row_of) {
    #pragma unroll
    for (int i = 0; i < 4; ++i) {
        const int r = (lane >> 3) + 4 * i, ch = lane & 7;
        long long tok;
        int head;
        const bool valid = row_of(r, tok, head);
        const bf16_t* src = valid ? q + (tok * Hq + head) * 64 + ch * 8 : q;
        cp_async_16(sQ + swz(r, ch), src, valid ? 16 : 0);
    }
}

// End of a segment in the prefill kernel: fold the warp's segment state (m, l = this thread's partial
// sums, o) into the running state, then reset the segment state. The running state lives in shared
// memory, this thread's own slots at run[32 i]: i = 0..31 ACC in fragment order (o[nt][e] -> 4 nt + e),
// 32 + r = M of row r, 34 + r = L of row r (rows g, g + 8). Only the owning thread touches them.
DEVICE void fold_segment(float* run, float m[2], float l[2], float o[8][4]) {
    float ca[2], cb[2];
    #pragma unroll
    for (int r = 0; r < 2; ++r) {
        float Mn;
        merge_coeffs(run[32 * (32 + r)], m[r], Mn, ca[r], cb[r]);
        run[32 * (34 + r)] = merge_value(run[32 * (34 + r)], quad_sum(l[r]), ca[r], cb[r]);
        run[32 * (32 + r)] = Mn;
        m[r] = NEG_INF_F;
        l[r] = 0.0f;
    }
    #pragma unroll
    for (int nt = 0; nt < 8; ++nt) {
        #pragma unroll
        for (int e = 0; e < 4; ++e) {
            float* x = run + 32 * (nt * 4 + e);
            *x = merge_value(*x, o[nt][e], ca[e >> 1], cb[e >> 1]);
            o[nt][e] = 0.0f;
        }
    }
}

// Prefill: CTA = 16 queries of one sequence (block table entry: sequence, first query index in it) x
// the G heads of kv head blockIdx.y; warp w holds rows 16w..16w+15, row r = (query 16w/G + r / G,
// head r % G). K/V tiles flow through a STAGES-deep cp.async ring shared by all warps; a warp skips the
// tiles its rows cannot see. The running state (M, L, ACC) of the rows lives in shared memory
// (see fold_segment); the segment state in registers.
// KV: bf16_t, or u8 for an fp8 cache (a tile is staged, then converted into sConv by all threads).
template <int G, int STAGES, typename KV, int MODE>
DEVICE void attn_prefill_body(
    const bf16_t* __restrict__ q, const KV* __restrict__ kc, const KV* __restrict__ vc,
    const float* __restrict__ sinks, const int* __restrict__ cu_q, const int* __restrict__ seq_slot,
    const int* __restrict__ seq_start, const int* __restrict__ blocks, bf16_t* __restrict__ out,
    int Hq, int Hkv, int L, int window, float scale_log2, const int* __restrict__ page_table, int table_w)
{
    constexpr int QPW = 16 / G;  // queries per warp
    // the rows that decide together whether a tile is computed: a warp, or (wgmma) its warpgroup of 4
    constexpr int QPG = MODE == ATTN_MMA_SYNC ? QPW : 4 * QPW;
    constexpr bool FP8 = sizeof(KV) == 1;
    constexpr int STAGE = KV_STAGE_ELEMS(KV);
    extern __shared__ __align__(16) unsigned char smem_raw[];
#if GPTOSS_HAS_WGMMA
    // wgmma reads the K/V tiles through descriptors: 1 KB-aligned swizzle atoms (the launch adds the slack)
    bf16_t* sKV = (bf16_t*)(MODE == ATTN_MMA_SYNC ? smem_raw : align_1k(smem_raw));  // [STAGES][K|V][64*64] KV
#else
    bf16_t* sKV = (bf16_t*)smem_raw;                                // [STAGES][K|V][64*64] KV
#endif
    bf16_t* sConv = sKV + STAGES * STAGE;                           // fp8: the converted [K|V][64*64] bf16
    bf16_t* sQ = sConv + (FP8 ? 2 * ATTN_TILE * 64 : 0);            // [G warps][16*64]
    float* sRun = (float*)(sQ + G * 16 * 64);                       // [G warps][36][32]: running state

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3;
    const int kvh = blockIdx.y;
    const int s = blocks[2 * blockIdx.x], qi0 = blocks[2 * blockIdx.x + 1];
    const int tok0 = cu_q[s] + qi0;
    const int nq = min(ATTN_BLOCK_Q, cu_q[s + 1] - cu_q[s] - qi0);
    const int p0 = seq_start[s] + qi0;  // position of the block's first query
    const int slot = seq_slot[s];
    const KV* kp = cache_chunk(kc, kvh, tid);
    const KV* vp = cache_chunk(vc, kvh, tid);
    const int hi = p0 + nq - 1, lo = window > 0 ? max(0, p0 - window + 1) : 0;  // keys the CTA may need

    // this thread's two rows and this warp's query range
    const int qa = warp * QPW + g / G, qb = warp * QPW + (g + 8) / G;
    const int ha = kvh * G + g % G, hb = kvh * G + (g + 8) % G;
    const bool va = qa < nq, vb = qb < nq;
    const int wfirst = warp * QPW, wlast = min(wfirst + QPW, nq) - 1;
    const bool active = wfirst < nq;
    const int w_hi = p0 + wlast;
    // the tiles computed: those some row of the warp (wgmma: of the warpgroup) can see; a row computing a
    // tile it cannot see masks all of it, which leaves its state bit-identical
    const int gfirst = (warp * QPW / QPG) * QPG, glast = min(gfirst + QPG, nq) - 1;
    const bool g_active = gfirst < nq;
    const int g_hi = p0 + glast, g_lo = window > 0 ? max(0, p0 + gfirst - window + 1) : 0;

    bf16_t* wQ = sQ + warp * 16 * 64;
    load_q_rows(wQ, q, Hq, lane, [&](int r, long long& tok, int& head) {
        const int qi = warp * QPW + r / G;
        tok = tok0 + qi;
        head = kvh * G + r % G;
        return qi < nq;
    });  // lands with the first K/V tile's group

    float* run = sRun + warp * 36 * 32 + lane;  // running state (M, L, ACC) = (sink, 1, 0), see fold_segment
    #pragma unroll
    for (int i = 0; i < 32; ++i) run[32 * i] = 0.0f;
    run[32 * 32] = va ? __fmul_rn(sinks[ha], ATTN_LOG2E) : 0.0f;
    run[32 * 33] = vb ? __fmul_rn(sinks[hb], ATTN_LOG2E) : 0.0f;
    run[32 * 34] = run[32 * 35] = 1.0f;

    float m[2] = {NEG_INF_F, NEG_INF_F}, l[2] = {0.0f, 0.0f}, o[8][4];
    #pragma unroll
    for (int nt = 0; nt < 8; ++nt) o[nt][0] = o[nt][1] = o[nt][2] = o[nt][3] = 0.0f;

    const int tile_lo = lo / ATTN_TILE, ntiles = hi / ATTN_TILE - tile_lo + 1;
    #pragma unroll
    for (int st = 0; st < STAGES - 1; ++st) {
        if (st < ntiles) {
            const int tile = tile_lo + st;
            load_stage<32 * G>(sKV + st * STAGE, kp, vp, Hkv * 64, L,
                               block_row0(page_table, table_w, slot, L, tile * ATTN_TILE), tile, lo, hi, tid);
        }
        cp_async_commit();
    }
    for (int i = 0; i < ntiles; ++i) {
        cp_async_wait<STAGES - 2>();
        __syncthreads();  // tile i visible to all; everyone is done with the buffer refilled below
        {
            const int nxt = i + STAGES - 1;
            if (nxt < ntiles) {
                const int tile = tile_lo + nxt;
                load_stage<32 * G>(sKV + (nxt % STAGES) * (FP8 ? STAGE : 2 * ATTN_TILE * 64), kp, vp, Hkv * 64, L,
                                   block_row0(page_table, table_w, slot, L, tile * ATTN_TILE), tile, lo, hi, tid);
            }
            cp_async_commit();
        }
        if constexpr (FP8) {  // every thread converts its share (the stage refilled above is another one)
            convert_stage<32 * G>(sKV + (i % STAGES) * STAGE, sConv, tid);
            __syncthreads();  // the converted tile visible to all (the next iteration's sync guards its reuse)
        }
        if (!g_active) continue;
        const int key0 = (tile_lo + i) * ATTN_TILE;
        // a new segment starts: fold the finished one (the identity if this warp's rows saw none of it)
        if (i > 0 && key0 % ATTN_SEG == 0) fold_segment(run, m, l, o);
        if (key0 <= g_hi && key0 + ATTN_TILE - 1 >= g_lo) {
            // some row of this warp cannot see some key of the tile (all of them when the warp has no row
            // that sees the tile, or no valid row at all)
            const bool need_mask = !active || key0 + ATTN_TILE - 1 > p0 + wfirst ||
                                   (window > 0 && key0 < w_hi - window + 1);
            const bf16_t* buf = FP8 ? sConv : sKV + (i % STAGES) * 2 * ATTN_TILE * 64;  // (bf16: STAGE)
            attend_tile<MODE>(wQ, buf, buf + ATTN_TILE * 64, key0, p0 + qa, p0 + qb, window, need_mask,
                              scale_log2, m, l, o, lane);
        }
    }
    cp_async_wait<0>();
    if (!active) return;
    fold_segment(run, m, l, o);  // the last segment; then out = ACC / L
    const float La = run[32 * 34], Lb = run[32 * 35];
    u32* out32 = (u32*)out;
    const long long ra = ((long long)(tok0 + qa) * Hq + ha) * 32, rb = ((long long)(tok0 + qb) * Hq + hb) * 32;
    #pragma unroll
    for (int nt = 0; nt < 8; ++nt) {
        const float* x = run + 32 * (nt * 4);
        if (va) out32[ra + 4 * nt + t] = pack_bf16x2_rn(__fdiv_rn(x[0], La), __fdiv_rn(x[32], La));
        if (vb) out32[rb + 4 * nt + t] = pack_bf16x2_rn(__fdiv_rn(x[64], Lb), __fdiv_rn(x[96], Lb));
    }
}

// Decode: one warp = the G heads of kv head blockIdx.x for the one query of sequence dec_seqs[blockIdx.y],
// over segment (first segment of its visible keys) + blockIdx.z; the segment's (at most 4) tiles flow
// through a ring of STAGES buffers. Rows g < G are heads; the other rows are empty. Writes (m, l) and the
// unnormalised o of each head to the workspace: part_ml [SD, nsplit, Hq, 2], part_acc [SD, nsplit, Hq, 64].
// KV: bf16_t, or u8 for an fp8 cache (each tile staged, then converted into sConv before attend_tile).
template <int G, int STAGES, typename KV>
DEVICE void attn_decode_body(
    const bf16_t* __restrict__ q, const KV* __restrict__ kc, const KV* __restrict__ vc,
    const int* __restrict__ cu_q, const int* __restrict__ seq_slot, const int* __restrict__ seq_start,
    const int* __restrict__ dec_seqs, float* __restrict__ part_acc, float* __restrict__ part_ml, int Hq,
    int Hkv, int L, int window, int nsplit, float scale_log2, const int* __restrict__ page_table, int table_w)
{
    constexpr int NT = ATTN_SEG / ATTN_TILE;
    static_assert(STAGES >= 2 && STAGES <= NT, "a ring of 2..NT tile buffers");
    constexpr bool FP8 = sizeof(KV) == 1;
    constexpr int STAGE = KV_STAGE_ELEMS(KV);
    extern __shared__ __align__(16) unsigned char smem_raw[];
    bf16_t* sKV = (bf16_t*)smem_raw;                                 // [STAGES][K|V][64*64] KV
    bf16_t* sConv = sKV + STAGES * STAGE;                            // fp8: the converted [K|V][64*64] bf16
    bf16_t* sQ = sConv + (FP8 ? 2 * ATTN_TILE * 64 : 0);             // [16*64]
    const int lane = threadIdx.x, g = lane >> 2, t = lane & 3;
    const int kvh = blockIdx.x, d = blockIdx.y, z = blockIdx.z, s = dec_seqs[d];
    const int p = seq_start[s], tok = cu_q[s];
    const int lo = window > 0 ? max(0, p - window + 1) : 0;
    const int seg = lo / ATTN_SEG + z;
    const int k_first = max(lo, seg * ATTN_SEG);
    if (k_first > p) return;  // this split lies past the query: no partial, combine stops before it
    const int k_last = min(p, seg * ATTN_SEG + ATTN_SEG - 1);
    const int tile0 = k_first / ATTN_TILE, ntiles = k_last / ATTN_TILE - tile0 + 1;
    const int slot = seq_slot[s];
    const KV* kp = cache_chunk(kc, kvh, lane);
    const KV* vp = cache_chunk(vc, kvh, lane);
    long long row0[NT];  // first cache row of each tile's block: independent loads, all issued up front
    #pragma unroll
    for (int i = 0; i < NT; ++i)
        row0[i] = i < ntiles ? block_row0(page_table, table_w, slot, L, (tile0 + i) * ATTN_TILE) : 0;
    load_q_rows(sQ, q, Hq, lane, [&](int r, long long& qt, int& head) {
        qt = tok;
        head = kvh * G + r;
        return r < G;
    });  // lands with the first tile's group
    // The segment's tiles flow through a ring of STAGES buffers: one commit group per tile (empty past
    // the segment's last tile), so group i is tile i and the wait below is the same at every step.
    #pragma unroll
    for (int i = 0; i < STAGES; ++i) {
        if (i < ntiles) load_stage<32>(sKV + i * STAGE, kp, vp, Hkv * 64, L, row0[i], tile0 + i, lo, p, lane);
        cp_async_commit();
    }
    const int ha = kvh * G + g, hb = kvh * G + g + 8;
    const bool va = g < G, vb = g + 8 < G;

    float m[2] = {NEG_INF_F, NEG_INF_F}, l[2] = {0.0f, 0.0f}, o[8][4];
    #pragma unroll
    for (int nt = 0; nt < 8; ++nt) o[nt][0] = o[nt][1] = o[nt][2] = o[nt][3] = 0.0f;
    #pragma unroll
    for (int i = 0; i < NT; ++i) {
        if (i < ntiles) {
            cp_async_wait<STAGES - 1>();  // groups 0..i landed (STAGES + i committed so far)
            __syncthreads();
            const int key0 = (tile0 + i) * ATTN_TILE;
            const bool need_mask = key0 + ATTN_TILE - 1 > p || (window > 0 && key0 < p - window + 1);
            bf16_t* buf = sKV + (i % STAGES) * STAGE;
            if constexpr (FP8) {
                convert_stage<32>(buf, sConv, lane);
                __syncthreads();  // converted; the stage is free to refill now, before the math
                if (STAGES < NT && i + STAGES < ntiles)
                    load_stage<32>(buf, kp, vp, Hkv * 64, L, row0[min(i + STAGES, NT - 1)], tile0 + i + STAGES,
                                   lo, p, lane);
                attend_tile<ATTN_MMA_SYNC>(sQ, sConv, sConv + ATTN_TILE * 64, key0, p, p, window, need_mask, scale_log2, m, l, o,
                            lane);
            } else {
                attend_tile<ATTN_MMA_SYNC>(sQ, buf, buf + ATTN_TILE * 64, key0, p, p, window, need_mask, scale_log2, m, l, o, lane);
                if (STAGES < NT) {
                    __syncthreads();  // every lane is done with the buffer before it is refilled
                    if (i + STAGES < ntiles)
                        load_kv_tile<32>(buf, buf + ATTN_TILE * 64, kp, vp, Hkv * 64, L,
                                         row0[min(i + STAGES, NT - 1)], tile0 + i + STAGES, lo, p, lane);
                }
            }
        }
        if (STAGES < NT) cp_async_commit();
    }
    cp_async_wait<0>();
    const float la = quad_sum(l[0]), lb = quad_sum(l[1]);
    const long long prow = ((long long)d * nsplit + z) * Hq;  // partial row of head 0
    if (va) {
        float* pa = part_acc + (prow + ha) * 64 + 2 * t;
        #pragma unroll
        for (int nt = 0; nt < 8; ++nt) *(float2*)(pa + 8 * nt) = make_float2(o[nt][0], o[nt][1]);
        if (t == 0) *(float2*)(part_ml + (prow + ha) * 2) = make_float2(m[0], la);
    }
    if (vb) {
        float* pb = part_acc + (prow + hb) * 64 + 2 * t;
        #pragma unroll
        for (int nt = 0; nt < 8; ++nt) *(float2*)(pb + 8 * nt) = make_float2(o[nt][2], o[nt][3]);
        if (t == 0) *(float2*)(part_ml + (prow + hb) * 2) = make_float2(m[1], lb);
    }
}

#endif  // GPTOSS_HAS_MMA

// The tensor-core kernels are declared for every target (host compilation passes need the symbols);
// without GPTOSS_HAS_MMA their bodies are empty and gptoss/ops/attention.py launches attn_simple instead.
#define ATTN_PREFILL_ARGS(KV)                                                                              \
    const bf16_t* __restrict__ q, const KV* __restrict__ kc, const KV* __restrict__ vc,                   \
        const float* __restrict__ sinks, const int* __restrict__ cu_q, const int* __restrict__ seq_slot,  \
        const int* __restrict__ seq_start, const int* __restrict__ blocks, bf16_t* __restrict__ out,      \
        int Hq, int Hkv, int L, int window, float scale_log2, const int* __restrict__ page_table, int table_w
#define ATTN_PREFILL_CALL \
    q, kc, vc, sinks, cu_q, seq_slot, seq_start, blocks, out, Hq, Hkv, L, window, scale_log2, page_table, table_w
#define ATTN_DECODE_ARGS(KV)                                                                               \
    const bf16_t* __restrict__ q, const KV* __restrict__ kc, const KV* __restrict__ vc,                   \
        const int* __restrict__ cu_q, const int* __restrict__ seq_slot, const int* __restrict__ seq_start, \
        const int* __restrict__ dec_seqs, float* __restrict__ part_acc, float* __restrict__ part_ml,     \
        int Hq, int Hkv, int L, int window, int nsplit, float scale_log2, const int* __restrict__ page_table,  \
        int table_w
#define ATTN_DECODE_CALL                                                                                   \
    q, kc, vc, cu_q, seq_slot, seq_start, dec_seqs, part_acc, part_ml, Hq, Hkv, L, window, nsplit, scale_log2, \
        page_table, table_w

// Dynamic shared memory: prefill ATTN_PREFILL_STAGES x 16 KB of K/V + G x (2 KB of Q + 4.5 KB of running
// state); decode STAGES x 16 KB of K/V + 2 KB of Q. The fp8 kernels' stages are 8 KB, plus one 16 KB
// converted bf16 tile; the wgmma prefill kernels take WGMMA_SMEM_ALIGN more. (gptoss/ops/attention.py
// computes the same sizes.) Every kernel starts with the prior-grid wait (docs/notes/launch.md).
#if GPTOSS_HAS_MMA
#define ATTN_PREFILL_KERNEL(NAME, G, BOUNDS, KV, MODE)                                                   \
    extern "C" __global__ void __launch_bounds__(32 * G, BOUNDS) NAME(ATTN_PREFILL_ARGS(KV)) {         \
        GPTOSS_WAIT_PRIOR_GRID();                                                                       \
        GPTOSS_LAUNCH_DEPENDENTS();                                                                     \
        attn_prefill_body<G, ATTN_PREFILL_STAGES, KV, MODE>(ATTN_PREFILL_CALL);                         \
    }
#else
#define ATTN_PREFILL_KERNEL(NAME, G, BOUNDS, KV, MODE)                                                   \
    extern "C" __global__ void NAME(ATTN_PREFILL_ARGS(KV)) { GPTOSS_WAIT_PRIOR_GRID(); GPTOSS_LAUNCH_DEPENDENTS(); }
#endif
ATTN_PREFILL_KERNEL(attn_prefill_g8, 8, 2, bf16_t, ATTN_MMA_SYNC)
ATTN_PREFILL_KERNEL(attn_prefill_g4, 4, 4, bf16_t, ATTN_MMA_SYNC)
ATTN_PREFILL_KERNEL(attn_prefill_g8_fp8, 8, 2, u8, ATTN_MMA_SYNC)
ATTN_PREFILL_KERNEL(attn_prefill_g4_fp8, 4, 4, u8, ATTN_MMA_SYNC)
// sm_90a (H100/H200): the G = 8 bf16 CTA with its products on wgmma (two warpgroups of 64 rows): Q K^T
// only, or Q K^T and P V (gptoss/ops/attention.py: PREFILL_WGMMA_KERNEL).
#if GPTOSS_HAS_WGMMA
#define ATTN_PREFILL_WG_KERNEL(NAME, MODE) ATTN_PREFILL_KERNEL(NAME, 8, 2, bf16_t, MODE)
#else
#define ATTN_PREFILL_WG_KERNEL(NAME, MODE)                                                               \
    extern "C" __global__ void NAME(ATTN_PREFILL_ARGS(bf16_t)) { GPTOSS_WAIT_PRIOR_GRID(); GPTOSS_LAUNCH_DEPENDENTS(); }
#endif
ATTN_PREFILL_WG_KERNEL(attn_prefill_wgs_g8, ATTN_WG_S)
ATTN_PREFILL_WG_KERNEL(attn_prefill_wg_g8, ATTN_WG_SPV)
// The decode variants, one line each (gptoss/ops/attention.py reads G and STAGES from these lines).
#if GPTOSS_HAS_MMA
#define ATTN_DECODE_KERNEL(NAME, G, STAGES)                                                              \
    extern "C" __global__ void __launch_bounds__(32) NAME(ATTN_DECODE_ARGS(bf16_t)) {                   \
        GPTOSS_WAIT_PRIOR_GRID();                                                                       \
        GPTOSS_LAUNCH_DEPENDENTS();                                                                     \
        attn_decode_body<G, STAGES, bf16_t>(ATTN_DECODE_CALL);                                          \
    }
#define ATTN_DECODE_FP8_KERNEL(NAME, G, STAGES)                                                          \
    extern "C" __global__ void __launch_bounds__(32) NAME(ATTN_DECODE_ARGS(u8)) {                       \
        GPTOSS_WAIT_PRIOR_GRID();                                                                       \
        GPTOSS_LAUNCH_DEPENDENTS();                                                                     \
        attn_decode_body<G, STAGES, u8>(ATTN_DECODE_CALL);                                              \
    }
#else
#define ATTN_DECODE_KERNEL(NAME, G, STAGES)                                                              \
    extern "C" __global__ void NAME(ATTN_DECODE_ARGS(bf16_t)) { GPTOSS_WAIT_PRIOR_GRID(); GPTOSS_LAUNCH_DEPENDENTS(); }
#define ATTN_DECODE_FP8_KERNEL(NAME, G, STAGES)                                                          \
    extern "C" __global__ void NAME(ATTN_DECODE_ARGS(u8)) { GPTOSS_WAIT_PRIOR_GRID(); GPTOSS_LAUNCH_DEPENDENTS(); }
#endif
// G = 8 (gpt-oss) with a 2-tile ring: 34 KB of shared memory, 6 CTAs (warps) per SM instead of 3 with
// the whole segment in flight; the kernel is latency-bound (one warp per CTA), so more warps won: 1.7x
// faster at batch 1024 x 1024 cached tokens on an H200 (bench_decode.py). The fp8 variants keep the same
// ring (2 x 8 KB + the 16 KB converted tile: 34 KB again).
ATTN_DECODE_KERNEL(attn_decode_g8, 8, 2)
ATTN_DECODE_KERNEL(attn_decode_g4, 4, 4)
ATTN_DECODE_FP8_KERNEL(attn_decode_g8_fp8, 8, 2)
ATTN_DECODE_FP8_KERNEL(attn_decode_g4_fp8, 4, 4)

// Fold the decode partials of each (sequence, head) in segment order, starting from the sink, and
// write out = ACC / L. One thread per (decode sequence, head, pair of dims).
extern "C" __global__ void __launch_bounds__(256) attn_decode_combine(
    const float* __restrict__ part_acc, const float* __restrict__ part_ml, const float* __restrict__ sinks,
    const int* __restrict__ cu_q, const int* __restrict__ seq_start, const int* __restrict__ dec_seqs,
    bf16_t* __restrict__ out, int SD, int Hq, int window, int nsplit)
{
    GPTOSS_WAIT_PRIOR_GRID();
    GPTOSS_LAUNCH_DEPENDENTS();
#if GPTOSS_HAS_MMA
    const int idx = blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= SD * Hq * 32) return;
    const int dp = idx & 31, head = (idx >> 5) % Hq, d = (idx >> 5) / Hq, s = dec_seqs[d];
    const int p = seq_start[s];
    const int lo = window > 0 ? max(0, p - window + 1) : 0;
    const int nseg = p / ATTN_SEG - lo / ATTN_SEG + 1;
    float M = __fmul_rn(sinks[head], ATTN_LOG2E), L = 1.0f, x0 = 0.0f, x1 = 0.0f;
    for (int z = 0; z < nseg; ++z) {
        const long long r = ((long long)d * nsplit + z) * Hq + head;
        const float2 ml = *(const float2*)(part_ml + 2 * r);
        const float2 a = *(const float2*)(part_acc + r * 64 + 2 * dp);
        float Mn, ca, cb;
        merge_coeffs(M, ml.x, Mn, ca, cb);
        L = merge_value(L, ml.y, ca, cb);
        x0 = merge_value(x0, a.x, ca, cb);
        x1 = merge_value(x1, a.y, ca, cb);
        M = Mn;
    }
    ((u32*)out)[((long long)cu_q[s] * Hq + head) * 32 + dp] = pack_bf16x2_rn(__fdiv_rn(x0, L), __fdiv_rn(x1, L));
#endif
}
