"""getp, the batch mode (the name of the original run.cpp's mode for it): one generation per line of a
prompt file, written in input order, atomically, resumable.

Finished prompts are appended to OUTPUT.partial as they complete (one JSON object per line, after a
header that fingerprints the run), so an interrupted run continues with --resume; at the end the
output is written to a temp file and renamed over OUTPUT, and the partial file is removed.

The files are checked before the model loads (check_getp_options): OUTPUT and the --json file may be
none of the run's inputs, and replace an existing file only with --force; an OUTPUT.partial holding
finished prompts is continued with --resume or discarded with --force, never silently. A blank prompt
line is an error unless --skip-blank (its output line stays empty, like a --skip-long line's).
"""
from __future__ import annotations

import hashlib
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .engine.request import check_fits
from .errors import ContextError, GptossError
from .outputs import check_output_path, write_atomically, write_lines


class GetpError(GptossError, ValueError):
    """Bad getp input (a prompt line, the partial file, ...); the message is one line."""


@dataclass(frozen=True)
class GetpOptions:
    """A getp run's files and input handling (run.py -m getp's flags); how it generates is the
    SamplingParams beside it, how it batches the LLM's EngineConfig."""
    input: str | None = None  # one prompt per line (UTF-8)
    output: str | None = None  # one line of generated token ids per prompt, in input order
    input_format: str = "chat"  # chat: a user message in the harmony format; text: as written; ids: token ids
    reasoning: str = "medium"  # chat: the reasoning effort of the system message
    system: str | None = None  # chat: developer instructions
    tokenizer: str | None = None  # the tokenizer file named (an input: no output may replace it)
    skip_blank: bool = False  # a blank line gets an empty output line (else: an error)
    skip_long: bool = False  # a line too long for the context gets an empty output line (else: an error)
    resume: bool = False  # continue from OUTPUT.partial
    force: bool = False  # replace existing outputs (never an input)
    json_path: str | None = None  # the run's record as JSON
    quiet: bool = False  # no progress bar


def getp_inputs(options: GetpOptions, model_path=None) -> list:
    """The files a getp run reads, which no output may replace: the prompts, the model, the tokenizer
    (named, or the one found beside the model)."""
    inputs = [options.input]
    if model_path is not None and not str(model_path).startswith("synthetic:"):
        inputs.append(model_path)
        if options.tokenizer is None:
            from .tokenizer import find_vocabulary
            try:
                inputs.append(find_vocabulary(model_path))
            except (OSError, ValueError):
                pass  # no tokenizer beside it: nothing more to protect (loading it later says why)
    if options.tokenizer is not None:
        inputs.append(options.tokenizer)
    return inputs


def check_getp_options(options: GetpOptions, model_path=None) -> None:
    """Everything about getp's files that can be checked before the model loads (GetpError,
    OutputPathError)."""
    if not options.input:
        raise GetpError("getp needs an input file: -i prompts.txt")
    if not options.output:
        raise GetpError("getp needs an output file: -o out.txt")
    if not Path(options.input).is_file():
        raise GetpError(f"{options.input}: no such file")
    blank_lines(options.input, read_prompt_lines(options.input), options.skip_blank)  # not UTF-8, empty, blank lines
    inputs = getp_inputs(options, model_path)
    check_output_path(options.output, inputs, force=options.force)
    partial = partial_path(options.output)
    check_output_path(partial, inputs, force=True)
    existing_partial(partial, options.resume, options.force)
    if options.json_path:
        if Path(options.json_path).expanduser().resolve() == Path(options.output).expanduser().resolve():
            raise GetpError("--json and -o name the same file")
        check_output_path(options.json_path, inputs + [partial], force=options.force)


def read_prompt_lines(path: str) -> list[str]:
    data = Path(path).read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise GetpError(f"{path}: line {line} is not valid UTF-8 (byte {e.start}); "
                        "save the file as UTF-8") from None
    lines = text.splitlines()
    if not lines:
        raise GetpError(f"{path}: the file is empty; write one prompt per line")
    return lines


def blank_lines(path, lines: list[str], skip: bool) -> set[int]:
    """The (0-based) numbers of the blank lines; GetpError naming the first unless `skip`."""
    blank = {n for n, line in enumerate(lines) if not line.strip()}
    if blank and not skip:
        more = f" (and {len(blank) - 1} more)" if len(blank) > 1 else ""
        raise GetpError(f"{path}: line {min(blank) + 1} is blank{more}; remove it, or pass --skip-blank "
                        "to leave the output line of a blank line empty")
    return blank


