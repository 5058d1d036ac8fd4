// Grouped expert GEMMs of the MoE block (router, dispatch and combine are in routing.hip).
//
//   mlp1: y[r]        = swiglu(t[slot_r / k] . W1_e^T + b1_e)     r = sorted row, e its expert  [S, I] bf16
//   mlp2: out[slot_r] = (y[r] . W2_e^T + b2_e) * route_w[slot_r]                                [S, H] f32
//
// On sm_90a (H100/H200) the MXFP4 variants run on wgmma instead (MOE_WG_KERNEL, issue_stage_wg): the
// same tiles, loads and epilogues, warpgroups of 64 columns (docs/notes/moe.md, "wgmma kernels"); mlp2's
// 128-row kernel takes its token rows by TMA (MoeCta::TMA_A). Their wgmmas multiply only the tile's rows
// rounded up to a quarter of BM (MoeCta::tile_width, m64nNk16 with N = BM/4 .. BM).
//
// Tiles. A CTA computes BM consecutive sorted rows ("tokens", all of one expert e, from the tile
// schedule made by moe_dispatch) x BN output columns of e. Grid = (ceil(N / BN), tile bound); the CTAs
// whose tile lies past the last real one read expert -1 and exit. Warp w owns output columns
// [16*MW*w, 16*MW*(w + 1)) of the tile for all BM rows. K goes through a cp.async pipeline of STAGES buffers of
// BK = 32*KSUB. No split-K: every output is one thread's fp32 accumulation over k16 steps in increasing
// k, the same in every variant and for any T (batch invariance).
//
// Transposed mma. Each mma.sync m16n8k16 computes a piece of C^T = W . A^T: its 16 "rows" are weight
// rows (output columns) and its 8 "columns" token rows, so the weights are the mma A operand and the
// tokens the B operand. The A operand is a register quad that mixes two rows (g and g + 8): the weights
// are made in registers by the MXFP4 dequantization anyway, so they land in the quad for free, while a
// token row read by one 16-byte load holds its B register pairs side by side. Inside warp tile j
// (16 columns), mma row g is output column 16j + 2g and row g + 8 is column 16j + 2g + 1: a thread's
// accumulators c[h] and c[2 + h] are then columns (2u, 2u + 1) of token row 2t + h: for mlp1 the
// (gate, linear) pair of unit u (SwiGLU right in the epilogue), for mlp2 two adjacent floats.
//
// MXFP4 path: K order inside a 32-block. One byte holds the k pair (2q, 2q + 1), i.e. one bf16x2
// register of a fragment. A k16 step may take any 16 of the block's k as long as both operands agree,
// so lane t of step s takes the physical pairs q = 4t + 2s + r (r = 0: a[0]/a[1] and b[0]; r = 1:
// a[2]/a[3] and b[1]). Then lane (g, t) needs bytes 4t..4t+3 of a weight row's 16-byte block (ONE
// 32-bit load: byte 2s + r -> step s, register r) and elements 8t..8t+7 of a token row (one 16-byte
// load: word 2s + r). Step s covers pairs {4t + 2s, 4t + 2s + 1 : t = 0..3}; s = 0, 1 cover the block.
// bf16 path: the usual k order, both operands through ldmatrix.x4 (a different but equally fixed order).
//
// Shared memory per stage (bank-conflict-free reads):
//   tokens, MXFP4 path: [BM][BK] bf16, 16-byte chunk ch of row r at ch ^ 4*(r & 1): a 16-byte load
//                 serves 8 lanes per phase = rows (2p, 2p+1) x 4 chunks; the odd row goes to the other
//                 half of the 128 bytes: 8 different bank groups.
//   tokens, bf16: [BM][BK], chunk ch ^ (r & 7) (ldmatrix: 8 rows of one matrix in 8 bank groups).
//   weights, MXFP4: [KSUB][BN][16 bytes], row n at position (n & ~15) | (n & 1) << 3 | (n >> 1) & 7
//                 (even columns first): mma rows g and g + 8 read 8 consecutive 16-byte blocks each.
//   weights, bf16: [BN][BK], chunk ch ^ ((n >> 1) & 7): rows 16j + 2i + c, i = 0..7, of one ldmatrix
//                 matrix fall in 8 bank groups.
//   scales:       the tile's rows of the scale matrix over all of K ([BN][K/32] bytes, contiguous in
//                 global memory), copied once at the start in aligned 16-byte pieces.
//
// MXFP4 -> bf16 in registers, 4 bytes (8 codes) at a time, lo nibble = even k:
//   x = [lo nibble, 0, hi nibble, 0] (prmt); placed = (x * 0x1040) & 0x81C081C0 puts each nibble's
//   magnitude bits (e1 e0 m) at bf16 bits 6..8 and its sign at bit 15 (both halves): as a bf16 that is
//   exactly E2M1 * 2^-126 (code 1 = 0.5 is a subnormal). One bf16x2 FMA by 2^(s - 1) (adding -0) gives
//   E2M1 * 2^(s - 127) exactly. 2^(s - 1) is a bf16 for s <= 128; a CTA whose scales include s > 128
//   (a block max above 12: never seen in checkpoints) runs the BIG path, which multiplies by
//   2^(min(s,128) - 1) and then by 2^(s - 128): the same exact values, so paths agree bit for bit.
//
// The wgmma order (the blocks the wgmma and m16_std kernels read; moe_wg_order makes it at load):
// their lane t needs bytes t, t+4, t+8, t+12 of a row's block (q = 0..3). Word t of the block is
// replaced by W, the four placed words of those bytes spread over one word:
//   placed[0] = W & M,  placed[1] = rotr(W, 4) & M,  placed[2] = rotr(W, 10) & M,
//   placed[3] = (rotr(W, 6) & 0x81808180) | (rotr(W, 14) & 0x00400040),      M = 0x81C081C0.
// The four sets of bit positions these read are disjoint and cover the word, so W exists and is unique.
// A lane then reads one 32-bit word per row and block, and places its 8 codes with 4 funnel shifts and
// 5 LOP3, against 3 prmt to gather the bytes and 15 instructions to place their nibbles.
#include "common.h"
#include "mma.h"

// Measurement only (benchmarks/kernel_moe.py --ablate N): the wgmma kernels with one part of the work
// removed, to see what bounds them. 1: no dequantization arithmetic, 2: no wgmma, 3: no loads after
// the prologue. Results are wrong for N > 0.
#ifndef MOE_ABLATE
#define MOE_ABLATE 0
#endif

struct TensorMap;  // mma.h (sm_90a builds): the TMA tensor map the mbarrier-ring wgmma kernels take

// All launches pass the same arguments (ops/moe.py builds them once).
struct MoeParams {
    const bf16_t* a;         // mlp1: t [T, K]; mlp2: y [S, K] in sorted order
    const u8* wq;            // MXFP4 blocks [E, N, K/32, 16]
    const u8* ws;            // MXFP4 scales [E, N, K/32]
    const bf16_t* wb;        // bf16 weights [E, N, K]
    const bf16_t* bias;      // [E, N]
    const int* offsets;      // [E + 1] sorted rows of each expert
    const int* slots;        // [S] slot (t*k + j) of each sorted row
    const int* tiles;        // [tiles, 2] (expert or -1, first sorted row)
    const float* rw;         // mlp2: routing weight of each slot [S]
    bf16_t* y;               // mlp1 output [S, N / 2]
    float* out;              // mlp2 output [S, N], row = slot
    int N, K, topk, S, E;
    long long scales_bytes;  // size of ws: the 16-byte scale copies never read past it
    float limit, alpha;
    const TensorMap* amap;   // wgmma kernels: the tensor map of a (read by mlp2's 128-row kernel, TMA_A)
    const TensorMap* wmap;   // dense kernels: the tensor map of wb as [E * N, K] (MoeCfg::TMA_W)
};

#define MOE_ARGS                                                                                      \
    const bf16_t *a, const u8 *wq, const u8 *ws, const bf16_t *wb, const bf16_t *bias,                \
    const int *offsets, const int *slots, const int *tiles, const float *rw, bf16_t *y, float *out,  \
    int N, int K, int topk, int S, int E, long long scales_bytes, float limit, float alpha
#define MOE_PARAMS {a, wq, ws, wb, bias, offsets, slots, tiles, rw, y, out, N, K, topk, S, E, \
                    scales_bytes, limit, alpha, nullptr, nullptr}

// gate = min(gate, limit), lin = clamp(lin, -limit, limit), gate * sigmoid(alpha * gate) * (lin + 1).
// Explicit _rn operations: no contraction, so every variant compiles the same arithmetic.
DEVICE float moe_swiglu(float gate, float lin, float limit, float alpha) {
    gate = fminf(gate, limit);
    lin = fminf(fmaxf(lin, -limit), limit);
    const float sig = __frcp_rn(__fadd_rn(1.0f, __expf(__fmul_rn(-alpha, gate))));
    return __fmul_rn(__fmul_rn(gate, sig), __fadd_rn(lin, 1.0f));
}

#if GPTOSS_HAS_MMA

