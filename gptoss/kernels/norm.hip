// RMSNorm of the fp32 residual stream into a bf16 activation, optionally fused with the residual add
// that precedes it:
//     rmsnorm:      t = bf16(x / sqrt(mean(x^2) + eps) * scale)
//     add_rmsnorm:  x += delta (in place), then t = rmsnorm(x)
// One CTA per row, fp32 math, one rounding to bf16 at the end. When out32 is not null the unrounded
// fp32 result goes there too (the MoE router reads it: a bf16-rounded router input flips near-tied
// expert choices, the largest single error of a bf16 forward against the fp32 reference). A row's result depends only on that row
// (the reduction order is fixed by the block size), so it is the same whatever the batch.
#include "common.h"

#define NORM_THREADS 256

DEVICE float load1(const float* p, int i) { return p[i]; }
DEVICE float load1(const bf16_t* p, int i) { return bf16_to_float(p[i]); }

// Four consecutive elements starting at p (16-byte aligned for f32, 8-byte aligned for bf16).
DEVICE float4 load4(const float* p) { return *reinterpret_cast<const float4*>(p); }
DEVICE float4 load4(const bf16_t* p) {
    const uint2 w = *reinterpret_cast<const uint2*>(p);
    return make_float4(bf16x2_lo(w.x), bf16x2_hi(w.x), bf16x2_lo(w.y), bf16x2_hi(w.y));
}
DEVICE void store4_bf16(bf16_t* p, float4 v) {
    uint2 w;
    w.x = pack_bf16x2(v.x, v.y);
    w.y = pack_bf16x2(v.z, v.w);
    *reinterpret_cast<uint2*>(p) = w;
}

// 4-wide groups a thread keeps in flight: each loop below loads NORM_NV groups (every input of them)
// before it uses the first, so a row of H <= NORM_THREADS * 4 * NORM_NV (gpt-oss: 2,880 <= 3,072) costs one
// memory round trip per loop instead of one per group and input. The adds run in the same order as
// without the prefetch: group i = (threadIdx.x + u * blockDim.x) * 4 for u = 0, 1, ...
#define NORM_NV 3

// vec: H % 4 == 0 and every pointer aligned for 4-wide access (checked by the launcher).
// Each thread re-reads in the second loop exactly the elements it wrote in the first, so the in-place
// add needs no barrier between the two loops.
template <bool ADD, typename D, typename S>
DEVICE void rmsnorm_row(float* __restrict__ x, const D* __restrict__ delta, const S* __restrict__ scale,
                        bf16_t* __restrict__ out, float* __restrict__ out32, int H, float eps, int vec,
                        float* scratch) {
    const size_t off = (size_t)blockIdx.x * H;
    float* xr = x + off;
    bf16_t* orow = out + off;
    const int step = blockDim.x * 4;
    float ss = 0.0f;
    if (vec) {
        for (int base = threadIdx.x * 4; base < H; base += NORM_NV * step) {
            float4 v[NORM_NV], d[NORM_NV];
            #pragma unroll
            for (int u = 0; u < NORM_NV; ++u) {
                const int i = base + u * step;
                if (i < H) {
                    v[u] = load4(xr + i);
                    if (ADD) d[u] = load4(delta + off + i);
                }
            }
            #pragma unroll
            for (int u = 0; u < NORM_NV; ++u) {
                const int i = base + u * step;
                if (i < H) {
                    if (ADD) {
                        v[u].x += d[u].x; v[u].y += d[u].y; v[u].z += d[u].z; v[u].w += d[u].w;
                        *reinterpret_cast<float4*>(xr + i) = v[u];
                    }
                    ss += v[u].x * v[u].x + v[u].y * v[u].y + v[u].z * v[u].z + v[u].w * v[u].w;
                }
            }
        }
    } else {
        for (int i = threadIdx.x; i < H; i += blockDim.x) {
            float v = xr[i];
            if (ADD) {
                v += load1(delta + off, i);
                xr[i] = v;
            }
            ss += v * v;
        }
    }
    const float r = 1.0f / sqrtf(block_sum(ss, scratch) / (float)H + eps);
    if (vec) {
        for (int base = threadIdx.x * 4; base < H; base += NORM_NV * step) {
            float4 v[NORM_NV], s[NORM_NV];
            #pragma unroll
            for (int u = 0; u < NORM_NV; ++u) {
                const int i = base + u * step;
                if (i < H) {
                    v[u] = load4(xr + i);
                    s[u] = load4(scale + i);
                }
            }
            #pragma unroll
            for (int u = 0; u < NORM_NV; ++u) {
                const int i = base + u * step;
                if (i < H) {
                    const float4 y = make_float4(v[u].x * r * s[u].x, v[u].y * r * s[u].y, v[u].z * r * s[u].z,
                                                 v[u].w * r * s[u].w);
                    store4_bf16(orow + i, y);
                    if (out32) *reinterpret_cast<float4*>(out32 + off + i) = y;
                }
            }
        }
    } else {
        for (int i = threadIdx.x; i < H; i += blockDim.x) {
            const float y = xr[i] * r * load1(scale, i);
            orow[i] = float_to_bf16(y);
            if (out32) out32[off + i] = y;
        }
    }
}

// Kernel names: rmsnorm_<scale dtype>, add_rmsnorm_<delta dtype>_<scale dtype>.
#define RMSNORM_KERNEL(SNAME, S)                                                                       \
    extern "C" __global__ void __launch_bounds__(NORM_THREADS)                                       \
    rmsnorm_##SNAME(const float* __restrict__ x, const S* __restrict__ scale, bf16_t* __restrict__ out, \
                    float* __restrict__ out32, int H, float eps, int vec) {                            \
        GPTOSS_WAIT_PRIOR_GRID();                                                                      \
        GPTOSS_LAUNCH_DEPENDENTS();                                                                    \
        __shared__ float scratch[BLOCK_SCRATCH];                                                                  \
        rmsnorm_row<false, float, S>(const_cast<float*>(x), nullptr, scale, out, out32, H, eps, vec,   \
                                     scratch);                                                         \
    }

