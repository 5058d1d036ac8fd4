"""run.py's chat as llama.cpp's: Ctrl-C stops a reply and returns to the prompt, Ctrl-C at the prompt ends
the chat (130); a chat that outgrows the context starts afresh instead of ending. The backend is
scripted (its replies are token ids of real harmony text); the tokenizer and the chat loop are real."""
import argparse
import os
import signal
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

from gptoss.engine import TokenEvent
from gptoss.sampling import SamplingParams

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tok():
    from gptoss.tokenizer import get_tokenizer

    return get_tokenizer()


@dataclass
class Config:
    max_context: int
    vocab_size: int = 201088


class ScriptedBackend:
    """Replies with `reply` (harmony text); on the turns in `interrupt_on`, Ctrl-C comes after
    `cut_after` tokens. Keeps every request's prompt."""

    def __init__(self, tok, reply, max_context=4096, interrupt_on=(), cut_after=4):
        self.config = Config(max_context)
        self.ids = tok.encode(reply)
        self.interrupt_on, self.cut_after = set(interrupt_on), cut_after
        self.prompts = []

    def generate(self, requests, sampling, stop_ids=(), ignore_eos=False, max_batch=None):
        (req,) = requests
        turn = len(self.prompts)
        self.prompts.append(req.prompt_ids)
        budget = min(req.max_new, self.config.max_context - len(req.prompt_ids))
        ids = self.ids[:budget]
        for n, token in enumerate(ids):
            if turn in self.interrupt_on and n == self.cut_after:
                raise KeyboardInterrupt
            yield TokenEvent(req.index, token, n == len(ids) - 1, "length" if n == len(ids) - 1 else None)


def chat_args(**kw):
    base = dict(prompt=None, tokenizer=None, reasoning="medium", system=None, steps=64, ignore_eos=False)
    return argparse.Namespace(**{**base, **kw})


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

    backend = ScriptedBackend(tok, REPLY, interrupt_on={0}, cut_after=6)
    code = run_chat(backend, chat_args(), SamplingParams(), None,
                    read_line=scripted_input(["Why is the sky blue?", "Say it again.", KeyboardInterrupt]))
    assert code == 130  # Ctrl-C at the prompt ends the chat
    out, err = capsys.readouterr()
    assert err.count("[reply stopped]") == 1
    assert "Rayleigh scattering." in out  # the second reply ran to its end
    cut_text = tok.decode(backend.ids[3:6]).strip()  # what the first reply said before Ctrl-C
    assert cut_text and out.startswith(cut_text)
    # the second turn's prompt: the first question, what the stopped reply said so far, the new question
    history = [Message("user", "Why is the sky blue?"), Message("assistant", cut_text, channel="final"),
               Message("user", "Say it again.")]
    assert backend.prompts[1] == encode_chat(history)


def test_end_of_input_and_an_empty_line_end_with_0(tok, capsys):
    from gptoss.interactive import run_chat

    backend = ScriptedBackend(tok, REPLY)
    assert run_chat(backend, chat_args(), SamplingParams(), None, read_line=scripted_input(["Hi", EOFError])) == 0
    assert run_chat(backend, chat_args(), SamplingParams(), None, read_line=scripted_input([""])) == 0
    assert len(backend.prompts) == 1


def test_a_reply_shows_by_channel_and_only_its_final_answer_stays(tok, capsys):
    """Analysis is labelled (dimmed on a terminal), the final answer plain; a stray id after <|end|>
    does not stop the reply; the next prompt carries the final answer alone."""
    from gptoss.harmony import ChatOptions, Message, encode_chat
    from gptoss.interactive import run_chat

    reply = ("<|channel|>analysis<|message|>Rayleigh.<|end|> stray<|start|>assistant<|channel|>final<|message|>"
             "Blue.<|return|>")
    backend = ScriptedBackend(tok, reply)
    assert run_chat(backend, chat_args(reasoning="high"), SamplingParams(), None,
                    read_line=scripted_input(["Sky?", "Again?", EOFError])) == 0
    out = capsys.readouterr().out
    assert out.count("[analysis] Rayleigh.\nBlue.\n") == 2 and "stray" not in out
    history = [Message("user", "Sky?"), Message("assistant", "Blue.", "final"), Message("user", "Again?")]
    assert backend.prompts[1] == encode_chat(history, ChatOptions(reasoning_effort="high"))


def test_a_full_context_starts_a_fresh_chat(tok, capsys):
    from gptoss.interactive import run_chat
    from gptoss.harmony import Message, encode_chat

    one = len(encode_chat([Message("user", "Hello")]))
    reply = "<|channel|>final<|message|>" + " word" * 40 + "<|return|>"
    # room for one turn and its reply, not for a second turn on top
    backend = ScriptedBackend(tok, reply, max_context=one + 30)
    long = "many words " * 200
    code = run_chat(backend, chat_args(), SamplingParams(), None,
                    read_line=scripted_input(["Hello", "Hello", long, "Hello", EOFError]))
    assert code == 0
    err = capsys.readouterr().err
    assert "the reply reached the end of the model's context" in err and "the next message starts a fresh chat" in err
    assert "write a shorter one" in err  # the long message alone does not fit: back to the prompt
    fresh = encode_chat([Message("user", "Hello")])
    assert backend.prompts == [fresh, fresh, fresh]  # each turn after a full context starts afresh

    backend = ScriptedBackend(tok, "<|channel|>final<|message|>ok<|return|>", max_context=one + 8)
    run_chat(backend, chat_args(), SamplingParams(), None, read_line=scripted_input(["Hello", "Hello", EOFError]))
    err = capsys.readouterr().err
    assert "the chat no longer fits the model's context" in err and "starting a fresh chat with this message" in err
    assert backend.prompts == [fresh, fresh]


HARNESS = textwrap.dedent("""
    import os, signal, sys
    sys.path[:0] = [{root!r}, {tests!r}]
    from test_chat import ScriptedBackend, chat_args, REPLY
    from gptoss.interactive import run_chat
    from gptoss.sampling import SamplingParams
    from gptoss.tokenizer import get_tokenizer

    class SelfInterrupting(ScriptedBackend):
        def generate(self, requests, *args, **kwargs):
            for n, event in enumerate(super().generate(requests, *args, **kwargs)):
                if len(self.prompts) == 1 and n == 5:
                    os.kill(os.getpid(), signal.SIGINT)  # a real Ctrl-C, in the middle of the first reply
                yield event

    backend = SelfInterrupting(get_tokenizer(), REPLY)
    sys.exit(run_chat(backend, chat_args(), SamplingParams(), None))
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
