"""linear() (gptoss/kernels/gemm.hip) against a float64 NumPy product of the same bf16 inputs, on fresh
random inputs with poisoned outputs: ragged M and N, K with and without a short last k-tile, bias or not,
both output dtypes, every variant; batch invariance (bitwise); CUDA-graph capture; argument errors.

Tolerances, as ||out - ref|| / ||ref|| against the float64 product of the bf16-rounded inputs:
- f32 out: 5e-5. The inputs are exact, the products exact in fp32; the only error is the fp32
  accumulation. The tensor cores add with truncation rather than round-to-nearest, a bias of up to about
  (K/16) * 2^-24 ~ 1e-5 relative at K = 2880, so 1e-5 would sit on the edge; 5e-5 keeps a margin and
  still sees any real bug (a lost k-step, a wrong element, a bf16 rounding: all >= 1e-3).
- bf16 out: 1e-2 (one rounding to bf16 is 2^-9 relative at most); beyond that, the bf16 output must
  equal the round-to-nearest-even of the f32 output bit for bit (the result is rounded once, at the end).
"""
import numpy as np
import pytest

from gptoss.weights.bf16 import from_bf16_bits, to_bf16_bits
from tests.gpu.kernel_modes import PORTABLE, skip_fast_path_test, skip_if_portable_is_the_default

cupy = pytest.importorskip("cupy")
pytestmark = pytest.mark.gpu

BF16_NAN = 0xFFFF
F32_TOL = 5e-5
BF16_TOL = 1e-2


def rel_err(got, ref) -> float:
    return float(np.linalg.norm(got.astype(np.float64) - ref) / np.linalg.norm(ref))


def make(seed: int, M: int, N: int, K: int, bias: bool = True):
    """x ~ N(0, 1), w ~ N(0, 1/K) (outputs ~ N(0, 1)), bias ~ N(0, 1), as bf16 bits; never zeros."""
    rng = np.random.default_rng(seed)
    x = to_bf16_bits(rng.standard_normal((M, K)).astype(np.float32))
    w = to_bf16_bits((rng.standard_normal((N, K)) / np.sqrt(K)).astype(np.float32))
    b = to_bf16_bits(rng.standard_normal(N).astype(np.float32)) if bias else None
    return x, w, b


def reference(x, w, b):
    ref = from_bf16_bits(x).astype(np.float64) @ from_bf16_bits(w).astype(np.float64).T
    if b is not None:
        ref += from_bf16_bits(b)
    return ref


def poisoned(M, N, out_dtype):
    if out_dtype == "bf16":
        return cupy.full((M, N), BF16_NAN, dtype=cupy.uint16)
    return cupy.full((M, N), np.nan, dtype=cupy.float32)


def run(x, w, b, out_dtype, variant=None):
    """linear() on device copies of host arrays into a poisoned output; the output on the host."""
    from gptoss.ops.gemm import linear

    x_d, w_d = cupy.asarray(x), cupy.asarray(w)
    b_d = None if b is None else cupy.asarray(b)
    out = poisoned(x.shape[0], w.shape[0], out_dtype)
    got = linear(x_d, w_d, b_d, out=out, out_dtype=out_dtype, variant=variant)
    assert got is out
    return cupy.asnumpy(out)


def check_both_dtypes(x, w, b, variant=None):
    ref = reference(x, w, b)
    f32 = run(x, w, b, "f32", variant)
    bf = run(x, w, b, "bf16", variant)
    assert np.isfinite(f32).all(), "unwritten (NaN) outputs in the f32 result"
    assert np.isfinite(from_bf16_bits(bf)).all(), "unwritten (NaN) outputs in the bf16 result"
    assert rel_err(f32, ref) <= F32_TOL
    assert rel_err(from_bf16_bits(bf), ref) <= BF16_TOL
    np.testing.assert_array_equal(bf, to_bf16_bits(f32))


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("N,K", [(8, 32), (40, 96), (200, 2880), (5128, 96)])
@pytest.mark.parametrize("M", [1, 3, 16, 17, 64, 129, 1000])
def test_linear_matches_reference(M, N, K, bias):
    x, w, b = make(M * 100003 + N * 101 + K + bias, M, N, K, bias)
    check_both_dtypes(x, w, b)


@pytest.mark.parametrize("M,N,K", [(1, 5128, 2880), (17, 5128, 2880), (1000, 5128, 2880), (1, 2880, 4096),
                                   (300, 2880, 4096), (2048, 2888, 4096), (5, 32, 2880), (700, 128, 2880)])
