"""The whole engine on the CPU: the scheduler over the NumPy reference (CPUModelRunner) on a tiny random
model. Requests join a running engine and one is aborted mid-generation; preemptions prefill sequences
again; sampled requests carry their own params. Every request still gets exactly the tokens it gets
alone, which are the reference's own."""
import numpy as np
import pytest

from gptoss.config import TINY
from gptoss.engine import Engine, EngineConfig
from gptoss.engine.cpu_runner import CPUModelRunner
from gptoss.reference import ReferenceModel
from gptoss.sampling import SamplingParams, sample_row
from gptoss.weights import random_weights


@pytest.fixture(scope="module")
def weights():
    return random_weights(TINY, "mxfp4", seed=5)


def prompts(seed, n, lengths=(1, 70)):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, TINY.vocab_size, int(m)).tolist() for m in rng.integers(*lengths, n)]


def reference_tokens(model, prompt, params, sequence):
    """The reference fed one token at a time, each draw from its own logits (sampling.py)."""
    cache, out = model.new_cache(), []
    for t in prompt:
        logits = model.forward([t], cache)[-1]
    for step in range(min(params.max_tokens, TINY.max_context - len(prompt))):
        out.append(sample_row(logits, params, sequence, step))
        if step + 1 < params.max_tokens:
            logits = model.forward([out[-1]], cache)[-1]
    return out


def run(engine, requests):
    """requests: (prompt, params) -> each request's tokens, in order."""
    ids = [engine.add_request(p, params) for p, params in requests]
    got = {i: [] for i in ids}
    while engine.has_unfinished():
        for ev in engine.step():
            if ev.token is not None:
                got[ev.request_id].append(ev.token)
    return [got[i] for i in ids]


def alone(weights, prompt, params, sequence=0):
    engine = Engine(CPUModelRunner(weights))
    engine.add_request(prompt, params, sequence=sequence)
    got = []
    while engine.has_unfinished():
        got += [ev.token for ev in engine.step() if ev.token is not None]
    return got


def test_alone_is_the_reference(weights):
    model = ReferenceModel(weights)
    for i, prompt in enumerate(prompts(1, 3)):
        params = SamplingParams(max_tokens=12, temperature=0.0 if i == 0 else 0.9, top_p=0.8, seed=3)
        assert alone(weights, prompt, params, sequence=i) == reference_tokens(model, prompt, params, i)


def test_requests_join_a_running_engine_and_one_is_aborted(weights):
    """Four requests start; three more join after a few steps; one is aborted mid-generation. Every
    other request gets exactly its tokens alone; the aborted one's slot and pages are free at once."""
    engine = Engine(CPUModelRunner(weights, EngineConfig(max_seqs=6)))
    params = SamplingParams(max_tokens=20)
    first, later = prompts(2, 4), prompts(3, 3)
    ids = [engine.add_request(p, params) for p in first]
    got = {i: [] for i in ids}

    def step():
        for ev in engine.step():
            assert ev.request_id != victim, "a token after the abort"
            if ev.token is not None:
                got[ev.request_id].append(ev.token)

    victim = None
    for _ in range(3):
        step()
    ids += [engine.add_request(p, params) for p in later]
    got.update({i: [] for i in ids[4:]})
    for _ in range(4):
        step()
    victim = ids[1]
    s = engine.scheduler
    slot = s.state.request.tolist().index(victim)
    assert s.state.decoding[slot] and 0 < len(got[victim]) < 20  # mid-generation
    free_slots, free_pages, held = len(s.free), s.pool.available, int(s.pool.held[slot])
    assert engine.abort(victim)
    assert len(s.free) == free_slots + 1 and s.pool.available == free_pages + held and held > 0
    assert s.state.request[slot] == -1 and not s.state.decoding[slot]
    while engine.has_unfinished():
        step()
    for i, prompt in zip(ids, first + later):
        if i != victim:
            assert got[i] == alone(weights, prompt, params), f"request {i}"
    assert got[victim] == alone(weights, first[1], params)[:len(got[victim])]


