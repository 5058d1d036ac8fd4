"""embed, rmsnorm and add_rmsnorm on the GPU against gptoss.reference, on fresh random inputs with
poisoned outputs, over odd sizes and both the vectorised and the scalar (unaligned) paths."""
import numpy as np
import pytest

from gptoss.weights.bf16 import from_bf16_bits, to_bf16_bits

cupy = pytest.importorskip("cupy")
pytestmark = pytest.mark.gpu

EPS = 1e-5
BF16_NAN = 0xFFFF


def rel_err(got, ref) -> float:
    return float(np.linalg.norm(got.astype(np.float64) - ref) / np.linalg.norm(ref))


def random_x(rng, T, H):
    # residual-stream-like rows: different scales per row, never zero
    return (rng.standard_normal((T, H)) * rng.uniform(0.5, 20.0, (T, 1))).astype(np.float32)


def random_scale(rng, H, dtype):
    s = rng.uniform(0.2, 2.0, H).astype(np.float32) * rng.choice([-1.0, 1.0], H).astype(np.float32)
    return to_bf16_bits(s) if dtype == "bf16" else s


def scale_f32(s):
    return from_bf16_bits(s) if s.dtype == np.uint16 else s


def misaligned(host):
    """A C-contiguous device copy of host whose address is one element off 16-byte alignment."""
    flat = cupy.empty(host.size + 1, dtype=host.dtype)
    view = flat[1:].reshape(host.shape)
    view[...] = cupy.asarray(host)
    assert view.flags.c_contiguous and view.data.ptr % 16
    return view


# ---- embed ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("H", [64, 96, 2880, 45])
@pytest.mark.parametrize("T", [1, 3, 1000])
def test_embed(H, T):
    from gptoss.ops.embed import embed

    rng = np.random.default_rng(H * 7919 + T)
    V = 1237
    table = to_bf16_bits(rng.standard_normal((V, H)).astype(np.float32))
    tokens = rng.integers(0, V, T).astype(np.int32)
    tokens[0] = V - 1
    out = cupy.full((T, H), np.nan, dtype=cupy.float32)
    got = embed(cupy.asarray(tokens), cupy.asarray(table), out=out)
    assert got is out
    np.testing.assert_array_equal(cupy.asnumpy(got), from_bf16_bits(table[tokens]))


def test_embed_unaligned_table():
    from gptoss.ops.embed import embed

    rng = np.random.default_rng(5)
    V, H, T = 300, 64, 17
    table = to_bf16_bits(rng.standard_normal((V, H)).astype(np.float32))
    tokens = rng.integers(0, V, T).astype(np.int32)
    got = embed(cupy.asarray(tokens), misaligned(table))
    np.testing.assert_array_equal(cupy.asnumpy(got), from_bf16_bits(table[tokens]))


def test_embed_out_of_range_ids_give_nan_rows():
    from gptoss.ops.embed import embed

    rng = np.random.default_rng(6)
    V, H = 50, 96
    table = to_bf16_bits(rng.standard_normal((V, H)).astype(np.float32))
    tokens = np.array([3, V, -1, 2**31 - 1, 0, V - 1], dtype=np.int32)
    got = cupy.asnumpy(embed(cupy.asarray(tokens), cupy.asarray(table)))
    bad = np.array([False, True, True, True, False, False])
    assert np.isnan(got[bad]).all()
    np.testing.assert_array_equal(got[~bad], from_bf16_bits(table[tokens[~bad]]))


def test_embed_checks_arguments():
    from gptoss.ops.embed import embed

    table = cupy.ones((10, 64), dtype=cupy.uint16)
    with pytest.raises(TypeError):
        embed(cupy.zeros(3, dtype=cupy.int64), table)
    with pytest.raises(TypeError):
        embed(cupy.zeros(3, dtype=cupy.int32), table.astype(cupy.float32))
    with pytest.raises(ValueError):
        embed(cupy.zeros(3, dtype=cupy.int32), table, out=cupy.empty((3, 63), dtype=cupy.float32))


# ---- rmsnorm -------------------------------------------------------------------------------------

