"""The MoE block on the GPU (gptoss/ops/moe.py; kernels routing.hip and moe.hip) against gptoss.reference.

Fresh random inputs, poisoned outputs: route, dispatch (exact), mlp1 / mlp2 / combine / the whole block
for T in {1, 2, 5, 64, 333, 2048}, E in {4, 32, 128}, both weight formats, odd sizes; the one-launch
routing (route_dispatch) bit for bit against route + dispatch, its counter across launches and graph
replays; batch invariance (bitwise, across batch sizes, positions and tile heights); the MXFP4 large-scale
path; workspace and
CUDA-graph capture; argument errors. The NumPy model of the kernels' index math is tests/test_moe_cpu.py.
"""
from __future__ import annotations

import numpy as np
import pytest

from gptoss.weights.bf16 import from_bf16_bits, to_bf16_bits
from gptoss.kernels import KernelOptions, wgmma_available
from gptoss.weights.mxfp4 import dequantize
from gptoss.ops import moe as M
from gptoss.gpu_weights import ExpertWeights
from tests.gpu.kernel_modes import PORTABLE, skip_fast_path_test, skip_if_portable_is_the_default
from tests.test_moe_cpu import tile_schedule

# the default kernels, the mma.sync ones where the default is wgmma (H100/H200), and the portable build
KERNELS = [pytest.param(None, id="default"), pytest.param(KernelOptions(wgmma=False), id="no-wgmma"),
           pytest.param(PORTABLE, id="portable")]


def skip_if_same_as_default(kernels, fmt):
    skip_if_portable_is_the_default(kernels)
    if kernels is not None and not kernels.portable:
        skip_fast_path_test()
        if fmt != "mxfp4" or not wgmma_available():
            pytest.skip("no wgmma kernels for these experts here: the same kernels as the default")

LIMIT, ALPHA = 7.0, 1.702

gpu = pytest.mark.gpu
TS = [1, 2, 5, 64, 333, 2048]


def rel_err(got, ref) -> float:
    ref = np.asarray(ref, dtype=np.float64)
    return float(np.linalg.norm(np.asarray(got, dtype=np.float64) - ref) / np.linalg.norm(ref))


def bf16(rng, shape, scale=1.0):
    return to_bf16_bits((rng.standard_normal(shape) * scale).astype(np.float32))


