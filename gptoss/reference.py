"""The float32 NumPy forward pass of gpt-oss: the oracle every GPU kernel is tested against.

Plain and readable on purpose; each step cites its formula. The public implementations it follows:
OpenAI's gpt_oss/torch/model.py and Hugging Face transformers' models/gpt_oss/modeling_gpt_oss.py.
Pure functions first, then ReferenceModel, which runs them layer by layer over a growing KV cache.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from .config import ModelConfig, yarn_inv_freq_and_scale
from .weights.bf16 import from_bf16_bits
from .weights.mxfp4 import dequantize


# ---- pure functions ---------------------------------------------------------------------------------

def rmsnorm(x: np.ndarray, scale: np.ndarray, eps: float) -> np.ndarray:
    """x [..., H] -> x / sqrt(mean(x^2) + eps) * scale, in float32."""
    x = np.asarray(x, dtype=np.float32)
    mean_square = np.mean(np.square(x), axis=-1, keepdims=True)  # mean(x^2) over H
    return (x / np.sqrt(mean_square + np.float32(eps)) * np.asarray(scale, dtype=np.float32)).astype(np.float32)


def rope_cos_sin(cfg: ModelConfig, positions) -> tuple[np.ndarray, np.ndarray]:
    """positions [T] -> (cos, sin) each [T, D/2] float32, YaRN frequencies, concentration applied."""
    inv_freq, concentration = yarn_inv_freq_and_scale(cfg)  # inv_freq_i, 0.1 ln(factor) + 1
    angles = np.asarray(positions, dtype=np.float64)[:, None] * inv_freq[None, :]  # angle = p * inv_freq_i
    cos = (np.cos(angles) * concentration).astype(np.float32)
    sin = (np.sin(angles) * concentration).astype(np.float32)
    return cos, sin


def apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """x [T, heads, D] rotated in half-split pairs (i, i + D/2): a' = a cos - b sin, b' = b cos + a sin."""
    half = x.shape[-1] // 2
    a, b = x[..., :half], x[..., half:]
    c, s = cos[:, None, :], sin[:, None, :]  # broadcast over heads
    return np.concatenate([a * c - b * s, b * c + a * s], axis=-1).astype(np.float32)


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, sinks: np.ndarray, q_pos, k_pos,
              window: int | None) -> np.ndarray:
    """Causal GQA attention with one learned sink logit per query head.

    q [T, Hq, D], k and v [S, Hkv, D], sinks [Hq] -> [T, Hq, D]. Key s is visible to query t iff
    k_pos[s] <= q_pos[t] and (window is None or q_pos[t] - k_pos[s] < window). Query head h reads kv
    head h // (Hq / Hkv). The softmax runs over the visible scores plus the sink, whose probability is
    then dropped (it has no value), so a row's weights sum to less than 1.
    """
    T, Hq, D = q.shape
    S, Hkv, _ = k.shape
    group = Hq // Hkv
    q_pos = np.asarray(q_pos, dtype=np.int64)
    k_pos = np.asarray(k_pos, dtype=np.int64)

    qg = q.reshape(T, Hkv, group, D)  # head h = kv * group + g, so kv = h // group
    scores = np.einsum("tkgd,skd->kgts", qg, k).astype(np.float32) / np.float32(np.sqrt(D))  # q.k / sqrt(D)

    distance = q_pos[:, None] - k_pos[None, :]  # [T, S]
    visible = distance >= 0  # causal: keys at or before the query
    if window is not None:
        visible &= distance < window  # sliding: the last `window` positions, the query's own included
    scores = np.where(visible[None, None], scores, np.float32(-np.inf))

    sink = np.asarray(sinks, dtype=np.float32).reshape(Hkv, group, 1, 1)  # one extra logit per head
    m = np.maximum(scores.max(axis=-1, keepdims=True), sink)  # softmax max over scores and the sink
    p = np.exp(scores - m)
    denominator = p.sum(axis=-1, keepdims=True) + np.exp(sink - m)  # the sink takes its share ...
    out = np.einsum("kgts,skd->tkgd", p / denominator, v)  # ... and contributes no value
    return out.reshape(T, Hq, D).astype(np.float32)


# ---- FP8 (OCP e4m3) rounding of the KV cache ---------------------------------------------------------
# A code is s eeee mmm: bias 7, value (-1)^s 2^(e - 7) (1 + m/8) for e > 0 and (-1)^s 2^-6 m/8 for e = 0;
# s 1111 111 (0x7f, 0xff) is NaN and there is no infinity, so the largest finite magnitude is 0x7e = 448.

E4M3_MAX = 448.0
E4M3_NAN = 0x7F  # the NaN code (with the sign bit: 0xff)


def e4m3_values() -> np.ndarray:
    """float32 [256]: the value of every e4m3 code, NaN at 0x7f and 0xff (from the formula above)."""
    codes = np.arange(256)
    e, m = (codes >> 3) & 15, codes & 7
    magnitude = np.where(e == 0, m / 8 * 2.0 ** -6, (1 + m / 8) * 2.0 ** (e - 7))
    magnitude = np.where((codes & 0x7F) == E4M3_NAN, np.nan, magnitude)
    return np.where(codes & 0x80, -magnitude, magnitude).astype(np.float32)


def e4m3_encode(x) -> np.ndarray:
    """x (float32) -> e4m3 codes (uint8): the nearest value, ties to the even mantissa (round to nearest
    even); a magnitude beyond 448 (infinity included) saturates to 448; NaN becomes the NaN code. The
    sign is kept (-0.0 -> 0x80)."""
    x = np.asarray(x, dtype=np.float32)
    magnitude = np.abs(x).astype(np.float64)
    table = e4m3_values()[:E4M3_NAN].astype(np.float64)  # codes 0..126: 0 .. 448, increasing
    hi = np.clip(np.searchsorted(table, magnitude), 0, E4M3_NAN - 1)  # first value >= the magnitude
    lo = np.maximum(hi - 1, 0)
    below, above = magnitude - table[lo], table[hi] - magnitude
    code = np.where(below < above, lo, np.where(above < below, hi, np.where(lo % 2 == 0, lo, hi)))
    code = np.where(magnitude >= E4M3_MAX, E4M3_NAN - 1, code)  # saturate (infinity too)
    code = np.where(np.isnan(x), E4M3_NAN, code)
    return (code | np.where(np.signbit(x), 0x80, 0)).astype(np.uint8)


def e4m3_decode(codes) -> np.ndarray:
    """e4m3 codes (uint8) -> float32 values."""
    return e4m3_values()[np.asarray(codes, dtype=np.uint8)]


def e4m3_round(x) -> np.ndarray:
    """x rounded to e4m3 and back (float32): what an FP8 KV cache keeps of x."""
    return e4m3_decode(e4m3_encode(x))


def router_topk(logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """logits [T, E] -> (experts [T, k] int64, weights [T, k] float32), largest logit first.

    Ties go to the lower expert index first; the weights are a softmax over the k chosen logits only.
    """
    logits = np.asarray(logits, dtype=np.float32)
    experts = np.argsort(-logits, axis=-1, kind="stable")[:, :k].astype(np.int64)  # stable: ties by index
    chosen = np.take_along_axis(logits, experts, axis=-1)
    e = np.exp(chosen - chosen.max(axis=-1, keepdims=True))  # softmax over the k chosen
    return experts, (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)


def sigmoid(x: np.ndarray) -> np.ndarray:
    """1 / (1 + exp(-x)), written so that no exp overflows."""
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1 / (1 + e), e / (1 + e)).astype(np.float32)


def swiglu(h: np.ndarray, limit: float, alpha: float) -> np.ndarray:
    """h [T, 2I] with gate = h[:, 0::2], linear = h[:, 1::2] (interleaved) -> [T, I].

    gate = min(gate, limit), linear = clamp(linear, -limit, limit), out = gate sigmoid(alpha gate) (linear + 1).
    """
    gate = np.minimum(h[..., 0::2], np.float32(limit))
    linear = np.clip(h[..., 1::2], np.float32(-limit), np.float32(limit))
    return (gate * sigmoid(np.float32(alpha) * gate) * (linear + np.float32(1))).astype(np.float32)


@dataclass
class MoEWeights:
    """One layer's MoE block in float32. mlp1_weight / mlp2_weight are anything indexable by an expert
    index that gives [2I, H] / [H, I] (a full [E, out, in] array, or a lazy dequantizer)."""

    router_weight: np.ndarray  # [E, H]
    router_bias: np.ndarray  # [E]
    mlp1_weight: object  # [e] -> [2I, H]
    mlp1_bias: np.ndarray  # [E, 2I]
    mlp2_weight: object  # [e] -> [H, I]
    mlp2_bias: np.ndarray  # [E, H]


def moe(t: np.ndarray, layer: MoEWeights, cfg: ModelConfig) -> np.ndarray:
    """t [T, H] (already normed) -> sum over the token's k experts of weight_e * expert_e(t), [T, H]."""
    T, H = t.shape
    logits = t @ layer.router_weight.T + layer.router_bias  # g = t Wr^T + br
    experts, weights = router_topk(logits, cfg.experts_per_token)
    per_slot = np.zeros((T, cfg.experts_per_token, H), dtype=np.float32)  # out_e for each chosen slot
    for e in np.unique(experts):
        rows, slots = np.nonzero(experts == e)
        h = t[rows] @ layer.mlp1_weight[e].T + layer.mlp1_bias[e]  # h = t W1_e^T + b1_e, [n, 2I]
        y = swiglu(h, cfg.swiglu_limit, cfg.swiglu_alpha)
        per_slot[rows, slots] = y @ layer.mlp2_weight[e].T + layer.mlp2_bias[e]  # out_e = y W2_e^T + b2_e
    return np.einsum("tk,tkh->th", weights, per_slot).astype(np.float32)  # sum_k weight_k out_k


