"""Store reads and writes behind the feedback, interaction and admin endpoints."""
from __future__ import annotations

import math
from datetime import datetime
from typing import Any

from sqlalchemy import case, func, select
from sqlalchemy.orm import Session

from tuneloop.serve.errors import ApiError
from tuneloop.serve.schemas import FeedbackRequest
from tuneloop.store import Chunk, Cycle, Document, Feedback, Interaction, ModelVersion

THUMBS = {"up": 1, "down": -1}
MAX_CYCLES = 100  # newest cycles listed by the admin summary


def _interaction(s: Session, interaction_id: int, field: str = "interaction_id") -> Interaction:
    row = s.get(Interaction, interaction_id)
    if row is None:
        raise ApiError(404, f"{field}: unknown interaction {interaction_id}", "interaction_not_found")
    return row


def save_feedback(s: Session, body: FeedbackRequest, client: str) -> dict[str, int]:
    """Validate ids against the store, add the Feedback row and commit; the 201 body."""
    if body.is_choice:
        assert body.ab_pair is not None and body.preferred_interaction_id is not None
        pair = {i.id for i in s.scalars(select(Interaction).where(Interaction.ab_pair == body.ab_pair))}
        if not pair:
            raise ApiError(404, f"ab_pair: unknown A/B pair '{body.ab_pair}'", "ab_pair_not_found")
        preferred = _interaction(s, body.preferred_interaction_id, "preferred_interaction_id").id
        if preferred not in pair:
            raise ApiError(422, f"preferred_interaction_id: interaction {preferred} is not part of A/B pair "
                                f"'{body.ab_pair}' (its answers are {sorted(pair)})")
        if body.interaction_id is not None and body.interaction_id not in pair:
            raise ApiError(422, f"interaction_id: interaction {body.interaction_id} is not part of A/B pair "
                                f"'{body.ab_pair}'")
        row = Feedback(interaction_id=preferred, preferred_interaction_id=preferred, comment=body.comment,
                       source="human", client=client)
    else:
        assert body.interaction_id is not None
        target = _interaction(s, body.interaction_id)
        row = Feedback(interaction_id=target.id, thumbs=THUMBS.get(body.thumbs or ""), rating=body.rating,
                       comment=body.comment, corrected_answer=body.corrected_answer, source="human", client=client)
    s.add(row)
    s.commit()  # before the 201 goes out
    return {"id": row.id, "interaction_id": row.interaction_id}


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def interaction_json(s: Session, interaction_id: int) -> dict[str, Any]:
    """GET /v1/interactions/{id}: the stored answer, its passages, model and feedback count."""
    row = _interaction(s, interaction_id, "id")
    ids = [int(c) for c in row.chunk_ids or []]
    found = {cid: (doc, text) for cid, doc, text in
             s.execute(select(Chunk.id, Document.name, Chunk.text).join(Document).where(Chunk.id.in_(ids)))}
    cites = [{"n": n, "chunk_id": cid, "document": found[cid][0], "text": found[cid][1]}
             for n, cid in enumerate(ids, start=1) if cid in found]  # a re-ingested chunk may be gone
    version = s.get(ModelVersion, row.model_version_id) if row.model_version_id is not None else None
    n_feedback = s.scalar(select(func.count(Feedback.id)).where(Feedback.interaction_id == row.id))
    return {"id": row.id, "question": row.question, "answer": row.answer, "citations": cites,
            "model": version.name if version else None, "document": row.document, "ab_pair": row.ab_pair,
            "created_at": _iso(row.created_at), "feedback_count": n_feedback or 0}


def _finite(value: Any) -> Any:
    """JSON has no NaN/Infinity: such metric values (e.g. an undefined score) become null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def _count_if(condition) -> Any:
    return func.sum(case((condition, 1), else_=0))


def admin_summary(s: Session) -> dict[str, Any]:
    """GET /v1/admin/summary: interaction count, feedback per day, model versions, recent cycles."""
    day = func.date(Feedback.created_at)
    per_day = s.execute(
        select(day, _count_if(Feedback.thumbs == 1), _count_if(Feedback.thumbs == -1), func.count(Feedback.rating),
               func.avg(Feedback.rating), func.count(Feedback.comment), func.count(Feedback.corrected_answer),
               func.count(Feedback.preferred_interaction_id))
        .group_by(day).order_by(day)).all()
    names = {v.id: v.name for v in s.scalars(select(ModelVersion))}
    versions = s.scalars(select(ModelVersion).order_by(ModelVersion.id)).all()
    cycles = s.scalars(select(Cycle).order_by(Cycle.id.desc()).limit(MAX_CYCLES)).all()
    return {
        "interactions": s.scalar(select(func.count(Interaction.id))) or 0,
        "feedback_per_day": [
            {"day": str(d)[:10], "up": int(up or 0), "down": int(down or 0), "ratings": int(ratings or 0),
             "rating_avg": round(float(avg), 3) if avg is not None else None, "comments": int(comments or 0),
             "corrections": int(corrections or 0), "ab_choices": int(choices or 0)}
            for d, up, down, ratings, avg, comments, corrections, choices in per_day],
        "versions": [{"name": v.name, "parent": names.get(v.parent_id) if v.parent_id else None, "method": v.method,
                      "status": v.status, "metrics": _finite(v.metrics or {}), "created_at": _iso(v.created_at)}
                     for v in versions],
        "cycles": [{"id": c.id, "status": c.status, "trigger": c.trigger, "started_at": _iso(c.started_at),
                    "finished_at": _iso(c.finished_at), "outcome": c.outcome} for c in cycles],
    }
