"""The decode kernel's own fold (gptoss/kernels/attention.hip, attn_decode_g{4,8} and the _fp8 variants):
the split CTAs of a one-query sequence write their partials and count themselves on a counter of the
decode workspace; the last to arrive folds the partials in segment order, writes the output and leaves
the counter at zero. A query with one segment folds its own state without the workspace.

Every launch here shares one DecodeWorkspace, as the model's steps do, and the counters must read zero
after each batch of launches. Checked for G = 4 and 8, bf16 and fp8 caches, windows 0 and 128, queries
of one segment and of up to 13, with programmatic dependent launch off and on: the outputs agree with
the reference and are bit for bit the prefill kernel's for the same query (the canonical computation,
docs/notes/attention.md), for launches queued back to back (of other shapes in between: key bound,
batch, window) and from a captured CUDA graph of three launches replayed with new positions. Outputs
start poisoned; the sequences' slots are scrambled.
"""
import dataclasses

import numpy as np
import pytest

from gptoss.config import TINY_REAL_HEADS
from gptoss.kernels import KernelOptions
from tests.gpu.kernel_modes import skip_fast_path_test
from tests.gpu.test_attention import POISON, Seqs
from tests.gpu.test_attention_fp8 import Seqs8

pytestmark = pytest.mark.gpu

GEOMETRIES = {8: TINY_REAL_HEADS, 4: dataclasses.replace(TINY_REAL_HEADS, num_heads=32)}  # G = Hq / Hkv
LENGTHS = [2, 200, 256, 257, 700, 3000, 3100]
L = 3136  # cache rows per slot: every sequence whole
# decode positions: full attention 1, 1, 1, 2, 3, 12, 13 segments (window 128: 1, 1, 1, 2, 1, 1, 2), then
# 1, 1, 1, 2, 2, 9, 12 (window 128: 1, 1, 1, 2, 1, 2, 1)
POSITIONS = ([n - 1 for n in LENGTHS], [1, 150, 254, 256, 511, 2048, 3050])
WINDOWS = (0, 128)


def q_row(s, i, p):
    """q of sequence i at position p, [1, Hq, D] bf16 bits (Seqs keeps q from q_off on, Seqs8 all of it)."""
    return s.qrows(i, p, p + 1) if isinstance(s, Seqs) else s.q[i][p:p + 1]


def prefill_bits(s, positions, window):
    """The prefill kernel's output for query (i, positions[i]) of each sequence: the second query of a
    two-query chunk. [S, Hq, D]."""
    outs = s.run([(i, p - 1, 2) for i, p in enumerate(positions)], window)
    return np.stack([o[1] for o in outs])


@pytest.mark.parametrize("pdl", [False, True])
@pytest.mark.parametrize("G", [8, 4])
@pytest.mark.parametrize("kv", ["bf16", "fp8"])
@pytest.mark.parametrize("window", WINDOWS)
def test_decode_fold_repeats_and_replays(G, kv, window, pdl):
    import cupy as cp

    from gptoss.kernels import pdl_available
    from gptoss.ops import attention as A

    skip_fast_path_test()
    if pdl and not pdl_available():
        pytest.skip("no programmatic dependent launch here (needs an NVIDIA sm_90+ GPU and cuLaunchKernelEx)")
    kernels = KernelOptions(pdl=pdl).resolve()
    cfg = GEOMETRIES[G]
    Hq, Hkv, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    S = len(LENGTHS)
    rng = np.random.default_rng(100 * G + window + (kv == "fp8"))
    s = (Seqs8 if kv == "fp8" else Seqs)(cfg, LENGTHS, L=L, rng=rng, slots=rng.permutation(S).tolist())
    for i, n in enumerate(LENGTHS):
        s.write(i, 0, n)
    sinks = cp.asarray(s.sinks)
    ws = A.DecodeWorkspace(*A.DecodeWorkspace.sizes(S, L, Hq, Hkv))  # one for every launch below
    want = {(k, w): prefill_bits(s, P, w) for k, P in enumerate(POSITIONS) for w in WINDOWS}
    other = WINDOWS[1 - WINDOWS.index(window)]

    def decode(seqs, positions, max_kv=None, w=window):
        """Queue one decode launch of these sequences at these positions on the shared workspace; its
        output, [len(seqs), Hq * D] on the device."""
        batch = A.AttentionBatch.build([1] * len(seqs), [s.slots[i] for i in seqs], positions, L, max_kv)
        batch.set_workspace(ws)
        q = cp.asarray(np.concatenate([q_row(s, i, p) for i, p in zip(seqs, positions)]))
        out = cp.full((len(seqs), Hq * D), POISON, dtype=cp.uint16)
        A.attention(q, s.kc, s.vc, batch, sinks, w, out=out, kernels=kernels)
        assert batch.workspace(Hq, Hkv, w) is ws
        return out

    def host(out):
        return cp.asnumpy(out).reshape(len(out), Hq, D)

    everyone, some = list(range(S)), [6, 3, 5]  # some: fewer sequences, other places in grid and workspace
    queued = [decode(everyone, POSITIONS[0]), decode(everyone, POSITIONS[0]),
              decode(everyone, POSITIONS[1], max_kv=L), decode(everyone, POSITIONS[0], w=other),
              decode(some, [POSITIONS[0][i] for i in some]), decode(everyone, POSITIONS[0])]
    first, again, moved, windowed, fewer, last = (host(out) for out in queued)
    assert int(ws.counters.max()) == 0, "a counter was left non-zero"
    s.check([(i, p, 1) for i, p in enumerate(POSITIONS[0])], [row[None] for row in first], window)
    assert np.array_equal(first, want[0, window]), "decode and prefill kernels disagree"
    assert np.array_equal(again, want[0, window]), "a second launch changed the bits"
    assert np.array_equal(moved, want[1, window]), "other positions, more splits"
    assert np.array_equal(windowed, want[0, other]), "the other window"
    assert np.array_equal(fewer, want[0, window][some]), "fewer sequences"
    assert np.array_equal(last, want[0, window]), "the bits changed after other launches"

    # a captured graph of three launches over a batch with a key bound, refreshed in place and replayed
    # (as model.py does)
    batch = A.AttentionBatch.build([1] * S, s.slots, POSITIONS[0], L, max_kv=L)
    batch.set_workspace(ws)
    q = cp.empty((S, Hq, D), dtype=cp.uint16)
    outs = cp.empty((3, S, Hq * D), dtype=cp.uint16)
    windows = (window, other, window)

    def refresh(positions):
        batch.load(A.AttentionBatch.build([1] * S, s.slots, positions, L))
        q[...] = cp.asarray(np.concatenate([q_row(s, i, p) for i, p in enumerate(positions)]))
        outs.fill(POISON)

    def launches():
        for out, w in zip(outs, windows):
            A.attention(q, s.kc, s.vc, batch, sinks, w, out=out, kernels=kernels)

    refresh(POSITIONS[0])
    launches()  # eager first: compiled, workspace in place
    cp.cuda.get_current_stream().synchronize()
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        stream.begin_capture()
        try:
            launches()
        finally:
            graph = stream.end_capture()
    for k in (0, 0, 1, 0):
        refresh(POSITIONS[k])
        graph.launch(cp.cuda.get_current_stream())
        got = [host(out) for out in outs]
        for j, w in enumerate(windows):
            assert np.array_equal(got[j], want[k, w]), f"graph replay, positions {POSITIONS[k]}, launch {j}"
        assert int(ws.counters.max()) == 0, "a replay left a counter non-zero"
