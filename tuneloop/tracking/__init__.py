"""Experiment tracking: the store mirrored in MLflow (`tracking:` settings, `tracking/mlflow_mirror.py`).

MLflow is imported only when `tracking.mlflow` is on (the `tuneloop[mlflow]` extra may not be installed).
"""
from __future__ import annotations

from collections.abc import Callable

from tuneloop.config import Project
from tuneloop.errors import TuneloopError


def check_tracking(project: Project) -> None:
    """Fail now, with a `ConfigError` naming the extra, when `tracking.mlflow` is on and MLflow is not installed."""
    if project.settings.tracking.mlflow:
        from tuneloop.tracking import mlflow_mirror  # noqa: F401 - imports MLflow: only when tracking is on


def mirror(project: Project, sessions, log: Callable[[str], None]) -> None:
    """Bring MLflow up to the store when `tracking.mlflow` is on. A tracking store that cannot be
    reached, or refuses a write, is one warning line (`log`), never an error: the store is the
    system of record, and the next call catches up."""
    if not project.settings.tracking.mlflow:
        return
    from tuneloop.tracking import mlflow_mirror  # imports MLflow: only when tracking is on

    try:
        with sessions() as s:
            mlflow_mirror.sync(project, s)
    except Exception as exc:  # noqa: BLE001 - whatever MLflow raises, the cycle goes on
        first_line = (str(exc).splitlines() or [""])[0]
        reason = str(exc) if isinstance(exc, TuneloopError) else f"{type(exc).__name__}: {first_line}"
        log(f"[yellow]warning: MLflow not updated ({reason}); the next sync catches up[/yellow]")
