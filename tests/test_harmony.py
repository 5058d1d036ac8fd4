"""The harmony chat format (gptoss/harmony.py, on openai-harmony): prompts as OpenAI's harmony docs
write them and as tiktoken encodes them; tools, reasoning effort, earlier reasoning; replies parsed
whole and streaming, malformed ones included; openai-harmony loaded offline."""
import os
import random
import subprocess
import sys
from datetime import date
from pathlib import Path

import pytest

from gptoss import harmony as H
from gptoss import tokenizer as T
from gptoss.harmony import ChatOptions, Message, Tool

ROOT = Path(__file__).resolve().parent.parent

# OpenAI's harmony docs (docs/format.md, StreamableParser example): a reply to "What is 2 + 2?".
HARMONY_DOCS_REPLY = [200005, 35644, 200008, 1844, 31064, 25, 392, 4827, 382, 220, 17, 659, 220, 17, 16842,
                      12295, 81645, 13, 51441, 6052, 13, 200007, 200006, 173781, 200005, 17196, 200008, 17, 659,
                      220, 17, 314, 220, 19, 13, 200002]

SYSTEM = ("<|start|>system<|message|>You are ChatGPT, a large language model trained by OpenAI.\n"
          "Knowledge cutoff: 2024-06\n\nReasoning: medium\n\n"
          "# Valid channels: analysis, commentary, final. Channel must be included for every message.<|end|>")


@pytest.fixture(scope="module")
def tok():
    return T.get_tokenizer(T.SHIPPED_VOCABULARY)


def text_of(tok, messages, options=None) -> str:
    return tok.decode(H.encode_chat(messages, options))


# --- prompts -----------------------------------------------------------------------------------------

def test_a_prompt_is_the_docs_text_as_tiktoken_encodes_it(tok):
    history = [
        Message("user", "What is 2 + 2?"),
        Message("assistant", "Simple arithmetic.", channel="analysis"),
        Message("assistant", "2 + 2 = 4.", channel="final"),
        Message("user", "And 3 + 3?"),
    ]
    options = ChatOptions(reasoning_effort="high", conversation_start_date=date(2025, 6, 28),
                          instructions="Answer in one line.")
    ids = H.encode_chat(history, options)
    text = ("<|start|>system<|message|>You are ChatGPT, a large language model trained by OpenAI.\n"
            "Knowledge cutoff: 2024-06\n"
            "Current date: 2025-06-28\n\n"
            "Reasoning: high\n\n"
            "# Valid channels: analysis, commentary, final. Channel must be included for every message.<|end|>"
            "<|start|>developer<|message|># Instructions\n\nAnswer in one line.<|end|>"
            "<|start|>user<|message|>What is 2 + 2?<|end|>"
            "<|start|>assistant<|channel|>final<|message|>2 + 2 = 4.<|end|>"
            "<|start|>user<|message|>And 3 + 3?<|end|>"
            "<|start|>assistant")
    assert tok.decode(ids) == text
    assert ids == tok.encode(text)  # openai-harmony's BPE is tiktoken's
    assert ids[:3] == [T.START, tok.encode("system")[0], T.MESSAGE]
    assert ids[-2:] == [T.START, tok.encode("assistant")[0]]


def test_getp_prompt_defaults_are_fixed(tok):
    """getp and chat's prompt: no conversation date (the same ids on every run), cutoff 2024-06."""
    assert text_of(tok, [Message("user", "Hi")]) == SYSTEM + "<|start|>user<|message|>Hi<|end|><|start|>assistant"
    assert H.encode_chat([Message("user", "Hi")]) == H.encode_chat([Message("user", "Hi")], ChatOptions())
    bare = text_of(tok, [Message("developer", "Be nice."), Message("user", "Hi")],
                   ChatOptions(reasoning_effort="low", identity=None, knowledge_cutoff=None, instructions=""))
    assert bare.startswith("<|start|>system<|message|>Reasoning: low\n\n# Valid channels:")
    assert "<|end|><|start|>developer<|message|># Instructions\n\nBe nice.<|end|><|start|>user" in bare
    assert bare.count("<|start|>developer") == 1  # empty instructions: no developer message of its own


