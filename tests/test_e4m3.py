"""The NumPy e4m3 (OCP FP8, bias 7, max 448, no infinities) rounding the FP8 KV cache is checked
against (gptoss.reference.e4m3_*): exact values, not tolerances."""
import numpy as np
import pytest

from gptoss import reference as R
from gptoss.weights.synthetic import random_weights
from gptoss.config import TINY


def test_every_code_decodes_to_its_value():
    values = R.e4m3_values()
    assert values.dtype == np.float32 and values.shape == (256,)
    # hand-written anchors: zero, the smallest subnormal, the largest subnormal, the smallest normal,
    # one, the largest finite, NaN, and their negatives
    anchors = {0x00: 0.0, 0x01: 2.0 ** -9, 0x07: 7 * 2.0 ** -9, 0x08: 2.0 ** -6, 0x38: 1.0, 0x39: 1.125,
               0x3F: 1.875, 0x40: 2.0, 0x77: 240.0, 0x78: 256.0, 0x7E: 448.0, 0x80: -0.0, 0x81: -(2.0 ** -9),
               0xB8: -1.0, 0xFE: -448.0}
    for code, want in anchors.items():
        assert values[code] == want and np.signbit(values[code]) == np.signbit(want), hex(code)
    assert np.isnan(values[0x7F]) and np.isnan(values[0xFF])
    assert np.isnan(values).sum() == 2
    # every code from the bit fields, written out independently of e4m3_values' vectorised form
    for code in range(256):
        if code & 0x7F == 0x7F:
            continue
        s, e, m = code >> 7, (code >> 3) & 15, code & 7
        mag = (m / 8) * 2.0 ** -6 if e == 0 else (1 + m / 8) * 2.0 ** (e - 7)
        assert values[code] == (-mag if s else mag), hex(code)
    # magnitudes increase with the code: the positive codes 0..126 are the sorted finite values
    assert (np.diff(values[:0x7F]) > 0).all()


def test_representable_values_round_trip_exactly():
    codes = np.array([c for c in range(256) if c & 0x7F != 0x7F], np.uint8)
    values = R.e4m3_decode(codes)
    assert np.array_equal(R.e4m3_encode(values), codes)  # -0.0 too (0x80)
    assert np.array_equal(R.e4m3_round(values), values)


def test_ties_go_to_the_even_mantissa():
    values = R.e4m3_values()
    for lo in list(range(0, 0x7E)):  # every pair of neighbours, subnormals included
        mid = (np.float64(values[lo]) + np.float64(values[lo + 1])) / 2
        even = lo if lo % 2 == 0 else lo + 1
        assert R.e4m3_encode(np.float32(mid)) == even, f"tie between codes {lo:#x} and {lo + 1:#x}"
        assert R.e4m3_encode(np.float32(-mid)) == even | 0x80
        # just off the tie: the nearer neighbour
        up, down = np.nextafter(np.float32(mid), np.float32(np.inf)), np.nextafter(np.float32(mid), np.float32(0))
        assert R.e4m3_encode(up) == lo + 1 and R.e4m3_encode(down) == lo
    # examples: 1.0625 lies halfway between 1.0 (0x38, even) and 1.125 (0x39); 1.1875 between 0x39 and 0x3a
    assert R.e4m3_encode(np.float32(1.0625)) == 0x38 and R.e4m3_encode(np.float32(1.1875)) == 0x3A
    # below half the smallest subnormal: zero; half of it is a tie that goes to zero (even)
    assert R.e4m3_encode(np.float32(2.0 ** -11)) == 0x00 and R.e4m3_encode(np.float32(2.0 ** -10)) == 0x00
    assert R.e4m3_encode(np.float32(1.5 * 2.0 ** -10 * 2)) == 0x02  # 1.5 x 2^-9: tie between 1 and 2 -> 2


def test_saturation_and_nan():
    big = np.array([448.0, 449.0, 463.9, 464.0, 480.0, 1e4, 3.0e38, np.inf], np.float32)
    assert (R.e4m3_encode(big) == 0x7E).all()
    assert (R.e4m3_encode(-big) == 0xFE).all()
    assert R.e4m3_encode(np.float32(np.nan)) == 0x7F
    assert R.e4m3_encode(-np.float32(np.nan)) == 0xFF
    assert np.isnan(R.e4m3_round(np.float32(np.nan)))


def test_rounding_error_is_within_half_a_step():
    """Random values over the whole range: the error is at most half the spacing at the value (relative
    2^-4 for normals, absolute 2^-10 for subnormals), and the result is one of the two neighbours."""
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(100_000) * np.exp2(rng.uniform(-12, 9, 100_000))).astype(np.float32)
    x = x[np.abs(x) < R.E4M3_MAX]
    r = R.e4m3_round(x).astype(np.float64)
    bound = np.maximum(np.abs(x) * 2.0 ** -4, 2.0 ** -10)
    assert (np.abs(r - x) <= bound).all()


@pytest.mark.parametrize("kv_fp8", [False, True])
def test_reference_model_fp8_cache_holds_e4m3_values(kv_fp8):
    """ReferenceModel(kv_fp8=True) keeps only e4m3 values in its cache (and its logits differ from the
    float32 cache's); without it the cache holds values e4m3 cannot represent."""
    weights = random_weights(TINY, "mxfp4", seed=1)
    model = R.ReferenceModel(weights, kv_fp8=kv_fp8)
    cache = model.new_cache()
    logits = model.forward([1, 2, 3, 4, 5, 6, 7, 8, 9, 10], cache)
    for k, v in zip(cache.k, cache.v):
        assert np.array_equal(R.e4m3_round(k), k) == kv_fp8
        assert np.array_equal(R.e4m3_round(v), v) == kv_fp8
    plain = R.ReferenceModel(weights).forward([1, 2, 3, 4, 5, 6, 7, 8, 9, 10], R.ReferenceModel(weights).new_cache())
    diff = np.abs(logits - plain).max()
    assert (diff > 0) == kv_fp8 and np.isfinite(logits).all()
