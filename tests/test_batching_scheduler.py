"""The continuous-batching scheduler (GPUBackend.generate_steps) over a stand-in model, without a GPU.

The stand-in keeps a KV cache of token ids in pages, reached through the scheduler's page table like
the GPU model's, and its next token is a hash of every token in the row's cache up to its position.
So every request has one right answer, the one it gets alone, and it gets it only if the scheduler
feeds each sequence its own tokens at its own positions whatever else shares the step, gives every
position a page of its own, refills freed slots, honours stop ids, budgets, the context and -b, hands
the sampler each row's (request, tokens so far), and, when pages run out, preempts a sequence and
prefills it again (prompt + what it had generated) before it goes on."""
from types import SimpleNamespace

import numpy as np
import pytest

from gptoss.batching import GPUBackend, PagePool, pages_for
from gptoss.engine import Request, StepTokens, step_tokens
from gptoss.model import PAGE, PageTable
from gptoss.sampling import SamplingParams

VOCAB = 997


def next_token(tokens) -> int:
    h = 0
    for t in tokens:
        h = (h * 31 + int(t) + 1) % VOCAB
    return h


class StandInModel:
    """GPUModel's step() interface over a paged cache of token ids: next_token of the row's cached
    sequence; records what it was asked and checks every write has a page of its own."""

    def __init__(self, slots: int, capacity: int, chunk: int, step_tokens: int, pages: int | None = None):
        self.slots, self.capacity, self.max_step_tokens = slots, capacity, step_tokens
        width = -(-capacity // PAGE)
        table = PageTable(slots + 1, width, slots * width if pages is None else pages)
        self.cache = SimpleNamespace(max_chunk=chunk, page_table=table)
        self.kv = np.full((table.pages + 1, PAGE), -1, np.int64)
        self.steps = []

    def step(self, step, args, use_graph=True):
        table = self.cache.page_table
        held = table.host[table.host != table.spare]
        assert len(np.unique(held)) == len(held), "a page in two places of the table"
        r = step.logit_rows
        assert len(np.unique(step.slots[r])) == len(r), "two logit rows in one slot"
        assert step.positions.max() < self.capacity
        pages = table.host[step.slots, step.positions // PAGE]
        assert (pages != table.spare).all(), "a token written to a position without a page"
        self.kv[pages, step.positions % PAGE] = step.tokens
        self.steps.append((step, args))
        out = []
        for slot, pos in zip(step.slots[r].tolist(), step.positions[r].tolist()):
            p = np.arange(pos + 1)
            out.append(next_token(self.kv[table.host[slot, p // PAGE], p % PAGE]))
        return np.asarray(out, np.int32)


def backend_with(model, max_context=4096, prefill_tokens=48, promise=0.0):
    b = object.__new__(GPUBackend)  # no GPU: the scheduler alone, over the stand-in
    b.config = SimpleNamespace(max_context=max_context)
    b.use_graphs, b.step_prefill_tokens, b.stats, b.model = True, prefill_tokens, {}, model
    b.promise = promise
    b._model_for = lambda *args: model
    return b


def alone(prompt, max_new, stop_ids=(), max_context=4096):
    """The request's tokens and end reason when it runs by itself."""
    seq, out = list(prompt), []
    for _ in range(min(max_new, max_context - len(prompt))):
        tok = next_token(seq)
        if tok in stop_ids:
            return out, "stop"
        out.append(tok)
        seq.append(tok)
    return out, "length"


def run(backend, requests, **kw):
    got = {r.index: [] for r in requests}
    ended = {}
    for step in backend.generate_steps(requests, SamplingParams(), **kw):
        assert isinstance(step, StepTokens)
        for i, tok, done, stop in zip(step.index.tolist(), step.token.tolist(), step.done.tolist(),
                                      step.stopped.tolist()):
            assert i not in ended, f"request {i} got a token after it ended"
            assert tok >= 0 or done  # no token: the request ends (stop id or no budget)
            assert not stop or tok == -1
            if tok >= 0:
                got[i].append(tok)
            if done:
                ended[i] = "stop" if stop else "length"
    assert set(ended) == set(got), "every request ends exactly once"
    return got, ended


def random_requests(rng, n, max_new=(1, 40), prompt_len=(1, 90)):
    return [Request(i, rng.integers(0, VOCAB, rng.integers(*prompt_len)).tolist(), int(rng.integers(*max_new)))
            for i in range(n)]


@pytest.mark.parametrize("slots", [1, 3, 16])
def test_each_request_gets_what_it_gets_alone(slots):
    rng = np.random.default_rng(slots)
    requests = random_requests(rng, 40)
    model = StandInModel(slots, capacity=256, chunk=32, step_tokens=slots + 48)
    got, ended = run(backend_with(model), requests, ignore_eos=True)
    for r in requests:
        assert (got[r.index], ended[r.index]) == alone(r.prompt_ids, r.max_new)
    assert max(len(step.logit_rows) for step, _ in model.steps) <= slots


def test_stop_ids_end_a_request_without_emitting_the_stop():
    rng = np.random.default_rng(7)
    requests = random_requests(rng, 30, max_new=(30, 60))
    stops = {5, 17, 99, 500, 731}
    model = StandInModel(8, capacity=256, chunk=32, step_tokens=64)
    got, ended = run(backend_with(model), requests, stop_ids=stops)
    assert "stop" in ended.values()  # the stand-in hits the stop ids on some requests
    for r in requests:
        assert (got[r.index], ended[r.index]) == alone(r.prompt_ids, r.max_new, stops)
    got, ended = run(backend_with(StandInModel(8, 256, 32, 64)), requests, stop_ids=stops, ignore_eos=True)
    assert set(ended.values()) == {"length"}


@pytest.mark.parametrize("pages", [None, 7])  # 7: too few, sequences are preempted and resumed
def test_sampler_gets_each_rows_request_and_tokens_so_far(pages):
    rng = np.random.default_rng(3 if pages is None else 4)
    requests = random_requests(rng, 20, max_new=(1, 40) if pages is None else (30, 90), prompt_len=(1, 100))
    model = StandInModel(5 if pages is None else 6, capacity=256, chunk=16, step_tokens=40, pages=pages)
    backend = backend_with(model, prefill_tokens=20)
    run(backend, requests, ignore_eos=True)
    if pages is not None:
        assert backend.stats["preemptions"] > 0
    made = {r.index: 0 for r in requests}
    for step, args in model.steps:
        for seq, k in zip(args.sequences.tolist(), args.steps.tolist()):
            assert k == made[seq]
            made[seq] += 1
    assert made == {r.index: r.max_new for r in requests}


def test_max_batch_and_context_limits():
    rng = np.random.default_rng(11)
    requests = random_requests(rng, 12, max_new=(50, 80), prompt_len=(20, 60))
    model = StandInModel(8, capacity=100, chunk=32, step_tokens=64)
    got, ended = run(backend_with(model, max_context=100), requests, ignore_eos=True, max_batch=3)
    assert max(len(step.logit_rows) for step, _ in model.steps) <= 3
    for r in requests:  # generation stops at the context's end
        assert got[r.index] == alone(r.prompt_ids, r.max_new, max_context=100)[0]
        assert len(r.prompt_ids) + len(got[r.index]) <= 100


def test_zero_budget_and_token_events_agree_with_steps():
    requests = [Request(0, list(range(10)), 0), Request(1, [3, 4, 5], 4), Request(2, [9] * 8, 2)]
    got, ended = run(backend_with(StandInModel(2, 64, 8, 16)), requests, ignore_eos=True)
    assert got[0] == [] and ended[0] == "length"
    events = list(backend_with(StandInModel(2, 64, 8, 16)).generate(requests, SamplingParams(), ignore_eos=True))
    for r in requests:
        mine = [e for e in events if e.index == r.index]
        assert [e.token for e in mine if e.token is not None] == got[r.index]
        assert [e.done for e in mine] == [False] * (len(mine) - 1) + [True]
        assert mine[-1].reason == ended[r.index]
    # step_tokens takes a backend's own per-step stream, or wraps its TokenEvents
    b = backend_with(StandInModel(2, 64, 8, 16))
    wrapped = SimpleNamespace(generate=b.generate)
    flat = [(i, t) for s in step_tokens(wrapped, requests, SamplingParams(), ignore_eos=True)
            for i, t in zip(s.index.tolist(), s.token.tolist())]
    assert flat == [(e.index, -1 if e.token is None else e.token) for e in events]


@pytest.mark.parametrize("pages,promise", [(5, 0.0), (9, 0.0), (12, 0.3)])
def test_preempted_sequences_get_what_they_get_alone(pages, promise):
    """Too few pages for the slots: sequences are preempted, prefilled again and continued, and still
    get exactly their tokens alone; every page comes back at the end."""
    rng = np.random.default_rng(pages)
    requests = random_requests(rng, 40, max_new=(20, 120), prompt_len=(1, 130))
    model = StandInModel(8, capacity=256, chunk=32, step_tokens=64, pages=pages)
    backend = backend_with(model, promise=promise)
    got, ended = run(backend, requests, ignore_eos=True)
    for r in requests:
        assert (got[r.index], ended[r.index]) == alone(r.prompt_ids, r.max_new)
    assert backend.stats["preemptions"] > 0 and backend.stats["recomputed_tokens"] > 0
    table = model.cache.page_table
    assert (table.host == table.spare).all(), "a finished sequence kept its pages"


def test_page_pool_hands_out_each_page_once():
    table = PageTable(5, 4, 12)
    pool = PagePool(table)
    pool.grow([0, 3], [1, 130])  # 1 page, 3 pages
    pool.grow([0, 1], [64, 65])  # slot 0 keeps its page; slot 1 takes 2
    pool.grow([3], [100])  # already holds them: nothing
    assert pool.held.tolist() == [1, 2, 0, 3, 0] and pool.available == 12 - 6
    held = np.concatenate([table.host[s, :n] for s, n in enumerate(pool.held)])
    assert sorted(held.tolist()) == list(range(6))
    assert (table.host[2] == table.spare).all() and (table.host[0, 1:] == table.spare).all()
    pool.release(3)
    assert (table.host[3] == table.spare).all() and pool.available == 12 - 3
    pool.grow([2], [4 * PAGE])
    assert len(set(table.host[2].tolist()) | set(table.host[0, :1].tolist()) | set(table.host[1, :2].tolist())) == 7
    pool.grow([0], [4 * PAGE])  # 3 more: 2 left
    with pytest.raises(RuntimeError, match="out of pages"):
        pool.grow([4], [4 * PAGE])
    assert pages_for([0, 1, 64, 65]).tolist() == [0, 1, 1, 2]


def test_an_abandoned_generation_leaves_no_pages_behind():
    """A consumer that stops reading mid-run (an interrupted chat turn) leaves pages in the table; the
    next generation starts from an empty table and gets every request right."""
    rng = np.random.default_rng(8)
    requests = random_requests(rng, 12, max_new=(20, 40), prompt_len=(30, 120))
    model = StandInModel(4, capacity=256, chunk=32, step_tokens=64, pages=10)
    backend = backend_with(model)
    steps = backend.generate_steps(requests, SamplingParams(), ignore_eos=True)
    for _ in range(6):
        next(steps)
    steps.close()
    got, ended = run(backend, requests, ignore_eos=True, max_batch=1)  # one slot: the others keep their rows
    for r in requests:
        assert (got[r.index], ended[r.index]) == alone(r.prompt_ids, r.max_new)


def test_modeled_runs_promise_one_never_preempts():
    """benchmarks/sim_scheduler.py over the real 20b plan: with the whole budget promised no sequence is
    preempted, with none promised they are (a small memory), and paging runs more sequences at once
    than slots of a whole capacity."""
    import re

    from benchmarks.sim_scheduler import simulate
    from gptoss.config import GPT_OSS_20B

    lengths = np.random.default_rng(0).integers(64, 513, 120)
    rows = {name: simulate(GPT_OSS_20B, lengths, 256, 4.0, 0.0, promise, paged)
            for name, promise, paged in (("flat", 1.0, False), ("p0", 0.0, True), ("p1", 1.0, True))}
    numbers = {name: dict(re.findall(r"(most running|preemptions)\s+(\d+)", row)) for name, row in rows.items()}
    assert numbers["p1"]["preemptions"] == "0" and numbers["flat"]["preemptions"] == "0"
    assert int(numbers["p0"]["preemptions"]) > 0
    assert int(numbers["p1"]["most running"]) > int(numbers["flat"]["most running"])
