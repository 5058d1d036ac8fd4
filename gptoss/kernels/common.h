// Portability header included by every kernel source: one source compiles with NVRTC/nvcc for NVIDIA
// (sm_90) and with hiprtc/hipcc for AMD (gfx90a). It hides the warp size, shuffles and the bf16 type.
//
// bf16 is carried as its raw 16 bits (bf16_t = unsigned short) on both vendors, so host code sees
// uint16 arrays and no vendor bf16 header is needed. Two bf16 values pack into one 32-bit word
// (low half = element 0), which is also the operand format of the NVIDIA mma.sync bf16 instructions.
#pragma once

// Vendor paths. GPTOSS_AMD / GPTOSS_CUDA say which compiler this is (and so how a shuffle is spelled);
// GPTOSS_NVIDIA, GPTOSS_HAS_MMA and GPTOSS_HAS_WGMMA turn on the NVIDIA-only code (intrinsics such as
// __match_any_sync and __syncwarp, mma.sync/ldmatrix/cp.async, wgmma/TMA). Without them every kernel takes
// its portable path, the code an AMD GPU runs. -DGPTOSS_PORTABLE=1 (KernelOptions(portable=True),
// GPTOSS_KERNELS=portable) keeps them off on NVIDIA too, so that the portable path runs on an H100/H200.
//
// WARP_SIZE is the width of the hardware warp the portable code is written against: 64 on AMD CDNA
// (gfx90a, gfx94x: wave64), 32 on NVIDIA. No kernel outside an NVIDIA-only block may assume 32 lanes:
// lane masks, shuffle ranges, per-warp shared-memory arrays and reductions all derive from WARP_SIZE
// (tests/test_warp_size.py scans the sources for that).
#if defined(__HIPCC__) || defined(__HIP_PLATFORM_AMD__) || defined(__HIPCC_RTC__)
  #define GPTOSS_AMD 1
  #if !defined(__HIPCC_RTC__)
    #include <hip/hip_runtime.h>
  #endif
  #define WARP_SIZE 64
  // RDNA GPUs (gfx10xx/gfx11xx) run wave32 by default: the host (gptoss.kernels.warp_size) and these
  // kernels assume wave64, so refuse to build for them rather than run with the wrong width.
  #if defined(__AMDGCN_WAVEFRONT_SIZE) && __AMDGCN_WAVEFRONT_SIZE != 64
    #error "gptoss kernels need a wave64 AMD GPU (CDNA: gfx90a, gfx94x)"
  #endif
  #define WARP_SHFL_XOR(v, m) __shfl_xor((v), (m))
  #define WARP_SHFL(v, src) __shfl((v), (src))
#else
  #define GPTOSS_CUDA 1
  #define WARP_SIZE 32
  // Full-warp shuffles: the same operation as AMD's __shfl_xor / __shfl over all WARP_SIZE lanes (CUDA
  // spells it with the _sync form and the mask of every lane, which is what makes it NVIDIA-specific).
  #define WARP_SHFL_XOR(v, m) __shfl_xor_sync(0xffffffffu, (v), (m))
  #define WARP_SHFL(v, src) __shfl_sync(0xffffffffu, (v), (src))
  #if !defined(GPTOSS_PORTABLE) || !GPTOSS_PORTABLE
    #define GPTOSS_NVIDIA 1
    // NVIDIA tensor-core paths (mma.sync, ldmatrix, cp.async) need sm_80 or newer.
    #if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
      #define GPTOSS_HAS_MMA 1
    #endif
    // wgmma (warpgroup tensor-core ops) needs the sm_90a target (NVRTC -arch=sm_90a; see kernels/__init__.py).
    #if defined(__CUDA_ARCH_FEAT_SM90_ALL)
      #define GPTOSS_HAS_WGMMA 1
    #endif
  #endif
#endif

// Programmatic dependent launch (PDL, sm_90): the host (gptoss/kernels/launch.py) may launch a kernel
// while the kernel before it on the stream still runs. Every __global__ kernel therefore starts with
//   GPTOSS_WAIT_PRIOR_GRID();    // griddepcontrol.wait: block until the previous grid has completed and
//                                // its memory is visible -- before any global read or write
//   GPTOSS_LAUNCH_DEPENDENTS();  // griddepcontrol.launch_dependents: the next kernel may launch now (it
//                                // does once every CTA of this grid has said so or exited)
// (tests/test_pdl_sources.py checks the first). Both are empty on AMD, in the portable build and below
// sm_90; without a PDL launch the wait returns at once (the stream already serialized the kernels).
#if defined(GPTOSS_NVIDIA) && defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  #define GPTOSS_HAS_PDL 1
  #define GPTOSS_WAIT_PRIOR_GRID() asm volatile("griddepcontrol.wait;" ::: "memory")
  #define GPTOSS_LAUNCH_DEPENDENTS() asm volatile("griddepcontrol.launch_dependents;" ::: "memory")