@pytest.mark.parametrize("scale_dtype", ["bf16", "f32"])
@pytest.mark.parametrize("H", [64, 96, 2880, 45])
@pytest.mark.parametrize("T", [1, 3, 1000])
def test_rmsnorm(T, H, scale_dtype):
    from gptoss.ops.norm import rmsnorm
    from gptoss.reference import rmsnorm as ref_rmsnorm

    rng = np.random.default_rng(T * 31 + H)
    x = random_x(rng, T, H)
    scale = random_scale(rng, H, scale_dtype)
    x_dev = cupy.asarray(x)
    out = cupy.full((T, H), BF16_NAN, dtype=cupy.uint16)
    got = rmsnorm(x_dev, cupy.asarray(scale), EPS, out=out)
    assert got is out
    ref = ref_rmsnorm(x, scale_f32(scale), EPS)
    assert rel_err(from_bf16_bits(cupy.asnumpy(got)), ref) <= 1e-2
    # one rounding to bf16: every element within one bf16 step of the exact value
    assert np.all(np.abs(from_bf16_bits(cupy.asnumpy(got)) - ref) <= np.abs(ref) * 2.0**-7 + 1e-6)
    np.testing.assert_array_equal(cupy.asnumpy(x_dev), x)  # the input is left alone


def test_rmsnorm_unaligned_inputs():
    from gptoss.ops.norm import rmsnorm
    from gptoss.reference import rmsnorm as ref_rmsnorm

    rng = np.random.default_rng(11)
    T, H = 7, 96
    x, scale = random_x(rng, T, H), random_scale(rng, H, "f32")
    got = rmsnorm(misaligned(x), misaligned(scale), EPS)
    assert rel_err(from_bf16_bits(cupy.asnumpy(got)), ref_rmsnorm(x, scale, EPS)) <= 1e-2


def test_rmsnorm_eps_matters_for_small_rows():
    # rows of tiny values: eps dominates mean(x^2), so a dropped or misplaced eps shows
    from gptoss.ops.norm import rmsnorm
    from gptoss.reference import rmsnorm as ref_rmsnorm

    rng = np.random.default_rng(12)
    x = (rng.standard_normal((4, 64)) * 1e-3).astype(np.float32)
    scale = random_scale(rng, 64, "f32")
    got = from_bf16_bits(cupy.asnumpy(rmsnorm(cupy.asarray(x), cupy.asarray(scale), 1e-2)))
    assert rel_err(got, ref_rmsnorm(x, scale, 1e-2)) <= 1e-2


@pytest.mark.parametrize("delta_dtype", ["bf16", "f32"])
@pytest.mark.parametrize("scale_dtype", ["bf16", "f32"])
@pytest.mark.parametrize("H,T", [(64, 1), (96, 3), (2880, 1000), (2880, 1), (45, 3), (6400, 2)])
def test_add_rmsnorm(H, T, scale_dtype, delta_dtype):
    from gptoss.ops.norm import add_rmsnorm
    from gptoss.reference import rmsnorm as ref_rmsnorm

    rng = np.random.default_rng(H + 17 * T)
    x = random_x(rng, T, H)
    delta = (rng.standard_normal((T, H)) * 3).astype(np.float32)
    if delta_dtype == "bf16":
        delta = to_bf16_bits(delta)
    delta_f32 = scale_f32(delta)
    scale = random_scale(rng, H, scale_dtype)
    x_dev = cupy.asarray(x)
    out = cupy.full((T, H), BF16_NAN, dtype=cupy.uint16)
    got = add_rmsnorm(x_dev, cupy.asarray(delta), cupy.asarray(scale), EPS, out=out)
    assert got is out
    np.testing.assert_array_equal(cupy.asnumpy(x_dev), x + delta_f32)  # fp32 add, in place
    ref = ref_rmsnorm(x + delta_f32, scale_f32(scale), EPS)
    assert rel_err(from_bf16_bits(cupy.asnumpy(got)), ref) <= 1e-2
    # with the fp32 copy (the router's input): the same t, and fp32 values within 1e-5 of the reference
    x_dev = cupy.asarray(x)
    out32 = cupy.full((T, H), np.nan, dtype=cupy.float32)
    got2 = add_rmsnorm(x_dev, cupy.asarray(delta), cupy.asarray(scale), EPS, out_f32=out32)
    np.testing.assert_array_equal(cupy.asnumpy(got2), cupy.asnumpy(got))
    assert rel_err(cupy.asnumpy(out32), ref) <= 1e-5
    np.testing.assert_array_equal(to_bf16_bits(cupy.asnumpy(out32)), cupy.asnumpy(got))


