"""routing.hip's portable code run on the CPU (tests/emulated: a thread per GPU thread, g++), both warp
widths: route_dispatch (one launch) gives the same bits as router_logits + router_topk + moe_dispatch
(three), for the whole router and for a tensor-parallel rank's view, across its rounds of logits, with the
CTAs finishing in any order; its counter is 0 after every launch; the results are the top k of the
float64 logits and their stable sort; and every router_sums tile, a slice of H per CTA or all of it, gives
router_logits' experts and weights. The NVIDIA-only code (__match_any_sync, PDL) and the memory model
of a real GPU are not exercised here: tests/gpu/test_moe.py runs the same comparisons on the device.
"""
from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from gptoss.kernels import expanded_source
from gptoss.ops import moe as M
from gptoss.weights.bf16 import from_bf16_bits, to_bf16_bits
from tests.test_moe_cpu import tile_schedule

HERE = Path(__file__).resolve().parent / "emulated"
# how common.h is entered: its AMD branch (wave64) or its CUDA branch without the NVIDIA-only code
MODES = {"amd-wave64": ("-D__HIPCC_RTC__=1", 64), "portable-warp32": ("-DGPTOSS_PORTABLE=1", 32)}
POISON = -123456789
K = 4


@pytest.fixture(scope="module")
def emulators(tmp_path_factory):
    compiler = shutil.which("g++")
    if compiler is None:
        pytest.skip("no g++ for the kernel emulator")
    build = tmp_path_factory.mktemp("routing-emulator")
    (build / "routing_expanded.inc").write_text(expanded_source("routing"))
    (build / "router_sums_rows.inc").write_text(  # the driver runs every router_sums tile of the source
        "".join(f"ROUTER_SUMS_KERNEL(router_sums_{n}, {', '.join(map(str, v))})\n" for n, v in M.ROUTER_TILES.items()))
    libs = {}
    for mode, (define, width) in MODES.items():
        lib = build / f"routing-{mode}.so"
        cmd = [compiler, "-std=c++20", "-O1", "-fPIC", "-shared", "-pthread", "-fno-strict-aliasing",
               "-Wno-unknown-pragmas", define, f"-I{HERE}", f"-I{build}", "-o", str(lib),
               str(HERE / "routing_driver.cpp")]
        done = subprocess.run(cmd, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-3000:]
        libs[mode] = ctypes.CDLL(str(lib))
        assert libs[mode].emu_warp_width() == width
    return libs


def _ptr(a):
    return a.ctypes.data_as(ctypes.c_void_p)


def _outputs(T, E_d, rank_view):
    S = T * K
    out = {"experts": np.full((T, K), POISON, np.int32), "weights": np.full((T, K), np.nan, np.float32),
           "offsets": np.full(E_d + 1, POISON, np.int32), "sorted_slots": np.full(S, POISON, np.int32),
           **{f"tiles{bm}": np.full((M.tile_bound(S, E_d, bm), 2), POISON, np.int32) for bm in M.TILE_BMS}}
    if rank_view:
        out["local"] = np.full((T, K), POISON, np.int32)
    return out


def _run(lib, fused, t, w, b, E_d, first, seed, counter=None):
    T, H = t.shape
    E = w.shape[0]
    o = _outputs(T, E_d, E_d != E)
    partial = np.full(M.ROUTER_SPLITS * T * E, np.nan, np.float32)
    ids = o.get("local", o["experts"])
    args = [_ptr(o["experts"]), _ptr(o["weights"]), _ptr(ids), ctypes.c_int(first), ctypes.c_int(E_d),
            _ptr(o["offsets"]), _ptr(o["sorted_slots"]), *(_ptr(o[f"tiles{bm}"]) for bm in M.TILE_BMS),
            ctypes.c_int(T), ctypes.c_int(E), ctypes.c_int(H), ctypes.c_int(K), ctypes.c_uint(seed)]
    f32 = ctypes.c_int(t.dtype == np.float32)
    if fused:
        lib.emu_fused(f32, _ptr(t), _ptr(w), _ptr(b), _ptr(partial), _ptr(counter), *args)
    else:
        lib.emu_three(f32, _ptr(t), _ptr(w), _ptr(b), _ptr(partial), *args)
    o["weights"] = o["weights"].view(np.uint32)
    return o


# (T, E, experts the dispatch groups, first of them): the 20b and 120b routers on both sides of
# fused_routing's threshold (one round of logits, two), and rank views
CASES = [(1, 32, 32, 0), (7, 32, 32, 0), (64, 32, 32, 0), (65, 32, 32, 0), (17, 128, 128, 0), (7, 32, 8, 8),
         (17, 128, 16, 112)]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("T, E, E_d, first", CASES)