DEVICE u32 prmt_b32(u32 a, u32 b, u32 sel) {
    u32 d;
    asm("prmt.b32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(sel));
    return d;
}

DEVICE u32 fma_bf16x2(u32 a, u32 b, u32 c) {
    u32 d;
    asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
    return d;
}

// bf16x2 multipliers for scale byte s: m1 = 2^(min(s, 128) - 1), m2 = 2^(max(s, 128) - 128)
// (m1 * m2 = 2^(s - 1); m2 = 1 for s <= 128). Both are finite for every byte value.
DEVICE u32 scale_m1(u32 s) { return (min(s, 128u) + 126u) * 0x00800080u; }
DEVICE u32 scale_m2(u32 s) { return (max(s, 128u) - 1u) * 0x00800080u; }

// A placed word (two E2M1 codes at their bf16 bit positions) times the scale multipliers, as bf16x2
template <bool BIG>
DEVICE u32 scale_placed(u32 placed, u32 m1, u32 m2) {
    u32 v = fma_bf16x2(placed, m1, 0x80008000u);
    if (BIG) v = fma_bf16x2(v, m2, 0x80008000u);
    return v;
}

// 4 packed bytes (8 E2M1 codes) -> 4 bf16x2: out[q] = (lo nibble, hi nibble of byte q) * 2^(s - 127).
template <bool BIG>
DEVICE void fp4x8_to_bf16x2(u32 w, u32 m1, u32 m2, u32 out[4]) {
    const u32 lo = w & 0x0F0F0F0Fu, hi = (w >> 4) & 0x0F0F0F0Fu;
    #pragma unroll
    for (int q = 0; q < 4; ++q) {
        // bytes [lo_q, 0, hi_q, 0]: selector nibbles q, 8|q, 4+q, 8|(4+q); bit 3 replicates the top bit
        // of a lo/hi byte, which is 0, giving a zero byte
        const u32 sel = q | ((8 | q) << 4) | ((4 + q) << 8) | ((12 + q) << 12);
        const u32 x = prmt_b32(lo, hi, sel);
        const u32 placed = (x * 0x1040u) & 0x81C081C0u;  // (x << 6) | (x << 12): disjoint bits
        out[q] = scale_placed<BIG>(placed, m1, m2);
    }
}

// The same 8 codes from a word W of the wgmma order (moe_wg_order, below): out[q] as fp4x8_to_bf16x2
// gives it for byte q of the word W was made from, its placed word picked out of W by a rotation and the
// mask (4 funnel shifts and 5 LOP3 for the 8 codes, against 3 + 4 x 3 instructions from the bytes).
DEVICE u32 rotr32(u32 x, int n) { return __funnelshift_r(x, x, n); }
template <bool BIG>
DEVICE void fp4_wg_word_to_bf16x2(u32 w, u32 m1, u32 m2, u32 out[4]) {
    constexpr u32 M = 0x81C081C0u;
    u32 placed[4];
    placed[0] = w & M;
    placed[1] = rotr32(w, 4) & M;
    placed[2] = rotr32(w, 10) & M;
    placed[3] = (rotr32(w, 6) & 0x81808180u) | (rotr32(w, 14) & 0x00400040u);
    #pragma unroll
    for (int q = 0; q < 4; ++q) out[q] = scale_placed<BIG>(placed[q], m1, m2);
}

// The A fragments of both k16 steps (s = 0, 1) of one 32-block for mma rows g and g + 8, from their
// 8-code words w0, w1 (scale bytes s0, s1): a[s] = {row g q = 2s, row g+8 q = 2s, row g q = 2s+1,
// row g+8 q = 2s+1}, q indexing the words' bytes (WG_ORDER: words of the wgmma order, q indexing the
// bytes they were made from). Which k pairs the bytes hold is the caller's k order.
template <bool BIG, bool WG_ORDER = false>
DEVICE void fp4_block_fragments(u32 w0, u32 w1, u32 s0, u32 s1, u32 af[2][4]) {
    u32 c0[4], c1[4];
    if constexpr (WG_ORDER) {
        fp4_wg_word_to_bf16x2<BIG>(w0, scale_m1(s0), scale_m2(s0), c0);
        fp4_wg_word_to_bf16x2<BIG>(w1, scale_m1(s1), scale_m2(s1), c1);
    } else {
        fp4x8_to_bf16x2<BIG>(w0, scale_m1(s0), scale_m2(s0), c0);
        fp4x8_to_bf16x2<BIG>(w1, scale_m1(s1), scale_m2(s1), c1);
    }
    #pragma unroll
    for (int s = 0; s < 2; ++s) {
        af[s][0] = c0[2 * s];
        af[s][1] = c1[2 * s];
        af[s][2] = c0[2 * s + 1];
        af[s][3] = c1[2 * s + 1];
    }
}

// 16-byte cp.async to a shared address given as a 32-bit shared-window offset (no generic conversion
// per copy); bytes < 16 zero-fills, bytes = 0 reads nothing (src must still be a valid address).
DEVICE void cp_async_16s(u32 saddr, const void* gmem, int bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" :: "r"(saddr), "l"(gmem), "r"(bytes));
}

DEVICE void ldsm_x4(u32 r[4], u32 saddr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(saddr));
}

// Shared-memory position of MXFP4 weight row n (local to the tile): even columns of each 16 first.
DEVICE int wpos(int n) { return (n & ~15) | ((n & 1) << 3) | ((n >> 1) & 7); }

template <int NT_, int MW_, int WARPS_N_, int KSUB_, int STAGES_, bool FP4_, bool WG_ = false, int LAG_ = 0,
          bool STD_ = false>
struct MoeCfg {
    static constexpr int NT = NT_;            // n8 tiles of token rows (per warp = per CTA)
    static constexpr int MW = MW_;            // m16 tiles of weight rows per warp (16 * MW columns)
    static constexpr int WARPS_N = WARPS_N_, KSUB = KSUB_, STAGES = STAGES_;
    static constexpr bool FP4 = FP4_;
    static constexpr bool WG = WG_;           // wgmma (sm_90a): each warpgroup owns 64 columns
    // STD: mma.sync over MXFP4 in the wgmma kernels' k order (compute_stage_fp4_std): the same products,
    // summed in the same order, so its results are the wgmma variants' bits
    static constexpr bool STD = STD_;
    static_assert(!STD || (FP4 && !WG), "the standard-order mma.sync path is an MXFP4 mma.sync kernel");
    // LAG > 0: the ring runs on mbarriers instead of a CTA barrier per k-tile: a slot is refilled LAG
    // k-tiles after it was read, once every warp has released it, so warpgroups drift apart by up to LAG
    static constexpr int LAG = LAG_;
    // The 128-row mbarrier-ring kernels can take each k-tile's token rows with one TMA copy (thread 0)
    // instead of cp.async from every thread, where they are BM consecutive rows: mlp2's y
    // (MoeCta::TMA_A; 2-7% faster at T >= 1,024 on 20b). The 64-row kernel stays on cp.async: its
    // 12 warps at 80 registers spilled more and ran 2-6% slower with it.
    static constexpr bool TMA_Y = WG && LAG > 0 && NT >= 16;
    // The dense kernels (WG with bf16 weights: MOE_DENSE_KERNEL) read the weights from shared memory by
    // descriptor (wgmma_bf16_ss); thread 0 fetches each k-tile's BN x 64 box of them by TMA, in the
    // wgmma row order ops.moe.dense_expert_copy stored them in. With no A registers to rewrite they keep
    // one wgmma group in flight (mainloop_inflight; a slot is refilled one k-tile after it was read).
    static constexpr bool TMA_W = WG && !FP4;
    static_assert(!TMA_W || LAG == 1, "the dense kernels' ring refills one k-tile behind");
    static_assert(WG == (LAG > 0) && LAG < STAGES, "the wgmma kernels run on the mbarrier ring, the others on "
                  "the CTA-barrier ring (mainloop)");
    static_assert(!WG || ((FP4 || KSUB == 2) && MW == 1 && WARPS_N % 4 == 0 && KSUB % 2 == 0
                          && (NT == 8 || NT == 16)),
                  "wgmma variant: MXFP4 (or dense, one 64-k box per k-tile), whole warpgroups, 64-wide "
                  "token rows, n64 or n128");
    static constexpr int BM = 8 * NT, BN = 16 * MW * WARPS_N, BK = 32 * KSUB, KCH = BK / 8;
    static constexpr int THREADS = 32 * WARPS_N;
    static constexpr int A_BYTES = BM * BK * 2;                          // tokens
    static constexpr int B_BYTES = FP4 ? BN * BK / 2 : BN * BK * 2;     // weights
    static constexpr int STAGE_BYTES = A_BYTES + B_BYTES;
    static constexpr int AHEAD = LAG ? STAGES : STAGES - 1;            // k-tiles the prologue requests
    static constexpr int SC_OFS = STAGES * STAGE_BYTES;                 // the scale rows
    static constexpr int A_STEP = THREADS / KCH;                         // token rows per loader pass
    static constexpr int A_ITERS = (BM + A_STEP - 1) / A_STEP;
    static constexpr int B_STEP = FP4 ? THREADS / KSUB : THREADS / KCH;  // weight rows per loader pass
    static constexpr int B_ITERS = BN / B_STEP;
    static_assert(THREADS % KCH == 0 && THREADS % KSUB == 0 && BN % B_STEP == 0, "loader mapping");
    static_assert(!FP4 || B_STEP % 16 == 0, "wpos(n + i * B_STEP) = wpos(n) + i * B_STEP");
    static_assert(NT % 2 == 0, "ldmatrix.x4 loads two token n8 tiles");
    static_assert(A_ITERS <= 32 && B_ITERS <= 32, "validity masks");
};

