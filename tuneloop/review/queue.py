"""The expert review queue in the store: what it shows, what a reviewer's verdict becomes.

A queue is the set of `ReviewItem` rows of one rebuild (`stages/review.py`): the first
`review.per_cycle` by rank are "open" (shown), the other scored candidates "pool" (kept for the
`review_queue` signal and for audits). A rebuild marks the open items of earlier queues "expired".

A verdict on an open item:
* **confirm**: the model's answer is right; it becomes an `Example` (kind "review");
* **correct**: the reviewer's answer becomes the `Example`;
* **skip**: the reviewer cannot say; no example.

Each reviewed item records its reviewer and time, and its example records them too. The example's
split is the stable one every example from use gets (`splits.heldout_side` with
`feedback.heldout_fraction` and `feedback.dev_fraction`), so a question reviewed twice, or first
corrected through the API and then reviewed, stays on one side. A question that is already an
example (any split) or was reviewed or skipped once is never queued again (`known_keys`).

`tuneloop review`, `tuneloop review import` and the `/review` page all record through `record`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from sqlalchemy import func, or_, select, update

from tuneloop.config import FeedbackSettings
from tuneloop.errors import InputError, StateError
from tuneloop.jsonl import json_objects
from tuneloop.splits import heldout_side, question_key
from tuneloop.store import Chunk, Document, Example, ReviewItem, Session, example_hash, text_hash, utcnow
from tuneloop.textfile import read_text

KIND = "review"  # Example.kind of a reviewed item
VERDICTS = ("confirm", "correct", "skip")
REVIEWED = ("confirmed", "corrected", "skipped")
Verdict = Literal["confirm", "correct", "skip"]


class ReviewItemNotFound(StateError):
    """No review item has this id."""


class AlreadyReviewed(StateError):
    """The item was reviewed (or expired with its queue) before this verdict came."""


def item_key(question: str, document: str | None) -> str:
    """The hash a queue deduplicates on: the question's normalised words and its document."""
    return text_hash(*question_key(question, document))


def known_keys(session: Session) -> set[str]:
    """Questions never to queue: every example's (any split, any kind) and every reviewed item's."""
    keys = {item_key(q, d) for q, d in session.execute(select(Example.question, Example.document))}
    keys |= set(session.scalars(select(ReviewItem.item_key).where(ReviewItem.status.in_(REVIEWED))))
    return keys


def latest_queue(session: Session) -> int | None:
    return session.scalar(select(func.max(ReviewItem.queue)))


def save_queue(session: Session, items: list[ReviewItem], per_cycle: int, cycle_id: int | None) -> int:
    """Store `items` (ranked, best first) as a new queue and expire the open items of earlier ones;
    returns the queue's number (caller commits)."""
    session.execute(update(ReviewItem).where(ReviewItem.status == "open").values(status="expired"))
    queue = (latest_queue(session) or 0) + 1
    for rank, item in enumerate(items, start=1):
        item.queue, item.cycle_id, item.rank = queue, cycle_id, rank
        item.status = "open" if rank <= per_cycle else "pool"
        session.add(item)
    session.flush()
    return queue


def open_items(session: Session, limit: int | None = None) -> list[ReviewItem]:
    """The open items, the most informative (first ranked) first."""
    q = select(ReviewItem).where(ReviewItem.status == "open").order_by(ReviewItem.queue.desc(), ReviewItem.rank)
    return list(session.scalars(q.limit(limit) if limit else q))


def open_count(session: Session) -> int:
    return session.scalar(select(func.count(ReviewItem.id)).where(ReviewItem.status == "open")) or 0


def find_item(session: Session, public_id: str) -> ReviewItem:
    item = session.scalar(select(ReviewItem).where(ReviewItem.public_id == public_id))
    if item is None:
        raise ReviewItemNotFound(f"no review item {public_id!r}")
    return item


@dataclass(frozen=True)
class Recorded:
    item: ReviewItem
    example: Example | None  # None: skipped
    new_example: bool  # False: the question already was an example (kept as it was)