#define ADD_RMSNORM_KERNEL(DNAME, D, SNAME, S)                                                         \
    extern "C" __global__ void __launch_bounds__(NORM_THREADS)                                       \
    add_rmsnorm_##DNAME##_##SNAME(float* __restrict__ x, const D* __restrict__ delta,                  \
                                  const S* __restrict__ scale, bf16_t* __restrict__ out,                \
                                  float* __restrict__ out32, int H, float eps, int vec) {               \
        GPTOSS_WAIT_PRIOR_GRID();                                                                       \
        GPTOSS_LAUNCH_DEPENDENTS();                                                                     \
        __shared__ float scratch[BLOCK_SCRATCH];                                                                  \
        rmsnorm_row<true, D, S>(x, delta, scale, out, out32, H, eps, vec, scratch);                    \
    }

RMSNORM_KERNEL(f32, float)
RMSNORM_KERNEL(bf16, bf16_t)
ADD_RMSNORM_KERNEL(f32, float, f32, float)
ADD_RMSNORM_KERNEL(f32, float, bf16, bf16_t)
ADD_RMSNORM_KERNEL(bf16, bf16_t, f32, float)
ADD_RMSNORM_KERNEL(bf16, bf16_t, bf16, bf16_t)

// The MoE combine fused with the next RMSNorm: x[t] += ((eo[t*k] + eo[t*k+1]) + ...) (j increasing, the
// same adds as routing.hip's moe_combine_add), then t = rmsnorm(x) * scale. eo: [T*k, H] float32. Needs
// the 4-wide path (H % 4 == 0, aligned pointers; ops/norm.py falls back to the two kernels otherwise).
// K: the expert count when it is a compile-time constant (the loads of all K rows of a group are then
// in flight together), 0 for any k (a loop).
template <int K, typename S>
DEVICE void combine_rmsnorm_row(float* __restrict__ x, const float* __restrict__ eo, int k,
                                const S* __restrict__ scale, bf16_t* __restrict__ out, int H, float eps,
                                float* scratch) {
    const size_t off = (size_t)blockIdx.x * H;
    float* xr = x + off;
    const float* o = eo + off * k;
    const int step = blockDim.x * 4;
    float ss = 0.0f;
    for (int base = threadIdx.x * 4; base < H; base += NORM_NV * step) {
        constexpr int KR = K > 0 ? K : 1;  // expert rows loaded ahead (K = 0: the first; the loop loads the rest)
        float4 v[NORM_NV], e[NORM_NV][KR];
        #pragma unroll
        for (int u = 0; u < NORM_NV; ++u) {
            const int i = base + u * step;
            if (i < H) {
                v[u] = load4(xr + i);
                #pragma unroll
                for (int j = 0; j < KR; ++j) e[u][j] = load4(o + (size_t)j * H + i);
            }
        }
        #pragma unroll
        for (int u = 0; u < NORM_NV; ++u) {
            const int i = base + u * step;
            if (i < H) {
                float4 s = e[u][0];
                #pragma unroll
                for (int j = 1; j < (K > 0 ? K : k); ++j) {
                    float4 w;
                    if constexpr (K > 0) w = e[u][j];
                    else w = load4(o + (size_t)j * H + i);
                    s.x += w.x; s.y += w.y; s.z += w.z; s.w += w.w;
                }
                v[u].x += s.x; v[u].y += s.y; v[u].z += s.z; v[u].w += s.w;
                *reinterpret_cast<float4*>(xr + i) = v[u];
                ss += v[u].x * v[u].x + v[u].y * v[u].y + v[u].z * v[u].z + v[u].w * v[u].w;
            }
        }
    }
    const float r = 1.0f / sqrtf(block_sum(ss, scratch) / (float)H + eps);
    for (int base = threadIdx.x * 4; base < H; base += NORM_NV * step) {
        float4 v[NORM_NV], s[NORM_NV];
        #pragma unroll
        for (int u = 0; u < NORM_NV; ++u) {
            const int i = base + u * step;
            if (i < H) {
                v[u] = load4(xr + i);
                s[u] = load4(scale + i);
            }
        }
        #pragma unroll
        for (int u = 0; u < NORM_NV; ++u) {
            const int i = base + u * step;
            if (i < H)
                store4_bf16(out + off + i, make_float4(v[u].x * r * s[u].x, v[u].y * r * s[u].y,
                                                       v[u].z * r * s[u].z, v[u].w * r * s[u].w));
        }
    }
}

#define COMBINE_RMSNORM_KERNEL(SNAME, S)                                                               \
    extern "C" __global__ void __launch_bounds__(NORM_THREADS)                                       \
    combine_rmsnorm_##SNAME(float* __restrict__ x, const float* __restrict__ eo, int k,                \
                            const S* __restrict__ scale, bf16_t* __restrict__ out, int H, float eps) {  \
        GPTOSS_WAIT_PRIOR_GRID();                                                                       \
        GPTOSS_LAUNCH_DEPENDENTS();                                                                     \
        __shared__ float scratch[BLOCK_SCRATCH];                                                                  \
        if (k == 4) combine_rmsnorm_row<4, S>(x, eo, k, scale, out, H, eps, scratch);                  \
        else combine_rmsnorm_row<0, S>(x, eo, k, scale, out, H, eps, scratch);                         \
    }

COMBINE_RMSNORM_KERNEL(f32, float)
COMBINE_RMSNORM_KERNEL(bf16, bf16_t)