template <class C, bool MLP1>
struct MoeCta {
    // mlp2 of the 128-row mbarrier-ring kernel: a tile's token rows are rows row0 .. row0 + BM - 1 of
    // y (sorted order), one TMA box of BM x 64 per k-tile in the 128-byte swizzle; rows past the tile's
    // expert are read too (another expert's rows, or zeros past S): their outputs are never stored.
    // mlp1's rows are gathered tokens, which a box cannot fetch: cp.async from every thread.
    static constexpr bool TMA_A = C::TMA_Y && !MLP1;
    const MoeParams& p;
    unsigned char* smem;  // dynamic shared memory (generic pointer, for plain loads)
    u32 sbase;            // the same as a shared-window address (cp.async, ldmatrix)
    int expert, row0, rows, n0, KB, KT, tid, lane, nw, g, t4;
    int w_row;            // the tile's first weight row in [E * N] (the dense kernels' TMA box)
    // token loader: chunk a_ch of rows tid / KCH + i * A_STEP (element offsets of the rows from p.a)
    u32 a_src[C::A_ITERS];
    u32 a_dst[C::A_ITERS];
    u32 a_rd[C::KSUB];    // MXFP4 path: offset of this lane's token chunk in block kk of a stage, row g
    unsigned a_exist, a_ok;
    int a_ch;
    // weight loader: block (MXFP4) / chunk (bf16) b_x of rows b_n + i * B_STEP
    const unsigned char* b_src;  // start of weight row b_n (clamped to a valid row)
    unsigned b_ok;
    int b_x, b_n;
    int sc_row[C::MW][2];        // scale buffer offset of the rows of mma rows g and g + 8
    float acc[C::MW][C::NT][4];  // [weight m16 tile][token n8 tile][fragment]

    u32 full_bars = 0;           // mbarrier ring: full[0] (TMA token copies count on it)

    DEVICE MoeCta(const MoeParams& p_, unsigned char* smem_) : p(p_), smem(smem_), sbase(smem_u32(smem_)) {}

    // A_ROWS: the token rows that can exist (the mainloop's WIDTH): the loader passes past them are not
    // even tested (a_exist has no row past tile_width())
    template <int A_ROWS = C::BM>
    DEVICE void load_stage(int buf, int kt) {
        const u32 st = sbase + buf * C::STAGE_BYTES;
        // Sources past K or past the valid rows copy 0 bytes from the start of a valid row.
        if constexpr (TMA_A || C::TMA_W) {  // boxes of 64 k: tokens (BM rows), weights (BN rows)
#if GPTOSS_HAS_WGMMA
            if (tid == 0) {
                mbar_arrive_expect_tx(full_bars + 8 * buf, (TMA_A ? C::A_BYTES : 0) + (C::TMA_W ? C::B_BYTES : 0));
                if (TMA_A) tma_load_2d(st, p.amap, kt * C::BK, row0, full_bars + 8 * buf);
                if (C::TMA_W) tma_load_2d(st + C::A_BYTES, p.wmap, kt * C::BK, w_row, full_bars + 8 * buf);
            }
#endif
        }
        if constexpr (!TMA_A) {   // tokens
            const int k = kt * C::BK + a_ch * 8;
            const bool kv = k < p.K;
            const u32 kofs = kv ? k : 0;
            constexpr int A_IT = (A_ROWS + C::A_STEP - 1) / C::A_STEP < C::A_ITERS
                               ? (A_ROWS + C::A_STEP - 1) / C::A_STEP : C::A_ITERS;
            #pragma unroll
            for (int i = 0; i < A_IT; ++i)
                if (a_exist >> i & 1u)
                    cp_async_16s(st + a_dst[i], p.a + (a_src[i] + kofs), kv && (a_ok >> i & 1u) ? 16 : 0);
        }
        if (C::FP4) {
            const int kb = kt * C::KSUB + b_x;
            const bool kv = kb < KB;
            const unsigned char* src = b_src + (kv ? (size_t)kb * 16 : 0);
            const u32 dst = st + C::A_BYTES + (b_x * C::BN + wpos(b_n)) * 16;
            #pragma unroll
            for (int i = 0; i < C::B_ITERS; ++i) {
                const bool ok = kv && (b_ok >> i & 1u);
                cp_async_16s(dst + i * C::B_STEP * 16, ok ? src + (size_t)i * C::B_STEP * KB * 16 : src,
                             ok ? 16 : 0);
            }
        } else if constexpr (!C::TMA_W) {
            const int k = kt * C::BK + b_x * 8;
            const bool kv = k < p.K;
            const unsigned char* src = b_src + (kv ? (size_t)k * 2 : 0);
            #pragma unroll
            for (int i = 0; i < C::B_ITERS; ++i) {
                const bool ok = kv && (b_ok >> i & 1u);
                const int n = b_n + i * C::B_STEP;
                cp_async_16s(st + C::A_BYTES + n * C::BK * 2 + ((b_x ^ ((n >> 1) & 7)) * 16),
                             ok ? src + (size_t)i * C::B_STEP * p.K * 2 : src, ok ? 16 : 0);
            }
        }
    }

    template <bool BIG>
    DEVICE void compute_stage_fp4(int buf, int kt) {
        const unsigned char* sa = smem + buf * C::STAGE_BYTES;
        const unsigned char* sb = sa + C::A_BYTES;
        const unsigned char* sc = smem + C::SC_OFS;
        #pragma unroll
        for (int kk = 0; kk < C::KSUB; ++kk) {
            const int kb = kt * C::KSUB + kk;
            u32 af[C::MW][2][4];  // [tile][step][quad]
            #pragma unroll
            for (int j = 0; j < C::MW; ++j) {
                const int pr = nw + 16 * j + g;  // = wpos(nw + 16j + 2g); row g + 8 sits 8 blocks later
                const u32 w0 = *reinterpret_cast<const u32*>(sb + (kk * C::BN + pr) * 16 + 4 * t4);
                const u32 w1 = *reinterpret_cast<const u32*>(sb + (kk * C::BN + pr + 8) * 16 + 4 * t4);
                // byte q = 2s + r of a word: pair 4t + 2s + r
                fp4_block_fragments<BIG>(w0, w1, sc[sc_row[j][0] + kb], sc[sc_row[j][1] + kb], af[j]);
            }
            #pragma unroll
            for (int i = 0; i < C::NT; ++i) {  // token row 8i + g (same parity as g: same swizzle)
                const uint4 b = *reinterpret_cast<const uint4*>(sa + a_rd[kk] + i * 8 * C::BK * 2);
                const u32 b0[2] = {b.x, b.y};  // step 0: pairs 4t, 4t + 1
                const u32 b1[2] = {b.z, b.w};  // step 1: pairs 4t + 2, 4t + 3
                #pragma unroll
                for (int j = 0; j < C::MW; ++j) {
                    mma_bf16_16816(acc[j][i], af[j][0], b0);
                    mma_bf16_16816(acc[j][i], af[j][1], b1);
                }
            }
        }
    }

    // Lane t's words of the weight rows at positions pr and pr + 8 (rows g and g + 8 of an m16 tile) in
    // block kk of a stage (sb), wgmma order (moe_wg_order): word t of a block holds the codes of its
    // bytes t, t+4, t+8, t+12 as made, i.e. k pairs 8s + t + 4r (k16 step s, register r)
    DEVICE void wg_order_words(const unsigned char* sb, int kk, int pr, u32& w0, u32& w1) const {
        w0 = *reinterpret_cast<const u32*>(sb + (kk * C::BN + pr) * 16 + 4 * t4);
        w1 = *reinterpret_cast<const u32*>(sb + (kk * C::BN + pr + 8) * 16 + 4 * t4);
    }

    // The mma B fragments of token n8 tiles 2ip and 2ip + 1 for k16 step ks of the stage at sa, standard
    // k order (one ldmatrix.x4: tiles 2ip / 2ip + 1 (q >> 1) x k lo / hi (q & 1); chunk swizzle ch ^ (r & 7))
    DEVICE void token_fragments(u32 sa, int ks, int ip, u32 b0[2], u32 b1[2]) const {
        const int q = lane / 8, li = lane % 8;  // ldmatrix: lane gives row li of matrix q
        const int r = 16 * ip + 8 * (q >> 1) + li, ch = 2 * ks + (q & 1);
        u32 bq[4];
        ldsm_x4(bq, sa + r * C::BK * 2 + ((ch ^ (r & 7)) * 16));
        b0[0] = bq[0], b0[1] = bq[1], b1[0] = bq[2], b1[1] = bq[3];
    }

