"""The NumPy reference: each function on inputs whose answer is known by hand or by a naive loop,
and the model's prefill against token-by-token decode through the KV cache."""
import math

import numpy as np
import pytest

from gptoss import reference as ref
from gptoss.config import GPT_OSS_20B, TINY, TINY_REAL_HEADS
from gptoss.weights.bf16 import to_bf16_bits
from gptoss.weights.mxfp4 import dequantize, quantize


def rel_err(got, want) -> float:
    return float(np.linalg.norm(np.asarray(got, np.float64) - want) / np.linalg.norm(want))


# ---- rmsnorm --------------------------------------------------------------------------------------

def test_rmsnorm_by_hand():
    out = ref.rmsnorm(np.array([3.0, 4.0], np.float32), np.array([2.0, 0.5], np.float32), eps=0.0)
    rms = math.sqrt((9 + 16) / 2)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [3 / rms * 2, 4 / rms * 0.5], rtol=1e-6)


def test_rmsnorm_formula_on_a_batch_with_eps():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 5, 96)).astype(np.float32) * 0.01  # small, so eps matters
    scale = rng.standard_normal(96).astype(np.float32)
    eps = 1e-3
    x64 = x.astype(np.float64)
    want = x64 / np.sqrt((x64 ** 2).mean(-1, keepdims=True) + eps) * scale
    assert rel_err(ref.rmsnorm(x, scale, eps), want) < 1e-6


# ---- RoPE -----------------------------------------------------------------------------------------

def spec_inv_freq(cfg, i: int) -> float:
    """The spec's YaRN formula for pair i, written out with scalars."""
    d_half = cfg.head_dim // 2
    base_freq = cfg.rope_theta ** (2 * i / cfg.head_dim)
    low = d_half * math.log(cfg.rope_initial_context / (cfg.rope_beta_fast * 2 * math.pi)) / math.log(cfg.rope_theta)
    high = d_half * math.log(cfg.rope_initial_context / (cfg.rope_beta_slow * 2 * math.pi)) / math.log(cfg.rope_theta)
    ramp = min(max((i - low) / (high - low), 0.0), 1.0)
    return (1 / (cfg.rope_scaling_factor * base_freq)) * ramp + (1 / base_freq) * (1 - ramp)


