"""Small helpers shared by stages."""
from __future__ import annotations

from datetime import datetime

from sqlalchemy import select

from tuneloop.store import ModelVersion, Session


def run_name(stage: str, cycle_id: int | None) -> str:
    """Artifact name: deterministic inside a cycle (so a resumed step finds it), else timestamped."""
    if cycle_id is not None:
        return f"cycle-{cycle_id:04d}-{stage}"
    return f"{stage}-{datetime.now().strftime('%Y%m%d-%H%M%S-%f')}"


def champion(session: Session) -> ModelVersion | None:
    return session.scalars(select(ModelVersion).where(ModelVersion.status == "champion")).first()
