"""The weights on the GPU: every tensor uploaded once from a Weights source (a mmap'd file or synthetic
weights) as the kernels read it, with a progress bar; and what GPU memory is free for the rest."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .weights.bf16 import to_bf16_bits
from .config import ModelConfig
from .errors import ModelTooLargeError


def gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


@dataclass
class ExpertWeights:
    """One layer's expert matrices: MXFP4 (blocks + scales) or bf16 [E, out, in]."""
    format: str  # "mxfp4" or "bf16"
    blocks: object = None  # cupy uint8 [E, R, C/32, 16]
    scales: object = None  # cupy uint8 [E, R, C/32]
    weight: object = None  # cupy uint16 (bf16) [E, R, C]
    # MXFP4 only, optional: the same weights as bf16 [E, R, C] in the wgmma kernels' row order
    # (ops.moe.dense_expert_copy), which the expert GEMMs of large steps read instead of blocks/scales
    dense: object = None
    # MXFP4 only: blocks rewritten at load into the wgmma order, the layout the wgmma expert kernels read
    # (ops.moe.to_wgmma_order; DeviceWeights does it where they run)
    wgmma_order: bool = False


@dataclass
class LayerWeights:
    attn_norm: object  # f32 [H]
    qkv_w: object  # bf16 [qkv, H]
    qkv_b: object  # bf16 [qkv]
    sinks: object  # f32 [Hq]
    out_w: object  # bf16 [H, Hq*D]
    out_b: object  # bf16 [H]
    mlp_norm: object  # f32 [H]
    gate_w: object  # bf16 [E, H]
    gate_b: object  # bf16 [E]
    w1: ExpertWeights  # [E, 2I, H]
    b1: object  # bf16 [E, 2I]
    w2: ExpertWeights  # [E, H, I]
    b2: object  # bf16 [E, H]
    window: int  # 0 = full attention


def weight_bytes(weights) -> int:
    return sum(int(np.prod(weights.info(n).shape)) * {"bf16": 2, "f32": 4, "u8": 1}[weights.info(n).dtype]
               for n in weights.names())


def dense_expert_bytes(cfg: ModelConfig, experts: int | None = None) -> int:
    """GPU bytes of the dense expert copy (ExpertWeights.dense, bf16) of every layer's w1 [E, 2I, H] and
    w2 [E, H, I]: 4x their MXFP4 blocks. experts: how many the weights hold (a tensor-parallel rank's
    share); default all of cfg.num_experts."""
    e = cfg.num_experts if experts is None else experts
    h, i = cfg.hidden_size, cfg.intermediate_size
    return cfg.num_layers * e * (2 * i * h + h * i) * 2


def check_dense_experts(experts_format: str, kernels=None) -> None:
    """Raise ValueError (one line) unless a dense expert copy would be read: MXFP4 experts, and the wgmma
    expert kernels under `kernels` (a gptoss.kernels.KernelOptions; None: from the environment)."""
    if experts_format != "mxfp4":
        raise ValueError("--dense-experts is for MXFP4 experts; these are bf16 already")
    from .ops.moe import uses_wgmma

    if not uses_wgmma("mxfp4", kernels):
        raise ValueError("--dense-experts needs the wgmma expert kernels (H100/H200, not --kernels portable, "
                         "AMD or GPTOSS_WGMMA=0), the only ones that read the copy; drop --dense-experts")


def free_gpu_memory() -> tuple[int, int]:
    import cupy

    free, total = cupy.cuda.runtime.memGetInfo()
    # memory CuPy's pool holds but does not use counts as free for us
    pool = cupy.get_default_memory_pool()
    return free + pool.free_bytes(), total