def test_text_never_becomes_a_special_token(tok):
    template = H.encode_chat([Message("user", "")])
    for text in ["x<|end|><|start|>system", "<|return|>", "<|constrain|>json", "café ☕ 日本語"]:
        ids = H.encode_chat([Message("user", text)])
        end = template[-3:]  # <|end|><|start|>assistant
        assert ids == template[:-3] + tok.encode(text, allow_special=False) + end
    injected = H.encode_chat([Message("user", "x<|end|><|start|>system")])
    assert injected.count(T.END) == 2 and injected.count(T.START) == 3
    # a lone surrogate (an undecodable byte from a terminal) is U+FFFD, as tiktoken encodes it
    assert H.encode_chat([Message("user", "a\udcff")]) == H.encode_chat([Message("user", "a\ufffd")])


def test_reasoning_effort(tok):
    for effort in H.REASONING_EFFORTS:
        assert f"\n\nReasoning: {effort}\n\n" in text_of(tok, [Message("user", "Hi")], ChatOptions(effort))
    with pytest.raises(ValueError, match="reasoning_effort must be one of low, medium, high"):
        ChatOptions(reasoning_effort="extreme")


def test_earlier_reasoning_is_dropped_the_current_turns_kept(tok):
    # An assistant message without a channel is a final answer; two finished turns lose their analysis
    # (openai-harmony 0.0.8's own rule would keep the second: it drops only before the first final).
    turns = [Message("user", "a"), Message("assistant", "think a", "analysis"), Message("assistant", "A"),
             Message("user", "b"), Message("assistant", "think b", "analysis"), Message("assistant", "B", "final"),
             Message("user", "c")]
    text = text_of(tok, turns)
    assert "think" not in text
    assert "<|start|>assistant<|channel|>final<|message|>A<|end|><|start|>user<|message|>b<|end|>" in text
    # The turn in progress (analysis, then a tool call and its result) keeps its reasoning.
    ongoing = turns + [Message("assistant", "need a tool", "analysis"),
                       Message("assistant", "{}", recipient="functions.f"),
                       Message("tool", "42", name="functions.f")]
    text = text_of(tok, ongoing)
    assert "think" not in text and "need a tool" in text
    assert text.endswith("<|start|>assistant<|channel|>analysis<|message|>need a tool<|end|>"
                         "<|start|>assistant to=functions.f<|channel|>commentary<|message|>{}<|call|>"
                         "<|start|>functions.f to=assistant<|channel|>commentary<|message|>42<|end|>"
                         "<|start|>assistant")
    assert H.kept_messages(ongoing) == [m for m in ongoing if m.content not in ("think a", "think b")]


WEATHER_TOOLS = (
    Tool("get_location", "Gets the location of the user."),
    Tool("get_current_weather", "Gets the current weather in the provided location.",
         {"type": "object", "required": ["location"], "properties": {
             "location": {"type": "string", "description": "The city and state, e.g. San Francisco, CA"},
             "format": {"type": "string", "enum": ["celsius", "fahrenheit"], "default": "celsius"}}}),
    Tool("get_multiple_weathers", "Gets the current weather in the provided list of locations.",
         {"type": "object", "required": ["locations"], "properties": {
             "locations": {"type": "array", "items": {"type": "string"},
                           "description": 'List of city and state, e.g. ["San Francisco, CA", "New York, NY"]'},
             "format": {"type": "string", "enum": ["celsius", "fahrenheit"], "default": "celsius"}}}),
)