    // MXFP4 weights in the wgmma kernels' k order (the A fragments of issue_stage_wg: lane t's word of a
    // row's block in the wgmma order, the codes of bytes t, t+4, t+8, t+12) and the tokens through
    // ldmatrix in the standard order (as compute_stage_bf16; the tokens' chunk swizzle is the bf16
    // path's): per k16 step the same products as the wgmma kernels' wgmma, one mma.m16n8k16 per token
    // n8 tile.
    template <bool BIG>
    DEVICE void compute_stage_fp4_std(int buf, int kt) {
        const unsigned char* sb = smem + buf * C::STAGE_BYTES + C::A_BYTES;
        const unsigned char* sc = smem + C::SC_OFS;
        const u32 sa = sbase + buf * C::STAGE_BYTES;
        #pragma unroll
        for (int kk = 0; kk < C::KSUB; ++kk) {
            const int kb = kt * C::KSUB + kk;
            u32 af[C::MW][2][4];  // [tile][step][quad]
            #pragma unroll
            for (int j = 0; j < C::MW; ++j) {
                u32 w0, w1;
                wg_order_words(sb, kk, nw + 16 * j + g, w0, w1);  // = wpos(nw + 16j + 2g)
                fp4_block_fragments<BIG, true>(w0, w1, sc[sc_row[j][0] + kb], sc[sc_row[j][1] + kb], af[j]);
            }
            #pragma unroll
            for (int s = 0; s < 2; ++s) {
                #pragma unroll
                for (int ip = 0; ip < C::NT / 2; ++ip) {
                    u32 b0[2], b1[2];
                    token_fragments(sa, 2 * kk + s, ip, b0, b1);  // k16 step 2kk + s of the k-tile
                    #pragma unroll
                    for (int j = 0; j < C::MW; ++j) {
                        mma_bf16_16816(acc[j][2 * ip], af[j][s], b0);
                        mma_bf16_16816(acc[j][2 * ip + 1], af[j][s], b1);
                    }
                }
            }
        }
    }

    DEVICE void compute_stage_bf16(int buf) {
        const u32 sa = sbase + buf * C::STAGE_BYTES, sb = sa + C::A_BYTES;
        const int q = lane / 8, li = lane % 8;  // ldmatrix: lane gives row li of matrix q
        #pragma unroll
        for (int ks = 0; ks < 2 * C::KSUB; ++ks) {  // k16 steps
            u32 af[C::MW][4];
            #pragma unroll
            for (int j = 0; j < C::MW; ++j) {  // matrices: rows g / g + 8 (q & 1) x k lo / hi (q >> 1)
                const int n = nw + 16 * j + 2 * li + (q & 1), ch = 2 * ks + (q >> 1);
                ldsm_x4(af[j], sb + n * C::BK * 2 + ((ch ^ ((n >> 1) & 7)) * 16));
            }
            #pragma unroll
            for (int ip = 0; ip < C::NT / 2; ++ip) {
                u32 b0[2], b1[2];
                token_fragments(sa, ks, ip, b0, b1);
                #pragma unroll
                for (int j = 0; j < C::MW; ++j) {
                    mma_bf16_16816(acc[j][2 * ip], af[j], b0);
                    mma_bf16_16816(acc[j][2 * ip + 1], af[j], b1);
                }
            }
        }
    }

    // wgmma path: dequantize the stage's weights into A fragments (the MXFP4 register path above, but
    // in the standard k order since the tokens are read by the tensor cores in it: k16 step s of a block
    // takes pairs 8s + t (a[0]/a[1]) and 8s + t + 4 (a[2]/a[3]), i.e. bytes t, t+4, t+8, t+12 of a
    // row's 16-byte block: lane t's word in the wgmma order), then issue the stage's wgmmas.
    template <bool BIG, int WIDTH = 8 * C::NT>
    DEVICE void issue_stage_wg(int buf, int kt) {
#if GPTOSS_HAS_WGMMA
        const u32 sa = sbase + buf * C::STAGE_BYTES;
        if constexpr (C::TMA_W) {  // dense: this warpgroup's 64 weight rows of the box, by descriptor
            const u32 sw = sa + C::A_BYTES + (tid / 128) * 64 * 128;
            fence_acc();
            wgmma_fence();
            #pragma unroll
            for (int ks = 0; ks < 2 * C::KSUB; ++ks)  // the same k16 steps as the MXFP4 branch below
                wgmma_bf16_ss<8 * C::NT>(&acc[0][0][0], wgmma_desc_sw128(sw + ks * 32),
                                         wgmma_desc_sw128(sa + ks * 32));
            wgmma_commit();
            fence_acc();
            return;
        }
        const unsigned char* sb = smem + buf * C::STAGE_BYTES + C::A_BYTES;
        const unsigned char* sc = smem + C::SC_OFS;
        u32 af[C::KSUB][2][4];                  // [block][step][quad]
        #pragma unroll
        for (int kk = 0; kk < C::KSUB; ++kk) {
            const int kb = kt * C::KSUB + kk;
            u32 w0, w1;
            wg_order_words(sb, kk, nw + g, w0, w1);  // wpos(nw + 2g); row g + 8 sits 8 blocks later
            const u32 s0 = sc[sc_row[0][0] + kb], s1 = sc[sc_row[0][1] + kb];
#if MOE_ABLATE == 1
            #pragma unroll
            for (int q = 0; q < 4; ++q) af[kk][q >> 1][q & 1] = af[kk][q >> 1][2 + (q & 1)] = w0 ^ w1 ^ s0 ^ s1 ^ q;
#else
            fp4_block_fragments<BIG, true>(w0, w1, s0, s1, af[kk]);
#endif
        }
        fence_acc();
#if MOE_ABLATE == 2
        #pragma unroll
        for (int kk = 0; kk < C::KSUB; ++kk)
            acc[0][0][0] += __uint_as_float((af[kk][0][0] ^ af[kk][1][1] ^ af[kk][0][2] ^ af[kk][1][3]) & 0x3FFFFFFFu)
                          + __uint_as_float((af[kk][1][0] ^ af[kk][0][1] ^ af[kk][1][2] ^ af[kk][0][3]) & 0x3FFFFFFFu);
        acc[0][0][1] += __uint_as_float(sa);
#else
        wgmma_fence();
        // desc(sa + offset) = desc(sa) + offset / 16: sa is 1 KB-aligned and sa + offset stays in the window
        const unsigned long long desc = wgmma_desc_sw128(sa);
        #pragma unroll
        for (int kk = 0; kk < C::KSUB; ++kk)
            #pragma unroll
            for (int s = 0; s < 2; ++s)  // token atom kk / 2, k16 step 2 (kk % 2) + s of its 64-wide rows
                wgmma_bf16_rs<WIDTH>(&acc[0][0][0], af[kk][s],
                                     desc + (((kk >> 1) * C::BM * 128 + ((kk & 1) * 2 + s) * 32) >> 4));
#endif
        wgmma_commit();
        fence_acc();
#endif
    }

    // Keeps the accumulators in place around asynchronous wgmmas (no copies of them between issue and
    // wait; the CUTLASS warpgroup_fence_operand pattern).
    DEVICE void fence_acc() {
#if GPTOSS_HAS_WGMMA
        #pragma unroll
        for (int i = 0; i < C::NT; ++i)
            #pragma unroll
            for (int q = 0; q < 4; ++q) reg_fence(acc[0][i][q]);
#endif
    }

    // mbarrier ring (C::LAG > 0): full[b] completes when every thread's copies into slot b landed,
    // empty[b] when every warp's wgmmas on slot b are done. K-tile kt waits for full[kt % S]; the slot
    // of k-tile kt - LAG is refilled with k-tile kt - LAG + S once empty says all warps left it.
    // The dense kernels' ring with one wgmma group in flight: k-tile kt's wgmmas are issued before
    // kt - 1's are waited for (wgmma_wait<1>); then every warp releases kt - 1's slot, which is refilled
    // with k-tile kt - 1 + S once all have (S - 1 k-tiles of loads ahead of the one multiplied).
    DEVICE void mainloop_inflight(u32 full, u32 empty) {
#if GPTOSS_HAS_WGMMA
        int b = 0, use = 0;  // slot and use count of k-tile kt
        int pb = 0, puse = 0;  // the same for k-tile kt - 1
        for (int kt = 0; kt < KT; ++kt) {
            mbar_wait(full + 8 * b, use & 1);
            fence_proxy_async();
            issue_stage_wg<false>(b, kt);
            wgmma_wait<1>();
            fence_acc();
            if (kt > 0) {
                __syncwarp();
                if (lane == 0) mbar_arrive(empty + 8 * pb);
                if (kt - 1 + C::STAGES < KT) {
                    mbar_wait(empty + 8 * pb, puse & 1);
                    load_stage(pb, kt - 1 + C::STAGES);
                    mbar_arrive_cp_async(full + 8 * pb);
                }
                if (++pb == C::STAGES) { pb = 0; ++puse; }
            }
            if (++b == C::STAGES) { b = 0; ++use; }
        }
        wgmma_wait<0>();
        fence_acc();
        __syncthreads();  // shared memory is free for the epilogue
#endif
    }

