"""What every command of the command line shares: the consoles, the --project option, opening a
project, the one-line errors, the metric format."""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from tuneloop.config import load_project
from tuneloop.errors import TuneloopError

console = Console()
err_console = Console(stderr=True)

ProjectOpt = Annotated[Path, typer.Option("--project", "-p", help="Project folder (holds tuneloop.yaml).")]


def friendly_errors(fn):
    """User mistakes become one red line and a non-zero exit code, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except TuneloopError as err:
            # escape: a file name like "[draft].docx" is not markup; soft_wrap: a long path stays
            # on one line (rich would otherwise cut it at the terminal width, 80 in a pipe).
            err_console.print(f"[red]error:[/red] {escape(str(err))}", soft_wrap=True)
            raise typer.Exit(err.exit_code) from None
        except KeyboardInterrupt:
            err_console.print("[yellow]interrupted; run the command again to resume[/yellow]")
            raise typer.Exit(130) from None

    return wrapper


def open_project(project_dir: Path):
    """The project in `project_dir` and a session factory on its (migrated) store."""
    from tuneloop.store import open_store

    project = load_project(project_dir)
    return project, open_store(project.store_url)


def fmt_metric(v) -> str:
    """A metric with 3 decimals; "-" when missing or not a number."""
    return "-" if v is None or v != v else f"{v:.3f}"
