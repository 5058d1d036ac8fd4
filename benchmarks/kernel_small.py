"""The small kernels for benchmarks/bench_kernels.py: embed, rmsnorm, add_rmsnorm, argmax and sample at
gpt-oss shapes (H = 2880, V = 201088). All are memory-bound; GB/s counts the bytes each must move at least
(for sample: one read of the logits, though top-p needs several passes over a row)."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import row  # noqa: E402

H, V = 2880, 201088
TOKENS = (1, 64, 4096)
BATCHES = (1, 64, 1024, 8192)
MEMORY = {"bound": "memory"}


def random_bf16(rs, shape):
    import cupy

    return (rs.standard_normal(shape, dtype=cupy.float32).view(cupy.uint32) >> 16).astype(cupy.uint16)


def lm_logits(B: int, seed: int = 0):
    """Logits shaped like a language model's: Gaussian with spread 2.5 and a few tokens standing out."""
    import cupy

    rs = cupy.random.RandomState(seed)
    logits = rs.standard_normal((B, V), dtype=cupy.float32)
    logits *= 2.5
    top = rs.randint(0, V, (B, 8))
    logits[cupy.arange(B)[:, None], top] += rs.uniform(2.0, 8.0, (B, 8), dtype=cupy.float32)
    return logits


def bench_embed_norm(time_ms, T: int, table, scale, rs) -> list[dict]:
    import cupy

    from gptoss.ops.embed import embed
    from gptoss.ops.norm import add_rmsnorm, rmsnorm

    tokens = rs.randint(0, V, T).astype(cupy.int32)
    x = cupy.empty((T, H), dtype=cupy.float32)
    t = cupy.empty((T, H), dtype=cupy.uint16)
    delta = random_bf16(rs, (T, H))
    shape = f"T={T} H={H}"
    return [
        row("embed", shape, time_ms(lambda: embed(tokens, table, out=x)),
            bytes_moved=T * H * (2 + 4) + T * 4) | MEMORY,
        row("rmsnorm", shape, time_ms(lambda: rmsnorm(x, scale, 1e-5, out=t)),
            bytes_moved=T * H * (4 + 2) + H * 4) | MEMORY,
        # x read and written, delta (bf16) read, t (bf16) written
        row("add_rmsnorm (bf16 delta)", shape, time_ms(lambda: add_rmsnorm(x, delta, scale, 1e-5, out=t)),
            bytes_moved=T * H * (4 + 4 + 2 + 2) + H * 4) | MEMORY,
    ]


def bench_sampling(time_ms, B: int) -> list[dict]:
    import cupy
    import numpy as np

    from gptoss.ops.sampling import argmax, sample

    logits = lm_logits(B)
    ids = cupy.empty(B, dtype=cupy.int32)
    seqs = cupy.arange(B, dtype=cupy.int32)
    steps = cupy.zeros(B, dtype=cupy.int32)
    shape, read = f"B={B} V={V}", B * V * 4  # bytes of one pass over the logits
    rows = [row("argmax", shape, time_ms(lambda: argmax(logits, out=ids)), bytes_moved=read) | MEMORY]
    for temp, top_p in ((0.0, 1.0), (1.0, 1.0), (0.7, 0.9)):
        tt = cupy.full(B, temp, dtype=cupy.float32)
        tp = cupy.full(B, top_p, dtype=cupy.float32)
        ms = time_ms(lambda: sample(logits, tt, tp, np.uint32(1234), seqs, steps, out=ids))  # noqa: B023
        label = "greedy" if temp == 0 else f"T={temp} top_p={top_p}"
        rows.append(row(f"sample {label}", shape, ms, bytes_moved=read) | MEMORY)
    return rows


def bench(time_ms) -> list[dict]:
    import cupy

    rows = []
    rs = cupy.random.RandomState(1)
    table = random_bf16(rs, (V, H))
    scale = rs.uniform(0.5, 1.5, H, dtype=cupy.float32)
    for T in TOKENS:
        rows += bench_embed_norm(time_ms, T, table, scale, rs)
    table = None
    for B in BATCHES:
        cupy.get_default_memory_pool().free_all_blocks()
        rows += bench_sampling(time_ms, B)
    return rows
