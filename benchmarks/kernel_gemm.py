#!/usr/bin/env python3
"""Our bf16 linear() (gptoss/ops/gemm.py) against cuBLAS on the gpt-oss-20b shapes.

  python benchmarks/kernel_gemm.py [--shapes qkv,out,unembedding,router] [--ms 1,8,64,512,4096] [--sweep]

cuBLAS runs through cupy.matmul on float16 arrays of the same shapes (fp16 and bf16 run at the same
tensor-core rate on Hopper; CuPy has no bf16 dtype), without the bias. Both are timed alike: calls
queued back to back behind a GPU spin, timed between CUDA events (benchmarks/common.py time_queued_ms: no
host launch overhead in kernels of a few microseconds), rotating over enough copies of x and w that they
are not read from the L2 cache (as in a model step, where the other layers' weights pass in between).
Reported: ms, TFLOP/s, GB/s
(x + w + out bytes: the memory-bound figure at small M) and ours / cuBLAS throughput ("vs_cublas").
--sweep also times every variant that fits each shape, for tuning gemm.py's pick_variant.
GPTOSS_WGMMA=0 in the environment times the mma.sync kernels on an H100/H200 (KernelOptions.from_env).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import add_json_option, json_path_error, rotating, row, time_queued_ms, \
    write_json  # noqa: E402

# 20b: (N, K) of the bf16 products per token
SHAPES = {"qkv": (5120, 2880), "out": (2880, 4096), "unembedding": (201088, 2880), "router": (32, 2880)}
MS = (1, 8, 64, 512, 4096)
UNEMBEDDING_EXTRA_M = 8192  # only where it fits in memory
ROTATE_BYTES = 160 * 2**20   # the rotated copies of x and w span at least this (H200 L2: 50 MB)


def _random_bf16(shape, scale: float):
    """Random bf16 bit patterns generated on the device (truncated fp32: fine for timing)."""
    import cupy

    f = cupy.random.standard_normal(shape, dtype=cupy.float32) * scale
    return (f.view(cupy.uint32) >> 16).astype(cupy.uint16)


def _as_f16(bits):
    import cupy

    return (bits.astype(cupy.uint32) << 16).view(cupy.float32).astype(cupy.float16)


def copies_needed(M: int, N: int, K: int) -> int:
    """Copies of (x, w) whose rotation spans ROTATE_BYTES (at least one)."""
    return max(1, -(-ROTATE_BYTES // (2 * (M * K + N * K))))


def _fits(M: int, N: int, K: int) -> bool:
    import cupy

    free, _ = cupy.cuda.runtime.memGetInfo()
    # ours and the fp16 copies of every rotated (x, w), the outputs, generation scratch
    need = 2 * 2 * (copies_needed(M, N, K) * (M * K + N * K) + M * N) + 4 * N * K
    return need < 0.8 * free


def bench(time_ms=time_queued_ms, shapes=None, ms=MS, sweep: bool = False, kernels=None) -> list[dict]:
    """time_ms(fn) -> milliseconds per call; kernels: gptoss.kernels.KernelOptions (default:
    KernelOptions.from_env())."""
    import cupy
    from gptoss.kernels import KernelOptions
    from gptoss.ops.gemm import LARGE, auto_variant, available_variants, linear

    kernels = (kernels if kernels is not None else KernelOptions.from_env()).resolve()
    rows = []
    for name in shapes or SHAPES:
        N, K = SHAPES[name]
        b = _random_bf16((N,), 1.0)
        m_list = list(ms) + ([UNEMBEDDING_EXTRA_M] if name == "unembedding" and max(ms) >= 4096 else [])
        for M in m_list:
            if not _fits(M, N, K):
                print(f"skipping {name} M={M}: not enough free memory", file=sys.stderr)
                continue
            n = copies_needed(M, N, K)
            ws = [_random_bf16((N, K), K ** -0.5) for _ in range(n)]
            xs = [_random_bf16((M, K), 1.0) for _ in range(n)]
            w16s, x16s = [_as_f16(w) for w in ws], [_as_f16(x) for x in xs]
            out = cupy.empty((M, N), dtype=cupy.uint16)
            out16 = cupy.empty((M, N), dtype=cupy.float16)
            flops = 2.0 * M * N * K
            nbytes = 2.0 * (M * K + N * K + M * N)
            shape = f"M={M} N={N} K={K}"

            t_cublas = time_ms(rotating(lambda i: cupy.matmul(x16s[i], w16s[i].T, out=out16), n))
            r_cublas = row(f"cublas fp16 {name}", shape, t_cublas, flops, nbytes)
            picked = auto_variant(M, N, kernels.wgmma)
            variants = [picked]
            if sweep:
                variants += [v for v in available_variants(kernels.wgmma) if v != picked and (v in LARGE or M <= 64)]
            for v in variants:
                t = time_ms(rotating(lambda i: linear(xs[i], ws[i], b, out=out, variant=v, kernels=kernels), n))
                r = row(f"gemm {name}" + ("" if v == picked else f" [{v}]"), shape, t, flops, nbytes)
                r["variant"] = v
                r["vs_cublas"] = t_cublas / t
                rows.append(r)
            rows.append(r_cublas)
            del xs, ws, x16s, w16s, out, out16
        del b
        cupy.get_default_memory_pool().free_all_blocks()
    return rows


def _print_table(rows: list[dict]) -> None:
    cols = ["name", "shape", "variant", "ms", "tflops", "gbps", "vs_cublas"]

    def fmt(r, c):
        v = r.get(c, "")
        if isinstance(v, float):
            return f"{v:.4f}" if c == "ms" else f"{v:.2f}" if c == "vs_cublas" else f"{v:.1f}"
        return str(v)

    try:
        from rich.console import Console
        from rich.table import Table

        table = Table(title="bf16 GEMM vs cuBLAS (fp16)")
        for c in cols:
            table.add_column(c, justify="left" if c in ("name", "shape", "variant") else "right", no_wrap=True)
        for r in rows:
            table.add_row(*(fmt(r, c) for c in cols))
        Console(width=None if sys.stdout.isatty() else 160).print(table)  # piped: no truncated columns
    except ImportError:
        widths = [max(len(c), *(len(fmt(r, c)) for r in rows)) for c in cols]
        print("  ".join(c.ljust(wd) for c, wd in zip(cols, widths)))
        for r in rows:
            print("  ".join(fmt(r, c).ljust(wd) for c, wd in zip(cols, widths)))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated subset of {', '.join(SHAPES)}")
    p.add_argument("--ms", default=",".join(map(str, MS)), help="comma-separated M (tokens) values")
    p.add_argument("--sweep", action="store_true", help="also time every variant that fits each shape")
    add_json_option(p, "the rows")
    args = p.parse_args(argv)
    if (code := json_path_error("kernel_gemm.py", args)) is not None:
        return code
    shapes = [s for s in args.shapes.split(",") if s]
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown:
        p.error(f"unknown shapes {unknown}; known: {', '.join(SHAPES)}")
    rows = bench(time_queued_ms, shapes, [int(m) for m in args.ms.split(",")], args.sweep)
    _print_table(rows)
    if args.json:
        write_json(args.json, rows)
    return 0


if __name__ == "__main__":
    from gptoss.cli import run_main

    sys.exit(run_main("kernel_gemm.py", main))
