"""The GPU model: weights in CuPy arrays, the KV cache, and one forward over a batch of sequences.

A step's tokens come from several sequences at once, each at its own position: decode tokens (one per
sequence) and prefill chunks (several consecutive tokens of one sequence) mixed freely. Every
operation runs in our kernels (gptoss/ops); this file only wires them in the order of the spec.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .config import ModelConfig
from .kernels import KernelOptions, is_amd
from .ops.attention import TILE
from .ops.moe import ROUTER_SPLITS
from .weights.bf16 import to_bf16_bits


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


PAGE = TILE  # positions per page of the full layers' cache: one attention tile, the kernels' smallest page


class PageTable:
    """Which page holds positions PAGE*j .. PAGE*j + PAGE-1 of each slot: host[slot, j], on the host
    (KVCache copies it to the device before a step). Pages 0 .. pages-1 are for sequences; page `spare`
    (= pages) is where every entry not given to a sequence points, so a stray write (a padding row of
    a captured decode step) lands there and nowhere else. Without `pages`, slot s holds pages s*width
    .. s*width + width-1 for good (no scheduler hands pages out)."""

    def __init__(self, slots: int, width: int, pages: int | None = None):
        self.slots, self.width = slots, width
        owned = pages is None
        self.pages = slots * width if owned else int(pages)
        if self.pages <= 0:
            raise ValueError(f"a paged KV cache needs at least one page, got {pages}")
        self.spare = self.pages
        if owned:
            self.host = np.arange(self.pages, dtype=np.int32).reshape(slots, width)
        else:
            self.host = np.full((slots, width), self.spare, np.int32)
        self.dirty = False

    def assign(self, slots, indices, pages) -> None:
        """host[slots[i], indices[i]] = pages[i]."""
        self.host[np.asarray(slots), np.asarray(indices)] = np.asarray(pages, np.int32)
        self.dirty = True

    def release(self, slot: int) -> None:
        """Point every entry of `slot` back at the spare page."""
        self.host[slot] = self.spare
        self.dirty = True

    def clear(self) -> None:
        """Every entry back at the spare page (no slot holds a page)."""
        self.host[...] = self.spare
        self.dirty = True


class KVCache:
    """K and V per layer, bf16.

    Sliding layers: [slots, ring, Hkv, D], a ring of window + max_chunk positions per slot (position p
    at row p % ring). Full layers: [pages + 1, PAGE, Hkv, D], pages the slots share through the page
    table [slots, ceil(capacity / PAGE)] (PageTable; the last page is its spare): position p of slot s
    sits in page table[s, p // PAGE]. Without `pages` each slot owns the pages of its whole capacity;
    with `pages` the table starts empty and the continuous-batching scheduler hands pages out
    (batching.PagePool), so a sequence holds only the pages its positions reach."""

    def __init__(self, cfg: ModelConfig, slots: int, capacity: int, max_chunk: int, pages: int | None = None):
        import cupy

        if capacity <= 0 or slots <= 0:
            raise ValueError(f"a KV cache needs slots and capacity > 0, got {slots} and {capacity}")
        self.slots, self.capacity, self.max_chunk = slots, capacity, max_chunk
        self.page_table = PageTable(slots, -(-capacity // PAGE), pages)
        self.table = cupy.asarray(self.page_table.host)  # the kernels' copy
        ring = min(capacity, cfg.sliding_window + max_chunk)
        self.k, self.v = [], []
        for i in range(cfg.num_layers):
            if cfg.is_sliding(i):
                shape = (slots, ring, cfg.num_kv_heads, cfg.head_dim)
            else:
                shape = (self.page_table.pages + 1, PAGE, cfg.num_kv_heads, cfg.head_dim)
            self.k.append(cupy.empty(shape, dtype=cupy.uint16))
            self.v.append(cupy.empty(shape, dtype=cupy.uint16))

    @property
    def pages(self) -> int:
        return self.page_table.pages

    def layer_table(self, layer: int, cfg: ModelConfig):
        """The page table for layer `layer`'s kernels: the device table on full layers, None on sliding."""
        return None if cfg.is_sliding(layer) else self.table

    def upload(self) -> None:
        """Copy the page table to the device if it changed (on the current stream, before the step)."""
        if self.page_table.dirty:
            self.table.set(self.page_table.host)
            self.page_table.dirty = False

    @staticmethod
    def slot_bytes(cfg: ModelConfig, capacity: int, max_chunk: int) -> int:
        """GPU bytes of one slot apart from its pages: the sliding layers' rings and its table row."""
        ring = min(capacity, cfg.sliding_window + max_chunk)
        sliding = sum(cfg.is_sliding(i) for i in range(cfg.num_layers))
        return sliding * ring * _kv_bytes_per_position(cfg) + -(-capacity // PAGE) * 4

    @staticmethod
    def page_bytes(cfg: ModelConfig) -> int:
        """GPU bytes of one page: PAGE positions of every full layer."""
        full = sum(not cfg.is_sliding(i) for i in range(cfg.num_layers))
        return full * PAGE * _kv_bytes_per_position(cfg)


def _kv_bytes_per_position(cfg: ModelConfig) -> int:
    return 2 * cfg.num_kv_heads * cfg.head_dim * 2  # K and V, bf16


def activation_bytes_per_token(cfg: ModelConfig) -> int:
    """GPU bytes one token of a step needs in StepBuffers (a slight over-count)."""
    H, k, E = cfg.hidden_size, cfg.experts_per_token, cfg.num_experts
    return (3 * 4 + H * 4 + H * 2 + H * 4 + cfg.qkv_size * 2 + 2 * cfg.q_size * 2 + H * 2  # ids, x, t, t32, qkv, q, attn, o
            + k * (cfg.intermediate_size * 2 + H * 4 + 12) + ROUTER_SPLITS * E * 4)  # moe: y, out, slots; router partials


def logit_row_bytes(cfg: ModelConfig) -> int:
    """GPU bytes per row of next-token logits a step produces (gathered x, its norm, f32 logits)."""
    return cfg.hidden_size * 6 + cfg.vocab_size * 4 + 32


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

    @classmethod
    def decode(cls, tokens, positions, slots) -> "StepBatch":
        """One token per sequence (every row's logits wanted)."""
        tokens, positions, slots = (np.asarray(a, np.int32).reshape(-1) for a in (tokens, positions, slots))
        n = len(tokens)
        return cls(tokens, positions, slots, [1] * n, slots.tolist(), positions.tolist(), np.arange(n, dtype=np.int32))

    @classmethod
    def prefill(cls, prompts, slots, starts=None) -> "StepBatch":
        """Whole chunks: prompts[i] (token ids) at positions starts[i].. of slot slots[i]; logits of
        each chunk's last token."""
        starts = [0] * len(prompts) if starts is None else list(starts)
        tokens = np.concatenate([np.asarray(p, np.int32) for p in prompts])
        positions = np.concatenate([np.arange(s, s + len(p), dtype=np.int32) for p, s in zip(prompts, starts)])
        slot_ids = np.concatenate([np.full(len(p), s, np.int32) for p, s in zip(prompts, slots)])
        lens = [len(p) for p in prompts]
        return cls(tokens, positions, slot_ids, lens, list(slots), starts,
                   (np.cumsum(lens) - 1).astype(np.int32))


@dataclass
class SampleArgs:
    """How to pick each row's next token: temperature 0 = greedy (argmax)."""
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    sequences: np.ndarray | None = None  # [R] int32: the counter RNG's sequence id of each row
    steps: np.ndarray | None = None  # [R] int32: the RNG's step (tokens generated so far) of each row


class StepBuffers:
    """Every activation of one step, allocated once for up to `tokens` tokens and `rows` logit rows:
    a step uses leading views, so the forward allocates nothing and can be captured in a CUDA graph."""

    def __init__(self, cfg: ModelConfig, tokens: int, rows: int):
        import cupy

        from .ops.moe import MoEWorkspace

        T, R, H = tokens, rows, cfg.hidden_size
        self.max_tokens, self.max_rows = T, R
        u16, f32, i32 = cupy.uint16, cupy.float32, cupy.int32
        self.tokens, self.positions, self.slots = (cupy.zeros(T, i32) for _ in range(3))
        self.rows = cupy.zeros(R, i32)
        self.x = cupy.empty((T, H), f32)  # residual stream
        self.t = cupy.empty((T, H), u16)  # normed input of the next matmul
        self.t32 = cupy.empty((T, H), f32)  # the MoE's normed input unrounded: the router reads it
        self.qkv = cupy.empty((T, cfg.qkv_size), u16)
        self.q = cupy.empty((T, cfg.num_heads, cfg.head_dim), u16)
        self.attn = cupy.empty((T, cfg.q_size), u16)
        self.o = cupy.empty((T, H), u16)
        self.last = cupy.empty((R, H), f32)
        self.last_t = cupy.empty((R, H), u16)
        self.logits = cupy.empty((R, cfg.vocab_size), f32)
        self.temperature, self.top_p = cupy.zeros(R, f32), cupy.ones(R, f32)
        self.sequences, self.steps = cupy.zeros(R, i32), cupy.zeros(R, i32)
        self.ids = cupy.zeros(R, i32)
        self.moe = MoEWorkspace(T, cfg.num_experts, cfg.experts_per_token, H, cfg.intermediate_size)


def _pow2_at_least(n: int, lo: int) -> int:
    p = lo
    while p < n:
        p *= 2
    return p


def decode_batch_bucket(b: int) -> int:
    """Padded batch of a captured decode graph: powers of two up to 64, then multiples of 64."""
    return _pow2_at_least(b, 1) if b <= 64 else -(-b // 64) * 64


class GPUModel:
    """The forward pass over a KV cache of `slots` sequences (plus one padding slot that captured
    decode steps use for their unused rows) of up to `capacity` positions. Without `pages` every slot
    owns its whole capacity; with `pages` the caller hands out the full layers' pages (self.cache).
    `kernels`: the kernel choices, resolved here once for this device (default KernelOptions.from_env():
    GPTOSS_WGMMA=0 turns the wgmma kernels off)."""

    def __init__(self, weights: DeviceWeights, slots: int, capacity: int, max_step_tokens: int,
                 max_chunk: int, max_rows: int | None = None, pages: int | None = None,
                 kernels: KernelOptions | None = None):
        import cupy

        from .ops.attention import decode_workspace_floats, rope_table

        self.kernels = (kernels if kernels is not None else KernelOptions.from_env()).resolve()
        self.w = weights
        self.cfg = cfg = weights.config
        self.slots = slots
        self.pad_slot = slots
        self.max_step_tokens = max(max_step_tokens, decode_batch_bucket(slots))
        self.cache = KVCache(cfg, slots + 1, capacity, max_chunk, pages)
        self.rope = rope_table(cfg, capacity)
        rows = max(decode_batch_bucket(slots), max_rows or 0)  # logit rows a step may ask for
        self.buf = StepBuffers(cfg, self.max_step_tokens, rows)
        self._graphs: dict = {}  # (padded batch, key bound, sampling) -> (graph, inputs, what it reads)
        # the attention decode partials of every step, eager or captured, sized for the largest (a
        # workspace per step would grow with the batch, and the pool would keep every old size)
        self._decode_ws = cupy.empty(decode_workspace_floats(decode_batch_bucket(slots), capacity, cfg.num_heads),
                                     dtype=cupy.float32)

    @property
    def capacity(self) -> int:
        return self.cache.capacity

    # ---- the forward, on preallocated buffers -------------------------------------------------------
    def _layers(self, T: int, batch, prof: "Profile | None" = None, inputs=None) -> None:
        """Embedding through the last block for the T tokens (ids, positions, slots: `inputs`, default
        the step buffers'); x holds the residual stream."""
        from .ops import attention as A, embed as E, gemm as G, moe as M, norm as N

        cfg, w, b, kernels = self.cfg, self.w, self.buf, self.kernels
        mark = prof.mark if prof is not None else (lambda name: None)
        eps = cfg.rms_norm_eps
        tokens, positions, slots = inputs or (b.tokens[:T], b.positions[:T], b.slots[:T])
        x, t, t32, qkv, q, attn, o = b.x[:T], b.t[:T], b.t32[:T], b.qkv[:T], b.q[:T], b.attn[:T], b.o[:T]
        E.embed(tokens, w.embedding, out=x)
        N.rmsnorm(x, w.layers[0].attn_norm, eps, out=t)
        mark("embed + norm")
        for i, layer in enumerate(w.layers):
            G.linear(t, layer.qkv_w, layer.qkv_b, out=qkv, kernels=kernels)
            mark("qkv gemm")
            table = self.cache.layer_table(i, cfg)
            A.rope_and_cache(qkv, positions, slots, self.rope, self.cache.k[i], self.cache.v[i], q_out=q,
                             page_table=table)
            mark("rope + kv write")
            A.attention(q, self.cache.k[i], self.cache.v[i], batch, layer.sinks, layer.window, out=attn,
                        page_table=table)
            mark("attention full" if layer.window == 0 else "attention sliding")
            G.linear(attn, layer.out_w, layer.out_b, out=o, kernels=kernels)
            mark("out gemm")
            N.add_rmsnorm(x, o, layer.mlp_norm, eps, out=t, out_f32=t32)  # x += o; t = norm(x)
            mark("add + norm")
            # x += sum_j weight_j * expert_j(t), fused with the next block's norm; the router reads t
            # unrounded (a bf16 router input flips near-tied expert choices)
            last = i + 1 == len(w.layers)
            eo = M.moe(x, t, layer, cfg, workspace=b.moe, router_input=t32, combine=last, mark=mark,
                       kernels=kernels)
            if not last:
                N.combine_rmsnorm(x, eo, cfg.experts_per_token, w.layers[i + 1].attn_norm, eps, out=t)
                mark("moe combine + norm")

    def profile(self, step: StepBatch) -> dict:
        """Milliseconds per kernel family of one eager step (CUDA events between launches)."""
        run = self._prepare(step, None)
        prof = Profile()  # after the input copies: the GPU holds while the host queues the step
        run(prof)
        prof.mark("final norm + unembedding")
        self._sample(len(step.logit_rows), True, 0)
        prof.mark("sampling")
        return prof.totals()

    def _head(self, T: int, R: int, gather: bool):
        """Final norm and unembedding of R rows (gathered from x by self.buf.rows when `gather`)."""
        from .ops import embed as E, gemm as G, norm as N

        b = self.buf
        src = E.gather_rows(b.rows[:R], b.x[:T], out=b.last[:R]) if gather else b.x[:R]
        N.rmsnorm(src, self.w.final_norm, self.cfg.rms_norm_eps, out=b.last_t[:R])
        return G.linear(b.last_t[:R], self.w.unembedding, out=b.logits[:R], out_dtype="f32", kernels=self.kernels)

    def _sample(self, R: int, greedy: bool, seed: int, args=None):
        """Next token ids of the R logit rows into buf.ids; args = (temperature, top_p, sequences,
        steps) device arrays, default the step buffers'."""
        from .ops import sampling as S

        b = self.buf
        if greedy:
            return S.argmax(b.logits[:R], out=b.ids[:R])
        temp, top_p, seqs, steps = args or (b.temperature[:R], b.top_p[:R], b.sequences[:R], b.steps[:R])
        return S.sample(b.logits[:R], temp, top_p, seed, seqs, steps, out=b.ids[:R])

    def _load_inputs(self, step: StepBatch, sample: SampleArgs | None) -> None:
        b = self.buf
        T, R = len(step.tokens), len(step.logit_rows)
        b.tokens[:T].set(step.tokens)
        b.positions[:T].set(step.positions)
        b.slots[:T].set(step.slots)
        b.rows[:R].set(np.asarray(step.logit_rows, np.int32))
        if sample is not None and sample.temperature > 0:
            b.temperature[:R].fill(sample.temperature)
            b.top_p[:R].fill(sample.top_p)
            b.sequences[:R].set(np.asarray(sample.sequences, np.int32))
            b.steps[:R].set(np.asarray(sample.steps, np.int32))

    def _check(self, step: StepBatch) -> None:
        T, R = len(step.tokens), len(step.logit_rows)
        if T == 0:
            raise ValueError("a step needs at least one token")
        if T > self.max_step_tokens or R > self.buf.max_rows:
            raise ValueError(f"a step of {T} tokens / {R} logit rows exceeds the planned "
                             f"{self.max_step_tokens} / {self.buf.max_rows}")
        if int(np.max(step.positions)) >= self.capacity:
            raise ValueError(f"position {int(np.max(step.positions))} is past the cache's capacity {self.capacity}")

    def _prepare(self, step: StepBatch, sample: SampleArgs | None):
        """Checks the step and copies its inputs; returns run(prof=None), which queues the layers and
        the head and returns the logits."""
        from .ops.attention import AttentionBatch

        self._check(step)
        T, R = len(step.tokens), len(step.logit_rows)
        self._load_inputs(step, sample)
        self.cache.upload()
        batch = AttentionBatch.build(step.q_lens, step.seq_slots, step.seq_starts, self.capacity)
        batch._workspace = self._decode_ws
        identity = R == T and np.array_equal(step.logit_rows, np.arange(T))

        def run(prof: "Profile | None" = None):
            self._layers(T, batch, prof)
            return self._head(T, R, gather=not identity) if R else self.buf.logits[:0]
        return run

    def forward(self, step: StepBatch, sample: SampleArgs | None = None):
        """Logits [R, V] float32 (a view of the step buffers, valid until the next step) for
        step.logit_rows, after writing every token's K/V into the cache (R may be 0: a step of prompt
        chunks none of which ends its prompt). Eager launches."""
        return self._prepare(step, sample)()

    def step(self, step: StepBatch, sample: SampleArgs, use_graph: bool = True) -> np.ndarray:
        """Run one step and pick the next token of each logit row: host int32 [R]. A step of decode
        tokens only replays a captured CUDA graph (when use_graph, and not on AMD)."""
        import cupy

        greedy = sample.temperature <= 0
        T = len(step.tokens)
        decode_only = len(step.q_lens) == T and np.array_equal(step.logit_rows, np.arange(T))
        if use_graph and decode_only and not is_amd():
            return self._decode_graph(step, sample, greedy)
        self.forward(step, sample)
        R = len(step.logit_rows)
        return cupy.asnumpy(self._sample(R, greedy, sample.seed)) if R else np.zeros(0, np.int32)

    # ---- captured decode steps ----------------------------------------------------------------------
    def _decode_graph(self, step: StepBatch, sample: SampleArgs, greedy: bool) -> np.ndarray:
        """Replay the graph of this (padded batch, key bound, sampling): one host-to-device copy of the
        step's ids, positions and slots (+ the sampler's counters), one graph launch."""
        import cupy

        from .ops.attention import SEG

        self._check(step)
        B = len(step.tokens)
        Bp = decode_batch_bucket(B)
        kv = min(_pow2_at_least(int(np.max(step.positions)) + 1, SEG), self.capacity)
        key = (Bp, kv) + ((True,) if greedy else
                          (False, int(sample.seed), float(sample.temperature), float(sample.top_p)))
        entry = self._graphs.get(key)
        if entry is None:
            entry = self._graphs[key] = self._capture(Bp, kv, greedy, sample)
        graph, inputs = entry[:2]
        host = np.zeros((5, Bp), np.int32)  # rows: token, position, slot, sequence, step
        host[0, :B], host[1, :B], host[2, :B] = step.tokens, step.positions, step.slots
        host[2, B:] = self.pad_slot  # padding rows: token 0 at position 0 of the padding slot
        if not greedy:
            host[3, :B], host[4, :B] = sample.sequences, sample.steps
        inputs.set(host)
        self.cache.upload()
        graph.launch(cupy.cuda.get_current_stream())
        return cupy.asnumpy(self.buf.ids[:B])

    def _capture(self, Bp: int, kv: int, greedy: bool, sample: SampleArgs):
        """A decode step of Bp rows as a CUDA graph reading its inputs from its own [5, Bp] array, run
        once eagerly first (on padding rows only) so that every kernel is compiled and every workspace
        exists before the capture."""
        import cupy

        from .ops.attention import AttentionBatch

        inputs = cupy.zeros((5, Bp), dtype=cupy.int32)
        inputs[2] = self.pad_slot
        i32 = cupy.int32
        # one query per sequence: the attention layout is fixed but for the slots and positions, which
        # the batch reads straight from the graph's inputs
        batch = AttentionBatch(cupy.arange(Bp + 1, dtype=i32), inputs[2], inputs[1], cupy.zeros((0, 2), i32),
                               cupy.arange(Bp, dtype=i32), Bp, Bp, 1, kv, self.capacity)
        batch._workspace = self._decode_ws
        args = None
        if not greedy:
            args = (cupy.full(Bp, sample.temperature, dtype=cupy.float32),
                    cupy.full(Bp, sample.top_p, dtype=cupy.float32), inputs[3], inputs[4])

        def run():
            self._layers(Bp, batch, inputs=(inputs[0], inputs[1], inputs[2]))
            self._head(Bp, Bp, gather=False)
            self._sample(Bp, greedy, int(sample.seed), args)

        run()
        cupy.cuda.get_current_stream().synchronize()
        stream = cupy.cuda.Stream(non_blocking=True)
        with stream:
            stream.begin_capture()
            try:
                run()
            finally:
                graph = stream.end_capture()
        cupy.cuda.get_current_stream().synchronize()
        # the graph holds raw device pointers: every array it reads must live as long as it does
        return graph, inputs, (batch, args, self._decode_ws)


class Profile:
    """CUDA events recorded after each launch; totals() sums the gaps per name, in milliseconds.
    The GPU first spins for hold_cycles (about 100 ms) while the host queues the whole step, so the
    gaps are kernel time, not launch overhead."""

    def __init__(self, hold_cycles: int = 200_000_000):
        import cupy

        from .kernels import kernel

        kernel("util", "spin_wait")((1,), (1,), (np.int64(hold_cycles),))
        self.events = [("start", cupy.cuda.Event())]
        self.events[0][1].record()

    def mark(self, name: str) -> None:
        import cupy

        e = cupy.cuda.Event()
        e.record()
        self.events.append((name, e))

    def totals(self) -> dict:
        import cupy

        self.events[-1][1].synchronize()
        out: dict = {}
        for (_, a), (name, b) in zip(self.events, self.events[1:]):
            out[name] = out.get(name, 0.0) + cupy.cuda.get_elapsed_time(a, b)
        return out
