"""The errors the library raises for bad input or a machine too small: one base class, so that a command
line (run.py) can print any of them as one line and choose its exit code, and a program can catch
them all. Bugs stay ordinary exceptions."""
from __future__ import annotations


class GptossError(Exception):
    """Base of gptoss's errors; the message is one line that says what to change."""


class ContextError(GptossError, ValueError):
    """A prompt that cannot fit in the model's context."""


class ModelTooLargeError(GptossError, RuntimeError):
    """The weights (or weights + the smallest KV cache) do not fit in the GPU memory this run may use."""


def one_line(e: BaseException) -> str:
    """An exception as one line, `Type: first line of its message`: how a worker process or rank reports
    what stopped it."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__
