"""The engine's scheduler (gptoss/engine) over a stand-in runner, without a GPU.

The stand-in keeps a KV cache of token ids in pages, reached through the page table the steps carry
(StepBatch.page_table) like the GPU model's, and its next token is a hash of every token in the row's
cache up to its position. So every request has one right answer, the one it gets alone, and it gets
it only if the scheduler feeds each sequence its own tokens at its own positions whatever else shares
the step, gives every position a page of its own, sends the table whenever it changes, refills freed
slots, honours stop ids, budgets, the context and max_seqs, hands the sampler each row's (request,
tokens so far), and, when pages run out, preempts a sequence and either copies its KV out and back
into other pages (a swap: the stand-in poisons the pages it leaves) or prefills it again (prompt + what
it had generated) before it goes on. Requests join and leave (abort) between any two steps."""
import dataclasses

import numpy as np
import pytest

from gptoss.config import TINY
from gptoss.engine import Engine, EngineConfig, Layout, StepTokens
from gptoss.engine.pages import PagePool, pages_for
from gptoss.kv_cache import PAGE
from gptoss.sampling import SamplingParams

VOCAB = 997


def next_token(tokens) -> int:
    h = 0
    for t in tokens:
        h = (h * 31 + int(t) + 1) % VOCAB
    return h


