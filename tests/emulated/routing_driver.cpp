// routing.hip on the CPU emulator (shim.h): the three-launch routing (router_logits, router_topk, the
// rank's local ids as tp_local_experts writes them, moe_dispatch), the one launch (route_dispatch) and
// the large steps' logits (a router_sums kernel, then router_topk over its one partial),
// as C functions for tests/test_routing_emulated_cpu.py (ctypes). The kernel source comes expanded
// (gptoss.kernels.expanded_source) in routing_expanded.inc, on the include path.
#include <functional>

#include "shim.h"
#include "routing_expanded.inc"

static int tile_bound(int S, int E, int bm) { return (S + bm - 1) / bm + std::min(E, S); }

static dim3 router_grid(int T, int E) {
    return {(unsigned)((T + ROUTER_TT - 1) / ROUTER_TT), (unsigned)((E + ROUTER_TE - 1) / ROUTER_TE), ROUTER_SPLITS};
}

extern "C" int emu_warp_width() { return WARP_SIZE; }

// local == experts: the dispatch groups the experts; else local = experts - first, grouped over Ed.
extern "C" void emu_three(int f32, const void* t, const bf16_t* w, const bf16_t* b, float* partial, int* experts,
                          float* weights, int* local, int first, int Ed, int* offsets, int* sorted_slots, int* ta,
                          int* tb, int* tc, int T, int E, int H, int k, unsigned seed) {
    if (f32)
        emu_launch(router_grid(T, E), ROUTER_THREADS, WARP_SIZE, seed,
                   [&] { router_logits_f32((const float*)t, w, partial, T, E, H); });
    else
        emu_launch(router_grid(T, E), ROUTER_THREADS, WARP_SIZE, seed,
                   [&] { router_logits((const bf16_t*)t, w, partial, T, E, H); });
    const int per_cta = 256 / WARP_SIZE;  // ops/moe.py: TOPK_THREADS, a warp per token
    emu_launch({(unsigned)((T + per_cta - 1) / per_cta), 1, 1}, 256, WARP_SIZE, seed + 1,
               [&] { router_topk(partial, b, experts, weights, T, E, k); });
    if (local != experts)
        for (int i = 0; i < T * k; ++i) local[i] = experts[i] - first;
    const int S = T * k;
    emu_launch({1, 1, 1}, DISPATCH_THREADS, WARP_SIZE, seed + 2, [&] {
        moe_dispatch(local, S, Ed, offsets, sorted_slots, 16, ta, tile_bound(S, Ed, 16), 64, tb,
                     tile_bound(S, Ed, 64), 128, tc, tile_bound(S, Ed, 128));
    });
}

extern "C" void emu_fused(int f32, const void* t, const bf16_t* w, const bf16_t* b, float* partial,
                          unsigned* counter, int* experts, float* weights, int* local, int first, int Ed, int* offsets,
                          int* sorted_slots, int* ta, int* tb, int* tc, int T, int E, int H, int k, unsigned seed) {
    const int S = T * k;
    const int na = tile_bound(S, Ed, 16), nb = tile_bound(S, Ed, 64), nc = tile_bound(S, Ed, 128);
    emu_launch(router_grid(T, E), ROUTER_THREADS, WARP_SIZE, seed, [&] {
        if (f32)
            route_dispatch_f32((const float*)t, w, b, partial, counter, experts, weights, local, first, Ed, offsets,
                               sorted_slots, 16, ta, na, 64, tb, nb, 128, tc, nc, T, E, H, k);
        else
            route_dispatch((const bf16_t*)t, w, b, partial, counter, experts, weights, local, first, Ed, offsets,
                           sorted_slots, 16, ta, na, 64, tb, nb, 128, tc, nc, T, E, H, k);
    });
}

// router_sums_<tile>(_f32) over a grid of Z = ROUTER_SPLITS or 1 slices' CTAs, then router_topk over its Z
// partials (router_topk_summed for Z = 1): experts and weights. tile: the index of the kernel in the ROUTER_SUMS_KERNEL list (ops/moe.py
// ROUTER_TILES, in order; the test writes those lines into router_sums_rows.inc).
#define EMU_SUMS(NAME, TT, TE, RT, RE)                                                                     \
    if (tile == n++) {                                                                                     \
        grid = {(unsigned)((T + (TT) - 1) / (TT)), (unsigned)((E + (TE) - 1) / (TE)), (unsigned)Z};        \
        threads = (TT) * (TE) / ((RT) * (RE));                                                             \
        run = [&] {                                                                                        \
            if (f32) NAME##_f32((const float*)t, w, partial, T, E, H);                                     \
            else NAME((const bf16_t*)t, w, partial, T, E, H);                                              \
        };                                                                                                 \
    }
extern "C" int emu_sums(int f32, int tile, int Z, const void* t, const bf16_t* w, const bf16_t* b, float* partial,
                        int* experts, float* weights, int T, int E, int H, int k, unsigned seed) {
    int n = 0, threads = 0;
    dim3 grid{};
    std::function<void()> run;
#define ROUTER_SUMS_KERNEL(NAME, TT, TE, RT, RE) EMU_SUMS(NAME, TT, TE, RT, RE)
#include "router_sums_rows.inc"
#undef ROUTER_SUMS_KERNEL
    if (!run) return n;  // no such tile: the number of tiles
    emu_launch(grid, threads, WARP_SIZE, seed, run);
    const int per_cta = 256 / WARP_SIZE;
    emu_launch({(unsigned)((T + per_cta - 1) / per_cta), 1, 1}, 256, WARP_SIZE, seed + 1,
               [&] {
                   if (Z == 1) router_topk_summed(partial, b, experts, weights, T, E, k);
                   else router_topk(partial, b, experts, weights, T, E, k);
               });
    return -1;
}
