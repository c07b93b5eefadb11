"""`tuneloop tracking sync`: bring MLflow up to the store now (a cycle does it after each step)."""
from __future__ import annotations

from pathlib import Path

import typer

from tuneloop.cli_common import ProjectOpt, console, friendly_errors, open_project
from tuneloop.errors import ConfigError

tracking_app = typer.Typer(help="Experiment tracking: the store mirrored in MLflow (tracking: settings).")


@tracking_app.command("sync")
@friendly_errors
def tracking_sync(project_dir: ProjectOpt = Path(".")) -> None:
    """Mirror every cycle, run and version the tracking store does not have yet, and move the aliases
    (champion, challenger, candidate) to the store's versions. Unlike a cycle, which goes on with a
    warning, a tracking store that cannot be reached is an error here."""
    project, sessions = open_project(project_dir)
    if not project.settings.tracking.mlflow:
        raise ConfigError("tracking.mlflow is false in tuneloop.yaml: nothing to sync")
    from tuneloop.tracking import mlflow_mirror  # imports MLflow (the tuneloop[mlflow] extra)

    with sessions() as s:
        done = mlflow_mirror.sync(project, s)
    aliases = ", ".join(f"{a} -> {v or '(none)'}" for a, v in done.aliases.items())
    console.print(f"MLflow at {mlflow_mirror.tracking_uri(project)}: {done.runs_created} runs created, "
                  f"{done.steps_logged} cycle steps logged, {done.versions_registered} versions registered; {aliases}",
                  soft_wrap=True)
