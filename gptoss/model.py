"""The GPU model: weights in CuPy arrays, the KV cache, and one forward over a batch of sequences.

A step's tokens come from several sequences at once, each at its own position: decode tokens (one per
sequence) and prefill chunks (several consecutive tokens of one sequence) mixed freely. Every
operation runs in our kernels (gptoss/ops); this file only wires them in the order of the spec.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .config import ModelConfig


class ModelTooLargeError(RuntimeError):
    """The weights (or weights + the smallest KV cache) do not fit in free GPU memory."""


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


@dataclass
class ExpertWeights:
    """One layer's expert matrices: MXFP4 (blocks + scales) or bf16 [E, out, in]."""
    format: str  # "mxfp4" or "bf16"
    blocks: object = None  # cupy uint8 [E, R, C/32, 16]
    scales: object = None  # cupy uint8 [E, R, C/32]
    weight: object = None  # cupy uint16 (bf16) [E, R, C]


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


def free_gpu_memory() -> tuple[int, int]:
    import cupy

    free, total = cupy.cuda.runtime.memGetInfo()
    # memory CuPy's pool holds but does not use counts as free for us
    pool = cupy.get_default_memory_pool()
    return free + pool.free_bytes(), total


class DeviceWeights:
    """All weights uploaded once from a Weights source (mmap'd file or synthetic), with a progress bar."""

    def __init__(self, weights, progress: bool = True):
        import cupy

        self.config: ModelConfig = weights.config
        self.experts_format = weights.experts_format
        need = weight_bytes(weights)
        free, total = free_gpu_memory()
        if need > free:
            raise ModelTooLargeError(
                f"the model's weights need {_gib(need)} of GPU memory; {_gib(free)} of {_gib(total)} is "
                "free. Use a GPU with more memory (gpt-oss-120b needs about 61 GiB for weights alone), "
                "or free the GPU from other processes.")
        from .progress import ByteProgress

        with ByteProgress("upload", need, quiet=not progress) as bar:
            def up(name, as_f32=False):
                host = weights.f32(name) if as_f32 else weights.raw(name)
                arr = cupy.asarray(np.ascontiguousarray(host))
                bar.advance(host.nbytes)
                return arr

            def experts(prefix):
                if self.experts_format == "mxfp4":
                    return ExpertWeights("mxfp4", blocks=up(prefix + ".blocks"), scales=up(prefix + ".scales"))
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


class KVCache:
    """K and V per layer, [slots, L, Hkv, D] bf16: L = capacity on full layers, a ring of
    window + max_chunk positions on sliding layers (position p at index p % L)."""

    def __init__(self, cfg: ModelConfig, slots: int, capacity: int, max_chunk: int):
        import cupy

        self.slots, self.capacity, self.max_chunk = slots, capacity, max_chunk
        ring = min(capacity, cfg.sliding_window + max_chunk)
        self.k, self.v = [], []
        for i in range(cfg.num_layers):
            length = ring if cfg.is_sliding(i) else capacity
            shape = (slots, length, cfg.num_kv_heads, cfg.head_dim)
            self.k.append(cupy.empty(shape, dtype=cupy.uint16))
            self.v.append(cupy.empty(shape, dtype=cupy.uint16))

    @staticmethod
    def bytes_per_slot(cfg: ModelConfig, capacity: int, max_chunk: int) -> int:
        ring = min(capacity, cfg.sliding_window + max_chunk)
        per_pos = 2 * cfg.num_kv_heads * cfg.head_dim * 2  # K and V, bf16
        return sum((ring if cfg.is_sliding(i) else capacity) * per_pos for i in range(cfg.num_layers))


def activation_bytes_per_token(cfg: ModelConfig) -> int:
    """GPU bytes a token of one step needs for activations (a generous bound, see forward)."""
    H, k = cfg.hidden_size, cfg.experts_per_token
    return (H * 4 + H * 2 + cfg.qkv_size * 2 + 2 * cfg.q_size * 2 + H * 2          # x, t, qkv, q, attn
            + k * (cfg.intermediate_size * 2 + H * 4) + k * 12 + cfg.num_experts * 4)  # moe buffers


@dataclass
class StepBatch:
    """One forward's tokens, as host arrays; sequences are contiguous runs of tokens."""
    tokens: np.ndarray  # [T] int32
    positions: np.ndarray  # [T] int32
    slots: np.ndarray  # [T] int32
    q_lens: list  # tokens per sequence, in order
    seq_slots: list  # slot per sequence
    seq_starts: list  # position of each sequence's first token in this step
    logit_rows: np.ndarray  # [R] int32: rows of T whose next-token logits are wanted


class GPUModel:
    def __init__(self, weights: DeviceWeights, slots: int, capacity: int, max_step_tokens: int,
                 max_chunk: int):
        from .ops.attention import rope_table

        self.w = weights
        self.cfg = cfg = weights.config
        self.max_step_tokens = max_step_tokens
        self.cache = KVCache(cfg, slots, capacity, max_chunk)
        self.rope = rope_table(cfg, capacity)

    def forward(self, step: StepBatch):
        """Logits [R, V] float32 for step.logit_rows, after writing every token's K/V into the cache."""
        import cupy
        from .ops import attention as A, embed as E, gemm as G, moe as M, norm as N

        cfg, w = self.cfg, self.w
        T = len(step.tokens)
        if T > self.max_step_tokens:
            raise ValueError(f"a step of {T} tokens exceeds the planned {self.max_step_tokens}")
        tokens = cupy.asarray(step.tokens, dtype=cupy.int32)
        positions = cupy.asarray(step.positions, dtype=cupy.int32)
        slots = cupy.asarray(step.slots, dtype=cupy.int32)
        batch = A.AttentionBatch.build(step.q_lens, step.seq_slots, step.seq_starts, self.cache.capacity)

        x = E.embed(tokens, w.embedding)  # residual stream, f32 [T, H]
        t = N.rmsnorm(x, w.layers[0].attn_norm, cfg.rms_norm_eps)
        for i, layer in enumerate(w.layers):
            qkv = G.linear(t, layer.qkv_w, layer.qkv_b)
            q = A.rope_and_cache(qkv, positions, slots, self.rope, self.cache.k[i], self.cache.v[i])
            attn = A.attention(q, self.cache.k[i], self.cache.v[i], batch, layer.sinks, layer.window)
            o = G.linear(attn, layer.out_w, layer.out_b)
            t = N.add_rmsnorm(x, o, layer.mlp_norm, cfg.rms_norm_eps)  # x += o; t = norm(x)
            M.moe(x, t, layer, cfg)  # x += sum_j weight_j * expert_j(t)
            next_norm = w.layers[i + 1].attn_norm if i + 1 < len(w.layers) else None
            if next_norm is not None:
                t = N.rmsnorm(x, next_norm, cfg.rms_norm_eps)
        rows = cupy.asarray(step.logit_rows, dtype=cupy.int32)
        last = N.rmsnorm(x[rows] if len(step.logit_rows) != T else x, w.final_norm, cfg.rms_norm_eps)
        return G.linear(last, w.unembedding, out_dtype="f32")
