"""Long prompt chunks: the step budget, not a fixed chunk, bounds what one sequence prefills per step
(EngineConfig.step_tokens), and the GPU model takes such chunks through the sliding layers' rings in
runs (gptoss.batch.RunOrder, GPUModel._reordered). Host-side logic only; the GPU's bits are checked in
tests/gpu/test_model.py::test_long_chunks_through_the_rings_give_the_chunked_bits."""
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from gptoss.batch import RowSampling, RunOrder, StepBatch
from gptoss.config import TINY
from gptoss.engine import Engine, EngineConfig
from gptoss.engine.cpu_runner import CPUModelRunner
from gptoss.model import GPUModel
from gptoss.weights import random_weights


def step_of(lens, run_seed=0):
    """A step of sequences with these token counts: slot i, start position 7 * i, random tokens."""
    rng = np.random.default_rng(run_seed)
    chunks = [rng.integers(0, 1000, n) for n in lens]
    return StepBatch.prefill(chunks, list(range(len(lens))), [7 * i for i in range(len(lens))])


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 40), min_size=1, max_size=6), st.integers(1, 12))
def test_runs_cover_every_token_once_and_pieces_hold_one_run_per_sequence(lens, run):
    step = step_of(lens)
    runs = RunOrder.split(step.q_lens, step.seq_slots, step.seq_starts, run)
    if max(lens) <= run:
        assert runs is None
        return
    T = sum(lens)
    assert sorted(runs.order.tolist()) == list(range(T))
    assert sum(runs.q_lens) == T and max(runs.q_lens) <= run
    # each run is `q_len` consecutive tokens of one sequence, from its start position on
    offset = 0
    for n, slot, start in zip(runs.q_lens, runs.seq_slots, runs.seq_starts):
        taken = runs.order[offset:offset + n]
        assert (step.slots[taken] == slot).all()
        assert step.positions[taken].tolist() == list(range(start, start + n))
        offset += n
    # pieces tile the tokens and the runs in order; a sequence has at most one run in a piece, and a
    # later piece holds later positions of it
    assert runs.pieces[0][0] == 0 and runs.pieces[-1][1] == T and runs.pieces[-1][3] == len(runs.q_lens)
    last = {}
    for (a, e, r0, r1), nxt in zip(runs.pieces, runs.pieces[1:] + [None]):
        assert e - a == sum(runs.q_lens[r0:r1])
        if nxt is not None:
            assert nxt[0] == e and nxt[2] == r1
        slots = runs.seq_slots[r0:r1]
        assert len(set(slots)) == len(slots)
        for slot, start in zip(slots, runs.seq_starts[r0:r1]):
            assert start > last.get(slot, -1)
            last[slot] = start
    assert len(runs.pieces) == -(-max(lens) // run)


def test_reordered_step_keeps_each_logit_row_on_its_token():
    step = step_of([1, 1, 600, 3, 300])
    step.logit_rows = np.asarray([0, 1, 601, 604, 904], np.int32)
    step.sampling = RowSampling(np.arange(5, dtype=np.float32), np.ones(5, np.float32), np.zeros(5, np.uint32),
                                np.arange(5, dtype=np.int32), np.zeros(5, np.int32))
    runs = RunOrder.split(step.q_lens, step.seq_slots, step.seq_starts, 256)
    new = GPUModel._reordered(step, runs)
    assert new.q_lens == [1, 1, 256, 3, 256, 256, 44, 88]
    for old_row, new_row in zip(step.logit_rows, new.logit_rows):
        assert new.tokens[new_row] == step.tokens[old_row]
        assert new.positions[new_row] == step.positions[old_row] and new.slots[new_row] == step.slots[old_row]
    assert new.sampling is step.sampling  # rows keep their order: the sampler's inputs are untouched
    assert runs.pieces == [(0, 517, 0, 5), (517, 817, 5, 7), (817, 905, 7, 8)]


def test_ring_run_only_where_a_ring_wraps():
    assert GPUModel.ring_run(TINY, capacity=256, max_chunk=16) == 16  # window 8 + 16 < 256
    assert GPUModel.ring_run(TINY, capacity=24, max_chunk=16) is None  # the ring holds whole sequences


def test_step_budget_bounds_a_sequences_chunk_not_the_ring_chunk():
    config = EngineConfig(prefill_tokens=300, prefill_chunk=16)
    assert config.step_tokens(slots=4, capacity=2048) == (304, 300)
    assert config.step_tokens(slots=1, capacity=100) == (101, 100)


def test_a_lone_prompt_is_prefilled_a_whole_budget_per_step():
    weights = random_weights(TINY, "mxfp4", seed=5)
    runner = CPUModelRunner(weights, EngineConfig(prefill_tokens=48, prefill_chunk=8))
    seen = []
    step = runner.step
    runner.step = lambda batch: (seen.append(list(batch.q_lens)), step(batch))[1]
    engine = Engine(runner, runner.config)
    prompt = np.random.default_rng(3).integers(0, TINY.vocab_size, 130).tolist()
    engine.add_request(prompt)
    while engine.has_unfinished() and len(seen) < 4:
        engine.step()
    assert seen[:4] == [[48], [48], [34], [1]]  # 130 prompt tokens in budgets of 48, then one decode token
