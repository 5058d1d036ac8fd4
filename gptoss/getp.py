"""getp: one generation per line of a prompt file, written in input order, atomically, resumable.

Finished prompts are appended to OUTPUT.partial as they complete (one JSON object per line, after a
header that fingerprints the run), so an interrupted run continues with --resume; at the end the
output is written to a temp file and renamed over OUTPUT, and the partial file is removed.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from .engine import ContextError, Request, check_fits, step_tokens


def check_getp_args(args) -> None:
    if not args.input:
        raise ValueError("getp needs an input file: -i prompts.txt")
    if not args.output:
        raise ValueError("getp needs an output file: -o out.txt")
    if not Path(args.input).is_file():
        raise ValueError(f"{args.input}: no such file")
    if Path(args.input).resolve() == Path(args.output).resolve():
        raise ValueError("the output file must differ from the input file")


def read_prompt_lines(path: str) -> list[str]:
    data = Path(path).read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise ValueError(f"{path}: line {line} is not valid UTF-8 (byte {e.start}); "
                         "save the file as UTF-8") from None
    lines = text.splitlines()
    if not lines:
        raise ValueError(f"{path}: the file is empty; write one prompt per line")
    return lines


def parse_id_line(line: str, number: int, vocab_size: int) -> list[int]:
    try:
        ids = [int(tok) for tok in line.split()]
    except ValueError:
        raise ValueError(f"line {number}: not a list of space-separated token ids") from None
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
        raise ValueError(f"line {number}: token id {bad[0]} is outside the vocabulary (0..{vocab_size - 1})")
    return ids


def tokenize_prompts(lines: list[str], args, vocab_size: int, model_path) -> list[list[int]]:
    if args.input_format == "ids":
        return [parse_id_line(line, n + 1, vocab_size) for n, line in enumerate(lines)]
    from .tokenizer import Message, encode_chat, get_tokenizer

    tok = get_tokenizer(args.tokenizer or model_path)
    if args.input_format == "text":
        prompts = [tok.encode(line) for line in lines]
    else:
        messages_for = lambda line: [Message("user", line)]  # noqa: E731
        prompts = [encode_chat(messages_for(line), reasoning_effort=args.reasoning,
                               developer_instructions=args.system, tokenizer=tok) for line in lines]
    too_big = [(n + 1, max(ids)) for n, ids in enumerate(prompts) if ids and max(ids) >= vocab_size]
    if too_big:
        line, token = too_big[0]
        raise ValueError(f"line {line}: token id {token} does not exist in this model's vocabulary of "
                         f"{vocab_size} (a synthetic model with a small vocabulary needs "
                         "--input-format ids)")
    return prompts


def run_fingerprint(args, model_path, prompts: list[list[int]]) -> str:
    h = hashlib.sha256()
    for ids in prompts:
        h.update(" ".join(map(str, ids)).encode() + b"\n")
    key = {"model": str(Path(model_path).resolve()), "prompts": h.hexdigest(), "steps": args.steps,
           "temperature": args.temperature, "top_p": args.top_p, "seed": args.seed,
           "ignore_eos": args.ignore_eos}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


class PartialResults:
    """OUTPUT.partial: a header line with the run's fingerprint, then {"i": line, "ids": [...]} lines."""

    def __init__(self, output: str, fingerprint: str, resume: bool):
        self.path = Path(str(output) + ".partial")
        self.done: dict[int, list[int]] = {}
        if self.path.exists():
            if not resume:
                raise ValueError(f"{self.path} exists from an interrupted run: continue it with "
                                 "--resume, or delete it to start over")
            self._load(fingerprint)
        elif resume:
            print(f"run.py: no {self.path} to resume from; starting from the beginning", file=sys.stderr)
        mode = "a" if self.path.exists() else "w"
        self.file = open(self.path, mode, encoding="utf-8")
        if mode == "w":
            self.file.write(json.dumps({"fingerprint": fingerprint}) + "\n")
            self.file.flush()

    def _load(self, fingerprint: str) -> None:
        lines = self.path.read_text(encoding="utf-8").splitlines()
        header = json.loads(lines[0]) if lines else {}
        if header.get("fingerprint") != fingerprint:
            raise ValueError(f"{self.path} belongs to a different run (other prompts, model or "
                             "settings); delete it to start over")
        for line in lines[1:]:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                break  # a line cut by the interruption: that prompt runs again
            self.done[int(rec["i"])] = [int(t) for t in rec["ids"]]

    def add(self, index: int, ids: list[int]) -> None:
        self.done[index] = ids
        self.file.write(json.dumps({"i": index, "ids": ids}) + "\n")
        self.file.flush()

    def finish(self) -> None:
        self.file.close()
        self.path.unlink(missing_ok=True)


