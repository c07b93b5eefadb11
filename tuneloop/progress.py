"""Progress reporting, passed explicitly to long-running stages (the CLI passes a rich one)."""
from __future__ import annotations

import time
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
    """Progress bars and messages on the terminal; when the output is not a terminal (redirected to
    a file or a CI log), a plain line per task every `line_interval` seconds and when it ends, since
    rich draws nothing in between there."""

    def __init__(self, console=None, line_interval: float = 30.0):
        from rich.console import Console

        self.console = console or Console(stderr=True)
        self.line_interval = line_interval

    @contextmanager
    def task(self, description: str, total: int | None) -> Iterator[Advance]:
        if not self.console.is_terminal:
            with self._lines(description, total) as advance:
                yield advance
            return
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

    @contextmanager
    def _lines(self, description: str, total: int | None) -> Iterator[Advance]:
        start = last = time.monotonic()
        done = 0

        def line(suffix: str = "") -> None:
            self.console.print(f"  {description}: {done}/{total if total is not None else '?'} "
                               f"({time.monotonic() - start:.0f} s){suffix}", highlight=False, soft_wrap=True)

        def advance(n: int = 1) -> None:
            nonlocal done, last
            done += n
            if time.monotonic() - last >= self.line_interval:
                last = time.monotonic()
                line()

        yield advance
        line(", done")

    def log(self, message: str) -> None:
        self.console.print(message)


AUTO_BATCH = 32  # conversations per progress step when the role's batch_size is "auto"


def batched_chat(model, conversations, params, reporter: Reporter, description: str,
                 batch: int | Literal["auto"]) -> list[str]:
    """Run `model.chat` in batches so the progress bar moves as answers come back.

    `batch` is the role's batch_size: "auto" steps by 32 (the model still picks its own
    generate() batch inside each step). A pooled model (`compute.engine: ray`) gets every
    conversation in one call, cut into the same steps on the cluster, and moves the bar itself.
    """
    step = AUTO_BATCH if batch == "auto" else int(batch)
    replies: list[str] = []
    with reporter.task(description, len(conversations)) as advance:
        if getattr(model, "pooled", False):
            return model.chat(conversations, params, step=step, advance=advance)
        for start in range(0, len(conversations), step):
            part = conversations[start : start + step]
            replies.extend(model.chat(part, replace(params, seed=params.seed + start)))
            advance(len(part))
    return replies


def batched_margins(model, conversations, reporter: Reporter, description: str, step: int = AUTO_BATCH
                    ) -> list[float]:
    """`model.yes_no_margins` over `conversations` in steps, with progress (pooled: one call)."""
    margins: list[float] = []
    with reporter.task(description, len(conversations)) as advance:
        if getattr(model, "pooled", False):
            return model.yes_no_margins(conversations, step=step, advance=advance)
        for start in range(0, len(conversations), step):
            part = conversations[start : start + step]
            margins.extend(model.yes_no_margins(part))
            advance(len(part))
    return margins