#else
  #define GPTOSS_WAIT_PRIOR_GRID() ((void)0)
  #define GPTOSS_LAUNCH_DEPENDENTS() ((void)0)
#endif

// Floats of shared memory block_sum / block_max need: one per warp of the largest (1024-thread) block.
#define BLOCK_SCRATCH (1024 / WARP_SIZE)

#define DEVICE __device__ __forceinline__
#define NEG_INF_F (__uint_as_float(0xff800000u))

typedef unsigned short bf16_t;
typedef unsigned int u32;
typedef unsigned char u8;

DEVICE float bf16_to_float(bf16_t h) { return __uint_as_float(((u32)h) << 16); }

// Round to nearest even; NaN stays NaN.
DEVICE bf16_t float_to_bf16(float f) {
    u32 x = __float_as_uint(f);
    if ((x & 0x7fffffffu) > 0x7f800000u) return (bf16_t)((x >> 16) | 0x40u);
    x += 0x7fffu + ((x >> 16) & 1u);
    return (bf16_t)(x >> 16);
}

DEVICE u32 pack_bf16x2(float lo, float hi) {
    return (u32)float_to_bf16(lo) | ((u32)float_to_bf16(hi) << 16);
}
DEVICE float bf16x2_lo(u32 w) { return __uint_as_float(w << 16); }
DEVICE float bf16x2_hi(u32 w) { return __uint_as_float(w & 0xffff0000u); }

DEVICE float warp_sum(float v) {
    #pragma unroll
    for (int m = WARP_SIZE / 2; m > 0; m >>= 1) v += WARP_SHFL_XOR(v, m);
    return v;
}

DEVICE float warp_max(float v) {
    #pragma unroll
    for (int m = WARP_SIZE / 2; m > 0; m >>= 1) v = fmaxf(v, WARP_SHFL_XOR(v, m));
    return v;
}

// Sum over a block of blockDim.x threads (a multiple of WARP_SIZE, at most 1024). Every thread gets
// the total. `scratch` holds at least BLOCK_SCRATCH floats of shared memory.
DEVICE float block_sum(float v, float* scratch) {
    const int lane = threadIdx.x % WARP_SIZE, warp = threadIdx.x / WARP_SIZE;
    const int nwarps = blockDim.x / WARP_SIZE;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < nwarps ? scratch[lane] : 0.0f;
    return warp_sum(v);
}

DEVICE float block_max(float v, float* scratch) {
    const int lane = threadIdx.x % WARP_SIZE, warp = threadIdx.x / WARP_SIZE;
    const int nwarps = blockDim.x / WARP_SIZE;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < nwarps ? scratch[lane] : NEG_INF_F;
    return warp_max(v);
}

// MXFP4 (E2M1) code -> value; codes 8..15 are the negatives of 0..7.
// Built from bits, no table: exponent field e = (code >> 1) & 3, mantissa bit m = code & 1;
// e = 0 is the subnormal 0 or 0.5, otherwise 2^(e-1) * (1 + m/2).
DEVICE float fp4_e2m1_to_float(u32 code) {
    const u32 e = (code >> 1) & 3u, m = code & 1u;
    const float mag = e ? __uint_as_float(((e + 126u) << 23) | (m << 22)) : 0.5f * (float)m;
    return (code & 8u) ? -mag : mag;
}

// 2^(s - 127) for an E8M0 scale byte s (s = 0 gives 2^-127, a denormal; 255 is NaN in the format,
// never produced by real checkpoints).
DEVICE float e8m0_to_float(u32 s) {
    return s == 0 ? 5.877471754111438e-39f : __uint_as_float(s << 23);
}

// Counter-based random number shared with gptoss/sampling.py: the same (seed, sequence, step) gives
// the same uniform in [0, 1) on the CPU and on either GPU vendor, whatever the batch composition.
DEVICE float sample_uniform(u32 seed, u32 sequence, u32 step) {
    u32 x = seed * 0x9E3779B1u ^ sequence * 0x85EBCA77u ^ step * 0xC2B2AE3Du;
    x ^= x >> 16; x *= 0x85EBCA6Bu;
    x ^= x >> 13; x *= 0xC2B2AE35u;
    x ^= x >> 16;
    return (float)(x >> 8) * (1.0f / 16777216.0f);
}