    // The wgmma kernels multiply the tile's first WIDTH token rows (m64nWIDTHk16): its rows rounded up to
    // a quarter of BM (tile_width), so a tile with few rows costs the tensor cores less. Each output is
    // one token row's products summed in the same order whatever WIDTH, so the bits do not change.
    template <bool BIG>
    DEVICE void mainloop_mb_width(u32 full, u32 empty) {
        constexpr int Q = C::BM / 4;
        const int width = tile_width();
        if (width == Q) mainloop_mb<BIG, Q>(full, empty);
        else if (width == 2 * Q) mainloop_mb<BIG, 2 * Q>(full, empty);
        else if (width == 3 * Q) mainloop_mb<BIG, 3 * Q>(full, empty);
        else mainloop_mb<BIG, C::BM>(full, empty);
    }

    // (the MXFP4 wgmma kernels; the dense ones and the mma.sync ones multiply all BM rows)
    DEVICE int tile_width() const {
        constexpr int Q = C::BM / 4;
        return C::WG && !C::TMA_W ? min(C::BM, (rows + Q - 1) / Q * Q) : C::BM;
    }

    template <bool BIG, int WIDTH>
    DEVICE void mainloop_mb(u32 full, u32 empty) {
#if GPTOSS_HAS_WGMMA
        constexpr int S = C::STAGES, LAG = C::LAG;
        // unrolled by the ring's size: k-tile k0 + s sits in slot s, in use (k0 / S) of it
        for (int k0 = 0, phase = 0; k0 < KT; k0 += S, phase ^= 1) {
            #pragma unroll
            for (int s = 0; s < S; ++s) {
                const int kt = k0 + s;
                if (kt >= KT) break;
                mbar_wait(full + 8 * s, phase);
                // Tokens copied by cp.async (generic proxy) are read by wgmma (async proxy): a proxy fence,
                // before this thread's refill below (its fence would wait for those copies too). Tokens
                // by TMA are written in the async proxy, and the weights are read by plain loads.
                if constexpr (!TMA_A) fence_proxy_async();
                if (kt >= LAG && kt - LAG + S < KT) {
                    const int rb = (s - LAG + S) % S;  // k-tile kt - LAG's slot, in the previous use if s < LAG
                    mbar_wait(empty + 8 * rb, s >= LAG ? phase : phase ^ 1);
                    if (MOE_ABLATE != 3) load_stage<WIDTH>(rb, kt - LAG + S);
                    else if ((TMA_A || C::TMA_W) && tid == 0) mbar_arrive(full + 8 * rb);  // TMA's arrival
                    mbar_arrive_cp_async(full + 8 * rb);
                }
                issue_stage_wg<BIG, WIDTH>(s, kt);
                wgmma_wait<0>();
                fence_acc();
                __syncwarp();
                if (lane == 0) mbar_arrive(empty + 8 * s);
            }
        }
        __syncthreads();  // shared memory is free for the epilogue
#endif
    }

    template <bool BIG>
    DEVICE void mainloop() {
        int rbuf = 0, wbuf = C::AHEAD;
        for (int kt = 0; kt < KT; ++kt) {
            cp_async_wait<C::AHEAD - 1>();
            __syncthreads();  // k-tile kt landed for everyone; slot wbuf (read at kt - 1) is free
            if (kt + C::AHEAD < KT) load_stage(wbuf, kt + C::AHEAD);
            cp_async_commit();
            if constexpr (C::STD) {
                compute_stage_fp4_std<BIG>(rbuf, kt);
            } else if constexpr (C::FP4) {
                compute_stage_fp4<BIG>(rbuf, kt);
            } else {
                compute_stage_bf16(rbuf);
            }
            rbuf = rbuf + 1 == C::STAGES ? 0 : rbuf + 1;
            wbuf = wbuf + 1 == C::STAGES ? 0 : wbuf + 1;
        }
        cp_async_wait<0>();
        __syncthreads();  // shared memory is free for the epilogue
    }

    DEVICE void run(int* s_slot, float* s_rw, u32* s_arow, unsigned long long* s_bars) {
        expert = p.tiles[2 * blockIdx.y];
        if (expert < 0) return;  // past the last tile of this step
        row0 = p.tiles[2 * blockIdx.y + 1];
        rows = min(C::BM, p.offsets[expert + 1] - row0);
        const int N = p.N, K = p.K;
        n0 = blockIdx.x * C::BN;
        KB = K / 32;
        KT = (K + C::BK - 1) / C::BK;
        tid = threadIdx.x;
        lane = tid % 32;
        nw = (tid / 32) * 16 * C::MW;
        g = lane / 4;
        t4 = lane % 4;

        for (int r = tid; r < C::BM; r += C::THREADS) {
            const int slot = r < rows ? p.slots[row0 + r] : -1;
            s_slot[r] = slot;
            s_rw[r] = (!MLP1 && slot >= 0) ? p.rw[slot] : 0.0f;
            s_arow[r] = slot < 0 ? 0u : MLP1 ? (u32)(slot / p.topk) * (u32)K : (u32)(row0 + r) * (u32)K;
        }
        #pragma unroll
        for (int j = 0; j < C::MW; ++j)
            #pragma unroll
            for (int i = 0; i < C::NT; ++i)
                acc[j][i][0] = acc[j][i][1] = acc[j][i][2] = acc[j][i][3] = 0.0f;
        const u32 full = smem_u32(s_bars), empty = full + 8 * C::STAGES;
        full_bars = full;
#if GPTOSS_HAS_WGMMA
        if (C::LAG && tid == 0) {
            for (int i = 0; i < C::STAGES; ++i) {
                mbar_init(full + 8 * i, C::THREADS + (TMA_A || C::TMA_W ? 1 : 0));  // + thread 0's expect_tx
                mbar_init(empty + 8 * i, C::THREADS / 32);
            }
            if (TMA_A || C::TMA_W) fence_mbar_init();
        }
#endif
        __syncthreads();

        a_ch = tid % C::KCH;
        a_exist = a_ok = 0;
        const int a_rows = tile_width();  // rows past it are never read (zero-filled up to it)
        #pragma unroll
        for (int i = 0; i < (TMA_A ? 0 : C::A_ITERS); ++i) {
            const int r = tid / C::KCH + i * C::A_STEP;
            const int rr = r < C::BM ? r : 0;
            a_src[i] = s_arow[rr];  // rows past `rows` point at row 0 and copy 0 bytes
            const int sw = C::FP4 && !C::STD ? a_ch ^ ((rr & 1) << 2) : a_ch ^ (rr & 7);
            // wgmma: [BK/64][BM][128 B] atoms in the 128-byte swizzle (mma.h, wgmma_desc_sw128)
            a_dst[i] = C::WG ? (a_ch >> 3) * C::BM * 128 + sw128_offset(rr, a_ch & 7)
                             : rr * C::BK * 2 + sw * 16;
            a_exist |= (unsigned)(r < a_rows) << i;
            a_ok |= (unsigned)(r < rows) << i;
        }
        #pragma unroll
        for (int kk = 0; kk < C::KSUB; ++kk) a_rd[kk] = g * C::BK * 2 + (((4 * kk + t4) ^ ((g & 1) << 2)) * 16);
        b_x = C::FP4 ? tid % C::KSUB : tid % C::KCH;
        b_n = C::FP4 ? tid / C::KSUB : tid / C::KCH;
        b_ok = 0;
        #pragma unroll
        for (int i = 0; i < C::B_ITERS; ++i) b_ok |= (unsigned)(n0 + b_n + i * C::B_STEP < N) << i;
        const size_t wrow = (size_t)expert * N + n0;  // first weight row of the tile
        w_row = (int)wrow;
        const size_t brow = wrow + (size_t)(min(n0 + b_n, N - 1) - n0);
        b_src = C::FP4 ? p.wq + brow * KB * 16 : reinterpret_cast<const unsigned char*>(p.wb + brow * K);

        // scales of rows [n0, min(n0 + BN, N)) over all of K: one contiguous byte range, copied in
        // aligned 16-byte pieces (it starts sc_shift bytes into the first piece)
        int sc_chunks = 0;
        if (C::FP4) {
            const u32 sc = sbase + C::SC_OFS;
            const long long first = (long long)wrow * KB;
            const long long a0 = first & ~15LL;
            const int sc_shift = (int)(first - a0);
            sc_chunks = (sc_shift + min(C::BN, N - n0) * KB + 15) / 16;
            for (int c = tid; c < sc_chunks; c += C::THREADS) {
                const long long src = a0 + 16LL * c, left = p.scales_bytes - src;
                const int bytes = left >= 16 ? 16 : left > 0 ? (int)left : 0;
                cp_async_16s(sc + 16 * c, p.ws + (bytes > 0 ? src : 0), bytes);
            }
            #pragma unroll
            for (int j = 0; j < C::MW; ++j) {
                sc_row[j][0] = sc_shift + (nw + 16 * j + 2 * g) * KB;
                sc_row[j][1] = sc_row[j][0] + KB;
            }
        }

        // prologue: stages 0 .. AHEAD-1 (the scales ride in group 0)
        #pragma unroll
        for (int s = 0; s < C::AHEAD; ++s) {
            if (s < KT) load_stage(s, s);
#if GPTOSS_HAS_WGMMA
            if (C::LAG) {
                if (s < KT) mbar_arrive_cp_async(full + 8 * s);
            } else
#endif
            cp_async_commit();
        }
        bool big = false;
        if (C::FP4) {
#if GPTOSS_HAS_WGMMA
            if (C::LAG) mbar_wait(full, 0); else
#endif
            cp_async_wait<C::AHEAD - 1>();
            __syncthreads();
            const unsigned char* sc = smem + C::SC_OFS;
            int flag = 0;  // any scale byte > 128 in what was copied (a superset of the tile's scales)
            for (int c = tid; c < sc_chunks; c += C::THREADS) {
                const uint4 v = *reinterpret_cast<const uint4*>(sc + 16 * c);
                flag |= __vcmpgtu4(v.x, 0x80808080u) | __vcmpgtu4(v.y, 0x80808080u)
                      | __vcmpgtu4(v.z, 0x80808080u) | __vcmpgtu4(v.w, 0x80808080u);
            }
            big = __syncthreads_or(flag) != 0;
        }
        if constexpr (C::TMA_W) {
            mainloop_inflight(full, empty);
        } else if constexpr (C::LAG > 0) {
            if (big) mainloop_mb_width<true>(full, empty); else mainloop_mb_width<false>(full, empty);
        } else {
            if (big) mainloop<true>(); else mainloop<false>();
        }
        if constexpr (C::WG) fence_acc();

        if (MLP1) epilogue_mlp1(); else epilogue_mlp2(s_slot, s_rw);
    }

