"""The FP8 (e4m3) KV cache: rope_and_cache_fp8 and the *_fp8 attention kernels (picked by gptoss/ops/
attention.py from the caches' uint8 dtype) against gptoss.reference on e4m3-rounded K/V.

As tests/gpu/test_attention.py: fresh random inputs, outputs and cache rows poisoned (0xFF bytes are
the e4m3 NaN code), bf16 tolerance 1e-2 against the reference attention run on the e4m3 values the
cache holds; batch invariance checked bit for bit.
"""
import numpy as np
import pytest

from gptoss import reference as R
from gptoss.config import TINY, TINY_REAL_HEADS
from gptoss.weights.bf16 import from_bf16_bits, to_bf16_bits
from tests.gpu.test_attention import (INVARIANCE_LENGTHS, INVARIANCE_N, INVARIANCE_SLOTS,
                                      assert_batch_invariant)

pytestmark = pytest.mark.gpu

POISON8 = 0xFF  # e4m3 NaN
POISON16 = 0xFFFF
GEOMETRIES = {"tiny": TINY, "real": TINY_REAL_HEADS}
CASES = [("tiny", 0, "auto"), ("tiny", 128, "auto"), ("real", 0, "auto"), ("real", 128, "auto"),
         ("real", 0, "simple"), ("real", 128, "simple")]


def rel_err(out, ref):
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


def rand_sinks(rng, Hq):
    kind = np.arange(Hq) % 3
    return np.where(kind == 0, rng.standard_normal(Hq) * 0.5,
                    np.where(kind == 1, 6.0 + rng.standard_normal(Hq), -30.0 + rng.standard_normal(Hq))).astype(np.float32)


class Seqs8:
    """Random bf16 q and e4m3 k, v codes for several sequences, written into uint8 caches [slots, L, Hkv, D]."""

    def __init__(self, cfg, lengths, L, rng, slots=None):
        import cupy as cp

        Hq, Hkv, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.cfg, self.L = cfg, L
        self.q = [to_bf16_bits((rng.standard_normal((n, Hq, D)) * 2).astype(np.float32)) for n in lengths]
        # k and v as e4m3 codes of normal values (magnitudes from subnormal to ~10)
        self.k = [R.e4m3_encode(rng.standard_normal((n, Hkv, D)) * 2) for n in lengths]
        self.v = [R.e4m3_encode(rng.standard_normal((n, Hkv, D))) for n in lengths]
        self.slots = list(range(len(lengths))) if slots is None else list(slots)
        self.kc = cp.full((max(self.slots) + 1, L, Hkv, D), POISON8, dtype=cp.uint8)
        self.vc = cp.full_like(self.kc, POISON8)
        self.sinks = rand_sinks(rng, Hq)

    def write(self, i, a, b):
        import cupy as cp

        idx = cp.asarray(np.arange(a, b) % self.L)
        self.kc[self.slots[i], idx] = cp.asarray(self.k[i][a:b])
        self.vc[self.slots[i], idx] = cp.asarray(self.v[i][a:b])

    def run(self, parts, window, path="auto", max_kv=None, paged=None):
        import cupy as cp

        from gptoss.ops import attention as A

        cfg = self.cfg
        q = np.concatenate([self.q[i][a:a + n] for i, a, n in parts])
        batch = A.AttentionBatch.build([n for _, _, n in parts], [self.slots[i] for i, _, _ in parts],
                                       [a for _, a, _ in parts], 1 << 20, max_kv)
        out = cp.full((len(q), cfg.num_heads * cfg.head_dim), POISON16, dtype=cp.uint16)
        kc, vc, table = paged or (self.kc, self.vc, None)
        A.attention(cp.asarray(q), kc, vc, batch, cp.asarray(self.sinks), window, out=out, path=path,
                    page_table=table)
        host = cp.asnumpy(out).reshape(len(q), cfg.num_heads, cfg.head_dim)
        offs = np.cumsum([0] + [n for _, _, n in parts])
        return [host[offs[j]:offs[j + 1]] for j in range(len(parts))]

    def check(self, parts, outs, window):
        for (i, a, n), out in zip(parts, outs):
            ref = R.attention(from_bf16_bits(self.q[i][a:a + n]), R.e4m3_decode(self.k[i][:a + n]),
                              R.e4m3_decode(self.v[i][:a + n]), self.sinks, np.arange(a, a + n),
                              np.arange(a + n), window or None)
            err = rel_err(from_bf16_bits(out), ref)
            assert err <= 1e-2, f"sequence {i} positions {a}..{a + n - 1}: rel err {err:.3g}"