class DeviceWeights:
    """All weights uploaded once from a Weights source (mmap'd file or synthetic), with a progress bar.
    dense_experts: also give every layer's w1 and w2 their dense copy (ExpertWeights.dense, made on the
    GPU by ops.moe.dense_expert_copy; check_dense_experts says when it is refused); kernels: the
    KernelOptions that build it and run the model (None: from the environment). Where those run the wgmma
    expert kernels, the MXFP4 blocks are rewritten into their order as they arrive
    (ExpertWeights.wgmma_order), so a model on these weights must use the same kernels."""

    def __init__(self, weights, progress: bool = True, dense_experts: bool = False, kernels=None):
        import cupy

        self.config: ModelConfig = weights.config
        self.experts_format = weights.experts_format
        # a tensor-parallel rank's share (gptoss.parallel.shard_weights.ShardWeights) holds experts
        # first_expert .. first_expert + local_experts - 1; whole weights hold them all
        self.first_expert = int(getattr(weights, "first_expert", 0))
        self.local_experts = int(getattr(weights, "local_experts", weights.config.num_experts))
        if dense_experts:
            check_dense_experts(self.experts_format, kernels)
        need = weight_bytes(weights)
        free, total = free_gpu_memory()
        if need > free:
            raise ModelTooLargeError(
                f"the model's weights need {gib(need)} of GPU memory; {gib(free)} of {gib(total)} is "
                "free. Use a GPU with more memory (gpt-oss-120b needs about 61 GiB for weights alone), "
                "or free the GPU from other processes.")
        dense = dense_expert_bytes(self.config, self.local_experts) if dense_experts else 0
        if dense > free - need:  # checked before the upload, which would leave too little for the copy
            raise ModelTooLargeError(
                f"the dense expert copy needs {gib(dense)} of GPU memory beside the weights' {gib(need)}; "
                f"{gib(max(free - need, 0))} is free after them: drop --dense-experts")
        from .ops.moe import to_wgmma_order
        from .progress import ByteProgress

        with ByteProgress("upload", need, quiet=not progress) as bar:
            def up(name, as_f32=False):
                # norms' scales and sinks in f32; every other tensor as the kernels read it (bf16 bits, u8)
                if as_f32:
                    host = weights.f32(name)
                elif weights.info(name).dtype == "f32":
                    host = to_bf16_bits(weights.f32(name))
                else:
                    host = weights.raw(name)
                arr = cupy.asarray(np.ascontiguousarray(host))
                bar.advance(host.nbytes)
                return arr

            def experts(prefix):
                if self.experts_format == "mxfp4":
                    w = ExpertWeights("mxfp4", blocks=up(prefix + ".blocks"), scales=up(prefix + ".scales"))
                    return to_wgmma_order(w, kernels)
                return ExpertWeights("bf16", weight=up(prefix))

            cfg = self.config
            self.embedding = up("embedding.weight")
            self.layers = []
            for i in range(cfg.num_layers):
                b = f"block.{i}."
                self.layers.append(LayerWeights(
                    attn_norm=up(b + "attn.norm.scale", True), qkv_w=up(b + "attn.qkv.weight"),
                    qkv_b=up(b + "attn.qkv.bias"), sinks=up(b + "attn.sinks", True),
                    out_w=up(b + "attn.out.weight"), out_b=up(b + "attn.out.bias"),
                    mlp_norm=up(b + "mlp.norm.scale", True), gate_w=up(b + "mlp.gate.weight"),
                    gate_b=up(b + "mlp.gate.bias"), w1=experts(b + "mlp.mlp1_weight"),
                    b1=up(b + "mlp.mlp1_bias"), w2=experts(b + "mlp.mlp2_weight"), b2=up(b + "mlp.mlp2_bias"),
                    window=cfg.sliding_window if cfg.is_sliding(i) else 0))
            self.final_norm = up("norm.scale", True)
            self.unembedding = up("unembedding.weight")
        if dense_experts:
            from .ops.moe import dense_expert_copy

            for layer in self.layers:
                for w in (layer.w1, layer.w2):
                    w.dense = dense_expert_copy(w, kernels=kernels)
