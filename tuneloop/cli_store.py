"""`tuneloop migrate --to URL`: move a project's store to another database (PostgreSQL, usually)."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from tuneloop.cli_common import ProjectOpt, console, friendly_errors
from tuneloop.config import Project, load_project, parse_settings


@friendly_errors
def migrate(
    to: Annotated[str, typer.Option("--to", help="The empty database to copy the store into, e.g. "
                                    "postgresql://user@host/tuneloop.")],
    project_dir: ProjectOpt = Path("."),
) -> None:
    """Copy the project's store into an empty database, row for row (ids kept), and check the copy;
    then set `store_url` to it in tuneloop.yaml. The project's store is only read."""
    from tuneloop.store_copy import copy_store

    project = load_project(project_dir)
    settings = parse_settings({**project.settings.model_dump(), "store_url": to}, "--to")  # checked as the setting
    copied = copy_store(project.store_url, Project(project.root, settings).store_url)
    for table, n in copied.tables.items():
        console.print(f"  {table}: {n} rows")
    console.print(f"copied and checked {copied.rows} rows; now set store_url: {to} in "
                  f"{project.root / 'tuneloop.yaml'}", soft_wrap=True)