@pytest.mark.parametrize("geometry", ["tiny", "real"])
def test_rope_and_cache_writes_e4m3(geometry):
    """k: e4m3 of the fp32 RoPE output (the reference's, up to fp32 rounding: a code may differ by one
    step at a near-tie); v: exactly the e4m3 of its bf16 value; nothing else written; bad position: NaN q,
    no write."""
    import cupy as cp

    from gptoss.ops import attention as A

    cfg = GEOMETRIES[geometry]
    rng = np.random.default_rng(2)
    Hq, Hkv, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    n_slots, L, max_pos = 3, 40, 300
    positions = np.array([0, 5, 39, 40, 77, 123, 299, 41, 3, 250], np.int32)
    slots = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2, 0], np.int32)
    T = len(positions)
    x32 = (rng.standard_normal((T, (Hq + 2 * Hkv) * D)) * 3).astype(np.float32)
    v0 = (Hq + Hkv) * D  # token 0's v: subnormal, tie to zero, saturating, zeros (checked exactly below)
    x32[0, v0:v0 + 8] = [1e-4, -3e-3, 500.0, -1e4, 0.0, -0.0, 2.0 ** -10, 460.0]
    qkv = to_bf16_bits(x32)
    table = A.rope_table(cfg, max_pos)
    kc = cp.full((n_slots, L, Hkv, D), POISON8, dtype=cp.uint8)
    vc = cp.full_like(kc, POISON8)
    q = A.rope_and_cache(cp.asarray(qkv), cp.asarray(positions), cp.asarray(slots), table, kc, vc)

    x = from_bf16_bits(qkv).reshape(T, Hq + 2 * Hkv, D)
    cos, sin = R.rope_cos_sin(cfg, positions)
    q_ref = R.apply_rope(x[:, :Hq], cos, sin)
    k_ref = R.apply_rope(x[:, Hq:Hq + Hkv], cos, sin)
    assert rel_err(from_bf16_bits(cp.asnumpy(q)), q_ref) <= 1e-2
    kc_h, vc_h = cp.asnumpy(kc), cp.asnumpy(vc)
    k_got, v_got = kc_h[slots, positions % L], vc_h[slots, positions % L]
    assert np.array_equal(v_got, R.e4m3_encode(x[:, Hq + Hkv:]))  # v: e4m3 of the bf16 value, exactly
    assert list(v_got[0, 0, :8]) == [0x00, 0x82, 0x7E, 0xFE, 0x00, 0x80, 0x00, 0x7E]
    k_want = R.e4m3_encode(k_ref)
    same = k_got == k_want
    assert same.mean() > 0.999, f"{(~same).sum()} of {same.size} k codes differ from the reference's"
    # where they differ, a neighbouring code (the fp32 RoPE value sat at a rounding tie)
    steps = np.abs(k_got.astype(np.int32) - k_want.astype(np.int32))
    assert (steps[~same] == 1).all()
    written = np.zeros((n_slots, L), bool)
    written[slots, positions % L] = True
    assert (kc_h[~written] == POISON8).all() and (vc_h[~written] == POISON8).all(), "stray cache writes"

    bad = A.rope_and_cache(cp.asarray(qkv[:1]), cp.asarray(np.array([max_pos], np.int32)),
                           cp.asarray(np.array([1], np.int32)), table, kc, vc)
    assert np.isnan(from_bf16_bits(cp.asnumpy(bad))).all()
    assert np.array_equal(cp.asnumpy(kc), kc_h)


@pytest.mark.parametrize("geometry,window,path", CASES)
@pytest.mark.parametrize("n", [1, 64, 200, 1000])
def test_prefill_fp8(geometry, window, path, n):
    s = Seqs8(GEOMETRIES[geometry], [n], L=n + 5, rng=np.random.default_rng(n + window))
    s.write(0, 0, n)
    s.check([(0, 0, n)], s.run([(0, 0, n)], window, path), window)


