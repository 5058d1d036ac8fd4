// Mixture-of-experts routing: the router (logits, top-k, softmax over the chosen k), the dispatch that
// groups the T*k (token, expert) slots by expert on the GPU, and the final combine of the k expert
// outputs of each token into the residual stream. The expert GEMMs themselves are in moe.hip.
// Small steps run the router and the dispatch as one launch (route_dispatch: the router-logits grid, whose
// last CTA to finish does the top-k and the dispatch); larger ones as three (router_logits or, for large
// steps, router_sums_*; router_topk; moe_dispatch). All give the same bits: the sums are the same fp32
// additions in the same order, whichever kernel makes them.
//
// Batch invariance (docs/DESIGN.md): every float result of a token depends only on that token's data.
//  - router_logits: logit[t][e] = (((p0 + p1) + p2) + ... + p31) + bias[e], where p_s is the fp32 sum, in
//    increasing h, of t[t][h] * w[e][h] over the s-th of ROUTER_SPLITS fixed slices of H. The split
//    exists only to give decode (T = 1..64) enough CTAs; it is the same for every T. router_logits writes
//    each p_s for router_topk to sum; router_sums_* (larger T) makes the same p_s with more outputs per
//    thread, and with one CTA per tile over all of H (Z = 1) adds them up itself in the same order.
//  - dispatch is integer work (counts and a stable order: slot order inside an expert), exact.
//  - combine: x[t] += ((o0 + o1) + o2) + o3, in increasing j, no atomics.
#include "common.h"

#define ROUTER_SPLITS 32  // slices of H summed in fixed order (ops/moe.py: ROUTER_SPLITS)
#define ROUTER_TT 32      // tokens per CTA
#define ROUTER_TE 32      // experts per CTA
#define ROUTER_HC 32      // h per shared-memory chunk
#define ROUTER_THREADS 256
#define TOPK_MAX 8        // largest k router_topk supports
#define DISPATCH_THREADS 1024
#define DISPATCH_MAX_E 256
#define DISPATCH_CACHE 32 // WARP_SIZE-slot steps per warp whose expert ids stay in registers
// route_dispatch's last CTA sums the T*E logits into shared memory FUSED_MAX_LOGITS at a time (8 KB), any T
// in rounds. The host takes the one launch only up to T*E <= 256 (ops/moe.py fused_routing,
// FUSED_ROUTING_MAX_LOGITS): the lone CTA then reads T*E*ROUTER_SPLITS*4 <= 32 KB of partials from L2 and
// routes <= 8 tokens (20b) in one round, little work next to the two launches it replaces (router_topk +
// moe_dispatch: ~11 us at T = 1 under ncu, nearly all fixed cost). benchmarks/kernel_routing.py measured
// the one launch faster at T = 1 and 8 on 20b and twice as slow at T = 64, where router_topk's ceil(T/8)
// CTAs win.
// FUSED_CACHE: its dispatch's register cache, FUSED_CACHE steps of ROUTER_THREADS slots: every step the
// host sends it when k <= E/2 (T*k <= T*E/2 <= FUSED_MAX_LOGITS/2; gpt-oss: k = E/8, E/32). 8 steps made
// ptxas spill on sm_90.
#define FUSED_MAX_LOGITS 2048
#define FUSED_CACHE 4

// ---- router logits ------------------------------------------------------------------------------
// grid (ceil(T / ROUTER_TT), ceil(E / ROUTER_TE), ROUTER_SPLITS), ROUTER_THREADS threads. Thread
// (q = tid / ROUTER_TE, e = tid % ROUTER_TE) owns tokens 4q..4q+3 of the tile and expert e: per h it reads
// one float4 of t (the same for the ROUTER_TE threads of a group: a broadcast) and one w value, for four
// FMAs. (Tile sizes, not warp widths: no warp-level primitive here.)
// partial: [ROUTER_SPLITS, T, E] float32.
// t is bf16 (router_logits) or fp32 (router_logits_f32: the unrounded normed activations).
DEVICE float4 router_load4(const bf16_t* p) {
    const uint2 q = *reinterpret_cast<const uint2*>(p);  // 4 bf16 = 8 bytes
    return make_float4(bf16x2_lo(q.x), bf16x2_hi(q.x), bf16x2_lo(q.y), bf16x2_hi(q.y));
}
DEVICE float4 router_load4(const float* p) { return *reinterpret_cast<const float4*>(p); }

