"""Stage: feedback. People's feedback becomes examples: training data for SFT and a held-out set drawn from use.

(The step also routes feedback into preference pairs, KTO rows and rewards: `feedback/routing.py`.)

Two kinds of human feedback say what the right answer to a real question is:

* a **correction**: the person wrote the right answer;
* an **approval** (`feedback.approved_to_examples`): a thumbs up, or a rating of at least
  `feedback.approved_rating`, on the model's answer.

Corrections alone are a biased sample: they exist only where the model was wrong. On contract
questions, where most answers are "No", a model that says "Yes" too often is corrected to "No"
again and again and never shown the questions it answered "Yes" to correctly; trained on that,
it learns to say "No" to everything. Approved answers supply the rest, so the examples from use
follow the questions people ask, not only the model's mistakes.

For each (question, document) the latest feedback decides: a correction or an approval makes an
`Example` of kind "feedback" (its answer: the correction, or the approved answer); a thumbs down
without a correction, or a low rating, means there is no known right answer, so no example.

* split "eval" for a fixed share of questions (`feedback.heldout_fraction`), chosen by a hash of
  the normalised question and its document (`tuneloop.splits`), so a question always lands on the
  same side, however often it is asked and whichever run sees it first;
* split "dev" for a further share (`feedback.dev_fraction`, default 0), by the same hash: what
  the select step and WiSE-FT choose on, never trained on and never gated on;
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
class FeedbackExamples:
    added: dict[str, int] = field(default_factory=lambda: {"train": 0, "eval": 0})
    already: int = 0  # questions with a known answer that already are an example (any split)
    corrections: int = 0  # questions whose latest feedback is a correction
    approvals: int = 0  # questions whose latest feedback approves the model's answer

    def as_dict(self) -> dict:
        return {"corrections": self.corrections, "approvals": self.approvals, "added_train": self.added["train"],
                "added_eval": self.added["eval"], **({"added_dev": self.added["dev"]} if "dev" in self.added else {}),
                "already_examples": self.already}


@dataclass(frozen=True)
class KnownAnswer:
    answer: str
    how: str  # "correction" | "approval"
    feedback: Feedback
    interaction: Interaction


def _verdict(fb: Feedback, it: Interaction, approved_rating: int, approvals: bool) -> KnownAnswer | None | bool:
    """What one feedback row says: a KnownAnswer, None (the answer is wrong, right one unknown),
    or False (the row says nothing about correctness: a comment, an A/B choice)."""
    if (fb.corrected_answer or "").strip():
        return KnownAnswer(fb.corrected_answer.strip(), "correction", fb, it)
    good = fb.thumbs is not None and fb.thumbs > 0 or fb.rating is not None and fb.rating >= approved_rating
    bad = fb.thumbs is not None and fb.thumbs < 0 or fb.rating is not None and fb.rating < approved_rating
    if good and approvals and (it.answer or "").strip():
        return KnownAnswer(it.answer.strip(), "approval", fb, it)
    return None if (bad or good) else False


def known_answers(session: Session, approved_rating: int = 4,
                  approvals: bool = True) -> dict[tuple[str, str], KnownAnswer]:
    """Per question key, the answer the latest human verdict on it establishes (see the module doc)."""
    q = (select(Feedback, Interaction).join(Interaction, Feedback.interaction_id == Interaction.id)
         .where(Feedback.source == "human", Feedback.preferred_interaction_id.is_(None))
         .order_by(Feedback.created_at, Feedback.id))
    latest: dict[tuple[str, str], KnownAnswer | None] = {}
    for fb, it in session.execute(q).all():
        verdict = _verdict(fb, it, approved_rating, approvals)
        if verdict is not False:
            latest[question_key(it.question, it.document)] = verdict
    return {k: v for k, v in latest.items() if v is not None}


def feedback_to_examples(project: Project, session: Session, cycle_id: int | None = None) -> FeedbackExamples:
    """Add an Example for every question with a known answer that is not an example yet (caller commits)."""
    s = project.settings.feedback
    existing = {question_key(e.question, e.document) for e in session.scalars(select(Example))}
    result = FeedbackExamples()
    for key, known in known_answers(session, s.approved_rating, s.approved_to_examples).items():
        if known.how == "correction":
            result.corrections += 1
        else:
            result.approvals += 1
        if key in existing:
            result.already += 1
            continue
        split = heldout_side(key, s.heldout_fraction, s.dev_fraction)
        it = known.interaction
        session.add(Example(kind=KIND, split=split, question=it.question, answer=known.answer, document=it.document,
                            content_hash=example_hash(it.question, known.answer, it.document), cycle_id=cycle_id,
                            meta={"feedback_id": known.feedback.id, "interaction_id": it.id, "from": known.how,
                                  "original_answer": it.answer}))
        existing.add(key)
        result.added[split] = result.added.get(split, 0) + 1
    session.flush()
    return result
