"""Corrected answers become examples: training data for SFT and a held-out set drawn from use.

A person who corrects an answer has written the right answer to a real question. Each corrected
(question, document) becomes one `Example` of kind "feedback" (the latest correction wins when
the same question about the same document was corrected more than once):

* split "eval" for a fixed share of questions (`feedback.heldout_fraction`), chosen by a hash of
  the normalised question and its document (`tuneloop.splits`), so a question always lands on the same side, however
  often it is asked and whichever run sees it first;
* split "train" for the rest: SFT trains on them in the next cycle (as new data, then as replay).

A question that is already an example keeps the split it has (a correction of a held-out question
never becomes training data, and one of a training question never becomes a held-out item), so
the evaluation's no-overlap check (`stages/evaluate.check_no_overlap`) holds by construction.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from sqlalchemy import select

from tuneloop.config import Project
from tuneloop.splits import heldout_side, question_key
from tuneloop.store import Example, Feedback, Interaction, Session, example_hash

KIND = "feedback"


@dataclass
class CorrectionResult:
    added: dict[str, int] = field(default_factory=lambda: {"train": 0, "eval": 0})
    already: int = 0  # corrections whose question already is an example (any split)
    corrections: int = 0  # corrected answers looked at

    def as_dict(self) -> dict:
        return {"corrections": self.corrections, "added_train": self.added["train"],
                "added_eval": self.added["eval"], "already_examples": self.already}


def latest_corrections(session: Session) -> dict[tuple[str, str], tuple[Feedback, Interaction]]:
    """Per question key, the newest human correction and the interaction it corrects."""
    q = (select(Feedback, Interaction).join(Interaction, Feedback.interaction_id == Interaction.id)
         .where(Feedback.source == "human", Feedback.corrected_answer.is_not(None))
         .order_by(Feedback.created_at, Feedback.id))
    latest: dict[tuple[str, str], tuple[Feedback, Interaction]] = {}
    for fb, it in session.execute(q).all():
        if (fb.corrected_answer or "").strip():
            latest[question_key(it.question, it.document)] = (fb, it)
    return latest


def corrections_to_examples(project: Project, session: Session, cycle_id: int | None = None) -> CorrectionResult:
    """Add an Example for every corrected question that is not an example yet (caller commits)."""
    fraction = project.settings.feedback.heldout_fraction
    existing = {question_key(e.question, e.document) for e in session.scalars(select(Example))}
    result = CorrectionResult()
    for key, (fb, it) in latest_corrections(session).items():
        result.corrections += 1
        if key in existing:
            result.already += 1
            continue
        split = heldout_side(key, fraction)
        answer = fb.corrected_answer.strip()
        session.add(Example(kind=KIND, split=split, question=it.question, answer=answer, document=it.document,
                            content_hash=example_hash(it.question, answer, it.document), cycle_id=cycle_id,
                            meta={"feedback_id": fb.id, "interaction_id": it.id, "original_answer": it.answer}))
        existing.add(key)
        result.added[split] += 1
    session.flush()
    return result