template <typename TIn>
DEVICE void router_logits_tile(const TIn* __restrict__ t, const bf16_t* __restrict__ w,
                               float* __restrict__ partial, int T, int E, int H) {
    __shared__ __align__(16) float st[ROUTER_HC][ROUTER_TT];  // [h][token]
    __shared__ float sw[ROUTER_HC][ROUTER_TE + 1];            // [h][expert]
    const int tid = threadIdx.x;
    const int t0 = blockIdx.x * ROUTER_TT, e0 = blockIdx.y * ROUTER_TE;
    const int q = tid / ROUTER_TE, el = tid % ROUTER_TE;
    const int chunks = H / ROUTER_HC;                           // H % 32 == 0 (checked by the launcher)
    const int c_begin = (int)((long long)blockIdx.z * chunks / ROUTER_SPLITS);
    const int c_end = (int)((long long)(blockIdx.z + 1) * chunks / ROUTER_SPLITS);
    // loader: thread -> (row = tid / 8, 4 consecutive h at (tid % 8) * 4), for t and for w
    const int lr = tid / 8, lh = (tid % 8) * 4;
    const bool t_ok = t0 + lr < T, w_ok = e0 + lr < E;
    const TIn* tp = t + (size_t)(t_ok ? t0 + lr : 0) * H + lh;
    const bf16_t* wp = w + (size_t)(w_ok ? e0 + lr : 0) * H + lh;

    float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    // 4 bf16 = 8 bytes (rows start 64-byte aligned: H % 32 == 0 and the launcher checks the bases). The
    // next chunk's loads are issued before this chunk's FMAs, so a CTA's few chunks overlap their latency.
    const float4 zero4 = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    float4 tn = t_ok && c_begin < c_end ? router_load4(tp + c_begin * ROUTER_HC) : zero4;
    uint2 wn = w_ok && c_begin < c_end ? *reinterpret_cast<const uint2*>(wp + c_begin * ROUTER_HC) : make_uint2(0u, 0u);
    for (int c = c_begin; c < c_end; ++c) {
        const float4 tq = tn;
        const uint2 wq = wn;
        if (c + 1 < c_end) {
            const int h1 = (c + 1) * ROUTER_HC;
            tn = t_ok ? router_load4(tp + h1) : zero4;
            wn = w_ok ? *reinterpret_cast<const uint2*>(wp + h1) : make_uint2(0u, 0u);
        }
        __syncthreads();  // the previous chunk's readers are done
        st[lh + 0][lr] = tq.x; st[lh + 1][lr] = tq.y;
        st[lh + 2][lr] = tq.z; st[lh + 3][lr] = tq.w;
        sw[lh + 0][lr] = bf16x2_lo(wq.x); sw[lh + 1][lr] = bf16x2_hi(wq.x);
        sw[lh + 2][lr] = bf16x2_lo(wq.y); sw[lh + 3][lr] = bf16x2_hi(wq.y);
        __syncthreads();
        #pragma unroll 8
        for (int h = 0; h < ROUTER_HC; ++h) {
            const float4 x = *reinterpret_cast<const float4*>(&st[h][4 * q]);
            const float we = sw[h][el];
            acc[0] = fmaf(x.x, we, acc[0]);
            acc[1] = fmaf(x.y, we, acc[1]);
            acc[2] = fmaf(x.z, we, acc[2]);
            acc[3] = fmaf(x.w, we, acc[3]);
        }
    }
    const int e = e0 + el;
    if (e < E) {
        for (int i = 0; i < 4; ++i) {
            const int tok = t0 + 4 * q + i;
            if (tok < T) partial[((size_t)blockIdx.z * T + tok) * E + e] = acc[i];
        }
    }
}

extern "C" __global__ void __launch_bounds__(ROUTER_THREADS)
router_logits(const bf16_t* __restrict__ t, const bf16_t* __restrict__ w, float* __restrict__ partial,
              int T, int E, int H) {
    GPTOSS_WAIT_PRIOR_GRID();
    GPTOSS_LAUNCH_DEPENDENTS();
    router_logits_tile<bf16_t>(t, w, partial, T, E, H);
}

extern "C" __global__ void __launch_bounds__(ROUTER_THREADS)
router_logits_f32(const float* __restrict__ t, const bf16_t* __restrict__ w, float* __restrict__ partial,
                  int T, int E, int H) {
    GPTOSS_WAIT_PRIOR_GRID();
    GPTOSS_LAUNCH_DEPENDENTS();
    router_logits_tile<float>(t, w, partial, T, E, H);
}

// ---- router logits, register-tiled (larger steps) -----------------------------------------------------
// router_sums_<TT>x<TE>_<RT>x<RE>(_f32): grid (ceil(T / TT), ceil(E / TE), Z) with Z = ROUTER_SPLITS or 1,
// TT * TE / (RT * RE) threads. Thread (qt = tid / (TE/RE), qe = tid % (TE/RE)) owns tokens RT qt .. + RT-1
// and experts RE qe .. + RE-1 of the tile: per h RT floats of t and RE of w from shared memory for RT RE
// FMAs (router_logits: 4 FMAs per 5 floats). Each p_s is fmaf from 0 in increasing h over slice s, as in
// router_logits. Z = ROUTER_SPLITS: CTA z makes p_z and writes it to partial z of [ROUTER_SPLITS, T, E]
// (router_logits' output). Z = 1: a CTA runs all slices in order and keeps ((p0 + p1) + ...) + p_s, the
// order router_topk adds the partials in, and writes the sum to [T, E] (router_topk_summed). Either way the
// same bits as router_logits + router_topk.
// Loader: a piece is 8 consecutive h of one row; piece p of a chunk is row p % rows, h (p / rows) * 8, so
// consecutive threads store consecutive rows of st / sw (different banks).
DEVICE void router_load8(const bf16_t* p, float v[8]) {  // 8-byte aligned (rows of H % 32 == 0)
    const uint2 a = *reinterpret_cast<const uint2*>(p), b = *reinterpret_cast<const uint2*>(p + 4);
    v[0] = bf16x2_lo(a.x); v[1] = bf16x2_hi(a.x); v[2] = bf16x2_lo(a.y); v[3] = bf16x2_hi(a.y);
    v[4] = bf16x2_lo(b.x); v[5] = bf16x2_hi(b.x); v[6] = bf16x2_lo(b.y); v[7] = bf16x2_hi(b.y);
}
DEVICE void router_load8(const float* p, float v[8]) {  // 16-byte aligned
    const float4 a = *reinterpret_cast<const float4*>(p), b = *reinterpret_cast<const float4*>(p + 4);
    v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w; v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
}

