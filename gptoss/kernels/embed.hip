// Token embedding: x[t, :] = float(table[tokens[t], :]) — the bf16 table row widened into the fp32
// residual stream. One CTA per token.
//
// An id outside [0, V) never reads the table: its row of x is written as NaN, so the mistake shows up in
// every logit of that token instead of silently embedding some other token.
#include "common.h"

#define EMBED_THREADS 256

// vec8: H % 8 == 0 and both arrays 16-byte aligned, so 8 bf16 (16 bytes) load at once and become two
// float4 stores; otherwise one element per thread and step.
extern "C" __global__ void __launch_bounds__(EMBED_THREADS)
embed_bf16(const int* __restrict__ tokens, const bf16_t* __restrict__ table, float* __restrict__ out,
           int H, int V, int vec8) {
    GPTOSS_WAIT_PRIOR_GRID();
    GPTOSS_LAUNCH_DEPENDENTS();
    const int t = blockIdx.x;
    const int tok = tokens[t];
    float* o = out + (size_t)t * H;
    if (tok < 0 || tok >= V) {
        const float nan = __uint_as_float(0x7fc00000u);
        for (int i = threadIdx.x; i < H; i += blockDim.x) o[i] = nan;
        return;
    }
    const bf16_t* row = table + (size_t)tok * H;
    if (vec8) {
        for (int i = threadIdx.x * 8; i < H; i += blockDim.x * 8) {
            const uint4 w = *reinterpret_cast<const uint4*>(row + i);
            *reinterpret_cast<float4*>(o + i) = make_float4(bf16x2_lo(w.x), bf16x2_hi(w.x), bf16x2_lo(w.y), bf16x2_hi(w.y));
            *reinterpret_cast<float4*>(o + i + 4) = make_float4(bf16x2_lo(w.z), bf16x2_hi(w.z), bf16x2_lo(w.w), bf16x2_hi(w.w));
        }
    } else {
        for (int i = threadIdx.x; i < H; i += blockDim.x) o[i] = bf16_to_float(row[i]);
    }
}

// Row gather in the fp32 residual stream: out[r, :] = src[rows[r], :] (the tokens whose logits a step
// wants). One CTA per output row; a row index outside [0, T) gives a NaN row.
extern "C" __global__ void __launch_bounds__(EMBED_THREADS)
gather_rows_f32(const int* __restrict__ rows, const float* __restrict__ src, float* __restrict__ out,
                int H, int T) {
    GPTOSS_WAIT_PRIOR_GRID();
    GPTOSS_LAUNCH_DEPENDENTS();
    const int r = blockIdx.x;
    const int s = rows[r];
    float* o = out + (size_t)r * H;
    if (s < 0 || s >= T) {
        const float nan = __uint_as_float(0x7fc00000u);
        for (int i = threadIdx.x; i < H; i += blockDim.x) o[i] = nan;
        return;
    }
    const float* x = src + (size_t)s * H;
    for (int i = threadIdx.x; i < H; i += blockDim.x) o[i] = x[i];
}