    // bias + SwiGLU on the (gate, linear) pairs, bf16 y staged in shared memory, then written out in
    // 16-byte pieces of rows
    DEVICE void epilogue_mlp1() {
        constexpr int U = C::BN / 2;  // y columns of the tile
        bf16_t* sy = reinterpret_cast<bf16_t*>(smem);
        const int N = p.N;
        #pragma unroll
        for (int j = 0; j < C::MW; ++j) {
            const int col = nw + 16 * j + 2 * g, n = n0 + col;
            const u32 bw = n < N ? *reinterpret_cast<const u32*>(p.bias + (size_t)expert * N + n) : 0u;
            const float bg = bf16x2_lo(bw), bl = bf16x2_hi(bw);
            #pragma unroll
            for (int i = 0; i < C::NT; ++i)
                #pragma unroll
                for (int h = 0; h < 2; ++h) {
                    const int r = 8 * i + 2 * t4 + h;
                    const float yv = moe_swiglu(__fadd_rn(acc[j][i][h], bg), __fadd_rn(acc[j][i][2 + h], bl),
                                                p.limit, p.alpha);
                    sy[r * U + col / 2] = float_to_bf16(yv);
                }
        }
        __syncthreads();
        const int I = N / 2, u0 = n0 / 2;
        for (int c = tid; c < C::BM * (U / 8); c += C::THREADS) {
            const int r = c / (U / 8), uc = (c % (U / 8)) * 8;
            if (r < rows && u0 + uc < I)
                *reinterpret_cast<uint4*>(p.y + (size_t)(row0 + r) * I + u0 + uc) =
                    *reinterpret_cast<const uint4*>(sy + r * U + uc);
        }
    }

    // (acc + bias) * routing weight, straight to row `slot`: 8 bytes per lane, 64 per row per warp tile
    DEVICE void epilogue_mlp2(const int* s_slot, const float* s_rw) {
        const int N = p.N;
        #pragma unroll
        for (int j = 0; j < C::MW; ++j) {
            const int n = n0 + nw + 16 * j + 2 * g;
            if (n >= N) continue;
            const u32 bw = *reinterpret_cast<const u32*>(p.bias + (size_t)expert * N + n);
            const float b0 = bf16x2_lo(bw), b1 = bf16x2_hi(bw);
            #pragma unroll
            for (int i = 0; i < C::NT; ++i)
                #pragma unroll
                for (int h = 0; h < 2; ++h) {
                    const int r = 8 * i + 2 * t4 + h;
                    if (r >= rows) continue;
                    const float w = s_rw[r];
                    float2 v;
                    v.x = __fmul_rn(__fadd_rn(acc[j][i][h], b0), w);
                    v.y = __fmul_rn(__fadd_rn(acc[j][i][2 + h], b1), w);
                    *reinterpret_cast<float2*>(p.out + (size_t)s_slot[r] * N + n) = v;
                }
        }
    }
};

// The dynamic shared memory. wgmma's swizzled token atoms need 1 KB-aligned stages: the wgmma kernels
// declare that alignment, so ptxas places the array at a 1 KB boundary past the static arrays and
// every stage address is a constant offset from it (rounding a pointer up at run time, ptxas redid the
// round-up in every k-tile).
template <bool WG>
DEVICE unsigned char* moe_dynamic_smem() {
    if constexpr (WG) {
        extern __shared__ __align__(WGMMA_SMEM_ALIGN) unsigned char moe_smem_wg[];
        return moe_smem_wg;
    } else {
        extern __shared__ __align__(16) unsigned char moe_smem[];
        return moe_smem;
    }
}

template <class C, bool MLP1>
DEVICE void moe_gemm(const MoeParams& p) {
    __shared__ int s_slot[C::BM];
    __shared__ float s_rw[C::BM];
    __shared__ u32 s_arow[C::BM];  // element offset of each tile row's A row
    __shared__ unsigned long long s_bars[C::LAG ? 2 * C::STAGES : 1];  // mbarrier ring: full, empty
    MoeCta<C, MLP1> cta(p, moe_dynamic_smem<C::WG>());
    cta.run(s_slot, s_rw, s_arow, s_bars);
}

#define MOE_KERNEL(NAME, NT, MW, WARPS_N, KSUB, STAGES, FP4, MLP1, MINB)                             \
    extern "C" __global__ void __launch_bounds__(32 * WARPS_N, MINB) NAME(MOE_ARGS) {                \
        GPTOSS_WAIT_PRIOR_GRID();                                                                    \
        GPTOSS_LAUNCH_DEPENDENTS();                                                                  \
        const MoeParams p = MOE_PARAMS;                                                              \
        moe_gemm<MoeCfg<NT, MW, WARPS_N, KSUB, STAGES, FP4>, MLP1>(p);                               \
    }

#if GPTOSS_HAS_WGMMA
#define MOE_WG_KERNEL(NAME, NT, WARPS_N, KSUB, STAGES, LAG, MLP1, MINB)                              \
    extern "C" __global__ void __launch_bounds__(32 * WARPS_N, MINB)                                  \
    NAME(const __grid_constant__ TensorMap amap, MOE_ARGS) {                                          \
        GPTOSS_WAIT_PRIOR_GRID();                                                                    \
        GPTOSS_LAUNCH_DEPENDENTS();                                                                  \
        MoeParams p = MOE_PARAMS;                                                                    \
        p.amap = &amap;                                                                              \
        moe_gemm<MoeCfg<NT, 1, WARPS_N, KSUB, STAGES, true, true, LAG>, MLP1>(p);                     \
    }
// MXFP4 mma.sync kernels in the wgmma kernels' k order (MoeCfg::STD): bit-identical to the wgmma variants
#define MOE_STD_KERNEL(NAME, NT, MW, WARPS_N, KSUB, STAGES, MLP1, MINB)                              \
    extern "C" __global__ void __launch_bounds__(32 * WARPS_N, MINB) NAME(MOE_ARGS) {                \
        GPTOSS_WAIT_PRIOR_GRID();                                                                    \
        GPTOSS_LAUNCH_DEPENDENTS();                                                                  \
        const MoeParams p = MOE_PARAMS;                                                              \
        moe_gemm<MoeCfg<NT, MW, WARPS_N, KSUB, STAGES, true, false, 0, true>, MLP1>(p);              \
    }
// Dense experts (bf16 weights in the wgmma row order, ops.moe.dense_expert_copy): tensor maps of the
// token rows (mlp2) and of the weights [E * N, K] (boxes of 64 k x BN rows); BK = 64.
#define MOE_DENSE_KERNEL(NAME, NT, WARPS_N, STAGES, MLP1, MINB)                                      \
    extern "C" __global__ void __launch_bounds__(32 * WARPS_N, MINB)                                  \
    NAME(const __grid_constant__ TensorMap amap, const __grid_constant__ TensorMap wmap, MOE_ARGS) {  \
        GPTOSS_WAIT_PRIOR_GRID();                                                                    \
        GPTOSS_LAUNCH_DEPENDENTS();                                                                  \
        MoeParams p = MOE_PARAMS;                                                                    \
        p.amap = &amap;                                                                              \
        p.wmap = &wmap;                                                                              \
        moe_gemm<MoeCfg<NT, 1, WARPS_N, 2, STAGES, false, true, 1>, MLP1>(p);                        \
    }
#endif

#else  // portable path (AMD, and GPTOSS_PORTABLE on NVIDIA): FMA tiles in static shared memory

