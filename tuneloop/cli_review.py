"""`tuneloop review`: the expert review queue in the terminal (`review`), rebuilt now (`review build`),
listed (`review list`), and round-tripped as JSONL for teams that label elsewhere (`review export`,
`review import`). The `/review` page of `tuneloop serve` does the same in a browser."""
from __future__ import annotations

import getpass
import os
import textwrap
from pathlib import Path
from typing import Annotated

import click
import typer
from rich.markup import escape

from tuneloop.cli_common import ProjectOpt, console, friendly_errors, open_project
from tuneloop.errors import InputError
from tuneloop.review.queue import export_queue, import_reviews, item_json, open_items, record

review_app = typer.Typer(help="The expert review queue: the questions the model is least sure of.",
                         invoke_without_command=True)
ReviewerOpt = Annotated[str | None, typer.Option("--reviewer", "-r", help="Your name, stored with each verdict "
                                                 "(default: $TUNELOOP_REVIEWER, else your login).")]
PASSAGE_CHARS = 500  # each passage is shown up to this many characters in the terminal
KEYS = {"": "confirm", "y": "confirm", "c": "correct", "s": "skip", "q": "quit"}


def _reviewer(name: str | None) -> str:
    who = (name or os.environ.get("TUNELOOP_REVIEWER") or getpass.getuser() or "").strip()
    if not who or len(who) > 100:
        raise InputError("give your name with --reviewer NAME (at most 100 characters)")
    return who


def _show(item: dict, position: int, total: int) -> None:
    doubts = ", ".join(f"{k} {v:.2f}" for k, v in (item["doubts"].get("doubts") or {}).items() if v is not None)
    console.rule(f"[bold]{position}/{total}[/bold] informativeness {item['informativeness']:.2f} ({doubts}) "
                 f"· {item['source']}")
    console.print(f"[bold]Question:[/bold] {escape(item['question'])}", soft_wrap=True)
    console.print(f"[bold]Document:[/bold] {escape(item['document'] or '(any)')}", soft_wrap=True)
    for i, p in enumerate(item["passages"], start=1):
        text = textwrap.shorten(" ".join(p["text"].split()), PASSAGE_CHARS, placeholder=" …")
        console.print(f"[dim][{i}] {escape(p['document'])}:[/dim] {escape(text)}", soft_wrap=True)
    console.print(f"[bold]Model's answer:[/bold] {escape(item['answer'])}", soft_wrap=True)


@review_app.callback()
@friendly_errors
def review(ctx: typer.Context, project_dir: ProjectOpt = Path("."), reviewer: ReviewerOpt = None,
           limit: Annotated[int | None, typer.Option(min=1, help="Review at most this many items.")] = None) -> None:
    """Review the open items one by one: Enter or y confirms the model's answer, c corrects it
    (type the right answer), s skips, q stops. Each verdict is stored at once."""
    if ctx.invoked_subcommand is not None:
        return
    project, sessions = open_project(project_dir)
    who = _reviewer(reviewer)
    with sessions() as s:
        items = open_items(s, limit)
        if not items:
            console.print("The review queue is empty (a cycle rebuilds it; or run `tuneloop review build`).")
            return
        counts = {"confirmed": 0, "corrected": 0, "skipped": 0}
        splits: dict[str, int] = {}
        for position, item in enumerate(items, start=1):
            _show(item_json(s, item), position, len(items))
            action, answer = _ask()
            if action == "quit":
                break
            done = record(s, project.settings.feedback, item, action, who, answer)
            s.commit()
            counts[done.item.status] += 1
            if done.new_example:
                splits[done.example.split] = splits.get(done.example.split, 0) + 1
            console.print(f"[green]{done.item.status}[/green]"
                          + (f": example #{done.example.id} ({done.example.split})" if done.example else ""))
    made = ", ".join(f"{n} {split}" for split, n in sorted(splits.items())) or "none"
    console.print(f"Reviewed {sum(counts.values())} as {who}: {counts['confirmed']} confirmed, "
                  f"{counts['corrected']} corrected, {counts['skipped']} skipped; new examples: {made}.")