# ---- weights --------------------------------------------------------------------------------------

def expert_matrix(weights, layer: int, which: str, expert: int) -> np.ndarray:
    """One expert's mlp1 ([2I, H]) or mlp2 ([H, I]) weight in float32, from MXFP4 or bf16/f32 storage."""
    name = f"block.{layer}.mlp.{which}_weight"
    if weights.experts_format == "mxfp4":  # value = e2m1(nibble) * 2^(scale - 127), gptoss.weights.mxfp4
        return dequantize(weights.raw(name + ".blocks")[expert], weights.raw(name + ".scales")[expert])
    raw = weights.raw(name)[expert]
    return from_bf16_bits(raw) if weights.info(name).dtype == "bf16" else np.asarray(raw, dtype=np.float32)


class ExpertCache:
    """Dequantized expert matrices, least recently used first out, within a byte budget.

    A 20b-shaped model's experts take 76 GB in float32, so they are decoded on demand: only the
    experts a forward routes to are materialized.
    """

    def __init__(self, weights, max_bytes: int):
        self.weights = weights
        self.max_bytes = max_bytes
        self.entries: OrderedDict[tuple[int, str, int], np.ndarray] = OrderedDict()
        self.bytes = 0

    def get(self, layer: int, which: str, expert: int) -> np.ndarray:
        key = (layer, which, int(expert))
        if key in self.entries:
            self.entries.move_to_end(key)
            return self.entries[key]
        matrix = expert_matrix(self.weights, layer, which, int(expert))
        self.entries[key] = matrix
        self.bytes += matrix.nbytes
        while self.bytes > self.max_bytes and len(self.entries) > 1:
            _, old = self.entries.popitem(last=False)
            self.bytes -= old.nbytes
        return matrix