// A 32-h chunk of a tile's operand (ROWS rows): PIECES pieces per thread, loaded into registers while
// the previous chunk is multiplied, then stored transposed into shared memory [h][row].
template <typename TIn, int ROWS, int THREADS>
struct RouterChunk {
    static constexpr int PIECES = (4 * ROWS + THREADS - 1) / THREADS;  // 4 pieces of 8 h per row
    const TIn* src[PIECES];
    bool ok[PIECES];
    float v[PIECES][8];
    DEVICE static int piece(int i) { return (int)threadIdx.x + i * THREADS; }
    DEVICE void init(const TIn* base, int row0, int rows, int H) {
        #pragma unroll
        for (int i = 0; i < PIECES; ++i) {
            const int pc = piece(i), r = pc % ROWS;
            ok[i] = pc < 4 * ROWS && row0 + r < rows;
            src[i] = base + (size_t)(ok[i] ? row0 + r : 0) * H + (pc / ROWS % 4) * 8;
        }
    }
    DEVICE void load(int c) {  // chunk c
        #pragma unroll
        for (int i = 0; i < PIECES; ++i) {
            if (ok[i]) {
                router_load8(src[i] + c * ROUTER_HC, v[i]);
            } else {
                #pragma unroll
                for (int j = 0; j < 8; ++j) v[i][j] = 0.0f;
            }
        }
    }
    DEVICE void store(float (*dst)[ROWS]) const {
        #pragma unroll
        for (int i = 0; i < PIECES; ++i) {
            const int pc = piece(i);
            if (pc < 4 * ROWS)
                #pragma unroll
                for (int j = 0; j < 8; ++j) dst[(pc / ROWS) * 8 + j][pc % ROWS] = v[i][j];
        }
    }
};

template <int N>
DEVICE void router_lds(const float* p, float v[N]) {  // N consecutive floats, aligned to min(N, 4) floats
    if constexpr (N % 4 == 0) {
        #pragma unroll
        for (int i = 0; i < N; i += 4) {
            const float4 q = *reinterpret_cast<const float4*>(p + i);
            v[i] = q.x; v[i + 1] = q.y; v[i + 2] = q.z; v[i + 3] = q.w;
        }
    } else if constexpr (N == 2) {
        const float2 q = *reinterpret_cast<const float2*>(p);
        v[0] = q.x; v[1] = q.y;
    } else {
        static_assert(N == 1, "1, 2 or a multiple of 4 floats");
        v[0] = *p;
    }
}

