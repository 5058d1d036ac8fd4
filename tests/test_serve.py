"""run.py -m serve: the official `openai` client against a live uvicorn server in a thread.

The generation tests run the tiny synthetic model (real vocabulary) on the CPU reference; the
reasoning and tool-call tests script the model's replies (ids of real harmony text) through a stand-in
runner, since a random model never writes a tool call. The engine, the tokenizer, harmony and the HTTP
stack are real."""
import contextlib
import dataclasses
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx2")  # the openai package's HTTP client
uvicorn = pytest.importorskip("uvicorn")

from gptoss.config import TINY_CHAT  # noqa: E402
from gptoss.engine import Engine, EngineConfig, Layout  # noqa: E402
from gptoss.llm import LLM  # noqa: E402
from gptoss.sampling import SamplingParams  # noqa: E402
from gptoss.serve import ServeOptions, build_app  # noqa: E402
from gptoss.tokenizer import STOP_IDS, get_tokenizer  # noqa: E402

SLOTS = 8
ROOT = Path(__file__).resolve().parent.parent


class LiveServer:
    """uvicorn serving `app` on a free port of 127.0.0.1, in a daemon thread."""

    def __init__(self, app):
        self.app = app
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("the server did not start")
            time.sleep(0.01)

    def client(self, **kw):
        kw.setdefault("api_key", "none")
        return openai.OpenAI(base_url=self.url + "/v1", max_retries=0, timeout=60, **kw)

    def metrics(self, **headers) -> dict:
        text = httpx.get(self.url + "/metrics", headers=headers).text
        return {k: float(v) for k, v in (line.split() for line in text.splitlines() if not line.startswith("#"))}

    def close(self):
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture(scope="module")
def llm():
    return LLM("synthetic:tiny-chat", device="cpu", progress=False, max_seqs=SLOTS)


@pytest.fixture(scope="module")
def live(llm):
    server = LiveServer(build_app(llm.engine, llm.tokenizer, ServeOptions(model_name="tiny", reserve_slots=SLOTS)))
    yield server
    server.close()


@pytest.fixture(scope="module")
def guarded(llm):
    """A second app with a key, a small body limit and room for one request: its own engine."""
    other = LLM("synthetic:tiny-chat", device="cpu", progress=False, max_seqs=2)
    server = LiveServer(build_app(other.engine, other.tokenizer,
                                  ServeOptions(model_name="tiny", api_key="sesame", max_body_bytes=4000,
                                               max_pending=1, reserve_slots=2)))
    yield server
    server.close()


def wait_for(check, what, seconds=30):
    """Polls until check() holds (the engine thread frees slots between steps)."""
    end = time.monotonic() + seconds
    while not check():
        if time.monotonic() > end:
            raise AssertionError(f"never happened: {what}")
        time.sleep(0.02)


# ---- the model's answers ----------------------------------------------------------------------------

def test_models_and_health(live):
    assert [m.id for m in live.client().models.list().data] == ["tiny"]
    assert httpx.get(live.url + "/health").json() == {"status": "ok"}


def test_completion_is_the_engines_greedy_output(live, llm):
    prompt = "Once upon a time"
    ids = llm.tokenizer.encode(prompt)
    out = live.client().completions.create(model="tiny", prompt=prompt, max_tokens=6, temperature=0,
                                           extra_body={"ignore_eos": True})
    by_ids = live.client().completions.create(model="tiny", prompt=ids, max_tokens=6, temperature=0,
                                              extra_body={"ignore_eos": True})
    # the same model through the Python API (its own engine: the server's belongs to its thread)
    want = LLM("synthetic:tiny-chat", device="cpu", progress=False).generate(
        prompt, SamplingParams(max_tokens=6, ignore_eos=True))[0]
    assert out.choices[0].text == by_ids.choices[0].text == want.text
    assert out.choices[0].finish_reason == "length"
    assert (out.usage.prompt_tokens, out.usage.completion_tokens, out.usage.total_tokens) == (len(ids), 6, len(ids) + 6)


