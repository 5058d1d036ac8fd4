"""The GPU model: one forward over a StepBatch (gptoss/batch.py) on the weights in GPU memory
(gptoss/gpu_weights.py) and the KV cache (gptoss/kv_cache.py), eager or replayed from captured CUDA
graphs. Every operation runs in our kernels (gptoss/ops); this file only wires them in the order of
the spec.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from .batch import StepBatch, WindowPlan
from .config import ModelConfig
from .gpu_weights import DeviceWeights
from .kernels import KernelOptions, is_amd
from .kv_cache import PAGE, STAGE_GROUP_SEQS, KVCache


class StepBuffers:
    """Every activation of one step, allocated once for up to `tokens` tokens and `rows` logit rows:
    a step uses leading views, so the forward allocates nothing and can be captured in a CUDA graph."""

    def __init__(self, cfg: ModelConfig, tokens: int, rows: int, ranks: int | None = None):
        import cupy

        from .ops.moe import MoEWorkspace

        self.max_tokens, self.max_rows = tokens, rows
        for name, (shape, dtype, fill) in self.shapes(cfg, tokens, rows, ranks).items():
            setattr(self, name, cupy.empty(shape, dtype) if fill is None else cupy.full(shape, fill, dtype))
        self.moe = MoEWorkspace(tokens, cfg.num_experts, cfg.experts_per_token, cfg.hidden_size,
                                cfg.intermediate_size)

    @staticmethod
    def shapes(cfg: ModelConfig, tokens: int, rows: int, ranks: int | None = None) -> dict:
        """name -> (shape, dtype, initial value or None) of every buffer but the MoE workspace; `ranks`:
        a tensor-parallel rank's buffers too (its partial sums, the gathered partials of `ranks` ranks,
        their sum, its local expert indices)."""
        T, R, H = tokens, rows, cfg.hidden_size
        u16, u32, f32, i32 = (np.dtype(t) for t in (np.uint16, np.uint32, np.float32, np.int32))
        tp = {} if ranks is None else {
            "part": ((T, H), f32, None), "gathered": ((ranks * T * H,), f32, None), "reduced": ((T, H), f32, None),
            "local": ((T, cfg.experts_per_token), i32, None)}
        return {**tp,
            "tokens": ((T,), i32, 0), "positions": ((T,), i32, 0), "slots": ((T,), i32, 0),
            "rows": ((R,), i32, 0),  # the logit rows' places in T
            "x": ((T, H), f32, None),  # residual stream
            "t": ((T, H), u16, None),  # normed input of the next matmul
            "t32": ((T, H), f32, None),  # the MoE's normed input unrounded: the router reads it
            "qkv": ((T, cfg.qkv_size), u16, None),
            "q": ((T, cfg.num_heads, cfg.head_dim), u16, None),
            "attn": ((T, cfg.q_size), u16, None),
            "o": ((T, H), u16, None),
            "last": ((R, H), f32, None),  # the logit rows of x, their norm, their logits
            "last_t": ((R, H), u16, None),
            "logits": ((R, cfg.vocab_size), f32, None),
            # the sampler's inputs per row (batch.RowSampling) and its output
            "temperature": ((R,), f32, 0), "top_p": ((R,), f32, 1), "seeds": ((R,), u32, 0),
            "sequences": ((R,), i32, 0), "steps": ((R,), i32, 0), "ids": ((R,), i32, 0),
        }

    @classmethod
    def nbytes(cls, cfg: ModelConfig, tokens: int, rows: int, ranks: int | None = None) -> int:
        """GPU bytes of the buffers for `tokens` tokens and `rows` logit rows (the MoE workspace's included)."""
        from .ops.moe import MoEWorkspace

        own = sum(int(np.prod(shape)) * dtype.itemsize
                  for shape, dtype, _ in cls.shapes(cfg, tokens, rows, ranks).values())
        return own + MoEWorkspace.nbytes(tokens, cfg.num_experts, cfg.experts_per_token, cfg.hidden_size,
                                         cfg.intermediate_size)


def _check_expert_order(weights: DeviceWeights, kernels: KernelOptions) -> None:
    """Raise ValueError unless the MXFP4 expert blocks are in the order `kernels`' expert GEMMs read: the
    wgmma order where the wgmma kernels run (DeviceWeights lays them out for its own KernelOptions)."""
    from .ops.moe import uses_wgmma

    if weights.experts_format != "mxfp4" or not weights.layers:
        return
    laid_out = bool(getattr(weights.layers[0].w1, "wgmma_order", False))
    if laid_out != uses_wgmma("mxfp4", kernels):
        raise ValueError("the weights' MXFP4 experts were laid out for other expert kernels than this model's: "
                         "give DeviceWeights and GPUModel the same KernelOptions")


def _pow2_at_least(n: int, lo: int) -> int:
    p = lo
    while p < n:
        p *= 2
    return p


def decode_batch_bucket(b: int) -> int:
    """Padded batch of a captured decode graph: powers of two up to 64, then multiples of 64."""
    return _pow2_at_least(b, 1) if b <= 64 else -(-b // 64) * 64


# rows of a captured decode graph's int32 input array: token, position, slot; sampled graphs add the
# sampler's sequence, step, seed, and the float32 bits of temperature and top_p
GREEDY_INPUTS, SAMPLED_INPUTS = 3, 8
_ONE_F32_BITS = int(np.float32(1.0).view(np.int32))


class GPUModel:
    """The forward pass over a KV cache of `slots` sequences (plus one padding slot that captured
    decode steps use for their unused rows) of up to `capacity` positions. Without `pages` every slot
    owns its whole capacity; with `pages` the engine hands out the full layers' pages and sends its
    page table's changes with the steps (StepBatch.page_table or page_updates). `kernels`: the kernel
    choices, resolved here once for this device and passed to every launch (default
    KernelOptions.from_env(): GPTOSS_KERNELS=portable runs the portable kernels, GPTOSS_WGMMA=0 turns the
    wgmma kernels off). kv_cache_dtype: "bf16" or "fp8" (e4m3: half the cache's bytes; KVCache).

    Tensor/expert parallel: with `collective` (gptoss.parallel.collective) the weights are one rank's
    share (gptoss.parallel.shard_weights.ShardWeights: its heads, its experts) and each layer all-gathers
    the ranks' partial out projections and MoE sums and adds them in rank order (_tp_out, _tp_moe); every
    rank then holds the same residual stream and logits. Without it, the one-GPU forward, unchanged.

    The sliding layers' rings hold exactly their window per slot; a step's prompt chunks go through
    them staged (gptoss.batch.WindowPlan: the step's tokens reordered, one-token sequences first),
    every other operation runs once over the whole step."""

    def __init__(self, weights: DeviceWeights, slots: int, capacity: int, max_step_tokens: int,
                 max_rows: int | None = None, pages: int | None = None,
                 kernels: KernelOptions | None = None, collective=None, kv_cache_dtype: str = "bf16"):
        import cupy

        from .ops.attention import rope_table

        self.kernels = (kernels if kernels is not None else KernelOptions.from_env()).resolve()
        _check_expert_order(weights, self.kernels)
        self.w = weights
        self.cfg = cfg = weights.config
        self.collective = collective
        ranks = None if collective is None else collective.size
        self.slots = slots
        self.pad_slot = slots
        self.max_step_tokens, rows = self.step_sizes(slots, max_step_tokens, max_rows)
        self.cache = KVCache(cfg, slots + 1, capacity, pages, kv_cache_dtype, stage_tokens=self.max_step_tokens)
        self.rope = rope_table(cfg, capacity)
        self.buf = StepBuffers(cfg, self.max_step_tokens, rows, ranks)
        self._graphs: dict = {}  # (padded batch, key bound, greedy) -> (graph, inputs, what it reads)
        self.swapped: dict = {}  # swapped-out sequences' KV in host memory, by KVSwap key (KVCache.copy_out)
        # the attention decode partials of every step, eager or captured, sized for the largest (a
        # workspace per step would grow with the batch, and the pool would keep every old size)
        self._decode_ws = cupy.empty(self._decode_floats(cfg, slots, capacity), dtype=cupy.float32)

    @staticmethod
    def step_sizes(slots: int, max_step_tokens: int, max_rows: int | None = None) -> tuple[int, int]:
        """(tokens, logit rows) the step buffers hold: a captured decode step of every slot, padded,
        must fit."""
        bucket = decode_batch_bucket(slots)
        return max(max_step_tokens, bucket), max(bucket, max_rows or 0)

    @staticmethod
    def _decode_floats(cfg: ModelConfig, slots: int, capacity: int) -> int:
        from .ops.attention import decode_workspace_floats

        return decode_workspace_floats(decode_batch_bucket(slots), capacity, cfg.num_heads)

    @classmethod
    def nbytes(cls, cfg: ModelConfig, slots: int, capacity: int, max_step_tokens: int, pages: int,
               max_rows: int | None = None, ranks: int | None = None, kv_cache_dtype: str = "bf16") -> int:
        """GPU bytes a model of these dimensions allocates beside its weights, from the shapes its
        constructor allocates: the KV cache, the step buffers and the decode partials (the RoPE table,
        each step's attention layout and the captured graphs are small and not counted)."""
        tokens, rows = cls.step_sizes(slots, max_step_tokens, max_rows)
        return (KVCache.nbytes(cfg, slots + 1, capacity, pages, kv_cache_dtype, stage_tokens=tokens)
                + StepBuffers.nbytes(cfg, tokens, rows, ranks)
                + 4 * cls._decode_floats(cfg, slots, capacity))

    @property
    def capacity(self) -> int:
        return self.cache.capacity

    # ---- the forward, on preallocated buffers -------------------------------------------------------
    def _layers(self, T: int, batch, prof: "Profile | None" = None, inputs=None, pieces=None) -> None:
        """Embedding through the last block for the T tokens (ids, positions, slots: `inputs`, default
        the step buffers'); x holds the residual stream. pieces: (first token, end token, AttentionBatch,
        staged) of each piece the sliding layers write and attend in turn (_window_pieces); None = all T
        at once, on the rings."""
        from .ops import attention as A, embed as E, gemm as G, moe as M, norm as N

        cfg, w, b, kernels = self.cfg, self.w, self.buf, self.kernels
        mark = prof.mark if prof is not None else (lambda name: None)
        eps = cfg.rms_norm_eps
        tokens, positions, slots = inputs or (b.tokens[:T], b.positions[:T], b.slots[:T])
        x, t, t32, qkv, q, attn, o = b.x[:T], b.t[:T], b.t32[:T], b.qkv[:T], b.q[:T], b.attn[:T], b.o[:T]
        E.embed(tokens, w.embedding, out=x, kernels=kernels)
        N.rmsnorm(x, w.layers[0].attn_norm, eps, out=t, kernels=kernels)
        mark("embed + norm")
        for i, layer in enumerate(w.layers):
            G.linear(t, layer.qkv_w, layer.qkv_b, out=qkv, kernels=kernels)
            mark("qkv gemm")
            table = self.cache.layer_table(i, cfg)
            k_cache, v_cache = self.cache.k[i], self.cache.v[i]
            for a, e, piece, staged in (pieces if pieces is not None and layer.window else ((0, T, batch, None),)):
                k_to, v_to, slots_to, table_to = k_cache, v_cache, slots[a:e], table
                if staged is not None:  # a group of prompt chunks: the older keys they read, into the stage
                    k_to, v_to, slots_to, table_to = self.cache.stage_k, self.cache.stage_v, staged.rows, staged.table
                    A.copy_kv_rows(k_cache, v_cache, k_to, v_to, staged.fill, kernels=kernels)
                A.rope_and_cache(qkv[a:e], positions[a:e], slots_to, self.rope, k_to, v_to, q_out=q[a:e],
                                 page_table=table_to, kernels=kernels)
                mark("rope + kv write")
                A.attention(q[a:e], k_to, v_to, piece, layer.sinks, layer.window, out=attn[a:e],
                            page_table=table_to, kernels=kernels)
                if staged is not None:  # the window's last keys back into the rings
                    A.copy_kv_rows(k_to, v_to, k_cache, v_cache, staged.keep, kernels=kernels)
                mark("attention full" if layer.window == 0 else "attention sliding")
            if self.collective is None:
                G.linear(attn, layer.out_w, layer.out_b, out=o, kernels=kernels)
            else:
                self._tp_out(T, attn, layer, mark)
            mark("out gemm")
            N.add_rmsnorm(x, o, layer.mlp_norm, eps, out=t, out_f32=t32, kernels=kernels)  # x += o; t = norm(x)
            mark("add + norm")
            # x += sum_j weight_j * expert_j(t), fused with the next block's norm; the router reads t
            # unrounded (a bf16 router input flips near-tied expert choices)
            last = i + 1 == len(w.layers)
            if self.collective is None:
                eo, k = M.moe(x, t, layer, cfg, workspace=b.moe, router_input=t32, combine=last, mark=mark,
                              kernels=kernels), cfg.experts_per_token
            else:  # the ranks' summed MoE outputs, as one "slot" per token
                eo, k = self._tp_moe(T, t, t32, layer, mark), 1
                if last:
                    M.combine_add(x, eo, kernels)
            if not last:
                N.combine_rmsnorm(x, eo, k, w.layers[i + 1].attn_norm, eps, out=t, kernels=kernels)
                mark("moe combine + norm")

    # ---- tensor parallel: a rank's partial sums, gathered and added in rank order ----------------------
    def _gather_reduce(self, T: int, part, bias=None, out=None):
        """All ranks' `part` [T, H] float32 gathered, then summed in rank order (+ bias, bf16 out)."""
        from .ops import tensor_parallel as P

        R, H = self.collective.size, self.cfg.hidden_size
        gathered = self.buf.gathered[:R * T * H].reshape(R, T, H)
        self.collective.all_gather(part, gathered)
        return P.reduce_ranks(gathered, out=out, bias=bias, kernels=self.kernels)

    def _tp_out(self, T: int, attn, layer, mark) -> None:
        """buf.o = bf16(sum over ranks of attn_r Wo_r^T + bias): this rank's heads' partial out projection
        in float32, the ranks' partials added in rank order, the bias once, one rounding (R = 1: the same
        bits as the one-GPU GEMM's epilogue)."""
        from .ops import gemm as G

        b = self.buf
        part = G.linear(attn, layer.out_w, None, out=b.part[:T], out_dtype="f32", kernels=self.kernels)
        mark("out gemm (rank)")
        self._gather_reduce(T, part, bias=layer.out_b, out=b.o[:T])
        mark("all-gather + reduce")

    def _tp_moe(self, T: int, t, t32, layer, mark):
        """The MoE outputs of every rank's experts, summed in rank order: [T, H] float32."""
        from .ops import tensor_parallel as P

        b = self.buf
        part = P.moe_partial(t, layer, self.cfg, self.w.first_expert, b.moe, b.local[:T], b.part[:T],
                             router_input=t32, kernels=self.kernels, mark=mark)
        out = self._gather_reduce(T, part, out=b.reduced[:T])
        mark("all-gather + reduce")
        return out

    def profile(self, step: StepBatch) -> dict:
        """Milliseconds per kernel family of one eager step (CUDA events between launches)."""
        run = self._prepare(step)
        prof = Profile()  # after the input copies: the GPU holds while the host queues the step
        run(prof)
        prof.mark("final norm + unembedding")
        self._sample(len(step.logit_rows), True)
        prof.mark("sampling")
        return prof.totals()

    def _head(self, T: int, R: int, gather: bool):
        """Final norm and unembedding of R rows (gathered from x by self.buf.rows when `gather`)."""
        from .ops import embed as E, gemm as G, norm as N

        b, kernels = self.buf, self.kernels
        src = E.gather_rows(b.rows[:R], b.x[:T], out=b.last[:R], kernels=kernels) if gather else b.x[:R]
        N.rmsnorm(src, self.w.final_norm, self.cfg.rms_norm_eps, out=b.last_t[:R], kernels=kernels)
        return G.linear(b.last_t[:R], self.w.unembedding, out=b.logits[:R], out_dtype="f32", kernels=kernels)

    def _sample(self, R: int, greedy: bool, args=None):
        """Next token ids of the R logit rows into buf.ids; args = (temperature, top_p, seed, sequence,
        step) device arrays of R rows, default the step buffers'."""
        from .ops import sampling as S

        b = self.buf
        if greedy:
            return S.argmax(b.logits[:R], out=b.ids[:R], kernels=self.kernels)
        temp, top_p, seed, seqs, steps = args or (b.temperature[:R], b.top_p[:R], b.seeds[:R], b.sequences[:R],
                                                  b.steps[:R])
        return S.sample(b.logits[:R], temp, top_p, seed, seqs, steps, out=b.ids[:R], kernels=self.kernels)

    def _load_inputs(self, step: StepBatch) -> None:
        b = self.buf
        T, R = len(step.tokens), len(step.logit_rows)
        b.tokens[:T].set(step.tokens)
        b.positions[:T].set(step.positions)
        b.slots[:T].set(step.slots)
        b.rows[:R].set(np.asarray(step.logit_rows, np.int32))
        s = step.sampling
        if s is not None:
            b.temperature[:R].set(np.asarray(s.temperature, np.float32))
            b.top_p[:R].set(np.asarray(s.top_p, np.float32))
            b.seeds[:R].set(np.asarray(s.seed, np.uint32))
            b.sequences[:R].set(np.asarray(s.sequence, np.int32))
            b.steps[:R].set(np.asarray(s.step, np.int32))
        self._apply_cache_changes(step)

    def _apply_cache_changes(self, step: StepBatch) -> None:
        """The step's KV moves (StepBatch.swaps, in order) and page-table change, queued before its kernels."""
        for move in step.swaps:
            if move.kind == "out":
                self.swapped[move.key] = self.cache.copy_out(move.slot, move.pages)
            elif move.kind == "in":
                self.cache.copy_in(self.swapped.pop(move.key), move.slot, move.pages)
            else:
                self.swapped.pop(move.key, None)
        self.cache.apply_page_changes(step.page_table, step.page_updates)

    def _check(self, step: StepBatch) -> None:
        T, R = len(step.tokens), len(step.logit_rows)
        if T == 0:
            raise ValueError("a step needs at least one token")
        if T > self.max_step_tokens or R > self.buf.max_rows:
            raise ValueError(f"a step of {T} tokens / {R} logit rows exceeds the planned "
                             f"{self.max_step_tokens} / {self.buf.max_rows}")
        if int(np.max(step.positions)) >= self.capacity:
            raise ValueError(f"position {int(np.max(step.positions))} is past the cache's capacity {self.capacity}")

    def _prepare(self, step: StepBatch):
        """Checks the step and copies its inputs; returns run(prof=None), which queues the layers and
        the head and returns the logits."""
        self._check(step)
        T, R = len(step.tokens), len(step.logit_rows)
        pieces = None
        plan = None if self.cache.window is None else WindowPlan.build(
            step.q_lens, step.seq_slots, step.seq_starts, self.cache.window, PAGE, self.cache.width,
            self.cache.stage_pages, STAGE_GROUP_SEQS)
        if plan is not None:  # prompt chunks: the sliding layers take the rings' and each staged group in turn
            step = self._reordered(step, plan)
            pieces = self._window_pieces(plan)
        self._load_inputs(step)
        batch = self._attention_batch(step.q_lens, step.seq_slots, step.seq_starts)
        identity = R == T and np.array_equal(step.logit_rows, np.arange(T))

        def run(prof: "Profile | None" = None):
            self._layers(T, batch, prof, pieces=pieces)
            return self._head(T, R, gather=not identity) if R else self.buf.logits[:0]
        return run

    def _attention_batch(self, q_lens, slots, starts):
        """An attention launch's layout for these sequences, with the model's decode workspace."""
        from .ops.attention import AttentionBatch

        batch = AttentionBatch.build(q_lens, slots, starts, self.capacity)
        batch._workspace = self._decode_ws
        return batch

    def _window_pieces(self, plan: WindowPlan) -> list:
        """(first token, end token, AttentionBatch, staged) of the sliding layers' launches: the one-token
        sequences on the rings (staged None), then each group of prompt chunks through the staging cache
        (staged: its page table, each token's row of it, and the fill and keep rows, on the device)."""
        import cupy

        pieces = []
        if plan.ring_seqs:
            n = plan.ring_seqs
            pieces.append((0, plan.ring_end, self._attention_batch(plan.q_lens[:n], plan.seq_slots[:n],
                                                                   plan.seq_starts[:n]), None))
        for g in plan.groups:
            rows = range(g.seq_end - g.seq_first)  # the group's sequences are the rows of its page table
            batch = self._attention_batch(plan.q_lens[g.seq_first:g.seq_end], rows,
                                          plan.seq_starts[g.seq_first:g.seq_end])
            staged = _Staged(cupy.asarray(g.table), cupy.asarray(g.token_rows), cupy.asarray(g.fill),
                             cupy.asarray(g.keep))
            pieces.append((g.first, g.end, batch, staged))
        return pieces

    @staticmethod
    def _reordered(step: StepBatch, plan: WindowPlan) -> StepBatch:
        """The step with its tokens in the plan's order and its sequences as the plan lists them, each logit
        row moved with its token (the logits come out in the step's row order all the same)."""
        where = np.empty(len(plan.order), np.int64)
        where[plan.order] = np.arange(len(plan.order))
        return dataclasses.replace(step, tokens=step.tokens[plan.order], positions=step.positions[plan.order],
                                   slots=step.slots[plan.order], q_lens=plan.q_lens, seq_slots=plan.seq_slots,
                                   seq_starts=plan.seq_starts,
                                   logit_rows=where[np.asarray(step.logit_rows, np.int64)].astype(np.int32))

    def forward(self, step: StepBatch):
        """Logits [R, V] float32 (a view of the step buffers, valid until the next step) for
        step.logit_rows, after writing every token's K/V into the cache (R may be 0: a step of prompt
        chunks none of which ends its prompt). Eager launches."""
        return self._prepare(step)()

    def step(self, step: StepBatch, use_graph: bool = True, while_running=None) -> np.ndarray:
        """Run one step and pick the next token of each logit row (step.sampling; None = greedy): host
        int32 [R]. A step of decode tokens only replays a captured CUDA graph (when use_graph, and not
        on AMD). while_running: called once the step is queued, before waiting for it (the wait
        releases the GIL, so other Python threads run while the GPU computes)."""
        greedy = step.sampling is None
        graph_safe = self.collective is None or self.collective.graph_safe
        if use_graph and graph_safe and step.decode_only and not is_amd():
            return self._decode_graph(step, greedy, while_running)
        self.forward(step)
        R = len(step.logit_rows)
        ids = self._sample(R, greedy) if R else None
        return self._fetch(ids, while_running)

    @staticmethod
    def _fetch(ids, while_running):
        """The queued step's ids on the host (None: no rows), after while_running ran."""
        import cupy

        if while_running is not None:
            while_running()
            cupy.cuda.get_current_stream().synchronize()  # (CuPy waits with the GIL released)
        return cupy.asnumpy(ids) if ids is not None else np.zeros(0, np.int32)

    # ---- captured decode steps ----------------------------------------------------------------------
    def _decode_graph(self, step: StepBatch, greedy: bool, while_running=None) -> np.ndarray:
        """Replay the graph of this (padded batch, key bound, greedy or sampled): one host-to-device copy
        of the step's ids, positions and slots (+ the sampler's inputs), one graph launch."""
        import cupy

        from .ops.attention import SEG

        self._check(step)
        B = len(step.tokens)
        Bp = decode_batch_bucket(B)
        kv = min(_pow2_at_least(int(np.max(step.positions)) + 1, SEG), self.capacity)
        key = (Bp, kv, greedy)
        entry = self._graphs.get(key)
        if entry is None:
            entry = self._graphs[key] = self._capture(Bp, kv, greedy)
        graph, inputs = entry[:2]
        host = np.zeros(inputs.shape, np.int32)
        host[0, :B], host[1, :B], host[2, :B] = step.tokens, step.positions, step.slots
        host[2, B:] = self.pad_slot  # padding rows: token 0 at position 0 of the padding slot
        if not greedy:
            s = step.sampling
            host[3, :B], host[4, :B] = s.sequence, s.step
            host[5, :B] = np.asarray(s.seed, np.uint32).view(np.int32)
            host[6, :B] = np.asarray(s.temperature, np.float32).view(np.int32)  # padding rows: 0, greedy
            host[7, :B] = np.asarray(s.top_p, np.float32).view(np.int32)
            host[7, B:] = _ONE_F32_BITS
        inputs.set(host)
        self._apply_cache_changes(step)
        graph.launch(cupy.cuda.get_current_stream())
        return self._fetch(self.buf.ids[:B], while_running)

    def _capture(self, Bp: int, kv: int, greedy: bool):
        """A decode step of Bp rows as a CUDA graph reading its inputs from its own int32 array
        [GREEDY_INPUTS or SAMPLED_INPUTS, Bp], run once eagerly first (on padding rows only) so that
        every kernel is compiled and every workspace exists before the capture."""
        import cupy

        from .ops.attention import AttentionBatch

        inputs = cupy.zeros((GREEDY_INPUTS if greedy else SAMPLED_INPUTS, Bp), dtype=cupy.int32)
        inputs[2] = self.pad_slot
        i32 = cupy.int32
        # one query per sequence: the attention layout is fixed but for the slots and positions, which
        # the batch reads straight from the graph's inputs
        batch = AttentionBatch(cupy.arange(Bp + 1, dtype=i32), inputs[2], inputs[1], cupy.zeros((0, 2), i32),
                               cupy.arange(Bp, dtype=i32), Bp, Bp, 1, kv, self.capacity)
        batch._workspace = self._decode_ws
        args = None
        if not greedy:  # the sampler reads its per-row inputs from the graph's inputs too
            inputs[7] = _ONE_F32_BITS
            args = (inputs[6].view(cupy.float32), inputs[7].view(cupy.float32), inputs[5].view(cupy.uint32),
                    inputs[3], inputs[4])

        def run():
            self._layers(Bp, batch, inputs=(inputs[0], inputs[1], inputs[2]))
            self._head(Bp, Bp, gather=False)
            self._sample(Bp, greedy, args)

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


@dataclasses.dataclass
class _Staged:
    """A staged group's device arrays (gptoss.batch.StageGroup)."""
    table: object  # cupy int32 [sequences, width]
    rows: object  # cupy int32 [tokens]
    fill: object  # cupy int32 [2, n]
    keep: object  # cupy int32 [2, n]


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
