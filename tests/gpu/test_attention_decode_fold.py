"""The decode kernel's own fold (gptoss/kernels/attention.hip, attn_decode_g{4,8} and the _fp8 variants):
the split CTAs of a one-query sequence write their partials and count themselves on a counter of the
decode workspace; the last to arrive folds the partials in segment order, writes the output and leaves
the counter at zero. A query with one segment folds its own state without the workspace.

Every launch here shares one DecodeWorkspace, as the model's steps do, and the counters must read zero
after each. Checked for G = 4 and 8, bf16 and fp8 caches, windows 0 and 128, queries of one segment and
of up to 13: the outputs agree with the reference and are bit for bit the prefill kernel's for the same
query (the canonical computation, docs/notes/attention.md), launch after launch, with launches of other
shapes (key bound, batch) in between, and from a captured CUDA graph replayed with new positions.
Outputs start poisoned; the sequences' slots are scrambled.
"""
import dataclasses

import numpy as np
import pytest

from gptoss.config import TINY_REAL_HEADS
from tests.gpu.test_attention import POISON, Seqs
from tests.gpu.test_attention_fp8 import Seqs8

pytestmark = pytest.mark.gpu

GEOMETRIES = {8: TINY_REAL_HEADS, 4: dataclasses.replace(TINY_REAL_HEADS, num_heads=32)}  # G = Hq / Hkv
LENGTHS = [2, 200, 256, 257, 700, 3000, 3100]
L = 3136  # cache rows per slot: every sequence whole
# decode positions: full attention 1, 1, 1, 2, 3, 12, 13 segments (window 128: 1, 1, 1, 2, 1, 1, 2), then
# 1, 1, 1, 2, 2, 9, 12 (window 128: 1, 1, 1, 2, 1, 2, 1)
POSITIONS = ([n - 1 for n in LENGTHS], [1, 150, 254, 256, 511, 2048, 3050])


def q_row(s, i, p):
    """q of sequence i at position p, [1, Hq, D] bf16 bits (Seqs keeps q from q_off on, Seqs8 all of it)."""
    return s.qrows(i, p, p + 1) if isinstance(s, Seqs) else s.q[i][p:p + 1]


def prefill_bits(s, positions, window):
    """The prefill kernel's output for query (i, positions[i]) of each sequence: the second query of a
    two-query chunk. [S, Hq, D]."""
    outs = s.run([(i, p - 1, 2) for i, p in enumerate(positions)], window)
    return np.stack([o[1] for o in outs])


@pytest.mark.parametrize("G", [8, 4])
@pytest.mark.parametrize("kv", ["bf16", "fp8"])
@pytest.mark.parametrize("window", [0, 128])
def test_decode_fold_repeats_and_replays(G, kv, window):
    import cupy as cp

    from gptoss.ops import attention as A

    cfg = GEOMETRIES[G]
    Hq, Hkv, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    S = len(LENGTHS)
    rng = np.random.default_rng(100 * G + window + (kv == "fp8"))
    s = (Seqs8 if kv == "fp8" else Seqs)(cfg, LENGTHS, L=L, rng=rng, slots=rng.permutation(S).tolist())
    for i, n in enumerate(LENGTHS):
        s.write(i, 0, n)
    sinks = cp.asarray(s.sinks)
    ws = A.DecodeWorkspace(*A.DecodeWorkspace.sizes(S, L, Hq, Hkv))  # one for every launch below
    want = [prefill_bits(s, P, window) for P in POSITIONS]

    def decode(seqs, positions, max_kv=None):
        """One decode launch of these sequences at these positions on the shared workspace."""
        batch = A.AttentionBatch.build([1] * len(seqs), [s.slots[i] for i in seqs], positions, L, max_kv)
        batch.set_workspace(ws)
        q = cp.asarray(np.concatenate([q_row(s, i, p) for i, p in zip(seqs, positions)]))
        out = cp.full((len(seqs), Hq * D), POISON, dtype=cp.uint16)
        A.attention(q, s.kc, s.vc, batch, sinks, window, out=out)
        assert batch.workspace(Hq, Hkv, window) is ws
        assert int(ws.counters.max()) == 0, "a counter was left non-zero"
        return cp.asnumpy(out).reshape(len(seqs), Hq, D)

    everyone = list(range(S))
    first = decode(everyone, POSITIONS[0])
    s.check([(i, p, 1) for i, p in enumerate(POSITIONS[0])], [row[None] for row in first], window)
    assert np.array_equal(first, want[0]), "decode and prefill kernels disagree"
    assert np.array_equal(decode(everyone, POSITIONS[0]), want[0]), "a second launch changed the bits"
    assert np.array_equal(decode(everyone, POSITIONS[1], max_kv=L), want[1]), "other positions, more splits"
    some = [6, 3, 5]  # fewer sequences, other places in the grid and the workspace
    assert np.array_equal(decode(some, [POSITIONS[0][i] for i in some]), want[0][some])
    assert np.array_equal(decode(everyone, POSITIONS[0]), want[0]), "the bits changed after other launches"

    # a captured graph over a batch with a key bound, refreshed in place and replayed (as model.py does)
    batch = A.AttentionBatch.build([1] * S, s.slots, POSITIONS[0], L, max_kv=L)
    batch.set_workspace(ws)
    q = cp.empty((S, Hq, D), dtype=cp.uint16)
    out = cp.empty((S, Hq * D), dtype=cp.uint16)

    def refresh(positions):
        batch.load(A.AttentionBatch.build([1] * S, s.slots, positions, L))
        q[...] = cp.asarray(np.concatenate([q_row(s, i, p) for i, p in enumerate(positions)]))
        out.fill(POISON)

    refresh(POSITIONS[0])
    A.attention(q, s.kc, s.vc, batch, sinks, window, out=out)  # eager first: compiled, workspace in place
    cp.cuda.get_current_stream().synchronize()
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        stream.begin_capture()
        try:
            A.attention(q, s.kc, s.vc, batch, sinks, window, out=out)
        finally:
            graph = stream.end_capture()
    for k in (0, 0, 1, 0):
        refresh(POSITIONS[k])
        graph.launch(cp.cuda.get_current_stream())
        got = cp.asnumpy(out).reshape(S, Hq, D)
        assert np.array_equal(got, want[k]), f"graph replay at positions {POSITIONS[k]}: bits differ"
        assert int(ws.counters.max()) == 0, "a replay left a counter non-zero"