def record(session: Session, settings: FeedbackSettings, item: ReviewItem, verdict: Verdict, reviewer: str,
           answer: str | None = None) -> Recorded:
    """Apply one verdict to an open item (see the module doc); the caller commits."""
    if verdict not in VERDICTS:
        raise InputError(f"unknown verdict {verdict!r}: use one of {', '.join(VERDICTS)}")
    if item.status != "open":
        raise AlreadyReviewed(f"review item {item.public_id} is {item.status}"
                              + (f" (by {item.reviewer})" if item.reviewer else "") + ": nothing was changed")
    corrected = (answer or "").strip()
    if verdict == "correct" and not corrected:
        raise InputError("a correction needs the right answer")
    item.status = {"confirm": "confirmed", "correct": "corrected", "skip": "skipped"}[verdict]
    item.reviewer, item.reviewed_at = reviewer, utcnow()
    if verdict == "skip":
        session.flush()
        return Recorded(item, None, False)
    item.final_answer = corrected if verdict == "correct" else item.answer
    key = question_key(item.question, item.document)
    # only the examples of the item's document can share its question key (no document: None or "")
    same_document = (Example.document == item.document) if item.document else \
        or_(Example.document.is_(None), Example.document == "")
    same = next((i for i, q, d in session.execute(select(Example.id, Example.question, Example.document)
                                                    .where(same_document)) if question_key(q, d) == key), None)
    if same is not None:  # answered meanwhile (a correction through the API, another reviewer's import)
        item.example_id = same
        session.flush()
        return Recorded(item, session.get(Example, same), False)
    split = heldout_side(key, settings.heldout_fraction, settings.dev_fraction)
    example = Example(kind=KIND, split=split, question=item.question, answer=item.final_answer,
                      document=item.document,
                      content_hash=example_hash(item.question, item.final_answer, item.document),
                      meta={"review_item_id": item.id, "reviewer": reviewer,
                            "reviewed_at": item.reviewed_at.isoformat(), "from": item.status,
                            "original_answer": item.answer, "informativeness": item.score,
                            "source": item.source, "interaction_id": item.interaction_id,
                            "context_chunk_ids": list(item.chunk_ids or [])})
    session.add(example)
    session.flush()
    item.example_id = example.id
    session.flush()
    return Recorded(item, example, True)


def item_json(session: Session, item: ReviewItem) -> dict[str, Any]:
    """An item as the page, the terminal and the export show it (passages with their text)."""
    rows = session.execute(select(Chunk.id, Document.name, Chunk.text).join(Document, Chunk.document_id == Document.id)
                           .where(Chunk.id.in_(list(item.chunk_ids or [])))).all()
    by_id = {cid: {"chunk_id": cid, "document": doc, "text": text} for cid, doc, text in rows}
    return {"id": item.public_id, "question": item.question, "document": item.document, "answer": item.answer,
            "passages": [by_id[c] for c in item.chunk_ids or [] if c in by_id],
            "informativeness": round(item.score, 4), "doubts": item.scores or {}, "source": item.source,
            "question_type": item.question_type, "queue": item.queue, "rank": item.rank, "status": item.status}


def export_queue(session: Session, path: Path) -> int:
    """Write the open items as JSONL (one object per line, with an empty `verdict` to fill in)."""
    items = open_items(session)
    lines = [json.dumps({**item_json(session, it), "verdict": None, "answer_reviewed": None}, ensure_ascii=False)
             for it in items]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    tmp.replace(path)
    return len(items)


@dataclass
class Imported:
    confirmed: int = 0
    corrected: int = 0
    skipped: int = 0
    unreviewed: int = 0  # lines without a verdict (left open)
    examples: int = 0  # new examples


def import_reviews(session: Session, settings: FeedbackSettings, path: Path, reviewer: str) -> Imported:
    """Apply the verdicts of an exported (and filled-in) JSONL file, all or nothing: every line is
    checked before any is applied; a line naming an unknown or no longer open item is an error
    naming the line. `verdict`: confirm | correct (with `answer_reviewed`) | skip | null (left open);
    `reviewer` on a line overrides the command's."""
    text = read_text(path)
    planned: list[tuple[str, ReviewItem, Verdict, str, str | None]] = []
    seen: set[str] = set()
    for _, where, row in json_objects(path, text):
        verdict = row.get("verdict")
        if verdict in (None, ""):
            planned.append((where, None, None, "", None))  # type: ignore[arg-type]
            continue
        if verdict not in VERDICTS:
            raise InputError(f"{where}: verdict {verdict!r} is not one of {', '.join(VERDICTS)} (or null)")
        public_id = row.get("id")
        if not isinstance(public_id, str) or not public_id:
            raise InputError(f"{where}: no item id (the export's \"id\")")
        if public_id in seen:
            raise InputError(f"{where}: item {public_id} appears twice")
        seen.add(public_id)
        answer = row.get("answer_reviewed")
        if verdict == "correct" and (not isinstance(answer, str) or not answer.strip()):
            raise InputError(f"{where}: verdict correct needs the right answer in \"answer_reviewed\"")
        who = row.get("reviewer") or reviewer
        if not isinstance(who, str) or len(who) > 100:
            raise InputError(f"{where}: reviewer must be a name of at most 100 characters")
        try:
            item = find_item(session, public_id)
        except ReviewItemNotFound as err:
            raise InputError(f"{where}: {err}") from None
        if item.status != "open":
            raise InputError(f"{where}: review item {public_id} is {item.status}: remove the line or its verdict")
        planned.append((where, item, verdict, who, answer))
    out = Imported()
    for _, item, verdict, who, answer in planned:
        if item is None:
            out.unreviewed += 1
            continue
        done = record(session, settings, item, verdict, who, answer)
        setattr(out, done.item.status, getattr(out, done.item.status) + 1)
        out.examples += int(done.new_example)
    return out