def test_streamed_completion_matches_the_whole_one_and_counts_usage(live):
    c = live.client()
    args = dict(model="tiny", prompt="The sky is", max_tokens=7, temperature=0.8, seed=42,
                extra_body={"ignore_eos": True})
    whole = c.completions.create(**args)
    chunks = list(c.completions.create(stream=True, stream_options={"include_usage": True}, **args))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == whole.choices[0].text
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 7


def test_stop_strings_end_a_completion_before_them(live):
    c = live.client()
    args = dict(model="tiny", prompt="Once upon a time", max_tokens=12, temperature=0, extra_body={"ignore_eos": True})
    full = c.completions.create(**args).choices[0].text
    stop = full[len(full) // 2:len(full) // 2 + 3]  # three characters from the middle
    assert len(stop) == 3
    before = live.metrics()["gptoss_requests_aborted_total"]
    cut = c.completions.create(stop=[stop, "no such text here"], **args)
    assert cut.choices[0].text == full[:full.index(stop)] and cut.choices[0].finish_reason == "stop"
    assert cut.usage.completion_tokens < 12
    streamed = list(c.completions.create(stop=stop, stream=True, **args))
    assert "".join(ch.choices[0].text for ch in streamed) == full[:full.index(stop)]
    assert streamed[-1].choices[0].finish_reason == "stop"
    wait_for(lambda: live.metrics()["gptoss_requests_aborted_total"] == before + 2, "both requests ended early")


@pytest.mark.parametrize("stops,deltas,want", [
    (["END"], ["ab", "cE", "N", "Dxyz"], ["ab", "c", "", ""]),        # split over three deltas
    (["END"], ["abE", "Nope"], ["ab", "ENope"]),                      # a false start is given back
    (["x", "yz"], ["aay", "zb"], ["aa", ""]),
    (["\n\n"], ["one\n", "two"], ["one", "\ntwo"]),
])
def test_stop_matcher(stops, deltas, want):
    from gptoss.serve.stops import StopMatcher

    m = StopMatcher(stops)
    got = [m.push(d) for d in deltas]
    assert got == want
    whole = "".join(deltas)
    cut = [whole.find(s) for s in stops if s in whole]
    assert "".join(got) + m.flush() == (whole[:min(cut)] if cut else whole)


def test_chat_counts_tokens_and_keeps_reasoning_apart(live):
    reply = live.client().chat.completions.create(
        model="tiny", messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        max_completion_tokens=9, temperature=0, reasoning_effort="low")
    choice = reply.choices[0]
    assert choice.finish_reason in ("stop", "length")
    assert isinstance(choice.message.content, str)
    assert reply.usage.completion_tokens <= 9 and reply.usage.prompt_tokens > 20


def test_reasoning_effort_reaches_the_prompt(live):
    c = live.client()
    low = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=1,
                                    reasoning_effort="low")
    high = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=1,
                                     reasoning_effort="high")
    assert low.usage.prompt_tokens == high.usage.prompt_tokens  # "low" and "high" are one token each
    from gptoss import harmony

    prompts = [harmony.encode_chat([harmony.Message("user", "Hi")], harmony.ChatOptions(reasoning_effort=e))
               for e in ("low", "high")]
    assert prompts[0] != prompts[1] and len(prompts[0]) == low.usage.prompt_tokens


