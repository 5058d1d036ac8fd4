// Dense bf16 GEMM: out[M, N] = x[M, K] · w[N, K]ᵀ (+ bias[N]), fp32 accumulation, rounded once at the end
// (to bf16, or stored as fp32). x and w are row-major; w is the checkpoint's [out, in] layout, so both
// operands are "K-contiguous" and the product is the classic TN GEMM.
//
// One templated body, instantiated as several tile shapes (variants) that gptoss/ops/gemm.py picks from
// (M, N). gemm.py reads the variants from the GEMM_*KERNEL lines at the bottom of this file (and the wgmma
// tiles' fixed sizes from the GEMM_WG_* / GEMM_TMA_* defines below).
//
// Batch invariance: every variant accumulates an output element the same way: fp32 accumulators that
// start at 0 and receive one mma.m16n8k16 per k16 step, k in increasing order, no split-K; the bias is
// added after the last step. A row's result therefore depends only on that row, never on M, on the
// row's place inside a tile, or on which variant ran. (The portable path does the same with one fmaf per
// k, also in increasing order.)
//
// Tensor-core path (GPTOSS_HAS_MMA), per CTA: a BM x BN output tile, K walked in BK-wide k-tiles through
// a STAGES-deep cp.async ring in shared memory; warps laid out WM x WN, each owning a (BM/WM) x (BN/WN)
// warp tile of m16n8 accumulators, fragments fetched with ldmatrix.
//   Shared-memory layout: per stage, the A tile [BM][BK] then (after all stages of A) the B tile
//   [BN][BK], bf16, rows of BK*2 bytes (128 or 256) split into 16-byte chunks. Chunk c of row r is stored
//   at chunk position c ^ (r & 7) (XOR swizzle inside each 128-byte group): the 8 row addresses of one
//   ldmatrix 8x8 matrix (8 consecutive rows, same logical chunk) then fall in 8 different 16-byte bank
//   groups, and each cp.async row write stays a full 128-byte line. No padding.
//   Ragged edges: rows beyond M (x) or N (w), and 16-byte chunks beyond K, are zero-filled by cp.async
//   (src_bytes = 0); a last k-tile shorter than BK (K % BK = 32, 64 or 96) runs only its real k16 steps,
//   so padding never enters an accumulator. Stores are guarded by row < M, col < N.
//   Grid order: blockIdx.x walks groups of GEMM_GROUP_N column tiles; inside a group the column tile
//   changes fastest, then the row tile, so the W tiles of a group stay in L2 while x streams past them.
#include "common.h"
#include "mma.h"

#define GEMM_GROUP_N 8
// The wgmma variants' tiles: 128 rows of x by BN, k-tiles of 64; two consumer warpgroups of 64 rows (the
// TMA variant adds a producer warpgroup).
#define GEMM_WG_BM 128
#define GEMM_WG_BK 64
#define GEMM_WG_THREADS 256
#define GEMM_TMA_THREADS 384

template <int BM_, int BN_, int BK_, int WM_, int WN_, int STAGES_>
struct GemmTile {
    static constexpr int BM = BM_, BN = BN_, BK = BK_, WM = WM_, WN = WN_, STAGES = STAGES_;
    static constexpr int THREADS = 32 * WM * WN;  // the launch's block size on both vendors
    static constexpr int WTM = BM / WM, WTN = BN / WN;  // warp tile
    static constexpr int MI = WTM / 16, NI = WTN / 8;   // m16 x n8 accumulator tiles per warp
};

// Tile (tm, tn) of this CTA: groups of GEMM_GROUP_N column tiles, column fastest inside a group.
DEVICE void gemm_tile_coords(int M, int N, int BM, int BN, int& tm, int& tn) {
    const int tiles_m = (M + BM - 1) / BM, tiles_n = (N + BN - 1) / BN;
    const int per_group = GEMM_GROUP_N * tiles_m;
    const int pid = blockIdx.x;
    const int grp = pid / per_group;
    const int first_n = grp * GEMM_GROUP_N;
    const int gsize = min(tiles_n - first_n, GEMM_GROUP_N);
    const int r = pid - grp * per_group;
    tm = r / gsize;
    tn = first_n + r % gsize;
}

// out[row, col] = v0 and out[row, col + 1] = v1 (each only where inside [M, N]); col is even.
DEVICE void gemm_store_pair(void* out, int out_f32, int M, int N, int row, int col, float v0, float v1) {
    if (row >= M || col >= N) return;
    const size_t off = (size_t)row * N + col;
    const bool pair = col + 1 < N;
    if (out_f32) {
        float* o = reinterpret_cast<float*>(out) + off;
        if (pair && !(N & 1)) {
            *reinterpret_cast<float2*>(o) = make_float2(v0, v1);  // 8-byte aligned: N and col even
        } else {
            o[0] = v0;
            if (pair) o[1] = v1;
        }
    } else {
        bf16_t* o = reinterpret_cast<bf16_t*>(out) + off;
        if (pair && !(N & 1)) {
            *reinterpret_cast<u32*>(o) = pack_bf16x2(v0, v1);
        } else {
            o[0] = float_to_bf16(v0);
            if (pair) o[1] = float_to_bf16(v1);
        }
    }
}

