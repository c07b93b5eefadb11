"""Store reads and writes behind the feedback, interaction and admin endpoints.

Ownership: an interaction belongs to the client that asked. A client may read, and give feedback
on, only its own; reviewers and the admin may on any. Anything else is answered as if the id did
not exist (404), so ids cannot be probed. Clients see interactions by their `public_id` (random);
row ids stay internal.

One verdict per client and answer: feedback from a client on an interaction it already rated
updates that row (the fields sent replace the earlier ones, the others stay; `created_at` becomes
the time of the latest change) and answers 200; A/B choices likewise, one per client and pair.
The row's `verdict_key` is unique, so this holds under concurrent requests too.

`POST /v1/feedback` with an `Idempotency-Key` header: the first response is stored with the key
(per client, in the same transaction as the feedback) and a retry gets it back unchanged; the same
key with another body is a 422.
"""
from __future__ import annotations

import json
import math
from datetime import datetime
from typing import Any

from sqlalchemy import case, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from tuneloop.serve.auth import Caller
from tuneloop.serve.errors import ApiError
from tuneloop.serve.schemas import FeedbackRequest
from tuneloop.store import (
    Chunk,
    Cycle,
    Document,
    Feedback,
    IdempotencyKey,
    Interaction,
    ModelVersion,
    text_hash,
    utcnow,
)

THUMBS = {"up": 1, "down": -1}
MAX_CYCLES = 100  # newest cycles listed by the admin summary


def may_see(caller: Caller, row: Interaction) -> bool:
    """Clients see their own interactions; reviewers and the admin see all."""
    return caller.sees_everything or row.client == caller.name


def find_interaction(s: Session, public_id: str, caller: Caller, field: str = "interaction_id") -> Interaction:
    """The interaction with this public id, or 404 when it does not exist or is not the caller's."""
    row = s.scalar(select(Interaction).where(Interaction.public_id == public_id))
    if row is None or not may_see(caller, row):
        raise ApiError(404, f"{field}: unknown interaction '{public_id}'", "interaction_not_found")
    return row


def _verdict(s: Session, body: FeedbackRequest, caller: Caller) -> tuple[str, dict[str, Any]]:
    """The verdict key and the Feedback fields a request sets (None: not sent, keep what is stored)."""
    if body.is_choice:
        assert body.ab_pair is not None and body.preferred_interaction_id is not None
        pair = list(s.scalars(select(Interaction).where(Interaction.ab_pair == body.ab_pair)))
        if not pair or not all(may_see(caller, i) for i in pair):
            raise ApiError(404, f"ab_pair: unknown A/B pair '{body.ab_pair}'", "ab_pair_not_found")
        preferred = find_interaction(s, body.preferred_interaction_id, caller, "preferred_interaction_id")
        ids = sorted(i.public_id or "" for i in pair)
        if preferred.ab_pair != body.ab_pair:
            raise ApiError(422, f"preferred_interaction_id: interaction '{preferred.public_id}' is not part of A/B "
                                f"pair '{body.ab_pair}' (its answers are {ids})")
        if body.interaction_id is not None and body.interaction_id not in ids:
            raise ApiError(422, f"interaction_id: interaction '{body.interaction_id}' is not part of A/B pair "
                                f"'{body.ab_pair}'")
        return f"choice:{caller.name}:{body.ab_pair}", {
            "interaction_id": preferred.id, "preferred_interaction_id": preferred.id, "comment": body.comment}
    assert body.interaction_id is not None
    target = find_interaction(s, body.interaction_id, caller)
    return f"answer:{caller.name}:{target.id}", {
        "interaction_id": target.id, "thumbs": THUMBS.get(body.thumbs or ""), "rating": body.rating,
        "comment": body.comment, "corrected_answer": body.corrected_answer}


def _upsert(s: Session, body: FeedbackRequest, caller: Caller) -> tuple[int, dict[str, Any]]:
    """Add the caller's verdict, or update the one it gave before; (status, body), not committed."""
    key, fields = _verdict(s, body, caller)
    row = s.scalar(select(Feedback).where(Feedback.verdict_key == key))
    if row is None:
        row = Feedback(**fields, source="human", client=caller.name, verdict_key=key)
        s.add(row)
        status = 201
    else:
        for name, value in fields.items():
            if value is not None:
                setattr(row, name, value)
        row.created_at = utcnow()  # the latest verdict counts as the latest (contradiction_rule: latest)
        status = 200
    s.flush()
    return status, {"id": row.id, "interaction_id": body.preferred_interaction_id or body.interaction_id}


def _request_hash(body: FeedbackRequest) -> str:
    return text_hash(json.dumps(body.model_dump(mode="json"), sort_keys=True))


def _replay(s: Session, caller: Caller, key: str, request_hash: str) -> tuple[int, dict[str, Any]] | None:
    stored = s.scalar(select(IdempotencyKey).where(IdempotencyKey.client == caller.name, IdempotencyKey.key == key))
    if stored is None:
        return None
    if stored.request_hash != request_hash:
        raise ApiError(422, "Idempotency-Key: this key was already used with a different request body",
                       "idempotency_key_reused")
    return stored.status, dict(stored.response)


def save_feedback(s: Session, body: FeedbackRequest, caller: Caller,
                  idempotency_key: str | None = None) -> tuple[int, dict[str, Any]]:
    """Store (or update) the caller's feedback and commit; the status (201 new, 200 updated) and body.

    A verdict row or an idempotency key written by a concurrent request (unique constraints) makes
    the commit fail once; the second try sees that row and updates it, or replays the response.
    """
    request_hash = _request_hash(body)
    for attempt in range(2):
        try:
            if idempotency_key is not None:
                replayed = _replay(s, caller, idempotency_key, request_hash)
                if replayed is not None:
                    return replayed
            status, out = _upsert(s, body, caller)
            if idempotency_key is not None:
                s.add(IdempotencyKey(client=caller.name, key=idempotency_key, request_hash=request_hash,
                                     status=status, response=out))
            s.commit()  # before the response goes out
            return status, out
        except IntegrityError:
            s.rollback()
            if attempt:
                raise
    raise AssertionError("unreachable")


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def interaction_json(s: Session, public_id: str, caller: Caller) -> dict[str, Any]:
    """GET /v1/interactions/{id}: the stored answer, its passages, model and feedback count."""
    row = find_interaction(s, public_id, caller, "id")
    ids = [int(c) for c in row.chunk_ids or []]
    found = {cid: (doc, text) for cid, doc, text in
             s.execute(select(Chunk.id, Document.name, Chunk.text).join(Document).where(Chunk.id.in_(ids)))}
    cites = [{"n": n, "chunk_id": cid, "document": found[cid][0], "text": found[cid][1]}
             for n, cid in enumerate(ids, start=1) if cid in found]  # a re-ingested chunk may be gone
    version = s.get(ModelVersion, row.model_version_id) if row.model_version_id is not None else None
    n_feedback = s.scalar(select(func.count(Feedback.id)).where(Feedback.interaction_id == row.id))
    return {"id": row.public_id, "question": row.question, "answer": row.answer, "citations": cites,
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
