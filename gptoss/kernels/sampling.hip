// Token sampling on the GPU: exactly the algorithm of docs/DESIGN.md "Sampling" (and gptoss/sampling.py),
// one CTA of SAMPLE_THREADS per row of logits, rows fully independent (batch invariance).
//
// Per row b, with T = temperature[b] and u = sample_uniform(seed, sequence[b], step[b]):
//   T <= 0 (or NaN): argmax, ties to the lowest id.
//   Otherwise z_i = l_i / T, M = max z, e_i = exp(z_i - M) in (0, 1] (p_i = e_i / sum e; the
//   normalisation cancels out of every comparison below, so it is never done).
//
// Masses are summed in 64-bit fixed point, f_i = floor(e_i * 2^45): integer sums are exact and
// order-independent, so shared-memory atomics stay deterministic and the "sum over K" used for the
// target is exactly the sum the walk accumulates. The largest possible row sum, V * 2^45 < 2^63, fits.
//
// top_p < 1 — the nucleus threshold tau without sorting: a three-level radix select over the float bit
// pattern of e (e <= 1, so the pattern is below 2^30 and orders like the value), 10 bits per level.
// Each level histograms the fixed-point mass of the elements that match the digits chosen so far, then
// picks the largest digit whose suffix mass (plus the mass already known to lie above) still reaches
// top_p * total. After three levels tau is an exact bit pattern: K = {i : e_i >= tau} is the shortest
// descending prefix reaching top_p, with ties to tau kept, as on the CPU.
//   Level 0 skips the histogram for elements below eps = (1 - top_p) / (2V) (e_max = 1 so the sum is
//   >= 1, and all of them together weigh < (1 - top_p) / 2: tau is above them); their mass still goes
//   into the total. This keeps the atomics to the few large elements of real model logits.
//
// The walk: target = floor(u * sum_K f); in increasing id order, in chunks of SAMPLE_THREADS * ITEMS ids,
// a block-wide prefix sum of the thread's kept mass finds the first id whose running sum exceeds the
// target; the loop stops at that chunk. For top_p = 1, K is every id and the sum comes from the first
// pass (an online softmax in double; close enough that the draw matches an exact one except at
// boundaries of relative width ~1e-12); if rounding leaves no crossing, the last id (V - 1) is taken,
// as the algorithm says.
//
// Passes over the row: greedy 1; top_p = 1: 1 + about 0.5 (the walk stops at the drawn id);
// top_p < 1: 4 + about 0.5. Passes after level 0 (and the walk) skip the divide and exp for elements
// whose logit is clearly below the current bound, with a wide safety margin, so they cost little more
// than reading the row.
#include "common.h"

typedef unsigned long long u64;

#define SAMPLE_THREADS 1024            // = RADIX_BINS: thread t owns bin RADIX_BINS - 1 - t in a pick
#define ARGMAX_THREADS 1024
#define ITEMS 8                        // consecutive ids per thread per chunk (two float4)
#define RADIX_BITS 10
#define RADIX_BINS 1024
#define FIXED_ONE 35184372088832.0f    // 2^45
#define LN_FIXED_ULP -31.19162312519754f  // ln(2^-45): below this e has no fixed-point mass

DEVICE u64 to_fixed(float e) { return (u64)(e * FIXED_ONE); }

DEVICE u64 shfl_u64(u64 v, int src) {
    const u32 lo = WARP_SHFL((u32)v, src), hi = WARP_SHFL((u32)(v >> 32), src);
    return ((u64)hi << 32) | lo;
}
DEVICE u64 shfl_xor_u64(u64 v, int m) {
    const u32 lo = WARP_SHFL_XOR((u32)v, m), hi = WARP_SHFL_XOR((u32)(v >> 32), m);
    return ((u64)hi << 32) | lo;
}
DEVICE double shfl_xor_f64(double v, int m) {
    return __longlong_as_double((long long)shfl_xor_u64((u64)__double_as_longlong(v), m));
}

// Inclusive prefix sum over the block in thread order; *total gets the block's sum. Needs
// blockDim.x / WARP_SIZE <= WARP_SIZE and `scratch` of BLOCK_SCRATCH u64 in shared memory. Starts with a
// barrier, so consecutive calls may reuse the scratch.
DEVICE u64 block_scan_u64(u64 v, u64* scratch, u64* total) {
    const int lane = threadIdx.x % WARP_SIZE, warp = threadIdx.x / WARP_SIZE;
    const int nwarps = blockDim.x / WARP_SIZE;
    #pragma unroll
    for (int off = 1; off < WARP_SIZE; off <<= 1) {
        const u64 y = shfl_u64(v, lane >= off ? lane - off : lane);
        if (lane >= off) v += y;
    }
    __syncthreads();
    if (lane == WARP_SIZE - 1) scratch[warp] = v;
    __syncthreads();
    if (warp == 0) {  // scan of the warp totals, in place
        u64 w = lane < nwarps ? scratch[lane] : 0ull;
        #pragma unroll
        for (int off = 1; off < WARP_SIZE; off <<= 1) {
            const u64 y = shfl_u64(w, lane >= off ? lane - off : lane);
            if (lane >= off) w += y;
        }
        if (lane < nwarps) scratch[lane] = w;
    }
    __syncthreads();
    *total = scratch[nwarps - 1];
    return v + (warp > 0 ? scratch[warp - 1] : 0ull);
}

