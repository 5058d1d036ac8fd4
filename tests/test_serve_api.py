"""run.py -m serve, the API's edges (issue 15, items 3-5), with the official `openai` client: the
`model` field, chat stop strings, finish reasons (stop, length, tool_calls, error), streamed
/v1/responses, tool_choice, reasoning_effort in the prompt, reasoning kept across tool calls, and each
parameter's good and bad values. Scripted replies go through a stand-in runner (tests/test_serve.py's
ScriptedRunner); the live tests run the tiny synthetic model on the CPU."""
import json
import signal

import pytest

from tests.test_serve import ANSWER, CALL, WEATHER_TOOL, LiveServer, ScriptedRunner, run_py_server, wait_for

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx2")

from gptoss import harmony  # noqa: E402
from gptoss.engine import Engine  # noqa: E402
from gptoss.llm import LLM  # noqa: E402
from gptoss.serve import ServeOptions, build_app  # noqa: E402
from gptoss.tokenizer import STOP_IDS, get_tokenizer  # noqa: E402

USER = [{"role": "user", "content": "Weather in Paris?"}]
BROKEN = "<|channel|><|message|>Hi there<|return|>"  # an empty channel: a header harmony cannot read


@pytest.fixture(scope="module")
def live():
    llm = LLM("synthetic:tiny-chat", device="cpu", progress=False, max_seqs=4)
    server = LiveServer(build_app(llm.engine, llm.tokenizer,
                                  ServeOptions(model_name="tiny", model_aliases=("tiny-alias",), reserve_slots=4)))
    yield server
    server.close()


@pytest.fixture()
def scripted():
    """scripted(reply, ...): a server whose n-th request is answered with the n-th reply (harmony text),
    and its runner (runner.prompts: the prompts it saw)."""
    servers = []

    def start(*replies):
        tok = get_tokenizer()
        runner = ScriptedRunner(tok, list(replies))
        server = LiveServer(build_app(Engine(runner, eos_token_ids=STOP_IDS), tok, ServeOptions(model_name="tiny")))
        servers.append(server)
        return server, runner

    yield start
    for server in servers:
        server.close()


def reply_ids(text: str) -> list:
    """A scripted reply's ids as the engine hands them over (the stop id is not)."""
    ids = get_tokenizer().encode(text)
    return ids[:-1] if ids[-1] in STOP_IDS else ids


# ---- the model field ----------------------------------------------------------------------------------

def test_the_model_field_names_the_served_model(live):
    c = live.client()
    assert c.chat.completions.create(model="tiny", messages=USER, max_tokens=1).model == "tiny"
    assert c.completions.create(model="tiny-alias", prompt="Hi", max_tokens=1).model == "tiny"
    assert c.responses.create(model="tiny-alias", input="Hi", max_output_tokens=1).model == "tiny"
    r = httpx.post(live.url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 1})  # no model: this one
    assert r.status_code == 200 and r.json()["model"] == "tiny"
    calls = [lambda: c.chat.completions.create(model="gpt-4o", messages=USER, max_tokens=1),
             lambda: c.completions.create(model="gpt-4o", prompt="Hi", max_tokens=1),
             lambda: c.responses.create(model="gpt-4o", input="Hi")]
    for call in calls:
        with pytest.raises(openai.NotFoundError) as e:
            call()
        assert e.value.code == "model_not_found" and e.value.param == "model"
        assert e.value.body["message"] == "the model 'gpt-4o' does not exist: this server serves 'tiny'"
    assert [m.id for m in c.models.list().data] == ["tiny"]