#if GPTOSS_HAS_MMA

// Issue the cp.async copies of k-tile kt into ring slot (sa, sb). Thread tid copies chunk lc = tid % CH
// of rows lr + i * RSTEP (lr = tid / CH); xg / wg point at chunk lc of its first row (row m0 + lr / n0 + lr).
template <class T>
DEVICE void gemm_load_stage(bf16_t* sa, bf16_t* sb, const bf16_t* x, const bf16_t* w, const bf16_t* xg,
                            const bf16_t* wg, int lr, int lc, int m0, int n0, int M, int N, int K, int kt) {
    constexpr int BM = T::BM, BN = T::BN, BK = T::BK, CH = BK / 8, RSTEP = T::THREADS / CH;
    const int k0 = kt * BK;
    const bool k_ok = k0 + lc * 8 < K;
    #pragma unroll
    for (int i = 0; i < BM / RSTEP; ++i) {
        const int r = lr + i * RSTEP;
        const bool ok = k_ok && m0 + r < M;
        const bf16_t* src = ok ? xg + (size_t)i * RSTEP * K + k0 : x;
        cp_async_16(sa + r * BK + ((lc ^ (r & 7)) << 3), src, ok ? 16 : 0);
    }
    #pragma unroll
    for (int i = 0; i < BN / RSTEP; ++i) {
        const int r = lr + i * RSTEP;
        const bool ok = k_ok && n0 + r < N;
        const bf16_t* src = ok ? wg + (size_t)i * RSTEP * K + k0 : w;
        cp_async_16(sb + r * BK + ((lc ^ (r & 7)) << 3), src, ok ? 16 : 0);
    }
}

// A and B fragments of k16 step ks of one stage.
//   A (x4): lane l addresses row a_row + mi*16 (a_row = warp row + l % 16), logical chunk 2ks + l / 16:
//     matrices 0..3 = (rows 0-7, k 0-7), (rows 8-15, k 0-7), (rows 0-7, k 8-15), (rows 8-15, k 8-15)
//     = a[0..3] of mma.h.
//   B (x4, two n8 tiles): lane l addresses n row b_row + p*16 (b_row = warp col + l % 8 + 8 * (l / 16)),
//     chunk 2ks + (l / 8) % 2: matrices = (n 0-7, k 0-7), (n 0-7, k 8-15), (n 8-15, k 0-7), (n 8-15, k 8-15)
//     = b[0], b[1] of n-tile 2p, then of n-tile 2p+1.  (x2 when a warp has a single n8 tile: lanes 0-15.)
//   Every such row is ≡ lane (mod 8), so the swizzle term r & 7 is lane & 7.
template <class T>
DEVICE void gemm_load_frags(u32 (&af)[T::MI][4], u32 (&bfr)[T::NI][2], const bf16_t* sa, const bf16_t* sb,
                            int a_row, int a_kc, int b_row, int b_kc, int sw, int ks) {
    constexpr int BK = T::BK, MI = T::MI, NI = T::NI;
    #pragma unroll
    for (int mi = 0; mi < MI; ++mi)
        ldmatrix_x4(af[mi], sa + (a_row + mi * 16) * BK + (((2 * ks + a_kc) ^ sw) << 3));
    if (NI == 1) {
        ldmatrix_x2(bfr[0], sb + b_row * BK + (((2 * ks + b_kc) ^ sw) << 3));
    } else {
        #pragma unroll
        for (int p = 0; p < NI / 2; ++p) {
            u32 r[4];
            ldmatrix_x4(r, sb + (b_row + p * 16) * BK + (((2 * ks + b_kc) ^ sw) << 3));
            bfr[2 * p][0] = r[0];
            bfr[2 * p][1] = r[1];
            bfr[2 * p + 1][0] = r[2];
            bfr[2 * p + 1][1] = r[3];
        }
    }
}

