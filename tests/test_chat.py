"""run.py's chat as llama.cpp's: Ctrl-C stops a reply and returns to the prompt, Ctrl-C at the prompt ends
the chat (130); a chat that outgrows the context starts afresh instead of ending. The model runner is
scripted (its replies are token ids of real harmony text); the engine, the tokenizer and the chat loop
are real."""
import dataclasses
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from gptoss.config import TINY_CHAT
from gptoss.engine import Engine, EngineConfig, Layout
from gptoss.sampling import SamplingParams

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tok():
    from gptoss.tokenizer import get_tokenizer

    return get_tokenizer()


class ScriptedRunner:
    """A ModelRunner that answers every request with `reply` (harmony text), one id per step; on the
    turns in `interrupt_on`, Ctrl-C comes after `cut_after` ids."""

    name = "scripted"

    def __init__(self, tok, reply, max_context=4096, interrupt_on=(), cut_after=4):
        self.model_config = dataclasses.replace(TINY_CHAT, max_context=max_context)
        self.config = EngineConfig()
        self.ids = tok.encode(reply)
        self.interrupt_on, self.cut_after = set(interrupt_on), cut_after
        self.turn, self.made = -1, 0

    def allocate(self, capacity, slots, mean_positions):
        return Layout(slots, capacity, slots * -(-capacity // 64), slots + 4096, 256)

    def step(self, batch):
        if batch.seq_starts[0] == 0:  # a new request's prompt
            self.turn, self.made = self.turn + 1, 0
        if not len(batch.logit_rows):
            return np.zeros(0, np.int32)
        if self.turn in self.interrupt_on and self.made == self.cut_after:
            raise KeyboardInterrupt
        self.made += 1
        return np.asarray([self.ids[min(self.made - 1, len(self.ids) - 1)]], np.int32)


class RecordingEngine(Engine):
    """Keeps every request's prompt."""

    def __init__(self, runner):
        super().__init__(runner)
        self.prompts = []

    def add_request(self, prompt_ids, *args, **kw):
        self.prompts.append(list(prompt_ids))
        return super().add_request(prompt_ids, *args, **kw)


def scripted_llm(tok, reply, **kw):
    """What run_chat uses of an LLM: the tokenizer, the model's config, the engine."""
    runner = ScriptedRunner(tok, reply, **kw)
    return SimpleNamespace(tokenizer=tok, model_config=runner.model_config, engine=RecordingEngine(runner),
                           runner=runner)


def chat_args(**kw):
    from gptoss.harmony import ChatOptions

    return ChatOptions(**kw)


def scripted_input(lines):
    """input() that returns each line in turn, then raises what the list ends with (EOFError or
    KeyboardInterrupt: Ctrl-D or Ctrl-C at the prompt)."""
    it = iter(lines)

    def read_line(prompt):
        item = next(it)
        if isinstance(item, type) and issubclass(item, BaseException):
            raise item
        return item
    return read_line


REPLY = "<|channel|>final<|message|>The sky is blue because of Rayleigh scattering.<|return|>"


def test_ctrl_c_stops_the_reply_and_the_chat_goes_on(tok, capsys):
    from gptoss.interactive import run_chat
    from gptoss.harmony import Message, encode_chat

    llm = scripted_llm(tok, REPLY, interrupt_on={0}, cut_after=6)
    code = run_chat(llm, chat_args(), SamplingParams(max_tokens=64),
                    read_line=scripted_input(["Why is the sky blue?", "Say it again.", KeyboardInterrupt]))
    assert code == 130  # Ctrl-C at the prompt ends the chat
    out, err = capsys.readouterr()
    assert err.count("[reply stopped]") == 1
    assert "Rayleigh scattering." in out  # the second reply ran to its end
    cut_text = tok.decode(llm.runner.ids[3:6]).strip()  # what the first reply said before Ctrl-C
    assert cut_text and out.startswith(cut_text)
    # the second turn's prompt: the first question, what the stopped reply said so far, the new question
    history = [Message("user", "Why is the sky blue?"), Message("assistant", cut_text, channel="final"),
               Message("user", "Say it again.")]
    assert llm.engine.prompts[1] == encode_chat(history)
    assert not llm.engine.has_unfinished()


def test_end_of_input_and_an_empty_line_end_with_0(tok, capsys):
    from gptoss.interactive import run_chat

    llm = scripted_llm(tok, REPLY)
    params = SamplingParams(max_tokens=64)
    assert run_chat(llm, chat_args(), params, read_line=scripted_input(["Hi", EOFError])) == 0
    assert run_chat(llm, chat_args(), params, read_line=scripted_input([""])) == 0
    assert len(llm.engine.prompts) == 1


def test_a_reply_shows_by_channel_and_only_its_final_answer_stays(tok, capsys):
    """Analysis is labelled (dimmed on a terminal), the final answer plain; a stray id after <|end|>
    does not stop the reply; the next prompt carries the final answer alone."""
    from gptoss.harmony import ChatOptions, Message, encode_chat
    from gptoss.interactive import run_chat

    reply = ("<|channel|>analysis<|message|>Rayleigh.<|end|> stray<|start|>assistant<|channel|>final<|message|>"
             "Blue.<|return|>")
    llm = scripted_llm(tok, reply)
    assert run_chat(llm, chat_args(reasoning_effort="high"), SamplingParams(max_tokens=64),
                    read_line=scripted_input(["Sky?", "Again?", EOFError])) == 0
    out = capsys.readouterr().out
    assert out.count("[analysis] Rayleigh.\nBlue.\n") == 2 and "stray" not in out
    history = [Message("user", "Sky?"), Message("assistant", "Blue.", "final"), Message("user", "Again?")]
    assert llm.engine.prompts[1] == encode_chat(history, ChatOptions(reasoning_effort="high"))


def test_a_full_context_starts_a_fresh_chat(tok, capsys):
    from gptoss.harmony import Message, encode_chat
    from gptoss.interactive import run_chat

    one = len(encode_chat([Message("user", "Hello")]))
    reply = "<|channel|>final<|message|>" + " word" * 40 + "<|return|>"
    # room for one turn and its reply, not for a second turn on top
    llm = scripted_llm(tok, reply, max_context=one + 30)
    long = "many words " * 200
    code = run_chat(llm, chat_args(), SamplingParams(max_tokens=64),
                    read_line=scripted_input(["Hello", "Hello", long, "Hello", EOFError]))
    assert code == 0
    err = capsys.readouterr().err
    assert "the reply reached the end of the model's context" in err and "the next message starts a fresh chat" in err
    assert "write a shorter one" in err  # the long message alone does not fit: back to the prompt
    fresh = encode_chat([Message("user", "Hello")])
    assert llm.engine.prompts == [fresh, fresh, fresh]  # each turn after a full context starts afresh

    llm = scripted_llm(tok, "<|channel|>final<|message|>ok<|return|>", max_context=one + 8)
    run_chat(llm, chat_args(), SamplingParams(max_tokens=64), read_line=scripted_input(["Hello", "Hello", EOFError]))
    err = capsys.readouterr().err
    assert "the chat no longer fits the model's context" in err and "starting a fresh chat with this message" in err
    assert llm.engine.prompts == [fresh, fresh]


HARNESS = textwrap.dedent("""
    import os, signal, sys
    sys.path[:0] = [{root!r}, {tests!r}]
    # Ctrl-C raises KeyboardInterrupt even where this process inherited SIGINT ignored (a background job
    # of a non-interactive shell, which Python then leaves ignored)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    from test_chat import ScriptedRunner, chat_args, scripted_llm, REPLY
    from gptoss.interactive import run_chat
    from gptoss.sampling import SamplingParams
    from gptoss.tokenizer import get_tokenizer

    class SelfInterrupting(ScriptedRunner):
        sent = False

        def step(self, batch):
            if self.made == 5 and not self.sent:
                self.sent = True
                os.kill(os.getpid(), signal.SIGINT)  # a real Ctrl-C, in the middle of the first reply
            return super().step(batch)

    llm = scripted_llm(get_tokenizer(), REPLY)
    llm.engine.runner = SelfInterrupting(llm.tokenizer, REPLY)
    sys.exit(run_chat(llm, chat_args(), SamplingParams(max_tokens=64)))
""")


def test_real_sigint_during_a_reply_and_at_the_prompt(tmp_path):
    """A subprocess gets SIGINT in the middle of its first reply (it sends it to itself), answers a
    second message in full, then gets SIGINT from here while it waits at the prompt: exit 130."""
    script = tmp_path / "chat_harness.py"
    script.write_text(HARNESS.format(root=str(ROOT), tests=str(ROOT / "tests")))
    proc = subprocess.Popen([sys.executable, str(script)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT, env=dict(os.environ))
    seen = ""

    def read_until(done):
        nonlocal seen
        while not done(seen):
            char = proc.stdout.read(1)
            assert char, f"the chat ended early: {seen!r} {proc.stderr.read()!r}"
            seen += char

    try:
        proc.stdin.write("Why?\n")
        proc.stdin.flush()
        read_until(lambda text: "\n> " in text)  # the first prompt, after the stopped reply
        proc.stdin.write("Again.\n")
        proc.stdin.flush()
        read_until(lambda text: "scattering." in text)  # the second reply, in full
        read_until(lambda text: text.endswith("\n> "))  # waiting at the prompt again
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert err.count("[reply stopped]") == 1 and "Traceback" not in err
