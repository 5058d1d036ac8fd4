"""Expert and attention tensor parallel on paper: the reference forward split over R simulated ranks.

The plan of `--tensor-parallel R` (the GPU model follows it: gptoss/model.py with
gptoss/parallel/shard_weights.py), checked here in NumPy against the unsharded gptoss.reference forward;
`--device cpu --tensor-parallel R` runs it over R processes (rank_hidden, gptoss/parallel/tp_runner.py):

- Attention: rank r owns query heads [r Hq/R, (r+1) Hq/R) and kv heads [r Hkv/R, (r+1) Hkv/R), with
  their rows of the qkv projection, their sinks and their columns of the out projection. Query head h
  reads kv head h // (Hq/Hkv), so a rank's query heads read only its own kv heads and each rank keeps
  only its kv heads in its cache. Each rank computes a partial out projection o_r Wo[:, cols_r]^T; the
  partials are summed (the all-reduce), then the bias is added once.
- MoE: every rank computes the router (replicated: [T, E] logits are cheap) and so the same top-k;
  rank r owns experts [r E/R, (r+1) E/R) and adds weight_k out_k for the chosen slots whose expert it
  owns, zero for the rest; the partials are summed (the all-reduce).
- Everything else (embedding, norms, residual, unembedding) is replicated.

Reductions run in a FIXED order, rank 0 + rank 1 + ... + rank R-1, left to right, so the result is the
same run to run and does not depend on the batch. How a GPU run may differ from one GPU: float32
addition is not associative, so splitting one K-long dot product (the out projection over Hq D, the
expert sum over k slots) into R partial sums and adding those changes the rounding of the result, by a
few float32 ulps per reduction (relative ~1e-7), and these differences pass through later layers. A
greedy token can therefore differ from the one-GPU run where two logits are within that rounding of
each other; this is the same kind of difference as between two GEMM tilings. The GPU ranks keep this
order too: they all-gather their partials through NCCL and each adds them in rank order
(gptoss/parallel/collective.py), rather than an NCCL all-reduce, whose order is its algorithm's.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..config import ModelConfig
from ..reference import KVCache, ReferenceModel, apply_rope, attention, rmsnorm, rope_cos_sin, router_topk, swiglu


@dataclass(frozen=True)
class ShardPlan:
    """Which heads and experts rank r of `ranks` owns (contiguous, equal blocks)."""
    config: ModelConfig
    ranks: int

    def __post_init__(self):
        cfg, r = self.config, self.ranks
        if r < 1:
            raise ValueError(f"the number of ranks must be at least 1 (got {r})")
        for what, count in (("query heads", cfg.num_heads), ("kv heads", cfg.num_kv_heads),
                            ("experts", cfg.num_experts)):
            if count % r:
                raise ValueError(f"{r} ranks do not divide the {count} {what}")

    def q_heads(self, rank: int) -> slice:
        n = self.config.num_heads // self.ranks
        return slice(rank * n, (rank + 1) * n)

    def kv_heads(self, rank: int) -> slice:
        n = self.config.num_kv_heads // self.ranks
        return slice(rank * n, (rank + 1) * n)

    def experts(self, rank: int) -> range:
        n = self.config.num_experts // self.ranks
        return range(rank * n, (rank + 1) * n)


def reduce_in_rank_order(partials: list[np.ndarray]) -> np.ndarray:
    """The all-reduce: ((p0 + p1) + p2) + ... in float32, always in rank order."""
    total = partials[0].astype(np.float32, copy=True)
    for p in partials[1:]:
        total += p
    return total


class ShardedReference:
    """ReferenceModel's forward with attention and experts split over `ranks` simulated ranks.

    Uses the same weights and pure functions as the model it wraps; each rank slices what it owns.
    new_cache() gives one KVCache per rank holding only that rank's kv heads."""

    def __init__(self, model: ReferenceModel, ranks: int):
        self.model = model
        self.config = model.config
        self.plan = ShardPlan(model.config, ranks)

    def new_cache(self) -> list[KVCache]:
        cfg, n = self.config, self.config.num_kv_heads // self.plan.ranks
        return [KVCache(k=[np.zeros((0, n, cfg.head_dim), np.float32) for _ in range(cfg.num_layers)],
                        v=[np.zeros((0, n, cfg.head_dim), np.float32) for _ in range(cfg.num_layers)])
                for _ in range(self.plan.ranks)]

    def attention_partial(self, rank: int, i: int, t: np.ndarray, positions, cos, sin, cache: KVCache):
        """Rank `rank`'s share of layer i's attention: its heads' o_r Wo[:, cols_r]^T, [T, H], no bias."""
        cfg, w = self.config, self.model.attn[i]
        D, Hq, Hkv = cfg.head_dim, cfg.num_heads, cfg.num_kv_heads
        qs, ks = self.plan.q_heads(rank), self.plan.kv_heads(rank)
        rows = np.concatenate([np.arange(qs.start * D, qs.stop * D),  # this rank's q, k and v rows
                               Hq * D + np.arange(ks.start * D, ks.stop * D),
                               (Hq + Hkv) * D + np.arange(ks.start * D, ks.stop * D)])
        qkv = t @ w.qkv_weight[rows].T + w.qkv_bias[rows]
        T, nq, nkv = len(t), qs.stop - qs.start, ks.stop - ks.start
        q = apply_rope(qkv[:, :nq * D].reshape(T, nq, D), cos, sin)
        k = apply_rope(qkv[:, nq * D:(nq + nkv) * D].reshape(T, nkv, D), cos, sin)
        v = qkv[:, (nq + nkv) * D:].reshape(T, nkv, D)
        cache.k[i] = np.concatenate([cache.k[i], k])
        cache.v[i] = np.concatenate([cache.v[i], v])
        k_pos = np.concatenate([cache.positions, positions])
        window = cfg.sliding_window if cfg.is_sliding(i) else None
        o = attention(q, cache.k[i], cache.v[i], w.sinks[qs], positions, k_pos, window)
        return o.reshape(T, nq * D) @ w.out_weight[:, qs.start * D:qs.stop * D].T

    def moe_partial(self, rank: int, i: int, t: np.ndarray, experts: np.ndarray, weights: np.ndarray):
        """Rank `rank`'s share of layer i's MoE: sum over the chosen slots of its experts of weight out_e."""
        cfg, layer = self.config, self.model.moe[i]
        T, H = t.shape
        per_slot = np.zeros((T, cfg.experts_per_token, H), dtype=np.float32)  # zero where not this rank's
        for e in np.unique(experts):
            if e not in self.plan.experts(rank):
                continue
            rows, slots = np.nonzero(experts == e)
            h = t[rows] @ layer.mlp1_weight[e].T + layer.mlp1_bias[e]
            y = swiglu(h, cfg.swiglu_limit, cfg.swiglu_alpha)
            per_slot[rows, slots] = y @ layer.mlp2_weight[e].T + layer.mlp2_bias[e]
        return np.einsum("tk,tkh->th", weights, per_slot).astype(np.float32)

    def hidden(self, tokens, caches: list[KVCache]) -> np.ndarray:
        """ReferenceModel.hidden over the ranks: the final normed states [T, H]; extends every cache."""
        return self._hidden(tokens, dict(enumerate(caches)), reduce_in_rank_order)

    def rank_hidden(self, tokens, cache: KVCache, rank: int, gather) -> np.ndarray:
        """hidden() as rank `rank` alone runs it, in a process of its own: its cache, its partial sums;
        gather(partial) returns every rank's partial, in rank order (the all-gather), which it reduces."""
        return self._hidden(tokens, {rank: cache}, lambda parts: reduce_in_rank_order(gather(parts[0])))

    def _hidden(self, tokens, caches: dict, reduce) -> np.ndarray:
        """The forward of the ranks in `caches` (rank -> its KVCache); reduce(their partials) -> the sum."""
        cfg, model = self.config, self.model
        tokens = np.asarray(tokens, dtype=np.int64).reshape(-1)
        start = next(iter(caches.values())).length
        positions = start + np.arange(len(tokens), dtype=np.int64)
        cos, sin = rope_cos_sin(cfg, positions)
        x = model.embed(tokens)
        for i in range(cfg.num_layers):
            t = rmsnorm(x, model.attn[i].norm, cfg.rms_norm_eps)  # replicated on every rank
            attn = reduce([self.attention_partial(r, i, t, positions, cos, sin, c) for r, c in caches.items()])
            x = x + (attn + model.attn[i].out_bias)  # the bias once, after the reduce
            t = rmsnorm(x, model.mlp_norm[i], cfg.rms_norm_eps)
            logits = t @ model.moe[i].router_weight.T + model.moe[i].router_bias  # replicated router
            experts, weights = router_topk(logits, cfg.experts_per_token)
            x = x + reduce([self.moe_partial(r, i, t, experts, weights) for r in caches])
        for cache in caches.values():
            cache.positions = np.concatenate([cache.positions, positions])
        return rmsnorm(x, model.final_norm, cfg.rms_norm_eps)

    def forward(self, tokens, caches: list[KVCache]) -> np.ndarray:
        """Logits [T, V] float32, as ReferenceModel.forward."""
        return self.model.unembed(self.hidden(tokens, caches))