class RunningOutputs:
    """The tokens of the prompts in flight, one row of a [rows, width] array each, so that a step's
    tokens (one per running prompt) go in with one vector write instead of an append per token. Rows
    and width double as needed (the width up to max_new): host memory follows the longest answer so
    far, not -n (2,048 prompts at -n 131072 would otherwise take 1 GiB up front)."""

    def __init__(self, n_prompts: int, max_new: int, rows: int = 64, width: int = 256):
        self.max_new = max_new
        self.row_of = np.full(n_prompts, -1, np.int64)  # prompt -> its row (-1: not running)
        self.buf = np.zeros((rows, max(1, min(max_new, width))), np.int32)
        self.count = np.zeros(rows, np.int64)
        self.free = list(range(rows))[::-1]

    def add(self, index: np.ndarray, token: np.ndarray) -> None:
        """Each prompt index[i] gets token[i] (-1: none)."""
        for i in index[self.row_of[index] < 0].tolist():  # prompts new to the run
            if not self.free:  # twice the rows
                n = len(self.count)
                self.buf = np.concatenate([self.buf, np.zeros_like(self.buf)])
                self.count = np.concatenate([self.count, np.zeros(n, np.int64)])
                self.free = list(range(2 * n - 1, n - 1, -1))
            self.row_of[i] = self.free.pop()
        keep = token >= 0
        rows = self.row_of[index[keep]]
        if len(rows) and self.count[rows].max() >= self.buf.shape[1]:  # twice the width
            width = min(self.max_new, 2 * self.buf.shape[1])
            self.buf = np.concatenate([self.buf, np.zeros((len(self.buf), width - self.buf.shape[1]), np.int32)], 1)
        self.buf[rows, self.count[rows]] = token[keep]
        self.count[rows] += 1

    def pop(self, index: int) -> list[int]:
        """A finished prompt's tokens; its row is free again."""
        row = self.row_of[index]
        if row < 0:
            return []
        ids = self.buf[row, :self.count[row]].tolist()
        self.count[row], self.row_of[index] = 0, -1
        self.free.append(int(row))
        return ids


def write_atomically(path: str, lines: list[str]) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(line + "\n" for line in lines)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def run_getp(backend, args, sampling, model_path) -> int:
    from .tokenizer import STOP_IDS

    cfg = backend.config
    try:
        prompts = tokenize_prompts(read_prompt_lines(args.input), args, cfg.vocab_size, model_path)
    except ValueError as e:
        print(f"run.py: error: {e}", file=sys.stderr)
        return 2
    skipped = set()
    for n, ids in enumerate(prompts):
        try:
            check_fits(len(ids), args.steps, cfg.max_context)
        except ContextError as e:
            if not args.skip_long:
                print(f"run.py: error: line {n + 1}: {e}. Shorten it, or pass --skip-long to leave "
                      "its output line empty and run the rest", file=sys.stderr)
                return 2
            print(f"run.py: warning: line {n + 1}: {e}; its output line stays empty", file=sys.stderr)
            skipped.add(n)

    try:
        partial = PartialResults(args.output, run_fingerprint(args, model_path, prompts), args.resume)
    except ValueError as e:
        print(f"run.py: error: {e}", file=sys.stderr)
        return 2
    todo = [Request(n, ids, args.steps) for n, ids in enumerate(prompts)
            if n not in skipped and n not in partial.done]
    outputs: dict[int, list[int]] = {n: [] for n in range(len(prompts))}
    outputs.update(partial.done)
    running = RunningOutputs(len(prompts), args.steps)

    generated = 0
    start = time.perf_counter()
    from .progress import GetpProgress

    with GetpProgress(total=len(prompts), done=len(prompts) - len(todo), quiet=args.quiet) as bar:
        steps = step_tokens(backend, todo, sampling, stop_ids=STOP_IDS, ignore_eos=args.ignore_eos,
                            max_batch=args.batch)
        for step in steps:  # one engine step: a token (or a stop) for each running prompt
            running.add(step.index, step.token)
            made = int(np.count_nonzero(step.token >= 0))
            generated += made
            bar.tokens(made)
            for index in step.index[step.done].tolist():
                outputs[index] = running.pop(index)
                partial.add(index, outputs[index])
                bar.prompt_done()
    wall = time.perf_counter() - start
    write_atomically(args.output, [" ".join(map(str, outputs[n])) for n in range(len(prompts))])
    partial.finish()

    peak = getattr(backend, "peak_memory_bytes", lambda: None)()
    record = {"prompts": len(prompts), "prompts_run": len(todo), "skipped": len(skipped),
              "generated_tokens": generated, "wall_seconds": round(wall, 3),
              "tokens_per_second": round(generated / wall, 2) if wall > 0 else 0.0,
              "peak_gpu_memory_bytes": peak, "backend": backend.name, "model": str(model_path),
              "steps": args.steps, "batch": args.batch}
    stats = getattr(backend, "stats", None)
    if stats:
        record["engine"] = dict(stats)  # where the time went: steps by kind, host vs GPU seconds
    peak_text = f", peak GPU memory {peak / 2**30:.1f} GiB" if peak else ""
    print(f"getp: {len(prompts)} prompts ({len(todo)} run), {generated} generated tokens in "
          f"{wall:.2f} s: {record['tokens_per_second']:.1f} tokens/s{peak_text} -> {args.output}",
          file=sys.stderr)
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(record, indent=2) + "\n")
    return 0