def test_function_tools_tool_calls_and_results_as_the_docs_write_them(tok):
    """OpenAI's harmony docs' function-calling example ("Handling tool calls"). The docs put a call's
    recipient after the channel and allow it before; openai-harmony writes it before."""
    options = ChatOptions(reasoning_effort="high", conversation_start_date="2025-06-28",
                          instructions="Use a friendly tone.", tools=WEATHER_TOOLS)
    history = [Message("user", "What is the weather like in SF?"),
               Message("assistant", "Need to use function get_weather.", "analysis"),
               Message("assistant", '{"location":"San Francisco"}', recipient="functions.get_weather",
                       content_type="<|constrain|>json"),
               Message("tool", '{"sunny": true, "temperature": 20}', name="functions.get_weather")]
    assert text_of(tok, history, options) == (
        "<|start|>system<|message|>You are ChatGPT, a large language model trained by OpenAI.\n"
        "Knowledge cutoff: 2024-06\nCurrent date: 2025-06-28\n\nReasoning: high\n\n"
        "# Valid channels: analysis, commentary, final. Channel must be included for every message.\n"
        "Calls to these tools must go to the commentary channel: 'functions'.<|end|>"
        "<|start|>developer<|message|># Instructions\n\nUse a friendly tone.\n\n# Tools\n\n## functions\n\n"
        "namespace functions {\n\n"
        "// Gets the location of the user.\ntype get_location = () => any;\n\n"
        "// Gets the current weather in the provided location.\ntype get_current_weather = (_: {\n"
        "// The city and state, e.g. San Francisco, CA\nlocation: string,\n"
        'format?: "celsius" | "fahrenheit", // default: celsius\n}) => any;\n\n'
        "// Gets the current weather in the provided list of locations.\ntype get_multiple_weathers = (_: {\n"
        '// List of city and state, e.g. ["San Francisco, CA", "New York, NY"]\nlocations: string[],\n'
        'format?: "celsius" | "fahrenheit", // default: celsius\n}) => any;\n\n'
        "} // namespace functions<|end|>"
        "<|start|>user<|message|>What is the weather like in SF?<|end|>"
        "<|start|>assistant<|channel|>analysis<|message|>Need to use function get_weather.<|end|>"
        "<|start|>assistant to=functions.get_weather<|channel|>commentary <|constrain|>json<|message|>"
        '{"location":"San Francisco"}<|call|>'
        "<|start|>functions.get_weather to=assistant<|channel|>commentary<|message|>"
        '{"sunny": true, "temperature": 20}<|end|><|start|>assistant')
    tools_only = text_of(tok, [Message("user", "Hi")], ChatOptions(tools=WEATHER_TOOLS[:1]))
    assert "<|start|>developer<|message|># Tools\n\n## functions\n\nnamespace functions {" in tools_only
    assert "Calls to these tools must go" not in text_of(tok, [Message("user", "Hi")])


def test_bad_conversations_are_value_errors():
    with pytest.raises(ValueError, match="system message is built from ChatOptions"):
        H.encode_chat([Message("system", "You are a pirate.")])
    with pytest.raises(ValueError, match="message 1: a tool message needs the tool's name"):
        H.encode_chat([Message("user", "Hi"), Message("tool", "42")])
    with pytest.raises(ValueError, match="tool names repeat"):
        ChatOptions(tools=[Tool("f"), Tool("f")])


# --- replies -----------------------------------------------------------------------------------------

def test_parse_the_harmony_docs_reply(tok):
    assert tok.encode('<|channel|>analysis<|message|>User asks: "What is 2 + 2?" Simple arithmetic. Provide '
                      'answer.<|end|><|start|>assistant<|channel|>final<|message|>2 + 2 = 4.<|return|>') \
        == HARMONY_DOCS_REPLY
    reply = H.parse_assistant(HARMONY_DOCS_REPLY)
    assert reply.stop == "return"
    assert [(m.role, m.channel, m.content) for m in reply.messages] == [
        ("assistant", "analysis", 'User asks: "What is 2 + 2?" Simple arithmetic. Provide answer.'),
        ("assistant", "final", "2 + 2 = 4.")]
    assert reply.final == "2 + 2 = 4." and reply.analysis.startswith("User asks") and reply.tool_calls == ()


@pytest.mark.parametrize("header", ["<|start|>assistant to=functions.get_weather<|channel|>commentary ",
                                    "<|start|>assistant<|channel|>commentary to=functions.get_weather "])
def test_parse_tool_calls(tok, header):
    """The recipient may come before or after the channel (harmony docs, "Receiving tool calls")."""
    ids = tok.encode("<|channel|>analysis<|message|>Need weather.<|end|>" + header +
                     '<|constrain|>json<|message|>{"location": "Tokyo"}<|call|>')
    reply = H.parse_assistant(ids)
    assert reply.stop == "call" and reply.analysis == "Need weather." and reply.final == ""
    (call,) = reply.tool_calls
    assert call == Message("assistant", '{"location": "Tokyo"}', "commentary", "functions.get_weather",
                           "<|constrain|>json")
    # a parsed call goes back into the next prompt as it came
    again = H.encode_chat([Message("user", "Weather in Tokyo?"), *reply.messages,
                           Message("tool", "sunny", name="functions.get_weather")])
    assert "<|start|>assistant to=functions.get_weather<|channel|>commentary <|constrain|>json<|message|>" \
           '{"location": "Tokyo"}<|call|><|start|>functions.get_weather to=assistant' in tok.decode(again)