def test_linear_model_shapes(M, N, K):
    """The model's K (2880, 4096) with QKV-, output-projection- and router-like N, each variant family."""
    x, w, b = make(M * 7 + N * 13 + K, M, N, K, True)
    check_both_dtypes(x, w, b)


def variant_names():
    from gptoss.ops.gemm import available_variants

    return available_variants()


@pytest.mark.parametrize("M,N,K", [(77, 203, 96), (300, 264, 2880), (5, 130, 4096)])
@pytest.mark.parametrize("variant", variant_names())
def test_every_variant(variant, M, N, K):
    """Each tile shape on ragged M and N (odd N: the scalar-store edge), a short last k-tile (K = 96,
    2880) or none (4096), several trips around the cp.async ring."""
    seed = sum(map(ord, variant)) * 100003 + M * 101 + N * 7 + K
    x, w, b = make(seed, M, N, K, (M + N) % 2 == 1)
    check_both_dtypes(x, w, b, variant)


@pytest.mark.parametrize("out_dtype", ["bf16", "f32"])
def test_batch_invariance(out_dtype):
    """Rows computed inside M = 1, 7, 300 and 4096 launches, at other row offsets, and by every variant
    are bitwise equal."""
    from gptoss.ops.gemm import available_variants, linear

    M, N, K = 4096, 5128, 2880
    x, w, b = make(4242 + len(out_dtype), M, N, K, True)
    x_d, w_d, b_d = cupy.asarray(x), cupy.asarray(w), cupy.asarray(b)
    full = cupy.asnumpy(linear(x_d, w_d, b_d, out=poisoned(M, N, out_dtype), out_dtype=out_dtype))
    assert rel_err(from_bf16_bits(full[:64]) if out_dtype == "bf16" else full[:64],
                   reference(x[:64], w, b)) <= (BF16_TOL if out_dtype == "bf16" else F32_TOL)
    for start, m in [(0, 1), (0, 7), (0, 300), (1234, 1), (1234, 7), (3777, 300), (4095, 1)]:
        got = linear(x_d[start:start + m], w_d, b_d, out=poisoned(m, N, out_dtype), out_dtype=out_dtype)
        np.testing.assert_array_equal(cupy.asnumpy(got), full[start:start + m], err_msg=f"rows {start}..+{m}")
    for name in available_variants():
        got = linear(x_d[:300], w_d, b_d, out=poisoned(300, N, out_dtype), out_dtype=out_dtype, variant=name)
        np.testing.assert_array_equal(cupy.asnumpy(got), full[:300], err_msg=f"variant {name}")


def test_kernel_options_choose_the_variants():
    """KernelOptions(wgmma=False) runs the mma.sync variants (the sm_90 build of the family) where the
    default runs wgmma ones: rows bit-identical to the default's. wgmma=True where the device has no
    wgmma kernels is refused."""
    from gptoss.kernels import KernelOptions, wgmma_available
    from gptoss.ops.gemm import auto_variant, linear

    skip_fast_path_test()
    M, N, K = 2048, 2880, 4096
    x, w, b = make(77, M, N, K, True)
    x_d, w_d, b_d = cupy.asarray(x), cupy.asarray(w), cupy.asarray(b)
    default = cupy.asnumpy(linear(x_d, w_d, b_d, out=poisoned(M, N, "bf16")))
    off = KernelOptions(wgmma=False)
    assert not auto_variant(M, N, False).startswith("wg")
    got = linear(x_d, w_d, b_d, out=poisoned(M, N, "bf16"), kernels=off)
    np.testing.assert_array_equal(cupy.asnumpy(got), default)
    assert rel_err(from_bf16_bits(default), reference(x, w, b)) <= BF16_TOL
    if not wgmma_available():
        with pytest.raises(ValueError, match="wgmma"):
            linear(x_d, w_d, b_d, kernels=KernelOptions(wgmma=True))
    with pytest.raises(ValueError, match="wgmma"):
        linear(x_d, w_d, b_d, variant="wg128x128", kernels=off)