// The first nks k16 steps of one stage into acc (nks = BK/16 except in a short last k-tile); fragments
// of step ks+1 are fetched before the mma of step ks.
template <class T>
DEVICE void gemm_compute_stage(float (&acc)[T::MI][T::NI][4], const bf16_t* sa, const bf16_t* sb, int a_row,
                               int a_kc, int b_row, int b_kc, int sw, int nks) {
    constexpr int MI = T::MI, NI = T::NI, KSTEPS = T::BK / 16;
    u32 af[2][MI][4], bfr[2][NI][2];
    gemm_load_frags<T>(af[0], bfr[0], sa, sb, a_row, a_kc, b_row, b_kc, sw, 0);
    #pragma unroll
    for (int ks = 0; ks < KSTEPS; ++ks) {
        if (ks < nks) {
            if (ks + 1 < nks)
                gemm_load_frags<T>(af[(ks + 1) & 1], bfr[(ks + 1) & 1], sa, sb, a_row, a_kc, b_row, b_kc, sw, ks + 1);
            #pragma unroll
            for (int mi = 0; mi < MI; ++mi)
                #pragma unroll
                for (int ni = 0; ni < NI; ++ni) mma_bf16_16816(acc[mi][ni], af[ks & 1][mi], bfr[ks & 1][ni]);
        }
    }
}

template <class T>
DEVICE void gemm_body(const bf16_t* __restrict__ x, const bf16_t* __restrict__ w, const bf16_t* __restrict__ bias,
                      void* __restrict__ out, int M, int N, int K, int has_bias, int out_f32) {
    constexpr int BM = T::BM, BN = T::BN, BK = T::BK, STAGES = T::STAGES, MI = T::MI, NI = T::NI;
    constexpr int CH = BK / 8, RSTEP = T::THREADS / CH, KSTEPS = BK / 16;
    static_assert(BK == 64 || BK == 128, "rows of 128 or 256 bytes: the swizzle works inside 128-byte groups");
    static_assert(T::THREADS % CH == 0 && BM % RSTEP == 0 && BN % RSTEP == 0, "loader covers the tiles evenly");
    static_assert(T::WTM % 16 == 0 && T::WTN % 8 == 0 && (NI == 1 || NI % 2 == 0), "warp tile of m16 x n8 tiles");
    static_assert(STAGES >= 2, "cp.async ring");

    extern __shared__ uint4 gemm_smem[];
    bf16_t* sA = reinterpret_cast<bf16_t*>(gemm_smem);
    bf16_t* sB = sA + STAGES * BM * BK;

    int tm, tn;
    gemm_tile_coords(M, N, BM, BN, tm, tn);
    const int m0 = tm * BM, n0 = tn * BN;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int wm = warp / T::WN, wn = warp % T::WN;

    // loader: chunk lc of rows lr, lr + RSTEP, ...
    const int lr = tid / CH, lc = tid % CH;
    const bf16_t* xg = x + (size_t)(m0 + lr) * K + lc * 8;
    const bf16_t* wg = w + (size_t)(n0 + lr) * K + lc * 8;

    // ldmatrix lane roles (see gemm_load_frags)
    const int sw = lane & 7;
    const int a_row = wm * T::WTM + (lane & 15), a_kc = lane >> 4;
    const int b_row = wn * T::WTN + (lane & 7) + (NI == 1 ? 0 : ((lane >> 4) << 3)), b_kc = (lane >> 3) & 1;

    float acc[MI][NI][4];
    #pragma unroll
    for (int mi = 0; mi < MI; ++mi)
        #pragma unroll
        for (int ni = 0; ni < NI; ++ni)
            #pragma unroll
            for (int j = 0; j < 4; ++j) acc[mi][ni][j] = 0.0f;

    const int KT = (K + BK - 1) / BK;
    // Prologue: k-tiles 0..STAGES-2 in flight, one commit group each (empty groups keep the count uniform).
    #pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
        if (s < KT)
            gemm_load_stage<T>(sA + s * BM * BK, sB + s * BN * BK, x, w, xg, wg, lr, lc, m0, n0, M, N, K, s);
        cp_async_commit();
    }
    int read = 0, write = STAGES - 1;  // ring slots of k-tile kt and of k-tile kt + STAGES - 1
    for (int kt = 0; kt < KT; ++kt) {
        // Groups committed so far: STAGES - 1 + kt; leaving STAGES - 2 pending means k-tile kt has landed
        // (for this thread's copies; the barrier makes everyone's visible). The barrier also tells that
        // every warp is done with k-tile kt - 1, whose slot (write) is refilled next.
        cp_async_wait<STAGES - 2>();
        __syncthreads();
        if (kt + STAGES - 1 < KT)
            gemm_load_stage<T>(sA + write * BM * BK, sB + write * BN * BK, x, w, xg, wg, lr, lc, m0, n0, M, N, K,
                               kt + STAGES - 1);
        cp_async_commit();
        const bf16_t* sa = sA + read * BM * BK;
        const bf16_t* sb = sB + read * BN * BK;
        const int nks = (K - kt * BK) / 16;  // K % 16 == 0
        if (nks >= KSTEPS)
            gemm_compute_stage<T>(acc, sa, sb, a_row, a_kc, b_row, b_kc, sw, KSTEPS);
        else
            gemm_compute_stage<T>(acc, sa, sb, a_row, a_kc, b_row, b_kc, sw, nks);
        read = read + 1 == STAGES ? 0 : read + 1;
        write = write + 1 == STAGES ? 0 : write + 1;
    }
    cp_async_wait<0>();

    // Epilogue: c[0..1] = (row g, cols 2t, 2t+1), c[2..3] = (row g + 8, same cols) of each m16n8 tile.
    const int g = lane >> 2, t = lane & 3;
    #pragma unroll
    for (int ni = 0; ni < NI; ++ni) {
        const int col = n0 + wn * T::WTN + ni * 8 + 2 * t;
        float b0 = 0.0f, b1 = 0.0f;
        if (has_bias) {
            if (col < N) b0 = bf16_to_float(bias[col]);
            if (col + 1 < N) b1 = bf16_to_float(bias[col + 1]);
        }
        #pragma unroll
        for (int mi = 0; mi < MI; ++mi) {
            const int row = m0 + wm * T::WTM + mi * 16 + g;
            gemm_store_pair(out, out_f32, M, N, row, col, acc[mi][ni][0] + b0, acc[mi][ni][1] + b1);
            gemm_store_pair(out, out_f32, M, N, row + 8, col, acc[mi][ni][2] + b0, acc[mi][ni][3] + b1);
        }
    }
}

