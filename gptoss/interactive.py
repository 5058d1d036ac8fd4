"""generate and chat: tokens stream to the terminal as they come."""
from __future__ import annotations

import sys
import time

from .engine import ContextError, Request
from .tokenizer import StreamDecoder


def _stats(n_prompt: int, n_new: int, prefill_s: float, decode_s: float) -> str:
    pre = f"{n_prompt / prefill_s:,.1f}" if prefill_s > 0 else "-"
    dec = f"{(n_new - 1) / decode_s:,.1f}" if decode_s > 0 and n_new > 1 else "-"
    return f"[{n_prompt} prompt tokens: {pre} tok/s; {n_new} generated: {dec} tok/s]"


def stream_generation(backend, prompt_ids, args, sampling, on_token, stop_ids, index: int = 0):
    """Run one request, calling on_token(id) per generated id; returns (ids, reason, timings)."""
    start = time.perf_counter()
    first = None
    ids, reason = [], "length"
    events = backend.generate([Request(index, prompt_ids, args.steps)], sampling, stop_ids=stop_ids,
                              ignore_eos=args.ignore_eos)
    for ev in events:
        if ev.token is not None:
            if first is None:
                first = time.perf_counter()
            ids.append(ev.token)
            on_token(ev.token)
        if ev.done:
            reason = ev.reason or reason
    end = time.perf_counter()
    first = first or end
    return ids, reason, (first - start, end - first)


def run_generate(backend, args, sampling, model_path) -> int:
    from .tokenizer import STOP_IDS, get_tokenizer

    if args.prompt is None:
        print("run.py: error: generate needs a prompt: -p \"...\"", file=sys.stderr)
        return 2
    tok = get_tokenizer(args.tokenizer or model_path)
    prompt_ids = tok.encode(args.prompt)
    if prompt_ids and max(prompt_ids) >= backend.config.vocab_size:
        print(f"run.py: error: this model's vocabulary has only {backend.config.vocab_size} tokens; "
              "text needs the real 201088 (try a model made with --preset tiny-chat)", file=sys.stderr)
        return 2
    stream = StreamDecoder(tok)
    out = sys.stdout
    out.write(args.prompt)
    out.flush()

    def show(token):
        out.write(stream.push(token))
        out.flush()

    try:
        ids, reason, (prefill_s, decode_s) = stream_generation(backend, prompt_ids, args, sampling, show,
                                                               STOP_IDS)
    except ContextError as e:
        print(f"\nrun.py: error: {e}", file=sys.stderr)
        return 2
    out.write(stream.flush() + "\n")
    print(_stats(len(prompt_ids), len(ids), prefill_s, decode_s), file=sys.stderr)
    return 0


class ChannelPrinter:
    """Shows a harmony reply as it streams: analysis dimmed, final plain, headers hidden."""

    def __init__(self, tokenizer, out):
        from . import tokenizer as T

        self.T, self.tok, self.out = T, tokenizer, out
        self.state = "header"  # "header" (after <|start|>/<|channel|>), "channel", "message"
        self.channel = ""
        self.stream = StreamDecoder(tokenizer)
        self.final_text: list[str] = []
        self.interactive = out.isatty()

    def _write(self, text: str) -> None:
        if self.channel == "final":
            self.final_text.append(text)
        if self.interactive and self.channel != "final":
            text = f"\x1b[2m{text}\x1b[0m"
        self.out.write(text)
        self.out.flush()

    def push(self, token: int) -> None:
        T = self.T
        if token == T.CHANNEL:
            self.state, self.channel = "channel", ""
        elif token == T.MESSAGE:
            self.state = "message"
            if self.channel != "final":
                self._write(f"[{self.channel or 'message'}] ")
        elif token in (T.END, T.RETURN, T.CALL):
            self._write(self.stream.flush())
            if token == T.END:
                self._write("\n")
            self.state = "header"
        elif token == T.START:
            self.state = "header"
        elif self.state == "channel":
            self.channel += self.tok.decode([token])
            self.channel = self.channel.strip()
        elif self.state == "message":
            self._write(self.stream.push(token))

    def final(self) -> str:
        return "".join(self.final_text).strip()


def run_chat(backend, args, sampling, model_path) -> int:
    from .tokenizer import Message, encode_chat, get_tokenizer

    tok = get_tokenizer(args.tokenizer or model_path)
    if backend.config.vocab_size < 201088:
        print(f"run.py: error: chat needs the real vocabulary of 201088 tokens; this model has "
              f"{backend.config.vocab_size} (try a model made with --preset tiny-chat)", file=sys.stderr)
        return 2
    from .tokenizer import CALL, RETURN

    history: list = []
    pending = args.prompt
    print("harmony chat: an empty line or Ctrl-D ends it.", file=sys.stderr)
    turn = 0
    while True:
        if pending is None:
            try:
                pending = input("\n> ")
            except EOFError:
                print(file=sys.stderr)
                return 0
        user, pending = pending, None
        if not user.strip():
            return 0
        history.append(Message("user", user))
        prompt_ids = encode_chat(history, reasoning_effort=args.reasoning,
                                 developer_instructions=args.system, tokenizer=tok)
        printer = ChannelPrinter(tok, sys.stdout)
        try:
            ids, reason, (prefill_s, decode_s) = stream_generation(
                backend, prompt_ids, args, sampling, printer.push, stop_ids={RETURN, CALL}, index=turn)
        except ContextError as e:
            print(f"\nrun.py: error: {e}; start a new chat", file=sys.stderr)
            return 2
        printer.push(RETURN)  # flush what is left of the last message
        print(file=sys.stdout)
        print(_stats(len(prompt_ids), len(ids), prefill_s, decode_s), file=sys.stderr)
        history.append(Message("assistant", printer.final(), channel="final"))
        turn += 1
