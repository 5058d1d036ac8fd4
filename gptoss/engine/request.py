"""A request's life in the engine, and what steps hand back.

A Request is what add_request accepted: prompt ids, sampling params, its token budget. While it waits
for a slot it is a Job: its prompt, or after a preemption its prompt + the tokens it generated (but the
last), whose KV is in host memory (swapped) or is to be prefilled again. Each engine step hands back
a StepTokens: the new token of every request that got one, as parallel arrays (getp reads the arrays:
a Python object per token costs seconds at 2,048 sequences); iterating it gives TokenEvent objects
(generate, chat, LLM).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

from ..errors import ContextError
from ..sampling import SamplingParams

STOP, LENGTH = "stop", "length"  # finish reasons: a stop id came (not emitted); the budget ran out


@dataclass(frozen=True)
class Request:
    id: int  # the engine's handle (add_request's return value, abort's argument)
    prompt_ids: list[int]
    params: SamplingParams
    sequence: int  # the counter RNG's sequence id: getp's input line, so a draw is independent of the batch
    budget: int  # new tokens it may generate: params.max_tokens within the context
    stop_ids: frozenset  # ids that end it


@dataclass
class Job:
    """A request waiting for a slot: its prompt, or after a preemption its prompt + the tokens it had
    generated but the last (fed back as the first decode token after this prefill)."""
    req: Request
    tokens: list
    made: int = 0  # new tokens generated before a preemption (0: a fresh request)
    generated: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))  # those tokens
    swapped: int = 0  # pages' worth of host memory its KV holds there (0: none, prefill `tokens` again)

    @classmethod
    def resumed(cls, req: Request, generated: np.ndarray) -> "Job":
        return cls(req, list(req.prompt_ids) + generated[:-1].tolist(), len(generated), generated)


@dataclass(frozen=True)
class TokenEvent:
    request_id: int
    token: int | None  # None when the request ended without a new token (a stop id is not emitted)
    done: bool
    reason: str | None = None  # STOP or LENGTH once done


@dataclass(frozen=True)
class StepTokens:
    """What one engine step gave its requests, as parallel arrays: the request id, the new token (-1
    for none: the request ended on a stop id, which is not emitted), whether the request is done, and
    whether it stopped on a stop id (done and not stopped: its length budget)."""
    request_id: np.ndarray  # int64
    token: np.ndarray  # int64
    done: np.ndarray  # bool
    stopped: np.ndarray  # bool

    @classmethod
    def empty(cls) -> "StepTokens":
        return cls(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, bool), np.zeros(0, bool))

    def __len__(self) -> int:
        return len(self.request_id)

    def __iter__(self) -> Iterator[TokenEvent]:
        for i, tok, done, stop in zip(self.request_id.tolist(), self.token.tolist(), self.done.tolist(),
                                      self.stopped.tolist()):
            yield TokenEvent(i, None if tok < 0 else tok, done, STOP if stop else LENGTH if done else None)


def check_fits(prompt_len: int, context: int) -> None:
    if prompt_len == 0:
        raise ContextError("the prompt is empty (it has no tokens)")
    if prompt_len + 1 > context:
        raise ContextError(f"the prompt has {prompt_len} tokens; the model's context is {context}")


def clamp_new_tokens(prompt_len: int, max_new: int, context: int) -> int:
    """Generation stops at the context's end: at most context - prompt_len new tokens."""
    return max(0, min(max_new, context - prompt_len))