template <typename TIn, int TT, int TE, int RT, int RE>
DEVICE void router_sums_tile(const TIn* __restrict__ t, const bf16_t* __restrict__ w, float* __restrict__ out,
                             int T, int E, int H) {
    constexpr int QE = TE / RE, THREADS = TT * TE / (RT * RE);
    static_assert(TT % RT == 0 && TE % RE == 0, "RT x RE outputs per thread");
    __shared__ __align__(16) float st[ROUTER_HC][TT];  // [h][token]
    __shared__ __align__(16) float sw[ROUTER_HC][TE];  // [h][expert]
    const int tid = threadIdx.x, qt = tid / QE, qe = tid % QE;
    const int t0 = blockIdx.x * TT, e0 = blockIdx.y * TE;
    const int chunks = H / ROUTER_HC;  // H % 32 == 0 (the launcher checks)
    auto slice_end = [&](int s) { return (int)((long long)(s + 1) * chunks / ROUTER_SPLITS); };
    const int per_cta = ROUTER_SPLITS / (int)gridDim.z;  // slices: ROUTER_SPLITS / Z, Z = 1 or ROUTER_SPLITS
    const int s_first = blockIdx.z * per_cta, s_last = s_first + per_cta - 1;
    const int c_begin = s_first == 0 ? 0 : slice_end(s_first - 1), c_end = slice_end(s_last);
    RouterChunk<TIn, TT, THREADS> tr;
    RouterChunk<bf16_t, TE, THREADS> wr;
    tr.init(t, t0, T, H);
    wr.init(w, e0, E, H);

    float acc[RT][RE], sum[RT][RE];
    #pragma unroll
    for (int i = 0; i < RT; ++i)
        #pragma unroll
        for (int j = 0; j < RE; ++j) acc[i][j] = sum[i][j] = 0.0f;
    int s = s_first;           // the slice acc belongs to
    int s_end = slice_end(s);  // its end chunk
    auto fold = [&]() {        // slice s is done: sum += p_s
        #pragma unroll
        for (int i = 0; i < RT; ++i)
            #pragma unroll
            for (int j = 0; j < RE; ++j) {
                sum[i][j] = s == s_first ? acc[i][j] : sum[i][j] + acc[i][j];
                acc[i][j] = 0.0f;
            }
        ++s;
        s_end = slice_end(s);
    };
    if (c_begin < c_end) {
        tr.load(c_begin);
        wr.load(c_begin);
    }
    for (int c = c_begin; c < c_end; ++c) {
        __syncthreads();  // the previous chunk's readers are done
        tr.store(st);
        wr.store(sw);
        __syncthreads();
        if (c + 1 < c_end) {  // the next chunk's loads, in flight while this one is multiplied
            tr.load(c + 1);
            wr.load(c + 1);
        }
        while (c == s_end) fold();  // the slices that end before chunk c (empty ones too: p_s = 0)
        #pragma unroll 4
        for (int h = 0; h < ROUTER_HC; ++h) {
            float xs[RT], ws[RE];
            router_lds<RT>(&st[h][RT * qt], xs);
            router_lds<RE>(&sw[h][RE * qe], ws);
            #pragma unroll
            for (int i = 0; i < RT; ++i)
                #pragma unroll
                for (int j = 0; j < RE; ++j) acc[i][j] = fmaf(xs[i], ws[j], acc[i][j]);
        }
    }
    while (s <= s_last) fold();
    float* dst = out + (size_t)blockIdx.z * T * E;
    #pragma unroll
    for (int i = 0; i < RT; ++i) {
        const int tok = t0 + RT * qt + i;
        #pragma unroll
        for (int j = 0; j < RE; ++j) {
            const int e = e0 + RE * qe + j;
            if (tok < T && e < E) dst[(size_t)tok * E + e] = sum[i][j];
        }
    }
}

// The tiles ops/moe.py launches (its ROUTER_TILES): name, TT, TE, RT, RE (threads TT * TE / (RT RE)).
#define ROUTER_SUMS_KERNEL(NAME, TT, TE, RT, RE)                                                        \
    extern "C" __global__ void __launch_bounds__((TT) * (TE) / ((RT) * (RE)))                           \
    NAME(const bf16_t* __restrict__ t, const bf16_t* __restrict__ w, float* __restrict__ out, int T,    \
         int E, int H) {                                                                                \
        GPTOSS_WAIT_PRIOR_GRID();                                                                       \
        GPTOSS_LAUNCH_DEPENDENTS();                                                                     \
        router_sums_tile<bf16_t, TT, TE, RT, RE>(t, w, out, T, E, H);                                   \
    }                                                                                                   \
    extern "C" __global__ void __launch_bounds__((TT) * (TE) / ((RT) * (RE)))                           \
    NAME##_f32(const float* __restrict__ t, const bf16_t* __restrict__ w, float* __restrict__ out, int T, \
               int E, int H) {                                                                          \
        GPTOSS_WAIT_PRIOR_GRID();                                                                       \
        GPTOSS_LAUNCH_DEPENDENTS();                                                                     \
        router_sums_tile<float, TT, TE, RT, RE>(t, w, out, T, E, H);                                    \
    }
//                 name                    TT  TE  RT  RE
ROUTER_SUMS_KERNEL(router_sums_64x64_4x4,  64, 64, 4,  4)
ROUTER_SUMS_KERNEL(router_sums_64x32_8x4,  64, 32, 8,  4)

// ---- top-k and softmax --------------------------------------------------------------------------
// Logit (tok, e) = the SPLITS partials [SPLITS, T, E] in increasing split order, then the bias: the one
// order of the file header, whichever kernel sums it (ROUTER_SPLITS partials of router_logits or of
// router_sums_* with Z = ROUTER_SPLITS; 1, the sum already made in that order, with Z = 1).
template <int SPLITS>
DEVICE float router_logit(const float* partial, const bf16_t* bias, int T, int E, int tok, int e) {
    float s = partial[(size_t)tok * E + e];
    #pragma unroll
    for (int p = 1; p < SPLITS; ++p) s += partial[((size_t)p * T + tok) * E + e];  // loads all in flight
    return s + bf16_to_float(bias[e]);
}

