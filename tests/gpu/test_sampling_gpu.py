"""GPU sampling (gptoss/ops/sampling.py) against the CPU sampler gptoss/sampling.py and on its own.

The two implement one algorithm (docs/DESIGN.md "Sampling") with the same random draw per (seed,
sequence, step), but sum probabilities differently (the GPU in exact 64-bit fixed point), so a draw
may differ where the uniform lands within rounding of a boundary between two ids: a rare event on
rows whose probabilities are not all tiny. Greedy must agree exactly.
"""
import numpy as np
import pytest

from gptoss.sampling import SamplingParams, sample_row, sample_uniform

cupy = pytest.importorskip("cupy")
pytestmark = pytest.mark.gpu

VOCABS = [512, 1000, 201088]


def random_logits(rng, B, V):
    """Rows like a language model's: Gaussian logits with a per-row spread, a few standing out."""
    spread = rng.uniform(1.0, 4.0, (B, 1))
    logits = rng.standard_normal((B, V)) * spread
    top = rng.integers(0, V, (B, 4))
    np.put_along_axis(logits, top, np.take_along_axis(logits, top, 1) + rng.uniform(0, 6, (B, 4)), 1)
    return logits.astype(np.float32)


def dev(a, dtype):
    return cupy.asarray(np.ascontiguousarray(a, dtype=dtype))


def gpu_sample(logits, temps, top_ps, seed, seqs, steps):
    from gptoss.ops.sampling import sample

    B = logits.shape[0]
    out = cupy.full(B, -7, dtype=cupy.int32)  # poison
    got = sample(dev(logits, np.float32), dev(temps, np.float32), dev(top_ps, np.float32),
                 seed, dev(seqs, np.int32), dev(steps, np.int32), out=out)
    assert got is out
    return cupy.asnumpy(got)


@pytest.mark.parametrize("V", VOCABS)
def test_argmax_exact_with_ties_to_lowest_id(V):
    from gptoss.ops.sampling import argmax

    rng = np.random.default_rng(V)
    B = 67
    logits = random_logits(rng, B, V)
    for b in range(0, B, 3):  # plant a tie for the maximum at two ids
        i, j = sorted(rng.choice(V, 2, replace=False))
        logits[b, i] = logits[b, j] = logits[b].max() + 1.0
    logits[1, :] = 3.0  # a constant row: id 0
    logits[2, -1] = logits[2].max() + 1.0  # the last id
    out = cupy.full(B, -7, dtype=cupy.int32)
    got = argmax(cupy.asarray(logits), out=out)
    assert got is out
    np.testing.assert_array_equal(cupy.asnumpy(got), np.argmax(logits, axis=1))


def test_argmax_unaligned_rows():
    # V % 4 != 0: rows are not 16-byte aligned and take the scalar path
    from gptoss.ops.sampling import argmax

    rng = np.random.default_rng(3)
    logits = random_logits(rng, 9, 1001)
    np.testing.assert_array_equal(cupy.asnumpy(argmax(cupy.asarray(logits))), np.argmax(logits, axis=1))


@pytest.mark.parametrize("V", VOCABS)
def test_greedy_rows_of_a_mixed_batch_are_exact(V):
    rng = np.random.default_rng(V + 1)
    B = 40
    logits = random_logits(rng, B, V)
    logits[0, 7] = logits[0, 3] = logits[0].max() + 2.0  # tie: id 3
    temps = np.where(np.arange(B) % 2 == 0, 0.0, 0.8)
    top_ps = rng.choice([0.5, 0.9, 1.0], B)
    got = gpu_sample(logits, temps, top_ps, 123, np.arange(B), np.full(B, 5))
    greedy = temps == 0
    np.testing.assert_array_equal(got[greedy], np.argmax(logits[greedy], axis=1))
    assert got[0] == 3
    assert np.all((got >= 0) & (got < V))


@pytest.mark.parametrize("V", VOCABS)
def test_sample_matches_cpu_sampler(V):
    rng = np.random.default_rng(V + 2)
    per_combo = 24 if V > 100_000 else 80
    combos = [(t, p) for t in (0.7, 1.0) for p in (0.5, 0.9, 1.0)]
    B = per_combo * len(combos)
    logits = random_logits(rng, B, V)
    temps = np.repeat([t for t, _ in combos], per_combo)
    top_ps = np.repeat([p for _, p in combos], per_combo)
    seqs = rng.integers(0, 100_000, B)
    steps = rng.integers(0, 5_000, B)
    seed = 0xC0FFEE
    got = gpu_sample(logits, temps, top_ps, seed, seqs, steps)
    want = np.array([sample_row(logits[b], SamplingParams(float(temps[b]), float(top_ps[b]), seed),
                                int(seqs[b]), int(steps[b])) for b in range(B)])
    equal = got == want
    assert equal.mean() >= 0.99, f"{(~equal).sum()} of {B} draws differ: rows {np.flatnonzero(~equal)[:10]}"
    # the draws really differ from row to row (not one id everywhere)
    assert len(np.unique(got)) > B // 4