// The same tiles and grid as the tensor-core kernels: CTA (blockIdx.x, blockIdx.y) = weight rows
// [BN * blockIdx.x, + BN) of the expert of row tile blockIdx.y (the dispatch's schedule). K goes in
// chunks of MOE_PORTABLE_BK = one MXFP4 block: the chunk's token rows and its dequantized weights (each
// weight decoded once per CTA, not once per token) go to shared memory as fp32; each thread keeps a
// TM x (2 TP) register tile: token rows ty + i*TY by the column pairs 2(tx + j*TX), +1 (an mlp1 pair is
// a unit's (gate, linear): SwiGLU in the epilogue). One fmaf per k in increasing order from 0, then the
// bias: the same arithmetic for any tile, any T (batch invariance). Only __syncthreads, no warp-level
// primitives: correct for any warp width and any block size THREADS (a multiple of MOE_PORTABLE_TY).
#define MOE_PORTABLE_BK 32
#define MOE_PORTABLE_TY 8

template <int BM, int BN, int THREADS, bool FP4, bool MLP1>
DEVICE void moe_gemm_portable(const MoeParams& p) {
    constexpr int BK = MOE_PORTABLE_BK, TY = MOE_PORTABLE_TY, TX = THREADS / TY;
    constexpr int TM = BM / TY, TP = BN / 2 / TX;
    static_assert(TX * TY == THREADS && TY * TM == BM && TX * TP * 2 == BN, "portable MoE register tiling");
    __shared__ float As[BK][BM];  // [k][token row]
    __shared__ float Ws[BK][BN];  // [k][weight row]
    __shared__ int s_row[BM];     // the row of a holding each tile row; -1 past the expert's rows

    const int e = p.tiles[2 * blockIdx.y];
    if (e < 0) return;  // past the last tile (a uniform exit: the whole CTA)
    const int r0 = p.tiles[2 * blockIdx.y + 1], r_end = p.offsets[e + 1];
    const int n0 = blockIdx.x * BN;
    const int tid = threadIdx.x, tx = tid % TX, ty = tid / TX;
    for (int i = tid; i < BM; i += THREADS) {
        const int r = r0 + i;
        s_row[i] = r < r_end ? (MLP1 ? p.slots[r] / p.topk : r) : -1;
    }
    __syncthreads();

    float acc[TM][2 * TP];
    #pragma unroll
    for (int i = 0; i < TM; ++i)
        #pragma unroll
        for (int j = 0; j < 2 * TP; ++j) acc[i][j] = 0.0f;

    const int KB = p.K / 32;  // MXFP4 blocks per weight row
    for (int k0 = 0; k0 < p.K; k0 += BK) {  // K % 32 == 0 (checked by ops/moe.py)
        for (int idx = tid; idx < BM * BK; idx += THREADS) {
            const int m = idx / BK, kk = idx % BK, row = s_row[m];
            As[kk][m] = row >= 0 ? bf16_to_float(p.a[(size_t)row * p.K + k0 + kk]) : 0.0f;
        }
        if (FP4) {  // one byte = k pair (2b, 2b + 1), low nibble first; the block's scale on both
            for (int idx = tid; idx < BN * 16; idx += THREADS) {
                const int n = idx / 16, b = idx % 16;
                float lo = 0.0f, hi = 0.0f;
                if (n0 + n < p.N) {
                    const size_t blk = ((size_t)e * p.N + n0 + n) * KB + k0 / 32;
                    const u32 byte = p.wq[blk * 16 + b];
                    const float scale = e8m0_to_float(p.ws[blk]);
                    lo = fp4_e2m1_to_float(byte & 15u) * scale;
                    hi = fp4_e2m1_to_float(byte >> 4) * scale;
                }
                Ws[2 * b][n] = lo;
                Ws[2 * b + 1][n] = hi;
            }
        } else {
            for (int idx = tid; idx < BN * BK; idx += THREADS) {
                const int n = idx / BK, kk = idx % BK;
                Ws[kk][n] = n0 + n < p.N ? bf16_to_float(p.wb[((size_t)e * p.N + n0 + n) * p.K + k0 + kk]) : 0.0f;
            }
        }
        __syncthreads();
        #pragma unroll 4
        for (int kk = 0; kk < BK; ++kk) {
            float a[TM], w[2 * TP];
            #pragma unroll
            for (int i = 0; i < TM; ++i) a[i] = As[kk][ty + i * TY];
            #pragma unroll
            for (int j = 0; j < TP; ++j) {
                w[2 * j] = Ws[kk][2 * (tx + j * TX)];
                w[2 * j + 1] = Ws[kk][2 * (tx + j * TX) + 1];
            }
            #pragma unroll
            for (int i = 0; i < TM; ++i)
                #pragma unroll
                for (int j = 0; j < 2 * TP; ++j) acc[i][j] = fmaf(a[i], w[j], acc[i][j]);
        }
        __syncthreads();
    }

    #pragma unroll
    for (int i = 0; i < TM; ++i) {
        const int m = ty + i * TY;
        if (s_row[m] < 0) continue;
        const int r = r0 + m;
        #pragma unroll
        for (int j = 0; j < TP; ++j) {
            const int c = n0 + 2 * (tx + j * TX);  // an even weight row (mlp1: N is even)
            if (c >= p.N) continue;
            const bf16_t* b = p.bias + (size_t)e * p.N + c;
            if (MLP1) {
                const float gate = acc[i][2 * j] + bf16_to_float(b[0]);
                const float lin = acc[i][2 * j + 1] + bf16_to_float(b[1]);
                p.y[(size_t)r * (p.N / 2) + c / 2] = float_to_bf16(moe_swiglu(gate, lin, p.limit, p.alpha));
            } else {
                const int slot = p.slots[r];
                const float rw = p.rw[slot];
                p.out[(size_t)slot * p.N + c] = (acc[i][2 * j] + bf16_to_float(b[0])) * rw;
                if (c + 1 < p.N) p.out[(size_t)slot * p.N + c + 1] = (acc[i][2 * j + 1] + bf16_to_float(b[1])) * rw;
            }
        }
    }
}

// The block size is the tensor-core variant's (32 * WARPS_N threads, which ops/moe.py launches on both
// paths); the portable body only needs it to be a multiple of MOE_PORTABLE_TY.
#define MOE_KERNEL(NAME, NT, MW, WARPS_N, KSUB, STAGES, FP4, MLP1, MINB)                             \
    extern "C" __global__ void __launch_bounds__(32 * WARPS_N) NAME(MOE_ARGS) {                      \
        GPTOSS_WAIT_PRIOR_GRID();                                                                    \
        GPTOSS_LAUNCH_DEPENDENTS();                                                                  \
        const MoeParams p = MOE_PARAMS;                                                              \
        moe_gemm_portable<8 * (NT), 16 * (MW) * (WARPS_N), 32 * (WARPS_N), FP4, MLP1>(p);            \
    }

#endif  // GPTOSS_HAS_MMA

// The variants. ops/moe.py reads these lines for the tile shapes (BM = 8*NT token rows, BN = 16*MW*WARPS_N
// columns, BK = 32*KSUB, 32*WARPS_N threads) and the shared memory they need.
//   m64: getp (many rows per expert): 64 x 192 tiles, 6 warps of 64 rows x 32 columns.
//   m16: decode (a few rows per expert): 16 x 64 tiles, 4 warps of 16 rows x 16 columns: as many warps
//        as possible stream the few experts' weights (a warp's dequantization is latency-bound).
//         name                 NT MW WARPS_N KSUB STAGES FP4    MLP1   MIN_BLOCKS
MOE_KERNEL(moe_mlp1_fp4_m64,    8, 2, 6,      2,   4,     true,  true,  2)
MOE_KERNEL(moe_mlp2_fp4_m64,    8, 2, 6,      2,   4,     true,  false, 2)
MOE_KERNEL(moe_mlp1_bf16_m64,   8, 2, 6,      2,   3,     false, true,  2)
MOE_KERNEL(moe_mlp2_bf16_m64,   8, 2, 6,      2,   3,     false, false, 2)
MOE_KERNEL(moe_mlp1_fp4_m16,    2, 1, 4,      4,   4,     true,  true,  4)
MOE_KERNEL(moe_mlp2_fp4_m16,    2, 1, 4,      4,   4,     true,  false, 4)
MOE_KERNEL(moe_mlp1_bf16_m16,   2, 1, 4,      4,   4,     false, true,  2)
MOE_KERNEL(moe_mlp2_bf16_m16,   2, 1, 4,      4,   4,     false, false, 2)

// wgmma variants of the MXFP4 kernels (sm_90a builds only; ops/moe.py picks them there): warpgroups of
// 64 columns, the tokens read by the tensor cores from shared memory. Every variant (any tile height,
// any T) runs the same k16 steps in the same order: bit-identical results (batch invariance).
//   m128: getp from 64 rows per expert on (T >= 512 on 20b): 128 x 128 tiles, 2 warpgroups. The
//         dequantization per weight is shared by twice the tokens of m64: 1.5x its speed at T = 4096.
//         2880 = 22.5 x 128: mlp2's last column tile is half empty.
// LAG 2: the mbarrier ring (mainloop_mb), warpgroups drift apart by up to two k-tiles: one dequantizes
// while the other's wgmmas run. 3-15% faster for m128 and m64 at T = 256..4,096 on an H200 than a ring
// that synchronizes the CTA once per k-tile.
#ifndef MOE_WG_KERNEL
#define MOE_WG_KERNEL(NAME, NT, WARPS_N, KSUB, STAGES, LAG, MLP1, MINB)
#endif
//            name                   NT  WARPS_N KSUB STAGES LAG MLP1   MIN_BLOCKS
MOE_WG_KERNEL(moe_mlp1_fp4_m128_wg,  16, 8,      2,   4,     2,  true,  2)
MOE_WG_KERNEL(moe_mlp2_fp4_m128_wg,  16, 8,      2,   4,     2,  false, 2)
MOE_WG_KERNEL(moe_mlp1_fp4_m64_wg,   8,  12,     2,   5,     2,  true,  2)
MOE_WG_KERNEL(moe_mlp2_fp4_m64_wg,   8,  12,     2,   5,     2,  false, 2)

