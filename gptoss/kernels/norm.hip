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
    float ss = 0.0f;
    if (vec) {
        for (int i = threadIdx.x * 4; i < H; i += blockDim.x * 4) {
            float4 v = load4(xr + i);
            if (ADD) {
                const float4 d = load4(delta + off + i);
                v.x += d.x; v.y += d.y; v.z += d.z; v.w += d.w;
                *reinterpret_cast<float4*>(xr + i) = v;
            }
            ss += v.x * v.x + v.y * v.y + v.z * v.z + v.w * v.w;
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
        for (int i = threadIdx.x * 4; i < H; i += blockDim.x * 4) {
            const float4 v = load4(xr + i), s = load4(scale + i);
            const float4 y = make_float4(v.x * r * s.x, v.y * r * s.y, v.z * r * s.z, v.w * r * s.w);
            store4_bf16(orow + i, y);
            if (out32) *reinterpret_cast<float4*>(out32 + off + i) = y;
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
template <typename S>
DEVICE void combine_rmsnorm_row(float* __restrict__ x, const float* __restrict__ eo, int k,
                                const S* __restrict__ scale, bf16_t* __restrict__ out, int H, float eps,
                                float* scratch) {
    const size_t off = (size_t)blockIdx.x * H;
    float* xr = x + off;
    const float* o = eo + off * k;
    float ss = 0.0f;
    for (int i = threadIdx.x * 4; i < H; i += blockDim.x * 4) {
        float4 s = load4(o + i);
        for (int j = 1; j < k; ++j) {
            const float4 v = load4(o + (size_t)j * H + i);
            s.x += v.x; s.y += v.y; s.z += v.z; s.w += v.w;
        }
        float4 v = load4(xr + i);
        v.x += s.x; v.y += s.y; v.z += s.z; v.w += s.w;
        *reinterpret_cast<float4*>(xr + i) = v;
        ss += v.x * v.x + v.y * v.y + v.z * v.z + v.w * v.w;
    }
    const float r = 1.0f / sqrtf(block_sum(ss, scratch) / (float)H + eps);
    for (int i = threadIdx.x * 4; i < H; i += blockDim.x * 4) {
        const float4 v = load4(xr + i), s = load4(scale + i);
        store4_bf16(out + off + i, make_float4(v.x * r * s.x, v.y * r * s.y, v.z * r * s.z, v.w * r * s.w));
    }
}

#define COMBINE_RMSNORM_KERNEL(SNAME, S)                                                               \
    extern "C" __global__ void __launch_bounds__(NORM_THREADS)                                       \
    combine_rmsnorm_##SNAME(float* __restrict__ x, const float* __restrict__ eo, int k,                \
                            const S* __restrict__ scale, bf16_t* __restrict__ out, int H, float eps) {  \
        GPTOSS_WAIT_PRIOR_GRID();                                                                       \
        GPTOSS_LAUNCH_DEPENDENTS();                                                                     \
        __shared__ float scratch[BLOCK_SCRATCH];                                                                  \
        combine_rmsnorm_row<S>(x, eo, k, scale, out, H, eps, scratch);                                 \
    }

COMBINE_RMSNORM_KERNEL(f32, float)
COMBINE_RMSNORM_KERNEL(bf16, bf16_t)
