#!/usr/bin/env python3
"""The MoE block's kernels on one layer of the gpt-oss-20b shape (E = 32, H = I = 2880, k = 4).

  python benchmarks/kernel_moe.py [--experts mxfp4|bf16] [--tokens 1,8,64,1024,4096] [--ablate N] [--dense]
                                  [--copies N] [--variants NAME,NAME] [--json OUT]

Times route, dispatch, mlp1, mlp2 and combine (median of CUDA-event timings) at each T. TFLOP/s counts
only real rows (2 * T*k * N * K per expert GEMM, no padding); GB/s counts the expert weight bytes a
step needs (blocks + scales, or bf16, of the experts that got rows), the decode roofline. Where both
tile heights are sensible (T = 64, 1024) the one not picked by default is timed too. --dense also times
every dense kernel (MOE_DENSE_KERNEL: bf16 copies of the MXFP4 weights) at 128-row tiles wherever the
average expert gets more than 16 rows (GB/s then counts the bf16 bytes). Random weights
are generated on the GPU (speed does not depend on the values; MXFP4 scales 118..125 as in real
checkpoints). GPTOSS_WGMMA=0 in the environment times the mma.sync kernels on an H100/H200
(KernelOptions.from_env).

--copies N times the expert GEMMs the way a model step runs them: queued back to back over N copies of
the layer's weights (benchmarks.common.time_queued_ms), so that no call finds the previous one's weights
in L2 and no host gap sits between calls; comparisons of a few percent need it. --variants times the
named expert kernels (their mlp1 names, ops.moe.VARIANTS; each with its mlp2 twin) at every T instead of
the default pick, and prints whether each gives the first one's bits (md5 of both outputs; the md5
itself too, to compare builds).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import add_json_option, json_path_error, positive_ints, rotating, row, \
    time_ms as default_time_ms, time_queued_ms, write_json  # noqa: E402


def _layer(fmt: str, E: int, H: int, I: int, seed: int = 0):
    import cupy

    rs = cupy.random.RandomState(seed)

    def bf16(shape, scale):  # truncated to bf16 bit patterns (values do not matter for speed)
        return ((rs.standard_normal(shape, dtype=cupy.float32) * scale).view(cupy.uint32) >> 16).astype(cupy.uint16)

    def experts(R, C):
        if fmt == "mxfp4":
            return (rs.randint(0, 256, (E, R, C // 32, 16)).astype(cupy.uint8),
                    rs.randint(118, 126, (E, R, C // 32)).astype(cupy.uint8))
        return bf16((E, R, C), 0.02)

    return {"gate_w": bf16((E, H), 1.0 / H ** 0.5), "gate_b": bf16((E,), 0.5),
            "w1": experts(2 * I, H), "b1": bf16((E, 2 * I), 0.1),
            "w2": experts(H, I), "b2": bf16((E, H), 0.1)}


def expert_kernel_pairs(names, fmt: str) -> list:
    """The (mlp1, mlp2) kernels (ops.moe.Variant) of each mlp1 kernel name in `names`, the mlp2 one
    being its twin by name, for experts in format fmt ("mxfp4" | "bf16"); ValueError says what is wrong."""
    from gptoss.ops import moe as M

    choices = ", ".join(n for n, v in M.VARIANTS.items() if v.mlp1 and not v.dense)
    pairs = []
    for name in names:
        v1 = M.VARIANTS.get(name)
        if v1 is None or not v1.mlp1 or v1.dense:
            raise ValueError(f"unknown expert kernel {name!r}: --variants takes mlp1 kernels ({choices})")
        if v1.fp4 != (fmt == "mxfp4"):
            raise ValueError(f"{name} is for {'MXFP4' if v1.fp4 else 'bf16'} experts, not {fmt}")
        pairs.append(M.variant_pair(name))
    return pairs


def bench(time_ms=default_time_ms, fmt: str = "mxfp4", tokens=(1, 8, 64, 1024, 4096), cfg=None,
          all_tiles: bool = False, kernels=None, dense: bool = False, copies: int = 1,
          variants=()) -> list[dict]:
    """Rows of benchmarks.common.row for the MoE kernels of one 20b-shaped layer at each T (kernels:
    gptoss.kernels.KernelOptions, default KernelOptions.from_env()). copies > 1: the expert GEMMs are
    timed queued over that many copies of the weights; variants: mlp1 kernel names timed instead of the
    default pick (expert_kernel_pairs), each row with the md5 of its outputs."""
    import hashlib

    import cupy
    import numpy as np

    from gptoss.config import GPT_OSS_20B
    from gptoss.gpu_weights import ExpertWeights
    from gptoss.kernels import KernelOptions
    from gptoss.ops import moe as M

    kernels = (kernels if kernels is not None else KernelOptions.from_env()).resolve()
    wg = M.uses_wgmma(fmt, kernels)
    cfg = cfg or GPT_OSS_20B
    E, H, I, k = cfg.num_experts, cfg.hidden_size, cfg.intermediate_size, cfg.experts_per_token
    pairs = expert_kernel_pairs(variants, fmt)
    for v1, _ in pairs:  # MXFP4 blocks are laid out for the wgmma kernels where those run (to_wgmma_order)
        if fmt == "mxfp4" and v1.sm90a != wg:
            raise ValueError(f"{v1.name} " + ("runs only where the sm_90a wgmma kernels do" if v1.sm90a else
                             "reads MXFP4 blocks in the file's order, and here they are laid out for the wgmma "
                             "kernels (GPTOSS_WGMMA=0 times the mma.sync kernels)"))
    layers = [_layer(fmt, E, H, I, seed=c) for c in range(copies)]
    if fmt == "mxfp4":  # laid out once for the kernels that run, as DeviceWeights does
        for L in layers:
            for name in ("w1", "w2"):
                L[name] = M.to_wgmma_order(ExpertWeights("mxfp4", *L[name]), kernels)
    layer = layers[0]
    w1s = [M.expert_matrix(L["w1"], "w1") for L in layers]
    w2s = [M.expert_matrix(L["w2"], "w2") for L in layers]
    w1, w2 = w1s[0], w2s[0]

    def time_experts(call):  # call(i) runs on copy i of the weights
        return time_queued_ms(rotating(call, copies)) if copies > 1 else time_ms(lambda: call(0))

    dense = dense and wg and fmt == "mxfp4"
    if dense:
        for L, m1, m2 in zip(layers, w1s, w2s):
            m1.dense, m2.dense = M.dense_expert_copy(L["w1"]), M.dense_expert_copy(L["w2"])

    def weight_bytes(m, n_experts):  # bytes of n experts of one matrix
        per = m.R * m.C // 2 + m.R * m.C // 32 if m.format == "mxfp4" else m.R * m.C * 2
        return n_experts * per

    rows = []
    for T in tokens:
        rs = cupy.random.RandomState(T)
        t = (rs.standard_normal((T, H), dtype=cupy.float32).view(cupy.uint32) >> 16).astype(cupy.uint16)
        x = cupy.zeros((T, H), dtype=cupy.float32)
        experts, weights = M.route(t, layer["gate_w"], layer["gate_b"], k)
        d = M.dispatch(experts, E)
        y = M.expert_mlp1(t, d, layer["w1"], layer["b1"], cfg.swiglu_limit, cfg.swiglu_alpha, kernels=kernels)
        out = M.expert_mlp2(y, d, layer["w2"], layer["b2"], weights, kernels=kernels)
        S = T * k
        active = int(np.count_nonzero(np.diff(cupy.asnumpy(d.offsets))))  # benchmark only: host copy
        shape = f"T={T} E={E} H={H} I={I} {fmt} active={active}"
        bm_auto = M.pick_bm(S, E, fmt, wg)
        rows.append(row("route", shape, time_ms(lambda: M.route(t, layer["gate_w"], layer["gate_b"], k,
                                                                 out=(experts, weights))),
                        flops=2.0 * T * E * H, bytes_moved=E * H * 2 + T * H * 2))
        rows.append(row("dispatch", shape, time_ms(lambda: M.dispatch(experts, E, out=d))))

        def expert_rows(names, ms, bytes_moved, **extra):  # the mlp1 and mlp2 rows of one tile
            return [dict(row(name, shape, m, flops=flops, bytes_moved=b), **extra) for name, m, flops, b in
                    zip(names, ms, (2.0 * S * 2 * I * H, 2.0 * S * H * I), bytes_moved)]

        mxfp4_bytes = (weight_bytes(w1, active), weight_bytes(w2, active))
        others = [b for b in M.tile_heights(fmt, wg) if b != bm_auto] if all_tiles or T in (64, 1024) else []
        for bm in [] if pairs else [bm_auto] + others:
            tag = "" if bm == bm_auto else " (other tile)"
            ms1 = time_experts(lambda i: M.expert_mlp1(t, d, layers[i]["w1"], layers[i]["b1"], cfg.swiglu_limit,
                                                       cfg.swiglu_alpha, out=y, bm=bm, kernels=kernels))
            ms2 = time_experts(lambda i: M.expert_mlp2(y, d, layers[i]["w2"], layers[i]["b2"], weights, out=out,
                                                       bm=bm, kernels=kernels))
            bound = "memory" if bm == 16 else "compute"  # decode streams weights; getp is mma-bound
            rows += expert_rows((f"mlp1 m{bm}{tag}", f"mlp2 m{bm}{tag}"), (ms1, ms2), mxfp4_bytes, bound=bound)

        def time_pair(v1, v2):  # ms of kernels v1 (mlp1) and v2 (mlp2), each over the copies
            return (time_experts(lambda i: M._launch_gemm(t, d, w1s[i], layers[i]["b1"], None, y, None,
                                                          cfg.swiglu_limit, cfg.swiglu_alpha, v1, kernels)),
                    time_experts(lambda i: M._launch_gemm(y, d, w2s[i], layers[i]["b2"], weights, None, out,
                                                          0.0, 0.0, v2, kernels)))

        first_md5 = None
        for v1, v2 in pairs:
            ms1, ms2 = time_pair(v1, v2)
            y.fill(0xFFFF)  # poisoned (NaN), then both outputs of copy 0
            out.fill(np.nan)
            M._launch_gemm(t, d, w1, layer["b1"], None, y, None, cfg.swiglu_limit, cfg.swiglu_alpha, v1, kernels)
            M._launch_gemm(y, d, w2, layer["b2"], weights, None, out, 0.0, 0.0, v2, kernels)
            md5 = hashlib.md5(cupy.asnumpy(y).tobytes() + cupy.asnumpy(out).tobytes()).hexdigest()
            first_md5 = first_md5 or md5
            rows += expert_rows((f"mlp1 {v1.name[9:]}", f"mlp2 {v2.name[9:]}"), (ms1, ms2), mxfp4_bytes,
                                md5=md5, bits="same" if md5 == first_md5 else "differ")
        dense_variants = [n for n, v in M.VARIANTS.items() if v.dense and v.mlp1] if dense and S > 16 * E else []
        for v1, v2 in map(M.variant_pair, dense_variants):
            rows += expert_rows((f"mlp1 {v1.name[9:]}", f"mlp2 {v2.name[9:]}"), time_pair(v1, v2),
                                (active * w1.R * w1.C * 2, active * w2.R * w2.C * 2), bound="compute")
        rows.append(dict(row("combine", shape, time_ms(lambda: M.combine_add(x, out)),
                             bytes_moved=(S * H + 2 * T * H) * 4), bound="memory"))
        ws = M.MoEWorkspace(T, E, k, H, I)
        rows.append(row("moe (whole block)", shape, time_ms(lambda: M.moe(x, t, layer, cfg, workspace=ws,
                                                                       kernels=kernels)),
                        flops=2.0 * S * 3 * I * H + 2.0 * T * E * H,
                        bytes_moved=sum(mxfp4_bytes)))
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experts", default="mxfp4", choices=("mxfp4", "bf16"))
    p.add_argument("--tokens", type=positive_ints, default=[1, 8, 64, 1024, 4096],
                   help="step sizes T, comma-separated")
    p.add_argument("--preset", default="gpt-oss-20b", help="layer shape (gptoss.config.PRESETS)")
    p.add_argument("--all-tiles", action="store_true", help="time every tile height at every T")
    p.add_argument("--ablate", type=int, default=0, choices=(0, 1, 2, 3),
                   help="measurement only, wgmma kernels: 1 = no dequantization arithmetic, 2 = no wgmma, "
                        "3 = no loads after the prologue (wrong results; see moe.hip MOE_ABLATE)")
    p.add_argument("--dense", action="store_true",
                   help="also time the dense expert kernels (bf16 copies of the MXFP4 weights, wgmma only)")
    p.add_argument("--copies", type=int, default=1, metavar="N",
                   help="time the expert GEMMs queued back to back over this many copies of the weights, as "
                        "a model step runs them (default 1: one call at a time on one copy)")
    p.add_argument("--variants", type=lambda text: text.split(","), default=[], metavar="NAMES",
                   help="mlp1 expert kernels to time (ops.moe.VARIANTS names, with their mlp2 twins), "
                        "comma-separated, instead of the default pick; each row says whether it gives the "
                        "first one's bits")
    add_json_option(p, "the rows")
    args = p.parse_args(argv)
    if (code := json_path_error("kernel_moe.py", args)) is not None:
        return code
    from dataclasses import replace

    from gptoss.cli import error
    from gptoss.config import PRESETS
    from gptoss.kernels import KernelOptions
    from gptoss.ops import moe as M

    if args.copies < 1:
        return error("kernel_moe.py", f"--copies must be at least 1 (got {args.copies})")
    if args.preset not in PRESETS:
        return error("kernel_moe.py", f"unknown preset {args.preset!r} (one of {', '.join(PRESETS)})")
    try:
        expert_kernel_pairs(args.variants, args.experts)
    except ValueError as e:
        return error("kernel_moe.py", str(e))

    kernels = KernelOptions.from_env().resolve()
    if args.ablate:
        kernels = replace(kernels, moe_defines=(f"MOE_ABLATE={args.ablate}",))
    print(f"expert GEMMs: {'wgmma (sm_90a)' if M.uses_wgmma(args.experts, kernels) else 'mma.sync'} "
          "(GPTOSS_WGMMA=0 in the environment times the mma.sync kernels on an H100/H200)")

    try:
        rows = bench(fmt=args.experts, tokens=args.tokens, cfg=PRESETS[args.preset], all_tiles=args.all_tiles,
                     kernels=kernels, dense=args.dense, copies=args.copies, variants=args.variants)
    except ValueError as e:
        return error("kernel_moe.py", str(e))
    print(f"{'kernel':<24} {'shape':<48} {'ms':>9} {'TFLOP/s':>9} {'GB/s':>8}")
    for r in rows:
        bits = f"  bits: {r['bits']} (md5 {r['md5'][:8]})" if "bits" in r else ""  # (md5: across trees)
        print(f"{r['name']:<24} {r['shape']:<48} {r['ms']:>9.4f} {r['tflops']:>9.1f} {r['gbps']:>8.0f}{bits}")
    if args.json:
        write_json(args.json, rows)
    return 0


if __name__ == "__main__":
    from gptoss.cli import run_main

    sys.exit(run_main("kernel_moe.py", main))
