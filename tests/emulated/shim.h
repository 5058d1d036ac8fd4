// A CPU stand-in for the GPU that runs a kernel family's portable code (tests/test_routing_emulated_cpu.py):
// one std::thread per GPU thread, the CTAs of a launch one after another in a shuffled order, __syncthreads
// a barrier of the CTA's threads, a warp shuffle an exchange through a per-warp buffer between two
// barriers of the warp's threads. Included before the kernel source (and its common.h): with
// -D__HIPCC_RTC__ common.h takes its AMD branch (WARP_SIZE 64, __shfl / __shfl_xor), with
// -DGPTOSS_PORTABLE=1 its CUDA branch without the NVIDIA-only code (WARP_SIZE 32, the _sync shuffles).
#pragma once
#include <algorithm>
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <random>
#include <thread>
#include <vector>

#define __device__
#define __global__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static  // one CTA runs at a time: a static is that CTA's shared memory
#define __align__(n) __attribute__((aligned(n)))
using std::max;
using std::min;

struct dim3 { unsigned x, y, z; };
inline thread_local dim3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;
struct float4 { float x, y, z, w; };
struct float2 { float x, y; };
struct uint2 { unsigned x, y; };
inline float4 make_float4(float a, float b, float c, float d) { return {a, b, c, d}; }
inline uint2 make_uint2(unsigned a, unsigned b) { return {a, b}; }
inline float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }

struct EmuWarp {
    std::unique_ptr<std::barrier<>> bar;
    uint64_t slots[64];
};
inline thread_local std::barrier<>* emu_cta_barrier;
inline thread_local EmuWarp* emu_warp;
inline thread_local int emu_lane;
inline int emu_warp_size;

inline void __syncthreads() { emu_cta_barrier->arrive_and_wait(); }
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline int atomicAdd(int* p, int v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }
inline unsigned atomicInc(unsigned* p, unsigned limit) {  // old >= limit ? 0 : old + 1; returns old
    unsigned old = __atomic_load_n(p, __ATOMIC_SEQ_CST);
    while (!__atomic_compare_exchange_n(p, &old, old >= limit ? 0u : old + 1u, false, __ATOMIC_SEQ_CST,
                                        __ATOMIC_SEQ_CST)) {
    }
    return old;
}

template <class T> T emu_shuffle(T v, int src) {
    static_assert(sizeof(T) <= 8, "shuffles move up to 8 bytes");
    uint64_t bits = 0;
    std::memcpy(&bits, &v, sizeof(T));
    emu_warp->slots[emu_lane] = bits;
    emu_warp->bar->arrive_and_wait();
    const uint64_t got = emu_warp->slots[((src % emu_warp_size) + emu_warp_size) % emu_warp_size];
    emu_warp->bar->arrive_and_wait();  // nobody overwrites a slot before every lane has read
    T r;
    std::memcpy(&r, &got, sizeof(T));
    return r;
}
template <class T> T __shfl(T v, int src) { return emu_shuffle(v, src); }
template <class T> T __shfl_xor(T v, int m) { return emu_shuffle(v, emu_lane ^ m); }
template <class T> T __shfl_sync(unsigned, T v, int src) { return emu_shuffle(v, src); }
template <class T> T __shfl_xor_sync(unsigned, T v, int m) { return emu_shuffle(v, emu_lane ^ m); }

// Run body() as every thread of a grid of `grid` CTAs of `threads` threads (x only), the CTAs one after
// another in an order shuffled by `seed`, warps of `warp_size` lanes. One pool of `threads` threads runs
// them all; each CTA gets fresh barriers (a thread that returns leaves its CTA's barriers).
template <class F> void emu_launch(dim3 grid, unsigned threads, int warp_size, unsigned seed, F body) {
    gridDim = grid;
    blockDim = {threads, 1, 1};
    emu_warp_size = warp_size;
    std::vector<dim3> ctas;
    for (unsigned z = 0; z < grid.z; ++z)
        for (unsigned y = 0; y < grid.y; ++y)
            for (unsigned x = 0; x < grid.x; ++x) ctas.push_back({x, y, z});
    std::mt19937 rng(seed);
    std::shuffle(ctas.begin(), ctas.end(), rng);
    std::unique_ptr<std::barrier<>> cta_barrier;
    std::vector<EmuWarp> warps((threads + warp_size - 1) / warp_size);
    size_t next = 0;
    auto fresh = [&]() noexcept {  // the barriers of CTA `next`
        cta_barrier = std::make_unique<std::barrier<>>(threads);
        for (size_t w = 0; w < warps.size(); ++w)
            warps[w].bar = std::make_unique<std::barrier<>>(std::min<unsigned>(warp_size, threads - w * warp_size));
    };
    fresh();
    std::barrier between(threads, [&]() noexcept { ++next; fresh(); });
    std::vector<std::thread> pool;
    for (unsigned i = 0; i < threads; ++i)
        pool.emplace_back([&, i] {
            threadIdx = {i, 0, 0};
            emu_lane = i % warp_size;
            while (next < ctas.size()) {  // (read after the barrier that changed it)
                blockIdx = ctas[next];
                emu_cta_barrier = cta_barrier.get();
                emu_warp = &warps[i / warp_size];
                body();
                emu_warp->bar->arrive_and_drop();  // a thread that returned holds no one up
                emu_cta_barrier->arrive_and_drop();
                between.arrive_and_wait();
            }
        });
    for (auto& t : pool) t.join();
}