#if GPTOSS_HAS_WGMMA
// Epilogue of the wgmma variants: bias, then rows row0 + g and row0 + g + 8 of the accumulators (D layout
// of mma.h: n8 chunk i holds (row g, cols 8i + 2t..) in acc[4i..4i+1], row g + 8 in acc[4i+2..]).
template <int BN>
DEVICE void gemm_wg_epilogue(const float* acc, const bf16_t* __restrict__ bias, void* __restrict__ out, int M,
                             int N, int row0, int n0, int lane, int has_bias, int out_f32) {
    const int g = lane >> 2, t = lane & 3;
    const int row = row0 + g;
    #pragma unroll
    for (int i = 0; i < BN / 8; ++i) {
        const int col = n0 + 8 * i + 2 * t;
        float b0 = 0.0f, b1 = 0.0f;
        if (has_bias) {
            if (col < N) b0 = bf16_to_float(bias[col]);
            if (col + 1 < N) b1 = bf16_to_float(bias[col + 1]);
        }
        gemm_store_pair(out, out_f32, M, N, row, col, acc[4 * i] + b0, acc[4 * i + 1] + b1);
        gemm_store_pair(out, out_f32, M, N, row + 8, col, acc[4 * i + 2] + b0, acc[4 * i + 3] + b1);
    }
}

// wgmma path (sm_90a builds; ops/gemm.py picks it for M > 64 on H100/H200). CTA = 128 rows of x x BN rows
// of w, two warpgroups of 64 x rows each; both operands are read by the tensor cores from shared memory
// (descriptors, mma.h): per stage x [128][64] and w [BN][64] bf16, rows of 128 B in 8-row atoms of 1 KB,
// chunk c of row r at c ^ (r & 7) (the 128-byte swizzle; stages 1 KB-aligned). One wgmma per k16 step,
// k increasing, from zero accumulators: the same per-element arithmetic as the mma.sync variants
// (measured bit-identical on an H200), so every variant still gives a row the same bits.
// Ring: STAGES slots; k-tile kt + STAGES - 2 is requested while kt is multiplied and kt - 1's wgmmas may
// still run (wgmma_wait<1>), so a slot is refilled two k-tiles after it was read.
template <int BN_, int STAGES_>
struct GemmWgTile {
    static constexpr int BM = GEMM_WG_BM, BN = BN_, BK = GEMM_WG_BK, STAGES = STAGES_, THREADS = GEMM_WG_THREADS;
    static constexpr int A_BYTES = BM * BK * 2, STAGE_BYTES = (BM + BN) * BK * 2;
    static_assert(BN == 128 || BN == 256, "wgmma n128 or n256");
    static_assert(STAGES >= 3, "one slot read, one in a running wgmma, one or more in flight");
};