def parse_id_line(line: str, number: int, vocab_size: int) -> list[int]:
    try:
        ids = [int(tok) for tok in line.split()]
    except ValueError:
        raise GetpError(f"line {number}: not a list of space-separated token ids") from None
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
        raise GetpError(f"line {number}: token id {bad[0]} is outside the vocabulary (0..{vocab_size - 1})")
    return ids


def tokenize_prompts(lines: list[str], options: GetpOptions, vocab_size: int, tokenizer,
                     skip=frozenset()) -> list[list[int]]:
    """The prompt ids of each line ([] for the line numbers (0-based) in `skip`). tokenizer: a Tokenizer,
    or a function that gives one (called only for text lines)."""
    if options.input_format == "ids":
        return [[] if n in skip else parse_id_line(line, n + 1, vocab_size) for n, line in enumerate(lines)]
    if options.input_format == "text":
        tok = tokenizer() if callable(tokenizer) else tokenizer
        prompts = [[] if n in skip else tok.encode(line) for n, line in enumerate(lines)]
    else:
        from .harmony import ChatOptions, Message, encode_chat

        options = ChatOptions(reasoning_effort=options.reasoning, instructions=options.system)
        prompts = [[] if n in skip else encode_chat([Message("user", line)], options)
                   for n, line in enumerate(lines)]
    too_big = [(n + 1, max(ids)) for n, ids in enumerate(prompts) if ids and max(ids) >= vocab_size]
    if too_big:
        line, token = too_big[0]
        raise GetpError(f"line {line}: token id {token} does not exist in this model's vocabulary of "
                        f"{vocab_size} (a synthetic model with a small vocabulary needs "
                        "--input-format ids)")
    return prompts


def run_fingerprint(sampling, model_path, prompts: list[list[int]], kv_cache_dtype: str = "bf16") -> str:
    """What --resume checks a partial file against: the model, the prompts, the sampling, and the KV cache's
    format when it is not bf16 (an fp8 cache gives other tokens; bf16 runs keep their fingerprints)."""
    h = hashlib.sha256()
    for ids in prompts:
        h.update(" ".join(map(str, ids)).encode() + b"\n")
    key = {"model": str(Path(model_path).resolve()), "prompts": h.hexdigest(), "steps": sampling.max_tokens,
           "temperature": sampling.temperature, "top_p": sampling.top_p, "seed": sampling.seed,
           "ignore_eos": sampling.ignore_eos}
    if kv_cache_dtype != "bf16":
        key["kv_cache_dtype"] = kv_cache_dtype
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def partial_path(output) -> Path:
    return Path(str(output) + ".partial")


@dataclass
class PartialFile:
    """What OUTPUT.partial holds: the fingerprint of its run (None: the file is empty) and the finished
    prompts, {line index: generated ids}."""
    fingerprint: str | None
    done: dict[int, list[int]]


def read_partial(path: Path) -> PartialFile:
    """Parse OUTPUT.partial: a header line {"fingerprint": ...}, then one {"i": line, "ids": [...]} per
    finished prompt. A last line without its newline was cut by an interruption and is left out (that
    prompt runs again); anything else that does not parse is a GetpError naming the file and the line."""
    def damaged(why: str) -> GetpError:
        return GetpError(f"{path}: not a getp partial file ({why}); delete it, or pass --force "
                         "without --resume to start over")

    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise damaged("it is not UTF-8 text") from None
    *lines, cut = text.split("\n")  # cut: what follows the last newline ("" when the file ends with one)
    if not lines:  # no complete line: empty, or a header cut short when it was being written
        if not cut.strip() or '{"fingerprint"'.startswith(cut[:14]):
            return PartialFile(None, {})
        lines = [cut]
    try:
        header = json.loads(lines[0])
    except json.JSONDecodeError:
        header = None
    if not isinstance(header, dict) or not isinstance(header.get("fingerprint"), str):
        raise damaged("its first line is not getp's header")
    done = {}
    for number, line in enumerate(lines[1:], 2):
        try:
            rec = json.loads(line)
            index, ids = rec["i"], rec["ids"]
            if type(index) is not int or not all(type(t) is int for t in ids):
                raise TypeError
        except (json.JSONDecodeError, KeyError, TypeError):
            raise damaged(f"line {number} is not a finished prompt's record") from None
        done[index] = ids
    return PartialFile(header["fingerprint"], done)