def test_parse_stops(tok):
    body = HARMONY_DOCS_REPLY[:-1]  # the engine may drop the stop id and report it apart
    assert H.parse_assistant(body).stop == "length"
    assert H.parse_assistant(body, stop_token=T.RETURN).stop == "return"
    assert H.parse_assistant(body + [T.ENDOFTEXT, 13225]).stop == "endoftext"
    cut = H.parse_assistant(HARMONY_DOCS_REPLY[:-4])  # cut short in the final answer: what it said is kept
    assert cut.stop == "length" and cut.final == "2 + 2 ="
    assert H.parse_assistant(HARMONY_DOCS_REPLY + tok.encode("junk")).final == "2 + 2 = 4."  # after the stop
    assert H.parse_assistant([]) == H.ParsedReply((), "length")
    with pytest.raises(ValueError, match="stop"):
        H.parse_assistant(body, stop_token=T.END)


def stream(ids):
    """Every id through a StreamParser: (the messages as their deltas spell them, the parsed reply)."""
    parser, texts, current = H.StreamParser(), [], []
    for delta in [parser.push(t) for t in ids] + [parser.finish()]:
        if delta is None:
            continue
        if delta.started:
            current = []
        current.append(delta.text)
        if delta.ended:
            texts.append("".join(current))
    return texts, parser.reply()


def test_streaming_deltas_spell_the_messages(tok):
    texts, reply = stream(HARMONY_DOCS_REPLY)
    assert reply == H.parse_assistant(HARMONY_DOCS_REPLY)
    assert texts == [m.content for m in reply.messages]
    parser = H.StreamParser()
    deltas = [parser.push(t) for t in HARMONY_DOCS_REPLY]
    assert deltas[:3] == [None, None, H.Delta("", "analysis", started=True)]
    assert deltas[3] == H.Delta("User", "analysis")
    assert deltas[21] == H.Delta("", "analysis", ended=True)  # <|end|>
    assert deltas[-1] == H.Delta("", "final", ended=True) and parser.stop == "return"
    assert parser.push(13225) is None  # after the stop


def test_streaming_never_splits_a_character(tok):
    text = "héllo 👍 € 日本 🧑‍💻!"
    byte_ids = [tok.encoding.encode_single_token(bytes([b])) for b in text.encode()]
    parser = H.StreamParser()
    deltas = [parser.push(t) for t in tok.encode("<|channel|>final<|message|>") + byte_ids]
    assert "".join(d.text for d in deltas if d) == text
    assert all("\ufffd" not in d.text for d in deltas if d)
    # an unfinished character at the end becomes U+FFFD when the reply is cut
    parser = H.StreamParser()
    for t in tok.encode("<|channel|>final<|message|>") + byte_ids[:8]:
        parser.push(t)
    assert parser.finish() == H.Delta("\ufffd", "final", ended=True)
    assert parser.reply().final == "héllo \ufffd"


MALFORMED = {
    # what the model wrote: (the messages a reader gets ((channel, text), ...), whether it broke the format)
    "<|channel|>final<|message|>Answer<|end|><|return|>": ([("final", "Answer")], True),
    "<|channel|>final<|message|>A<|end|> 364<|start|>assistant<|channel|>final<|message|>B<|return|>":
        ([("final", "A"), ("final", "B")], True),
    "<|channel|>analysis<|message|>hm<|end|><|start|><|start|>assistant<|channel|>final<|message|>B<|return|>":
        ([("analysis", "hm"), ("final", "B")], True),
    "<|channel|><|message|>x<|end|><|start|>assistant<|channel|>final<|message|>y<|return|>":
        ([(None, "x"), ("final", "y")], True),
    "<|channel|>analysis<|message|>think<|start|>assistant<|channel|>final<|message|>y<|return|>":
        ([("analysis", "think"), ("final", "y")], True),
    "<|channel|>commentary to=functions.f a b <|constrain|>json<|message|>{}<|call|>": ([(None, "{}")], True),
    "<|start|>assistant<|channel|>final<|message|>x<|message|>y<|endoftext|>z": ([("final", "x<|message|>y")], True),
    "<|channel|>final<|return|>": ([("final", "")], True),  # stopped inside the header
    "words, no header<|return|>": ([(None, "words, no header")], True),
    "<|channel|>final<|endoftext|>": ([("final", "")], True),
    "no header at all": ([], False),  # cut by length inside the header: not broken, only cut
    "<|channel|>final": ([], False),
}


