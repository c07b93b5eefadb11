"""Progress reporting, passed explicitly to long-running stages (the CLI passes a rich one)."""
from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Protocol

Advance = Callable[[int], None]


class Reporter(Protocol):
    def task(self, description: str, total: int | None) -> "contextmanager[Advance]": ...

    def log(self, message: str) -> None: ...


class SilentReporter:
    """Reports nothing (library use and tests)."""

    @contextmanager
    def task(self, description: str, total: int | None) -> Iterator[Advance]:
        yield lambda n=1: None

    def log(self, message: str) -> None:
        pass


class RichReporter:
    """Progress bars and messages on the terminal."""

    def __init__(self, console=None):
        from rich.console import Console

        self.console = console or Console(stderr=True)

    @contextmanager
    def task(self, description: str, total: int | None) -> Iterator[Advance]:
        from rich.progress import (
            BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn,
            TimeRemainingColumn,
        )

        columns = [SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn(), TimeRemainingColumn()]
        with Progress(*columns, console=self.console, transient=False) as bar:
            tid = bar.add_task(description, total=total)
            yield lambda n=1: bar.advance(tid, n)

    def log(self, message: str) -> None:
        self.console.print(message)


def batched_chat(model, conversations, params, reporter: Reporter, description: str, batch: int) -> list[str]:
    """Run `model.chat` in batches so the progress bar moves as answers come back."""
    replies: list[str] = []
    with reporter.task(description, len(conversations)) as advance:
        for start in range(0, len(conversations), batch):
            part = conversations[start : start + batch]
            replies.extend(model.chat(part, replace(params, seed=params.seed + start)))
            advance(len(part))
    return replies