// mma.sync kernels in the wgmma kernels' k order (MoeCfg::STD; sm_90a builds only, where ops/moe.py takes
// them for the 16-row tiles beside the wgmma variants): bit-identical to those.
//   m16: decode (<= 16 rows per expert): 16 x 64 tiles, 4 warps of 16 columns, the A fragments the
//        wgmma kernels dequantize, one mma.m16n8k16 per token n8 tile. Against a one-warpgroup wgmma
//        kernel of the same tile (m16_wg, dropped), per 20b layer on the H200: mlp1 28.5 / 30.7 us at
//        T = 1, 88.7 / 99.3 at T = 8, 171 / 191 at T = 64; mlp2 21.3 / 22.5, 50.4 / 54.3, 91.3 / 98.7.
#ifndef MOE_STD_KERNEL
#define MOE_STD_KERNEL(NAME, NT, MW, WARPS_N, KSUB, STAGES, MLP1, MINB)
#endif
//             name                    NT MW WARPS_N KSUB STAGES MLP1   MIN_BLOCKS
MOE_STD_KERNEL(moe_mlp1_fp4_m16_std,   2, 1, 4,      4,   4,     true,  4)
MOE_STD_KERNEL(moe_mlp2_fp4_m16_std,   2, 1, 4,      4,   4,     false, 4)

// Dense experts (sm_90a builds only; ops/moe.py takes them for weights that carry ExpertWeights.dense
// once the average expert has DENSE_MIN_ROWS rows): the m128_wg tiles and k16 steps with bf16 weights
// from shared memory, no dequantization. Bit-identical to the MXFP4 wgmma variants (the same products,
// summed in the same order).
#ifndef MOE_DENSE_KERNEL
#define MOE_DENSE_KERNEL(NAME, NT, WARPS_N, STAGES, MLP1, MINB)
#endif
// 3 stages of 32 KB, 2 CTAs per SM, one wgmma group in flight. Measured on the H200 (20b
// layer, benchmarks/kernel_moe.py --dense), ms against the MXFP4 128-row kernel:
//   T = 1,024: mlp1 0.431 / 0.557, mlp2 0.266 / 0.327;   T = 4,096: 1.116 / 1.441, 0.559 / 0.757.
// Waiting for each k-tile's wgmmas instead (mainloop_mb, LAG 1) was up to 1.2x slower at T >= 2,048, and
// 6 stages at 1 CTA per SM up to 1.5x slower.
//               name                      NT  WARPS_N STAGES MLP1   MIN_BLOCKS
MOE_DENSE_KERNEL(moe_mlp1_dense_m128_wg,   16, 8,      3,     true,  2)
MOE_DENSE_KERNEL(moe_mlp2_dense_m128_wg,   16, 8,      3,     false, 2)

// Word t of a block in the wgmma order (header) from its bytes t, t+4, t+8, t+12 (w, byte q = byte t + 4q)
// and back. Plain C: the layout is made on every vendor (only the NVIDIA wgmma kernels read it).
DEVICE u32 rotl32_c(u32 x, int n) { return (x << n) | (x >> (8 * (int)sizeof(u32) - n)); }  // 0 < n < bits
DEVICE u32 fp4_placed(u32 byte) { return (((byte & 15u) | (byte >> 4) << 16) * 0x1040u) & 0x81C081C0u; }
DEVICE u32 fp4_unplaced(u32 p) {  // the byte whose placed word is p
    return ((p >> 6) & 7u) | ((p >> 12) & 8u) | ((p >> 18) & 0x70u) | ((p >> 24) & 0x80u);
}
DEVICE u32 wg_order_word(u32 w) {
    const u32 p0 = fp4_placed(w & 255u), p1 = fp4_placed((w >> 8) & 255u);
    const u32 p2 = fp4_placed((w >> 16) & 255u), p3 = fp4_placed(w >> 24);
    return p0 | rotl32_c(p1, 4) | rotl32_c(p2, 10) | rotl32_c(p3 & 0x81808180u, 6) | rotl32_c(p3 & 0x00400040u, 14);
}
DEVICE u32 wg_order_word_inverse(u32 W) {
    constexpr u32 M = 0x81C081C0u;
    const u32 p0 = W & M, p1 = rotl32_c(W, 28) & M, p2 = rotl32_c(W, 22) & M;
    const u32 p3 = (rotl32_c(W, 26) & 0x81808180u) | (rotl32_c(W, 18) & 0x00400040u);
    return fp4_unplaced(p0) | fp4_unplaced(p1) << 8 | fp4_unplaced(p2) << 16 | fp4_unplaced(p3) << 24;
}

// The 4 x 4 byte transpose of a block's words: byte q of word t <-> byte t of word q, so word t then holds
// the block's bytes t, t+4, t+8, t+12 (byte b of the block = byte b % 4 of v[b / 4]). Its own inverse.
DEVICE void transpose_bytes(u32 v[4]) {
    u32 out[4];
    #pragma unroll
    for (int t = 0; t < 4; ++t)
        out[t] = ((v[0] >> 8 * t) & 255u) | ((v[1] >> 8 * t) & 255u) << 8
               | ((v[2] >> 8 * t) & 255u) << 16 | ((v[3] >> 8 * t) & 255u) << 24;
    #pragma unroll
    for (int t = 0; t < 4; ++t) v[t] = out[t];
}

// One 16-byte block's 4 words into the wgmma order (inverse = 0) or back from it (inverse = 1).
DEVICE void wg_order_block(u32 v[4], int inverse) {
    if (!inverse) transpose_bytes(v);
    #pragma unroll
    for (int t = 0; t < 4; ++t) v[t] = inverse ? wg_order_word_inverse(v[t]) : wg_order_word(v[t]);
    if (inverse) transpose_bytes(v);
}

// MXFP4 blocks [n] x 16 bytes into the wgmma order or back (inverse), in place: one thread per block.
extern "C" __global__ void moe_wg_order(u8* __restrict__ wq, long long n, int inverse) {
    GPTOSS_WAIT_PRIOR_GRID();
    GPTOSS_LAUNCH_DEPENDENTS();
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    uint4* p = reinterpret_cast<uint4*>(wq) + i;
    const uint4 b = *p;
    u32 v[4] = {b.x, b.y, b.z, b.w};
    wg_order_block(v, inverse);
    *p = make_uint4(v[0], v[1], v[2], v[3]);
}

// Dense copy of MXFP4 expert weights for the wgmma kernels that read bf16 weights from shared memory
// (MOE_DENSE_KERNEL): dense[row0(n) + wpos(n % 16)][k] = E2M1(code) * 2^(s - 127) as bf16, exact (a
// bf16 holds every E2M1 value times a power of two in its range). Rows are stored in the order the
// MXFP4 wgmma kernels place them in shared memory (wpos: even columns of each 16 first), so that a
// warpgroup's wgmma row m is the same output column in both kinds of kernel and the accumulators,
// epilogues and bits agree. One thread per 16-byte block (32 weights) of rows [E * R] x K/32 blocks.
// Plain C: runs on every vendor (the kernels that read the copy are NVIDIA-only).
// wgmma_order: the blocks are in the wgmma order (moe_wg_order), read back to the file's bytes.
extern "C" __global__ void moe_dense_copy(const u8* __restrict__ wq, const u8* __restrict__ ws,
                                          bf16_t* __restrict__ dense, long long rows, int KB, int wgmma_order) {
    GPTOSS_WAIT_PRIOR_GRID();
    GPTOSS_LAUNCH_DEPENDENTS();
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= rows * KB) return;
    const long long n = i / KB;
    const int kb = (int)(i % KB);
    const long long dst_row = (n & ~15LL) | (((n & 1) << 3) | ((n >> 1) & 7));
    const float scale = e8m0_to_float(ws[i]);
    const uint4 blk = reinterpret_cast<const uint4*>(wq)[i];
    u32 v[4] = {blk.x, blk.y, blk.z, blk.w};
    if (wgmma_order) wg_order_block(v, 1);
    bf16_t* dst = dense + dst_row * (long long)KB * 32 + kb * 32;
    #pragma unroll
    for (int b = 0; b < 16; ++b) {  // byte b = k pair (2b, 2b + 1), low nibble first
        const u32 byte = (v[b / 4] >> 8 * (b % 4)) & 255u;
        dst[2 * b] = float_to_bf16(fp4_e2m1_to_float(byte & 15u) * scale);
        dst[2 * b + 1] = float_to_bf16(fp4_e2m1_to_float(byte >> 4) * scale);
    }
}