def test_run_py_served_model_name_and_sigterm_with_a_stream_in_flight():
    """--served-model-name: the first name is listed and answered, each name is accepted, others 404.
    SIGTERM while a stream runs: the stream finishes whole, then the server exits 0."""
    with run_py_server("--served-model-name", "oss-tiny", "local") as (proc, url):
        c = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)
        assert [m.id for m in c.models.list().data] == ["oss-tiny"]
        assert c.completions.create(model="local", prompt="Hi", max_tokens=1).model == "oss-tiny"
        with pytest.raises(openai.NotFoundError):
            c.completions.create(model="synthetic:tiny-chat", prompt="Hi", max_tokens=1)
        stream = c.completions.create(model="oss-tiny", prompt="Go on", max_tokens=40, stream=True,
                                      stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
        chunks = [next(iter(stream))]
        proc.send_signal(signal.SIGTERM)
        chunks += list(stream)
        assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "length"
        assert chunks[-1].usage.completion_tokens == 40
        assert proc.wait(30) == 0


# ---- stop strings in chat -----------------------------------------------------------------------------

def test_chat_stop_strings_end_the_content_not_the_reasoning(scripted):
    """ANSWER's reasoning is "20 C and sunny.", its answer "It is 20 °C in Paris.": "sunny" is matched on
    the content only (no stop), "Paris" ends the content before it and the request."""
    server, runner = scripted(ANSWER)
    c = server.client()
    full = len(reply_ids(ANSWER))
    kept = c.chat.completions.create(model="tiny", messages=USER, stop="sunny", max_tokens=100)
    assert kept.choices[0].message.content == "It is 20 °C in Paris."
    assert kept.choices[0].message.reasoning_content == "20 C and sunny."
    assert kept.choices[0].finish_reason == "stop" and kept.usage.completion_tokens == full

    cut = c.chat.completions.create(model="tiny", messages=USER, stop=["nowhere", "Paris"], max_tokens=100)
    assert cut.choices[0].message.content == "It is 20 °C in "
    assert cut.choices[0].message.reasoning_content == "20 C and sunny."
    assert cut.choices[0].finish_reason == "stop" and cut.usage.completion_tokens < full
    chunks = list(c.chat.completions.create(model="tiny", messages=USER, stop=["Paris"], max_tokens=100, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == "It is 20 °C in "
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "stop"
    assert chunks[-1].usage.completion_tokens < full  # (the request is aborted: test_serve.py's completions test)


def test_chat_stop_strings_leave_tool_call_arguments_alone(scripted):
    server, _ = scripted(CALL)
    reply = server.client().chat.completions.create(model="tiny", messages=USER, tools=[WEATHER_TOOL], stop="Paris",
                                                    max_tokens=100)
    assert reply.choices[0].finish_reason == "tool_calls"
    assert json.loads(reply.choices[0].message.tool_calls[0].function.arguments) == {"city": "Paris"}


# ---- finish reasons and usage -------------------------------------------------------------------------

def test_finish_reasons_stop_length_and_usage(scripted):
    server, runner = scripted(ANSWER)
    c = server.client()
    done = c.chat.completions.create(model="tiny", messages=USER, max_tokens=100)
    assert done.choices[0].finish_reason == "stop"
    assert (done.usage.prompt_tokens, done.usage.completion_tokens) == (len(runner.prompts[-1]), len(reply_ids(ANSWER)))
    assert done.usage.total_tokens == done.usage.prompt_tokens + done.usage.completion_tokens
    cut = c.chat.completions.create(model="tiny", messages=USER, max_completion_tokens=5)
    assert cut.choices[0].finish_reason == "length" and cut.usage.completion_tokens == 5
    chunks = list(c.chat.completions.create(model="tiny", messages=USER, max_tokens=5, stream=True,
                                            stream_options={"include_usage": True}))
    assert chunks[-2].choices[0].finish_reason == "length" and chunks[-1].usage.completion_tokens == 5


def test_a_reply_that_breaks_harmony_ends_with_finish_reason_error(scripted):
    """The header with an empty channel cannot be read: 200, its text kept as content, finish_reason
    "error" (whole and streamed; the openai client reads it); the Responses API says "failed"."""
    server, _ = scripted(BROKEN, BROKEN, BROKEN, BROKEN)
    c = server.client()
    whole = c.chat.completions.create(model="tiny", messages=USER, max_tokens=100)
    assert whole.choices[0].finish_reason == "error" and whole.choices[0].message.content == "Hi there"
    chunks = list(c.chat.completions.create(model="tiny", messages=USER, max_tokens=100, stream=True))
    assert chunks[-1].choices[0].finish_reason == "error"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == "Hi there"
    failed = c.responses.create(model="tiny", input="Hi")
    assert failed.status == "failed" and failed.output_text == "Hi there"
    assert failed.error.code == "invalid_model_output" and "cannot be read" in failed.error.message
    events = list(c.responses.create(model="tiny", input="Hi", stream=True))
    assert events[-1].type == "response.failed" and events[-1].response.error.code == "invalid_model_output"


# ---- /v1/responses streamed ---------------------------------------------------------------------------

def test_streamed_responses_text_and_reasoning(scripted):
    server, _ = scripted(ANSWER, ANSWER, ANSWER)
    c = server.client()
    events = list(c.responses.create(model="tiny", input="Weather?", stream=True))
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] == "response.completed"
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert "".join(e.delta for e in events if e.type == "response.reasoning_text.delta") == "20 C and sunny."
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == "It is 20 °C in Paris."
    assert [e.item.type for e in events if e.type == "response.output_item.done"] == ["reasoning", "message"]
    final = events[-1].response
    assert final.status == "completed" and final.output_text == "It is 20 °C in Paris."
    assert final.usage.output_tokens == len(reply_ids(ANSWER)) and final.usage.output_tokens_details.reasoning_tokens > 0
    assert final.id == events[0].response.id
    # the same reply whole, and through the client's own accumulating stream helper
    whole = c.responses.create(model="tiny", input="Weather?")
    assert [item.type for item in whole.output] == [item.type for item in final.output]
    with c.responses.stream(model="tiny", input="Weather?") as stream:
        assert stream.get_final_response().output_text == "It is 20 °C in Paris."


def test_streamed_responses_function_call_and_length(scripted):
    server, _ = scripted(CALL, ANSWER)
    c = server.client()
    tool = {"type": "function", **WEATHER_TOOL["function"]}
    events = list(c.responses.create(model="tiny", input="Weather?", tools=[tool], stream=True))
    args = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    assert json.loads(args) == {"city": "Paris"}
    (done,) = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert done.arguments == args and done.name == "get_weather"
    call = events[-1].response.output[-1]
    assert events[-1].type == "response.completed" and call.type == "function_call" and call.name == "get_weather"
    events = list(c.responses.create(model="tiny", input="Weather?", max_output_tokens=4, stream=True))
    assert events[-1].type == "response.incomplete"
    assert events[-1].response.incomplete_details.reason == "max_output_tokens"


def test_streamed_responses_on_the_tiny_model(live):
    events = list(live.client().responses.create(model="tiny", input="Hi", max_output_tokens=3, temperature=0,
                                                 stream=True))
    assert events[0].type == "response.created"
    assert events[-1].type in ("response.completed", "response.incomplete", "response.failed")
    assert events[-1].response.usage.output_tokens <= 3


# ---- tool_choice ----------------------------------------------------------------------------------------

def test_tool_choice_none_declares_no_tools_and_returns_no_calls(scripted):
    server, runner = scripted(CALL, CALL, CALL)
    c = server.client()
    auto = c.chat.completions.create(model="tiny", messages=USER, tools=[WEATHER_TOOL], tool_choice="auto")
    assert auto.choices[0].finish_reason == "tool_calls" and "get_weather" in get_tokenizer().decode(runner.prompts[0])
    none = c.chat.completions.create(model="tiny", messages=USER, tools=[WEATHER_TOOL], tool_choice="none")
    assert "get_weather" not in get_tokenizer().decode(runner.prompts[1])
    assert none.choices[0].message.tool_calls is None and none.choices[0].finish_reason == "stop"
    tool = {"type": "function", **WEATHER_TOOL["function"]}
    out = c.responses.create(model="tiny", input="Weather?", tools=[tool], tool_choice="none")
    assert [item.type for item in out.output] == ["reasoning"]


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_tool_choice_that_forces_a_call_is_refused(live, choice):
    with pytest.raises(openai.BadRequestError, match="cannot force a tool call") as e:
        live.client().chat.completions.create(model="tiny", messages=USER, tools=[WEATHER_TOOL], tool_choice=choice)
    assert e.value.param == "tool_choice"
    r = httpx.post(live.url + "/v1/responses", json={"input": "x", "tool_choice": "required"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tool_choice"


# ---- what the prompt says -------------------------------------------------------------------------------

@pytest.mark.parametrize("effort", ["low", "medium", "high", None])
def test_reasoning_effort_is_the_system_messages(scripted, effort):
    server, runner = scripted(ANSWER)
    extra = {"reasoning_effort": effort} if effort else {}
    server.client().chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}], **extra)
    want = harmony.encode_chat([harmony.Message("user", "Hi")], harmony.ChatOptions(reasoning_effort=effort or "medium"))
    assert runner.prompts[0] == want
    assert f"Reasoning: {effort or 'medium'}" in get_tokenizer().decode(runner.prompts[0])


def test_reasoning_is_kept_across_tool_calls_and_dropped_after_an_answer(scripted):
    """A finished turn's reasoning leaves the prompt; the reasoning of the turn in progress (sent back
    with its tool call) stays, before the call and its result."""
    server, runner = scripted(ANSWER, ANSWER)
    c = server.client()
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}
    messages = [{"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!", "reasoning_content": "OLD-THOUGHT greet back."},
                {"role": "user", "content": "Weather in Oslo?"},
                {"role": "assistant", "content": None, "reasoning_content": "NEW-THOUGHT use the tool.",
                 "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 3}'}]
    c.chat.completions.create(model="tiny", messages=messages, tools=[WEATHER_TOOL])
    prompt = get_tokenizer().decode(runner.prompts[0])
    assert "OLD-THOUGHT" not in prompt
    assert prompt.index("NEW-THOUGHT") < prompt.index("to=functions.get_weather<|channel|>") < prompt.index('{"temp": 3}')
    # the Responses API: the same through its input items
    tool = {"type": "function", **WEATHER_TOOL["function"]}
    c.responses.create(model="tiny", tools=[tool], input=[
        {"role": "user", "content": "Weather in Oslo?"},
        {"type": "reasoning", "content": [{"type": "reasoning_text", "text": "NEW-THOUGHT use the tool."}]},
        {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": '{"city": "Oslo"}'},
        {"type": "function_call_output", "call_id": "c1", "output": '{"temp": 3}'}])
    prompt = get_tokenizer().decode(runner.prompts[1])
    assert prompt.index("NEW-THOUGHT") < prompt.index("to=functions.get_weather<|channel|>") < prompt.index('{"temp": 3}')


# ---- each parameter, good and bad -----------------------------------------------------------------------

GOOD_CHAT = [
    {"temperature": 0}, {"temperature": 2}, {"temperature": 0.7}, {"top_p": 1}, {"top_p": 0.01},
    {"seed": 0}, {"seed": 2**32 - 1}, {"max_tokens": 1}, {"max_completion_tokens": 1}, {"n": 1},
    {"stop": ["a", "b", "c", "d"]}, {"stop": "x"}, {"stream": True, "stream_options": {"include_usage": True}},
    {"logprobs": False}, {"top_logprobs": 0}, {"tool_choice": "auto", "tools": [WEATHER_TOOL]},
    {"reasoning_effort": "high"}, {"an_unknown_field": {"any": ["thing"]}}, {"ignore_eos": True},
]


@pytest.mark.parametrize("change", GOOD_CHAT, ids=[next(iter(c)) for c in GOOD_CHAT])
def test_good_chat_parameters_answer_200(live, change):
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, **change}
    r = httpx.post(live.url + "/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text


BAD = [
    ("chat", {"temperature": 2.5}, "temperature"), ("chat", {"temperature": "0.5"}, "temperature"),
    ("chat", {"top_p": 1.5}, "top_p"), ("chat", {"top_p": -0.1}, "top_p"),
    ("chat", {"seed": "7"}, "seed"), ("chat", {"seed": 1.5}, "seed"), ("chat", {"seed": 2**32}, "seed"),
    ("chat", {"max_tokens": "10"}, "max_tokens"), ("chat", {"max_tokens": 0}, "max_tokens"),
    ("chat", {"max_completion_tokens": -5}, "max_completion_tokens"), ("chat", {"n": 0}, "n"),
    ("chat", {"stream": "yes"}, "stream"), ("chat", {"stream": True, "stream_options": {"include_usage": "yes"}},
                                            "stream_options.include_usage"),
    ("chat", {"stop": [""]}, "stop"), ("chat", {"stop": 7}, "stop"), ("chat", {"logprobs": True}, "logprobs"),
    ("chat", {"top_logprobs": 2}, "top_logprobs"), ("chat", {"tool_choice": "sometimes"}, "tool_choice"),
    ("chat", {"tools": "get_weather"}, "tools"), ("chat", {"messages": [{"role": "user", "content": 5}]}, "messages"),
    ("chat", {"ignore_eos": "no"}, "ignore_eos"), ("chat", {"reasoning_effort": 1}, "reasoning_effort"),
    ("completions", {"echo": True}, "echo"), ("completions", {"logprobs": 0}, "logprobs"),
    ("completions", {"prompt": 5}, "prompt"), ("completions", {"stream_options": {"include_usage": True}},
                                               "stream_options"),
    ("completions", {"max_tokens": 10**9}, "max_tokens"), ("completions", {"n": 2}, "n"),
    ("responses", {"temperature": 3}, "temperature"), ("responses", {"max_output_tokens": 0}, "max_output_tokens"),
    ("responses", {"input": 5}, "input"), ("responses", {"stream": "yes"}, "stream"),
    ("responses", {"reasoning": {"effort": "max"}}, "reasoning.effort"),
]
BODIES = {"chat": ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}),
          "completions": ("/v1/completions", {"prompt": "Hi", "max_tokens": 2}),
          "responses": ("/v1/responses", {"input": "Hi", "max_output_tokens": 2})}


@pytest.mark.parametrize("endpoint,change,param", BAD, ids=[f"{e}-{p}" for e, _, p in BAD])
def test_bad_parameters_answer_400_naming_them(live, endpoint, change, param):
    path, body = BODIES[endpoint]
    r = httpx.post(live.url + path, json={"model": "tiny", **body, **change})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert error["param"].startswith(param), error


def test_logprobs_are_refused_by_name_through_the_client(live):
    with pytest.raises(openai.BadRequestError, match="gptoss does not return log probabilities"):
        live.client().chat.completions.create(model="tiny", messages=USER, logprobs=True, top_logprobs=2)
    with pytest.raises(openai.BadRequestError, match="gptoss does not echo the prompt"):
        live.client().completions.create(model="tiny", prompt="Hi", echo=True)