class Experts:
    """Random expert weights of one layer in either format, host and device, dequantized per expert on
    demand (a 2880-wide expert is 66 MB in float32)."""

    def __init__(self, rng, fmt, E, R, C, scale_lo=118, scale_hi=125):
        import cupy

        self.fmt, self.E, self.R, self.C = fmt, E, R, C
        if fmt == "mxfp4":  # every code, scales as in real checkpoints (|w| <= 6 * 2^-2)
            self.blocks = rng.integers(0, 256, (E, R, C // 32, 16), dtype=np.uint8)
            self.scales = rng.integers(scale_lo, scale_hi + 1, (E, R, C // 32), dtype=np.uint8)
            self.dev = (cupy.asarray(self.blocks), cupy.asarray(self.scales))
        else:  # random bf16 bit patterns: random sign and mantissa, exponent 119..122: |w| in [2^-8, 2^-4)
            r = rng.integers(0, 1 << 16, (E, R, C), dtype=np.uint16)
            expo = ((r >> np.uint16(7)) & np.uint16(3)) + np.uint16(119)
            self.weight = (r & np.uint16(0x807F)) | (expo << np.uint16(7))
            self.dev = cupy.asarray(self.weight)
        self._cache = {}

    def __getitem__(self, e) -> np.ndarray:  # [R, C] float32, as gptoss.reference.MoEWeights wants
        e = int(e)
        if e not in self._cache:
            self._cache[e] = (dequantize(self.blocks[e], self.scales[e]) if self.fmt == "mxfp4"
                              else from_bf16_bits(self.weight[e]))
        return self._cache[e]


_BIG_EXPERTS: dict = {}


def experts_for(rng, fmt, E, R, C) -> Experts:
    """Fresh random experts, except 20b-sized ones (>= 2^26 weights), which are made once per module
    and shared by the tests of that shape (host generation and dequantization dominate otherwise)."""
    if E * R * C < 1 << 26:
        return Experts(rng, fmt, E, R, C)
    key = (fmt, E, R, C)
    if key not in _BIG_EXPERTS:
        if len(_BIG_EXPERTS) >= 4:
            _BIG_EXPERTS.pop(next(iter(_BIG_EXPERTS)))
        _BIG_EXPERTS[key] = Experts(np.random.default_rng(R * 7 + C + E), fmt, E, R, C)
    return _BIG_EXPERTS[key]


def distinct_experts(rng, T, E, k=4, used=None):
    """[T, k] int32, k distinct experts per token drawn from the first `used` of a permutation."""
    pool = rng.permutation(E)[: used or E]
    return np.stack([rng.choice(pool, size=k, replace=False) for _ in range(T)]).astype(np.int32)


def dispatch_dev(experts, E):
    import cupy

    return M.dispatch(cupy.asarray(experts), E)


def separated_router(rng, T, E, H, k=4, gap=2e-3):
    """t [T, H], router_w [E, H], router_b [E] (bf16 bits) whose top k+1 logits per token are at least
    `gap` apart (rows are redrawn until they are), and the float64 logits."""
    w = bf16(rng, (E, H), 1.0 / np.sqrt(H))
    b = bf16(rng, (E,), 0.5)
    t = bf16(rng, (T, H))
    wf, bf = from_bf16_bits(w).astype(np.float64), from_bf16_bits(b).astype(np.float64)
    kk = min(k + 1, E)
    for _ in range(200):
        logits = from_bf16_bits(t).astype(np.float64) @ wf.T + bf
        top = -np.sort(-logits, axis=1)[:, :kk]
        bad = np.nonzero((np.diff(-top, axis=1) < gap).any(axis=1))[0]
        if not len(bad):
            return t, w, b, logits
        t[bad] = bf16(rng, (len(bad), H))
    raise AssertionError("could not separate the router logits")


@gpu
@pytest.mark.parametrize("E", [4, 32, 128])
@pytest.mark.parametrize("T", TS)
@pytest.mark.parametrize("H", [96, 2880])
def test_route(T, E, H):
    import cupy
    from gptoss.reference import router_topk

    rng = np.random.default_rng(T * 1009 + E * 7 + H)
    t, w, b, logits = separated_router(rng, T, E, H)
    k = 4
    ex = cupy.full((T, k), -1, dtype=cupy.int32)
    wt = cupy.full((T, k), np.nan, dtype=cupy.float32)
    got_e, got_w = M.route(cupy.asarray(t), cupy.asarray(w), cupy.asarray(b), k, out=(ex, wt))
    assert got_e is ex and got_w is wt
    ref_e, ref_w = router_topk(logits.astype(np.float32), k)
    np.testing.assert_array_equal(cupy.asnumpy(got_e), ref_e)
    assert rel_err(cupy.asnumpy(got_w), ref_w) <= 1e-4
    np.testing.assert_allclose(cupy.asnumpy(got_w).sum(axis=1), 1.0, rtol=1e-5)
    # the fp32 input path (the model's unrounded normed activations): same values, same bits out
    e32, w32 = M.route(cupy.asarray(from_bf16_bits(t)), cupy.asarray(w), cupy.asarray(b), k)
    np.testing.assert_array_equal(cupy.asnumpy(e32), ref_e)
    np.testing.assert_array_equal(cupy.asnumpy(w32), cupy.asnumpy(got_w))


@gpu
@pytest.mark.parametrize("kernels", [pytest.param(None, id="default"), pytest.param(PORTABLE, id="portable")])
@pytest.mark.parametrize("E", [4, 32, 128])
@pytest.mark.parametrize("T, H", [(1, 2880), (37, 96), (300, 2880), (1025, 2880), (4160, 1056)])
def test_every_router_kernel_gives_the_same_bits(T, H, E, kernels):
    """route() with each router kernel (router_logits; each register tile with a slice of H per CTA and
    with all of H per CTA): the same experts and weights bit for bit, both inputs; poisoned outputs and
    scratch. H = 96 and 1056: slices of 0-1 and 1-2 chunks."""
    import cupy

    skip_if_portable_is_the_default(kernels)
    rng = np.random.default_rng(T * 13 + E + H)
    t, w, b = _router_inputs(rng, T, E, H, f32=True)
    k = min(4, E)
    for t_in in (t, cupy.asarray(to_bf16_bits(cupy.asnumpy(t)))):
        got = {}
        for router in M.router_choices():
            ex = cupy.full((T, k), -1, dtype=cupy.int32)
            wt = cupy.full((T, k), np.nan, dtype=cupy.float32)
            scratch = cupy.full(M.ROUTER_SPLITS * T * E, np.nan, dtype=cupy.float32)
            M.route(t_in, w, b, k, out=(ex, wt), scratch=scratch, kernels=kernels, router=router)
            got[router] = (cupy.asnumpy(ex), cupy.asnumpy(wt).view(np.uint32))
            assert (got[router][0] >= 0).all() and np.isfinite(cupy.asnumpy(wt)).all(), router
        for router, (ex, wt) in got.items():
            np.testing.assert_array_equal(ex, got[M.LOGITS][0], err_msg=router)
            np.testing.assert_array_equal(wt, got[M.LOGITS][1], err_msg=router)


@gpu
def test_route_ties_lower_index_first():
    """Equal logits (identical router rows and biases): the lower expert index wins."""
    import cupy

    rng = np.random.default_rng(5)
    E, H, T = 32, 64, 7
    row = bf16(rng, (1, H))
    w = np.repeat(row, E, axis=0)
    b = np.zeros(E, dtype=np.uint16)
    b[[3, 9, 17]] = to_bf16_bits(np.float32(1.0))  # three winners tie, then all the rest tie
    t = bf16(rng, (T, H))
    ex, wt = M.route(cupy.asarray(t), cupy.asarray(w), cupy.asarray(b), 4)
    np.testing.assert_array_equal(cupy.asnumpy(ex), np.tile([3, 9, 17, 0], (T, 1)))
    assert np.isfinite(cupy.asnumpy(wt)).all()


@gpu
@pytest.mark.parametrize("E, used", [(4, 3), (32, 32), (32, 7), (128, 100)])
@pytest.mark.parametrize("T", TS + [4096])
def test_dispatch(T, E, used):
    import cupy

    rng = np.random.default_rng(T * 13 + E + used)
    experts = distinct_experts(rng, T, E, k=min(4, used), used=used)
    k = experts.shape[1]
    S = T * k
    bounds = {bm: M.tile_bound(S, E, bm) for bm in M.TILE_BMS}
    out = M.Dispatch(cupy.full(E + 1, -7, dtype=cupy.int32), cupy.full(S, -7, dtype=cupy.int32),
                     {bm: cupy.full((n, 2), -7, dtype=cupy.int32) for bm, n in bounds.items()})
    d = M.dispatch(cupy.asarray(experts), E, out=out)
    assert d is out and d.num_slots == S
    flat = experts.reshape(-1)
    offsets = np.searchsorted(np.sort(flat), np.arange(E + 1))
    np.testing.assert_array_equal(cupy.asnumpy(d.offsets), offsets)
    np.testing.assert_array_equal(cupy.asnumpy(d.sorted_slots), np.argsort(flat, kind="stable"))
    for bm, n in bounds.items():
        np.testing.assert_array_equal(cupy.asnumpy(d.tiles[bm]), tile_schedule(offsets, bm, n))


# ---- route_dispatch (one launch) against route + dispatch (three) ------------------------------------

POISON = -123456789  # no routing output holds it (a rank's local ids are > -256)


def _routing_outputs(T, k, E_d, local: bool):
    """Poisoned outputs of one routing: experts, weights, local ids, and a Dispatch over E_d experts."""
    import cupy

    S = T * k
    return {"experts": cupy.full((T, k), POISON, dtype=cupy.int32),
            "weights": cupy.full((T, k), np.nan, dtype=cupy.float32),
            "local": cupy.full((T, k), POISON, dtype=cupy.int32) if local else None,
            "d": M.Dispatch(cupy.full(E_d + 1, POISON, dtype=cupy.int32), cupy.full(S, POISON, dtype=cupy.int32),
                            {bm: cupy.full((M.tile_bound(S, E_d, bm), 2), POISON, dtype=cupy.int32)
                             for bm in M.TILE_BMS})}


def _poison(o):
    o["experts"][...] = POISON
    o["weights"][...] = np.nan
    o["d"].offsets[...] = POISON
    o["d"].sorted_slots[...] = POISON
    for a in o["d"].tiles.values():
        a[...] = POISON


def _host(o) -> dict:
    """Every routing output as host arrays (weights as their bits)."""
    import cupy

    got = {"experts": cupy.asnumpy(o["experts"]), "weights": cupy.asnumpy(o["weights"]).view(np.uint32),
           "offsets": cupy.asnumpy(o["d"].offsets), "sorted_slots": cupy.asnumpy(o["d"].sorted_slots)}
    got.update({f"tiles{bm}": cupy.asnumpy(a) for bm, a in o["d"].tiles.items()})
    if o["local"] is not None:
        got["local"] = cupy.asnumpy(o["local"])
    return got


def _three_launches(t, w, b, k, E_d=None, first=0, kernels=None) -> dict:
    """route, then (a rank's indices, tensor_parallel.local_experts,) then dispatch: poisoned outputs."""
    from gptoss.ops import tensor_parallel as P

    T, E = t.shape[0], w.shape[0]
    E_d = E if E_d is None else E_d
    o = _routing_outputs(T, k, E_d, local=E_d != E)
    M.route(t, w, b, k, out=(o["experts"], o["weights"]), kernels=kernels)
    ids = o["experts"] if o["local"] is None else P.local_experts(o["experts"], first, out=o["local"],
                                                                  kernels=kernels)
    M.dispatch(ids, E_d, out=o["d"], kernels=kernels)
    return _host(o)


def _fused(t, w, b, k, E_d=None, first=0, counter=None, kernels=None) -> dict:
    T, E = t.shape[0], w.shape[0]
    E_d = E if E_d is None else E_d
    o = _routing_outputs(T, k, E_d, local=E_d != E)
    experts, weights, d = M.route_dispatch(t, w, b, k, num_experts=E_d, first_expert=first, local=o["local"],
                                           out=(o["experts"], o["weights"]), dispatch_out=o["d"], counter=counter,
                                           kernels=kernels)
    assert experts is o["experts"] and weights is o["weights"] and d is o["d"]
    assert (d.num_tokens, d.top_k, d.num_experts) == (T, k, E_d)
    return _host(o)


def _assert_same(got: dict, want: dict):
    """Equal bits, and every output written on the reference side (no poison left; sorted_slots has
    offsets[-1] entries: fewer than T*k in a rank's view, which skips the other ranks' slots)."""
    assert got.keys() == want.keys()
    written = {name: a for name, a in want.items() if name not in ("weights", "sorted_slots")}
    written["sorted_slots"] = want["sorted_slots"][:want["offsets"][-1]]
    assert all((a != POISON).all() for a in written.values()), "unwritten output"
    assert np.isfinite(want["weights"].view(np.float32)).all()
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def _router_inputs(rng, T, E, H, f32=True):
    """Fresh random router input (float32 values of bf16 numbers, as the model's t32, or bf16 bits),
    router_w and router_b (bf16 bits), on the device."""
    import cupy

    t = bf16(rng, (T, H))
    return (cupy.asarray(from_bf16_bits(t) if f32 else t), cupy.asarray(bf16(rng, (E, H), 1.0 / np.sqrt(H))),
            cupy.asarray(bf16(rng, (E,), 0.5)))


# round / round+1: one and two rounds of the last CTA's logits; 300: more rounds, and more slots (1,200)
# than the one launch's dispatch keeps in registers
FUSED_TS = ["1", "2", "7", "threshold", "threshold+1", "round", "round+1", "300"]


def _fused_t(T: str, E: int) -> int:
    edge = M.FUSED_ROUTING_MAX_LOGITS // E  # the most tokens fused_routing() takes the one launch for
    one_round = M.FUSED_MAX_LOGITS // E
    return {"threshold": edge, "threshold+1": edge + 1, "round": one_round, "round+1": one_round + 1}.get(T) or int(T)


@gpu
@pytest.mark.parametrize("kernels", [pytest.param(None, id="default"), pytest.param(PORTABLE, id="portable")])
@pytest.mark.parametrize("f32", [True, False], ids=["f32-input", "bf16-input"])
@pytest.mark.parametrize("E", [32, 128])
@pytest.mark.parametrize("T", FUSED_TS)
def test_route_dispatch_equals_three_launches(T, E, f32, kernels):
    """Experts, weights, offsets, sorted slots and all three tile schedules: the same bits from the one
    launch as from route + dispatch, on both sides of the fused_routing threshold (the one launch works
    past it too, more slowly)."""
    skip_if_portable_is_the_default(kernels)
    T = _fused_t(T, E)
    assert M.fused_routing(T, E) == (T * E <= M.FUSED_ROUTING_MAX_LOGITS)
    rng = np.random.default_rng(T * 17 + E + f32)
    t, w, b = _router_inputs(rng, T, E, 2880, f32)
    want = _three_launches(t, w, b, 4, kernels=kernels)
    assert (want["experts"] >= 0).all() and (want["experts"] < E).all()
    _assert_same(_fused(t, w, b, 4, kernels=kernels), want)


@gpu
@pytest.mark.parametrize("E, ranks", [(32, 4), (128, 8)])
@pytest.mark.parametrize("T", FUSED_TS)
def test_route_dispatch_rank_view_equals_three_launches(T, E, ranks):
    """A tensor-parallel rank's routing (tensor_parallel.moe_partial): the one launch's local ids and
    dispatch over the rank's experts equal route + local_experts + dispatch, for the first, a middle and
    the last rank."""
    T = _fused_t(T, E)
    rng = np.random.default_rng(T * 19 + E)
    t, w, b = _router_inputs(rng, T, E, 2880)
    E_local = E // ranks
    for rank in (0, ranks // 2, ranks - 1):
        first = rank * E_local
        want = _three_launches(t, w, b, 4, E_d=E_local, first=first)
        _assert_same(_fused(t, w, b, 4, E_d=E_local, first=first), want)


@gpu
def test_route_dispatch_counter_resets_between_launches_and_graph_replays():
    """One counter through launches of different grids in a row (it is 0 after each), then the launch
    captured in a CUDA graph and replayed twice: the same bits every time."""
    import cupy

    rng = np.random.default_rng(23)
    E, H, k = 32, 2880, 4
    counter = M.new_route_counter()
    cases = {T: _router_inputs(rng, T, E, H) for T in (1, 7, 64)}
    want = {T: _three_launches(*args, k) for T, args in cases.items()}
    for T in (1, 7, 64, 7, 1, 1):
        _assert_same(_fused(*cases[T], k, counter=counter), want[T])
        assert int(counter[0]) == 0

    T = 7
    t, w, b = cases[T]
    o = _routing_outputs(T, k, E, local=False)
    scratch = cupy.empty(M.ROUTER_SPLITS * T * E, dtype=cupy.float32)  # nothing allocated in the capture

    def launch():
        M.route_dispatch(t, w, b, k, out=(o["experts"], o["weights"]), scratch=scratch, dispatch_out=o["d"],
                         counter=counter)

    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        launch()  # compiled before the capture
        stream.synchronize()
        stream.begin_capture()
        launch()
        graph = stream.end_capture()
        for _ in range(2):
            _poison(o)
            graph.launch(stream)
            stream.synchronize()
            _assert_same(_host(o), want[T])
            assert int(counter[0]) == 0


@gpu
def test_moe_same_bits_with_either_routing(monkeypatch):
    """moe() at a fused_routing size gives the same bits with the three-launch routing forced."""
    import cupy

    rng = np.random.default_rng(29)
    E, H, I, T = 32, 96, 64, 7
    layer = Layer(rng, "mxfp4", E, H, I)
    layer.set_router(bf16(rng, (E, H), 0.1), bf16(rng, (E,), 0.5))
    cfg = _cfg(E, H, I)
    t = cupy.asarray(bf16(rng, (T, H)))
    t32 = cupy.asarray(from_bf16_bits(cupy.asnumpy(t)))
    x0 = rng.standard_normal((T, H)).astype(np.float32)
    assert M.fused_routing(T, E)
    ws = M.MoEWorkspace(T, E, 4, H, I)
    fused = cupy.asnumpy(M.moe(cupy.asarray(x0), t, layer.device(), cfg, workspace=ws, router_input=t32))
    monkeypatch.setattr(M, "fused_routing", lambda T, E: False)
    three = cupy.asnumpy(M.moe(cupy.asarray(x0), t, layer.device(), cfg, workspace=ws, router_input=t32))
    np.testing.assert_array_equal(fused, three)
    assert not np.array_equal(fused, x0)


def _mlp1_ref(t, experts_arr, W1: Experts, b1, sorted_slots, k):
    flat = experts_arr.reshape(-1)
    tf = from_bf16_bits(t)
    b1f = from_bf16_bits(b1)
    I = W1.R // 2
    y = np.zeros((len(sorted_slots), I), dtype=np.float32)
    slots = np.asarray(sorted_slots)
    for e in np.unique(flat):
        rows = np.nonzero(flat[slots] == e)[0]
        h = tf[slots[rows] // k] @ W1[e].T + b1f[e]
        from gptoss.reference import swiglu
        y[rows] = swiglu(h, LIMIT, ALPHA)
    return y


SHAPES = [(64, 96), (96, 64), (2880, 2880)]


def _cases():
    for H, I in SHAPES:
        for E in (4, 32, 128):
            for T in TS:
                if H == 2880 and (E == 128 or T in (2, 64)):
                    continue  # keep the host reference affordable; 2880 x E=32 covers the real shape
                yield H, I, E, T


@gpu
@pytest.mark.parametrize("kernels", KERNELS)
@pytest.mark.parametrize("fmt", ["mxfp4", "bf16"])
@pytest.mark.parametrize("H, I, E, T", list(_cases()))
def test_mlp1(H, I, E, T, fmt, kernels):
    import cupy

    skip_if_same_as_default(kernels, fmt)
    rng = np.random.default_rng(H + I * 3 + E * 5 + T * 7 + (fmt == "bf16"))
    k = 4
    W1 = experts_for(rng, fmt, E, 2 * I, H)
    b1 = bf16(rng, (E, 2 * I), 0.5)
    t = bf16(rng, (T, H))
    experts = distinct_experts(rng, T, E, k)
    d = dispatch_dev(experts, E)
    slots = cupy.asnumpy(d.sorted_slots)
    ref = _mlp1_ref(t, experts, W1, b1, slots, k)
    results = []
    for bm in (None,) + M.tile_heights(fmt, M.uses_wgmma(fmt, kernels)):
        out = cupy.full((T * k, I), 0xFFFF, dtype=cupy.uint16)
        got = M.expert_mlp1(cupy.asarray(t), d, W1.dev, cupy.asarray(b1), LIMIT, ALPHA, out=out, bm=bm,
                            kernels=kernels)
        assert got is out
        y = cupy.asnumpy(got)
        assert rel_err(from_bf16_bits(y), ref) <= 1e-2, bm
        results.append(y)
    for y in results[1:]:
        np.testing.assert_array_equal(y, results[0])  # both tile heights: identical bits


@gpu
@pytest.mark.parametrize("kernels", KERNELS)
@pytest.mark.parametrize("fmt", ["mxfp4", "bf16"])
@pytest.mark.parametrize("H, I, E, T", list(_cases()))
def test_mlp2(H, I, E, T, fmt, kernels):
    import cupy

    skip_if_same_as_default(kernels, fmt)
    rng = np.random.default_rng(H * 3 + I + E * 11 + T * 5 + (fmt == "bf16"))
    k = 4
    W2 = experts_for(rng, fmt, E, H, I)
    b2 = bf16(rng, (E, H), 0.5)
    experts = distinct_experts(rng, T, E, k)
    weights = rng.dirichlet(np.ones(k), size=T).astype(np.float32)
    d = dispatch_dev(experts, E)
    slots = cupy.asnumpy(d.sorted_slots)
    y = bf16(rng, (T * k, I))
    flat = experts.reshape(-1)
    ref = np.zeros((T * k, H), dtype=np.float32)
    yf, b2f = from_bf16_bits(y), from_bf16_bits(b2)
    for e in np.unique(flat):
        rows = np.nonzero(flat[slots] == e)[0]
        ref[slots[rows]] = (yf[rows] @ W2[e].T + b2f[e]) * weights.reshape(-1)[slots[rows], None]
    results = []
    for bm in (None,) + M.tile_heights(fmt, M.uses_wgmma(fmt, kernels)):
        out = cupy.full((T * k, H), np.nan, dtype=cupy.float32)
        got = M.expert_mlp2(cupy.asarray(y), d, W2.dev, cupy.asarray(b2), cupy.asarray(weights), out=out, bm=bm,
                            kernels=kernels)
        assert got is out
        o = cupy.asnumpy(got)
        assert rel_err(o, ref) <= 1e-2, bm
        results.append(o)
    for o in results[1:]:
        np.testing.assert_array_equal(o, results[0])


@gpu
@pytest.mark.parametrize("T, H, k", [(1, 64, 4), (5, 96, 4), (333, 2880, 4), (2048, 64, 2)])
def test_combine_add(T, H, k):
    import cupy

    rng = np.random.default_rng(T + H)
    x = (rng.standard_normal((T, H)) * 3).astype(np.float32)
    eo = rng.standard_normal((T * k, H)).astype(np.float32)
    xd = cupy.asarray(x)
    got = M.combine_add(xd, cupy.asarray(eo))
    assert got is xd
    parts = eo.reshape(T, k, H)
    s = parts[:, 0].copy()
    for j in range(1, k):
        s = s + parts[:, j]  # float32, increasing j: the kernel's exact order
    np.testing.assert_array_equal(cupy.asnumpy(got), x + s)


class Layer:
    """Device weights of one MoE layer in the attribute names gptoss.gpu_weights.LayerWeights uses."""

    def __init__(self, rng, fmt, E, H, I):
        self.W1 = experts_for(rng, fmt, E, 2 * I, H)
        self.W2 = experts_for(rng, fmt, E, H, I)
        self.b1 = bf16(rng, (E, 2 * I), 0.5)
        self.b2 = bf16(rng, (E, H), 0.5)
        self.E, self.H, self.I = E, H, I
        self.w1, self.w2 = self.W1.dev, self.W2.dev

    def set_router(self, w, b):
        import cupy
        from gptoss.reference import MoEWeights

        self.gate_w, self.gate_b = cupy.asarray(w), cupy.asarray(b)
        self.ref = MoEWeights(from_bf16_bits(w), from_bf16_bits(b), self.W1, from_bf16_bits(self.b1),
                              self.W2, from_bf16_bits(self.b2))
        self.b1_dev, self.b2_dev = cupy.asarray(self.b1), cupy.asarray(self.b2)

    def device(self):
        return {"gate_w": self.gate_w, "gate_b": self.gate_b, "w1": self.w1, "w2": self.w2,
                "b1": self.b1_dev, "b2": self.b2_dev}


def _cfg(E, H, I):
    from gptoss.config import ModelConfig

    return ModelConfig(num_layers=1, hidden_size=H, intermediate_size=I, num_experts=E, experts_per_token=4,
                       num_heads=4, num_kv_heads=1, head_dim=16, vocab_size=64)


@gpu
@pytest.mark.parametrize("fmt", ["mxfp4", "bf16"])
@pytest.mark.parametrize("H, I, E, T", [(64, 96, 4, 5), (96, 64, 32, 333), (64, 64, 128, 2048),
                                        (2880, 2880, 32, 1), (2880, 2880, 32, 333)])
def test_moe(H, I, E, T, fmt):
    import cupy
    from gptoss import reference

    rng = np.random.default_rng(H + E + T)
    layer = Layer(rng, fmt, E, H, I)
    t, w, b, _ = separated_router(rng, T, E, H)
    layer.set_router(w, b)
    cfg = _cfg(E, H, I)
    x = rng.standard_normal((T, H)).astype(np.float32)
    xd = cupy.asarray(x)
    got = M.moe(xd, cupy.asarray(t), layer.device(), cfg)
    assert got is xd
    ref = reference.moe(from_bf16_bits(t), layer.ref, cfg)
    assert rel_err(cupy.asnumpy(got).astype(np.float64) - x, ref) <= 1e-2


@gpu
@pytest.mark.parametrize("fmt", ["mxfp4", "bf16"])
@pytest.mark.parametrize("H, I, E", [(2880, 2880, 32), (96, 64, 128)])
def test_batch_invariance(H, I, E, fmt):
    """A token's output is bit-identical alone, in small and large batches at any position, with any
    tile height, and (MXFP4 on wgmma) through the dense copies of the weights."""
    import cupy

    rng = np.random.default_rng(E + H)
    layer = Layer(rng, fmt, E, H, I)
    layer.set_router(bf16(rng, (E, H), 1 / np.sqrt(H)), bf16(rng, (E,), 0.5))
    cfg = _cfg(E, H, I)
    probe_t = bf16(rng, (3, H))
    probe_x = rng.standard_normal((3, H)).astype(np.float32)

    def run(T, positions, bm, weights=None):
        t = bf16(np.random.default_rng(T), (T, H))
        x = np.random.default_rng(T + 1).standard_normal((T, H)).astype(np.float32)
        t[positions], x[positions] = probe_t, probe_x
        out = M.moe(cupy.asarray(x), cupy.asarray(t), weights or layer.device(), cfg, bm=bm)
        return cupy.asnumpy(out)[positions]

    base = run(3, [0, 1, 2], 16)
    cases = [(3, 64), (5, None), (64, 16), (64, 64), (333, None), (2048, 64), (2048, 16), (2048, None)]
    cases += [(T, 128) for T in (3, 333, 2048) if 128 in M.tile_heights(fmt)]
    for T, bm in cases:
        positions = np.random.default_rng(T).choice(T, 3, replace=False)
        np.testing.assert_array_equal(run(T, positions, bm), base, err_msg=f"T={T} bm={bm}")
    if fmt == "mxfp4" and M.uses_wgmma(fmt):
        dense = {**layer.device(), "w1": _Dense(layer.w1), "w2": _Dense(layer.w2)}
        for T, bm in ((3, 128), (333, None), (2048, None), (64, None)):
            positions = np.random.default_rng(T).choice(T, 3, replace=False)
            np.testing.assert_array_equal(run(T, positions, bm, dense), base, err_msg=f"dense T={T} bm={bm}")


@gpu
@pytest.mark.parametrize("bm", M.TILE_BMS)
def test_mxfp4_large_scales_exact(bm):
    """Scales above 128 take the kernel's BIG path: weights with every scale raised by 5 and tokens
    scaled by 2^-5 give bit-identical y (the same exact products)."""
    import cupy

    if bm not in M.tile_heights("mxfp4"):
        pytest.skip(f"no {bm}-row MXFP4 kernel on this device")

    rng = np.random.default_rng(bm)
    E, H, I, T, k = 8, 2880, 192, 64, 4
    W1 = Experts(rng, "mxfp4", E, 2 * I, H, scale_lo=124, scale_hi=128)
    big = (W1.dev[0], W1.dev[1] + np.uint8(5))  # every CTA holds scales 129..133
    b1 = cupy.asarray(bf16(rng, (E, 2 * I), 0.5))
    t = bf16(rng, (T, H))
    t_small = to_bf16_bits(from_bf16_bits(t) * np.float32(2.0**-5))
    d = dispatch_dev(distinct_experts(rng, T, E, k), E)
    y_ref = M.expert_mlp1(cupy.asarray(t), d, W1.dev, b1, LIMIT, ALPHA, bm=bm)
    y_big = M.expert_mlp1(cupy.asarray(t_small), d, big, b1, LIMIT, ALPHA, bm=bm)
    np.testing.assert_array_equal(cupy.asnumpy(y_big), cupy.asnumpy(y_ref))
    # and against the reference: the large scales dequantize as E2M1 * 2^(s - 127)
    from gptoss.reference import swiglu

    slots = cupy.asnumpy(d.sorted_slots)
    blocks, scales = cupy.asnumpy(big[0]), cupy.asnumpy(big[1])
    row_expert = np.repeat(np.arange(E), np.diff(cupy.asnumpy(d.offsets)))
    tf, b1f = from_bf16_bits(t_small), from_bf16_bits(cupy.asnumpy(b1))
    want = np.zeros((T * k, I), dtype=np.float32)
    for e in np.unique(row_expert):
        rows = np.nonzero(row_expert == e)[0]
        h = tf[slots[rows] // k] @ dequantize(blocks[e], scales[e]).T + b1f[e]
        want[rows] = swiglu(h, LIMIT, ALPHA)
    assert rel_err(from_bf16_bits(cupy.asnumpy(y_big)), want) <= 1e-2


def _need_sm90a():
    if not M.uses_wgmma("mxfp4"):
        pytest.skip("the dense and standard-order expert kernels are built for sm_90a only, where the wgmma "
                    "kernels run: not the default here")


def _dense_order(n):
    """The row position dense_expert_copy gives weight row n (the wgmma kernels' order)."""
    return (n & ~15) | ((n & 1) << 3) | ((n >> 1) & 7)


@gpu
def test_dense_expert_copy_is_the_dequantized_weights_in_wgmma_row_order():
    import cupy

    _need_sm90a()
    rng = np.random.default_rng(5)
    E, R, C = 3, 48, 96
    W = Experts(rng, "mxfp4", E, R, C, scale_lo=100, scale_hi=140)
    out = cupy.full((E, R, C), 0xFFFF, dtype=cupy.uint16)
    got = cupy.asnumpy(M.dense_expert_copy(W.dev, out=out))
    n = np.arange(R)
    for e in range(E):
        want = to_bf16_bits(W[e])
        np.testing.assert_array_equal(got[e][_dense_order(n)], want)
        np.testing.assert_array_equal(from_bf16_bits(want), W[e])  # exact: every weight is a bf16
    with pytest.raises(ValueError, match="not MXFP4"):
        M.dense_expert_copy(cupy.zeros((E, R, C), dtype=cupy.uint16))


class _Dense:
    """MXFP4 experts with their dense copy (what gptoss.gpu_weights.ExpertWeights.dense holds)."""
    format = "mxfp4"

    def __init__(self, dev):
        self.blocks, self.scales = dev
        self.dense = M.dense_expert_copy(dev)


DENSE_VARIANTS = [v.name for v in M.VARIANTS.values() if v.dense and v.mlp1]


def _expert_case(seed, H, I, E, T, k=4):
    """MXFP4 w1/w2 with biases, tokens, routing weights and the dispatch of T tokens to k distinct
    experts each, on the device."""
    import cupy

    rng = np.random.default_rng(seed)
    W1, W2 = experts_for(rng, "mxfp4", E, 2 * I, H), experts_for(rng, "mxfp4", E, H, I)
    b1, b2 = cupy.asarray(bf16(rng, (E, 2 * I), 0.5)), cupy.asarray(bf16(rng, (E, H), 0.5))
    t = cupy.asarray(bf16(rng, (T, H)))
    experts = distinct_experts(rng, T, E, k)
    weights = cupy.asarray(rng.dirichlet(np.ones(k), size=T).astype(np.float32))
    return W1, W2, b1, b2, t, weights, dispatch_dev(experts, E)


def _assert_variant_bits(variant, t, d, w1, w2, b1, b2, weights, y_want, o_want):
    """mlp1 then mlp2 launched through the MOE_*_KERNEL row `variant` (and its mlp2 twin) on weights w1,
    w2 (any form expert_matrix takes) give y_want and o_want bit for bit."""
    import cupy

    T, k = weights.shape
    kernels = M.resolved(None)
    y = cupy.full((T * k, y_want.shape[1]), 0xFFFF, dtype=cupy.uint16)
    o = cupy.full((T * k, o_want.shape[1]), np.nan, dtype=cupy.float32)
    v1, v2 = M.variant_pair(variant)
    m1 = M._blocks_for(v1, M.expert_matrix(w1, "w1"), kernels)  # the block order each variant reads
    m2 = M._blocks_for(v2, M.expert_matrix(w2, "w2"), kernels)
    M._launch_gemm(t, d, m1, b1, None, y, None, LIMIT, ALPHA, v1, kernels)
    np.testing.assert_array_equal(cupy.asnumpy(y), y_want)
    M._launch_gemm(cupy.asarray(y_want), d, m2, b2, weights, None, o, 0.0, 0.0, v2, kernels)
    np.testing.assert_array_equal(cupy.asnumpy(o), o_want)


@gpu
@pytest.mark.parametrize("variant", DENSE_VARIANTS)
@pytest.mark.parametrize("H, I, E, T", [(96, 64, 4, 2048), (64, 96, 32, 333), (2880, 2880, 32, 2048),
                                        (2880, 2880, 32, 4096)])
def test_dense_experts_give_the_mxfp4_bits(H, I, E, T, variant):
    """mlp1 and mlp2 through the dense kernels (every MOE_DENSE_KERNEL row, any T) give the bits of the
    MXFP4 wgmma kernels of every tile height, and pick_bm takes them for 128-row tiles."""
    import cupy

    _need_sm90a()
    W1, W2, b1, b2, t, weights, d = _expert_case(H + 7 * I + 3 * T + E, H, I, E, T)
    D1, D2 = _Dense(W1.dev), _Dense(W2.dev)
    kernels = M.resolved(None)
    y_want = M.expert_mlp1(t, d, W1.dev, b1, LIMIT, ALPHA, bm=128)
    o_want = cupy.asnumpy(M.expert_mlp2(y_want, d, W2.dev, b2, weights, bm=128))
    y_want = cupy.asnumpy(y_want)
    for bm in (16, 64):
        np.testing.assert_array_equal(cupy.asnumpy(M.expert_mlp1(t, d, W1.dev, b1, LIMIT, ALPHA, bm=bm)), y_want)
    _assert_variant_bits(variant, t, d, D1, D2, b1, b2, weights, y_want, o_want)
    # the public path: dense weights run the dense kernel where their tiles are 128 rows
    if M.pick_bm(d.num_slots, E, dense=True) == 128:
        assert M._pick_variant("mlp1", d, M.expert_matrix(D1, "w1"), None, kernels).dense
    y2 = M.expert_mlp1(t, d, D1, b1, LIMIT, ALPHA)
    np.testing.assert_array_equal(cupy.asnumpy(y2), y_want)
    np.testing.assert_array_equal(cupy.asnumpy(M.expert_mlp2(y2, d, D2, b2, weights)), o_want)


STD_VARIANTS = [v.name for v in M.VARIANTS.values() if v.std and v.mlp1]


@gpu
@pytest.mark.parametrize("variant", STD_VARIANTS)
@pytest.mark.parametrize("H, I, E, T", [(96, 64, 4, 3), (64, 96, 32, 40), (2880, 2880, 32, 1), (2880, 2880, 32, 64),
                                        (2880, 2880, 128, 8)])
def test_mma_sync_kernels_in_the_wgmma_order_give_the_wgmma_bits(H, I, E, T, variant):
    """mlp1 and mlp2 through every MOE_STD_KERNEL row (mma.sync, the wgmma kernels' k order) give the bits
    of the MXFP4 wgmma kernels, at any T and shape (ragged column tiles, K % 64 = 32)."""
    import cupy

    _need_sm90a()
    W1, W2, b1, b2, t, weights, d = _expert_case(H + 5 * I + 11 * T + E, H, I, E, T)
    y_want = M.expert_mlp1(t, d, W1.dev, b1, LIMIT, ALPHA, bm=64)
    o_want = cupy.asnumpy(M.expert_mlp2(y_want, d, W2.dev, b2, weights, bm=64))
    _assert_variant_bits(variant, t, d, W1.dev, W2.dev, b1, b2, weights, cupy.asnumpy(y_want), o_want)


@gpu
def test_workspace_and_graph_capture():
    """moe() with a workspace gives the same bits as without, and replays from a CUDA graph."""
    import cupy

    rng = np.random.default_rng(11)
    E, H, I, T = 32, 96, 64, 40
    layer = Layer(rng, "mxfp4", E, H, I)
    layer.set_router(bf16(rng, (E, H), 0.1), bf16(rng, (E,), 0.5))
    cfg = _cfg(E, H, I)
    t = cupy.asarray(bf16(rng, (T, H)))
    x0 = rng.standard_normal((T, H)).astype(np.float32)
    want = cupy.asnumpy(M.moe(cupy.asarray(x0), t, layer.device(), cfg))
    ws = M.MoEWorkspace(64, E, 4, H, I)
    x = cupy.asarray(x0)
    M.moe(x, t, layer.device(), cfg, workspace=ws)
    np.testing.assert_array_equal(cupy.asnumpy(x), want)
    stream = cupy.cuda.Stream(non_blocking=True)
    x = cupy.asarray(x0)
    dev = layer.device()
    if M.uses_wgmma("mxfp4"):  # blocks in the file's order are re-laid out per call: not in a capture
        with stream:
            stream.begin_capture()
            with pytest.raises(ValueError, match="cannot capture"):
                M.moe(x, t, dev, cfg, workspace=ws)
            stream.end_capture()
    for name in ("w1", "w2"):  # laid out once, as DeviceWeights does
        dev[name] = M.to_wgmma_order(ExpertWeights("mxfp4", blocks=dev[name][0].copy(), scales=dev[name][1]))
    with stream:
        M.moe(x, t, dev, cfg, workspace=ws)  # warm-up: compiles, sets attributes
        x[...] = cupy.asarray(x0)
        stream.synchronize()
        stream.begin_capture()
        M.moe(x, t, dev, cfg, workspace=ws)
        graph = stream.end_capture()
        x[...] = cupy.asarray(x0)
        graph.launch(stream)
        stream.synchronize()
    np.testing.assert_array_equal(cupy.asnumpy(x), want)


@gpu
@pytest.mark.parametrize("shape", [(3, 40, 5), (2, 16, 90)])
def test_wgmma_order_blocks_against_numpy(shape):
    """wgmma_order_blocks (in place, and back) is wgmma_order_host's layout, and the dense copy of blocks
    in the wgmma order is the dense copy of the file's blocks."""
    import cupy

    rng = np.random.default_rng(sum(shape))
    host = rng.integers(0, 256, (*shape, 16), dtype=np.uint8)
    dev = cupy.asarray(host)
    assert M.wgmma_order_blocks(dev) is dev
    np.testing.assert_array_equal(cupy.asnumpy(dev), M.wgmma_order_host(host))
    np.testing.assert_array_equal(cupy.asnumpy(M.wgmma_order_blocks(dev.copy(), inverse=True)), host)
    if not M.uses_wgmma("mxfp4"):
        return
    scales = cupy.asarray(rng.integers(110, 135, shape, dtype=np.uint8))
    R = shape[1] // 16 * 16
    if R:
        raw = (cupy.asarray(np.ascontiguousarray(host[:, :R])), scales[:, :R].copy())
        laid = ExpertWeights("mxfp4", blocks=cupy.asarray(M.wgmma_order_host(host[:, :R])), scales=raw[1],
                             wgmma_order=True)
        np.testing.assert_array_equal(cupy.asnumpy(M.dense_expert_copy(laid)), cupy.asnumpy(M.dense_expert_copy(raw)))


@gpu
@pytest.mark.parametrize("T", [1, 64, 2048])
def test_wgmma_ordered_experts_give_the_per_call_bits(T):
    """Experts laid out once (to_wgmma_order, what DeviceWeights holds) give the bits of the same blocks
    in the file's order (re-laid out per call) at every tile height; the mma.sync kernels refuse them."""
    import cupy

    if not M.uses_wgmma("mxfp4"):
        pytest.skip("the wgmma order is read only where the wgmma expert kernels run")
    W1, W2, b1, b2, t, weights, d = _expert_case(T + 5, 96, 64, 32, T)
    L1 = M.to_wgmma_order(ExpertWeights("mxfp4", blocks=W1.dev[0].copy(), scales=W1.dev[1]))
    L2 = M.to_wgmma_order(ExpertWeights("mxfp4", blocks=W2.dev[0].copy(), scales=W2.dev[1]))
    assert L1.wgmma_order and M.to_wgmma_order(L1) is L1
    for bm in M.tile_heights("mxfp4"):
        y = M.expert_mlp1(t, d, W1.dev, b1, LIMIT, ALPHA, bm=bm)
        np.testing.assert_array_equal(cupy.asnumpy(M.expert_mlp1(t, d, L1, b1, LIMIT, ALPHA, bm=bm)),
                                      cupy.asnumpy(y))
        np.testing.assert_array_equal(cupy.asnumpy(M.expert_mlp2(y, d, L2, b2, weights, bm=bm)),
                                      cupy.asnumpy(M.expert_mlp2(y, d, W2.dev, b2, weights, bm=bm)))
    with pytest.raises(ValueError, match="wgmma order"):
        M.expert_mlp1(t, d, L1, b1, LIMIT, ALPHA, kernels=KernelOptions(wgmma=False))


@gpu
def test_argument_errors():
    import cupy

    rng = np.random.default_rng(0)
    E, H, I, T = 4, 64, 96, 3
    W1 = Experts(rng, "mxfp4", E, 2 * I, H)
    t = cupy.asarray(bf16(rng, (T, H)))
    experts = cupy.asarray(distinct_experts(rng, T, E))
    d = M.dispatch(experts, E)
    b1 = cupy.asarray(bf16(rng, (E, 2 * I)))
    with pytest.raises(TypeError):
        M.route(t.astype(cupy.float64), cupy.zeros((E, H), cupy.uint16), cupy.zeros(E, cupy.uint16), 4)
    with pytest.raises(ValueError):
        M.route(t, cupy.zeros((E, H + 32), cupy.uint16), cupy.zeros(E, cupy.uint16), 4)
    with pytest.raises(ValueError):
        M.route(t, cupy.zeros((E, H), cupy.uint16), cupy.zeros(E, cupy.uint16), 5)  # k > E
    with pytest.raises(TypeError):
        M.dispatch(experts.astype(cupy.int64), E)
    with pytest.raises(ValueError):
        M.dispatch(experts, 1000)
    with pytest.raises(ValueError):  # w1 for another hidden size
        M.expert_mlp1(cupy.asarray(bf16(rng, (T, 96))), d, W1.dev, b1, LIMIT, ALPHA)
    with pytest.raises(ValueError):  # bias of the wrong shape
        M.expert_mlp1(t, d, W1.dev, b1[:, :-2], LIMIT, ALPHA)
    with pytest.raises(TypeError):
        M.expert_mlp1(t, d, [1, 2], b1, LIMIT, ALPHA)
    with pytest.raises(ValueError):  # non-contiguous input
        M.expert_mlp1(cupy.asarray(bf16(rng, (T, 2 * H)))[:, ::2], d, W1.dev, b1, LIMIT, ALPHA)
    with pytest.raises(ValueError):
        M.expert_mlp1(t, d, W1.dev, b1, LIMIT, ALPHA, bm=32)
    with pytest.raises(ValueError):  # y rows != T*k
        M.expert_mlp2(cupy.zeros((T * 4 + 1, I), cupy.uint16), d, (W1.dev[0][:, :H], W1.dev[1][:, :H]),
                      cupy.zeros((E, H), cupy.uint16), cupy.zeros((T, 4), cupy.float32))
    with pytest.raises(ValueError):
        M.combine_add(cupy.zeros((T, H), cupy.float32), cupy.zeros((T * 4, H + 4), cupy.float32))
