// Tensor / expert parallel (gptoss/ops/tensor_parallel.py): what a rank adds around the collectives.
//
//   tp_local_experts:   a token's chosen experts as this rank's expert indices (global id - first);
//                       an expert the rank does not own falls outside 0..E_local-1, which
//                       moe_dispatch skips, so the rank's expert GEMMs never see it.
//   tp_combine_owned:   the rank's MoE partial sum p[t] = sum over j (increasing) of eo[t*k + j] for
//                       the slots whose expert it owns; the others add nothing (their eo rows were
//                       never written).
//   tp_reduce_ranks_*:  the all-gathered partials [R, n] summed in rank order,
//                       ((p0 + p1) + p2) + ..., the same order on every rank (so every rank holds the
//                       same bits), f32 out, or + bias[i % H] and rounded once to bf16 (the out
//                       projection: the same rounding as the unsharded GEMM's epilogue, acc + bias).
// One element per thread in a grid-stride loop: no warp-size assumption, the same code on both vendors.
#include "common.h"

extern "C" __global__ void tp_local_experts(const int* __restrict__ experts, int* __restrict__ local, int n,
                                            int first) {
    GPTOSS_WAIT_PRIOR_GRID();
    GPTOSS_LAUNCH_DEPENDENTS();
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x)
        local[i] = experts[i] - first;
}

extern "C" __global__ void tp_combine_owned(const float* __restrict__ eo, const int* __restrict__ local,
                                            float* __restrict__ out, int T, int H, int k, int E) {
    GPTOSS_WAIT_PRIOR_GRID();
    GPTOSS_LAUNCH_DEPENDENTS();
    const size_t n = (size_t)T * H;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        const size_t t = i / H, h = i % H;
        float s = 0.0f;  // 0 + a == a exactly: a slot that is not this rank's adds nothing
        for (int j = 0; j < k; ++j)
            if ((unsigned)local[t * k + j] < (unsigned)E) s += eo[(t * k + j) * H + h];
        out[i] = s;
    }
}

extern "C" __global__ void tp_reduce_ranks_f32(const float* __restrict__ parts, float* __restrict__ out, int R,
                                               long long n) {
    GPTOSS_WAIT_PRIOR_GRID();
    GPTOSS_LAUNCH_DEPENDENTS();
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        float s = parts[i];
        for (int r = 1; r < R; ++r) s += parts[(long long)r * n + i];
        out[i] = s;
    }
}

extern "C" __global__ void tp_reduce_ranks_bias_bf16(const float* __restrict__ parts, const bf16_t* __restrict__ bias,
                                                     bf16_t* __restrict__ out, int R, long long n, int H) {
    GPTOSS_WAIT_PRIOR_GRID();
    GPTOSS_LAUNCH_DEPENDENTS();
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        float s = parts[i];
        for (int r = 1; r < R; ++r) s += parts[(long long)r * n + i];
        out[i] = float_to_bf16(s + bf16_to_float(bias[i % H]));
    }
}