@pytest.mark.parametrize("swap_space", [0.0, 1.0])
def test_preemption_and_recompute_keep_the_tokens(weights, swap_space):
    """A KV cache of few pages: sequences are preempted and prefilled again (prompt + their tokens so
    far; swap_space 0) or swapped out and back (the decoding ones), and still get their tokens alone,
    sampled or greedy."""
    reqs = [(p, SamplingParams(max_tokens=40, temperature=0.0 if i % 2 else 1.0, seed=i))
            for i, p in enumerate(prompts(4, 8, (60, 130)))]
    engine = Engine(CPUModelRunner(weights, EngineConfig(max_seqs=6, num_pages=5, promise=0.0, prefill_tokens=32,
                                                         swap_space=swap_space)))
    crowd = run(engine, reqs)
    assert engine.stats["preemptions"] > 0
    assert engine.stats["swaps" if swap_space else "recomputed_tokens"] > 0
    assert not engine.runner.swapped
    for i, (prompt, params) in enumerate(reqs):
        assert crowd[i] == alone(weights, prompt, params, sequence=i), f"request {i}"
    pool = engine.scheduler.pool
    assert pool.available == pool.pages


def test_each_request_samples_with_its_own_params(weights):
    """Requests with different temperature, top_p and seed in one batch: each gets its tokens alone
    (its draws depend on its own (seed, sequence, step) only)."""
    reqs = [(p, SamplingParams(max_tokens=10, temperature=[0.0, 0.7, 1.3][i % 3], top_p=[1.0, 0.9][i % 2],
                               seed=100 + i)) for i, p in enumerate(prompts(6, 6))]
    crowd = run(Engine(CPUModelRunner(weights, EngineConfig(max_seqs=6))), reqs)
    for i, (prompt, params) in enumerate(reqs):
        assert crowd[i] == alone(weights, prompt, params, sequence=i)
    assert len({tuple(t) for t in crowd}) == len(crowd)


def test_a_reserved_cache_lets_a_request_join_at_once(weights):
    """Without reserve, a request that arrives while one runs waits for the engine to go idle (the cache
    was sized for the first alone); after reserve(context, slots) it is admitted at the next step."""
    params = SamplingParams(max_tokens=10)
    a, b = prompts(4, 2)
    for reserved in (False, True):
        engine = Engine(CPUModelRunner(weights, EngineConfig(max_seqs=4)))
        if reserved:
            engine.reserve(TINY.max_context, 4)
        first = engine.add_request(a, params)
        engine.step()
        second = engine.add_request(b, params)
        seen = {ev.request_id for ev in engine.step()}
        assert (second in seen) == reserved and first in seen
        while engine.has_unfinished():
            engine.step()
        if reserved:
            assert engine.scheduler.layout.slots == 4  # the demand of both (2 slots) did not resize it
    with pytest.raises(RuntimeError, match="only be reserved while no request is held"):
        engine.add_request(a, params)
        engine.reserve(TINY.max_context, 4)


def test_fp8_kv_cache_on_the_cpu_is_the_fp8_reference(weights):
    """EngineConfig(kv_cache_dtype="fp8") on the CPU runs the reference with K and V rounded to e4m3:
    a batch of greedy requests gets exactly ReferenceModel(kv_fp8=True)'s tokens."""
    model = ReferenceModel(weights, kv_fp8=True)
    engine = Engine(CPUModelRunner(weights, EngineConfig(max_seqs=3, kv_cache_dtype="fp8")))
    assert "fp8" in engine.runner.name
    reqs = [(p, SamplingParams(max_tokens=10)) for p in prompts(8, 4)]
    got = run(engine, reqs)
    assert got == [reference_tokens(model, p, params, i) for i, (p, params) in enumerate(reqs)]
    with pytest.raises(ValueError, match="FP8"):
        CPUModelRunner(weights, EngineConfig(kv_cache_dtype="fp8"), model=model)


def test_dense_experts_on_the_cpu_is_refused(weights):
    """The dense expert copy is for the GPU's wgmma kernels: the CPU reference refuses it in one line."""
    with pytest.raises(ValueError, match="CPU reference"):
        CPUModelRunner(weights, EngineConfig(dense_experts=True))
