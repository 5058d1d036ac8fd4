"""RoPE + KV-cache write and attention (gptoss/ops/attention.py) against gptoss.reference.

Inputs are fresh random bf16 values; outputs and every cache row start as NaN (0xFFFF), so a row the
kernels forget to write, or an unwritten cache row they read without masking, shows up. Head
geometries: tiny (Hq 4, Hkv 2, D 16: the portable kernel) and real (Hq 64, Hkv 8, D 64: the tensor-core
prefill and split decode kernels; also forced onto the portable kernel).
"""
import numpy as np
import pytest

from gptoss.weights.bf16 import from_bf16_bits, to_bf16_bits
from gptoss.config import TINY, TINY_REAL_HEADS

pytestmark = pytest.mark.gpu

POISON = 0xFFFF
GEOMETRIES = {"tiny": TINY, "real": TINY_REAL_HEADS}
# (geometry, window, path): windows 0 (full) and 128 for both, and the tiny preset's 8
ATTN_CASES = [("tiny", 0, "auto"), ("tiny", 8, "auto"), ("tiny", 128, "auto"),
              ("real", 0, "auto"), ("real", 128, "auto"), ("real", 0, "simple"), ("real", 128, "simple")]


def rel_err(out, ref):
    out = np.asarray(out, np.float64)
    ref = np.asarray(ref, np.float64)
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


def rand_bf16(rng, shape, scale=1.0):
    return to_bf16_bits((rng.standard_normal(shape) * scale).astype(np.float32))


def rand_sinks(rng, Hq):
    """Per head: small (around 0), large (the sink takes most of the mass) or very negative (no effect)."""
    kind = np.arange(Hq) % 3
    s = np.where(kind == 0, rng.standard_normal(Hq) * 0.5,
                 np.where(kind == 1, 6.0 + rng.standard_normal(Hq), -30.0 + rng.standard_normal(Hq)))
    return s.astype(np.float32)


class Seqs:
    """Random post-RoPE q, k, v for several sequences, and KV caches [slots, L, Hkv, D] to write them to."""

    def __init__(self, cfg, lengths, L, rng, slots=None, q_tail=None):
        import cupy as cp

        self.cfg, self.L = cfg, L
        Hq, Hkv, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        # q only for the last q_tail positions of each sequence (all of them by default)
        self.q_off = [0 if q_tail is None else max(0, n - q_tail) for n in lengths]
        self.q = [rand_bf16(rng, (n - off, Hq, D), 2.0) for n, off in zip(lengths, self.q_off)]
        self.k = [rand_bf16(rng, (n, Hkv, D), 2.0) for n in lengths]
        self.v = [rand_bf16(rng, (n, Hkv, D)) for n in lengths]
        self.slots = list(range(len(lengths))) if slots is None else list(slots)
        n_slots = max(self.slots) + 1
        self.kc = cp.full((n_slots, L, Hkv, D), POISON, dtype=cp.uint16)
        self.vc = cp.full((n_slots, L, Hkv, D), POISON, dtype=cp.uint16)
        self.sinks = rand_sinks(rng, Hq)

    def qrows(self, i, a, b):
        off = self.q_off[i]
        assert a >= off, "q was not generated for these positions"
        return self.q[i][a - off:b - off]

    def write(self, i, a, b):
        """Positions a..b-1 of sequence i into its slot (index p % L)."""
        import cupy as cp

        idx = np.arange(a, b) % self.L
        self.kc[self.slots[i], cp.asarray(idx)] = cp.asarray(self.k[i][a:b])
        self.vc[self.slots[i], cp.asarray(idx)] = cp.asarray(self.v[i][a:b])

    def run(self, parts, window, path="auto", capacity=None, max_kv=None, paged=None):
        """One attention launch over parts = [(sequence, first position, count)], in that order.
        Returns the output per part, [count, Hq, D] bf16 bits. paged: (k pages, v pages, page table)
        to read instead of the contiguous caches."""
        import cupy as cp

        from gptoss.ops import attention as A

        cfg = self.cfg
        q = np.concatenate([self.qrows(i, a, a + n) for i, a, n in parts])
        batch = A.AttentionBatch.build([n for _, _, n in parts], [self.slots[i] for i, _, _ in parts],
                                       [a for _, a, _ in parts], capacity or 1 << 20, max_kv)
        out = cp.full((len(q), cfg.num_heads * cfg.head_dim), POISON, dtype=cp.uint16)
        kc, vc, table = paged or (self.kc, self.vc, None)
        res = A.attention(cp.asarray(q), kc, vc, batch, cp.asarray(self.sinks), window, out=out, path=path,
                          page_table=table)
        assert res is out
        host = cp.asnumpy(out).reshape(len(q), cfg.num_heads, cfg.head_dim)
        offs = np.cumsum([0] + [n for _, _, n in parts])
        return [host[offs[j]:offs[j + 1]] for j in range(len(parts))]

    def paged(self, rng, spare_pages=5):
        """The caches cut into 64-position pages in scrambled order: (k pages, v pages, page table
        [slots, L / 64]), the unused pages poisoned."""
        import cupy as cp

        n_slots, L, Hkv, D = self.kc.shape
        W = L // 64
        table = rng.permutation(n_slots * W + spare_pages)[:n_slots * W].astype(np.int32)
        pages = []
        for cache in (self.kc, self.vc):
            paged = cp.full((n_slots * W + spare_pages, 64, Hkv, D), POISON, dtype=cp.uint16)
            paged[cp.asarray(table)] = cache.reshape(n_slots * W, 64, Hkv, D)
            pages.append(paged)
        return pages[0], pages[1], cp.asarray(table.reshape(n_slots, W))

    def reference(self, i, a, n, window):
        from gptoss import reference as R

        last = a + n
        def f(x):
            return from_bf16_bits(x).astype(np.float32)

        return R.attention(f(self.qrows(i, a, last)), f(self.k[i][:last]), f(self.v[i][:last]), self.sinks,
                           np.arange(a, last), np.arange(last), window or None)

    def check(self, parts, outs, window):
        for (i, a, n), out in zip(parts, outs):
            ref = self.reference(i, a, n, window)
            err = rel_err(from_bf16_bits(out), ref)
            assert err <= 1e-2, f"sequence {i} positions {a}..{a + n - 1}: rel err {err:.3g}"


# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("geometry", ["tiny", "real"])
def test_rope_and_cache(geometry):
    import cupy as cp

    from gptoss import reference as R
    from gptoss.ops import attention as A

    cfg = GEOMETRIES[geometry]
    rng = np.random.default_rng(1)
    Hq, Hkv, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    n_slots, L, max_pos = 3, 40, 300
    # positions past L wrap around the ring; (slot, position % L) pairs are all distinct
    positions = np.array([0, 5, 39, 40, 77, 123, 299, 41, 3, 250], np.int32)
    slots = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2, 0], np.int32)
    T = len(positions)
    qkv = rand_bf16(rng, (T, (Hq + 2 * Hkv) * D), 1.5)
    table = A.rope_table(cfg, max_pos)
    assert table.shape == (max_pos, D // 2, 2) and table.dtype == cp.float32
    kc = cp.full((n_slots, L, Hkv, D), POISON, dtype=cp.uint16)
    vc = cp.full_like(kc, POISON)
    q_out = cp.full((T, Hq, D), POISON, dtype=cp.uint16)
    q = A.rope_and_cache(cp.asarray(qkv), cp.asarray(positions), cp.asarray(slots), table, kc, vc, q_out=q_out)
    assert q is q_out

    x = from_bf16_bits(qkv).reshape(T, Hq + 2 * Hkv, D)
    cos, sin = R.rope_cos_sin(cfg, positions)
    q_ref = R.apply_rope(x[:, :Hq], cos, sin)
    k_ref = R.apply_rope(x[:, Hq:Hq + Hkv], cos, sin)
    assert rel_err(from_bf16_bits(cp.asnumpy(q)), q_ref) <= 1e-2
    kc_h, vc_h = cp.asnumpy(kc), cp.asnumpy(vc)
    k_got = kc_h[slots, positions % L]
    v_got = vc_h[slots, positions % L]
    assert rel_err(from_bf16_bits(k_got), k_ref) <= 1e-2
    assert np.array_equal(v_got, qkv.reshape(T, Hq + 2 * Hkv, D)[:, Hq + Hkv:])  # v is copied bit for bit
    written = np.zeros((n_slots, L), bool)
    written[slots, positions % L] = True
    assert (kc_h[~written] == POISON).all() and (vc_h[~written] == POISON).all(), "stray cache writes"

    # a position outside the table: NaN q, no cache write
    bad = A.rope_and_cache(cp.asarray(qkv[:1]), cp.asarray(np.array([max_pos], np.int32)),
                           cp.asarray(np.array([1], np.int32)), table, kc, vc)
    assert np.isnan(from_bf16_bits(cp.asnumpy(bad))).all()
    assert np.array_equal(cp.asnumpy(kc), kc_h)


@pytest.mark.parametrize("geometry,window,path", ATTN_CASES)
@pytest.mark.parametrize("n", [1, 7, 64, 200, 1000])
def test_prefill_one_sequence(geometry, window, path, n):
    cfg = GEOMETRIES[geometry]
    s = Seqs(cfg, [n], L=n + 5, rng=np.random.default_rng(n + window))
    s.write(0, 0, n)
    parts = [(0, 0, n)]
    s.check(parts, s.run(parts, window, path), window)


@pytest.mark.parametrize("geometry,window,path", ATTN_CASES)
def test_prefill_several_sequences(geometry, window, path):
    """Sequences of different lengths and slots in one launch, some already holding earlier positions
    (a later prefill chunk)."""
    cfg = GEOMETRIES[geometry]
    lengths = [300, 1, 45, 17, 130, 2]
    s = Seqs(cfg, lengths, L=320, rng=np.random.default_rng(7 + window), slots=[4, 0, 2, 5, 1, 3])
    for i, n in enumerate(lengths):
        s.write(i, 0, n)
    parts = [(0, 100, 200), (1, 0, 1), (2, 0, 45), (3, 16, 1), (4, 3, 127), (5, 0, 2)]
    s.check(parts, s.run(parts, window, path), window)


@pytest.mark.parametrize("geometry,window,path", ATTN_CASES)
def test_chunked_prefill_end_to_end(geometry, window, path):
    """qkv -> rope_and_cache -> attention, chunk after chunk. Sliding windows use a ring of
    window + largest chunk positions, so the chunks wrap around it."""
    import cupy as cp

    from gptoss import reference as R
    from gptoss.ops import attention as A

    cfg = GEOMETRIES[geometry]
    Hq, Hkv, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    rng = np.random.default_rng(11 + window)
    chunks = [200, 150, 250, 1, 99]
    N = sum(chunks)
    L = window + max(chunks) if window else N
    qkv = rand_bf16(rng, (N, (Hq + 2 * Hkv) * D), 1.5)
    sinks = rand_sinks(rng, Hq)
    table = A.rope_table(cfg, N)
    kc = cp.full((2, L, Hkv, D), POISON, dtype=cp.uint16)
    vc = cp.full_like(kc, POISON)
    outs, start = [], 0
    for c in chunks:
        pos = cp.arange(start, start + c, dtype=cp.int32)
        q = A.rope_and_cache(cp.asarray(qkv[start:start + c]), pos, cp.full(c, 1, dtype=cp.int32), table, kc, vc)
        batch = A.AttentionBatch.build([c], [1], [start], N)
        outs.append(cp.asnumpy(A.attention(q, kc, vc, batch, cp.asarray(sinks), window, path=path)))
        start += c
    out = from_bf16_bits(np.concatenate(outs)).reshape(N, Hq, D)

    x = from_bf16_bits(qkv).reshape(N, Hq + 2 * Hkv, D)
    cos, sin = R.rope_cos_sin(cfg, np.arange(N))
    q_ref = R.apply_rope(x[:, :Hq], cos, sin)
    k_ref = R.apply_rope(x[:, Hq:Hq + Hkv], cos, sin)
    ref = R.attention(q_ref, k_ref, x[:, Hq + Hkv:], sinks, np.arange(N), np.arange(N), window or None)
    assert rel_err(out, ref) <= 1e-2


@pytest.mark.parametrize("geometry,window,path", ATTN_CASES)
@pytest.mark.parametrize("batch", [1, 5, 64])
@pytest.mark.parametrize("context", [1, 127, 128, 129, 3000])
def test_decode(geometry, window, path, batch, context):
    """One query per sequence at position context - 1 (+ s % 3 for sequence s, so lengths differ).
    Sliding windows keep a ring of window + 16 positions, written many times over at long contexts."""
    cfg = GEOMETRIES[geometry]
    rng = np.random.default_rng(batch * 10007 + context + window)
    lengths = [context + s % 3 for s in range(batch)]
    L = min(window + 16, max(lengths)) if window else max(lengths)
    s = Seqs(cfg, lengths, L=L, rng=rng, slots=rng.permutation(batch), q_tail=1)
    parts = []
    for i, n in enumerate(lengths):
        s.write(i, max(0, n - L), n)  # the last L positions (all of them where they fit)
        parts.append((i, n - 1, 1))
    s.check(parts, s.run(parts, window, path), window)


# X, sequence 0 of INVARIANCE_LENGTHS: a prompt of P tokens, then decode tokens P..N-1
INVARIANCE_N, INVARIANCE_P = 700, 690
INVARIANCE_LENGTHS = [INVARIANCE_N, 333, 50, 1, 900, 129]
INVARIANCE_SLOTS = [3, 0, 5, 1, 4, 2]


def assert_batch_invariant(s, window):
    """The queries of sequence X (0) of `s` (a Seqs of INVARIANCE_LENGTHS, every position written) give
    bit-identical outputs however they are launched: its prompt as one chunk or as several, alone or among
    other sequences (before and after it in the batch), its later tokens as decode launches (one query per
    sequence: the split kernel) of various batch sizes and key bounds, or as one-query sequences inside a
    prefill launch (the prefill kernel). Also used by test_attention_fp8.py on an fp8 cache."""
    N, P, lengths = INVARIANCE_N, INVARIANCE_P, INVARIANCE_LENGTHS

    def prompt(chunks, neighbours):
        out, start = [], 0
        for c in chunks:
            parts = [(1, 10, 200), (2, 0, 50)] if neighbours else []
            parts = parts[:1] + [(0, start, c)] + parts[1:] + ([(4, 600, 77)] if neighbours else [])
            outs = s.run(parts, window)
            out.append(outs[1] if neighbours else outs[0])
            start += c
        return np.concatenate(out)

    base = prompt([P], False)
    s.check([(0, 0, P)], [base], window)
    assert np.array_equal(base, prompt([100, 250, 37, 303], False)), "chunking changed the bits"
    assert np.array_equal(base, prompt([P], True)), "neighbours changed the bits"
    assert np.array_equal(base, prompt([16, 1, 200, 473], True)), "chunks among neighbours changed the bits"

    def decode(pos, batch_size, max_kv=None):
        parts = [(1 + j % 5, min(10 + j, lengths[1 + j % 5] - 1), 1) for j in range(batch_size - 1)]
        parts.insert(batch_size // 2, (0, pos, 1))
        return s.run(parts, window, max_kv=max_kv)[batch_size // 2]

    dec = {}
    for pos in range(P, N):
        a = decode(pos, 1)
        b = decode(pos, 7)
        c = decode(pos, 40, max_kv=1024)  # a graph-style bound on the keys: more (empty) splits
        d = s.run([(4, 300, 200), (0, pos, 1), (1, 5, 1)], window)[1]  # inside a prefill launch
        assert np.array_equal(a, b) and np.array_equal(a, c), f"decode of position {pos} depends on the batch"
        assert np.array_equal(a, d), f"position {pos}: decode and prefill kernels disagree"
        dec[pos] = a
    # the decode tokens also match the same positions computed as part of a prompt chunk
    whole = s.run([(0, 0, N)], window)[0]
    assert np.array_equal(whole[:P], base)
    assert np.array_equal(whole[P:], np.concatenate([dec[p] for p in range(P, N)]))


@pytest.mark.parametrize("geometry", ["tiny", "real"])
@pytest.mark.parametrize("window", [0, 128])
def test_batch_invariance(geometry, window):
    """assert_batch_invariant on a bf16 cache."""
    s = Seqs(GEOMETRIES[geometry], INVARIANCE_LENGTHS, L=1024, rng=np.random.default_rng(5), slots=INVARIANCE_SLOTS)
    for i, n in enumerate(INVARIANCE_LENGTHS):
        s.write(i, 0, n)
    assert_batch_invariant(s, window)


@pytest.mark.parametrize("window", [0, 128])
@pytest.mark.parametrize("kernel_name", ["attn_prefill_wg_g8", "attn_prefill_wgs_g8"])
def test_wgmma_prefill_gives_the_mma_sync_bits(window, kernel_name, monkeypatch):
    """On sm_90a the G = 8 prefill runs its products on wgmma (ops.attention.PREFILL_WGMMA_KERNEL; both
    variants here): the same bits as the mma.sync kernel, for whole and partial 16-query blocks, short and
    long sequences, neighbours in the launch, and the reference's values."""
    from gptoss.kernels import default_kernels
    from gptoss.ops import attention as A

    if not default_kernels().sm90a("attention"):
        pytest.skip("no sm_90a wgmma kernels on this device")
    monkeypatch.setattr(A, "PREFILL_WGMMA_KERNEL", kernel_name)
    cfg = TINY_REAL_HEADS
    rng = np.random.default_rng(21)
    lengths = [3000, 333, 50, 17, 900]
    s = Seqs(cfg, lengths, L=4096, rng=rng, slots=[2, 0, 4, 1, 3])
    for i, n in enumerate(lengths):
        s.write(i, 0, n)
    parts = [(0, 0, 1000), (1, 100, 233), (0, 1000, 2000), (2, 0, 50), (3, 0, 17), (4, 37, 863)]
    fast = s.run(parts, window)
    slow = s.run(parts, window, path="mma_sync")
    for (i, a, n), f, m in zip(parts, fast, slow):
        assert np.array_equal(f, m), f"sequence {i} positions {a}..{a + n - 1}: wgmma and mma.sync bits differ"
    s.check(parts, fast, window)


@pytest.mark.parametrize("geometry,path", [("tiny", "auto"), ("real", "auto"), ("real", "simple")])
@pytest.mark.parametrize("window", [0, 128])
def test_paged_cache_gives_the_contiguous_bits(geometry, path, window):
    """The caches cut into 64-position pages in scrambled order, read through a page table, give the
    contiguous caches' outputs bit for bit: prompt chunks, decode queries, and both in one launch."""
    cfg = GEOMETRIES[geometry]
    rng = np.random.default_rng(21 + window)
    lengths = [700, 333, 64, 1, 129, 65]
    s = Seqs(cfg, lengths, L=768, rng=rng, slots=[3, 0, 5, 1, 2, 4])
    for i, n in enumerate(lengths):
        s.write(i, 0, n)
    paged = s.paged(rng)
    launches = [[(0, 600, 100), (1, 0, 333), (2, 63, 1), (3, 0, 1), (4, 100, 29), (5, 0, 65)],
                [(i, n - 1, 1) for i, n in enumerate(lengths)],
                [(0, 0, 700)]]
    for parts in launches:
        want = s.run(parts, window, path)
        s.check(parts, want, window)
        got = s.run(parts, window, path, paged=paged)
        assert all(np.array_equal(a, b) for a, b in zip(got, want)), f"paged cache changed the bits of {parts}"


@pytest.mark.parametrize("geometry", ["tiny", "real"])
def test_rope_and_cache_through_a_page_table(geometry):
    """rope_and_cache with a page table writes each token's K/V to row pos % 64 of page
    table[slot, pos // 64], the same bits as the contiguous write, and nothing else; a token whose
    position is past the table gets NaN q and writes nothing."""
    import cupy as cp

    from gptoss.ops import attention as A

    cfg = GEOMETRIES[geometry]
    Hq, Hkv, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    rng = np.random.default_rng(3)
    n_slots, L, n_pages = 3, 256, 20
    slots = np.array([0, 2, 2, 1, 0, 2, 1, 1], np.int32)
    positions = np.array([0, 63, 64, 200, 130, 255, 5, 256], np.int32)  # the last is past the table
    page_table = rng.permutation(n_pages)[:n_slots * 4].reshape(n_slots, 4).astype(np.int32)
    qkv = cp.asarray(rand_bf16(rng, (len(slots), (Hq + 2 * Hkv) * D)))
    rope = A.rope_table(cfg, 512)
    kc, vc = (cp.full((n_slots, L + 64, Hkv, D), POISON, dtype=cp.uint16) for _ in range(2))
    kp, vp = (cp.full((n_pages, 64, Hkv, D), POISON, dtype=cp.uint16) for _ in range(2))
    q_flat = A.rope_and_cache(qkv, cp.asarray(positions), cp.asarray(slots), rope, kc, vc)
    q_paged = A.rope_and_cache(qkv, cp.asarray(positions), cp.asarray(slots), rope, kp, vp,
                               page_table=cp.asarray(page_table))
    q_flat, q_paged = cp.asnumpy(q_flat), cp.asnumpy(q_paged)
    assert np.array_equal(q_paged[:-1], q_flat[:-1]) and np.isnan(from_bf16_bits(q_paged[-1])).all()
    written = np.zeros((n_pages, 64), bool)
    for flat, paged in ((kc, kp), (vc, vp)):
        flat, paged = cp.asnumpy(flat), cp.asnumpy(paged)
        for slot, pos in zip(slots[:-1], positions[:-1]):
            page = page_table[slot, pos // 64]
            assert np.array_equal(paged[page, pos % 64], flat[slot, pos])
            written[page, pos % 64] = True
        assert (paged[~written] == POISON).all(), "a write outside the tokens' rows"


def test_batch_load_in_place():
    """AttentionBatch.load refreshes a batch's device arrays in place (CUDA graph replay)."""
    cfg = TINY_REAL_HEADS
    s = Seqs(cfg, [300, 200, 129], L=512, rng=np.random.default_rng(9))
    for i, n in enumerate([300, 200, 129]):
        s.write(i, 0, n)
    import cupy as cp

    from gptoss.ops import attention as A

    fixed = A.AttentionBatch.build([1, 1, 1], [0, 1, 2], [0, 0, 0], 512, max_kv=512)
    step = A.AttentionBatch.build([1, 1, 1], [0, 1, 2], [299, 150, 128], 512)
    fixed.load(step)
    q = cp.asarray(np.concatenate([s.q[0][299:300], s.q[1][150:151], s.q[2][128:129]]))
    got = cp.asnumpy(A.attention(q, s.kc, s.vc, fixed, cp.asarray(s.sinks), 128)).reshape(3, cfg.num_heads, -1)
    want = s.run([(0, 299, 1), (1, 150, 1), (2, 128, 1)], 128)
    assert all(np.array_equal(got[j], want[j][0]) for j in range(3))
    with pytest.raises(ValueError):
        fixed.load(A.AttentionBatch.build([1, 1], [0, 1], [3, 4], 512))


def test_errors():
    import cupy as cp

    from gptoss.ops import attention as A

    cfg = TINY
    Hq, Hkv, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    table = A.rope_table(cfg, 64)
    kc = cp.zeros((2, 32, Hkv, D), dtype=cp.uint16)
    vc = cp.zeros_like(kc)
    qkv = cp.zeros((3, (Hq + 2 * Hkv) * D), dtype=cp.uint16)
    pos = cp.arange(3, dtype=cp.int32)
    slots = cp.zeros(3, dtype=cp.int32)
    with pytest.raises(ValueError):  # width not (Hq + 2 Hkv) D
        A.rope_and_cache(qkv[:, :-1].copy(), pos, slots, table, kc, vc)
    with pytest.raises(TypeError):  # positions not int32
        A.rope_and_cache(qkv, pos.astype(cp.int64), slots, table, kc, vc)
    with pytest.raises(ValueError):  # positions of the wrong length
        A.rope_and_cache(qkv, pos[:2], slots, table, kc, vc)
    with pytest.raises(ValueError):  # v cache of another shape
        A.rope_and_cache(qkv, pos, slots, table, kc, vc[:1].copy())
    with pytest.raises(ValueError):  # table of another head dim
        A.rope_and_cache(qkv, pos, slots, A.rope_table(TINY_REAL_HEADS, 64), kc, vc)
    with pytest.raises(ValueError):  # q_out of the wrong shape
        A.rope_and_cache(qkv, pos, slots, table, kc, vc, q_out=cp.zeros((3, Hq, D + 2), dtype=cp.uint16))

    with pytest.raises(ValueError):
        A.AttentionBatch.build([1, 2], [0], [0, 0], 32)  # lengths differ
    with pytest.raises(ValueError):
        A.AttentionBatch.build([0], [0], [0], 32)  # empty sequence
    with pytest.raises(ValueError):
        A.AttentionBatch.build([4], [0], [30], 32)  # past the capacity
    with pytest.raises(ValueError):
        A.AttentionBatch.build([4], [0], [0], 32, max_kv=3)  # bound below the keys

    batch = A.AttentionBatch.build([3], [0], [0], 32)
    q = cp.zeros((3, Hq, D), dtype=cp.uint16)
    sinks = cp.zeros(Hq, dtype=cp.float32)
    with pytest.raises(ValueError):  # q tokens differ from the batch's
        A.attention(q[:2].copy(), kc, vc, batch, sinks, 0)
    with pytest.raises(ValueError):  # sinks of the wrong length
        A.attention(q, kc, vc, batch, sinks[:-1].copy(), 0)
    with pytest.raises(TypeError):  # sinks not f32
        A.attention(q, kc, vc, batch, sinks.astype(cp.uint16), 0)
    with pytest.raises(ValueError):  # head dims differ
        A.attention(cp.zeros((3, Hq, D + 2), dtype=cp.uint16), kc, vc, batch, sinks, 0)
    with pytest.raises(ValueError):  # negative window
        A.attention(q, kc, vc, batch, sinks, -1)
    with pytest.raises(ValueError):  # full attention over more keys than the cache holds
        A.attention(q, kc[:, :2].copy(), vc[:, :2].copy(), batch, sinks, 0)
    big = A.AttentionBatch.build([20], [0], [100], 200)
    with pytest.raises(ValueError):  # a ring of 32 cannot hold window 16 + 20 queries
        A.attention(cp.zeros((20, Hq, D), dtype=cp.uint16), kc, vc, big, sinks, 16)
    with pytest.raises(ValueError):  # out of the wrong shape
        A.attention(q, kc, vc, batch, sinks, 0, out=cp.zeros((3, Hq * D + 1), dtype=cp.uint16))


@pytest.mark.parametrize("dtype,geometry", [("bf16", "tiny"), ("bf16", "real"), ("fp8", "real")])
def test_copy_kv_rows(dtype, geometry):
    """copy_kv_rows (the sliding layers' staging, gptoss.batch.WindowPlan): the destination rows get the
    source rows' bits, K from K and V from V; every other row keeps its poison; a pair with a row outside
    its cache copies nothing."""
    import cupy

    from gptoss.ops.attention import copy_kv_rows

    cfg = TINY if geometry == "tiny" else TINY_REAL_HEADS
    Hkv, D = cfg.num_kv_heads, cfg.head_dim
    rng = np.random.default_rng(7)
    itype = np.uint16 if dtype == "bf16" else np.uint8
    src = [rng.integers(0, 0x7F00, (5, 16, Hkv, D)).astype(itype) for _ in range(2)]  # finite, not zero
    poison = 0x7FC0 if dtype == "bf16" else 0x7F
    dst = [np.full((9, 64, Hkv, D), poison, itype) for _ in range(2)]
    n = 57
    rows = np.stack([rng.choice(5 * 16, n), rng.choice(9 * 64, n, replace=False)]).astype(np.int32)
    bad = np.asarray([[5 * 16, 3], [4, 9 * 64]], np.int32).T  # (source out of range, destination out of range)
    dev_dst = [cupy.asarray(a) for a in dst]
    copy_kv_rows(*[cupy.asarray(a) for a in src], *dev_dst, cupy.asarray(np.concatenate([rows, bad], axis=1)))
    for s, d, got in zip(src, dst, dev_dst):
        want = d.reshape(9 * 64, Hkv, D).copy()
        want[rows[1]] = s.reshape(5 * 16, Hkv, D)[rows[0]]
        np.testing.assert_array_equal(cupy.asnumpy(got).reshape(9 * 64, Hkv, D), want)