template <class T>
DEVICE void gemm_wg_body(const bf16_t* __restrict__ x, const bf16_t* __restrict__ w,
                         const bf16_t* __restrict__ bias, void* __restrict__ out, int M, int N, int K,
                         int has_bias, int out_f32) {
    constexpr int BM = T::BM, BN = T::BN, BK = T::BK, STAGES = T::STAGES, NACC = BN / 2;
    extern __shared__ __align__(16) unsigned char gemm_wg_smem[];
    unsigned char* smem = align_1k(gemm_wg_smem);
    const u32 sbase = smem_u32(smem);

    int tm, tn;
    gemm_tile_coords(M, N, BM, BN, tm, tn);
    const int m0 = tm * BM, n0 = tn * BN;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, wg = warp >> 2;

    // loader: chunk lc of rows lr + 32 i (x: i < 4, w: i < BN / 32); all of a thread's rows share r & 7
    const int lr = tid >> 3, lc = tid & 7;
    const u32 dst0 = sw128_offset(lr, lc);
    const bf16_t* xg = x + (size_t)(m0 + lr) * K + lc * 8;
    const bf16_t* wgp = w + (size_t)(n0 + lr) * K + lc * 8;
    auto load_stage = [&](int slot, int kt) {
        unsigned char* sa = smem + slot * T::STAGE_BYTES;
        unsigned char* sb = sa + T::A_BYTES;
        const int k0 = kt * BK;
        const bool k_ok = k0 + lc * 8 < K;
        #pragma unroll
        for (int i = 0; i < BM / 32; ++i) {
            const bool ok = k_ok && m0 + lr + 32 * i < M;
            cp_async_16(sa + dst0 + i * 32 * 128, ok ? xg + (size_t)i * 32 * K + k0 : x, ok ? 16 : 0);
        }
        #pragma unroll
        for (int i = 0; i < BN / 32; ++i) {
            const bool ok = k_ok && n0 + lr + 32 * i < N;
            cp_async_16(sb + dst0 + i * 32 * 128, ok ? wgp + (size_t)i * 32 * K + k0 : w, ok ? 16 : 0);
        }
    };

    float acc[NACC];
    #pragma unroll
    for (int i = 0; i < NACC; ++i) acc[i] = 0.0f;
    auto fence_acc = [&]() {
        #pragma unroll
        for (int i = 0; i < NACC; ++i) reg_fence(acc[i]);
    };

    const int KT = (K + BK - 1) / BK;
    #pragma unroll
    for (int s = 0; s < STAGES - 2; ++s) {
        if (s < KT) load_stage(s, s);
        cp_async_commit();
    }
    for (int kt = 0; kt < KT; ++kt) {
        // committed: STAGES - 2 + kt groups; k-tile kt is group kt, so STAGES - 3 may stay in flight
        cp_async_wait<STAGES - 3>();
        fence_proxy_async();  // this thread's copies are read next by wgmma (the async proxy)
        __syncthreads();      // k-tile kt landed for everyone; every warpgroup is past kt - 2's wgmmas
        if (kt + STAGES - 2 < KT) load_stage((kt + STAGES - 2) % STAGES, kt + STAGES - 2);
        cp_async_commit();
        const u32 sa = sbase + (kt % STAGES) * T::STAGE_BYTES, sb = sa + T::A_BYTES;
        const u32 a0 = sa + wg * 64 * 128;
        fence_acc();
        if (K - kt * BK >= BK) {
            wgmma_fence();
            #pragma unroll
            for (int ks = 0; ks < BK / 16; ++ks)
                wgmma_bf16_ss<BN>(acc, wgmma_desc_sw128(a0 + ks * 32), wgmma_desc_sw128(sb + ks * 32));
        } else {  // a short last k-tile (K % 64 = 16, 32 or 48): only its real k16 steps
            for (int ks = 0; ks < (K - kt * BK) / 16; ++ks) {
                wgmma_fence();
                wgmma_bf16_ss<BN>(acc, wgmma_desc_sw128(a0 + ks * 32), wgmma_desc_sw128(sb + ks * 32));
            }
        }
        wgmma_commit();
        wgmma_wait<1>();
        fence_acc();
    }
    wgmma_wait<0>();
    fence_acc();
    cp_async_wait<0>();

    gemm_wg_epilogue<BN>(acc, bias, out, M, N, m0 + wg * 64 + (warp & 3) * 16, n0, lane, has_bias, out_f32);
}

// TMA variant (sm_90a): the same tiles, k order and epilogue as gemm_wg_body, but warp-specialized.
// Warpgroup 0 is the producer: one thread asks the tensor-memory accelerator (cp.async.bulk.tensor) for
// each k-tile's x [128][64] and w [BN][64] boxes, which land in the 128-byte swizzle the wgmma
// descriptors read (the tensor maps say SWIZZLE_128B; rows or k past the matrix arrive as zeros), and
// arrive.expect_tx on the slot's `full` mbarrier, whose phase completes when the bytes are in. Warpgroups
// 1 and 2 are the consumers: they wait for `full`, issue the k-tile's wgmmas and, once wgmma.wait_group 1
// says k-tile kt - 1's are done, release its slot on `empty` (one arrival per consumer warp), which
// the producer waits for before refilling it. No cp.async and no CTA barrier in the loop.
template <int BN_, int STAGES_>
struct GemmTmaTile {
    static constexpr int BM = GEMM_WG_BM, BN = BN_, BK = GEMM_WG_BK, STAGES = STAGES_, THREADS = GEMM_TMA_THREADS;
    static constexpr int A_BYTES = BM * BK * 2, STAGE_BYTES = (BM + BN) * BK * 2;
    static_assert(BN == 64 || BN == 128 || BN == 256, "wgmma n64, n128 or n256; a TMA box has at most 256 rows");
    static_assert(STAGES >= 3, "one slot being read, one in a running wgmma group, one being filled");
};

