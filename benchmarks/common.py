"""Helpers shared by the benchmarks: timing (CUDA events, warm-up, median of many repeats) and their
--json output (checked before the run, like every output of the project: gptoss/outputs.py)."""
from __future__ import annotations

import argparse
import json
import statistics

from gptoss.cli import error
from gptoss.outputs import OutputPathError, check_output_path, write_atomically

# Ceilings measured on the device's H100; bench_kernels.py re-measures them.
H100_COPY_GBPS = 3000.0
H100_BF16_TFLOPS = 770.0


def time_ms(fn, warmup: int = 3, reps: int = 20) -> float:
    """Median milliseconds of fn() on the current stream, timed with CUDA events."""
    import cupy

    for _ in range(warmup):
        fn()
    cupy.cuda.get_current_stream().synchronize()
    times = []
    for _ in range(reps):
        start, stop = cupy.cuda.Event(), cupy.cuda.Event()
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(cupy.cuda.get_elapsed_time(start, stop))
    return statistics.median(times)


def time_queued_ms(fn, warmup: int = 3, reps: int = 20, calls: int = 24, hold_cycles: int = 20_000_000) -> float:
    """Median milliseconds per call of fn() (GPU work on the current stream), timed the way a model step
    runs its kernels: back to back with no host gaps. Per repeat the GPU first spins for hold_cycles
    (about 10 ms) while the host queues `calls` calls between two CUDA events, so kernels of a few
    microseconds are timed without the host's launch overhead (cuBLAS included, which CuPy does not let
    a CUDA graph capture). fn may rotate over copies of its inputs (rotating())."""
    import cupy
    import numpy as np

    from gptoss.kernels import kernel

    for _ in range(warmup):  # compiles, tensor maps, library handles
        fn()
    spin = kernel("util", "spin_wait")
    times = []
    for _ in range(reps):
        spin((1,), (1,), (np.int64(hold_cycles),))
        start, stop = cupy.cuda.Event(), cupy.cuda.Event()
        start.record()
        for _ in range(calls):
            fn()
        stop.record()
        stop.synchronize()
        times.append(cupy.cuda.get_elapsed_time(start, stop) / calls)
    return statistics.median(times)


def rotating(call, copies: int):
    """A function that runs call(0), call(1), ..., call(copies - 1), call(0), ... on successive calls:
    rotating over copies of the inputs larger than the L2 cache keeps a timing loop from reading them
    from L2 (in a model step the other layers' weights pass in between)."""
    state = {"i": 0}

    def fn():
        i = state["i"]
        state["i"] = (i + 1) % copies
        return call(i)

    return fn


def row(name: str, shape: str, ms: float, flops: float = 0.0, bytes_moved: float = 0.0) -> dict:
    """One benchmark result: achieved TFLOP/s and GB/s from the work done in ms."""
    return {"name": name, "shape": shape, "ms": ms,
            "tflops": flops / ms / 1e9 if flops else 0.0,
            "gbps": bytes_moved / ms / 1e6 if bytes_moved else 0.0}


def positive_ints(text: str) -> list[int]:
    """An argparse type: comma-separated positive integers (e.g. --batches 1,64,256)."""
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
    return values


def add_json_option(parser, what: str) -> None:
    parser.add_argument("--json", default=None,
                        help=f"write {what} as JSON here (checked before the run; an existing file needs --force)")
    parser.add_argument("--force", action="store_true", help="replace an existing --json file")


def json_path_error(prog: str, args) -> int | None:
    """None when args.json is unset or can be written; else the exit status, after a one-line error."""
    if args.json:
        try:
            check_output_path(args.json, force=args.force)
        except OutputPathError as e:
            return error(prog, str(e))
    return None


def write_json(path, record, indent: int = 1) -> None:
    write_atomically(path, json.dumps(record, indent=indent) + "\n")