def test_route_dispatch_equals_three_launches_emulated_cpu(emulators, mode, T, E, E_d, first):
    lib = emulators[mode]
    rng = np.random.default_rng(T * 31 + E + E_d)
    H = 64
    t_bits = to_bf16_bits(rng.standard_normal((T, H)).astype(np.float32))
    t = from_bf16_bits(t_bits).astype(np.float32) if T % 2 else t_bits  # both router inputs
    w = to_bf16_bits((rng.standard_normal((E, H)) / np.sqrt(H)).astype(np.float32))
    b = to_bf16_bits((rng.standard_normal(E) * 0.5).astype(np.float32))
    three = _run(lib, False, t, w, b, E_d, first, seed=1)
    counter = np.zeros(1, np.uint32)
    for seed in (2, 3):  # two CTA orders, one counter
        fused = _run(lib, True, t, w, b, E_d, first, seed, counter)
        assert counter[0] == 0
        assert fused.keys() == three.keys()
        for name in three:
            np.testing.assert_array_equal(fused[name], three[name], err_msg=name)

    # and they are right: the top k of the logits (float64; the draws leave no near ties at this size)
    logits = (from_bf16_bits(t_bits).astype(np.float64) @ from_bf16_bits(w).astype(np.float64).T
              + from_bf16_bits(b))
    np.testing.assert_array_equal(three["experts"], np.argsort(-logits, axis=1, kind="stable")[:, :K])
    picked = np.take_along_axis(logits, three["experts"], axis=1)
    want_w = np.exp(picked - picked[:, :1]) / np.exp(picked - picked[:, :1]).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(three["weights"].view(np.float32), want_w, rtol=1e-4)
    ids = three.get("local", three["experts"]).reshape(-1)
    if "local" in three:
        np.testing.assert_array_equal(three["local"], three["experts"] - first)
    mine = np.nonzero((ids >= 0) & (ids < E_d))[0]
    offsets = np.searchsorted(np.sort(ids[mine]), np.arange(E_d + 1))
    np.testing.assert_array_equal(three["offsets"], offsets)
    np.testing.assert_array_equal(three["sorted_slots"][:len(mine)], mine[np.argsort(ids[mine], kind="stable")])
    assert (three["sorted_slots"][len(mine):] == POISON).all()  # a rank's view writes only its rows
    for bm in M.TILE_BMS:
        np.testing.assert_array_equal(three[f"tiles{bm}"], tile_schedule(offsets, bm, M.tile_bound(T * K, E_d, bm)))


def _tiles(lib) -> list[str]:
    """ROUTER_TILES in the driver's order; the driver has every one of them."""
    n = lib.emu_sums(0, 10**6, 1, *([None] * 6), *([0] * 5))
    assert n == len(M.ROUTER_TILES)
    return list(M.ROUTER_TILES)


# (T, E, H): tiles cut by T and by E; H of 2 and 3 chunks (most slices empty) and of 33 (slices of 1 and 2)
SUMS_CASES = [(37, 32, 64), (70, 128, 96), (5, 4, 1056)]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("T, E, H", SUMS_CASES)
def test_router_sums_give_the_logits_bits_emulated_cpu(emulators, mode, T, E, H):
    """Every router_sums tile with Z = ROUTER_SPLITS (partials) and Z = 1 (the sum), then router_topk over
    its Z partials: the experts and weights of router_logits + router_topk bit for bit (the same fp32 sums
    in the same order), both inputs."""
    lib = emulators[mode]
    rng = np.random.default_rng(T * 7 + E + H)
    t_bits = to_bf16_bits(rng.standard_normal((T, H)).astype(np.float32))
    w = to_bf16_bits((rng.standard_normal((E, H)) / np.sqrt(H)).astype(np.float32))
    b = to_bf16_bits((rng.standard_normal(E) * 0.5).astype(np.float32))
    k = min(K, E)
    for t in (t_bits, from_bf16_bits(t_bits).astype(np.float32)):
        want = _run(lib, False, t, w, b, E, 0, seed=1)
        for i, name in enumerate(_tiles(lib)):
            for z in (M.ROUTER_SPLITS, 1):
                partial = np.full(z * T * E, np.nan, np.float32)
                experts = np.full((T, k), POISON, np.int32)
                weights = np.full((T, k), np.nan, np.float32)
                f32 = ctypes.c_int(t.dtype == np.float32)
                assert lib.emu_sums(f32, i, z, _ptr(t), _ptr(w), _ptr(b), _ptr(partial), _ptr(experts),
                                    _ptr(weights), T, E, H, k, ctypes.c_uint(5 + i)) == -1
                assert np.isfinite(partial).all(), (name, z)
                np.testing.assert_array_equal(experts, want["experts"], err_msg=f"{name}:{z}")
                np.testing.assert_array_equal(weights.view(np.uint32), want["weights"], err_msg=f"{name}:{z}")
