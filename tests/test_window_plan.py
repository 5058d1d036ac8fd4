"""Prompt chunks through the sliding layers' rings of exactly the window (gptoss.batch.WindowPlan,
GPUModel._reordered), and the step budget that bounds a sequence's chunk (EngineConfig.step_tokens).
Host-side logic only: the plan's rows are checked here on NumPy stand-ins of the rings and the staging
cache that hold position numbers; the GPU's bits in tests/gpu/test_model.py
(test_long_chunks_through_the_staging_cache_give_the_unstaged_bits)."""
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from gptoss.batch import RowSampling, StepBatch, WindowPlan
from gptoss.config import TINY
from gptoss.engine import Engine, EngineConfig
from gptoss.engine.cpu_runner import CPUModelRunner
from gptoss.model import GPUModel
from gptoss.weights import random_weights


def step_of(lens, starts, seed=0):
    """A step of sequences with these token counts and start positions in slots 0, 1, ...: random tokens."""
    rng = np.random.default_rng(seed)
    return StepBatch.prefill([rng.integers(0, 1000, n) for n in lens], list(range(len(lens))), list(starts))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 40), st.integers(0, 90)), min_size=1, max_size=7),
       st.integers(1, 20), st.sampled_from([4, 8, 16]), st.integers(1, 3))
def test_staged_chunks_read_their_window_and_leave_it_in_the_ring(seqs, window, page, group_seqs):
    """Every query of a staged chunk finds each key of its window at the staging rows the plan gives, and
    after `keep` each ring holds the last `window` positions of its sequence (rings and staging cache as
    NumPy arrays of position numbers, the copies and the kernels' writes done as the GPU does them)."""
    lens, starts = [n for n, _ in seqs], [s for _, s in seqs]
    step = step_of(lens, starts)
    width = -(-(max(s + n for n, s in seqs) + 1) // page)
    tokens = sum(lens)
    pages = WindowPlan.pages(tokens, window, page, group_seqs)
    plan = WindowPlan.build(step.q_lens, step.seq_slots, step.seq_starts, window, page, width, pages, group_seqs)
    if max(lens) == 1:
        assert plan is None
        return
    # the tokens, reordered: one-token sequences first, then the groups; each sequence whole and in order
    assert sorted(plan.order.tolist()) == list(range(tokens))
    offset = 0
    for i, (n, slot, start) in enumerate(zip(plan.q_lens, plan.seq_slots, plan.seq_starts)):
        taken = plan.order[offset:offset + n]
        assert (step.slots[taken] == slot).all() and step.positions[taken].tolist() == list(range(start, start + n))
        assert (n == 1) == (i < plan.ring_seqs)
        offset += n
    assert plan.ring_end == sum(plan.q_lens[:plan.ring_seqs])
    edges = [(plan.ring_end, plan.ring_seqs)] + [(g.end, g.seq_end) for g in plan.groups]
    for (end, seq_end), g in zip(edges, plan.groups):
        assert (g.first, g.seq_first) == (end, seq_end) and 0 < g.seq_end - g.seq_first <= group_seqs
    assert edges[-1] == (tokens, len(plan.q_lens))

    slots = len(lens)
    ring = np.full((slots, window), -1)
    for slot, start in enumerate(starts):  # the rings before the step: each sequence's last `window` keys
        for p in range(max(0, start - window), start):
            ring[slot, p % window] = p
    for n, slot, start in zip(plan.q_lens[:plan.ring_seqs], plan.seq_slots, plan.seq_starts):
        ring[slot, start % window] = start  # a one-token sequence writes its ring, then reads its window
        assert all(ring[slot, p % window] == p for p in range(max(0, start - window + 1), start + 1))
    for g in plan.groups:
        stage = np.full((pages + 1) * page, -1)  # (its last page the spare one)
        assert g.table.shape == (g.seq_end - g.seq_first, width) and g.table.max() <= pages
        used = g.table[g.table < pages]
        assert len(np.unique(used)) == len(used)  # no page given twice
        stage[g.fill[1]] = ring.reshape(-1)[g.fill[0]]
        for t, row in enumerate(g.token_rows):  # rope_and_cache: the chunks' keys at their pages
            p = step.positions[plan.order[g.first + t]]
            stage[g.table[row, p // page] * page + p % page] = p
        for r in range(g.seq_end - g.seq_first):
            n, start = plan.q_lens[g.seq_first + r], plan.seq_starts[g.seq_first + r]
            for q in range(start, start + n):
                keys = np.arange(max(0, q - window + 1), q + 1)
                assert (stage[g.table[r, keys // page] * page + keys % page] == keys).all()
        ring.reshape(-1)[g.keep[1]] = stage[g.keep[0]]
    for slot, (n, start) in enumerate(seqs):
        for p in range(max(0, start + n - window), start + n):
            assert ring[slot, p % window] == p


def test_reordered_step_keeps_each_logit_row_on_its_token():
    step = step_of([1, 5, 1, 3, 300], [9, 0, 4, 40, 100])
    step.logit_rows = np.asarray([0, 5, 6, 9, 309], np.int32)
    step.sampling = RowSampling(np.arange(5, dtype=np.float32), np.ones(5, np.float32), np.zeros(5, np.uint32),
                                np.arange(5, dtype=np.int32), np.zeros(5, np.int32))
    plan = WindowPlan.build(step.q_lens, step.seq_slots, step.seq_starts, 8, 16, 32, 500, 2)
    new = GPUModel._reordered(step, plan)
    assert new.q_lens == [1, 1, 5, 3, 300] and new.seq_slots == [0, 2, 1, 3, 4]
    assert (plan.ring_end, plan.ring_seqs) == (2, 2)
    assert [(g.first, g.end, g.seq_first, g.seq_end) for g in plan.groups] == [(2, 10, 2, 4), (10, 310, 4, 5)]
    for old_row, new_row in zip(step.logit_rows, new.logit_rows):
        assert new.tokens[new_row] == step.tokens[old_row]
        assert new.positions[new_row] == step.positions[old_row] and new.slots[new_row] == step.slots[old_row]
    assert new.sampling is step.sampling  # rows keep their order: the sampler's inputs are untouched


def test_staging_only_where_a_ring_wraps():
    from gptoss.kv_cache import KVCache

    assert KVCache.staged(TINY, capacity=256) and not KVCache.staged(TINY, capacity=TINY.sliding_window)
    assert KVCache.staging_pages(TINY, TINY.sliding_window, 1000) == 0 < KVCache.staging_pages(TINY, 256, 1000)


def test_step_budget_bounds_a_sequences_chunk():
    config = EngineConfig(prefill_tokens=300)
    assert config.step_tokens(slots=4, capacity=2048) == (304, 300)
    assert config.step_tokens(slots=1, capacity=100) == (101, 100)


def test_a_lone_prompt_is_prefilled_a_whole_budget_per_step():
    weights = random_weights(TINY, "mxfp4", seed=5)
    runner = CPUModelRunner(weights, EngineConfig(prefill_tokens=48))
    seen = []
    step = runner.step
    runner.step = lambda batch: (seen.append(list(batch.q_lens)), step(batch))[1]
    engine = Engine(runner, runner.config)
    prompt = np.random.default_rng(3).integers(0, TINY.vocab_size, 130).tolist()
    engine.add_request(prompt)
    while engine.has_unfinished() and len(seen) < 4:
        engine.step()
    assert seen[:4] == [[48], [48], [34], [1]]  # 130 prompt tokens in budgets of 48, then one decode token
