"""The base of every settings section (`config.py`, `settings_compute.py`)."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    # allow_inf_nan=False: `.inf` or `.nan` in YAML is a mistake for every number here
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)