// Sum of a double over the block (fixed order); every thread gets it. `scratch` as block_scan_u64.
DEVICE double block_sum_f64(double v, u64* scratch) {
    const int lane = threadIdx.x % WARP_SIZE, warp = threadIdx.x / WARP_SIZE;
    const int nwarps = blockDim.x / WARP_SIZE;
    #pragma unroll
    for (int m = WARP_SIZE / 2; m > 0; m >>= 1) v += shfl_xor_f64(v, m);
    __syncthreads();
    if (lane == 0) scratch[warp] = (u64)__double_as_longlong(v);
    __syncthreads();
    v = lane < nwarps ? __longlong_as_double((long long)scratch[lane]) : 0.0;
    #pragma unroll
    for (int m = WARP_SIZE / 2; m > 0; m >>= 1) v += shfl_xor_f64(v, m);
    return v;
}

DEVICE int block_max_int(int v, int* scratch) {
    const int lane = threadIdx.x % WARP_SIZE, warp = threadIdx.x / WARP_SIZE;
    const int nwarps = blockDim.x / WARP_SIZE;
    #pragma unroll
    for (int m = WARP_SIZE / 2; m > 0; m >>= 1) v = max(v, (int)WARP_SHFL_XOR(v, m));
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < nwarps ? scratch[lane] : -1;
    #pragma unroll
    for (int m = WARP_SIZE / 2; m > 0; m >>= 1) v = max(v, (int)WARP_SHFL_XOR(v, m));
    return v;
}

// The ITEMS logits of this thread in the chunk starting at `base`: ids base + threadIdx.x * ITEMS + j,
// so a thread's ids are consecutive and the chunk is in thread order. Ids past the row read as -inf.
// vec: the row is 16-byte aligned and V % 4 == 0, so each group of 4 is one float4 load.
DEVICE void load_items(const float* row, int base, int V, int vec, float v[ITEMS]) {
    const int i0 = base + threadIdx.x * ITEMS;
    #pragma unroll
    for (int k = 0; k < ITEMS; k += 4) {
        const int i = i0 + k;
        if (vec && i < V) {
            const float4 q = *reinterpret_cast<const float4*>(row + i);
            v[k] = q.x; v[k + 1] = q.y; v[k + 2] = q.z; v[k + 3] = q.w;
        } else {
            #pragma unroll
            for (int j = 0; j < 4; j++) v[k + j] = i + j < V ? row[i + j] : NEG_INF_F;
        }
    }
}

// (value, id) maximum with ties to the lower id; NaN never wins.
DEVICE void argmax_merge(float& v, int& i, float v2, int i2) {
    if (v2 > v || (v2 == v && i2 < i)) { v = v2; i = i2; }
}

// Argmax of one row by the whole block; the result is valid in thread 0.
DEVICE int block_argmax(const float* row, int V, int vec, float* fscratch, int* iscratch) {
    float best = NEG_INF_F;
    int arg = 0x7fffffff;
    for (int base = 0; base < V; base += blockDim.x * ITEMS) {
        float v[ITEMS];
        load_items(row, base, V, vec, v);
        const int i0 = base + threadIdx.x * ITEMS;
        #pragma unroll
        for (int j = 0; j < ITEMS; j++)
            if (i0 + j < V) argmax_merge(best, arg, v[j], i0 + j);
    }
    const int lane = threadIdx.x % WARP_SIZE, warp = threadIdx.x / WARP_SIZE;
    const int nwarps = blockDim.x / WARP_SIZE;
    #pragma unroll
    for (int m = WARP_SIZE / 2; m > 0; m >>= 1)
        argmax_merge(best, arg, WARP_SHFL_XOR(best, m), WARP_SHFL_XOR(arg, m));
    __syncthreads();
    if (lane == 0) { fscratch[warp] = best; iscratch[warp] = arg; }
    __syncthreads();
    if (warp == 0) {
        best = lane < nwarps ? fscratch[lane] : NEG_INF_F;
        arg = lane < nwarps ? iscratch[lane] : 0x7fffffff;
        #pragma unroll
        for (int m = WARP_SIZE / 2; m > 0; m >>= 1)
            argmax_merge(best, arg, WARP_SHFL_XOR(best, m), WARP_SHFL_XOR(arg, m));
    }
    return arg == 0x7fffffff ? 0 : arg;  // a row of NaNs gives 0
}

