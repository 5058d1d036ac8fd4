"""generate and chat: tokens stream to the terminal as they come."""
from __future__ import annotations

import sys
import time
from dataclasses import replace

from .errors import ContextError
from .tokenizer import END, StreamDecoder


def _stats(n_prompt: int, n_new: int, prefill_s: float, decode_s: float) -> str:
    pre = f"{n_prompt / prefill_s:,.1f}" if prefill_s > 0 else "-"
    dec = f"{(n_new - 1) / decode_s:,.1f}" if decode_s > 0 and n_new > 1 else "-"
    return f"[{n_prompt} prompt tokens: {pre} tok/s; {n_new} generated: {dec} tok/s]"


def stream_generation(engine, prompt_ids, sampling, on_token, sequence: int = 0):
    """Run one request through the engine, calling on_token(id) per generated id; returns (ids, reason,
    timings). Interrupted (Ctrl-C), the request is aborted: its slot and pages are free again."""
    start = time.perf_counter()
    first = None
    ids, reason = [], "length"
    rid = engine.add_request(prompt_ids, sampling, sequence=sequence)
    done = False
    try:
        while not done:
            for ev in engine.step():
                if ev.request_id != rid:
                    continue
                if ev.token is not None:
                    if first is None:
                        first = time.perf_counter()
                    ids.append(ev.token)
                    on_token(ev.token)
                if ev.done:
                    reason, done = ev.reason or reason, True
    finally:
        engine.abort(rid)  # (a request that ended is no longer there)
    end = time.perf_counter()
    first = first or end
    return ids, reason, (first - start, end - first)


def run_generate(llm, prompt: str | None, sampling) -> int:
    """Continue `prompt` (text, used as written), streaming the text to stdout."""
    if prompt is None:
        print("run.py: error: generate needs a prompt: -p \"...\"", file=sys.stderr)
        return 2
    tok = llm.tokenizer
    prompt_ids = tok.encode(prompt)
    if prompt_ids and max(prompt_ids) >= llm.model_config.vocab_size:
        print(f"run.py: error: this model's vocabulary has only {llm.model_config.vocab_size} tokens; "
              "text needs the real 201088 (try a model made with --preset tiny-chat)", file=sys.stderr)
        return 2
    stream = StreamDecoder(tok)
    out = sys.stdout
    out.write(prompt)
    out.flush()

    def show(token):
        out.write(stream.push(token))
        out.flush()

    try:
        ids, reason, (prefill_s, decode_s) = stream_generation(llm.engine, prompt_ids, sampling, show)
    except ContextError as e:
        print(f"\nrun.py: error: {e}", file=sys.stderr)
        return 2
    out.write(stream.flush() + "\n")
    print(_stats(len(prompt_ids), len(ids), prefill_s, decode_s), file=sys.stderr)
    return 0


class ChannelPrinter:
    """Shows a harmony reply as it streams: analysis dimmed, final plain, headers hidden."""

    def __init__(self, out):
        from .harmony import StreamParser

        self.out = out
        self.parser = StreamParser()
        self.final_text: list[str] = []
        self.interactive = out.isatty()

    def _write(self, text: str, channel: str | None) -> None:
        if channel == "final":
            self.final_text.append(text)
        if self.interactive and channel != "final":
            text = f"\x1b[2m{text}\x1b[0m"
        self.out.write(text)
        self.out.flush()

    def _show(self, delta, token=None) -> None:
        if delta is None:
            return
        if delta.started and delta.channel != "final":
            self._write(f"[{delta.channel or 'message'}] ", delta.channel)
        self._write(delta.text, delta.channel)
        if delta.ended and token == END:
            self._write("\n", delta.channel)

    def push(self, token: int) -> None:
        self._show(self.parser.push(token), token)

    def final(self) -> str:
        return "".join(self.final_text).strip()

    def stop(self) -> None:
        """The end of a reply (its stop id, its length, or Ctrl-C): what is left of its last message,
        and plain text again on a terminal."""
        self._show(self.parser.finish())
        if self.interactive:
            self.out.write("\x1b[0m")
            self.out.flush()


CHAT_HELP = ("harmony chat: Ctrl-C stops a reply; Ctrl-C at the prompt, an empty line or Ctrl-D "
             "ends the chat.")


def run_chat(llm, options, sampling, first_message: str | None = None, read_line=input) -> int:
    """Interactive harmony chat, as llama.cpp's: Ctrl-C during a reply stops the reply and returns to the
    prompt (what the reply said so far stays in the chat); Ctrl-C at the prompt ends the chat with
    status 130; an empty line or end of input ends it with 0. A chat that outgrows the model's context
    says so and starts afresh from the last message. options: harmony.ChatOptions (the system and
    developer messages); first_message: sent before the first line is read."""
    from .harmony import Message, encode_chat
    from .tokenizer import CALL, RETURN

    context = llm.model_config.max_context
    if llm.model_config.vocab_size < 201088:
        print(f"run.py: error: chat needs the real vocabulary of 201088 tokens; this model has "
              f"{llm.model_config.vocab_size} (try a model made with --preset tiny-chat)", file=sys.stderr)
        return 2
    # a reply ends at <|return|> (its final answer) or <|call|> (a tool call), not at <|endoftext|>
    sampling = replace(sampling, stop_token_ids=() if sampling.ignore_eos else (RETURN, CALL), ignore_eos=True)

    def encode(messages) -> list[int]:
        return encode_chat(messages, options)

    history: list = []
    pending = first_message
    print(CHAT_HELP, file=sys.stderr)
    turn = 0
    while True:
        if pending is None:
            try:
                pending = read_line("\n> ")
            except EOFError:
                print(file=sys.stderr)
                return 0
            except KeyboardInterrupt:
                print(file=sys.stderr)
                return 130
        user, pending = pending, None
        if not user.strip():
            return 0
        message = Message("user", user)
        prompt_ids = encode(history + [message])
        if len(prompt_ids) + 1 > context and history:
            print(f"run.py: the chat no longer fits the model's context ({len(prompt_ids)} tokens with "
                  f"this message, {context} at most): starting a fresh chat with this message",
                  file=sys.stderr)
            history = []
            prompt_ids = encode([message])
        if len(prompt_ids) + 1 > context:
            print(f"run.py: this message alone makes a prompt of {len(prompt_ids)} tokens and the model's "
                  f"context is {context}: write a shorter one", file=sys.stderr)
            continue
        history.append(message)
        printer = ChannelPrinter(sys.stdout)
        try:
            ids, reason, (prefill_s, decode_s) = stream_generation(llm.engine, prompt_ids, sampling, printer.push,
                                                                   sequence=turn)
        except KeyboardInterrupt:
            printer.stop()
            print("\n[reply stopped]", file=sys.stderr)
            ids = None
        except ContextError as e:  # a limit of the engine's beyond the context checked above
            print(f"\nrun.py: {e}: starting a fresh chat", file=sys.stderr)
            history = []
            continue
        if ids is not None:
            printer.stop()  # what is left of the last message
            print(file=sys.stdout)
            print(_stats(len(prompt_ids), len(ids), prefill_s, decode_s), file=sys.stderr)
        if printer.final():
            history.append(Message("assistant", printer.final(), channel="final"))
        turn += 1
        if ids is not None and len(prompt_ids) + len(ids) >= context:
            print(f"run.py: the reply reached the end of the model's context ({context} tokens): the next "
                  "message starts a fresh chat", file=sys.stderr)
            history = []
