"""The model-version lifecycle: a version's status, the champion, and promotion.

A `ModelVersion` is born "candidate" (a training stage's adapter, `register_adapter`), "intermediate"
(a step on the way, e.g. DAPT, never gated on its own) or "champion" (the untuned base model,
`ensure_base_version`). Afterwards its status changes only through `set_status`:

* the select step and WiSE-FT mark a version they replace "superseded" (or the SFT version
  "intermediate" when alignment ran without a dev set);
* the gate (`stages/gate.py`) promotes the candidate or marks it "rejected";
* `promote` makes a version the champion and retires the current one; the gate and a manual
  `tuneloop models promote` (`lineage.promote`, which also writes an audit record) both go through it.

There is one champion at a time; serving, monitoring, lineage and the report find it with `champion`.
"""
from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, select

from tuneloop.errors import StateError
from tuneloop.store import Artifact, ModelVersion, Session, utcnow

PROMOTION = "promotion"  # Artifact.kind of a promotion record (the gate's or a person's)

if TYPE_CHECKING:
    from tuneloop.config import Project


class Status(StrEnum):
    """A model version's status; a `str` enum, so the stored values stay these plain strings."""

    CHAMPION = "champion"  # the one version served and compared against
    CANDIDATE = "candidate"  # trained, waiting for (or never reaching) the gate
    REJECTED = "rejected"  # refused by the gate (keeps its eval runs and the reason)
    RETIRED = "retired"  # a former champion
    INTERMEDIATE = "intermediate"  # a step on the way (DAPT, or SFT before alignment): never gated
    SUPERSEDED = "superseded"  # replaced inside its cycle (select step's loser, WiSE-FT's input)


# versions the gate never judges: the cycle's candidate is its newest version not in these
NOT_CANDIDATES = (Status.INTERMEDIATE.value, Status.SUPERSEDED.value)


def set_status(version: ModelVersion, status: Status) -> None:
    """The one place a version's status changes (stored as the enum's plain string)."""
    version.status = Status(status).value


def champion(session: Session) -> ModelVersion | None:
    """The current champion (None before the base version is registered)."""
    return session.scalars(select(ModelVersion).where(ModelVersion.status == Status.CHAMPION.value)).first()


def cycle_candidate(s: Session, cycle_id: int) -> ModelVersion:
    """The cycle's candidate: its newest version not superseded (WiSE-FT's average, else the aligned
    version unless the select step preferred the SFT one on the dev set, else the SFT one)."""
    cand = s.scalar(select(ModelVersion).where(ModelVersion.cycle_id == cycle_id, ModelVersion.method != "base",
                                               ModelVersion.status.not_in(NOT_CANDIDATES))
                    .order_by(ModelVersion.id.desc()))
    if cand is None:
        raise StateError(f"cycle {cycle_id} has no candidate model")
    return cand


def adapter_folder(version: ModelVersion) -> Path | None:
    """A version's LoRA adapter folder (None: the base model itself, no adapter)."""
    return Path(version.adapter_path) if version.adapter_path else None


def ensure_base_version(project: Project, session: Session) -> ModelVersion:
    """The untuned student is version 'base', champion until a candidate beats it."""
    base = session.scalar(select(ModelVersion).where(ModelVersion.name == "base"))
    if base is None:
        base = ModelVersion(name="base", base_model=project.settings.models.student.model, adapter_path=None,
                            method="base", status=Status.CHAMPION.value)
        session.add(base)
        session.flush()
    return base


def register_adapter(session: Session, path: Path, parent: ModelVersion, cycle_id: int | None, *, method: str,
                     base_model: str, hyperparams: dict[str, Any], metrics: dict[str, Any],
                     training_example_ids: list[int] | None = None, status: str = Status.CANDIDATE.value,
                     artifact_meta: dict[str, Any] | None = None) -> ModelVersion:
    """The model version of a complete adapter artifact, added once (a rerun finds the existing one)."""
    version = session.scalar(select(ModelVersion).where(ModelVersion.adapter_path == str(path)))
    if version is None:
        n = session.scalar(select(func.count(ModelVersion.id))) or 0
        version = ModelVersion(
            name=f"v{n}", parent_id=parent.id, base_model=base_model, adapter_path=str(path), method=method,
            training_example_ids=training_example_ids or [], hyperparams=hyperparams, metrics=metrics,
            status=Status(status).value, cycle_id=cycle_id,
        )
        session.add(version)
        session.add(Artifact(kind="adapter", path=str(path),
                             meta={"stage": method, "cycle_id": cycle_id, **(artifact_meta or {})}))
        session.flush()
    return version


def promote(session: Session, version: ModelVersion, reason: str) -> ModelVersion | None:
    """Make `version` the champion and record the promotion; the gate and `tuneloop models promote`
    both come here. Every current champion becomes "retired" first (flushed, so there is one
    champion at a time, even for a moment). The record is an Artifact row of kind "promotion" whose
    meta says from, to, when, why (`reason`: "gate" or "manual") and the direction (forward, or a
    rollback to an older version). Returns the previous champion. Flushes, does not commit."""
    previous = champion(session)
    for other in session.scalars(select(ModelVersion).where(ModelVersion.status == Status.CHAMPION.value)):
        set_status(other, Status.RETIRED)
    session.flush()
    set_status(version, Status.CHAMPION)
    at = utcnow()
    session.add(Artifact(kind=PROMOTION, path=f"promotion:{at.isoformat()}:{version.name}",
                         meta={"from": previous.name if previous else None, "to": version.name,
                               "at": at.isoformat(), "reason": reason, "direction": direction(previous, version)}))
    session.flush()
    return previous


def direction(previous: ModelVersion | None, version: ModelVersion) -> str:
    """"forward" to a newer version (or the first champion), else "rollback"."""
    return "forward" if previous is None or version.id > previous.id else "rollback"


def promotions(session: Session) -> list[dict[str, Any]]:
    """Every recorded promotion (the gate's and people's), oldest first: their record's meta."""
    rows = session.scalars(select(Artifact).where(Artifact.kind == PROMOTION).order_by(Artifact.id))
    return [dict(r.meta or {}) for r in rows]
