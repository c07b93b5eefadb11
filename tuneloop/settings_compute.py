"""The `compute:` settings: where the heavy steps run (`compute.engine: ray`, tuneloop/compute/)."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from tuneloop.settings_base import Section


class ComputeSettings(Section):
    """Where the heavy steps run: in this process (`local`, the default) or on a Ray cluster
    (`ray`, the `tuneloop[ray]` extra; tuneloop/compute/). Every node must reach the project's
    artifacts folder (a shared filesystem path). Each key is explained in settings_template.py."""

    engine: Literal["local", "ray"] = "local"
    address: str = ""  # "" (a local Ray started by tuneloop), "auto", "HOST:PORT" or "ray://HOST:PORT"
    workers: int = Field(2, ge=1, le=4_096)  # actors (or training workers) per step
    cpus_per_worker: float = Field(1.0, gt=0, le=1_024)
    gpus_per_worker: float = Field(0.0, ge=0, le=64)
    min_items: int = Field(32, ge=1)  # smaller model calls run in this process (a Ray job costs seconds)
    max_failures: int = Field(2, ge=0, le=100)  # Ray Train restarts from the last checkpoint
    llm_engine: Literal["transformers", "vllm"] = "transformers"  # vllm: ray.data.llm engines on GPUs

    @field_validator("address")
    @classmethod
    def _address(cls, v: str) -> str:
        v = v.strip()
        if v in ("", "auto") or ray_host_port(v) is not None:
            return v
        raise ValueError(f"{v!r} is not a Ray address: use '' (a local Ray), 'auto', 'HOST:PORT' or "
                         "'ray://HOST:PORT'")

    @model_validator(mode="after")
    def _vllm_on_gpus(self) -> ComputeSettings:
        if self.llm_engine == "vllm" and (self.engine != "ray" or self.gpus_per_worker < 1):
            raise ValueError("compute.llm_engine: vllm runs on a Ray cluster's GPUs: set compute.engine: ray and "
                             "compute.gpus_per_worker >= 1")
        return self


def ray_host_port(address: str) -> tuple[str, int] | None:
    """(host, port) of a `compute.address` of the form HOST:PORT or ray://HOST:PORT; else None."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    return (host, int(port)) if host and port.isdigit() else None
