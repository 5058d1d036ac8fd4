"""The CPU sampler (gptoss/sampling.py) against docs/DESIGN.md "Sampling" and kernels/common.h."""
import math
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from gptoss import sampling
from gptoss.sampling import SamplingParams, sample, sample_uniform

ROOT = Path(__file__).resolve().parent.parent

# (seed, sequence, step) -> u * 2^24, computed with a gcc build of common.h's sample_uniform.
KNOWN_UNIFORMS = {
    (0, 0, 0): 0,
    (0, 0, 1): 10178956,
    (0, 1, 0): 10203921,
    (1, 0, 0): 1178882,
    (42, 7, 3): 10632112,
    (2**32 - 1, 2**32 - 1, 2**32 - 1): 15042055,
    (123456789, 1000, 65535): 2137620,
}


@pytest.mark.parametrize("args, scaled", KNOWN_UNIFORMS.items())
def test_sample_uniform_known_values(args, scaled):
    assert sample_uniform(*args) == scaled / 2**24


def test_sample_uniform_is_a_float32_in_unit_interval():
    rng = np.random.default_rng(0)
    for seed, seq, step in rng.integers(0, 2**32, size=(500, 3)):
        u = sample_uniform(int(seed), int(seq), int(step))
        assert 0.0 <= u < 1.0
        assert u * 2**24 == int(u * 2**24)
        assert float(np.float32(u)) == u


def test_sample_uniform_bit_exact_with_common_h(tmp_path):
    """Compile the C function from gptoss/kernels/common.h for the host and compare many draws."""
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        pytest.skip("no C compiler to build common.h's sample_uniform for the host")
    header = (ROOT / "gptoss" / "kernels" / "common.h").read_text()
    function = re.search(r"DEVICE float sample_uniform\(.*?\n}\n", header, re.S).group(0)
    source = tmp_path / "uniform.c"
    source.write_text("#include <stdio.h>\n#define DEVICE static inline\ntypedef unsigned int u32;\n"
                      + function + "int main(void) { unsigned s, q, t;\n"
                      "  while (scanf(\"%u %u %u\", &s, &q, &t) == 3) printf(\"%a\\n\", sample_uniform(s, q, t));\n"
                      "  return 0; }\n")
    binary = tmp_path / "uniform"
    subprocess.run([cc, "-O2", "-o", str(binary), str(source)], check=True)
    rng = np.random.default_rng(1)
    triples = [(int(a), int(b), int(c)) for a, b, c in rng.integers(0, 2**32, size=(2000, 3))]
    triples += [(s, q, t) for s in (0, 1, 2**31, 2**32 - 1) for q in (0, 5, 2**32 - 1) for t in (0, 1, 4095)]
    stdin = "".join(f"{s} {q} {t}\n" for s, q, t in triples)
    out = subprocess.run([str(binary)], input=stdin, capture_output=True, text=True, check=True).stdout
    c_values = [float.fromhex(line) for line in out.split()]
    assert c_values == [sample_uniform(*t) for t in triples]


def test_params_validation():
    assert SamplingParams() == SamplingParams(temperature=0.0, top_p=1.0, seed=0)
    SamplingParams(temperature=1.5, top_p=0.01, seed=2**32 - 1)
    for bad in (dict(temperature=-0.1), dict(temperature=math.nan), dict(temperature=math.inf),
                dict(top_p=0.0), dict(top_p=1.01), dict(top_p=-0.5), dict(top_p=math.nan),
                dict(seed=-1), dict(seed=2**32), dict(seed=1.5), dict(max_tokens=0), dict(max_tokens=2.5),
                dict(stop_token_ids=[-1]), dict(stop_token_ids=["x"])):
        with pytest.raises(ValueError):
            SamplingParams(**bad)


def test_params_stop_ids():
    """A request stops at its stop_token_ids and at the engine's end-of-sequence ids unless ignore_eos."""
    p = SamplingParams(max_tokens=3, stop_token_ids=[7, np.int64(9)])
    assert p.stop_token_ids == (7, 9) and p == SamplingParams(max_tokens=3, stop_token_ids=(7, 9))
    assert p.stop_ids((1, 2)) == {1, 2, 7, 9}
    assert SamplingParams(stop_token_ids=[7], ignore_eos=True).stop_ids((1, 2)) == {7}
    assert SamplingParams().max_tokens == 256 and SamplingParams().stop_ids() == frozenset()


def test_greedy_takes_the_lowest_id_among_ties():
    logits = np.zeros(11, dtype=np.float32)
    logits[[3, 7]] = 2.5
    assert sample(logits, SamplingParams(), 0, 0) == 3
    batch = np.stack([logits, logits[::-1].copy()])
    assert sample(batch, SamplingParams(), [0, 1], 0).tolist() == [3, 3]


