#!/usr/bin/env python3
"""The MoE routing of a step, per layer: route + dispatch (three launches) against route_dispatch (one).

  python benchmarks/kernel_routing.py [--preset gpt-oss-20b] [--tokens 1,8,64] [--layers 24] [--routers all]
                                      [--json OUT]

For each T, the routing of `--layers` layers (each its own random router of the preset's shape; the fp32
router input the model feeds it) is captured once per path in a CUDA graph, launched with the kernel
options the model uses (KernelOptions.from_env: GPTOSS_PDL=1 adds programmatic dependent launch), and
replayed: microseconds per layer = the median replay time / layers, so the launches run back to back as
in a captured decode step. Before timing, the two paths' outputs (experts, weights, offsets, sorted
slots, tile schedules) are compared bit for bit; the exit status is 1 if they differ. Past
ops.moe.fused_routing's threshold the one launch still runs (the model takes the three there): the
"model" column says which one the model takes. `--routers` adds the three launches with each named
router kernel (ops.moe.router_choices(); `all`: every one), the same bit check included; the rows without
one take ops.moe.router_choice's pick.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import add_json_option, json_path_error, positive_ints, row, time_ms, \
    write_json  # noqa: E402
from gptoss.cli import error, run_main  # noqa: E402

REPLAYS = 10  # graph launches between two timing events


def _arrays(routed, d) -> tuple:
    return (*routed, d.offsets, d.sorted_slots, *d.tiles.values())


def _poison(routed, d) -> None:
    for a in _arrays(routed, d):
        a.fill(-12345)


def bench(cfg, tokens, layers: int, kernels=None, routers=()) -> list[dict]:
    """Rows of benchmarks.common.row (ms = per layer) for both paths at each T (and the three launches with
    each router kernel of `routers`), with same_bits and the path the model takes."""
    import cupy
    import numpy as np

    from gptoss.kernels import KernelOptions
    from gptoss.ops import moe as M

    kernels = (kernels if kernels is not None else KernelOptions.from_env()).resolve()
    E, H, k = cfg.num_experts, cfg.hidden_size, cfg.experts_per_token
    rs = cupy.random.RandomState(0)

    def bf16(shape, scale):
        return ((rs.standard_normal(shape, dtype=cupy.float32) * scale).view(cupy.uint32) >> 16).astype(cupy.uint16)

    layer_routers = [(bf16((E, H), H ** -0.5), bf16((E,), 0.5)) for _ in range(layers)]
    stream = cupy.cuda.Stream(non_blocking=True)
    rows = []
    for T in tokens:
        t = rs.standard_normal((T, H), dtype=cupy.float32)
        ws = M.MoEWorkspace(T, E, k, H, 32)  # the routing buffers (the expert ones are not used)
        routed, scratch, d, _, _ = ws.views(T, H, 32)

        def three(router=None):
            for w, b in layer_routers:
                M.route(t, w, b, k, out=routed, scratch=scratch, kernels=kernels, router=router)
                M.dispatch(routed[0], E, out=d, kernels=kernels)

        def one():
            for w, b in layer_routers:
                M.route_dispatch(t, w, b, k, out=routed, scratch=scratch, dispatch_out=d, counter=ws.counter,
                                 kernels=kernels)

        times, outs = {}, {}
        with stream:
            paths = [("three launches", three), ("one launch", one)]
            paths += [(f"three, {r}", lambda r=r: three(r)) for r in routers]
            for name, fn in paths:
                _poison(routed, d)
                fn()  # also compiles outside the capture
                outs[name] = [cupy.asnumpy(a) for a in _arrays(routed, d)]
                stream.begin_capture()
                fn()
                graph = stream.end_capture()
                times[name] = time_ms(lambda: [graph.launch(stream) for _ in range(REPLAYS)]) / REPLAYS / layers
        model = "one launch" if M.fused_routing(T, E) else "three launches"
        shape = f"T={T} E={E} H={H} k={k}"
        rows += [dict(row(f"routing, {name}", shape, ms), model_takes=name == model,
                      same_bits=all(np.array_equal(a, b) for a, b in zip(outs["three launches"], outs[name])))
                 for name, ms in times.items()]
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="gpt-oss-20b", help="router shape (gptoss.config.PRESETS)")
    p.add_argument("--tokens", type=positive_ints, default=[1, 8, 64], help="step sizes T, comma-separated")
    p.add_argument("--layers", type=int, default=24, help="layers per captured graph")
    p.add_argument("--routers", default="", help="router kernels to time in the three launches too, "
                   "comma-separated (ops.moe.router_choices()), or all")
    add_json_option(p, "the rows")
    args = p.parse_args(argv)
    if (code := json_path_error("kernel_routing.py", args)) is not None:
        return code
    from gptoss.config import PRESETS

    if args.preset not in PRESETS:
        return error("kernel_routing.py", f"unknown preset {args.preset!r} (one of {', '.join(PRESETS)})")
    if args.layers < 1:
        return error("kernel_routing.py", f"--layers must be at least 1 (got {args.layers})")
    from gptoss.ops.moe import router_choices

    known = router_choices()
    routers = known if args.routers == "all" else [x for x in args.routers.split(",") if x]
    if unknown := [x for x in routers if x not in known]:
        return error("kernel_routing.py", f"unknown --routers {', '.join(unknown)} (one of {', '.join(known)}, or all)")
    rows = bench(PRESETS[args.preset], args.tokens, args.layers, routers=routers)
    print(f"{'routing':<34} {'shape':<28} {'us/layer':>9}  model takes  same bits")
    for r in rows:
        print(f"{r['name']:<34} {r['shape']:<28} {r['ms'] * 1e3:>9.2f}  {'yes' if r['model_takes'] else '':<11}  "
              f"{'yes' if r['same_bits'] else 'NO'}")
    if args.json:
        write_json(args.json, rows)
    return 0 if all(r["same_bits"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(run_main("kernel_routing.py", main))