@pytest.mark.parametrize("out_dtype", ["bf16", "f32"])
def test_portable_build_every_variant_bit_identical(out_dtype):
    """The portable build (the code an AMD GPU runs) of every variant but the wgmma ones, on ragged M and
    N with a short last k-tile: within tolerance of the reference, rows bit-identical across variants
    and across launch sizes (one fmaf per k in increasing order), and no dynamic shared memory needed."""
    from gptoss.ops.gemm import available_variants, linear

    skip_if_portable_is_the_default(PORTABLE)
    M, N, K = 300, 203, 2880
    x, w, b = make(515 + len(out_dtype), M, N, K, True)
    x_d, w_d, b_d = cupy.asarray(x), cupy.asarray(w), cupy.asarray(b)
    ref = reference(x, w, b)
    first = None
    for name in available_variants(wgmma=False):
        got = cupy.asnumpy(linear(x_d, w_d, b_d, out=poisoned(M, N, out_dtype), out_dtype=out_dtype,
                                  variant=name, kernels=PORTABLE))
        vals = from_bf16_bits(got) if out_dtype == "bf16" else got
        assert np.isfinite(vals).all(), name
        assert rel_err(vals, ref) <= (BF16_TOL if out_dtype == "bf16" else F32_TOL), name
        if first is None:
            first = got
        np.testing.assert_array_equal(got, first, err_msg=f"variant {name}")
    for start, m in [(0, 1), (17, 7), (100, 200)]:
        got = linear(x_d[start:start + m], w_d, b_d, out=poisoned(m, N, out_dtype), out_dtype=out_dtype,
                     kernels=PORTABLE)
        np.testing.assert_array_equal(cupy.asnumpy(got), first[start:start + m], err_msg=f"rows {start}..+{m}")
    with pytest.raises(ValueError, match="wgmma"):
        linear(x_d, w_d, b_d, variant="wg128x128", kernels=PORTABLE)


def test_allocates_output_and_handles_empty_batch():
    from gptoss.ops.gemm import linear

    x, w, b = make(5, 9, 40, 64, True)
    x_d, w_d, b_d = cupy.asarray(x), cupy.asarray(w), cupy.asarray(b)
    out = linear(x_d, w_d, b_d)
    assert out.dtype == cupy.uint16 and out.shape == (9, 40)
    out32 = linear(x_d, w_d, b_d, out_dtype="f32")
    assert out32.dtype == cupy.float32 and out32.shape == (9, 40)
    np.testing.assert_array_equal(cupy.asnumpy(out), to_bf16_bits(cupy.asnumpy(out32)))
    empty = linear(cupy.empty((0, 64), dtype=cupy.uint16), w_d, b_d)
    assert empty.shape == (0, 40)


def test_graph_capture_replays_the_same_result():
    """No synchronization or host copy inside linear(): it captures into a CUDA graph and replays."""
    from gptoss.ops.gemm import linear

    x, w, b = make(77, 37, 2888, 2880, True)
    x_d, w_d, b_d = cupy.asarray(x), cupy.asarray(w), cupy.asarray(b)
    eager = cupy.asnumpy(linear(x_d, w_d, b_d))  # compiles the kernel outside the capture
    out = poisoned(37, 2888, "bf16")
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        stream.begin_capture()
        linear(x_d, w_d, b_d, out=out)
        graph = stream.end_capture()
        graph.launch(stream)
        stream.synchronize()
    np.testing.assert_array_equal(cupy.asnumpy(out), eager)


def test_argument_errors():
    from gptoss.ops.gemm import linear

    x, w, b = make(3, 4, 40, 64, True)
    x_d, w_d, b_d = cupy.asarray(x), cupy.asarray(w), cupy.asarray(b)
    with pytest.raises(TypeError):
        linear(x_d.astype(cupy.float32), w_d)  # not bf16
    with pytest.raises(TypeError):
        linear(x, w_d)  # host array
    with pytest.raises(ValueError):
        linear(x_d, w_d[:, :32].copy())  # K mismatch
    with pytest.raises(ValueError):
        linear(x_d[:, :48].copy(), w_d[:, :48].copy())  # K not a multiple of 32
    with pytest.raises(ValueError):
        linear(x_d, w_d, cupy.asarray(b[:39]))  # bias shape
    with pytest.raises(TypeError):
        linear(x_d, w_d, b_d.astype(cupy.float32))  # bias dtype
    with pytest.raises(ValueError):
        linear(x_d, w_d, out=cupy.empty((4, 41), dtype=cupy.uint16))  # out shape
    with pytest.raises(TypeError):
        linear(x_d, w_d, out=cupy.empty((4, 40), dtype=cupy.float32))  # out dtype vs out_dtype="bf16"
    with pytest.raises(ValueError):
        linear(x_d, w_d, out_dtype="fp16")
    with pytest.raises(ValueError):
        linear(cupy.asarray(np.concatenate([x, x], axis=1))[:, :64], w_d)  # not contiguous
    with pytest.raises(ValueError):
        flat = cupy.empty(x.size + 4, dtype=cupy.uint16)
        linear(flat[4:].reshape(x.shape), w_d)  # 8-byte, not 16-byte, aligned
    with pytest.raises(ValueError):
        linear(x_d, w_d, variant="512x512")
