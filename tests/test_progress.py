"""Progress shows in a log file too: one line per task as it moves and when it ends."""
from __future__ import annotations

import io

import pytest
from rich.console import Console

from tuneloop.progress import RichReporter


def test_redirected_output_gets_a_line_as_a_task_moves_and_when_it_ends():
    out = io.StringIO()
    reporter = RichReporter(Console(file=out, force_terminal=False, width=80), line_interval=0.0)
    with reporter.task("fine-tuning (LoRA SFT)", 3) as advance:
        advance(1)
        advance(2)
    lines = out.getvalue().splitlines()
    assert [line.rsplit(" (", 1)[0] for line in lines] == ["  fine-tuning (LoRA SFT): 1/3",
                                                            "  fine-tuning (LoRA SFT): 3/3",
                                                            "  fine-tuning (LoRA SFT): 3/3"]
    assert lines[-1].endswith(", done") and "━" not in out.getvalue()


def test_lines_are_throttled_and_a_failed_task_is_not_called_done():
    out = io.StringIO()
    reporter = RichReporter(Console(file=out, force_terminal=False, width=80), line_interval=3600.0)
    with pytest.raises(RuntimeError):
        with reporter.task("answering", None) as advance:
            for _ in range(50):
                advance(1)
            raise RuntimeError("killed")
    assert out.getvalue() == ""  # nothing within the interval, and no "done" for a task that failed
    with reporter.task("answering", None) as advance:
        advance(5)
    assert out.getvalue().startswith("  answering: 5/? (") and out.getvalue().rstrip().endswith(", done")


def test_a_terminal_gets_rich_bars():
    out = io.StringIO()
    reporter = RichReporter(Console(file=out, force_terminal=True, width=80))
    with reporter.task("answering", 2) as advance:
        advance(2)
    assert "━" in out.getvalue() and "done" not in out.getvalue()
