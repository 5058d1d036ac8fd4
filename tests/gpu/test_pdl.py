"""Programmatic dependent launch on the device (gptoss/kernels/launch.py; KernelOptions.pdl): the same
bits with it on and off, a long chain of dependent launches that a kernel without its wait would get
wrong, and the captured graph's programmatic edges (what makes the overlap happen under replay).

The rest of the GPU suite runs with PDL off (the default) unless GPTOSS_PDL=1; these tests compare
pdl=True against pdl=False explicitly.
"""
import ctypes
import os

import numpy as np
import pytest

from gptoss.config import TINY_REAL_HEADS
from gptoss.kernels import KernelOptions
from tests.gpu.kernel_modes import skip_fast_path_test

pytestmark = pytest.mark.gpu

ON, OFF = KernelOptions(pdl=True), KernelOptions(pdl=False)


def _need_pdl():
    from gptoss.kernels import pdl_available

    skip_fast_path_test()
    if not pdl_available():
        pytest.skip("no programmatic dependent launch here (needs an NVIDIA sm_90+ GPU and cuLaunchKernelEx)")


def test_kernels_launch_programmatically_when_on():
    from gptoss.kernels import default_kernels, kernel
    from gptoss.kernels.launch import ProgrammaticLaunch

    _need_pdl()
    assert isinstance(kernel("embed", "gather_rows_f32", kernels=ON.resolve()), ProgrammaticLaunch)
    assert not isinstance(kernel("embed", "gather_rows_f32", kernels=OFF.resolve()), ProgrammaticLaunch)
    assert default_kernels().pdl is (os.environ.get("GPTOSS_PDL") == "1")  # off unless GPTOSS_PDL=1


def test_model_steps_are_bit_identical_with_and_without_pdl():
    """Prefill (eager), eager decode steps and captured decode graphs: the same logits and greedy ids."""
    import cupy

    from gptoss.batch import StepBatch
    from tests.gpu.test_model import make

    _need_pdl()
    cfg = TINY_REAL_HEADS
    rng = np.random.default_rng(11)
    lens = [5, 33, 70, 12]
    prompts = [rng.integers(0, cfg.vocab_size, m).astype(np.int32) for m in lens]
    results = {}
    for name, opts in (("on", ON), ("off", OFF)):
        _, model = make(cfg, "mxfp4", seed=4, slots=6, kernels=opts)
        assert model.kernels.pdl is (name == "on")
        got = []
        for s, p in enumerate(prompts):
            got.append(cupy.asnumpy(model.forward(StepBatch.prefill([p], [s]))).copy())
        tokens = np.array([p[-1] for p in prompts], np.int32)
        positions = np.array(lens, np.int32)
        slots = np.arange(len(lens), dtype=np.int32)
        for _ in range(5):
            step = StepBatch.decode(tokens, positions, slots)
            eager = cupy.asnumpy(model.forward(step)).copy()
            ids = model.step(step, use_graph=True)  # the captured graph rewrites the same K/V
            graph = cupy.asnumpy(model.buf.logits[:len(lens)]).copy()
            np.testing.assert_array_equal(graph, eager)
            got += [eager, ids.copy()]
            tokens, positions = ids.astype(np.int32), positions + 1
        results[name] = got
    for a, b in zip(results["on"], results["off"]):
        np.testing.assert_array_equal(a, b)


def _chain(opts, x, y, parts, rows, pairs: int):
    """`pairs` times: y = parts[0] + parts[1] (reduce_ranks; parts[1] is all ones), then parts[0] = y
    (gather_rows of every row): each launch reads what the one before it wrote."""
    from gptoss.ops import embed as E
    from gptoss.ops import tensor_parallel as P

    for _ in range(pairs):
        P.reduce_ranks(parts, out=y, kernels=opts)
        E.gather_rows(rows, y, out=x, kernels=opts)


@pytest.mark.parametrize("pdl", [True, False], ids=["pdl", "no-pdl"])
def test_a_long_chain_of_dependent_launches_loses_no_write(pdl):
    """200 launches of two kernels, each reading the previous one's output (32 MB per buffer, so a
    kernel runs long enough for its successor to be resident and waiting), eager and as a captured
    graph replayed 3 times: every element counts every step (integers, exact in float32)."""
    import cupy

    if pdl:
        _need_pdl()
    opts = (ON if pdl else OFF).resolve()
    T, H, pairs = 4096, 2048, 100
    rng = np.random.default_rng(2)
    start = rng.integers(0, 1000, (T, H)).astype(np.float32)
    parts = cupy.empty((2, T, H), cupy.float32)
    x, y = parts[0], cupy.full((T, H), np.nan, cupy.float32)
    parts[1].fill(1.0)
    x.set(start)
    rows = cupy.arange(T, dtype=cupy.int32)
    _chain(opts, x, y, parts, rows, pairs)  # eager (also compiles both kernels before the capture)
    np.testing.assert_array_equal(cupy.asnumpy(x), start + pairs)
    np.testing.assert_array_equal(cupy.asnumpy(y), start + pairs)
    cupy.cuda.get_current_stream().synchronize()
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        stream.begin_capture()
        try:
            _chain(opts, x, y, parts, rows, pairs)
        finally:
            graph = stream.end_capture()
    edges, programmatic = graph_edges(graph.graph)
    print(f"pdl={pdl}: captured graph of {2 * pairs} kernels: {edges} edges, {programmatic} programmatic")
    for _ in range(3):
        graph.launch(stream)
    stream.synchronize()
    np.testing.assert_array_equal(cupy.asnumpy(x), start + 4 * pairs)
    np.testing.assert_array_equal(cupy.asnumpy(y), start + 4 * pairs)
    if edges is not None:
        assert edges == 2 * pairs - 1  # a chain
        assert programmatic == (edges if pdl else 0)


class _EdgeData(ctypes.Structure):
    """CUgraphEdgeData (cuda.h, CUDA 12.3+): type 1 = CU_GRAPH_DEPENDENCY_TYPE_PROGRAMMATIC."""
    _fields_ = [("from_port", ctypes.c_ubyte), ("to_port", ctypes.c_ubyte), ("type", ctypes.c_ubyte),
                ("reserved", ctypes.c_ubyte * 5)]


def graph_edges(graph_ptr: int):
    """(edges, programmatic edges) of a CUDA graph through cuGraphGetEdges_v2, or (None, None) where the
    driver lacks it."""
    try:
        fn = ctypes.CDLL("libcuda.so.1").cuGraphGetEdges_v2
    except (OSError, AttributeError):
        return None, None
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                   ctypes.POINTER(ctypes.c_size_t)]
    n = ctypes.c_size_t(0)
    assert fn(ctypes.c_void_p(graph_ptr), None, None, None, ctypes.byref(n)) == 0
    count = n.value
    src, dst = (ctypes.c_void_p * max(count, 1))(), (ctypes.c_void_p * max(count, 1))()
    data = (_EdgeData * max(count, 1))()
    assert fn(ctypes.c_void_p(graph_ptr), src, dst, data, ctypes.byref(n)) == 0
    return count, sum(1 for e in data[:count] if e.type == 1)
