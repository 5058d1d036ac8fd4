"""RoPE + KV-cache write, and attention with sinks, GQA and a sliding window (kernels/attention.hip).

    table = rope_table(cfg, capacity)                        # once: (cos, sin) x concentration, f32
    batch = AttentionBatch.build(q_lens, slots, starts, capacity)   # every step, from host lists
    q = rope_and_cache(qkv, positions, slots, table, k_cache, v_cache)
    out = attention(q, k_cache, v_cache, batch, sinks, window)       # window 0 = full attention

A cache is [blocks, L, Hkv, D] bf16 (uint16 bits) or FP8 (uint8: OCP e4m3 codes, scale 1; the kernels take
their *_fp8 variants when the caches are uint8, so callers pass either alike). Without a page table, block s is slot s's cache and position p sits
at row p % L (a ring when L is shorter than the sequence: the sliding layers). With page_table
[slots, W] int32 (L a multiple of TILE), position p of slot s sits in block page_table[s, p // L] at
row p % L: a sequence holds only the pages it reaches (the full layers; KVCache in model.py).

Kernels (D = 64 and Hq / Hkv in {4, 8} on NVIDIA; a launch may use both):
- decode, for the sequences with one query: the keys of each are split at fixed multiples of
  SEG = 256 positions, one warp per (kv head, sequence, split), fp32 partials in a workspace kept on
  the batch, then a combine kernel;
- prefill, for the sequences with more queries: one CTA per (16 queries of one sequence, kv head),
  flash style on tensor cores.
Other shapes (any even D <= 128, any GQA ratio), AMD and the portable mode (KernelOptions.portable) take
the portable kernel: one CTA per (query, head), slow. The decode and prefill kernels give a query
bit-identical outputs (see the comment at the top of attention.hip), so a query's result never depends
on the batch it runs in, on how its prompt was cut into chunks, or on whether it ran as a decode token or
inside a chunk.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from ..kernels import WGMMA_SMEM_SLACK, KernelOptions, define, kernel, macro_rows, resolved
from ._check import check, out_or_new

SEG = define("attention", "ATTN_SEG")  # keys per decode split: fixed absolute cut points
TILE = define("attention", "ATTN_TILE")  # keys per tile
BLOCK_Q = define("attention", "ATTN_BLOCK_Q")  # queries per prefill CTA
PREFILL_STAGES = define("attention", "ATTN_PREFILL_STAGES")  # K/V tile buffers of attn_prefill_g{G}
# K/V tile buffers of attn_decode_g{G}, from its ATTN_DECODE_KERNEL(name, G, STAGES) line (and of the fp8
# variant attn_decode_g{G}_fp8, from ATTN_DECODE_FP8_KERNEL)
DECODE_STAGES = {int(g): int(stages) for _, g, stages in macro_rows("attention", "ATTN_DECODE_KERNEL")}
DECODE_STAGES_FP8 = {int(g): int(stages) for _, g, stages in macro_rows("attention", "ATTN_DECODE_FP8_KERNEL")}
FAST_GROUPS = tuple(sorted(DECODE_STAGES))  # Hq / Hkv ratios with tensor-core kernels (prefill and decode)
FAST_HEAD_DIM = 64  # the head dim the tensor-core kernels are written for (their 64-wide K/V/Q rows)
# decode partials per (sequence, split, head): the unnormalised output [D], then (m, l)
DECODE_PARTIAL_FLOATS = FAST_HEAD_DIM + 2


def _stages_smem(stages: int, fp8: bool) -> int:
    """K/V tile stages (fp8: half the bytes each, plus the one converted bf16 tile pair)."""
    tile_pair = 2 * TILE * FAST_HEAD_DIM * 2
    return stages * tile_pair // 2 + tile_pair if fp8 else stages * tile_pair


def _prefill_smem(G: int, fp8: bool = False) -> int:  # + per warp: Q rows (2 KB), running state (36 x 32 f32)
    return _stages_smem(PREFILL_STAGES, fp8) + G * (16 * FAST_HEAD_DIM * 2 + 36 * 32 * 4)


def _decode_smem(stages: int, fp8: bool = False) -> int:  # + the Q rows of one warp (16 x D bf16)
    return _stages_smem(stages, fp8) + 16 * FAST_HEAD_DIM * 2


# The prefill kernel on sm_90a (KernelOptions.sm90a("attention")) for G = 8 and a bf16 cache: the same CTA
# with Q K^T and P V on wgmma ("attn_prefill_wgs_g8": Q K^T only); bit-identical to attn_prefill_g8.
PREFILL_WGMMA_KERNEL = "attn_prefill_wg_g8"


def prefill_kernel(G: int, kernels: KernelOptions, path: str = "auto", fp8: bool = False) -> tuple[str, int]:
    """(name, dynamic shared memory) of the prefill kernel for G q heads per kv head and the cache's format;
    path "mma_sync" keeps the mma.sync kernel where the wgmma one would run."""
    if fp8:
        return f"attn_prefill_g{G}_fp8", _prefill_smem(G, True)
    if G == 8 and path == "auto" and kernels.sm90a("attention"):
        return PREFILL_WGMMA_KERNEL, _prefill_smem(G) + WGMMA_SMEM_SLACK
    return f"attn_prefill_g{G}", _prefill_smem(G)


KV_DTYPES = ("bf16", "fp8")  # cache element formats: bf16 bits (uint16), OCP e4m3 codes (uint8)


def kv_numpy_dtype(kv_dtype: str):
    """The array dtype of a cache of `kv_dtype` ("bf16": uint16, "fp8": uint8)."""
    if kv_dtype not in KV_DTYPES:
        raise ValueError(f"KV cache dtype: expected one of {', '.join(KV_DTYPES)}, got {kv_dtype!r}")
    return np.dtype(np.uint16 if kv_dtype == "bf16" else np.uint8)


def _check_caches(k_cache, v_cache) -> bool:
    """Both caches 4-D, of one shape and one dtype, uint16 (bf16) or uint8 (fp8); True for fp8."""
    import cupy

    dtype = getattr(k_cache, "dtype", None)
    check(k_cache, "k_cache", cupy.uint8 if dtype == cupy.uint8 else cupy.uint16, ndim=4)
    check(v_cache, "v_cache", k_cache.dtype, tuple(k_cache.shape))
    return k_cache.dtype == cupy.uint8


def rope_table(cfg, max_positions: int):
    """cupy float32 [max_positions, D/2, 2]: (cos, sin) of position x inv_freq_i, times the YaRN
    concentration; computed in float64 on the host."""
    import cupy

    from ..config import yarn_inv_freq_and_scale

    if max_positions <= 0:
        raise ValueError(f"max_positions must be positive, got {max_positions}")
    inv_freq, concentration = yarn_inv_freq_and_scale(cfg)
    angle = np.arange(max_positions, dtype=np.float64)[:, None] * np.asarray(inv_freq, np.float64)[None, :]
    table = np.stack([np.cos(angle) * concentration, np.sin(angle) * concentration], axis=-1)
    return cupy.asarray(table.astype(np.float32))


def _check_page_table(page_table, L: int) -> tuple:
    """(the table or a dummy pointer, rows, width) for the kernels; width 0 = no page table."""
    import cupy

    if page_table is None:
        return np.intp(0), np.int32(0), np.int32(0)
    check(page_table, "page_table", cupy.int32, ndim=2)
    if L % TILE:
        raise ValueError(f"a paged cache needs pages of a multiple of {TILE} positions, got {L}")
    rows, width = page_table.shape
    if width == 0:
        raise ValueError("page_table has no columns")
    return page_table, np.int32(rows), np.int32(width)


def rope_and_cache(qkv, positions, slots, table, k_cache, v_cache, q_out=None, page_table=None,
                   kernels: KernelOptions | None = None):
    """RoPE on q and k of qkv [T, (Hq + 2 Hkv) D] bf16; k and v go to the caches [blocks, L, Hkv, D]
    at the row of (slots[t], positions[t]) (see the module's docstring), bf16 or, into uint8 caches,
    e4m3 (k rounded from its fp32 value, v from its bf16 one); returns q [T, Hq, D] bf16
    (written into q_out when given). A position outside the table, a slot outside the cache (or the
    page table) or a page outside the cache gives that token NaN q and no cache write. kernels: the
    kernel choices (default kernels.default_kernels()): which build of the family runs."""
    import cupy

    fp8 = _check_caches(k_cache, v_cache)
    n_slots, L, Hkv, D = k_cache.shape
    pt, pt_rows, pt_w = _check_page_table(page_table, L)
    check(qkv, "qkv", cupy.uint16, ndim=2)
    T, width = qkv.shape
    if D % 2 or width % D or width // D <= 2 * Hkv:
        raise ValueError(f"qkv: width {width} is not (Hq + 2*{Hkv}) * {D} for a positive Hq")
    Hq = width // D - 2 * Hkv
    if Hq % Hkv:
        raise ValueError(f"qkv: {Hq} q heads is not a multiple of the caches' {Hkv} kv heads")
    check(positions, "positions", cupy.int32, (T,))
    check(slots, "slots", cupy.int32, (T,))
    check(table, "table", cupy.float32, (None, D // 2, 2))
    q = out_or_new(q_out, "q_out", (T, Hq, D), cupy.uint16)
    if T == 0:
        return q
    pairs = (Hq + 2 * Hkv) * D // 2
    per_token = max(1, min(-(-pairs // 256), 1024 // T))  # CTAs per token: spread small steps
    kernel("attention", "rope_and_cache_fp8" if fp8 else "rope_and_cache", kernels=resolved(kernels))(
        (T, per_token), (256,),
        (qkv, positions, slots, table, q, k_cache, v_cache, np.int32(Hq), np.int32(Hkv), np.int32(D),
         np.int32(L), np.int32(table.shape[0]), np.int32(n_slots), pt, pt_rows, pt_w))
    return q


def copy_kv_rows(k_src, v_src, k_dst, v_dst, rows, kernels: KernelOptions | None = None) -> None:
    """k_dst[rows[1]] = k_src[rows[0]] and the same for V, for caches [blocks, L, Hkv, D] seen as
    [blocks * L, Hkv, D] rows; rows [2, n] int32 (source row, destination row). The four caches share
    one dtype (bf16 bits or e4m3 codes) and a row's shape; the bits are copied. A pair with a row outside
    its cache copies nothing."""
    import cupy

    fp8 = _check_caches(k_src, v_src)
    if _check_caches(k_dst, v_dst) != fp8 or k_src.shape[2:] != k_dst.shape[2:]:
        raise ValueError(f"copy_kv_rows: caches of {k_src.dtype} rows {k_src.shape[2:]} into "
                         f"{k_dst.dtype} rows {k_dst.shape[2:]}")
    check(rows, "rows", cupy.int32, ndim=2)
    n = rows.shape[1]
    if rows.shape[0] != 2:
        raise ValueError(f"rows must be [2, n] (source, destination), got {tuple(rows.shape)}")
    if n == 0:
        return
    units = k_src.shape[2] * k_src.shape[3] * k_src.itemsize // 2
    kernel("attention", "copy_kv_rows", kernels=resolved(kernels))(
        (n, 2), (128,), (k_src, v_src, k_dst, v_dst, rows, np.int32(n), np.int32(units),
                         np.int32(k_src.shape[0] * k_src.shape[1]), np.int32(k_dst.shape[0] * k_dst.shape[1])))


@dataclass
class AttentionBatch:
    """The varlen layout of one attention launch, on the device, with its host-known bounds.

    Queries of a sequence are contiguous in T. Query t of sequence s sits at position
    seq_start_pos[s] + t - cu_q[s] and sees keys up to its own position. Build it from host lists with
    AttentionBatch.build; for a captured CUDA graph, build one with max_kv set to a bound that covers
    the replays (the grid depends on it, never the results), run attention() once before capturing
    (it allocates the decode workspace), and refresh the device arrays in place with load()."""
    cu_q: object  # cupy int32 [S + 1]: query offsets
    seq_slot: object  # cupy int32 [S]: cache slot of each sequence
    seq_start_pos: object  # cupy int32 [S]: position of each sequence's first query
    blocks: object  # cupy int32 [NB, 2]: (sequence, first query index in it) of each prefill CTA
    dec_seqs: object  # cupy int32 [SD]: the sequences with one query (the decode kernel's)
    num_seqs: int  # S
    num_tokens: int  # T
    max_q: int  # most queries of one sequence
    max_kv: int  # a bound on keys per sequence (last position + 1)
    capacity: int
    _workspace: object = field(default=None, repr=False)

    @property
    def num_blocks(self) -> int:
        return int(self.blocks.shape[0])

    @property
    def num_decode(self) -> int:
        return int(self.dec_seqs.shape[0])

    @classmethod
    def build(cls, q_lens, slots, start_positions, capacity: int, max_kv: int | None = None) -> "AttentionBatch":
        import cupy

        q_lens = np.asarray(q_lens, dtype=np.int64).reshape(-1)
        slots = np.asarray(slots, dtype=np.int64).reshape(-1)
        starts = np.asarray(start_positions, dtype=np.int64).reshape(-1)
        S = len(q_lens)
        if S == 0:
            raise ValueError("AttentionBatch needs at least one sequence")
        if len(slots) != S or len(starts) != S:
            raise ValueError(f"q_lens, slots and start_positions differ in length ({S}, {len(slots)}, {len(starts)})")
        if (q_lens < 1).any():
            raise ValueError("every sequence needs at least one query")
        if (starts < 0).any() or (slots < 0).any():
            raise ValueError("negative start position or slot")
        ends = starts + q_lens
        if ends.max() > capacity:
            raise ValueError(f"a sequence reaches position {int(ends.max()) - 1}, past the capacity {capacity}")
        bound = int(ends.max())
        if max_kv is not None:
            if max_kv < bound:
                raise ValueError(f"max_kv {max_kv} is below the batch's {bound} keys")
            bound = int(max_kv)
        cu_q = np.zeros(S + 1, dtype=np.int32)
        cu_q[1:] = np.cumsum(q_lens)
        # prefill blocks of BLOCK_Q queries for the sequences with more than one query, the ones that end
        # furthest into their sequence first (they have the most keys to read: the long CTAs start early)
        single = q_lens == 1
        nblk = np.where(single, 0, (q_lens + BLOCK_Q - 1) // BLOCK_Q)
        seq = np.repeat(np.arange(S), nblk)
        first = np.arange(int(nblk.sum())) - np.repeat(np.cumsum(nblk) - nblk, nblk)
        first = first * BLOCK_Q
        last_pos = starts[seq] + np.minimum(first + BLOCK_Q, q_lens[seq]) - 1
        order = np.argsort(-last_pos, kind="stable")
        blocks = np.stack([seq[order], first[order]], axis=1).astype(np.int32).reshape(-1, 2)
        # the one-query sequences, longest first: the decode grid walks (kv head, sequence) within a split,
        # so the CTAs of a split that have keys to read come first and neighbours read alike
        dec_seqs = np.flatnonzero(single)
        dec_seqs = dec_seqs[np.argsort(-starts[dec_seqs], kind="stable")].astype(np.int32)
        return cls(cupy.asarray(cu_q), cupy.asarray(slots.astype(np.int32)), cupy.asarray(starts.astype(np.int32)),
                   cupy.asarray(blocks), cupy.asarray(dec_seqs), S, int(cu_q[-1]), int(q_lens.max()), bound,
                   int(capacity))

    def load(self, other: "AttentionBatch") -> None:
        """Copy other's device arrays into this batch's (for CUDA graph replay): same S, T, block count,
        decode count and max_q; other's keys must fit this batch's max_kv."""
        mine, theirs = self._shape(), other._shape()
        if theirs != mine:
            raise ValueError(f"load: the batches differ in (S, T, blocks, decode, max_q): {theirs} vs {mine}")
        if other.max_kv > self.max_kv:
            raise ValueError(f"load: {other.max_kv} keys exceed this batch's bound {self.max_kv}")
        for name in ("cu_q", "seq_slot", "seq_start_pos", "blocks", "dec_seqs"):
            getattr(self, name)[...] = getattr(other, name)

    def _shape(self) -> tuple:
        return (self.num_seqs, self.num_tokens, self.num_blocks, self.num_decode, self.max_q)

    def workspace(self, n_floats: int):
        """A float32 scratch buffer of at least n_floats kept with the batch (decode partials)."""
        import cupy

        if self._workspace is None or self._workspace.size < n_floats:
            self._workspace = cupy.empty(n_floats, dtype=cupy.float32)
        return self._workspace


def decode_splits(max_kv: int, window: int) -> int:
    """Splits (grid z) of the decode kernel: segments of SEG keys a query can touch."""
    n = (max_kv + SEG - 1) // SEG
    if window > 0:
        n = min(n, (window - 1 + SEG - 1) // SEG + 1)
    return max(n, 1)


def decode_workspace_floats(num_decode: int, max_kv: int, num_heads: int, window: int = 0) -> int:
    """Float32s of the decode partials of num_decode one-query sequences of up to max_kv keys
    (AttentionBatch.workspace): DECODE_PARTIAL_FLOATS per (sequence, split, head)."""
    return num_decode * decode_splits(max_kv, window) * num_heads * DECODE_PARTIAL_FLOATS


def attention(q, k_cache, v_cache, batch: AttentionBatch, sinks, window: int, out=None, path: str = "auto",
              page_table=None, kernels: KernelOptions | None = None):
    """out [T, Hq*D] bf16: softmax(q k^T / sqrt(D) over the visible keys and the head's sink) v.

    q [T, Hq, D] bf16 (after RoPE); caches [blocks, L, Hkv, D] bf16, or uint8 e4m3 (the *_fp8 kernels),
    with an optional page table (see the module's docstring); sinks [Hq] f32; window 0 = full attention, else a query at p sees keys
    p - window + 1 .. p.
    path: "auto" (fastest kernel for the shapes), "simple" to force the portable kernel, or "mma_sync" for
    the tensor-core kernels without wgmma (the same bits as "auto").
    kernels: the kernel choices (default kernels.default_kernels()); the portable mode always runs the
    portable kernel."""
    import cupy

    check(q, "q", cupy.uint16, ndim=3)
    T, Hq, D = q.shape
    fp8 = _check_caches(k_cache, v_cache)
    suffix = "_fp8" if fp8 else ""
    n_slots, L, Hkv, Dk = k_cache.shape
    check(sinks, "sinks", cupy.float32, (Hq,))
    if Dk != D:
        raise ValueError(f"q has head dim {D}, the caches {Dk}")
    if D % 2 or D > 128:
        raise ValueError(f"head dim {D} unsupported (even, at most 128)")
    if Hq % Hkv:
        raise ValueError(f"{Hq} q heads is not a multiple of {Hkv} kv heads")
    if T != batch.num_tokens:
        raise ValueError(f"q has {T} tokens, the batch {batch.num_tokens}")
    window = int(window)
    if window < 0:
        raise ValueError(f"window must be >= 0, got {window}")
    pt, _, pt_w = _check_page_table(page_table, L)
    reach = L * max(int(pt_w), 1)  # positions one sequence's cache can hold
    if batch.max_kv > reach and not (window > 0 and page_table is None and batch.max_q + window - 1 <= L):
        raise ValueError(f"caches of {reach} positions cannot hold the {batch.max_kv} keys of this batch"
                         + (f" (a ring needs window + max queries - 1 = {window + batch.max_q - 1})"
                            if window > 0 else ""))
    if path not in ("auto", "simple", "mma_sync"):
        raise ValueError(f"path must be 'auto', 'simple' or 'mma_sync', got {path!r}")
    out = out_or_new(out, "out", (T, Hq * D), cupy.uint16)
    if T == 0:
        return out
    G = Hq // Hkv
    scale_log2 = np.float32(math.log2(math.e) / math.sqrt(D))
    opts = resolved(kernels)
    fast = path != "simple" and D == FAST_HEAD_DIM and G in FAST_GROUPS and not opts.portable
    if not fast:
        kernel("attention", "attn_simple" + suffix, kernels=opts)(
            (T, Hq), (128,),
            (q, k_cache, v_cache, sinks, batch.cu_q, batch.seq_slot, batch.seq_start_pos, out,
             np.int32(batch.num_seqs), np.int32(Hq), np.int32(Hkv), np.int32(D), np.int32(L),
             np.int32(window), scale_log2, pt, pt_w))
        return out
    SD = batch.num_decode
    if SD:  # the one-query sequences: split over the keys, then combine
        if SD > 65535:
            raise ValueError(f"{SD} one-query sequences exceed the decode grid's limit of 65535")
        nsplit = decode_splits(batch.max_kv, window)
        rows = SD * nsplit * Hq  # part_acc [rows, D], then part_ml [rows, 2]
        ws = batch.workspace(decode_workspace_floats(SD, batch.max_kv, Hq, window))
        part_acc, part_ml = ws[:rows * D], ws[rows * D:rows * DECODE_PARTIAL_FLOATS]
        stages = (DECODE_STAGES_FP8 if fp8 else DECODE_STAGES)[G]
        kernel("attention", f"attn_decode_g{G}{suffix}", smem=_decode_smem(stages, fp8), kernels=opts)(
            (Hkv, SD, nsplit), (32,),
            (q, k_cache, v_cache, batch.cu_q, batch.seq_slot, batch.seq_start_pos, batch.dec_seqs, part_acc,
             part_ml, np.int32(Hq), np.int32(Hkv), np.int32(L), np.int32(window), np.int32(nsplit), scale_log2,
             pt, pt_w))
        kernel("attention", "attn_decode_combine", kernels=opts)(
            ((SD * Hq * 32 + 255) // 256,), (256,),
            (part_acc, part_ml, sinks, batch.cu_q, batch.seq_start_pos, batch.dec_seqs, out, np.int32(SD),
             np.int32(Hq), np.int32(window), np.int32(nsplit)))
    if batch.num_blocks:  # the longer sequences: flash-style prefill
        name, smem = prefill_kernel(G, opts, path, fp8)
        kernel("attention", name, smem=smem, kernels=opts)(
            (batch.num_blocks, Hkv), (32 * G,),
            (q, k_cache, v_cache, sinks, batch.cu_q, batch.seq_slot, batch.seq_start_pos, batch.blocks, out,
             np.int32(Hq), np.int32(Hkv), np.int32(L), np.int32(window), scale_log2, pt, pt_w))
    return out
