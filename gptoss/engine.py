"""Generation over a backend: the float32 NumPy reference on the CPU, or the GPU model.

A backend turns requests (prompt ids + a token budget) into a stream of TokenEvents (`generate`; run.py's
generate and chat) or of StepTokens, one per engine step for many requests at once (`step_tokens`; getp,
where a Python object per token would cost seconds).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from .sampling import SamplingParams, sample
from .weights import SYNTHETIC_PREFIX, open_weights


@dataclass(frozen=True)
class Request:
    index: int  # the prompt's position in the input: the sampler's `sequence`, the output's line
    prompt_ids: list[int]
    max_new: int


@dataclass(frozen=True)
class TokenEvent:
    index: int
    token: int | None  # None when the request ended without a new token (a stop id is not emitted)
    done: bool
    reason: str | None = None  # "stop" (a stop id came), "length" (max_new reached)


@dataclass(frozen=True)
class StepTokens:
    """What one engine step gave several requests, as parallel arrays: the request index, the new token
    (-1 for none: the request ended on a stop id, which is not emitted, or had no budget), whether the
    request is done, and whether it stopped on a stop id (done and not stopped: its length budget)."""
    index: np.ndarray  # int64
    token: np.ndarray  # int64
    done: np.ndarray  # bool
    stopped: np.ndarray  # bool

    @classmethod
    def of(cls, ev: TokenEvent) -> "StepTokens":
        stopped = ev.reason == "stop"
        return cls(np.array([ev.index]), np.array([-1 if ev.token is None else ev.token]), np.array([ev.done]),
                   np.array([stopped]))

    def events(self) -> Iterator[TokenEvent]:
        for i, tok, done, stop in zip(self.index.tolist(), self.token.tolist(), self.done.tolist(),
                                      self.stopped.tolist()):
            yield TokenEvent(i, None if tok < 0 else tok, done, "stop" if stop else "length" if done else None)


def step_tokens(backend, requests: Iterable[Request], sampling: SamplingParams, stop_ids=(),
                ignore_eos: bool = False, max_batch: int | None = None) -> Iterator[StepTokens]:
    """The backend's generation as StepTokens: its own per-step stream where it has one (GPUBackend),
    else its TokenEvents one by one."""
    kw = dict(stop_ids=stop_ids, ignore_eos=ignore_eos, max_batch=max_batch)
    if hasattr(backend, "generate_steps"):
        yield from backend.generate_steps(requests, sampling, **kw)
        return
    for ev in backend.generate(requests, sampling, **kw):
        yield StepTokens.of(ev)


class ContextError(ValueError):
    """A prompt that cannot fit in the model's context."""


def check_fits(prompt_len: int, max_new: int, context: int) -> None:
    if prompt_len == 0:
        raise ContextError("the prompt is empty (it has no tokens)")
    if prompt_len + 1 > context:
        raise ContextError(f"the prompt has {prompt_len} tokens; the model's context is {context}")


def clamp_new_tokens(prompt_len: int, max_new: int, context: int) -> int:
    """Generation stops at the context's end: at most context - prompt_len new tokens."""
    return max(0, min(max_new, context - prompt_len))


class CPUBackend:
    """The NumPy reference, one sequence at a time: slow, exact, and available everywhere."""

    name = "cpu (NumPy reference, float32)"

    def __init__(self, weights):
        from .reference import ReferenceModel

        self.weights = weights
        self.config = weights.config
        self.model = ReferenceModel(weights)

    def generate(self, requests: Iterable[Request], sampling: SamplingParams, stop_ids=(),
                 ignore_eos: bool = False, max_batch: int | None = None) -> Iterator[TokenEvent]:
        """One request after another (max_batch does not apply: the reference runs one sequence)."""
        stop_ids = frozenset(() if ignore_eos else stop_ids)
        for req in requests:
            check_fits(len(req.prompt_ids), req.max_new, self.config.max_context)
            budget = clamp_new_tokens(len(req.prompt_ids), req.max_new, self.config.max_context)
            if budget == 0:
                yield TokenEvent(req.index, None, True, "length")
                continue
            cache = self.model.new_cache()
            logits = self.model.forward(req.prompt_ids, cache)[-1]
            for step in range(budget):
                token = int(sample(logits, sampling, sequence=req.index, step=step))
                if token in stop_ids:
                    yield TokenEvent(req.index, None, True, "stop")
                    break
                last = step == budget - 1
                yield TokenEvent(req.index, token, last, "length" if last else None)
                if not last:
                    logits = self.model.forward([token], cache)[-1]


def resolve_model_path(model: str | None) -> Path | str:
    """MODEL argument, else $GPTOSS_MODEL, else ./model.bin, else a local Hugging Face cache copy.

    `synthetic:PRESET` (e.g. synthetic:gpt-oss-20b) names random weights of that shape, made in
    memory: for benchmarks of shapes whose files would not fit on disk."""
    candidates = []
    if model and model.startswith(SYNTHETIC_PREFIX):
        return model
    if model:
        path = Path(model).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"{model}: no such file or directory")
        return path
    if os.environ.get("GPTOSS_MODEL"):
        path = Path(os.environ["GPTOSS_MODEL"]).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"$GPTOSS_MODEL={path}: no such file or directory")
        return path
    candidates.append(Path("model.bin"))
    hub = Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface")) / "hub"
    candidates += sorted(hub.glob("models--openai--gpt-oss-20b/snapshots/*"))
    for path in candidates:
        if path.exists():
            return path
    raise FileNotFoundError(
        "no model given and none found ($GPTOSS_MODEL, ./model.bin, the Hugging Face cache).\n"
        "Get one:\n"
        "  hf download openai/gpt-oss-20b --local-dir gpt-oss-20b\n"
        "  python export/export_model_bin.py --model gpt-oss-20b --output model.bin\n"
        "or make a tiny random one to try things out:\n"
        "  python export/make_checkpoint.py --preset tiny-chat --out models/tiny-chat")


def open_backend(model_path: str | Path, device: str = "auto", memory_limit: int | None = None):
    """The backend for a model (.bin file or HF checkpoint directory) on 'cpu', 'gpu' or 'auto';
    memory_limit: most GPU bytes the run may use, weights included (default: all that is free)."""
    if device not in ("auto", "cpu", "gpu"):
        raise ValueError(f"device must be auto, cpu or gpu (got {device!r})")
    if device == "auto":
        from .device import probe_gpu

        device = "gpu" if probe_gpu().usable else "cpu"
    weights = open_weights(model_path)  # a file, a directory or synthetic:PRESET
    if device == "cpu":
        return CPUBackend(weights)
    from .batching import GPUBackend

    return GPUBackend(weights, memory_limit=memory_limit)
