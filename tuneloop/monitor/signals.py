"""Monitoring signals over live use. Each check returns a `Reading` (value, fired, why) that the
caller records as a SignalValue row, so every signal's history is in the store.

* satisfaction: the positive share of the latest human votes (thumbs, ratings 4-5 up, 1-2 down)
  on answers of the current champion; fires below `monitor.satisfaction_floor`, or when the
  change detector (Page-Hinkley or ADWIN over the champion's whole vote stream) sees a drop.
* query_drift: the latest questions asked since the last cycle started vs the known questions
  (training examples and the questions asked before that cycle), by an MMD permutation test on
  their embeddings; fires when p < `monitor.drift_alpha`.
* documents: watched documents that are new or changed since the last ingest.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select

from tuneloop.config import Project
from tuneloop.models.base import Embedder
from tuneloop.monitor.drift import change_points, mmd_test
from tuneloop.stages.common import champion
from tuneloop.stages.ingest import scan_documents
from tuneloop.store import Cycle, Example, Feedback, Interaction, Session, SignalValue


@dataclass
class Reading:
    signal: str
    value: float | None
    fired: bool
    reason: str  # why it fired, or why it did not
    detail: dict[str, Any] = field(default_factory=dict)

    def row(self) -> SignalValue:
        return SignalValue(signal=self.signal, value=self.value, fired=self.fired,
                           detail={"reason": self.reason, **self.detail})


def _vote(fb: Feedback) -> float | None:
    if fb.thumbs:
        return 1.0 if fb.thumbs > 0 else 0.0
    if fb.rating:
        return 1.0 if fb.rating >= 4 else 0.0 if fb.rating <= 2 else None
    return None


def satisfaction(project: Project, session: Session) -> Reading:
    m = project.settings.monitor
    champ = champion(session)
    q = (select(Feedback).join(Interaction, Feedback.interaction_id == Interaction.id)
         .where(Feedback.source == "human", Interaction.model_version_id == (champ.id if champ else -1))
         .order_by(Feedback.created_at, Feedback.id))
    votes = [v for v in (_vote(fb) for fb in session.scalars(q)) if v is not None]
    recent = votes[-m.satisfaction_window:]
    if len(recent) < m.min_votes:
        return Reading("satisfaction", None, False, f"{len(recent)} votes on the champion's answers "
                       f"(fewer than {m.min_votes})", {"votes": len(votes)})
    rate = sum(recent) / len(recent)
    detail: dict[str, Any] = {"votes": len(votes), "window": len(recent)}
    if rate < m.satisfaction_floor:
        return Reading("satisfaction", rate, True, f"satisfaction {rate:.2f} < {m.satisfaction_floor} over the "
                       f"latest {len(recent)} votes", detail)
    if m.change_detector != "none":
        params = ({"threshold": m.page_hinkley_threshold, "delta": m.page_hinkley_delta, "mode": "down"}
                  if m.change_detector == "page_hinkley" else {})
        points = change_points(votes, m.change_detector, **params)
        detail["change_points"] = points
        if points and points[-1] >= len(votes) - len(recent):
            return Reading("satisfaction", rate, True, f"satisfaction dropped ({m.change_detector} change at vote "
                           f"{points[-1] + 1} of {len(votes)}; now {rate:.2f})", detail)
    return Reading("satisfaction", rate, False, f"satisfaction {rate:.2f} over the latest {len(recent)} votes",
                   detail)


def query_drift(project: Project, session: Session, embedder: Embedder) -> Reading:
    m = project.settings.monitor
    last = session.scalar(select(Cycle).order_by(Cycle.started_at.desc(), Cycle.id.desc()))
    since = last.started_at if last else None
    q = select(Interaction.question).order_by(Interaction.created_at.desc(), Interaction.id.desc())
    recent = list(session.scalars(q.where(Interaction.created_at >= since) if since else q))[: m.drift_window]
    if len(recent) < m.min_queries:
        return Reading("query_drift", None, False, f"{len(recent)} new questions (fewer than {m.min_queries})")
    known = list(session.scalars(select(Example.question).where(Example.split == "train")))
    if since:
        known += list(session.scalars(select(Interaction.question).where(Interaction.created_at < since)))
    if len(known) < 2:
        return Reading("query_drift", None, False, "fewer than 2 known questions to compare with")
    result = mmd_test(embedder.embed(known), embedder.embed(recent), m.drift_permutations, seed=0)
    detail = {"mmd2": result.mmd2, "p_value": result.p_value, "n_known": len(known), "n_recent": len(recent)}
    fired = result.drifted(m.drift_alpha)
    verdict = "<" if fired else ">="
    return Reading("query_drift", result.p_value, fired,
                   f"query drift: MMD p={result.p_value:.3f} {verdict} {m.drift_alpha} ({len(recent)} new vs "
                   f"{len(known)} known questions)", detail)


def documents(project: Project, session: Session) -> Reading:
    paths = [project.path(p) for p in project.settings.documents]
    found = scan_documents(session, [p for p in paths if p.exists()])
    n = len(found["new"]) + len(found["changed"])
    fired = bool(n) and project.settings.monitor.documents
    return Reading("documents", float(n), fired, f"{len(found['new'])} new and {len(found['changed'])} changed "
                   "documents", found)


def check_signals(project: Project, session: Session, embedder: Embedder | None) -> list[Reading]:
    """Every signal's reading, recorded in the session (caller commits)."""
    readings = [satisfaction(project, session), documents(project, session)]
    if embedder is not None:
        readings.append(query_drift(project, session, embedder))
    for r in readings:
        session.add(r.row())
    session.flush()
    return readings