def _ask() -> tuple[str, str | None]:
    """The reviewer's choice (confirm, correct with the answer, skip, quit); end of input quits."""
    while True:
        try:
            key = click.prompt("[Enter/y] confirm  [c] correct  [s] skip  [q] quit", default="",
                               show_default=False).strip().lower()
        except click.exceptions.Abort:
            return "quit", None
        action = KEYS.get(key)
        if action is None:
            console.print(f"[yellow]'{escape(key)}' is not one of y, c, s, q[/yellow]")
            continue
        if action != "correct":
            return action, None
        try:
            answer = click.prompt("Right answer (empty: back)", default="", show_default=False).strip()
        except click.exceptions.Abort:
            return "quit", None
        if answer:
            return "correct", answer


@review_app.command("list")
@friendly_errors
def review_list(project_dir: ProjectOpt = Path(".")) -> None:
    """The open items, the most informative first: rank, informativeness, source, document, question."""
    _, sessions = open_project(project_dir)
    with sessions() as s:
        items = open_items(s)
    if not items:
        console.print("The review queue is empty.")
    for it in items:  # one line an item (greppable), never wrapped
        console.print(f"{it.rank:>4}  {it.score:.2f}  {it.source:<11}  {escape(it.document or '(any)')}  "
                      f"{escape(it.question)}", soft_wrap=True)


@review_app.command("build")
@friendly_errors
def review_build(project_dir: ProjectOpt = Path(".")) -> None:
    """Rebuild the queue now with the champion (a cycle does it as its last step)."""
    from tuneloop.lock import cycle_lock
    from tuneloop.models.registry import build_embedder
    from tuneloop.programs.rag import Retriever
    from tuneloop.progress import RichReporter
    from tuneloop.stages.review import build_queue  # imports torch and the models (seconds)

    project, sessions = open_project(project_dir)
    embedder = build_embedder(project)
    with cycle_lock(project.root), sessions() as s:
        built = build_queue(project, s, lambda version: Retriever.for_version(project, s, version, embedder),
                            RichReporter())
        s.commit()
    if built.queue is None:
        console.print("Nothing to review: every candidate question has a known answer.")
        return
    console.print(f"Review queue {built.queue}: {built.opened} open of {built.candidates} scored by {built.version} "
                  f"(mean informativeness {built.mean_informativeness:.2f}).")


@review_app.command("export")
@friendly_errors
def review_export(file: Annotated[Path, typer.Argument(help="JSONL file to write.")],
                  project_dir: ProjectOpt = Path("."),
                  force: Annotated[bool, typer.Option(help="Overwrite FILE if it exists.")] = False) -> None:
    """Write the open items as JSONL: fill in each line's "verdict" (confirm | correct | skip) and,
    for a correction, "answer_reviewed", then `tuneloop review import FILE`."""
    if file.is_dir():
        raise InputError(f"{file} is a folder: give a file name")
    if file.exists() and not force:  # it may hold verdicts someone filled in
        raise InputError(f"{file} exists: give another name, or --force to overwrite it")
    if not file.parent.is_dir():
        raise InputError(f"{file.parent} does not exist")
    _, sessions = open_project(project_dir)
    with sessions() as s:
        n = export_queue(s, file)
    console.print(f"Wrote {n} open review items to {file}.", soft_wrap=True)


@review_app.command("import")
@friendly_errors
def review_import(file: Annotated[Path, typer.Argument(help="An exported JSONL file with verdicts filled in.")],
                  project_dir: ProjectOpt = Path("."), reviewer: ReviewerOpt = None) -> None:
    """Store the verdicts of a filled-in export (all or nothing; a line's "reviewer" overrides --reviewer)."""
    if not file.is_file():
        raise InputError(f"{file} not found")
    project, sessions = open_project(project_dir)
    with sessions() as s:
        done = import_reviews(s, project.settings.feedback, file, _reviewer(reviewer))
        s.commit()
    console.print(f"Imported {file}: {done.confirmed} confirmed, {done.corrected} corrected, {done.skipped} skipped, "
                  f"{done.unreviewed} left open; {done.examples} new examples.", soft_wrap=True)