class LazyExperts:
    """`[e]` -> one layer's mlp1 or mlp2 matrix of expert e, through the shared ExpertCache."""

    def __init__(self, cache: ExpertCache, layer: int, which: str):
        self.cache, self.layer, self.which = cache, layer, which

    def __getitem__(self, expert: int) -> np.ndarray:
        return self.cache.get(self.layer, self.which, expert)


@dataclass
class AttentionWeights:
    norm: np.ndarray  # [H]
    qkv_weight: np.ndarray  # [Hq D + 2 Hkv D, H]: q rows, then k, then v
    qkv_bias: np.ndarray
    sinks: np.ndarray  # [Hq]
    out_weight: np.ndarray  # [H, Hq D]
    out_bias: np.ndarray  # [H]


@dataclass
class KVCache:
    """Every position seen so far: per layer k and v [S, Hkv, D] (after RoPE), and their positions [S]."""

    k: list[np.ndarray]
    v: list[np.ndarray]
    positions: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    @property
    def length(self) -> int:
        return len(self.positions)


# ---- the model ------------------------------------------------------------------------------------

class ReferenceModel:
    """gpt-oss in float32 NumPy. Dense weights become float32 at init; experts are decoded lazily."""

    def __init__(self, weights, expert_cache_bytes: int = 2 << 30, kv_fp8: bool = False):
        """kv_fp8: K and V rounded to e4m3 (e4m3_round) before they enter the cache, as the GPU's FP8 KV
        cache keeps them (EngineConfig.kv_cache_dtype "fp8"); default float32."""
        self.weights = weights
        self.kv_fp8 = kv_fp8
        cfg = self.config = weights.config
        f32 = weights.f32
        self.embedding_dtype = weights.info("embedding.weight").dtype  # rows are converted on lookup
        self.attn = [AttentionWeights(
            norm=f32(f"block.{i}.attn.norm.scale"),
            qkv_weight=f32(f"block.{i}.attn.qkv.weight"), qkv_bias=f32(f"block.{i}.attn.qkv.bias"),
            sinks=f32(f"block.{i}.attn.sinks"),
            out_weight=f32(f"block.{i}.attn.out.weight"), out_bias=f32(f"block.{i}.attn.out.bias"))
            for i in range(cfg.num_layers)]
        self.expert_cache = ExpertCache(weights, expert_cache_bytes)
        self.mlp_norm = [f32(f"block.{i}.mlp.norm.scale") for i in range(cfg.num_layers)]
        self.moe = [MoEWeights(
            router_weight=f32(f"block.{i}.mlp.gate.weight"), router_bias=f32(f"block.{i}.mlp.gate.bias"),
            mlp1_weight=LazyExperts(self.expert_cache, i, "mlp1"), mlp1_bias=f32(f"block.{i}.mlp.mlp1_bias"),
            mlp2_weight=LazyExperts(self.expert_cache, i, "mlp2"), mlp2_bias=f32(f"block.{i}.mlp.mlp2_bias"))
            for i in range(cfg.num_layers)]
        self.final_norm = f32("norm.scale")
        self.unembedding = f32("unembedding.weight")  # [V, H], not tied to the embedding

    def new_cache(self) -> KVCache:
        cfg = self.config
        empty = lambda: np.zeros((0, cfg.num_kv_heads, cfg.head_dim), dtype=np.float32)  # noqa: E731
        return KVCache(k=[empty() for _ in range(cfg.num_layers)], v=[empty() for _ in range(cfg.num_layers)])

    def embed(self, tokens: np.ndarray) -> np.ndarray:
        rows = self.weights.raw("embedding.weight")[tokens]
        return from_bf16_bits(rows) if self.embedding_dtype == "bf16" else np.array(rows, dtype=np.float32)

    def attention_block(self, i: int, x: np.ndarray, positions: np.ndarray, cos, sin, cache: KVCache):
        cfg, w = self.config, self.attn[i]
        T, Hq, Hkv, D = len(x), cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        t = rmsnorm(x, w.norm, cfg.rms_norm_eps)  # t = rmsnorm(x) * w_attn_norm
        qkv = t @ w.qkv_weight.T + w.qkv_bias  # [q | k | v] = t Wqkv^T + bqkv
        q = qkv[:, :Hq * D].reshape(T, Hq, D)
        k = qkv[:, Hq * D:(Hq + Hkv) * D].reshape(T, Hkv, D)
        v = qkv[:, (Hq + Hkv) * D:].reshape(T, Hkv, D)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)  # RoPE on q and k, not v
        if self.kv_fp8:  # what an FP8 cache holds
            k, v = e4m3_round(k), e4m3_round(v)
        cache.k[i] = np.concatenate([cache.k[i], k])  # this chunk's keys are visible to its own queries
        cache.v[i] = np.concatenate([cache.v[i], v])
        k_pos = np.concatenate([cache.positions, positions])
        window = cfg.sliding_window if cfg.is_sliding(i) else None
        o = attention(q, cache.k[i], cache.v[i], w.sinks, positions, k_pos, window)
        return o.reshape(T, Hq * D) @ w.out_weight.T + w.out_bias  # o = concat_heads(attn) Wo^T + bo

    def forward(self, tokens: Sequence[int], cache: KVCache) -> np.ndarray:
        """Run tokens (the next ones after what the cache holds) -> logits [T, V] float32; extends cache."""
        return self.unembed(self.hidden(tokens, cache))

    def unembed(self, t: np.ndarray) -> np.ndarray:
        """Final normed states [T, H] -> logits [T, V] float32."""
        return (t @ self.unembedding.T).astype(np.float32)  # logits = t Wunembed^T

    def hidden(self, tokens: Sequence[int], cache: KVCache) -> np.ndarray:
        """forward() without the unembedding: the final normed states [T, H]; extends cache."""
        cfg = self.config
        tokens = np.asarray(tokens, dtype=np.int64).reshape(-1)
        if len(tokens) == 0:
            raise ValueError("forward needs at least one token")
        if tokens.min() < 0 or tokens.max() >= cfg.vocab_size:
            raise ValueError(f"token ids must be in 0..{cfg.vocab_size - 1}")
        positions = cache.length + np.arange(len(tokens), dtype=np.int64)
        if positions[-1] >= cfg.max_context:
            raise ValueError(f"position {positions[-1]} is past the context of {cfg.max_context}")
        cos, sin = rope_cos_sin(cfg, positions)

        x = self.embed(tokens)  # the residual stream, float32 [T, H]
        for i in range(cfg.num_layers):
            x = x + self.attention_block(i, x, positions, cos, sin, cache)  # x = x + attn(x)
            t = rmsnorm(x, self.mlp_norm[i], cfg.rms_norm_eps)  # t = rmsnorm(x) * w_mlp_norm
            x = x + moe(t, self.moe[i], cfg)  # x = x + sum_e weight_e out_e
        cache.positions = positions if cache.length == 0 else np.concatenate([cache.positions, positions])
        return rmsnorm(x, self.final_norm, cfg.rms_norm_eps)


def greedy_generate(model: ReferenceModel, prompt_ids: Sequence[int], steps: int,
                    one_at_a_time: bool = False) -> list[int]:
    """`steps` new tokens by argmax (ties to the lowest id), prefill then decode through the cache.
    one_at_a_time: prefill token by token, as the engine's CPU runner does (a T-row matrix product may
    round differently from T one-row products)."""
    cache = model.new_cache()
    if one_at_a_time:
        logits = [model.forward([t], cache) for t in prompt_ids][-1][-1]
    else:
        logits = model.forward(prompt_ids, cache)[-1]
    out: list[int] = []
    for step in range(steps):
        out.append(int(np.argmax(logits)))  # np.argmax returns the first of equal maxima
        if step + 1 < steps:
            logits = model.forward([out[-1]], cache)[-1]
    return out