// ids[b] = argmax(logits[b, :]), ties to the lowest id. grid = B, block = ARGMAX_THREADS.
extern "C" __global__ void __launch_bounds__(ARGMAX_THREADS)
argmax_rows(const float* __restrict__ logits, int* __restrict__ ids, int V, int vec) {
    GPTOSS_WAIT_PRIOR_GRID();
    GPTOSS_LAUNCH_DEPENDENTS();
    __shared__ float fscratch[BLOCK_SCRATCH];
    __shared__ int iscratch[BLOCK_SCRATCH];
    const int id = block_argmax(logits + (size_t)blockIdx.x * V, V, vec, fscratch, iscratch);
    if (threadIdx.x == 0) ids[blockIdx.x] = id;
}

// Lower bound on z = l / T (taken as l * (1/T), which skips the divide) below which an element surely
// has e = exp(z - M) < e_lo: the margin dwarfs the few-ulp differences of the divide, the subtraction
// and expf, so the skip never drops an element the exact test would keep.
DEVICE float z_floor(float M, float ln_lo) {
    return M + ln_lo - 1e-3f * (1.0f + fabsf(M) + fabsf(ln_lo));
}

// One draw per row. grid = B, block = SAMPLE_THREADS. seed: per_row_seed ? seeds[b] : seed.
extern "C" __global__ void __launch_bounds__(SAMPLE_THREADS)
sample_rows(const float* __restrict__ logits, const float* __restrict__ temperature,
            const float* __restrict__ top_p, const u32* __restrict__ seeds, u32 seed, int per_row_seed,
            const int* __restrict__ sequence, const int* __restrict__ step, int* __restrict__ ids,
            int V, int vec) {
    GPTOSS_WAIT_PRIOR_GRID();
    GPTOSS_LAUNCH_DEPENDENTS();
    __shared__ u64 hist[RADIX_BINS];
    __shared__ u64 scratch[BLOCK_SCRATCH];
    __shared__ float fscratch[BLOCK_SCRATCH];
    __shared__ int iscratch[BLOCK_SCRATCH];
    __shared__ u32 pick_bin;
    __shared__ u64 pick_above, pick_mass;
    __shared__ int found;

    const int b = blockIdx.x, tid = threadIdx.x;
    const float* row = logits + (size_t)b * V;
    const float T = temperature[b];
    if (!(T > 0.0f)) {  // greedy (uniform branch: every thread read the same T)
        const int id = block_argmax(row, V, vec, fscratch, iscratch);
        if (tid == 0) ids[b] = id;
        return;
    }
    const float p_top = top_p[b];
    const bool nucleus = p_top < 1.0f;
    const float invT = 1.0f / T;
    const int chunk = blockDim.x * ITEMS;

    // ---- pass 1: M (and for top_p = 1 the sum of e, as an online softmax in double) ----------------
    float M;
    double Z = 0.0;
    {
        float m = NEG_INF_F;  // nucleus: max logit; else max z of this thread
        double s = 0.0;       // sum of exp(z - m) over this thread's elements
        for (int base = 0; base < V; base += chunk) {
            float v[ITEMS];
            load_items(row, base, V, vec, v);
            #pragma unroll
            for (int j = 0; j < ITEMS; j++) {
                if (nucleus) {
                    m = fmaxf(m, v[j]);
                } else {
                    const float z = v[j] / T;
                    if (z > m) {
                        s = s * (double)expf(m - z) + 1.0;
                        m = z;
                    } else if (z != NEG_INF_F) {
                        s += (double)expf(z - m);
                    }
                }
            }
        }
        if (nucleus) {
            M = block_max(m, fscratch) / T;  // dividing by T > 0 keeps the order: max(l) / T = max(l / T)
        } else {
            M = block_max(m, fscratch);
            Z = block_sum_f64(m == NEG_INF_F ? 0.0 : s * (double)expf(m - M), scratch);
        }
    }

    // ---- top_p < 1: tau and the kept mass sum_K by radix select over the bits of e -----------------
    u32 tau = 0;      // K = {i : bits(e_i) >= tau}; 0 keeps every id
    u64 sum_k = 0;    // sum of f over K (nucleus only)
    if (nucleus) {
        const float eps = (1.0f - fmaxf(p_top, 0.0f)) / (2.0f * (float)V);
        const u32 eps_key = __float_as_uint(eps) & ~((1u << (2 * RADIX_BITS)) - 1u);  // start of its bin
        const float zc_fixed = z_floor(M, LN_FIXED_ULP);
        u32 prefix = 0;
        u64 above = 0, target = 0;
        for (int level = 0; level < 3; level++) {
            const int shift = (2 - level) * RADIX_BITS;
            hist[tid] = 0;
            // the smallest e that can match the digits chosen so far (level 0: anything with mass)
            const float zc = level == 0 ? zc_fixed
                                        : z_floor(M, logf(__uint_as_float(prefix << (shift + RADIX_BITS))));
            u64 pruned = 0;
            __syncthreads();
            for (int base = 0; base < V; base += chunk) {
                float v[ITEMS];
                load_items(row, base, V, vec, v);
                #pragma unroll
                for (int j = 0; j < ITEMS; j++) {
                    if (!(v[j] * invT >= zc)) continue;
                    const float e = expf(v[j] / T - M);
                    const u32 key = __float_as_uint(e);
                    const u64 f = to_fixed(e);
                    if (level == 0 && key < eps_key) { pruned += f; continue; }
                    if ((key >> (shift + RADIX_BITS)) == prefix && f)
                        atomicAdd(&hist[(key >> shift) & (RADIX_BINS - 1)], f);
                }
            }
            __syncthreads();
            // Pick: thread t holds bin RADIX_BINS-1-t, so the inclusive scan is the suffix mass.
            const u64 h = hist[RADIX_BINS - 1 - tid];
            u64 counted;
            const u64 incl = block_scan_u64(h, scratch, &counted);
            if (level == 0) {
                u64 pruned_total;
                block_scan_u64(pruned, scratch, &pruned_total);
                const double want = (double)p_top * (double)(counted + pruned_total);
                target = want < 1.0 ? 1ull : (u64)want;
                if (target > counted) target = counted;  // never happens (see eps above); keeps a pick certain
            }
            // the largest bin whose suffix reaches the target: cond(t) holds from that thread on
            if (above + incl >= target && above + (incl - h) < target) {
                pick_bin = RADIX_BINS - 1 - tid;
                pick_above = above + (incl - h);
                pick_mass = h;
            }
            __syncthreads();
            prefix = (prefix << RADIX_BITS) | pick_bin;
            above = pick_above;
        }
        tau = prefix;
        sum_k = above + pick_mass;  // mass strictly above tau plus the mass equal to tau
    }

    // ---- the walk: first id in increasing order whose running kept mass exceeds the target ---------
    const float u = sample_uniform(per_row_seed ? seeds[b] : seed, (u32)sequence[b], (u32)step[b]);
    u64 target;
    if (nucleus) {
        // floor(u * sum_k) exactly: u = r / 2^24 with r an integer below 2^24
        const u64 r = (u64)(u * 16777216.0f);
        target = __umul64hi(sum_k, r << 40);
    } else {
        target = (u64)((double)u * Z * (double)FIXED_ONE);
    }
    const float zc = nucleus ? z_floor(M, logf(__uint_as_float(tau))) : z_floor(M, LN_FIXED_ULP);
    if (tid == 0) found = -1;
    // f of id i if it is kept, else 0 (recomputed by the one thread that finds the crossing)
    auto kept_mass = [&](float l, int i) -> u64 {
        if (i >= V || !(l * invT >= zc)) return 0ull;
        const float e = expf(l / T - M);
        return __float_as_uint(e) >= tau ? to_fixed(e) : 0ull;
    };
    u64 carry = 0;
    int last = -1;  // the largest kept id this thread saw (nucleus fallback; kept ids have f > 0)
    for (int base = 0; base < V; base += chunk) {
        float v[ITEMS];
        load_items(row, base, V, vec, v);
        const int i0 = base + tid * ITEMS;
        u64 local = 0;
        #pragma unroll
        for (int j = 0; j < ITEMS; j++) {
            const u64 f = kept_mass(v[j], i0 + j);
            local += f;
            if (f) last = i0 + j;
        }
        u64 chunk_total;
        const u64 incl = block_scan_u64(local, scratch, &chunk_total);
        if (carry + incl - local <= target && target < carry + incl) {  // the crossing is in this thread
            u64 running = carry + incl - local;
            for (int j = 0; j < ITEMS; j++) {
                running += kept_mass(v[j], i0 + j);
                if (running > target) { found = i0 + j; break; }
            }
        }
        __syncthreads();
        if (found >= 0) break;
        carry += chunk_total;
    }
    if (found >= 0) {
        if (tid == 0) ids[b] = found;
        return;
    }
    // Rounding left no crossing: the last id of K.
    const int fallback = nucleus ? block_max_int(last, iscratch) : V - 1;
    if (tid == 0) ids[b] = fallback;
}
