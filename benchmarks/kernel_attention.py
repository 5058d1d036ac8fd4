#!/usr/bin/env python3
"""Speed of the attention kernels on the gpt-oss geometry (Hq 64, Hkv 8, D 64), full and sliding (128).

  python benchmarks/kernel_attention.py [--json OUT] [--decode-sweep 2048:1024,1025,1280,2049]
                                       [--kv-cache-dtype fp8]

- prefill (tensor-core flash kernel): T = 512, 2048, 8192 query tokens, as one sequence from position 0
  and as many sequences of 256; TFLOP/s counts 4 * D * Hq flops per visible (query, key) pair
  (causal and window aware, no credit for masked work).
- decode (split-KV kernel + combine): batch 1, 64, 1024 at contexts 1024 and 4096 (full attention also paged:
  scrambled 64-position pages behind a page table, as the model keeps them); GB/s counts the K and
  V bytes of the visible keys (2 KB per key per layer in bf16), the floor of what decode must read.
- rope_and_cache at the prefill and decode sizes: GB/s of qkv read + q, k, v written.
Cache contents are random bf16 (speed does not depend on them), or with --kv-cache-dtype fp8 random e4m3
codes (the *_fp8 kernels; GB/s then counts 1 KB per key per layer).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common  # noqa: E402
from gptoss.ops.attention import KV_DTYPES  # noqa: E402

HQ, HKV, D, WINDOW = 64, 8, 64, 128


def _rand_bf16(shape):
    """Random bf16 bits (normal values, truncated from f32)."""
    import cupy as cp

    x = cp.random.standard_normal(shape, dtype=cp.float32)
    return (x.view(cp.uint32) >> 16).astype(cp.uint16)


def _rand_e4m3(shape):
    """Random finite e4m3 codes (any sign, never the NaN code 0x7f)."""
    import cupy as cp

    return (cp.random.randint(0, 0x7F, shape, dtype=cp.int32) | (cp.random.randint(0, 2, shape) << 7)).astype(cp.uint8)


def _caches(slots: int, L: int, fp8: bool = False):
    """K, V caches [slots, L, Hkv, D] (bf16, or e4m3 codes when fp8), every slot holding the same random
    rows (cheap to fill)."""
    import cupy as cp

    kc = cp.empty((slots, L, HKV, D), dtype=cp.uint8 if fp8 else cp.uint16)
    vc = cp.empty_like(kc)
    rand = _rand_e4m3 if fp8 else _rand_bf16
    kc[...] = rand((1, L, HKV, D))
    vc[...] = rand((1, L, HKV, D))
    return kc, vc


def _visible(positions, window: int) -> int:
    """Visible (query, key) pairs of queries at these positions."""
    import numpy as np

    p = np.asarray(positions, dtype=np.int64) + 1
    return int(np.minimum(p, window).sum() if window else p.sum())


def _free():
    import cupy as cp

    cp.get_default_memory_pool().free_all_blocks()


def _prefill_row(time_ms, sinks, T: int, seq_len: int, window: int, fp8: bool = False) -> dict:
    import cupy as cp
    import numpy as np

    from gptoss.ops import attention as A

    n_seq = T // seq_len
    kc, vc = _caches(n_seq, seq_len, fp8)
    q = _rand_bf16((T, HQ, D))
    out = cp.empty((T, HQ * D), dtype=cp.uint16)
    batch = A.AttentionBatch.build([seq_len] * n_seq, list(range(n_seq)), [0] * n_seq, seq_len)
    ms = time_ms(lambda: A.attention(q, kc, vc, batch, sinks, window, out=out))
    flops = 4.0 * D * HQ * n_seq * _visible(np.arange(seq_len), window)
    return dict(common.row("attn_prefill", f"T={T} seqs={n_seq}x{seq_len} window={window}", ms, flops=flops),
                bound="compute")


def _decode_row(time_ms, sinks, B: int, ctx: int, window: int, paged: bool = False, fp8: bool = False) -> dict:
    """B sequences, one query each at position ctx - 1; sliding layers keep a ring of window + 1.
    paged: the full layer's cache as 64-position pages in scrambled order behind a page table (as
    the model keeps it)."""
    import cupy as cp

    from gptoss.ops import attention as A

    kc, vc = _caches(B, ctx if window == 0 else window + 1, fp8)
    table = None
    if paged:
        pages = B * ctx // 64
        kc, vc = kc.reshape(pages, 64, HKV, D), vc.reshape(pages, 64, HKV, D)
        table = cp.random.permutation(pages).astype(cp.int32).reshape(B, ctx // 64)
    q = _rand_bf16((B, HQ, D))
    out = cp.empty((B, HQ * D), dtype=cp.uint16)
    batch = A.AttentionBatch.build([1] * B, list(range(B)), [ctx - 1] * B, ctx)
    ms = time_ms(lambda: A.attention(q, kc, vc, batch, sinks, window, out=out, page_table=table))
    kv_bytes = B * min(ctx, window or ctx) * HKV * D * 2 * kc.itemsize
    name = "attn_decode_paged" if paged else "attn_decode"
    return dict(common.row(name, f"B={B} ctx={ctx} window={window}", ms, bytes_moved=kv_bytes), bound="memory")


def _rope_row(time_ms, table, T: int, fp8: bool = False) -> dict:
    import cupy as cp

    from gptoss.ops import attention as A

    qkv = _rand_bf16((T, (HQ + 2 * HKV) * D))
    kc, vc = _caches(1, table.shape[0], fp8)
    pos = cp.arange(T, dtype=cp.int32)
    slots = cp.zeros(T, dtype=cp.int32)
    q = cp.empty((T, HQ, D), dtype=cp.uint16)
    ms = time_ms(lambda: A.rope_and_cache(qkv, pos, slots, table, kc, vc, q_out=q))
    return dict(common.row("rope_and_cache", f"T={T}", ms, bytes_moved=2.0 * qkv.nbytes), bound="memory")


def decode_sweep(time_ms, sinks, B: int, keys_list, fp8: bool = False) -> list[dict]:
    """One full-attention decode layer at batch B for each key count (every sequence alike), then with
    ragged contexts (uniform 64..2,047 keys, seed 0, the shape of getp's decode steps)."""
    import cupy as cp
    import numpy as np

    from gptoss.ops import attention as A

    L = max(max(keys_list), 2048) + 64
    kc, vc = _caches(B, L, fp8)
    q = _rand_bf16((B, HQ, D))
    out = cp.empty((B, HQ * D), dtype=cp.uint16)
    cases = [(f"B={B} keys={k}", [k - 1] * B) for k in keys_list]
    ragged = np.random.default_rng(0).integers(64, 2048, B)
    cases.append((f"B={B} keys=U(64,2047)", (ragged - 1).tolist()))
    rows = []
    for shape, pos in cases:
        batch = A.AttentionBatch.build([1] * B, list(range(B)), pos, L, max_kv=None)
        ms = time_ms(lambda: A.attention(q, kc, vc, batch, sinks, 0, out=out))
        kv_bytes = (np.asarray(pos) + 1).sum() * HKV * D * 2 * kc.itemsize
        rows.append(dict(common.row("attn_decode", shape, ms, bytes_moved=kv_bytes), bound="memory"))
    return rows


def prefill_kernels(time_ms, sinks, T: int, starts) -> list[dict]:
    """A chunk of T queries of one sequence at each start position (keys 0.. its last query, full
    attention), through every G = 8 prefill kernel this device runs: the mma.sync kernel, and on sm_90a the
    wgmma ones (ops.attention.PREFILL_WGMMA_KERNEL's choices). Also says whether their outputs agree bit
    for bit."""
    import cupy as cp
    import numpy as np

    from gptoss.kernels import default_kernels
    from gptoss.ops import attention as A

    variants = [("mma_sync", None)]
    if default_kernels().sm90a("attention"):
        variants += [("auto", "attn_prefill_wgs_g8"), ("auto", "attn_prefill_wg_g8")]
    chosen, rows = A.PREFILL_WGMMA_KERNEL, []
    try:
        for start in starts:
            L = -(-(start + T) // 64) * 64
            kc, vc = _caches(1, L)
            q = _rand_bf16((T, HQ, D))
            batch = A.AttentionBatch.build([T], [0], [start], L)
            flops = 4.0 * D * HQ * _visible(np.arange(start, start + T), 0)
            outs = []
            for path, name in variants:
                A.PREFILL_WGMMA_KERNEL = name or chosen
                out = cp.empty((T, HQ * D), dtype=cp.uint16)
                ms = time_ms(lambda: A.attention(q, kc, vc, batch, sinks, 0, out=out, path=path))
                outs.append(out)
                label = name or "attn_prefill_g8"
                rows.append(dict(common.row(label, f"T={T} at {start}", ms, flops=flops), bound="compute"))
            same = all(bool(cp.array_equal(outs[0], o)) for o in outs[1:])
            rows[-1]["shape"] += " (bits equal)" if same else " (BITS DIFFER)"
            del kc, vc
            _free()
    finally:
        A.PREFILL_WGMMA_KERNEL = chosen
    return rows


def bench(time_ms=common.time_ms, fp8: bool = False) -> list[dict]:
    import cupy as cp

    from gptoss.config import GPT_OSS_20B
    from gptoss.ops import attention as A

    rows = []
    sinks = cp.random.standard_normal(HQ, dtype=cp.float32) * 0.5
    for T in (512, 2048, 8192):
        for seq_len in (T, 256):
            for window in (0, WINDOW):
                rows.append(_prefill_row(time_ms, sinks, T, seq_len, window, fp8))
                _free()
    for ctx in (1024, 4096):
        for B in (1, 64, 1024):
            for window in (0, WINDOW):
                rows.append(_decode_row(time_ms, sinks, B, ctx, window, fp8=fp8))
                _free()
            if B > 1:
                rows.append(_decode_row(time_ms, sinks, B, ctx, 0, paged=True, fp8=fp8))
                _free()
    table = A.rope_table(GPT_OSS_20B, 8192)
    for T in (64, 1024, 8192):
        rows.append(_rope_row(time_ms, table, T, fp8))
        _free()
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_json_option(p, "the rows")
    p.add_argument("--decode-sweep", default=None, metavar="B:KEYS,KEYS,...",
                   help="only time full-attention decode at batch B for these key counts (and ragged "
                        "contexts), e.g. 2048:1024,1025,1280,2049")
    p.add_argument("--prefill-kernels", default=None, metavar="T:START,START,...",
                   help="only time a T-query prefill chunk at each start position through every prefill "
                        "kernel of the device (mma.sync, wgmma), e.g. 4096:0,28672,114688")
    p.add_argument("--kv-cache-dtype", choices=KV_DTYPES, default="bf16",
                   help="the caches' element format (fp8: e4m3, the *_fp8 kernels; default bf16)")
    args = p.parse_args(argv)
    if (code := common.json_path_error("kernel_attention.py", args)) is not None:
        return code
    import cupy as cp

    name = cp.cuda.runtime.getDeviceProperties(cp.cuda.runtime.getDevice())["name"].decode()
    fp8 = args.kv_cache_dtype == "fp8"
    if args.prefill_kernels:
        T, _, starts = args.prefill_kernels.partition(":")
        sinks = cp.random.standard_normal(HQ, dtype=cp.float32) * 0.5
        rows = prefill_kernels(common.time_ms, sinks, int(T), [int(a) for a in starts.split(",") if a])
    elif args.decode_sweep:
        batch, _, keys = args.decode_sweep.partition(":")
        sinks = cp.random.standard_normal(HQ, dtype=cp.float32) * 0.5
        rows = decode_sweep(common.time_ms, sinks, int(batch), [int(k) for k in keys.split(",") if k], fp8)
    else:
        rows = bench(fp8=fp8)
    print(f"{args.kv_cache_dtype} KV cache")
    print(f"{name}: peak {common.H100_COPY_GBPS:.0f} GB/s, {common.H100_BF16_TFLOPS:.0f} TFLOP/s (H100 reference)")
    print(f"{'kernel':<16} {'shape':<36} {'ms':>9} {'TFLOP/s':>8} {'GB/s':>8}")
    for r in rows:
        print(f"{r['name']:<16} {r['shape']:<36} {r['ms']:9.4f} {r['tflops']:8.1f} {r['gbps']:8.0f}")
    if args.json:
        common.write_json(args.json, {"device": name, "rows": rows})
    return 0


if __name__ == "__main__":
    from gptoss.cli import run_main

    sys.exit(run_main("kernel_attention.py", main))
