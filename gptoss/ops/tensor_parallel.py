"""A tensor/expert-parallel rank's own launches around its collectives (kernels/tensor_parallel.hip).

    partial = moe_partial(t, layer, cfg, first_expert, workspace, out=...)  # this rank's experts only
    collective.all_gather(partial, gathered)                                # [R, T, H], rank-major
    reduce_ranks(gathered, out=...)                                         # rank order, every rank alike

moe_partial reuses ops.moe's router, dispatch and expert GEMMs unchanged: the router is replicated (every
rank picks the same top-k), the chosen experts are shifted to the rank's indices (tp_local_experts, or
inside ops.moe.route_dispatch, the one launch of small steps), and the dispatch already skips an index
outside 0..E_local-1, so a slot whose expert another rank owns gets no GEMM row here and adds nothing to
the rank's partial sum. Like ops.moe, nothing here
synchronizes or allocates with the buffers given, so a rank's step can be captured in a CUDA graph.
"""
from __future__ import annotations

import numpy as np

from ..kernels import KernelOptions, kernel, resolved
from . import moe as M
from ._check import check, out_or_new

THREADS = 256
MAX_BLOCKS = 4096  # grid-stride loops past this many CTAs


def _grid(n: int) -> tuple:
    return (max(1, min(-(-n // THREADS), MAX_BLOCKS)),)


def local_experts(experts, first: int, out=None, kernels: KernelOptions | None = None):
    """experts [T, k] int32 (global ids) -> the rank's indices, id - first (int32, same shape)."""
    import cupy

    check(experts, "experts", cupy.int32, ndim=2)
    out = out_or_new(out, "out", tuple(experts.shape), cupy.int32)
    if experts.size:
        kernel("tensor_parallel", "tp_local_experts", kernels=resolved(kernels))(_grid(experts.size), (THREADS,),
                                                       (experts, out, np.int32(experts.size), np.int32(first)))
    return out


def combine_owned(expert_out, local, num_local: int, out=None, kernels: KernelOptions | None = None):
    """out [T, H] float32 = sum over j (increasing) of expert_out [T*k, H] rows t*k + j whose local
    expert local[t, j] is in 0..num_local-1; 0 where a token has none."""
    import cupy

    check(local, "local", cupy.int32, ndim=2)
    T, k = local.shape
    check(expert_out, "expert_out", cupy.float32, (T * k, None))
    H = expert_out.shape[1]
    out = out_or_new(out, "out", (T, H), cupy.float32)
    if T:
        kernel("tensor_parallel", "tp_combine_owned", kernels=resolved(kernels))(_grid(T * H), (THREADS,), (
            expert_out, local, out, np.int32(T), np.int32(H), np.int32(k), np.int32(num_local)))
    return out


def reduce_ranks(parts, out=None, bias=None, kernels: KernelOptions | None = None):
    """parts [R, T, H] float32 (all-gathered partials, rank-major) -> ((p0 + p1) + ...) + p[R-1]: [T, H]
    float32; with bias [H] bf16, bf16(sum + bias) as uint16 bits (one rounding, as a GEMM's epilogue)."""
    import cupy

    check(parts, "parts", cupy.float32, ndim=3)
    R, T, H = parts.shape
    n = T * H
    if bias is None:
        out = out_or_new(out, "out", (T, H), cupy.float32)
        if n:
            kernel("tensor_parallel", "tp_reduce_ranks_f32", kernels=resolved(kernels))(_grid(n), (THREADS,),
                                                            (parts, out, np.int32(R), np.int64(n)))
        return out
    check(bias, "bias", cupy.uint16, (H,))
    out = out_or_new(out, "out", (T, H), cupy.uint16)
    if n:
        kernel("tensor_parallel", "tp_reduce_ranks_bias_bf16", kernels=resolved(kernels))(_grid(n), (THREADS,),
                                                              (parts, bias, out, np.int32(R), np.int64(n), np.int32(H)))
    return out


def moe_partial(t, layer, cfg, first_expert: int, workspace, local, out, router_input=None,
                kernels: KernelOptions | None = None, mark=None):
    """This rank's share of the MoE block: out [T, H] float32 = sum over the token's chosen slots whose
    expert this rank owns (experts first_expert .. first_expert + E_local - 1, the leading axis of
    layer.w1/w2/b1/b2) of weight * expert(t). The router (layer.gate_w [E, H], all experts) runs whole.
    workspace: an ops.moe.MoEWorkspace for the router's E experts; local: int32 [T, k] scratch."""
    import cupy

    mark = mark or (lambda name: None)
    T, H = t.shape
    k = cfg.experts_per_token
    E = layer.gate_w.shape[0]
    w1, w2 = M.expert_matrix(layer.w1, "w1"), M.expert_matrix(layer.w2, "w2")
    E_local = w1.E
    routed, scratch, d, y, eo = workspace.views(T, H, w2.C, dispatch_experts=E_local)
    kernels = resolved(kernels)
    rin = t if router_input is None else router_input
    if M.fused_routing(T, E):  # one launch: the router, the rank's indices and the dispatch
        local = out_or_new(local, "local", (T, k), cupy.int32)  # combine_owned reads it
        experts, weights, d = M.route_dispatch(rin, layer.gate_w, layer.gate_b, k, num_experts=E_local,
                                               first_expert=first_expert, local=local, out=routed, scratch=scratch,
                                               dispatch_out=d, counter=workspace.counter, kernels=kernels)
        mark("router")
        mark("moe dispatch")
    else:
        experts, weights = M.route(rin, layer.gate_w, layer.gate_b, k, out=routed, scratch=scratch, kernels=kernels)
        mark("router")
        local = local_experts(experts, first_expert, out=local, kernels=kernels)
        d = M.dispatch(local, E_local, out=d, kernels=kernels)
        mark("moe dispatch")
    # the tile height the unsharded model picks: rows per expert are the same on a rank (results do not
    # depend on it)
    bm = M.pick_bm(T * k, E, w1.format, M.uses_wgmma(w1.format, kernels))
    y = M.expert_mlp1(t, d, layer.w1, layer.b1, cfg.swiglu_limit, cfg.swiglu_alpha, out=y, bm=bm, kernels=kernels)
    mark("moe mlp1 (gate/up + swiglu)")
    eo = M.expert_mlp2(y, d, layer.w2, layer.b2, weights, out=eo, bm=bm, kernels=kernels)
    mark("moe mlp2 (down)")
    out = combine_owned(eo, local, E_local, out=out, kernels=kernels)
    mark("moe combine (rank)")
    return out