// One warp, one token: lane l holds experts l, l + WARP_SIZE, ... (logit(e) gives expert e's logit). The
// k picks go in order of decreasing logit, ties to the lower expert index; weights = softmax over the k
// picked logits. Lane 0 writes experts[tok][*], weights[tok][*] and, when local != experts (a
// tensor-parallel rank), local[tok][*] = expert - first (the rank's expert indices).
template <typename Logit>
DEVICE void topk_softmax_warp(Logit logit, int lane, int tok, int E, int k, int* experts, float* weights,
                              int* local, int first) {
    constexpr int EJ = DISPATCH_MAX_E / WARP_SIZE;  // values per lane (E <= DISPATCH_MAX_E)
    float v[EJ];
    #pragma unroll
    for (int j = 0; j < EJ; ++j) {
        const int e = lane + j * WARP_SIZE;
        v[j] = e < E ? logit(e) : NEG_INF_F;
    }
    unsigned taken = 0;  // bit j: v[j] already picked
    float pick_v[TOPK_MAX];
    int pick_e[TOPK_MAX];
    for (int r = 0; r < k; ++r) {  // k <= TOPK_MAX (checked by the launcher)
        float bv = NEG_INF_F;
        int be = 0x7fffffff;
        #pragma unroll
        for (int j = 0; j < EJ; ++j) {
            const int e = lane + j * WARP_SIZE;
            if (e < E && !(taken >> j & 1u) && (v[j] > bv || (v[j] == bv && e < be))) { bv = v[j]; be = e; }
        }
        for (int m = WARP_SIZE / 2; m > 0; m >>= 1) {
            const float ov = WARP_SHFL_XOR(bv, m);
            const int oe = WARP_SHFL_XOR(be, m);
            if (ov > bv || (ov == bv && oe < be)) { bv = ov; be = oe; }
        }
        if (be < E && be % WARP_SIZE == lane) taken |= 1u << (be / WARP_SIZE);
        if (be >= E) be = 0;  // only with NaN logits: keep the index valid
        pick_v[r] = bv;
        pick_e[r] = be;
    }
    if (lane == 0) {
        // softmax over the picks; pick_v[0] is the largest
        float ex[TOPK_MAX], sum = 0.0f;
        for (int r = 0; r < k; ++r) { ex[r] = expf(pick_v[r] - pick_v[0]); sum += ex[r]; }
        const float inv = 1.0f / sum;
        for (int r = 0; r < k; ++r) {
            experts[(size_t)tok * k + r] = pick_e[r];
            weights[(size_t)tok * k + r] = ex[r] * inv;
            if (local != experts) local[(size_t)tok * k + r] = pick_e[r] - first;
        }
    }
}

// One warp per token: router_topk adds the ROUTER_SPLITS partials of router_logits or router_sums_* with
// Z = ROUTER_SPLITS, router_topk_summed reads the one sum of router_sums_* with Z = 1.
template <int SPLITS>
DEVICE void router_topk_body(const float* partial, const bf16_t* bias, int* experts, float* weights, int T,
                             int E, int k) {
    const int lane = threadIdx.x % WARP_SIZE;
    const int tok = blockIdx.x * (blockDim.x / WARP_SIZE) + threadIdx.x / WARP_SIZE;
    if (tok >= T) return;  // whole warps leave together
    topk_softmax_warp([&](int e) { return router_logit<SPLITS>(partial, bias, T, E, tok, e); }, lane, tok, E, k,
                      experts, weights, experts, 0);
}

extern "C" __global__ void
router_topk(const float* __restrict__ partial, const bf16_t* __restrict__ bias, int* __restrict__ experts,
            float* __restrict__ weights, int T, int E, int k) {
    GPTOSS_WAIT_PRIOR_GRID();
    GPTOSS_LAUNCH_DEPENDENTS();
    router_topk_body<ROUTER_SPLITS>(partial, bias, experts, weights, T, E, k);
}

extern "C" __global__ void
router_topk_summed(const float* __restrict__ partial, const bf16_t* __restrict__ bias, int* __restrict__ experts,
                   float* __restrict__ weights, int T, int E, int k) {
    GPTOSS_WAIT_PRIOR_GRID();
    GPTOSS_LAUNCH_DEPENDENTS();
    router_topk_body<1>(partial, bias, experts, weights, T, E, k);
}