def test_small_temperature_agrees_with_greedy():
    rng = np.random.default_rng(2)
    params = SamplingParams(temperature=1e-4, top_p=1.0, seed=9)
    for step in range(200):
        logits = rng.standard_normal(300).astype(np.float32) * 3
        assert sample(logits, params, sequence=step % 7, step=step) == int(np.argmax(logits))


def test_tiny_top_p_keeps_only_the_max():
    rng = np.random.default_rng(3)
    params = SamplingParams(temperature=1.0, top_p=1e-6, seed=5)
    logits = rng.standard_normal(1000).astype(np.float32) * 0.1  # flat: without the cut any id is likely
    assert {sample(logits, params, s, t) for s in range(20) for t in range(20)} == {int(np.argmax(logits))}


def draw_counts(logits, params, n_sequences, n_steps):
    counts = np.zeros(len(logits), dtype=np.int64)
    for s in range(n_sequences):
        for t in range(n_steps):
            counts[sample(logits, params, s, t)] += 1
    return counts


def chi_square(counts, probs):
    expected = counts.sum() * np.asarray(probs, dtype=np.float64)
    return float(((counts - expected) ** 2 / expected).sum())


def test_frequencies_match_the_softmax():
    logits = np.array([1.0, -0.5, 0.3, 2.0, 0.0, -1.2], dtype=np.float32)
    params = SamplingParams(temperature=0.8, seed=11)
    x = logits.astype(np.float64) / 0.8
    probs = np.exp(x - x.max()) / np.exp(x - x.max()).sum()
    counts = draw_counts(logits, params, 100, 100)
    # 5 degrees of freedom: chi-square > 45 has probability ~1e-8 for a correct sampler.
    assert chi_square(counts, probs) < 45.0, (counts, probs)


def test_top_p_samples_within_the_nucleus_renormalized():
    probs = np.array([0.1, 0.4, 0.2, 0.3])
    logits = np.log(probs).astype(np.float32)
    params = SamplingParams(temperature=1.0, top_p=0.65, seed=4)  # 0.4 < 0.65 <= 0.4 + 0.3
    counts = draw_counts(logits, params, 60, 100)
    assert counts[0] == counts[2] == 0
    assert chi_square(counts[[1, 3]], [4 / 7, 3 / 7]) < 30.0, counts


def test_top_p_keeps_ties_with_the_cutoff_value():
    logits = np.log(np.array([0.3, 0.1, 0.3, 0.3])).astype(np.float32)
    params = SamplingParams(temperature=1.0, top_p=0.5, seed=1)  # reached at the 2nd 0.3; the 3rd stays in
    assert sampling.top_p_mask(sampling.softmax_f32(logits, 1.0), 0.5).tolist() == [True, False, True, True]
    counts = draw_counts(logits, params, 30, 30)
    assert counts[1] == 0 and (counts[[0, 2, 3]] > 0).all()


def test_rounding_fallback_takes_the_last_kept_id(monkeypatch):
    monkeypatch.setattr(sampling, "sample_uniform", lambda seed, sequence, step: 1.0)  # target = total
    logits = np.log(np.array([0.35, 0.05, 0.3, 0.3])).astype(np.float32)
    assert sample(logits, SamplingParams(temperature=1.0, top_p=0.6), 0, 0) == 3
    assert sample(logits, SamplingParams(temperature=1.0), 0, 0) == 3


def test_draws_depend_only_on_seed_sequence_step_and_the_row():
    rng = np.random.default_rng(5)
    batch = rng.standard_normal((8, 500)).astype(np.float32)
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=77)
    sequences, steps = np.arange(100, 108), np.array([0, 3, 3, 9, 1, 0, 2, 5])
    together = sample(batch, params, sequences, steps)
    alone = [sample(batch[b], params, int(sequences[b]), int(steps[b])) for b in range(8)]
    assert together.tolist() == alone
    order = rng.permutation(8)
    assert sample(batch[order], params, sequences[order], steps[order]).tolist() == together[order].tolist()
    assert sample(batch, params, sequences, steps).tolist() == together.tolist()
    other_seed = SamplingParams(temperature=1.0, top_p=0.9, seed=78)
    draws = [sample(batch[0], p, 0, t) for p in (params, other_seed) for t in range(50)]
    assert draws[:50] != draws[50:]


def test_shape_errors():
    with pytest.raises(ValueError, match="logits"):
        sample(np.zeros((2, 2, 2), np.float32), SamplingParams(), 0, 0)
    with pytest.raises(ValueError, match="one entry per row"):
        sample(np.zeros((3, 5), np.float32), SamplingParams(temperature=1.0), [0, 1], 0)
