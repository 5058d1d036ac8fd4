#!/usr/bin/env python3
"""Kernel benchmark: every benchmarks/kernel_*.py against the device's own ceilings, in one table.

  python benchmarks/bench_kernels.py [--only gemm,small] [--json PATH] [--no-ceilings]

Ceilings, measured first on this device:
  copy    a large device-to-device copy, GB/s counting bytes read + written (the memory-bound yardstick)
  matmul  cupy.matmul of float16 8192 x 8192 x 8192 through cuBLAS, TFLOP/s (the compute yardstick)
Then each kernel_*.py module's `bench(time_ms) -> list[dict]` runs (rows made by benchmarks/common.py's
`row`; a row may say "bound": "memory" or "compute", otherwise the larger fraction is shown). A module
that fails is reported and the others still run. --json writes the ceilings, the rows and the failures.
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from benchmarks.common import H100_BF16_TFLOPS, H100_COPY_GBPS, add_json_option, json_path_error, time_ms, \
    write_json  # noqa: E402


def copy_gbps() -> float:
    """Device-to-device copy of 1 GiB, GB/s counting bytes read + written."""
    import cupy

    x = cupy.random.standard_normal((1 << 30) // 4, dtype=cupy.float32)
    y = cupy.empty_like(x)
    ms = time_ms(lambda: cupy.copyto(y, x), warmup=3, reps=20)
    return 2 * x.nbytes / ms / 1e6


def matmul_tflops(m: int = 8192) -> float:
    """cupy.matmul (cuBLAS) of float16 m x m x m, TFLOP/s."""
    import cupy

    a = cupy.random.standard_normal((m, m), dtype=cupy.float32).astype(cupy.float16)
    b = cupy.random.standard_normal((m, m), dtype=cupy.float32).astype(cupy.float16)
    c = cupy.empty((m, m), dtype=cupy.float16)
    ms = time_ms(lambda: cupy.matmul(a, b, out=c), warmup=3, reps=20)
    return 2 * m ** 3 / ms / 1e9


def measure_ceilings() -> dict:
    import cupy

    ceilings = {"copy_gbps": copy_gbps(), "matmul_tflops": matmul_tflops()}
    cupy.get_default_memory_pool().free_all_blocks()
    return ceilings


def fraction(r: dict, ceilings: dict) -> float:
    mem = r.get("gbps", 0.0) / ceilings["copy_gbps"]
    comp = r.get("tflops", 0.0) / ceilings["matmul_tflops"]
    bound = r.get("bound")
    if bound == "memory":
        return mem
    if bound == "compute":
        return comp
    return max(mem, comp)


def kernel_modules(only: list[str] | None) -> list[Path]:
    mods = sorted(HERE.glob("kernel_*.py"))
    if only:
        mods = [m for m in mods if any(o in m.stem for o in only)]
    return mods


def load(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = mod
    spec.loader.exec_module(mod)
    return mod


def print_table(rows: list[dict], ceilings: dict) -> None:
    head = f"{'kernel':34s} {'shape':34s} {'ms':>9s} {'TFLOP/s':>8s} {'GB/s':>8s} {'ceiling':>8s}"
    print(head)
    print("-" * len(head))
    for r in rows:
        tf = f"{r['tflops']:8.1f}" if r.get("tflops") else f"{'':8s}"
        gb = (f"{r['gbps']:8.0f}" if r["gbps"] >= 100 else f"{r['gbps']:8.2f}") if r.get("gbps") else f"{'':8s}"
        print(f"{r['name'][:34]:34s} {str(r['shape'])[:34]:34s} {r['ms']:9.4f} {tf} {gb} "
              f"{100 * fraction(r, ceilings):7.1f}%", flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default=None, help="comma-separated substrings of module names (gemm, moe, small...)")
    add_json_option(p, "ceilings, rows and failures")
    p.add_argument("--no-ceilings", action="store_true",
                   help=f"skip measuring; use the H100 figures ({H100_COPY_GBPS:.0f} GB/s, "
                        f"{H100_BF16_TFLOPS:.0f} TFLOP/s)")
    args = p.parse_args(argv)
    if (code := json_path_error("bench_kernels.py", args)) is not None:
        return code

    import cupy

    props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.runtime.getDevice())
    device = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
    print(f"device: {device}")
    if args.no_ceilings:
        ceilings = {"copy_gbps": H100_COPY_GBPS, "matmul_tflops": H100_BF16_TFLOPS, "measured": False}
    else:
        ceilings = dict(measure_ceilings(), measured=True)
    print(f"ceilings: copy {ceilings['copy_gbps']:.0f} GB/s (read + write), "
          f"cuBLAS fp16 matmul 8192^3 {ceilings['matmul_tflops']:.0f} TFLOP/s\n")

    rows, failures = [], []
    only = [o.strip() for o in args.only.split(",")] if args.only else None
    modules = kernel_modules(only)
    if not modules:
        print("no benchmarks/kernel_*.py module matched", file=sys.stderr)
    for path in modules:
        print(f"== {path.name}", flush=True)
        try:
            got = list(load(path).bench(time_ms))
        except Exception as e:  # report and go on with the next module
            failures.append({"module": path.name, "error": f"{type(e).__name__}: {e}",
                             "traceback": traceback.format_exc()})
            print(f"FAILED: {type(e).__name__}: {e}", flush=True)
            print(traceback.format_exc(limit=-3), flush=True)
            cupy.get_default_memory_pool().free_all_blocks()
            continue
        for r in got:
            r.setdefault("module", path.stem)
            r["fraction"] = fraction(r, ceilings)
        print_table(got, ceilings)
        print()
        rows.extend(got)
        cupy.get_default_memory_pool().free_all_blocks()

    if rows:
        print("== all kernels")
        print_table(rows, ceilings)
    if failures:
        print(f"\n{len(failures)} module(s) failed: {', '.join(f['module'] for f in failures)}")
    if args.json:
        write_json(args.json, {"device": device, "ceilings": ceilings, "rows": rows, "failures": failures})
        print(f"wrote {args.json}")
    return 1 if failures else 0


if __name__ == "__main__":
    from gptoss.cli import run_main

    sys.exit(run_main("bench_kernels.py", main))