class StandInRunner:
    """A ModelRunner over a paged cache of token ids: next_token of the row's cached sequence; records
    the steps it ran and checks every write has a page of its own. Its cache has a fixed layout,
    whatever the engine asks for."""

    name = "stand-in"

    def __init__(self, slots: int, capacity: int, chunk: int, step_tokens: int, pages: int | None = None,
                 config: EngineConfig = EngineConfig(), max_context: int = 4096, swap_pages: int = 0,
                 slot_pages: int = 0):
        self.config = config
        self.model_config = dataclasses.replace(TINY, vocab_size=VOCAB, max_context=max_context)
        width = -(-capacity // PAGE)
        self.layout = Layout(slots, capacity, slots * width if pages is None else pages, step_tokens, chunk,
                             swap_pages, slot_pages)
        self.kv = np.full((self.layout.pages + 1, PAGE), -1, np.int64)
        self.swapped = {}  # key -> the token ids of its pages ("host memory")
        self.table = None  # the runner's copy of the page table ("on the device")
        self.steps = []
        self.allocations = 0

    def allocate(self, capacity, slots, mean_positions):
        assert capacity <= self.layout.capacity
        self.allocations += 1
        self.table = np.full((self.layout.slots + 1, self.layout.width), self.layout.pages, np.int32)
        return self.layout

    def step(self, batch):
        for move in batch.swaps:
            if move.kind == "out":
                assert move.key not in self.swapped and len(move.pages)
                self.swapped[move.key] = self.kv[move.pages].copy()
                self.kv[move.pages] = -7  # whatever is not copied back gives wrong tokens
            elif move.kind == "in":
                rows = self.swapped.pop(move.key)
                assert len(move.pages) == len(rows), "a swapped sequence comes back into as many pages"
                self.kv[move.pages] = rows
            else:
                assert move.kind == "drop"
                self.swapped.pop(move.key, None)
        if batch.page_table is not None:
            self.table = batch.page_table.copy()
        elif batch.page_updates is not None:  # (the GPU's KVCache.update_page_table, on the host)
            index, values = batch.page_updates
            assert len(np.unique(index)) == len(index), "an entry updated twice in one step"
            self.table.reshape(-1)[index] = values
        table, spare = self.table, self.layout.pages
        held = table[table != spare]
        assert len(np.unique(held)) == len(held), "a page in two places of the table"
        r = batch.logit_rows
        assert len(np.unique(batch.slots[r])) == len(r), "two logit rows in one slot"
        assert batch.positions.max() < self.layout.capacity
        assert len(batch.tokens) <= self.layout.max_step_tokens
        pages = table[batch.slots, batch.positions // PAGE]
        assert (pages != spare).all(), "a token written to a position without a page"
        self.kv[pages, batch.positions % PAGE] = batch.tokens
        self.steps.append(batch)
        out = []
        for slot, pos in zip(batch.slots[r].tolist(), batch.positions[r].tolist()):
            p = np.arange(pos + 1)
            out.append(next_token(self.kv[table[slot, p // PAGE], p % PAGE]))
        return np.asarray(out, np.int32)


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


def collect(engine, got, ended, steps=None):
    """Run the engine until it is done (or for `steps` steps), checking each step's record."""
    n = 0
    while engine.has_unfinished() and (steps is None or n < steps):
        step = engine.step()
        assert isinstance(step, StepTokens)
        n += 1
        for ev in step:
            assert ev.request_id not in ended, f"request {ev.request_id} got a token after it ended"
            assert ev.token is not None or ev.done  # no token: the request ends on a stop id
            if ev.token is not None:
                got[ev.request_id].append(ev.token)
            if ev.done:
                ended[ev.request_id] = ev.reason
    return got, ended


def run(runner, requests, stop_ids=(), ignore_eos=False, **params):
    """requests: (prompt, max_new) pairs -> {index: tokens}, {index: reason}."""
    engine = Engine(runner)
    ids = [engine.add_request(p, SamplingParams(max_tokens=m, stop_token_ids=tuple(stop_ids), ignore_eos=ignore_eos,
                                                **params)) for p, m in requests]
    assert ids == list(range(len(requests)))
    got, ended = collect(engine, {i: [] for i in ids}, {})
    assert set(ended) == set(ids), "every request ends exactly once"
    assert not engine.has_unfinished() and len(engine.step()) == 0
    return got, ended, engine


def random_requests(rng, n, max_new=(1, 40), prompt_len=(1, 90)):
    return [(rng.integers(0, VOCAB, rng.integers(*prompt_len)).tolist(), int(rng.integers(*max_new)))
            for _ in range(n)]


def pages_all_free(engine) -> bool:
    pool = engine.scheduler.pool
    return pool.available == pool.pages and (pool.table == pool.spare).all() and not pool.held.any()


@pytest.mark.parametrize("slots", [1, 3, 16])
def test_each_request_gets_what_it_gets_alone(slots):
    rng = np.random.default_rng(slots)
    requests = random_requests(rng, 40)
    runner = StandInRunner(slots, capacity=256, chunk=32, step_tokens=slots + 48,
                           config=EngineConfig(prefill_tokens=48, promise=0.0))
    got, ended, engine = run(runner, requests)
    for i, (prompt, max_new) in enumerate(requests):
        assert (got[i], ended[i]) == alone(prompt, max_new)
    assert max(len(step.logit_rows) for step in runner.steps) <= slots
    assert runner.allocations == 1 and pages_all_free(engine)


def test_step_composition_decode_first_in_slot_order_then_prompt_chunks():
    """Every step: the decode tokens of the decoding sequences in slot order, then prompt chunks of at
    most `chunk` tokens, within the step's prefill budget."""
    rng = np.random.default_rng(2)
    runner = StandInRunner(6, capacity=256, chunk=24, step_tokens=6 + 40,
                           config=EngineConfig(prefill_tokens=40))
    run(runner, random_requests(rng, 25, prompt_len=(1, 100)))
    for step in runner.steps:
        q = np.asarray(step.q_lens)
        n_decode = int(np.argmax(q > 1)) if (q > 1).any() else len(q)
        decode_slots = step.seq_slots[:n_decode]
        assert decode_slots == sorted(decode_slots)
        assert (q[:n_decode] == 1).all() and (q <= 24).all()
        assert len(step.tokens) - n_decode <= 40


def test_stop_ids_end_a_request_without_emitting_the_stop():
    rng = np.random.default_rng(7)
    requests = random_requests(rng, 30, max_new=(30, 60))
    stops = {5, 17, 99, 500, 731}
    got, ended, _ = run(StandInRunner(8, capacity=256, chunk=32, step_tokens=64), requests, stop_ids=stops)
    assert "stop" in ended.values()  # the stand-in hits the stop ids on some requests
    for i, (prompt, max_new) in enumerate(requests):
        assert (got[i], ended[i]) == alone(prompt, max_new, stops)
    # the engine's end-of-sequence ids stop every request unless it says ignore_eos
    engine = Engine(StandInRunner(8, 256, 32, 64), eos_token_ids=stops)
    ids = [engine.add_request(p, SamplingParams(max_tokens=m, ignore_eos=i % 2 == 1))
           for i, (p, m) in enumerate(requests)]
    got, ended = collect(engine, {i: [] for i in ids}, {})
    for i, (prompt, max_new) in enumerate(requests):
        assert (got[i], ended[i]) == alone(prompt, max_new, () if i % 2 else stops)


def test_each_request_has_its_own_stop_ids():
    rng = np.random.default_rng(17)
    requests = random_requests(rng, 24, max_new=(30, 60))
    stop_sets = [(), (5, 17, 99), (500, 731, 99), tuple(range(0, VOCAB, 7))]
    engine = Engine(StandInRunner(8, capacity=256, chunk=32, step_tokens=64))
    for i, (prompt, max_new) in enumerate(requests):
        engine.add_request(prompt, SamplingParams(max_tokens=max_new, stop_token_ids=stop_sets[i % 4]))
    got, ended = collect(engine, {i: [] for i in range(len(requests))}, {})
    assert "stop" in ended.values()
    for i, (prompt, max_new) in enumerate(requests):
        assert (got[i], ended[i]) == alone(prompt, max_new, stop_sets[i % 4])


@pytest.mark.parametrize("pages", [None, 7])  # 7: too few, sequences are preempted and resumed
def test_sampler_gets_each_rows_params_sequence_and_tokens_so_far(pages):
    """Each logit row carries its request's temperature, top_p and seed, its sequence id (as given to
    add_request) and the count of tokens it generated so far, preempted or not."""
    rng = np.random.default_rng(3 if pages is None else 4)
    requests = random_requests(rng, 20, max_new=(1, 40) if pages is None else (30, 90), prompt_len=(1, 100))
    runner = StandInRunner(5 if pages is None else 6, capacity=256, chunk=16, step_tokens=40, pages=pages,
                           config=EngineConfig(prefill_tokens=20, promise=0.0))
    engine = Engine(runner)
    params = {}
    for i, (prompt, max_new) in enumerate(requests):
        p = SamplingParams(max_tokens=max_new, ignore_eos=True, temperature=0.0 if i % 5 == 0 else 0.5 + i / 10,
                           top_p=1.0 - i / 40, seed=1000 + i)
        engine.add_request(prompt, p, sequence=100 + i)
        params[100 + i] = p
    collect(engine, {i: [] for i in range(len(requests))}, {})
    if pages is not None:
        assert engine.stats["preemptions"] > 0
    made = {seq: 0 for seq in params}
    for step in runner.steps:
        s = step.sampling
        if s is None:
            continue
        for r, (seq, k) in enumerate(zip(s.sequence.tolist(), s.step.tolist())):
            p = params[seq]
            assert (s.temperature[r], s.top_p[r], s.seed[r]) == (np.float32(p.temperature), np.float32(p.top_p), p.seed)
            if p.temperature > 0:  # (a greedy row's counter is not read)
                assert k == made[seq]
                made[seq] += 1
    assert made == {seq: p.max_tokens if p.temperature > 0 else 0 for seq, p in params.items()}


def test_max_seqs_and_context_limits():
    rng = np.random.default_rng(11)
    requests = random_requests(rng, 12, max_new=(50, 80), prompt_len=(20, 60))
    runner = StandInRunner(8, capacity=100, chunk=32, step_tokens=64, config=EngineConfig(max_seqs=3),
                           max_context=100)
    got, ended, _ = run(runner, requests)
    assert max(len(step.logit_rows) for step in runner.steps) <= 3
    for i, (prompt, max_new) in enumerate(requests):  # generation stops at the context's end
        assert got[i] == alone(prompt, max_new, max_context=100)[0]
        assert len(prompt) + len(got[i]) <= 100


def test_step_record_and_its_events_agree():
    """A step's arrays and the TokenEvents iterating it gives say the same."""
    engine = Engine(StandInRunner(2, 64, 8, 16))
    for prompt, n in (([3, 4, 5], 4), ([9] * 8, 2), ([1], 3)):
        engine.add_request(prompt, SamplingParams(max_tokens=n))
    while engine.has_unfinished():
        step = engine.step()
        events = list(step)
        assert len(events) == len(step)
        assert [e.request_id for e in events] == step.request_id.tolist()
        assert [-1 if e.token is None else e.token for e in events] == step.token.tolist()
        assert [e.done for e in events] == step.done.tolist()
        assert [e.reason for e in events] == [("stop" if s else "length") if d else None
                                              for d, s in zip(step.done.tolist(), step.stopped.tolist())]


@pytest.mark.parametrize("pages,promise", [(5, 0.0), (9, 0.0), (12, 0.3)])
def test_preempted_sequences_get_what_they_get_alone(pages, promise):
    """Too few pages for the slots: sequences are preempted, prefilled again and continued, and still
    get exactly their tokens alone; every page comes back at the end."""
    rng = np.random.default_rng(pages)
    requests = random_requests(rng, 40, max_new=(20, 120), prompt_len=(1, 130))
    runner = StandInRunner(8, capacity=256, chunk=32, step_tokens=64, pages=pages,
                           config=EngineConfig(prefill_tokens=48, promise=promise))
    got, ended, engine = run(runner, requests)
    for i, (prompt, max_new) in enumerate(requests):
        assert (got[i], ended[i]) == alone(prompt, max_new)
    assert engine.stats["preemptions"] > 0 and engine.stats["recomputed_tokens"] > 0
    assert pages_all_free(engine), "a finished sequence kept its pages"


@pytest.mark.parametrize("pages,promise", [(5, 0.0), (9, 0.0), (12, 0.3)])
def test_swapped_sequences_get_what_they_get_alone(pages, promise):
    """The same preemptions with host memory to spare: every decoding sequence preempted is swapped out
    and back into other pages (the stand-in poisons the ones it leaves), and goes on decoding; only
    sequences preempted while prefilling are prefilled again."""
    rng = np.random.default_rng(pages)
    requests = random_requests(rng, 40, max_new=(20, 120), prompt_len=(1, 130))
    runner = StandInRunner(8, capacity=256, chunk=32, step_tokens=64, pages=pages, swap_pages=10**6, slot_pages=3,
                           config=EngineConfig(prefill_tokens=48, promise=promise))
    got, ended, engine = run(runner, requests)
    for i, (prompt, max_new) in enumerate(requests):
        assert (got[i], ended[i]) == alone(prompt, max_new)
    stats = engine.stats
    assert stats["swaps"] > 0 and stats["preemptions"] >= stats["swaps"]
    assert not runner.swapped and engine.scheduler.swap_used == 0, "a host copy outlived its sequence"
    assert pages_all_free(engine)
    swapped_in = [m for b in runner.steps for m in b.swaps if m.kind == "in"]
    assert len(swapped_in) == stats["swaps"]


def test_swap_space_runs_out_and_the_rest_is_prefilled_again():
    """Host room for one sequence at a time (its pages and slot_pages): the preemptions beyond it are
    prefilled again; both kinds of resumption give each request its tokens alone."""
    rng = np.random.default_rng(5)
    requests = random_requests(rng, 40, max_new=(20, 120), prompt_len=(1, 130))
    runner = StandInRunner(8, capacity=256, chunk=32, step_tokens=64, pages=5, swap_pages=4, slot_pages=1,
                           config=EngineConfig(prefill_tokens=48, promise=0.0))
    got, ended, engine = run(runner, requests)
    for i, (prompt, max_new) in enumerate(requests):
        assert (got[i], ended[i]) == alone(prompt, max_new)
    stats = engine.stats
    assert stats["swaps"] > 0 and stats["recomputed_tokens"] > 0
    assert not runner.swapped and engine.scheduler.swap_used == 0


def test_an_aborted_swapped_out_request_drops_its_host_copy():
    rng = np.random.default_rng(9)
    requests = random_requests(rng, 12, max_new=(60, 120), prompt_len=(60, 130))
    runner = StandInRunner(8, capacity=256, chunk=32, step_tokens=64, pages=6, swap_pages=10**6,
                           config=EngineConfig(prefill_tokens=48, promise=0.0))
    engine = Engine(runner)
    for prompt, max_new in requests:
        engine.add_request(prompt, SamplingParams(max_tokens=max_new))
    while not runner.swapped:
        assert engine.has_unfinished(), "no sequence was swapped out"
        engine.step()
    key = next(iter(runner.swapped))
    assert any(job.req.id == key and job.swapped for job in engine.scheduler.waiting)
    assert engine.abort(key)
    while engine.has_unfinished():
        engine.step()
    assert not runner.swapped and engine.scheduler.swap_used == 0
    assert any(m.kind == "drop" and m.key == key for b in runner.steps for m in b.swaps)


def test_an_interrupted_step_drops_the_host_copies_and_their_sequences_are_prefilled_again():
    """A step that raises (Ctrl-C) leaves the engine to start afresh on the same cache once the running
    requests are aborted: a request swapped out before it keeps its place in the queue, its host copy is
    dropped and it is prefilled again, with the tokens it gets alone."""
    rng = np.random.default_rng(9)
    requests = random_requests(rng, 12, max_new=(60, 120), prompt_len=(60, 130))

    class Interrupted(StandInRunner):
        interrupt = False

        def step(self, batch):
            if self.interrupt:
                self.interrupt = False
                raise KeyboardInterrupt
            return super().step(batch)

    runner = Interrupted(8, capacity=256, chunk=32, step_tokens=64, pages=6, swap_pages=10**6,
                         config=EngineConfig(prefill_tokens=48, promise=0.0))
    engine = Engine(runner)
    ids = [engine.add_request(p, SamplingParams(max_tokens=m)) for p, m in requests]
    got, ended = {i: [] for i in ids}, {}
    while not runner.swapped:
        collect(engine, got, ended, steps=1)
    swapped = [job.req.id for job in engine.scheduler.waiting if job.swapped]
    assert swapped
    runner.interrupt = True
    with pytest.raises(KeyboardInterrupt):
        engine.step()
    state = engine.scheduler.state
    for rid in state.request[state.request >= 0].tolist():  # what LLM and run.py do after an interrupt
        assert engine.abort(rid)
        ended[rid] = "aborted"
    collect(engine, got, ended)
    assert not runner.swapped and engine.scheduler.swap_used == 0
    assert engine.stats["recomputed_tokens"] > 0
    for rid in ids:
        if ended[rid] != "aborted":  # the swapped ones among them
            assert (got[rid], ended[rid]) == alone(*requests[rid]), f"request {rid}"
    assert all(ended[rid] != "aborted" for rid in swapped)


@pytest.mark.parametrize("positions,chosen", [(8 * 201, 1.0), (8 * 171, 0.7), (8 * 150, 1.0)])
def test_auto_promise_is_the_largest_share_that_runs_every_request_at_once(positions, chosen):
    """EngineConfig.promise None: 8 requests of 100 + 100 tokens on a runner whose cache holds
    `positions` positions in all: promise 1 where all fit whole, else the largest share at which each
    gets a slot (0.7: 171 positions each), else 1 (even 0.5 leaves one out); the tokens are the same."""
    class Planned(StandInRunner):
        def slots_for(self, capacity, slots, mean_positions):
            return min(slots, positions // mean_positions)

    rng = np.random.default_rng(3)
    requests = [(rng.integers(0, VOCAB, 100).tolist(), 100) for _ in range(8)]
    runner = Planned(8, capacity=256, chunk=64, step_tokens=200, pages=-(-positions // PAGE) + 4,
                     swap_pages=10**6, config=EngineConfig(prefill_tokens=128))
    got, ended, engine = run(runner, requests)
    assert engine.scheduler.promise == chosen
    for i, (prompt, max_new) in enumerate(requests):
        assert (got[i], ended[i]) == alone(prompt, max_new)


def test_requests_join_and_leave_a_running_engine():
    """Requests added between steps and aborted mid-generation (waiting, prefilling or decoding): every
    other request gets exactly its tokens alone, an aborted one gets no token after its abort, and its
    slot and pages are free at once."""
    rng = np.random.default_rng(21)
    requests = random_requests(rng, 30, max_new=(20, 80), prompt_len=(1, 120))
    runner = StandInRunner(6, capacity=256, chunk=32, step_tokens=64, pages=9,
                           config=EngineConfig(prefill_tokens=40, promise=0.0))
    engine = Engine(runner)
    got, ended, aborted, kinds = {}, {}, set(), set()
    todo = list(enumerate(requests))
    for step in range(10_000):
        if todo and step % 3 == 0:  # a few new requests every third step
            for _ in range(min(len(todo), int(rng.integers(1, 4)))):
                i, (prompt, max_new) = todo.pop(0)
                assert engine.add_request(prompt, SamplingParams(max_tokens=max_new)) == i
                got[i] = []
        if step % 13 == 3:  # abort a request that has not ended: waiting, prefilling, decoding in turn
            s = engine.scheduler
            slot_of = {} if s.state is None else {r: i for i, r in enumerate(s.state.request.tolist()) if r >= 0}
            kind_of = {i: "waiting" if i not in slot_of else "decoding" if s.state.decoding[slot_of[i]]
                       else "prefilling" for i in got if i not in ended and i not in aborted}
            want = ("waiting", "prefilling", "decoding")[len(aborted) % 3]
            live = [i for i, kind in kind_of.items() if kind == want] or list(kind_of)
            if live:
                victim = live[int(rng.integers(len(live)))]
                kinds.add(kind_of[victim])
                free_slots, free_pages = len(s.free), s.pool.available if s.pool else 0
                held = int(s.pool.held[slot_of[victim]]) if victim in slot_of else 0
                assert engine.abort(victim)
                aborted.add(victim)
                assert not engine.abort(victim)  # it is gone
                if victim in slot_of:  # its slot and pages are free at once
                    assert len(s.free) == free_slots + 1 and s.pool.available == free_pages + held > free_pages
                    assert victim not in s.state.request.tolist()
        if not todo and not engine.has_unfinished():
            break
        for ev in engine.step():
            assert ev.request_id not in aborted and ev.request_id not in ended
            if ev.token is not None:
                got[ev.request_id].append(ev.token)
            if ev.done:
                ended[ev.request_id] = ev.reason
    assert len(aborted) + len(ended) == len(requests)
    assert kinds == {"waiting", "prefilling", "decoding"} and engine.stats["preemptions"] > 0
    for i in ended:
        assert (got[i], ended[i]) == alone(*requests[i])
    for i in aborted:  # what came before the abort is a prefix of its tokens alone
        assert got[i] == alone(*requests[i])[0][:len(got[i])]
    assert pages_all_free(engine)


def test_the_cache_is_sized_again_only_when_idle_and_too_small():
    """The engine sizes the cache for what waits when it is idle; a longer request added while others
    run waits until they finish, then the cache is sized again for it."""
    asked = []

    class Sizing(StandInRunner):
        def allocate(self, capacity, slots, mean_positions):
            asked.append((capacity, slots))
            self.layout = dataclasses.replace(self.layout, capacity=capacity, slots=slots,
                                              pages=slots * -(-capacity // PAGE))
            self.kv = np.full((self.layout.pages + 1, PAGE), -1, np.int64)
            return super().allocate(capacity, slots, mean_positions)

    engine = Engine(Sizing(1, 64, 16, 64))
    a = engine.add_request([1] * 10, SamplingParams(max_tokens=20))
    b = engine.add_request([2] * 5, SamplingParams(max_tokens=10))
    got, ended = collect(engine, {a: [], b: [], 2: []}, {}, steps=3)
    assert asked == [(30, 2)]
    c = engine.add_request([3] * 100, SamplingParams(max_tokens=50))  # longer than the cache
    collect(engine, got, ended)
    assert asked == [(30, 2), (150, 1)]
    assert got[c] == alone([3] * 100, 50)[0] and got[a] == alone([1] * 10, 20)[0]


def test_page_pool_hands_out_each_page_once():
    pool = PagePool(5, 4, 12)
    table = pool.table
    pool.grow([0, 3], [1, 130])  # 1 page, 3 pages
    pool.grow([0, 1], [64, 65])  # slot 0 keeps its page; slot 1 takes 2
    pool.grow([3], [100])  # already holds them: nothing
    assert pool.held.tolist() == [1, 2, 0, 3, 0] and pool.available == 12 - 6
    held = np.concatenate([table[s, :n] for s, n in enumerate(pool.held)])
    assert sorted(held.tolist()) == list(range(6))
    assert (table[2] == pool.spare).all() and (table[0, 1:] == pool.spare).all()
    whole, updates = pool.take_changes()
    assert whole is table and updates is None  # the first time: the whole table
    assert pool.take_changes() == (None, None)  # nothing changed since
    before = table.copy()
    pool.release(0)
    assert (table[0] == pool.spare).all() and pool.available == 12 - 5
    whole, updates = pool.take_changes()  # only the entries that changed, each once, their values now
    assert whole is None and updates.dtype == np.int32 and updates.tolist() == [[0], [pool.spare]]
    before.reshape(-1)[updates[0]] = updates[1]
    assert (before == table).all()
    pool.grow([4], [1])
    pool.release(4)  # granted and freed again between two steps: the entry is sent once, as it is now
    assert pool.take_changes()[1].tolist() == [[16], [pool.spare]]
    pool.release(3)
    assert (table[3] == pool.spare).all() and pool.available == 12 - 2
    whole, updates = pool.take_changes()  # 3 entries of 20: over an eighth, the whole table
    assert whole is table and updates is None
    pool.grow([0], [1])
    pool.grow([2], [4 * PAGE])
    assert len(set(table[2].tolist()) | set(table[0, :1].tolist()) | set(table[1, :2].tolist())) == 7
    pool.grow([0], [4 * PAGE])  # 3 more: 2 left
    with pytest.raises(RuntimeError, match="out of pages"):
        pool.grow([4], [4 * PAGE])
    assert pages_for([0, 1, 64, 65]).tolist() == [0, 1, 1, 2]


def test_bad_requests_are_refused_before_they_run():
    from gptoss.errors import ContextError

    engine = Engine(StandInRunner(2, 64, 8, 16, max_context=64))
    assert len(engine.step()) == 0  # nothing added yet: an empty step
    with pytest.raises(ContextError, match="empty"):
        engine.add_request([])
    with pytest.raises(ContextError, match="context is 64"):
        engine.add_request([1] * 64)
    with pytest.raises(ValueError, match="vocabulary"):
        engine.add_request([1, VOCAB])
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingParams(max_tokens=0)
    with pytest.raises(ValueError, match="another EngineConfig"):
        Engine(StandInRunner(2, 64, 8, 16), EngineConfig(max_seqs=1))
    assert not engine.has_unfinished() and not engine.abort(0)


def test_modeled_runs_promise_one_never_preempts():
    """benchmarks/sim_scheduler.py over the real 20b plan: with the whole budget promised no sequence is
    preempted, with none promised they are (a small memory), and paging runs more sequences at once
    than slots of a whole capacity."""
    import re

    from benchmarks.sim_scheduler import simulate
    from gptoss.config import GPT_OSS_20B

    lengths = np.random.default_rng(0).integers(64, 513, 120)
    rows = {name: simulate(GPT_OSS_20B, lengths, 256, 3.5, 0.0, promise, paged)
            for name, promise, paged in (("flat", 1.0, False), ("p0", 0.0, True), ("p1", 1.0, True))}
    numbers = {name: dict(re.findall(r"(most running|preemptions)\s+(\d+)", row)) for name, row in rows.items()}
    assert numbers["p1"]["preemptions"] == "0" and numbers["flat"]["preemptions"] == "0"
    assert int(numbers["p0"]["preemptions"]) > 0
    assert int(numbers["p1"]["most running"]) > int(numbers["flat"]["most running"])


def test_modeled_auto_promise_runs_120b_getp_in_one_wave_and_keeps_20b_at_one():
    """benchmarks/sim_scheduler.py over the real plans (docs/notes/attention.md, "One wave for 120b"):
    1,024 prompts of 1,000 + 1,000 tokens beside 120b's weights on an H200 get a slot each at a promise
    below 1, and finish faster than in the two waves of promise 1; 2,048 beside 20b's on an 80 GB card
    need two waves either way, and the promise stays 1."""
    import re

    from benchmarks.sim_scheduler import simulate
    from gptoss.config import GPT_OSS_20B, GPT_OSS_120B

    def row(cfg, prompts, free, promise):
        text = simulate(cfg, [1000] * prompts, 1000, free, 0.0, promise)
        chosen = re.search(r"auto \(([\d.]+)\)", text)
        slots, tok_s = re.search(r"slots\s+(\d+).*modeled\s+([\d,]+)", text).groups()
        return float(chosen.group(1)) if chosen else promise, int(slots), int(tok_s.replace(",", ""))

    auto, whole = row(GPT_OSS_120B, 1024, 78.5, None), row(GPT_OSS_120B, 1024, 78.5, 1.0)
    assert auto[0] < 1 and auto[1] == 1024 and whole[1] < 1024 and auto[2] > whole[2]
    assert row(GPT_OSS_20B, 2048, 62.0, None)[0] == 1.0


def test_modeled_larger_prefill_budget_leaves_fewer_pages_for_120b_getp():
    """benchmarks/sim_scheduler.py --prefill-tokens over the real 120b plan (BENCHMARKS.md, the prefill
    budgets): a step that may prefill more prompt tokens needs a larger workspace, so fewer pages are
    left; with the sliding rings of exactly the window, the one wave of the default budget (8,192) and
    of 4,096 preempts none (the device measured 3 preemptions at 12,288, where the model gives none)."""
    import re

    from benchmarks.sim_scheduler import simulate
    from gptoss.config import GPT_OSS_120B

    def row(prefill_tokens):
        text = simulate(GPT_OSS_120B, [1000] * 1024, 1000, 78.5, 0.0, None, prefill_tokens=prefill_tokens)
        return tuple(int(x) for x in re.search(r"pages\s+(\d+).*preemptions\s+(\d+)", text).groups())

    small, default, large = row(4096), row(None), row(12288)
    assert large[0] < default[0] < small[0]
    assert small[1] == default[1] == 0


def test_slots_keep_room_for_generated_tokens_as_sequences_grow():
    from gptoss.engine.scheduler import Slots

    state = Slots(3, history=1000)
    assert state.generated.shape == (3, 256)  # not the whole history up front
    state.generated[1, :256] = np.arange(256)
    state.keep_room(200)
    assert state.generated.shape == (3, 256)
    state.keep_room(300)  # doubled, what was kept stays
    assert state.generated.shape == (3, 512) and state.generated[1, :256].tolist() == list(range(256))
    state.keep_room(5000)  # never past the history
    assert state.generated.shape == (3, 1000) and state.generated[1, 255] == 255
    assert Slots(2, history=0).generated.shape == (2, 1)  # no preemption possible: one column