def test_streamed_chat_ends_with_a_reason_and_usage(live):
    chunks = list(live.client().chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Tell me a story"}], max_tokens=8, temperature=1.0,
        seed=3, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    reasons = [ch.choices[0].finish_reason for ch in chunks if ch.choices]
    assert reasons[-1] in ("stop", "length") and all(r is None for r in reasons[:-1])
    assert chunks[-1].usage.completion_tokens <= 8


def test_32_concurrent_streams_share_the_engine_and_match_solo_runs(live):
    """32 clients at once on 8 slots (the rest wait): each stream is whole, and greedy answers do not
    depend on the batch."""
    c = live.client()
    prompts = [f"Number {i} is" for i in range(32)]
    solo = [c.completions.create(model="tiny", prompt=p, max_tokens=5, temperature=0,
                                 extra_body={"ignore_eos": True}).choices[0].text for p in prompts[:2]]
    texts, errors = [None] * len(prompts), []

    def client(i):
        try:
            stream = c.completions.create(model="tiny", prompt=prompts[i], max_tokens=5, temperature=0, stream=True,
                                          extra_body={"ignore_eos": True})
            texts[i] = "".join(ch.choices[0].text for ch in stream if ch.choices)
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    before = live.metrics()["gptoss_steps_total"]
    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    assert texts[:2] == solo
    assert all(isinstance(t, str) and t for t in texts)
    # batched: 32 requests of 5 tokens each took fewer steps than one after another
    assert live.metrics()["gptoss_steps_total"] - before < 32 * 5 / 4
    assert live.metrics()["gptoss_slots_free"] == SLOTS


def test_a_client_that_goes_away_frees_its_slot(live):
    start = live.metrics()
    with httpx.Client(timeout=30) as http:
        with http.stream("POST", live.url + "/v1/completions",
                         json={"prompt": "Go on", "max_tokens": 200, "stream": True, "ignore_eos": True}) as r:
            lines = r.iter_lines()
            assert next(line for line in lines if line.startswith("data: "))  # the first token came
            during = live.metrics()
            assert during["gptoss_requests_held"] == 1
            assert 0 < during["gptoss_kv_pages_in_use"] < during["gptoss_kv_pages"]
            assert during["gptoss_generation_tokens_per_second"] > 0
    wait_for(lambda: live.metrics()["gptoss_requests_held"] == 0, "the request was aborted")
    end = live.metrics()
    assert end["gptoss_slots_free"] == SLOTS and end["gptoss_kv_pages_in_use"] == 0
    assert end["gptoss_requests_aborted_total"] == start["gptoss_requests_aborted_total"] + 1
    assert end["gptoss_generation_tokens_total"] - start["gptoss_generation_tokens_total"] < 200


def test_a_whole_reply_is_aborted_when_its_client_gives_up(live):
    """The engine thread is held (a call that waits) while the client of a whole (not streamed) reply
    gives up: the handler sees the disconnect and sends abort, which the engine takes in order."""
    start = live.metrics()
    gate = threading.Event()
    held = live.app.state.loop.call(lambda engine: gate.wait(60))
    try:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(live.url + "/v1/completions", json={"prompt": "Go on", "max_tokens": 200, "ignore_eos": True},
                       timeout=0.5)
        wait_for(lambda: live.metrics()["gptoss_requests_open"] == 0, "the handler saw the client go")
    finally:
        gate.set()
    held.result(10)
    wait_for(lambda: live.metrics()["gptoss_requests_aborted_total"] == start["gptoss_requests_aborted_total"] + 1,
             "the request was aborted")
    end = live.metrics()
    assert end["gptoss_requests_held"] == 0 and end["gptoss_slots_free"] == SLOTS
    assert end["gptoss_generation_tokens_total"] == start["gptoss_generation_tokens_total"]


@contextlib.contextmanager
def run_py_server(*args):
    """`run.py synthetic:tiny-chat -m serve --device cpu -b 2 -q ARGS` on a free port: (process, base url) once
    /health answers; killed at the end if still running (its stdout and stderr are one pipe)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    proc = subprocess.Popen([sys.executable, str(ROOT / "run.py"), "synthetic:tiny-chat", "-m", "serve", "--device",
                             "cpu", "--port", str(port), "-b", "2", "-q", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"

        def up():
            if proc.poll() is not None:
                raise AssertionError(proc.stdout.read())
            try:
                return httpx.get(url + "/health").status_code == 200
            except httpx.TransportError:
                return False

        wait_for(up, "the server answers", seconds=60)
        yield proc, url
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_run_py_serves_and_stops_on_sigterm():
    """The command itself: run.py -m serve answers the openai client and exits 0 on SIGTERM."""
    with run_py_server("--api-key", "k") as (proc, url):
        c = openai.OpenAI(base_url=url + "/v1", api_key="k", max_retries=0, timeout=60)
        reply = c.chat.completions.create(model="synthetic:tiny-chat", messages=[{"role": "user", "content": "Hi"}],
                                          max_tokens=3)
        assert reply.usage.completion_tokens <= 3 and reply.model == "synthetic:tiny-chat"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        assert f"serving synthetic:tiny-chat on {url}/v1" in proc.stdout.read()


@pytest.mark.parametrize("args,message", [
    (["-m", "serve", "--port", "70000"], "--port must be in 1..65535 (got 70000)"),
    (["-m", "generate", "--api-key", "k"], "--api-key is for -m serve"),
    (["-m", "getp", "--port", "9000"], "--port is for -m serve"),
    (["-m", "generate", "--served-model-name", "x"], "--served-model-name is for -m serve"),
    (["-m", "serve", "--served-model-name", ""], "--served-model-name takes non-empty names (got [''])"),
    (["-m", "serve", "--served-model-name", "a", "a"], "--served-model-name names a model once each (got ['a', 'a'])"),
    (["-m", "serve", "--max-model-len", "1"], "--max-model-len must be at least 2 (got 1)"),
    (["-m", "serve", "--max-model-len", "99999"], "--max-model-len 99999 is longer than the model's context (256)"),
    (["-m", "chat", "--max-model-len", "64"], "--max-model-len is for -m serve"),
    (["-m", "serve", "--data-parallel", "2"], "--data-parallel is for -m getp"),
    (["-m", "serve", "--tensor-parallel", "0"], "--tensor-parallel must be at least 1 (got 0)"),
])
def test_run_py_serve_flags_are_checked_before_the_model_loads(args, message):
    proc = subprocess.run([sys.executable, str(ROOT / "run.py"), "synthetic:tiny-chat", *args], capture_output=True,
                          text=True)
    assert proc.returncode == 2 and proc.stderr.strip() == f"run.py: error: {message}"


# ---- bad requests: 400 in OpenAI's error shape --------------------------------------------------------

BAD_CHAT = [
    ({"n": 2}, "n"),
    ({"max_tokens": -1}, "max_tokens"),
    ({"max_tokens": 10**12}, "max_tokens"),
    ({"max_completion_tokens": 0}, "max_completion_tokens"),
    ({"temperature": -0.5}, "temperature"),
    ({"temperature": "hot"}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"seed": -1}, "seed"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"reasoning_effort": "extreme"}, "reasoning_effort"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages.0"),
    ({"messages": [{"role": "tool", "content": "20 C"}]}, "messages[0]"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
]


@pytest.mark.parametrize("change,param", BAD_CHAT, ids=[p for _, p in BAD_CHAT])
def test_bad_chat_requests_answer_400(live, change, param):
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, **change}
    r = httpx.post(live.url + "/v1/chat/completions", json=body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert error["param"].startswith(param), error


def test_bad_requests_through_the_client_and_raw(live, llm):
    c = live.client()
    with pytest.raises(openai.BadRequestError, match="n must be 1 \\(got 3\\)"):
        c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}], n=3)
    with pytest.raises(openai.BadRequestError, match="stop takes up to 4 non-empty strings"):
        c.completions.create(model="tiny", prompt="Hi", stop=["a", "b", "c", "d", "e"])
    long = "word " * 300
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model="tiny", prompt=long, max_tokens=2)
    assert e.value.code == "context_length_exceeded"
    assert f"the prompt has {len(llm.tokenizer.encode(long))} tokens; this model's context is 256" in e.value.message
    with pytest.raises(openai.BadRequestError, match="outside this model's vocabulary"):
        c.completions.create(model="tiny", prompt=[5, 999_999], max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="one prompt per request"):
        c.completions.create(model="tiny", prompt=["a", "b"], max_tokens=2)
    r = httpx.post(live.url + "/v1/completions", content=b'{"prompt": "x", ', headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = httpx.post(live.url + "/v1/completions", json=["not", "an", "object"])
    assert r.status_code == 400 and "error" in r.json()
    assert httpx.get(live.url + "/v1/nothing").json()["error"]["message"] == "Not Found"
    assert httpx.get(live.url + "/health").status_code == 200  # and the server is still there


def test_api_key_body_limit_and_a_full_server(guarded):
    with pytest.raises(openai.AuthenticationError):
        guarded.client(api_key="wrong").models.list()
    assert httpx.get(guarded.url + "/metrics").status_code == 401
    assert httpx.get(guarded.url + "/health").status_code == 200  # health needs no key
    c = guarded.client(api_key="sesame")
    assert c.models.list().data[0].id == "tiny"
    r = httpx.post(guarded.url + "/v1/completions", json={"prompt": "x" * 5000}, headers={"authorization": "Bearer sesame"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    # one request held (max_pending=1): the next answers 503 with Retry-After, then is served once it ends
    held = c.completions.create(model="tiny", prompt="Go", max_tokens=200, stream=True, extra_body={"ignore_eos": True})
    next(iter(held))
    r = httpx.post(guarded.url + "/v1/completions", json={"prompt": "x", "max_tokens": 1},
                   headers={"authorization": "Bearer sesame"})
    assert r.status_code == 503 and r.headers["retry-after"] == "1" and r.json()["error"]["code"] == "overloaded"
    held.close()
    wait_for(lambda: guarded.metrics(authorization="Bearer sesame")["gptoss_requests_held"] == 0, "aborted")
    assert c.completions.create(model="tiny", prompt="x", max_tokens=1).usage.completion_tokens == 1


# ---- reasoning and tool calls, scripted --------------------------------------------------------------

WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
CALL = ('<|channel|>analysis<|message|>The user wants the weather; call the tool.<|end|>'
        '<|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json'
        '<|message|>{"city": "Paris"}<|call|>')
ANSWER = ('<|channel|>analysis<|message|>20 C and sunny.<|end|>'
          '<|start|>assistant<|channel|>final<|message|>It is 20 °C in Paris.<|return|>')


class ScriptedRunner:
    """A ModelRunner that answers its n-th request with replies[n] (harmony text), one id per step, and
    keeps every prompt (one request at a time)."""

    name = "scripted"

    def __init__(self, tok, replies):
        self.model_config = dataclasses.replace(TINY_CHAT, max_context=4096)
        self.config = EngineConfig()
        self.replies = [tok.encode(r) if isinstance(r, str) else list(r) for r in replies]
        self.prompts, self.turn, self.made = [], -1, 0

    def allocate(self, capacity, slots, mean_positions):
        return Layout(slots, capacity, slots * -(-capacity // 64), slots + 4096, 4096)

    def step(self, batch):
        if batch.seq_starts[0] == 0:
            self.turn, self.made = self.turn + 1, 0
            self.prompts.append(batch.tokens.tolist())
        if not len(batch.logit_rows):
            return np.zeros(0, np.int32)
        ids = self.replies[self.turn % len(self.replies)]
        self.made += 1
        return np.asarray([ids[min(self.made - 1, len(ids) - 1)]], np.int32)


@pytest.fixture()
def scripted():
    tok = get_tokenizer()
    runner = ScriptedRunner(tok, [CALL, ANSWER])
    server = LiveServer(build_app(Engine(runner, eos_token_ids=STOP_IDS), tok, ServeOptions(model_name="tiny")))
    yield server, runner, tok
    server.close()


def test_tool_call_then_tool_result_then_answer(scripted):
    server, runner, tok = scripted
    c = server.client()
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    first = c.chat.completions.create(model="tiny", messages=messages, tools=[WEATHER_TOOL], max_tokens=100)
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.reasoning_content == "The user wants the weather; call the tool."
    assert choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
    prompt = tok.decode(runner.prompts[0])
    assert "get_weather" in prompt and "The weather in a city" in prompt  # declared in the developer message

    messages += [{"role": "assistant", "content": None, "reasoning_content": choice.message.reasoning_content,
                  "tool_calls": [call.model_dump()]},
                 {"role": "tool", "tool_call_id": call.id, "content": '{"temp": 20}'}]
    second = c.chat.completions.create(model="tiny", messages=messages, tools=[WEATHER_TOOL], max_tokens=100)
    assert second.choices[0].finish_reason == "stop"
    assert second.choices[0].message.content == "It is 20 °C in Paris."
    assert second.choices[0].message.reasoning_content == "20 C and sunny."
    prompt = tok.decode(runner.prompts[1])
    assert ('<|start|>assistant to=functions.get_weather<|channel|>commentary <|constrain|>json<|message|>'
            '{"city": "Paris"}<|call|>') in prompt
    assert '<|start|>functions.get_weather to=assistant<|channel|>commentary<|message|>{"temp": 20}<|end|>' in prompt
    assert "The user wants the weather" in prompt  # the reasoning of the turn in progress is kept


def test_streamed_tool_call_and_answer_by_channel(scripted):
    server = scripted[0]
    c = server.client()
    chunks = list(c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Weather?"}],
                                            tools=[WEATHER_TOOL], max_tokens=100, stream=True))
    deltas = [ch.choices[0].delta for ch in chunks]
    reasoning = "".join(getattr(d, "reasoning_content", None) or "" for d in deltas)
    assert reasoning == "The user wants the weather; call the tool."
    assert "".join(d.content or "" for d in deltas) == ""
    calls = [tc for d in deltas for tc in d.tool_calls or ()]
    assert calls[0].function.name == "get_weather" and calls[0].id.startswith("call_")
    assert {tc.index for tc in calls} == {0}
    assert json.loads("".join(tc.function.arguments or "" for tc in calls)) == {"city": "Paris"}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"

    chunks = list(c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "And now?"}],
                                            max_tokens=100, stream=True))
    deltas = [ch.choices[0].delta for ch in chunks]
    assert "".join(d.content or "" for d in deltas) == "It is 20 °C in Paris."
    assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == "20 C and sunny."
    assert chunks[-1].choices[0].finish_reason == "stop"


class FailingRunner(ScriptedRunner):
    """Raises in the step after its first `fail_after` steps, once."""

    def __init__(self, tok, replies, fail_after):
        super().__init__(tok, replies)
        self.steps, self.fail_after = 0, fail_after

    def step(self, batch):
        self.steps += 1
        if self.steps == self.fail_after:
            raise RuntimeError("the device fell over")
        return super().step(batch)


def test_an_engine_failure_ends_its_requests_and_the_server_goes_on():
    tok = get_tokenizer()
    server = LiveServer(build_app(Engine(FailingRunner(tok, [ANSWER], fail_after=3), eos_token_ids=STOP_IDS), tok,
                                  ServeOptions(model_name="tiny")))
    try:
        c = server.client()
        with pytest.raises(openai.InternalServerError, match="the device fell over"):
            c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=50)
        assert server.metrics()["gptoss_requests_failed_total"] == 1
        reply = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=50)
        assert reply.choices[0].message.content == "It is 20 °C in Paris."
        assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    finally:
        server.close()


def test_responses_api_function_call_round_trip(scripted):
    server, runner, tok = scripted
    c = server.client()
    tool = {"type": "function", **WEATHER_TOOL["function"]}
    first = c.responses.create(model="tiny", input="Weather in Paris?", instructions="Use the tools.",
                               tools=[tool], reasoning={"effort": "high"})
    kinds = [item.type for item in first.output]
    assert kinds == ["reasoning", "function_call"] and first.status == "completed"
    call = first.output[1]
    assert call.name == "get_weather" and json.loads(call.arguments) == {"city": "Paris"}
    prompt = tok.decode(runner.prompts[0])
    assert "Reasoning: high" in prompt and "Use the tools." in prompt and "get_weather" in prompt

    second = c.responses.create(model="tiny", tools=[tool], input=[
        {"role": "user", "content": "Weather in Paris?"},
        {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
        {"type": "function_call_output", "call_id": call.call_id, "output": '{"temp": 20}'}])
    assert second.output_text == "It is 20 °C in Paris."
    assert second.usage.output_tokens == len(tok.encode(ANSWER)) - 1  # the stop id is not counted
    assert '<|start|>functions.get_weather to=assistant<|channel|>commentary<|message|>{"temp": 20}' in \
        tok.decode(runner.prompts[1])
    for bad, where in (([{"type": "image", "url": "x"}], "input[0]"),
                       ([{"type": "function_call_output", "call_id": "nope", "output": "1"}], "input[0]")):
        r = httpx.post(server.url + "/v1/responses", json={"model": "tiny", "input": bad})
        assert r.status_code == 400 and r.json()["error"]["param"] == where, r.text
    r = httpx.post(server.url + "/v1/responses", json={"model": "tiny", "input": "x", "previous_response_id": "r"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "previous_response_id"
    assert "the server keeps no responses" in r.json()["error"]["message"]


def test_responses_api_text_on_the_tiny_model(live):
    out = live.client().responses.create(model="tiny", input="Hi", max_output_tokens=4, temperature=0)
    assert out.usage.output_tokens <= 4 and out.status in ("completed", "incomplete")
    if out.status == "incomplete":
        assert out.incomplete_details.reason == "max_output_tokens"


def expected_chat(ids):
    """What a chat reply of `ids` (ending with its stop id) should say, read by harmony.parse_assistant:
    (content, reasoning_content, [(function, arguments)], finish_reason)."""
    from gptoss import harmony

    reply = harmony.parse_assistant(ids)
    said = [m for m in reply.messages if not m.recipient]
    content = [m.content for m in said if m.channel != "analysis"]
    reasoning = [m.content for m in said if m.channel == "analysis"]
    calls = [(m.recipient[len("functions."):], m.content) for m in reply.messages
             if m.recipient and m.recipient.startswith("functions.")]
    finish = "error" if reply.broken else "tool_calls" if calls else "stop"
    return "\n".join(content) if content or not calls else None, "\n".join(reasoning) or None, calls, finish


def test_malformed_replies_answer_200_with_finish_reason_error():
    """Random mixes of whole messages, cut ones and stray special ids: never an HTTP error; a reply that
    breaks the harmony format ends with finish_reason "error" and keeps its text; whole and streamed
    replies say what harmony.parse_assistant reads (content, reasoning, tool calls and their arguments)."""
    from gptoss.tokenizer import CALL as CALL_ID
    from gptoss.tokenizer import RETURN

    tok = get_tokenizer()
    pieces = ["<|channel|>analysis<|message|>Think é.<|end|>",
              "<|start|>assistant<|channel|>final<|message|>Hello world<|end|>",
              '<|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{"a": 1}',
              "<|start|>assistant<|channel|>analysis<|message|>more thought",
              "<|start|>assistant<|channel|>commentary<|message|>A preamble.<|end|>",
              "<|start|>assistant<|channel|><|message|>empty channel<|end|>",
              "<|end|>", "<|start|>", "<|channel|>", "<|message|>", "stray text", "<|constrain|>"]
    rng = np.random.default_rng(7)
    scripts = [tok.encode(ANSWER), tok.encode(CALL)]  # well-formed (the scripts above)
    for _ in range(12):
        text = "".join(rng.choice(pieces, size=int(rng.integers(2, 8))))
        scripts.append(tok.encode(text) + [int(rng.choice([RETURN, CALL_ID]))])
    runner = ScriptedRunner(tok, [s for s in scripts for _ in range(2)])  # each twice: whole, streamed
    server = LiveServer(build_app(Engine(runner, eos_token_ids=STOP_IDS), tok, ServeOptions(model_name="tiny")))
    try:
        c, seen = server.client(), set()
        for script in scripts:
            content, reasoning, calls, finish = expected_chat(script)
            msgs = [{"role": "user", "content": "Hi"}]
            whole = c.chat.completions.create(model="tiny", messages=msgs, max_tokens=60).choices[0]
            assert (whole.message.content, whole.message.reasoning_content, whole.finish_reason) == \
                (content, reasoning, finish)
            assert [(tc.function.name, tc.function.arguments) for tc in whole.message.tool_calls or ()] == calls
            chunks = list(c.chat.completions.create(model="tiny", messages=msgs, max_tokens=60, stream=True))
            deltas = [ch.choices[0].delta for ch in chunks]
            assert "".join(d.content or "" for d in deltas) == (content or "")
            assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == (reasoning or "")
            streamed = [tc for d in deltas for tc in d.tool_calls or ()]
            assert [(tc.function.name, "".join(t.function.arguments for t in streamed if t.index == tc.index))
                    for tc in streamed if tc.id] == calls
            assert chunks[-1].choices[0].finish_reason == finish
            seen.update({"content": bool(content), "tools": bool(calls), "reasoning": bool(reasoning),
                         "finish": finish}.items())
        # every route was taken, and both broken and well-formed replies came
        assert seen >= {("content", True), ("tools", True), ("reasoning", True), ("finish", "error"),
                        ("finish", "stop"), ("finish", "tool_calls")}
    finally:
        server.close()


def test_tokens_per_second_counts_the_steps_of_the_last_window():
    from collections import deque

    from gptoss.serve.loop import RATE_WINDOW, LoopStats

    now = RATE_WINDOW + 4.0  # the step that ended at 0 is out of the window, the ones at 4.5 and after in
    stats = LoopStats(recent_steps=deque([(0.0, 5), (4.5, 3), (RATE_WINDOW + 2.0, 2)]))
    assert stats.tokens_per_second(now=now) == (3 + 2) / RATE_WINDOW
    assert stats.tokens_per_second(now=now + 3 * RATE_WINDOW) == 0.0


def test_max_model_len_bounds_prompts_and_new_tokens():
    """--max-model-len: the served context is shorter than the model's; /v1/models says so, a longer prompt
    answers 400 with the served length, and generation stops at its end (finish_reason length)."""
    other = LLM("synthetic:tiny-chat", device="cpu", progress=False, max_seqs=2, promise=0.0)
    server = LiveServer(build_app(other.engine, other.tokenizer,
                                  ServeOptions(model_name="tiny", reserve_slots=2, max_model_len=40)))
    try:
        c = server.client()
        assert httpx.get(server.url + "/v1/models").json()["data"][0]["max_model_len"] == 40
        with pytest.raises(openai.BadRequestError) as e:
            c.completions.create(model="tiny", prompt=list(range(1, 41)), max_tokens=2)
        assert e.value.code == "context_length_exceeded" and "this model's context is 40" in e.value.message
        out = c.completions.create(model="tiny", prompt=list(range(1, 31)), max_tokens=100, temperature=0,
                                   extra_body={"ignore_eos": True})
        assert (out.usage.completion_tokens, out.choices[0].finish_reason) == (10, "length")
        assert other.engine.scheduler.layout.capacity == 40
    finally:
        server.close()


def test_one_step_hands_every_requests_events_to_the_event_loop_at_once():
    """The engine thread wakes the event loop once per step, not once per token (docs/notes/serve.md)."""
    import asyncio

    from gptoss.serve.loop import Mailbox, hand_over

    class CountingLoop:
        def __init__(self):
            self.calls = []

        def call_soon_threadsafe(self, fn, *args):
            self.calls.append((fn, args))

    loop = CountingLoop()
    boxes = [Mailbox(loop) for _ in range(5)]
    hand_over([(box, (f"event {i}",)) for i, box in enumerate(boxes)])
    assert len(loop.calls) == 1
    fn, args = loop.calls[0]
    fn(*args)  # (what the event loop runs)
    assert [box.items for box in boxes] == [[f"event {i}"] for i in range(5)]

    async def drain():
        box = Mailbox()
        hand_over([(box, ("a", "b"))])
        hand_over([(box, ("c",))])
        first = await box.get()
        empty = await box.get(timeout=0.01)
        return first, empty

    # events that came in two hand-overs before the handler looked are read at once; then none comes
    assert asyncio.run(drain()) == (["a", "b", "c"], [])