@pytest.mark.parametrize("cfg", [GPT_OSS_20B, TINY])
def test_rope_cos_sin_match_the_spec_yarn_formula(cfg):
    positions = np.array([0, 1, 7, 100, 4095, 70000])
    cos, sin = ref.rope_cos_sin(cfg, positions)
    assert cos.shape == sin.shape == (len(positions), cfg.head_dim // 2) and cos.dtype == np.float32
    concentration = 0.1 * math.log(cfg.rope_scaling_factor) + 1
    for t, p in enumerate(positions):
        for i in sorted({0, 1, 3, cfg.head_dim // 4, cfg.head_dim // 2 - 1}):
            angle = p * spec_inv_freq(cfg, i)
            assert cos[t, i] == pytest.approx(concentration * math.cos(angle), abs=2e-6)
            assert sin[t, i] == pytest.approx(concentration * math.sin(angle), abs=2e-6)


def test_yarn_keeps_high_frequencies_and_interpolates_low_ones():
    cfg = GPT_OSS_20B
    cos, sin = ref.rope_cos_sin(cfg, np.array([1]))
    conc = 0.1 * math.log(32) + 1
    assert math.atan2(sin[0, 0], cos[0, 0]) == pytest.approx(1.0, rel=1e-5)  # pair 0: theta^0 = 1, kept
    last = cfg.head_dim // 2 - 1
    want = 1 / (32 * cfg.rope_theta ** (2 * last / cfg.head_dim))  # the slowest pair: divided by 32
    assert math.atan2(sin[0, last], cos[0, last]) == pytest.approx(want, rel=1e-4)
    assert math.hypot(cos[0, 5], sin[0, 5]) == pytest.approx(conc, rel=1e-6)


def test_apply_rope_rotates_half_split_pairs():
    D = 8
    cos = np.array([[math.cos(0.3), math.cos(1.1), 1.0, 0.0]], np.float32)
    sin = np.array([[math.sin(0.3), math.sin(1.1), 0.0, 1.0]], np.float32)
    x = np.zeros((1, 1, D), np.float32)
    x[0, 0, 1], x[0, 0, 1 + D // 2] = 2.0, 3.0  # pair (1, 5): a = 2, b = 3
    x[0, 0, 3], x[0, 0, 3 + D // 2] = -1.0, 0.5  # pair (3, 7), rotated by 90 degrees
    out = ref.apply_rope(x, cos, sin)[0, 0]
    c, s = math.cos(1.1), math.sin(1.1)
    np.testing.assert_allclose(out[[1, 5]], [2 * c - 3 * s, 3 * c + 2 * s], rtol=1e-6)
    np.testing.assert_allclose(out[[3, 7]], [-0.5, -1.0], atol=1e-7)
    np.testing.assert_array_equal(out[[0, 2, 4, 6]], 0)


def test_rope_preserves_norms_and_depends_on_relative_position():
    cfg = TINY_REAL_HEADS
    rng = np.random.default_rng(1)
    q = rng.standard_normal((1, 3, cfg.head_dim)).astype(np.float32)
    k = rng.standard_normal((1, 3, cfg.head_dim)).astype(np.float32)
    conc = 0.1 * math.log(cfg.rope_scaling_factor) + 1
    dots = []
    for pq, pk in [(10, 4), (206, 200), (6, 0)]:  # the same distance, 6
        cq, sq = ref.rope_cos_sin(cfg, np.array([pq]))
        ck, sk = ref.rope_cos_sin(cfg, np.array([pk]))
        rq, rk = ref.apply_rope(q, cq, sq), ref.apply_rope(k, ck, sk)
        np.testing.assert_allclose(np.linalg.norm(rq, axis=-1), conc * np.linalg.norm(q, axis=-1), rtol=1e-5)
        dots.append(np.sum(rq * rk, axis=-1))
    np.testing.assert_allclose(dots[1], dots[0], rtol=1e-4)
    np.testing.assert_allclose(dots[2], dots[0], rtol=1e-4)


# ---- attention ------------------------------------------------------------------------------------

def naive_attention(q, k, v, sinks, q_pos, k_pos, window):
    """One query head and one key at a time, float64."""
    T, Hq, D = q.shape
    group = Hq // k.shape[1]
    out = np.zeros((T, Hq, D))
    for t in range(T):
        for h in range(Hq):
            keys = [s for s in range(len(k_pos)) if k_pos[s] <= q_pos[t]
                    and (window is None or q_pos[t] - k_pos[s] < window)]
            logits = [float(np.dot(q[t, h], k[s, h // group])) / math.sqrt(D) for s in keys] + [float(sinks[h])]
            m = max(logits)
            e = [math.exp(z - m) for z in logits]
            for j, s in enumerate(keys):
                out[t, h] += e[j] / sum(e) * v[s, h // group]
    return out


def random_qkv(rng, T, S, Hq, Hkv, D):
    q = rng.standard_normal((T, Hq, D)).astype(np.float32)
    k = rng.standard_normal((S, Hkv, D)).astype(np.float32)
    v = rng.standard_normal((S, Hkv, D)).astype(np.float32)
    return q, k, v, rng.standard_normal(Hq).astype(np.float32)


@pytest.mark.parametrize("window", [None, 3, 5])
def test_attention_matches_a_naive_loop(window):
    rng = np.random.default_rng(2)
    q, k, v, sinks = random_qkv(rng, T=4, S=9, Hq=6, Hkv=2, D=8)
    q_pos, k_pos = np.array([5, 6, 7, 8]), np.arange(9)  # a chunk after 5 cached positions
    got = ref.attention(q, k, v, sinks, q_pos, k_pos, window)
    assert got.shape == (4, 6, 8) and got.dtype == np.float32
    assert rel_err(got, naive_attention(q, k, v, sinks, q_pos, k_pos, window)) < 1e-5


def test_gqa_query_head_h_reads_kv_head_h_over_group():
    rng = np.random.default_rng(3)
    q, k, v, sinks = random_qkv(rng, T=3, S=3, Hq=8, Hkv=2, D=4)
    pos = np.arange(3)
    full = ref.attention(q, k, v, sinks, pos, pos, None)
    for h in range(8):  # heads 0-3 read kv head 0, heads 4-7 kv head 1
        kv = h // 4
        alone = ref.attention(q[:, h:h + 1], k[:, kv:kv + 1], v[:, kv:kv + 1], sinks[h:h + 1], pos, pos, None)
        np.testing.assert_allclose(full[:, h], alone[:, 0], rtol=1e-6, atol=1e-7)


def test_huge_sink_takes_all_the_weight():
    rng = np.random.default_rng(4)
    q, k, v, _ = random_qkv(rng, T=3, S=3, Hq=4, Hkv=2, D=8)
    pos = np.arange(3)
    out = ref.attention(q, k, v, np.array([1e4, 0, 1e4, 0], np.float32), pos, pos, None)
    assert np.abs(out[:, [0, 2]]).max() < 1e-30  # the sink's share has no value vector
    assert np.abs(out[:, [1, 3]]).min() > 0


def test_very_negative_sink_is_plain_causal_softmax():
    rng = np.random.default_rng(5)
    q, k, v, _ = random_qkv(rng, T=5, S=5, Hq=2, Hkv=1, D=8)
    pos = np.arange(5)
    out = ref.attention(q, k, v, np.full(2, -1e4, np.float32), pos, pos, None)
    np.testing.assert_allclose(out[0], v[0, [0, 0]], rtol=1e-6)  # the first query sees only key 0
    scores = np.einsum("hd,sd->hs", q[4], k[:, 0]) / math.sqrt(8)
    p = np.exp(scores - scores.max(-1, keepdims=True))
    np.testing.assert_allclose(out[4], (p / p.sum(-1, keepdims=True)) @ v[:, 0], rtol=1e-5)


def test_window_hides_keys_window_or_more_positions_back():
    rng = np.random.default_rng(6)
    q, k, v, sinks = random_qkv(rng, T=1, S=12, Hq=2, Hkv=1, D=8)
    k_pos = np.arange(12)
    got = ref.attention(q, k, v, sinks, [11], k_pos, window=4)
    only_last_4 = ref.attention(q, k[8:], v[8:], sinks, [11], k_pos[8:], None)  # positions 8..11
    np.testing.assert_array_equal(got, only_last_4)
    k_far = k.copy()
    k_far[:8] *= 100  # what the window hides cannot change the result
    np.testing.assert_array_equal(ref.attention(q, k_far, v, sinks, [11], k_pos, 4), got)
    assert rel_err(ref.attention(q, k, v, sinks, [11], k_pos, 5), got) > 1e-3  # window 5 sees position 7


def test_a_query_with_no_visible_key_gives_zero():
    rng = np.random.default_rng(7)
    q, k, v, sinks = random_qkv(rng, T=1, S=2, Hq=2, Hkv=1, D=4)
    out = ref.attention(q, k, v, sinks, [0], [1, 2], None)  # both keys are in its future
    assert np.all(np.isfinite(out)) and not out.any()


# ---- router, swiglu, moe --------------------------------------------------------------------------

def test_router_topk_ties_take_the_lower_index_first():
    experts, weights = ref.router_topk(np.array([[1.0, 3.0, 0.0, 3.0, 3.0], [2.0, -1.0, 2.0, 5.0, 2.0]],
                                                np.float32), 3)
    np.testing.assert_array_equal(experts, [[1, 3, 4], [3, 0, 2]])
    assert experts.dtype == np.int64 and weights.dtype == np.float32
    np.testing.assert_allclose(weights[0], [1 / 3] * 3, rtol=1e-6)
    e3 = math.exp(3)  # softmax over the chosen logits [5, 2, 2] only
    np.testing.assert_allclose(weights[1], [e3 / (e3 + 2), 1 / (e3 + 2), 1 / (e3 + 2)], rtol=1e-6)


def test_router_topk_softmax_over_the_chosen_k_only():
    rng = np.random.default_rng(8)
    logits = rng.standard_normal((6, 32)).astype(np.float32)
    experts, weights = ref.router_topk(logits, 4)
    for t in range(6):
        order = sorted(range(32), key=lambda e: -logits[t, e])[:4]
        assert list(experts[t]) == order
        z = np.exp(logits[t, order] - logits[t, order].max())
        np.testing.assert_allclose(weights[t], z / z.sum(), rtol=1e-6)


def test_swiglu_interleaved_and_clamped():
    limit, alpha = 7.0, 1.702
    h = np.array([[10.0, -10.0, 0.5, 2.0, -30.0, 30.0, -1.0, 0.25]], np.float32)  # gate, linear, gate, ...
    sig = lambda z: 1 / (1 + math.exp(-z))  # noqa: E731
    want = [7 * sig(alpha * 7) * (-7 + 1),  # gate clamped to 7, linear to -7
            0.5 * sig(alpha * 0.5) * (2 + 1),
            -30 * sig(-alpha * 30) * (7 + 1),  # gate has no lower clamp; linear clamped to 7
            -1 * sig(-alpha) * (0.25 + 1)]
    with np.errstate(all="raise"):
        got = ref.swiglu(h, limit, alpha)
    assert got.shape == (1, 4) and got.dtype == np.float32
    np.testing.assert_allclose(got[0], want, rtol=1e-5)  # exp(-51) amplifies float32 rounding of alpha*gate


def test_moe_matches_a_per_token_loop():
    cfg = TINY_REAL_HEADS
    rng = np.random.default_rng(9)
    E, H, I = cfg.num_experts, cfg.hidden_size, cfg.intermediate_size
    layer = ref.MoEWeights(
        router_weight=rng.standard_normal((E, H)).astype(np.float32),
        router_bias=rng.standard_normal(E).astype(np.float32),
        mlp1_weight=rng.standard_normal((E, 2 * I, H)).astype(np.float32) * 0.1,
        mlp1_bias=rng.standard_normal((E, 2 * I)).astype(np.float32),
        mlp2_weight=rng.standard_normal((E, H, I)).astype(np.float32) * 0.1,
        mlp2_bias=rng.standard_normal((E, H)).astype(np.float32))
    t = rng.standard_normal((5, H)).astype(np.float32)
    got = ref.moe(t, layer, cfg)
    for row in range(5):
        g = layer.router_weight @ t[row] + layer.router_bias
        top = np.argsort(-g, kind="stable")[:cfg.experts_per_token]
        w = np.exp(g[top] - g[top].max())
        w /= w.sum()
        want = np.zeros(H)
        for weight, e in zip(w, top):
            h = layer.mlp1_weight[e] @ t[row] + layer.mlp1_bias[e]
            gate, lin = np.minimum(h[0::2], 7.0), np.clip(h[1::2], -7.0, 7.0)
            y = gate / (1 + np.exp(-1.702 * gate)) * (lin + 1)
            want += weight * (layer.mlp2_weight[e] @ y + layer.mlp2_bias[e])
        assert rel_err(got[row], want) < 1e-5


# ---- MXFP4 ----------------------------------------------------------------------------------------

def test_mxfp4_decode_of_known_bytes_low_nibble_is_the_even_element():
    blocks = np.zeros((1, 1, 16), np.uint8)
    blocks[0, 0, :4] = [0x21, 0xF7, 0x98, 0x3C]
    scales = np.array([[128]], np.uint8)  # 2^(128 - 127) = 2
    got = dequantize(blocks, scales)[0]
    assert got.shape == (32,)
    # 0x21: low 1 -> 0.5 (element 0), high 2 -> 1.0 (element 1); 0xF7: 7 -> 6, F -> -6;
    # 0x98: 8 -> -0, 9 -> -0.5; 0x3C: C -> -2, 3 -> 1.5; all times 2
    np.testing.assert_array_equal(got[:8], [1.0, 2.0, 12.0, -12.0, -0.0, -1.0, -4.0, 3.0])
    np.testing.assert_array_equal(got[8:], 0)
    np.testing.assert_array_equal(dequantize(blocks, np.array([[125]], np.uint8))[0, :4], [0.125, 0.25, 1.5, -1.5])


class ExpertsOnly:
    """The corner of the Weights interface that expert_matrix reads."""

    def __init__(self, arrays, experts_format):
        self.arrays, self.experts_format = arrays, experts_format

    def raw(self, name):
        return self.arrays[name]

    def info(self, name):
        class Info:
            dtype = {np.dtype(np.uint16): "bf16", np.dtype(np.float32): "f32"}.get(self.arrays[name].dtype, "u8")
        return Info


def test_expert_matrix_from_each_layout():
    rng = np.random.default_rng(10)
    w1 = rng.standard_normal((3, 6, 64)).astype(np.float32)
    blocks, scales = quantize(w1)
    mx = ExpertsOnly({"block.1.mlp.mlp1_weight.blocks": blocks, "block.1.mlp.mlp1_weight.scales": scales}, "mxfp4")
    np.testing.assert_array_equal(ref.expert_matrix(mx, 1, "mlp1", 2), dequantize(blocks, scales)[2])
    bf = ExpertsOnly({"block.0.mlp.mlp2_weight": to_bf16_bits(w1)}, "bf16")
    np.testing.assert_allclose(ref.expert_matrix(bf, 0, "mlp2", 1), w1[1], rtol=2 ** -8)
    f32 = ExpertsOnly({"block.0.mlp.mlp2_weight": w1}, "bf16")
    np.testing.assert_array_equal(ref.expert_matrix(f32, 0, "mlp2", 0), w1[0])


# ---- the model ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def synthetic():
    return pytest.importorskip("gptoss.weights.synthetic")  # gptoss/weights/synthetic.py: random weights in the real layout


def max_rel(a, b) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("cfg", [TINY, TINY_REAL_HEADS], ids=["tiny", "tiny-real-heads"])
@pytest.mark.parametrize("experts", ["mxfp4", "bf16"])
def test_prefill_equals_token_by_token_decode(synthetic, cfg, experts):
    model = ref.ReferenceModel(synthetic.random_weights(cfg, experts, seed=3))
    prompt = np.random.default_rng(11).integers(0, cfg.vocab_size, cfg.sliding_window * 2 + 5)
    prefill = model.forward(prompt, model.new_cache())
    assert prefill.shape == (len(prompt), cfg.vocab_size) and prefill.dtype == np.float32
    assert np.all(np.isfinite(prefill)) and prefill.std() > 0

    cache = model.new_cache()
    decode = np.concatenate([model.forward([tok], cache) for tok in prompt])
    assert cache.length == len(prompt)
    assert max_rel(decode, prefill) <= 1e-5

    cache = model.new_cache()  # prefill in uneven chunks, each reading the cache of the last
    chunks = np.split(prompt, [3, cfg.sliding_window + 1, cfg.sliding_window + 2])
    chunked = np.concatenate([model.forward(c, cache) for c in chunks])
    assert max_rel(chunked, prefill) <= 1e-5


def test_lazy_experts_equal_the_checkpoint_dequantization(synthetic):
    weights = synthetic.random_weights(TINY, "mxfp4", seed=4)
    model = ref.ReferenceModel(weights, expert_cache_bytes=1)  # keeps one matrix at a time
    for layer in range(TINY.num_layers):
        for which in ("mlp1", "mlp2"):
            full = weights.expert_weights_f32(layer, which)
            for e in range(TINY.num_experts):
                np.testing.assert_array_equal(getattr(model.moe[layer], which + "_weight")[e], full[e])
    assert len(model.expert_cache.entries) == 1


def test_greedy_generate_continues_the_argmax_chain(synthetic):
    model = ref.ReferenceModel(synthetic.random_weights(TINY, "mxfp4", seed=5))
    prompt = [1, 7, 300, 42]
    out = ref.greedy_generate(model, prompt, 6)
    assert len(out) == 6
    logits = model.forward(prompt + out[:-1], model.new_cache())
    assert out == [int(i) for i in logits[len(prompt) - 1:].argmax(-1)]


def test_forward_rejects_bad_tokens_and_context_overflow(synthetic):
    model = ref.ReferenceModel(synthetic.random_weights(TINY, "mxfp4", seed=6))
    with pytest.raises(ValueError, match="token ids"):
        model.forward([TINY.vocab_size], model.new_cache())
    with pytest.raises(ValueError, match="context"):
        model.forward(np.zeros(TINY.max_context + 1, np.int64), model.new_cache())