def test_per_row_seeds_equal_a_shared_scalar_seed():
    rng = np.random.default_rng(8)
    B, V = 64, 1000
    logits = random_logits(rng, B, V)
    temps, top_ps = np.full(B, 1.0), np.full(B, 0.9)
    seqs, steps = np.arange(B), np.full(B, 2)
    scalar = gpu_sample(logits, temps, top_ps, 99, seqs, steps)
    as_u32 = gpu_sample(logits, temps, top_ps, dev(np.full(B, 99), np.uint32), seqs, steps)
    as_i32 = gpu_sample(logits, temps, top_ps, dev(np.full(B, 99), np.int32), seqs, steps)
    np.testing.assert_array_equal(scalar, as_u32)
    np.testing.assert_array_equal(scalar, as_i32)
    other = gpu_sample(logits, temps, top_ps, dev(np.arange(B) + 1000, np.uint32), seqs, steps)
    assert (other != scalar).mean() > 0.5


@pytest.mark.parametrize("V", [1000, 201088])
def test_a_row_draws_the_same_alone_or_in_any_batch(V):
    rng = np.random.default_rng(V + 3)
    B = 48
    logits = random_logits(rng, B, V)
    temps = rng.choice([0.0, 0.7, 1.0], B)
    top_ps = rng.choice([0.5, 0.9, 1.0], B)
    seqs, steps = rng.integers(0, 1000, B), rng.integers(0, 1000, B)
    batch = gpu_sample(logits, temps, top_ps, 7, seqs, steps)
    np.testing.assert_array_equal(gpu_sample(logits, temps, top_ps, 7, seqs, steps), batch)  # repeatable
    perm = rng.permutation(B)
    np.testing.assert_array_equal(gpu_sample(logits[perm], temps[perm], top_ps[perm], 7, seqs[perm], steps[perm]),
                                  batch[perm])
    for b in (0, B // 2, B - 1):
        alone = gpu_sample(logits[b:b + 1], temps[b:b + 1], top_ps[b:b + 1], 7, seqs[b:b + 1], steps[b:b + 1])
        assert alone[0] == batch[b]


def test_draws_follow_the_nucleus_distribution():
    """Many draws of one row (steps 0..N-1): frequencies match the top-p renormalised softmax, and
    no id outside the nucleus is ever drawn."""
    rng = np.random.default_rng(21)
    V, N, T, top_p = 64, 16384, 0.8, 0.9
    row = (rng.standard_normal(V) * 1.5).astype(np.float32)
    z = row.astype(np.float64) / T
    p = np.exp(z - z.max())
    p /= p.sum()
    order = np.argsort(-p)
    cut = np.searchsorted(np.cumsum(p[order]), top_p) + 1  # the shortest prefix reaching top_p
    q = np.zeros(V)
    q[order[:cut]] = p[order[:cut]]
    q /= q.sum()
    logits = np.broadcast_to(row, (N, V))
    got = gpu_sample(logits, np.full(N, T), np.full(N, top_p), 5, np.full(N, 3), np.arange(N))
    counts = np.bincount(got, minlength=V)
    assert counts[q == 0].sum() == 0
    kept = q > 0
    # each kept id's count within 5 standard deviations of its binomial expectation
    expected, sd = N * q[kept], np.sqrt(N * q[kept] * (1 - q[kept]))
    assert np.all(np.abs(counts[kept] - expected) <= 5 * sd + 1)


def test_uniform_draws_match_the_cpu_rng():
    # temperature 1 over two equal logits picks id 0 exactly when u < 1/2: the GPU's u is the CPU's
    B = 512
    steps = np.arange(B)
    got = gpu_sample(np.zeros((B, 2), np.float32) + 0.25, np.ones(B), np.ones(B), 42, np.full(B, 9), steps)
    want = np.array([0 if sample_uniform(42, 9, int(s)) < 0.5 else 1 for s in steps])
    np.testing.assert_array_equal(got, want)


def test_sample_checks_arguments():
    from gptoss.ops.sampling import sample

    B, V = 4, 100
    logits = cupy.ones((B, V), dtype=cupy.float32)
    f = cupy.ones(B, dtype=cupy.float32)
    i = cupy.zeros(B, dtype=cupy.int32)
    with pytest.raises(TypeError):
        sample(logits.astype(cupy.float16), f, f, 0, i, i)
    with pytest.raises(ValueError):
        sample(logits, cupy.ones(B + 1, dtype=cupy.float32), f, 0, i, i)
    with pytest.raises(TypeError):
        sample(logits, f, f, 0, i.astype(cupy.int64), i)
    with pytest.raises(ValueError):
        sample(logits, f, f, cupy.zeros(B + 1, dtype=cupy.uint32), i, i)