def prompts_text(n: int) -> str:
    return f"{n} finished prompt{'s' * (n != 1)}"


def existing_partial(path: Path, resume: bool, force: bool) -> tuple[PartialFile | None, str | None]:
    """(the partial results to continue from or None to start over, a note for the user or None).
    GetpError when the file holds finished prompts and neither --resume nor --force says what to do
    with them, or when --resume meets a file that is not a getp partial file."""
    if not path.exists():
        return None, (f"no {path} to resume from; starting from the beginning" if resume else None)
    if force and not resume:
        try:
            n = len(read_partial(path).done)
        except ValueError:
            return None, f"--force: replacing {path} (not a getp partial file)"
        return None, f"--force: discarding {path} ({prompts_text(n)} of an earlier run)" if n else None
    found = read_partial(path)
    if not found.done:
        return None, f"{path} holds no finished prompts; starting from the beginning"
    if resume:
        return found, None
    raise GetpError(f"{path} holds {prompts_text(len(found.done))} of an interrupted run: continue it with "
                    "--resume, or pass --force to start over")


class PartialResults:
    """OUTPUT.partial, written as prompts finish: a header line with the run's fingerprint, then
    {"i": line, "ids": [...]} lines. --resume continues from it; --force starts over."""

    def __init__(self, output: str, fingerprint: str, n_prompts: int, resume: bool, force: bool = False):
        self.path = partial_path(output)
        found, note = existing_partial(self.path, resume, force)
        if note:
            print(f"getp: note: {note}", file=sys.stderr)
        self.done: dict[int, list[int]] = {}
        if found is not None:
            if found.fingerprint != fingerprint:
                raise GetpError(f"{self.path} belongs to a different run (other prompts, model or "
                                "settings): delete it, or run without --resume and with --force to "
                                "start over")
            bad = [i for i in found.done if not 0 <= i < n_prompts]
            if bad:
                raise GetpError(f"{self.path}: a record for prompt {bad[0]}, but the run has {n_prompts} "
                                "prompts; delete it, or pass --force without --resume to start over")
            self.done = found.done
        # Rewritten whole (atomically) before appending, so that a line cut by an earlier interruption
        # never has records glued to it.
        records = [json.dumps({"fingerprint": fingerprint})]
        records += [json.dumps({"i": i, "ids": ids}) for i, ids in sorted(self.done.items())]
        write_lines(self.path, records)
        self.file = open(self.path, "a", encoding="utf-8")

    def add(self, index: int, ids: list[int]) -> None:
        self.done[index] = ids
        self.file.write(json.dumps({"i": index, "ids": ids}) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()

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


@dataclass
class GetpPlan:
    """A getp run, ready to generate: the prompts (ids per input line), the lines skipped (blank or too
    long; their output lines stay empty), the partial file (its finished prompts kept), and the lines
    still to run."""
    prompts: list[list[int]]
    blank: set[int]
    too_long: set[int]
    partial: PartialResults
    todo: list[int]
    outputs: dict[int, list[int]]  # line -> generated ids (finished, skipped: [])

    @property
    def skipped(self) -> set[int]:
        return self.blank | self.too_long


def plan_getp(cfg, model_path, tokenizer, options: GetpOptions, sampling, kv_cache_dtype: str = "bf16") -> GetpPlan:
    """Read and tokenize options.input for a model of config `cfg` (tokenizer: a Tokenizer or a function
    that gives one), check each prompt fits the context, and open OUTPUT.partial (continuing it with
    --resume, when it was written by a run of the same fingerprint: kv_cache_dtype is the run's KV cache
    format). GetpError for blank or too long lines (unless skip_blank / skip_long), a partial file of
    another run."""
    lines = read_prompt_lines(options.input)
    blank = blank_lines(options.input, lines, options.skip_blank)
    prompts = tokenize_prompts(lines, options, cfg.vocab_size, tokenizer, skip=blank)
    too_long = set()
    for n, ids in enumerate(prompts):
        if n in blank:
            continue
        try:
            check_fits(len(ids), cfg.max_context)
        except ContextError as e:
            if not options.skip_long:
                raise GetpError(f"line {n + 1}: {e}. Shorten it, or pass --skip-long to leave its output "
                                "line empty and run the rest") from None
            print(f"getp: warning: line {n + 1}: {e}; its output line stays empty", file=sys.stderr)
            too_long.add(n)
    skipped = blank | too_long
    partial = PartialResults(options.output, run_fingerprint(sampling, model_path, prompts, kv_cache_dtype),
                             len(prompts), options.resume, options.force)
    todo = [n for n in range(len(prompts)) if n not in skipped and n not in partial.done]
    outputs: dict[int, list[int]] = {n: [] for n in range(len(prompts))}
    outputs.update(partial.done)
    return GetpPlan(prompts, blank, too_long, partial, todo, outputs)


def finish_getp(plan: GetpPlan, options: GetpOptions, record: dict, peak=None) -> None:
    """Write OUTPUT (atomically, in input order), remove the partial file, print the run's line and
    write the --json record (`record`: the run's own figures: generated_tokens, wall_seconds (not
    rounded), backend, ...)."""
    n_prompts = len(plan.prompts)
    write_lines(options.output, [" ".join(map(str, plan.outputs[n])) for n in range(n_prompts)])
    plan.partial.finish()
    generated, wall = record["generated_tokens"], record["wall_seconds"]
    record = {"prompts": n_prompts, "prompts_run": len(plan.todo), "skipped": len(plan.skipped),
              "skipped_blank": len(plan.blank), "skipped_long": len(plan.too_long),
              "tokens_per_second": round(generated / wall, 2) if wall > 0 else 0.0,
              "peak_gpu_memory_bytes": peak, **record, "wall_seconds": round(wall, 3)}
    peak_text = f", peak GPU memory {peak / 2**30:.1f} GiB" if peak else ""
    print(f"getp: {n_prompts} prompts ({len(plan.todo)} run), {generated} generated tokens in "
          f"{wall:.2f} s: {record['tokens_per_second']:.1f} tokens/s{peak_text} -> {options.output}",
          file=sys.stderr)
    for count, why in ((len(plan.blank), "blank"), (len(plan.too_long), "too long for the context")):
        if count:
            print(f"getp: {count} line{'s' * (count > 1)} skipped as {why}: "
                  f"{'their output lines are' if count > 1 else 'its output line is'} empty", file=sys.stderr)
    if options.json_path:
        write_atomically(options.json_path, json.dumps(record, indent=2) + "\n")


def run_getp(llm, options: GetpOptions, sampling) -> int:
    """Run every prompt line of options.input through llm's engine (gptoss.llm.LLM), one request per line
    with the line as the sampler's sequence id, each with `sampling` (its max_tokens is -n), and write
    options.output (and options.json_path). GetpError for bad input: blank or too long lines (unless
    skip_blank / skip_long), a partial file of another run."""
    model_path, engine = llm.model_path, llm.engine
    plan = plan_getp(llm.model_config, model_path, lambda: llm.tokenizer, options, sampling,
                     llm.config.kv_cache_dtype)
    prompts, partial, todo, outputs = plan.prompts, plan.partial, plan.todo, plan.outputs
    running = RunningOutputs(len(prompts), sampling.max_tokens)
    rids = [engine.add_request(prompts[n], sampling, sequence=n) for n in todo]
    line_of = np.full(max(rids, default=-1) + 1, -1, np.int64)  # request id -> its input line
    line_of[rids] = todo

    generated = 0
    start = time.perf_counter()
    from .progress import GetpProgress

    try:
        with GetpProgress(total=len(prompts), done=len(prompts) - len(todo), quiet=options.quiet) as bar:
            while engine.has_unfinished():  # one engine step: a token (or a stop) for each running prompt
                step = engine.step()
                lines = line_of[step.request_id]
                running.add(lines, step.token)
                made = int(np.count_nonzero(step.token >= 0))
                generated += made
                bar.tokens(made)
                for index in lines[step.done].tolist():
                    outputs[index] = running.pop(index)
                    partial.add(index, outputs[index])
                    bar.prompt_done()
    finally:
        partial.close()
    wall = time.perf_counter() - start
    peak = getattr(llm.runner, "peak_memory_bytes", lambda: None)()
    record = {"generated_tokens": generated, "wall_seconds": wall, "backend": llm.device,
              "model": str(model_path), "steps": sampling.max_tokens, "batch": llm.config.max_seqs,
              "engine": dict(engine.stats)}  # where the time went: steps by kind, host vs GPU seconds
    finish_getp(plan, options, record, peak)
    return 0
