"""The `tracking:` settings: mirroring the project's cycles, runs and versions into MLflow
(`tuneloop/tracking/`). Off by default; tuneloop's store stays the system of record."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from tuneloop.settings_base import Section

URI_SCHEMES = ("http://", "https://", "sqlite:///", "postgresql://", "postgresql+psycopg://", "mysql://",
               "file://", "databricks")


class TrackingSettings(Section):
    """MLflow tracking and model registry (the `tuneloop[mlflow]` extra). Each key is explained in
    settings_template.py."""

    mlflow: bool = False
    mlflow_uri: str = ""  # "": sqlite:///<project>/mlflow.db; http://HOST:PORT for a tracking server
    experiment: str = ""  # "": the project's name
    registered_model: str = ""  # "": the project's name
    timeout_seconds: float = Field(5.0, gt=0, le=300)  # a tracking server slower than this is skipped
    # the trainers' own loggers (transformers' integrations); MLflow is not one of them: the mirror
    # above logs every training run's curves already
    report_to: list[Literal["tensorboard", "wandb", "trackio"]] = []

    @field_validator("mlflow_uri")
    @classmethod
    def _uri(cls, v: str) -> str:
        v = v.strip()
        if v == "" or v.startswith(URI_SCHEMES):
            return v
        raise ValueError(f"{v!r} is not an MLflow tracking URI: use '' (sqlite:///<project>/mlflow.db), "
                         "http://HOST:PORT, sqlite:///PATH, postgresql://... or file:///PATH")

    @field_validator("experiment", "registered_model")
    @classmethod
    def _name(cls, v: str) -> str:
        v = v.strip()
        if "'" in v or '"' in v:
            raise ValueError(f"{v!r}: quotes are not allowed in an MLflow name")
        return v