// ---- dispatch -----------------------------------------------------------------------------------
// One CTA of THREADS threads (moe_dispatch: DISPATCH_THREADS; route_dispatch's last CTA: ROUTER_THREADS;
// the outputs do not depend on it). Slots s = t*k + j (S = T*k of them) are sorted by expert, stably:
//   offsets[e] .. offsets[e+1]-1 are the positions of expert e's slots in sorted_slots, in slot order.
// Warp w of the NW = THREADS / WARP_SIZE owns the contiguous slots [w*span, (w+1)*span). Pass 1 counts
// per (warp, expert); an exclusive scan over warps (per expert) and over experts gives each warp its
// first position per expert; pass 2 walks the span again in order and places each slot at base + its
// rank among the lanes of the same expert in this WARP_SIZE-slot step (lower lanes first), so the order
// is the slot order.
//
// Then the tile schedules of the expert GEMMs, for three tile heights bm_a, bm_b, bm_c: tile i of
// tiles_x ([ntiles_x, 2] int32) = (expert, first sorted row) of the i-th bm-row tile, experts in
// order, tiles in row order inside an expert; tiles past the last one get expert -1 (their CTAs
// exit). ntiles_x is the launch bound ceil(S / bm) + min(E, S) >= sum_e ceil(M_e / bm).
// CACHE: the register cache depth (WARP_SIZE-slot steps per warp whose expert ids pass 1 keeps for
// pass 2). experts is a plain pointer: in route_dispatch this CTA has just written it (no loads through
// the read-only cache).
template <int THREADS, int CACHE>
DEVICE void dispatch_block(const int* experts, int S, int E, int* offsets, int* sorted_slots, int bm_a,
                           int* tiles_a, int ntiles_a, int bm_b, int* tiles_b, int ntiles_b, int bm_c,
                           int* tiles_c, int ntiles_c) {
    constexpr int NW = THREADS / WARP_SIZE;
    __shared__ int cnt[NW * DISPATCH_MAX_E];           // per (warp, expert): count, then first position
    __shared__ int s_off[DISPATCH_MAX_E + 1];          // row offsets
    constexpr int NH = 3;                              // tile heights (schedules)
    __shared__ int s_t[NH][DISPATCH_MAX_E + 1];        // first tile of each expert, per height
    const int bm[NH] = {bm_a, bm_b, bm_c}, ntiles[NH] = {ntiles_a, ntiles_b, ntiles_c};
    int* const tiles[NH] = {tiles_a, tiles_b, tiles_c};
    const int tid = threadIdx.x, lane = tid % WARP_SIZE, warp = tid / WARP_SIZE;
    const int steps = (S + NW * WARP_SIZE - 1) / (NW * WARP_SIZE);  // WARP_SIZE-slot steps per warp
    const int span = steps * WARP_SIZE;
    const int begin = warp * span, end = min(begin + span, S);

    for (int i = tid; i < NW * E; i += THREADS) cnt[i] = 0;
    __syncthreads();
    // pass 1: integer counts (the atomics only make the count, whose value is order-free). The first
    // CACHE steps keep their expert ids in registers for pass 2 (moe_dispatch: S <= 32768 with 1024
    // threads, every getp step), so the loads are issued back to back and read once.
    int ecache[CACHE];
    #pragma unroll
    for (int it = 0; it < CACHE; ++it) {
        const int s = begin + it * WARP_SIZE + lane;
        ecache[it] = (it < steps && s < end) ? experts[s] : -1;
    }
    #pragma unroll
    for (int it = 0; it < CACHE; ++it)
        if ((unsigned)ecache[it] < (unsigned)E) atomicAdd(&cnt[warp * E + ecache[it]], 1);
    for (int s = begin + CACHE * WARP_SIZE + lane; s < end; s += WARP_SIZE) {
        const int e = experts[s];
        if ((unsigned)e < (unsigned)E) atomicAdd(&cnt[warp * E + e], 1);
    }
    __syncthreads();
    // per expert: exclusive scan over warps; total rows of the expert into s_off[e]
    for (int e = tid; e < E; e += THREADS) {
        int run = 0;
        for (int w = 0; w < NW; ++w) {
            const int c = cnt[w * E + e];
            cnt[w * E + e] = run;
            run += c;
        }
        s_off[e] = run;
    }
    __syncthreads();
    // exclusive scans over experts of rows and of tiles of each height (warp 0, WARP_SIZE at a time)
    if (warp == 0) {
        int carry_r = 0, carry_t[NH] = {};
        for (int e0 = 0; e0 < E; e0 += WARP_SIZE) {
            const int e = e0 + lane;
            const int m = e < E ? s_off[e] : 0;
            int r = m, mt[NH], t[NH];  // inclusive scans of rows and of tiles
            #pragma unroll
            for (int h = 0; h < NH; ++h) t[h] = mt[h] = (m + bm[h] - 1) / bm[h];
            for (int d = 1; d < WARP_SIZE; d <<= 1) {
                const int src = lane >= d ? lane - d : lane;
                const int r2 = WARP_SHFL(r, src);
                int t2[NH];
                #pragma unroll
                for (int h = 0; h < NH; ++h) t2[h] = WARP_SHFL(t[h], src);
                if (lane >= d) {
                    r += r2;
                    #pragma unroll
                    for (int h = 0; h < NH; ++h) t[h] += t2[h];
                }
            }
            if (e < E) {
                s_off[e] = carry_r + r - m;
                #pragma unroll
                for (int h = 0; h < NH; ++h) s_t[h][e] = carry_t[h] + t[h] - mt[h];
            }
            carry_r += WARP_SHFL(r, WARP_SIZE - 1);
            #pragma unroll
            for (int h = 0; h < NH; ++h) carry_t[h] += WARP_SHFL(t[h], WARP_SIZE - 1);
        }
        if (lane == 0) {
            s_off[E] = carry_r;
            #pragma unroll
            for (int h = 0; h < NH; ++h) s_t[h][E] = carry_t[h];
        }
    }
    __syncthreads();
    for (int e = tid; e <= E; e += THREADS) offsets[e] = s_off[e];
    for (int i = tid; i < NW * E; i += THREADS) cnt[i] += s_off[i % E];
    __syncthreads();

    // pass 2: stable placement. Every warp runs `steps` iterations (uniform, so the barrier below is
    // legal on both vendors); lanes past the span carry expert -1 and write nothing.
    #pragma unroll 1
    for (int it = 0; it < steps; ++it) {
        const int s = begin + it * WARP_SIZE + lane;
        int e = -1;
        #pragma unroll
        for (int c = 0; c < CACHE; ++c)  // registers only: a select chain, no local memory
            if (c == it) e = ecache[c];
        if (it >= CACHE) e = s < end ? experts[s] : -1;
        const bool ok = (unsigned)e < (unsigned)E;
        int rank = 0, peers = 0;
#if GPTOSS_NVIDIA
        const unsigned same = __match_any_sync(0xffffffffu, e);
        rank = __popc(same & ((1u << lane) - 1u));
        peers = __popc(same);
#else
        for (int l = 0; l < WARP_SIZE; ++l) {
            const int o = WARP_SHFL(e, l);
            if (o == e) { rank += l < lane; ++peers; }
        }
#endif
        const int base = ok ? cnt[warp * E + e] : 0;
        if (ok) sorted_slots[base + rank] = s;
#if GPTOSS_NVIDIA
        __syncwarp();
#else
        __syncthreads();
#endif
        if (ok && rank == 0) cnt[warp * E + e] = base + peers;
#if GPTOSS_NVIDIA
        __syncwarp();
#else
        __syncthreads();
#endif
    }

    // tile schedules: tile i belongs to the expert e with s_t[e] <= i < s_t[e+1] (binary search)
    #pragma unroll
    for (int h = 0; h < NH; ++h) {
        const int* st = s_t[h];
        for (int i = tid; i < ntiles[h]; i += THREADS) {
            int e = -1, row = 0;
            if (i < st[E]) {
                int lo = 0, hi = E;  // invariant: st[lo] <= i < st[hi]
                while (hi - lo > 1) {
                    const int mid = (lo + hi) / 2;
                    if (st[mid] <= i) lo = mid; else hi = mid;
                }
                e = lo;
                row = s_off[e] + (i - st[e]) * bm[h];
            }
            tiles[h][2 * i] = e;
            tiles[h][2 * i + 1] = row;
        }
    }
}