@pytest.mark.parametrize("geometry,window,path", CASES)
@pytest.mark.parametrize("batch,context", [(1, 1), (5, 129), (64, 3000)])
def test_decode_fp8(geometry, window, path, batch, context):
    rng = np.random.default_rng(batch + context + window)
    lengths = [context + s % 3 for s in range(batch)]
    s = Seqs8(GEOMETRIES[geometry], lengths, L=max(lengths), rng=rng, slots=rng.permutation(batch))
    parts = []
    for i, n in enumerate(lengths):
        s.write(i, 0, n)
        parts.append((i, n - 1, 1))
    s.check(parts, s.run(parts, window, path), window)


def test_nan_codes_read_as_nan():
    """A visible key whose value is the e4m3 NaN code makes the rows that see it NaN (fast and portable
    kernels), instead of a finite stand-in (the fast path's bit trick would read 0x7f as 480). (Queries
    48..49 share a prefill tile with key 50, masked but multiplied by 0: NaN too, as with a bf16 NaN.)"""
    cfg = TINY_REAL_HEADS
    for path in ("auto", "simple"):
        s = Seqs8(cfg, [100], L=128, rng=np.random.default_rng(4))
        s.v[0][50, 0, 3] = 0x7F
        s.write(0, 0, 100)
        out = from_bf16_bits(s.run([(0, 0, 100)], 0, path)[0])
        G = cfg.num_heads // cfg.num_kv_heads
        assert np.isnan(out[50:, :G, 3]).all() and np.isfinite(out[:48]).all(), path
        assert np.isfinite(out[:, G:]).all(), path


@pytest.mark.parametrize("geometry", ["tiny", "real"])
@pytest.mark.parametrize("window", [0, 128])
def test_batch_invariance_fp8(geometry, window):
    """test_attention.py's assert_batch_invariant on an fp8 cache (a query's bits do not depend on
    chunking, neighbours, decode batch or key bound, or decode vs prefill kernel); paged = contiguous."""
    rng = np.random.default_rng(5)
    lengths, N = INVARIANCE_LENGTHS, INVARIANCE_N
    s = Seqs8(GEOMETRIES[geometry], lengths, L=1024, rng=rng, slots=INVARIANCE_SLOTS)
    for i, n in enumerate(lengths):
        s.write(i, 0, n)
    assert_batch_invariant(s, window)

    # the same caches as scrambled 64-position pages behind a page table: the same bits
    import cupy as cp

    n_slots, L, Hkv, D = s.kc.shape
    W = L // 64
    table = rng.permutation(n_slots * W + 3)[:n_slots * W].astype(np.int32)
    pages = []
    for cache in (s.kc, s.vc):
        paged = cp.full((n_slots * W + 3, 64, Hkv, D), POISON8, dtype=cp.uint8)
        paged[cp.asarray(table)] = cache.reshape(n_slots * W, 64, Hkv, D)
        pages.append(paged)
    paged = (pages[0], pages[1], cp.asarray(table.reshape(n_slots, W)))
    for parts in ([(0, 0, N)], [(i, n - 1, 1) for i, n in enumerate(lengths)]):
        want = s.run(parts, window)
        got = s.run(parts, window, paged=paged)
        assert all(np.array_equal(a, b) for a, b in zip(got, want)), parts


def test_fp8_model_step_matches_the_fp8_reference():
    """A GPUModel with an fp8 cache (tiny-real-heads, prompt past the sliding window, then decode steps)
    picks the greedy tokens of ReferenceModel(kv_fp8=True) on most steps, and its logits are close to it."""
    from gptoss.llm import LLM
    from gptoss.sampling import SamplingParams
    from gptoss.weights import random_weights

    w = random_weights(TINY_REAL_HEADS, "mxfp4", seed=0)
    llm = LLM(w, device="gpu", progress=False, max_seqs=4, kv_cache_dtype="fp8")
    assert "fp8" in llm.device
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, TINY_REAL_HEADS.vocab_size, 100).tolist()
    got = llm.generate([prompt], SamplingParams(max_tokens=1), detokenize=False)[0].token_ids
    assert llm.runner.model.cache.k[0].dtype == np.uint8
    ref = R.ReferenceModel(w, kv_fp8=True)
    logits = ref.forward(prompt, ref.new_cache())[-1]
    top2 = np.sort(logits)[-2:]
    # the GPU's bf16 activations may flip a near tie; otherwise it is the reference's argmax
    assert got[0] == int(np.argmax(logits)) or top2[1] - top2[0] < 0.05
