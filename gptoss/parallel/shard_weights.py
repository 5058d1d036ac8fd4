"""One rank's share of a model's weights for tensor/expert parallel (`--tensor-parallel R`).

ShardWeights(weights, ranks, rank) is a Weights source (the same names) whose tensors are sliced to what
rank `rank` of a ShardPlan owns, so that DeviceWeights uploads exactly the rank's share:

- attn.qkv.weight / attn.qkv.bias: the rows of the rank's query heads, then of its kv heads' keys, then
  of their values (the fused layout q | k | v, each narrowed);
- attn.sinks: the rank's query heads; attn.out.weight: the columns of the rank's query heads;
- mlp.mlp1_* / mlp.mlp2_* (weights, MXFP4 blocks and scales, biases): the rank's experts (axis 0), so
  each expert's bias lives on the one rank that owns the expert and enters the reduced sum once;
- everything else whole: embedding, norms, router (every rank routes every token to the same experts),
  attn.out.bias (added once, after the ranks' partial out projections are summed), unembedding.

`config` is the rank's view of the model: num_heads and num_kv_heads are the rank's counts (the GPU
model sizes its qkv, attention and KV cache from them); num_experts stays the whole model's (the router's
width), and `local_experts` / `first_expert` say which of them the rank's expert tensors hold.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from ..config import ModelConfig
from ..weights.base import TensorInfo, Weights
from .tensor import ShardPlan

EXPERT_SUFFIXES = ("mlp.mlp1_weight", "mlp.mlp1_weight.blocks", "mlp.mlp1_weight.scales", "mlp.mlp1_bias",
                   "mlp.mlp2_weight", "mlp.mlp2_weight.blocks", "mlp.mlp2_weight.scales", "mlp.mlp2_bias")


def shard_config(cfg: ModelConfig, ranks: int) -> ModelConfig:
    """The model as one of `ranks` ranks sees it: its query and kv heads; every expert for the router."""
    ShardPlan(cfg, ranks)  # ValueError when ranks does not divide the heads, kv heads and experts
    return dataclasses.replace(cfg, num_heads=cfg.num_heads // ranks, num_kv_heads=cfg.num_kv_heads // ranks)


class ShardWeights(Weights):
    def __init__(self, weights: Weights, ranks: int, rank: int):
        if not 0 <= rank < ranks:
            raise ValueError(f"rank {rank} is not one of 0..{ranks - 1}")
        self.base, self.rank = weights, rank
        self.plan = ShardPlan(weights.config, ranks)
        self.config = shard_config(weights.config, ranks)
        self.experts_format = weights.experts_format
        self.source = f"{getattr(weights, 'source', 'weights')} (rank {rank} of {ranks})"
        experts = self.plan.experts(rank)
        self.first_expert, self.local_experts = experts.start, len(experts)

    def names(self) -> list[str]:
        return self.base.names()

    def _kind(self, name: str) -> str:
        for suffix in ("attn.qkv.weight", "attn.qkv.bias", "attn.sinks", "attn.out.weight"):
            if name.endswith(suffix):
                return suffix
        if name.endswith(EXPERT_SUFFIXES):
            return "experts"
        return "whole"

    def qkv_rows(self) -> np.ndarray:
        """Indices of the rank's rows of the fused qkv projection: its q heads, its k heads, its v heads."""
        cfg, D = self.base.config, self.base.config.head_dim
        qs, ks = self.plan.q_heads(self.rank), self.plan.kv_heads(self.rank)
        return np.concatenate([np.arange(qs.start * D, qs.stop * D),
                               cfg.q_size + np.arange(ks.start * D, ks.stop * D),
                               cfg.q_size + cfg.kv_size + np.arange(ks.start * D, ks.stop * D)])

    def info(self, name: str) -> TensorInfo:
        info = self.base.info(name)
        kind, shape = self._kind(name), info.shape
        cfg = self.config
        if kind in ("attn.qkv.weight", "attn.qkv.bias"):
            shape = (cfg.qkv_size,) + shape[1:]
        elif kind == "attn.sinks":
            shape = (cfg.num_heads,)
        elif kind == "attn.out.weight":
            shape = (shape[0], cfg.q_size)
        elif kind == "experts":
            shape = (self.local_experts,) + shape[1:]
        return TensorInfo(name, info.dtype, tuple(shape))

    def raw(self, name: str) -> np.ndarray:
        full, kind = self.base.raw(name), self._kind(name)
        D = self.base.config.head_dim
        qs = self.plan.q_heads(self.rank)
        if kind in ("attn.qkv.weight", "attn.qkv.bias"):
            return full[self.qkv_rows()]
        if kind == "attn.sinks":
            return full[qs]
        if kind == "attn.out.weight":
            return np.ascontiguousarray(full[:, qs.start * D:qs.stop * D])
        if kind == "experts":
            return full[self.first_expert:self.first_expert + self.local_experts]
        return full