extern "C" __global__ void __launch_bounds__(DISPATCH_THREADS)
moe_dispatch(const int* __restrict__ experts, int S, int E, int* __restrict__ offsets,
             int* __restrict__ sorted_slots, int bm_a, int* __restrict__ tiles_a, int ntiles_a,
             int bm_b, int* __restrict__ tiles_b, int ntiles_b, int bm_c, int* __restrict__ tiles_c,
             int ntiles_c) {
    GPTOSS_WAIT_PRIOR_GRID();
    GPTOSS_LAUNCH_DEPENDENTS();
    dispatch_block<DISPATCH_THREADS, DISPATCH_CACHE>(experts, S, E, offsets, sorted_slots, bm_a, tiles_a,
                                                     ntiles_a, bm_b, tiles_b, ntiles_b, bm_c, tiles_c, ntiles_c);
}

// ---- router, top-k and dispatch in one launch (small steps) -----------------------------------------
// route_dispatch(_f32): the router_logits grid and block. Every CTA writes its partials as router_logits
// does, then counts itself done on `counter` (one unsigned int of device memory, 0 between launches).
// The CTA that counts last does the rest alone, on the same device functions as the three-launch path:
//  - the T*E logits (router_logit: the same sum in the same order as router_topk) into shared memory,
//    FUSED_MAX_LOGITS at a time (whole tokens per round), then a warp per token for the top-k and the
//    softmax (topk_softmax_warp, as router_topk runs it);
//  - the dispatch of `local` (the experts, or a tensor-parallel rank's indices expert - first) over Ed
//    experts: dispatch_block with ROUTER_THREADS threads (the same outputs as moe_dispatch's 1024).
// Memory order: each thread fences its partial stores (__threadfence) before its CTA counts; the counting
// thread fences again after the count, and the CTA barrier orders the last CTA's reads of the others'
// partials after that. The count wraps back to 0 in the last CTA's own atomicInc (atomicInc(p, n - 1)
// stores 0 when it reads n - 1), so the next launch and every CUDA-graph replay start clean. No CTA
// waits for another: nothing needs the grid to be resident at once.
template <typename TIn>
DEVICE void route_dispatch_body(const TIn* __restrict__ t, const bf16_t* __restrict__ w,
                                const bf16_t* __restrict__ bias, float* partial, unsigned* counter,
                                int* experts, float* weights, int* local, int first, int Ed, int* offsets,
                                int* sorted_slots, int bm_a, int* tiles_a, int ntiles_a, int bm_b,
                                int* tiles_b, int ntiles_b, int bm_c, int* tiles_c, int ntiles_c, int T,
                                int E, int H, int k) {
    router_logits_tile<TIn>(t, w, partial, T, E, H);
    __shared__ int s_last;
    __threadfence();  // release: this thread's partials are visible device-wide before its CTA counts
    __syncthreads();
    if (threadIdx.x == 0) {
        const unsigned ctas = gridDim.x * gridDim.y * gridDim.z;
        const int last = atomicInc(counter, ctas - 1) == ctas - 1;
        __threadfence();  // acquire: after the count, the other CTAs' partials (the barrier passes it on)
        s_last = last;
    }
    __syncthreads();
    if (!s_last) return;  // the whole CTA

    __shared__ float s_logit[FUSED_MAX_LOGITS];
    constexpr int NW = ROUTER_THREADS / WARP_SIZE;
    const int tid = threadIdx.x, lane = tid % WARP_SIZE, warp = tid / WARP_SIZE;
    const int per_round = FUSED_MAX_LOGITS / E;  // tokens (E <= DISPATCH_MAX_E <= FUSED_MAX_LOGITS)
    for (int t0 = 0; t0 < T; t0 += per_round) {
        const int n = min(per_round, T - t0);
        for (int i = tid; i < n * E; i += ROUTER_THREADS)
            s_logit[i] = router_logit<ROUTER_SPLITS>(partial, bias, T, E, t0 + i / E, i % E);
        __syncthreads();
        for (int j = warp; j < n; j += NW)
            topk_softmax_warp([&](int e) { return s_logit[j * E + e]; }, lane, t0 + j, E, k, experts, weights,
                              local, first);
        __syncthreads();  // the round's picks are written (the dispatch reads them); s_logit is free again
    }
    dispatch_block<ROUTER_THREADS, FUSED_CACHE>(local, T * k, Ed, offsets, sorted_slots, bm_a, tiles_a,
                                                ntiles_a, bm_b, tiles_b, ntiles_b, bm_c, tiles_c, ntiles_c);
}