def test_add_rmsnorm_unaligned():
    from gptoss.ops.norm import add_rmsnorm
    from gptoss.reference import rmsnorm as ref_rmsnorm

    rng = np.random.default_rng(13)
    T, H = 5, 64
    x = random_x(rng, T, H)
    delta = to_bf16_bits(rng.standard_normal((T, H)).astype(np.float32))
    scale = random_scale(rng, H, "bf16")
    x_dev = misaligned(x)
    got = add_rmsnorm(x_dev, misaligned(delta), misaligned(scale), EPS)
    np.testing.assert_array_equal(cupy.asnumpy(x_dev), x + from_bf16_bits(delta))
    ref = ref_rmsnorm(x + from_bf16_bits(delta), from_bf16_bits(scale), EPS)
    assert rel_err(from_bf16_bits(cupy.asnumpy(got)), ref) <= 1e-2


def test_norm_checks_arguments():
    from gptoss.ops.norm import add_rmsnorm, rmsnorm

    x = cupy.ones((3, 64), dtype=cupy.float32)
    with pytest.raises(TypeError):
        rmsnorm(x.astype(cupy.float16), cupy.ones(64, dtype=cupy.float32), EPS)
    with pytest.raises(TypeError):
        rmsnorm(x, cupy.ones(64, dtype=cupy.float16), EPS)
    with pytest.raises(ValueError):
        rmsnorm(x, cupy.ones(65, dtype=cupy.float32), EPS)
    with pytest.raises(ValueError):
        rmsnorm(x[:, ::2], cupy.ones(32, dtype=cupy.float32), EPS)  # not contiguous
    with pytest.raises(ValueError):
        add_rmsnorm(x, cupy.ones((3, 63), dtype=cupy.uint16), cupy.ones(64, dtype=cupy.uint16), EPS)


@pytest.mark.parametrize("scale_dtype", ["bf16", "f32"])
@pytest.mark.parametrize("T,H,k", [(1, 2880, 4), (37, 2880, 4), (5, 64, 2), (3, 96, 4), (2, 6400, 4), (2, 6400, 3)])
def test_combine_rmsnorm_equals_combine_then_norm(T, H, k, scale_dtype):
    """The fused MoE combine + next norm gives the bits of combine_add followed by rmsnorm, and the
    reference's values."""
    from gptoss.ops.moe import combine_add
    from gptoss.ops.norm import combine_rmsnorm, rmsnorm
    from gptoss.reference import rmsnorm as ref_rmsnorm

    rng = np.random.default_rng(T * 7 + H + k)
    x = random_x(rng, T, H)
    eo = (rng.standard_normal((T * k, H)) * 2).astype(np.float32)
    scale = random_scale(rng, H, scale_dtype)
    x_fused, x_two = cupy.asarray(x), cupy.asarray(x)
    out = cupy.full((T, H), BF16_NAN, dtype=cupy.uint16)
    got = combine_rmsnorm(x_fused, cupy.asarray(eo), k, cupy.asarray(scale), EPS, out=out)
    assert got is out
    combine_add(x_two, cupy.asarray(eo))
    two = rmsnorm(x_two, cupy.asarray(scale), EPS)
    np.testing.assert_array_equal(cupy.asnumpy(x_fused), cupy.asnumpy(x_two))
    np.testing.assert_array_equal(cupy.asnumpy(got), cupy.asnumpy(two))
    x_ref = x + eo.reshape(T, k, H).sum(axis=1)
    assert rel_err(cupy.asnumpy(x_fused), x_ref) <= 1e-6
    assert rel_err(from_bf16_bits(cupy.asnumpy(got)), ref_rmsnorm(x_ref, scale_f32(scale), EPS)) <= 1e-2
