"""Progress display for long work: rich bars on a terminal, silent when quiet."""
from __future__ import annotations

import time

from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, \
    TimeElapsedColumn, TimeRemainingColumn
from rich.console import Console
from rich.text import Text

# Bars go to stderr: stdout carries the generated text (generate, chat), which users pipe.
_STDERR = Console(stderr=True)


class _TokensPerSecond(ProgressColumn):
    def __init__(self, owner: "GetpProgress"):
        super().__init__()
        self.owner = owner

    def render(self, task) -> Text:
        return Text(f"{self.owner.rate():,.1f} tok/s", style="cyan")


class GetpProgress:
    """Prompts done of total, generated tokens per second, elapsed and remaining time."""

    def __init__(self, total: int, done: int = 0, quiet: bool = False):
        self.quiet = quiet
        self.generated = 0
        self.start = time.perf_counter()
        self.progress = Progress(TextColumn("getp"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("prompts"), _TokensPerSecond(self), TimeElapsedColumn(),
                                 TextColumn("eta"), TimeRemainingColumn(), disable=quiet,
                                 transient=False, console=_STDERR)
        self.task = self.progress.add_task("getp", total=total, completed=done)

    def rate(self) -> float:
        elapsed = time.perf_counter() - self.start
        return self.generated / elapsed if elapsed > 0 else 0.0

    def tokens(self, n: int) -> None:
        self.generated += n

    def prompt_done(self) -> None:
        self.progress.advance(self.task)

    def __enter__(self):
        self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        self.progress.__exit__(*exc)
        return False


class ByteProgress:
    """A bar over bytes (uploads, exports): done / total, throughput, remaining time."""

    def __init__(self, label: str, total_bytes: int, quiet: bool = False):
        from rich.progress import DownloadColumn, TransferSpeedColumn

        self.progress = Progress(TextColumn(label), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                                 TimeRemainingColumn(), disable=quiet, transient=True, console=_STDERR)
        self.task = self.progress.add_task(label, total=total_bytes)

    def advance(self, nbytes: int) -> None:
        self.progress.advance(self.task, nbytes)

    def __enter__(self):
        self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        self.progress.__exit__(*exc)
        return False
