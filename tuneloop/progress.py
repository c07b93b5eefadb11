"""Progress reporting, passed explicitly to long-running stages (the CLI passes a rich one)."""
from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Literal, Protocol

Advance = Callable[[int], None]


class Reporter(Protocol):
    def task(self, description: str, total: int | None) -> contextmanager[Advance]: ...

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
            BarColumn,
            MofNCompleteColumn,
            Progress,
            SpinnerColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        columns = [SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn(), TimeRemainingColumn()]
        with Progress(*columns, console=self.console, transient=False) as bar:
            tid = bar.add_task(description, total=total)
            yield lambda n=1: bar.advance(tid, n)

    def log(self, message: str) -> None:
        self.console.print(message)


AUTO_BATCH = 32  # conversations per progress step when the role's batch_size is "auto"


def batched_chat(model, conversations, params, reporter: Reporter, description: str,
                 batch: int | Literal["auto"]) -> list[str]:
    """Run `model.chat` in batches so the progress bar moves as answers come back.

    `batch` is the role's batch_size: "auto" steps by 32 (the model still picks its own
    generate() batch inside each step).
    """
    step = AUTO_BATCH if batch == "auto" else int(batch)
    replies: list[str] = []
    with reporter.task(description, len(conversations)) as advance:
        for start in range(0, len(conversations), step):
            part = conversations[start : start + step]
            replies.extend(model.chat(part, replace(params, seed=params.seed + start)))
            advance(len(part))
    return replies