template <class T>
DEVICE void gemm_tma_body(const TensorMap* tx, const TensorMap* tw, const bf16_t* __restrict__ bias,
                          void* __restrict__ out, int M, int N, int K, int has_bias, int out_f32) {
    constexpr int BN = T::BN, BK = T::BK, STAGES = T::STAGES, NACC = BN / 2;
    extern __shared__ __align__(16) unsigned char gemm_tma_smem[];
    __shared__ __align__(8) unsigned long long bars[2 * STAGES];  // full[s], then empty[s]
    unsigned char* smem = align_1k(gemm_tma_smem);
    const u32 sbase = smem_u32(smem), full = smem_u32(bars), empty = full + 8 * STAGES;

    int tm, tn;
    gemm_tile_coords(M, N, T::BM, BN, tm, tn);
    const int m0 = tm * T::BM, n0 = tn * BN;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int wg = __shfl_sync(0xffffffffu, warp >> 2, 0);  // warp-uniform in the compiler's eyes
    const int KT = (K + BK - 1) / BK;
    if (tid == 0) {
        for (int s = 0; s < STAGES; ++s) {
            mbar_init(full + 8 * s, 1);
            mbar_init(empty + 8 * s, 8);  // the 8 consumer warps
        }
        fence_mbar_init();
    }
    __syncthreads();

    if (wg == 0) {  // producer
        if (tid == 0) {
            for (int kt = 0; kt < KT; ++kt) {
                const int s = kt % STAGES, use = kt / STAGES;
                if (use > 0) mbar_wait_in_asm(empty + 8 * s, (use - 1) & 1);  // k-tile kt - STAGES left it
                const u32 sa = sbase + s * T::STAGE_BYTES;
                mbar_arrive_expect_tx(full + 8 * s, T::STAGE_BYTES);
                tma_load_2d(sa, tx, kt * BK, m0, full + 8 * s);
                tma_load_2d(sa + T::A_BYTES, tw, kt * BK, n0, full + 8 * s);
            }
        }
        return;
    }

    const int c = wg - 1;  // consumer warpgroup: rows 64c .. 64c + 63 of the tile
    float acc[NACC];
    #pragma unroll
    for (int i = 0; i < NACC; ++i) acc[i] = 0.0f;
    for (int kt = 0; kt < KT; ++kt) {
        const int s = kt % STAGES;
        mbar_wait_in_asm(full + 8 * s, (kt / STAGES) & 1);
        const u32 sa = sbase + s * T::STAGE_BYTES, sb = sa + T::A_BYTES, a0 = sa + c * 64 * 128;
        if (K - kt * BK >= BK) {
            wgmma_fence();
            #pragma unroll
            for (int ks = 0; ks < BK / 16; ++ks)
                wgmma_bf16_ss<BN>(acc, wgmma_desc_sw128(a0 + ks * 32), wgmma_desc_sw128(sb + ks * 32));
        } else {  // a short last k-tile (K % 64 = 32): only its real k16 steps
            for (int ks = 0; ks < (K - kt * BK) / 16; ++ks) {
                wgmma_fence();
                wgmma_bf16_ss<BN>(acc, wgmma_desc_sw128(a0 + ks * 32), wgmma_desc_sw128(sb + ks * 32));
            }
        }
        wgmma_commit();
        wgmma_wait<1>();  // k-tile kt - 1's wgmmas are done: its slot may be refilled
        __syncwarp();
        mbar_arrive_if(empty + 8 * ((kt + STAGES - 1) % STAGES), lane == 0 && kt > 0);
    }
    wgmma_wait<0>();
    #pragma unroll
    for (int i = 0; i < NACC; ++i) reg_fence(acc[i]);
    gemm_wg_epilogue<BN>(acc, bias, out, M, N, m0 + c * 64 + (warp & 3) * 16, n0, lane, has_bias, out_f32);
}
#endif  // GPTOSS_HAS_WGMMA

#else  // portable path (AMD and anything without mma.sync)

