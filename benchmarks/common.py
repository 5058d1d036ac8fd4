"""Timing helpers shared by the benchmarks: CUDA events, warm-up, median of many repeats."""
from __future__ import annotations

import statistics

# Ceilings measured on the device's H100 (../shared/docs/peers.md); bench_kernels.py re-measures them.
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


def row(name: str, shape: str, ms: float, flops: float = 0.0, bytes_moved: float = 0.0) -> dict:
    """One benchmark result: achieved TFLOP/s and GB/s from the work done in ms."""
    return {"name": name, "shape": shape, "ms": ms,
            "tflops": flops / ms / 1e9 if flops else 0.0,
            "gbps": bytes_moved / ms / 1e6 if bytes_moved else 0.0}