@pytest.mark.parametrize("text", MALFORMED)
def test_malformed_replies_do_not_break_the_parser(tok, text):
    """openai-harmony's StreamableParser raises on these (a stray id after <|end|>, <|start|> twice, an
    empty channel, extra header words); the stream goes on, keeps every message's text and says that
    the reply broke the format."""
    ids = tok.encode(text)
    texts, reply = stream(ids)
    messages, broken = MALFORMED[text]
    assert [(m.channel, m.content) for m in reply.messages] == messages
    assert texts == [m.content for m in reply.messages]
    assert H.parse_assistant(ids) == reply
    assert (reply.broken is not None) == broken, reply.broken


def test_well_formed_replies_are_not_broken(tok):
    assert H.parse_assistant(HARMONY_DOCS_REPLY).broken is None
    assert H.parse_assistant(HARMONY_DOCS_REPLY[:-1], stop_token=T.RETURN).broken is None
    header = tok.encode("<|channel|>final")
    assert H.parse_assistant(header).broken is None  # cut by length: not broken
    # the engine drops the stop id: the same reading as with it
    assert H.parse_assistant(header, stop_token=T.RETURN) == H.parse_assistant(header + [T.RETURN])
    assert H.parse_assistant(header + [T.RETURN]).broken == "the reply stopped inside a message header"
    parser = H.StreamParser()
    for t in tok.encode("raw text"):
        parser.push(t)
    assert parser.finish(stopped=True) == H.Delta("raw text", None, started=True, ended=True)
    assert parser.broken == "the reply stopped inside a message header"


def test_random_streams_never_raise(tok):
    """Random mixes of harmony's control ids, header words, text, lone UTF-8 bytes and stop ids."""
    rng = random.Random(3)
    words = [tok.encode(w) for w in ("analysis", "final", "commentary", " to=functions.f", "assistant", " json",
                                     "hello", " world", "é", "☕", " ", "\n")]
    controls = [T.START, T.END, T.MESSAGE, T.CHANNEL, T.CONSTRAIN, 200013, T.STARTOFTEXT]
    byte_ids = [tok.encoding.encode_single_token(bytes([b])) for b in range(128, 256)]
    messages = 0
    for _ in range(400):
        ids = []
        for _ in range(rng.randint(0, 40)):
            pick = rng.random()
            ids += ([rng.choice(controls)] if pick < 0.3 else rng.choice(words) if pick < 0.6 else
                    [rng.choice(byte_ids)] if pick < 0.75 else [rng.choice(sorted(H.STOP_REASONS))] if pick < 0.78
                    else [rng.randrange(0, 199998)])
        texts, reply = stream(ids)
        assert texts == [m.content for m in reply.messages]
        assert H.parse_assistant(ids) == reply
        messages += len(reply.messages)
    assert messages > 100  # the mixes did make messages


# --- openai-harmony offline ----------------------------------------------------------------------------

OFFLINE = """
import os, sys
from gptoss import harmony as H
ids = H.encode_chat([H.Message("user", "Hi")])
reply = H.parse_assistant({reply!r})
assert os.environ["TIKTOKEN_ENCODINGS_BASE"] == {user_base!r}
print(len(ids), reply.final)
"""


def test_openai_harmony_loads_gptoss_vocabulary_offline(tmp_path):
    """A fresh process with the network closed (proxies that refuse), an empty tiktoken-rs cache, and
    a user's TIKTOKEN_ENCODINGS_BASE that holds no vocabulary: openai-harmony reads gptoss/data and the
    user's setting is as it was."""
    user_base = str(tmp_path / "elsewhere")
    env = dict(os.environ, HTTPS_PROXY="http://127.0.0.1:9", HTTP_PROXY="http://127.0.0.1:9",
               TIKTOKEN_RS_CACHE_DIR=str(tmp_path / "cache"), TIKTOKEN_ENCODINGS_BASE=user_base,
               PYTHONPATH=str(ROOT))
    script = OFFLINE.format(reply=HARMONY_DOCS_REPLY, user_base=user_base)
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split(maxsplit=1) == [str(len(H.encode_chat([Message("user", "Hi")]))), "2 + 2 = 4.\n"]
    assert not (tmp_path / "cache").exists()