// Tiled FMA GEMM over the same tiles and grid: BKF-deep fp32 tiles of x and w in static shared memory
// (stored k-major so a thread's reads are broadcasts/strided), each thread a TM x TN register tile of
// outputs rows ty + i*TY, cols tx + j*TX. One fmaf per k in increasing order: batch invariant too.
// Works for any warp size: only __syncthreads, no warp-level primitives. Launched with T::THREADS threads
// and no dynamic shared memory.
template <class T>
DEVICE void gemm_body(const bf16_t* __restrict__ x, const bf16_t* __restrict__ w, const bf16_t* __restrict__ bias,
                      void* __restrict__ out, int M, int N, int K, int has_bias, int out_f32) {
    constexpr int BM = T::BM, BN = T::BN, THREADS = T::THREADS, BKF = 16;
    constexpr int TX = BN < 16 ? BN : 16, TN = BN / TX, TY = THREADS / TX, TM = BM / TY;
    static_assert(TX * TN == BN && TX * TY == THREADS && TY * TM == BM, "portable register tiling");
    __shared__ float As[BKF][BM];
    __shared__ float Bs[BKF][BN];

    int tm, tn;
    gemm_tile_coords(M, N, BM, BN, tm, tn);
    const int m0 = tm * BM, n0 = tn * BN;
    const int tid = threadIdx.x, tx = tid % TX, ty = tid / TX;

    float acc[TM][TN];
    #pragma unroll
    for (int i = 0; i < TM; ++i)
        #pragma unroll
        for (int j = 0; j < TN; ++j) acc[i][j] = 0.0f;

    for (int k0 = 0; k0 < K; k0 += BKF) {  // K % 16 == 0
        for (int e = tid; e < BM * BKF; e += THREADS) {
            const int m = e / BKF, kk = e % BKF;
            As[kk][m] = m0 + m < M ? bf16_to_float(x[(size_t)(m0 + m) * K + k0 + kk]) : 0.0f;
        }
        for (int e = tid; e < BN * BKF; e += THREADS) {
            const int n = e / BKF, kk = e % BKF;
            Bs[kk][n] = n0 + n < N ? bf16_to_float(w[(size_t)(n0 + n) * K + k0 + kk]) : 0.0f;
        }
        __syncthreads();
        #pragma unroll
        for (int kk = 0; kk < BKF; ++kk) {
            float a[TM], b[TN];
            #pragma unroll
            for (int i = 0; i < TM; ++i) a[i] = As[kk][ty + i * TY];
            #pragma unroll
            for (int j = 0; j < TN; ++j) b[j] = Bs[kk][tx + j * TX];
            #pragma unroll
            for (int i = 0; i < TM; ++i)
                #pragma unroll
                for (int j = 0; j < TN; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
        }
        __syncthreads();
    }

    #pragma unroll
    for (int j = 0; j < TN; ++j) {
        const int col = n0 + tx + j * TX;
        if (col >= N) continue;
        const float b = has_bias ? bf16_to_float(bias[col]) : 0.0f;
        #pragma unroll
        for (int i = 0; i < TM; ++i) {
            const int row = m0 + ty + i * TY;
            if (row >= M) continue;
            const size_t off = (size_t)row * N + col;
            if (out_f32) reinterpret_cast<float*>(out)[off] = acc[i][j] + b;
            else reinterpret_cast<bf16_t*>(out)[off] = float_to_bf16(acc[i][j] + b);
        }
    }
}

#endif  // GPTOSS_HAS_MMA

// gemm_<NAME>(x [M, K] bf16, w [N, K] bf16, bias [N] bf16 (read only if has_bias), out [M, N] bf16 or
// f32 (out_f32), M, N, K): K % 32 == 0, x and w 16-byte aligned. Grid: ceil(M/BM) * ceil(N/BN) CTAs of
// 32*WM*WN threads; dynamic shared memory STAGES*(BM+BN)*BK*2 bytes on NVIDIA, none on the portable path.
#define GEMM_KERNEL(NAME, BM, BN, BK, WM, WN, STAGES, MIN_BLOCKS)                                           \
    extern "C" __global__ void __launch_bounds__(32 * (WM) * (WN), MIN_BLOCKS)                              \
    gemm_##NAME(const bf16_t* __restrict__ x, const bf16_t* __restrict__ w, const bf16_t* __restrict__ bias, \
                void* __restrict__ out, int M, int N, int K, int has_bias, int out_f32) {                    \
        GPTOSS_WAIT_PRIOR_GRID();                                                                          \
        GPTOSS_LAUNCH_DEPENDENTS();                                                                        \
        gemm_body<GemmTile<BM, BN, BK, WM, WN, STAGES>>(x, w, bias, out, M, N, K, has_bias, out_f32);      \
    }