extern "C" __global__ void __launch_bounds__(ROUTER_THREADS)
route_dispatch(const bf16_t* __restrict__ t, const bf16_t* __restrict__ w, const bf16_t* __restrict__ bias,
               float* partial, unsigned* counter, int* experts, float* weights, int* local, int first, int Ed,
               int* offsets, int* sorted_slots, int bm_a, int* tiles_a, int ntiles_a, int bm_b, int* tiles_b,
               int ntiles_b, int bm_c, int* tiles_c, int ntiles_c, int T, int E, int H, int k) {
    GPTOSS_WAIT_PRIOR_GRID();
    GPTOSS_LAUNCH_DEPENDENTS();
    route_dispatch_body<bf16_t>(t, w, bias, partial, counter, experts, weights, local, first, Ed, offsets,
                                sorted_slots, bm_a, tiles_a, ntiles_a, bm_b, tiles_b, ntiles_b, bm_c, tiles_c,
                                ntiles_c, T, E, H, k);
}

extern "C" __global__ void __launch_bounds__(ROUTER_THREADS)
route_dispatch_f32(const float* __restrict__ t, const bf16_t* __restrict__ w, const bf16_t* __restrict__ bias,
                   float* partial, unsigned* counter, int* experts, float* weights, int* local, int first,
                   int Ed, int* offsets, int* sorted_slots, int bm_a, int* tiles_a, int ntiles_a, int bm_b,
                   int* tiles_b, int ntiles_b, int bm_c, int* tiles_c, int ntiles_c, int T, int E, int H,
                   int k) {
    GPTOSS_WAIT_PRIOR_GRID();
    GPTOSS_LAUNCH_DEPENDENTS();
    route_dispatch_body<float>(t, w, bias, partial, counter, experts, weights, local, first, Ed, offsets,
                               sorted_slots, bm_a, tiles_a, ntiles_a, bm_b, tiles_b, ntiles_b, bm_c, tiles_c,
                               ntiles_c, T, E, H, k);
}

// ---- combine ------------------------------------------------------------------------------------
// x[t][h] += ((eo[t*k][h] + eo[t*k+1][h]) + ...) over j in increasing order; 4 h per thread (H % 4 == 0).
extern "C" __global__ void
moe_combine_add(float* __restrict__ x, const float* __restrict__ eo, int T, int H, int k) {
    GPTOSS_WAIT_PRIOR_GRID();
    GPTOSS_LAUNCH_DEPENDENTS();
    const int H4 = H / 4;
    const size_t n = (size_t)T * H4;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        const size_t tok = i / H4, h = (i % H4) * 4;
        const float* o = eo + tok * k * H + h;
        float4 s = *reinterpret_cast<const float4*>(o);
        for (int j = 1; j < k; ++j) {
            const float4 v = *reinterpret_cast<const float4*>(o + (size_t)j * H);
            s.x += v.x; s.y += v.y; s.z += v.z; s.w += v.w;
        }
        float4* xp = reinterpret_cast<float4*>(x + tok * H + h);
        float4 xv = *xp;
        xv.x += s.x; xv.y += s.y; xv.z += s.z; xv.w += s.w;
        *xp = xv;
    }
}