// Large M (prefill / getp): 64x64 warp tiles, BK = 64.
GEMM_KERNEL(256x128, 256, 128, 64, 4, 2, 4, 1)  // 8 warps, 192 KiB smem, 1 CTA/SM
GEMM_KERNEL(128x128, 128, 128, 64, 2, 2, 3, 2)  // 4 warps,  96 KiB smem, 2 CTAs/SM
GEMM_KERNEL(64x128, 64, 128, 64, 2, 2, 4, 2)    // 4 warps (32x64 warp tiles), 96 KiB
GEMM_KERNEL(64x64, 64, 64, 64, 2, 2, 4, 3)      // 4 warps (32x32 warp tiles), 64 KiB

// Small M (decode): BM = 16/32/64 rows, narrow column tiles so that N = 2880 still makes >= 132 CTAs,
// BK = 128 and a deep ring so that each CTA keeps several KiB of W in flight.
GEMM_KERNEL(d16x8, 16, 8, 128, 1, 1, 12, 1)
GEMM_KERNEL(d16x16, 16, 16, 128, 1, 2, 12, 1)
GEMM_KERNEL(d16x32, 16, 32, 128, 1, 4, 8, 1)
GEMM_KERNEL(d16x64, 16, 64, 128, 1, 4, 4, 1)
GEMM_KERNEL(d32x8, 32, 8, 128, 2, 1, 9, 1)
GEMM_KERNEL(d32x16, 32, 16, 128, 2, 2, 8, 1)
GEMM_KERNEL(d32x32, 32, 32, 128, 1, 4, 6, 1)
GEMM_KERNEL(d32x64, 32, 64, 128, 1, 4, 4, 1)
GEMM_KERNEL(d64x8, 64, 8, 128, 4, 1, 5, 1)
GEMM_KERNEL(d64x16, 64, 16, 128, 2, 2, 4, 1)
GEMM_KERNEL(d64x32, 64, 32, 128, 2, 2, 4, 1)
GEMM_KERNEL(d64x64, 64, 64, 128, 2, 2, 3, 1)

// wgmma variants (sm_90a builds only: H100/H200, where ops/gemm.py takes them for M > 64): 128 x BN tiles,
// 2 warpgroups, dynamic shared memory STAGES * (128 + BN) * 128 bytes + 1 KB of alignment slack.
#if GPTOSS_HAS_WGMMA
#define GEMM_WG_KERNEL(NAME, BN, STAGES, MIN_BLOCKS)                                                       \
    extern "C" __global__ void __launch_bounds__(GEMM_WG_THREADS, MIN_BLOCKS)                               \
    gemm_##NAME(const bf16_t* __restrict__ x, const bf16_t* __restrict__ w, const bf16_t* __restrict__ bias, \
                void* __restrict__ out, int M, int N, int K, int has_bias, int out_f32) {                    \
        GPTOSS_WAIT_PRIOR_GRID();                                                                           \
        GPTOSS_LAUNCH_DEPENDENTS();                                                                         \
        gemm_wg_body<GemmWgTile<BN, STAGES>>(x, w, bias, out, M, N, K, has_bias, out_f32);                  \
    }
GEMM_WG_KERNEL(wg128x256, 256, 4, 1)  // 192 KiB smem, 1 CTA/SM, 128 accumulators per thread
GEMM_WG_KERNEL(wg128x128, 128, 3, 2)  // 96 KiB smem, 2 CTAs/SM

// TMA variant: the tensor maps of x ([M, K], box 64 x 128) and w ([N, K], box 64 x BN) come by value
// (gptoss/ops/tma.py builds them); 3 warpgroups (a producer and two consumers).
#define GEMM_TMA_KERNEL(NAME, BN, STAGES, MIN_BLOCKS)                                                      \
    extern "C" __global__ void __launch_bounds__(GEMM_TMA_THREADS, MIN_BLOCKS)                             \
    gemm_##NAME(const __grid_constant__ TensorMap tx, const __grid_constant__ TensorMap tw,                \
                const bf16_t* __restrict__ bias, void* __restrict__ out, int M, int N, int K, int has_bias, \
                int out_f32) {                                                                             \
        GPTOSS_WAIT_PRIOR_GRID();                                                                         \
        GPTOSS_LAUNCH_DEPENDENTS();                                                                       \
        gemm_tma_body<GemmTmaTile<BN, STAGES>>(&tx, &tw, bias, out, M, N, K, has_bias, out_f32);          \
    }
GEMM_TMA_KERNEL(wgt128x256, 256, 4, 1)  // 192 KiB smem, 1 CTA/SM
GEMM_TMA_KERNEL(wgt128x128, 128, 4, 1)  // 128 KiB smem, 1 CTA/SM
GEMM_TMA_KERNEL(wgt128x64, 64, 4, 2)    // 96 KiB smem, 2 CTAs/SM
#endif
