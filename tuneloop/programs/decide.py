"""Yes/no questions answered as a calibrated decision, the same way in eval, the gate and serving.

A small model asked a yes/no question often writes something that is neither "Yes" nor "No", or
says "No" to almost everything. Its *preference* between the two is still informative: the
log-probability of "Yes" minus that of "No" as the first answer token (the **margin**). The answer
is "Yes" when the margin reaches the version's threshold, else "No". The threshold is chosen on
the dev split to maximise balanced accuracy, and moves from 0 only when that beats 0 beyond chance
on the dev split (`choose_threshold`, run by `stages/calibrate.py`); it is
stored with the model version (`ModelVersion.hyperparams["yes_no_threshold"]`), like its compiled
prompt, so every place that answers for that version decides identically (`answer_conversations`).

Which questions are yes/no is read from the question itself (`is_yes_no_question`: it opens with
an auxiliary verb, "Is there ...", "Does the contract ..."), never from a reference answer: serving
has none, and eval must answer exactly as serving does.

Models that cannot give first-token probabilities (an OpenAI-compatible endpoint) and versions
answering with a compiled DSPy program (its reply opens with field markers, not the answer) keep
generating free text.
"""
from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from tuneloop.metrics import balanced_accuracy
from tuneloop.models.base import ChatModel, GenerationParams, Message
from tuneloop.programs.copy import copy_answer
from tuneloop.stats import paired_bootstrap

THRESHOLD_KEY = "yes_no_threshold"  # ModelVersion.hyperparams: {"value", "source", "n", "balanced_accuracy"}
YES, NO = "Yes", "No"
# English yes/no questions open with an auxiliary or modal verb ("Is there ...?", "Does ...?").
_OPENERS = frozenset("""is are was were am do does did can could will would shall should may might must has
have had isn't aren't doesn't don't didn't can't won't wouldn't shouldn't hasn't haven't""".split())
_FIRST_WORD = re.compile(r"[A-Za-z']+")


def is_yes_no_question(question: str) -> bool:
    """True when the question's first word is an auxiliary or modal verb ("Is", "Does", "Can" ...).

    "Is there a cap on liability?" and "Does the contract allow assignment?" are yes/no questions;
    "What is the governing law?" and "Who are the parties?" are not."""
    match = _FIRST_WORD.search(question)
    return bool(match) and match.group(0).lower() in _OPENERS


@runtime_checkable
class YesNoScorer(Protocol):
    """A chat model that can score "Yes" against "No" as the first token of its reply."""

    def yes_no_margins(self, conversations: Sequence[list[Message]]) -> list[float]:
        """log P(Yes) - log P(No) of the first reply token, per conversation."""
        ...


@dataclass(frozen=True)
class Threshold:
    """A chosen threshold on the margin and how it was chosen."""

    value: float
    source: str  # the split it was chosen on ("dev", or "train" when the dev split had too few)
    n: int  # yes/no questions it was chosen on
    balanced_accuracy: float | None  # on those questions, at this threshold (None: no questions)

    def as_dict(self) -> dict:
        return {"value": self.value, "source": self.source, "n": self.n, "balanced_accuracy": self.balanced_accuracy}


def threshold_of(hyperparams: dict | None) -> float | None:
    """The stored threshold value of a version (None: not calibrated)."""
    stored = (hyperparams or {}).get(THRESHOLD_KEY)
    return float(stored["value"]) if isinstance(stored, dict) and "value" in stored else None


def decide(margin: float, threshold: float | None) -> str:
    """ "Yes" when the margin reaches the threshold (0 when uncalibrated: the likelier token), else "No"."""
    return YES if margin >= (threshold if threshold is not None else 0.0) else NO


def choose_threshold(margins: Sequence[float], labels: Sequence[bool], source: str) -> Threshold:
    """The threshold that maximises balanced accuracy of `decide` on (margin, is-yes) pairs.

    Candidates are the midpoints between consecutive distinct margins (and one below/above all);
    among equally good ones the one closest to 0 wins, so few or separable points do not push the
    threshold to an extreme; and the best stays 0 unless it beats 0 beyond chance (`_beats_zero`).
    Needs at least one question of each class."""
    if len(margins) != len(labels):
        raise ValueError("margins and labels differ in length")
    n_yes = sum(1 for y in labels if y)
    n_no = len(labels) - n_yes
    if n_yes == 0 or n_no == 0:
        raise ValueError("choosing a yes/no threshold needs questions of both answers (Yes and No)")
    points = sorted(set(margins))
    candidates = [points[0] - 1.0, *((a + b) / 2 for a, b in zip(points, points[1:])), points[-1] + 1.0, 0.0]

    golds = ["yes" if y else "no" for y in labels]

    def balanced(t: float) -> float:
        return balanced_accuracy(golds, [decide(m, t).lower() for m in margins])

    best = max(candidates, key=lambda t: (round(balanced(t), 12), -abs(t)))
    if best != 0.0 and not _beats_zero(golds, margins, best):
        best = 0.0
    return Threshold(value=float(best), source=source, n=len(margins), balanced_accuracy=balanced(best))


THRESHOLD_P = 0.05  # a threshold other than 0 must beat 0 on the dev split at this one-sided p


def _beats_zero(golds: list[str], margins: Sequence[float], threshold: float) -> bool:
    """Whether `threshold` beats 0 (the model's own preference) on these questions beyond chance:
    paired bootstrap of balanced accuracy, p <= `THRESHOLD_P`.

    The best threshold of a small dev split is mostly noise: on CUAD (20 dev yes/no questions) the
    chosen thresholds (0.24-0.74) scored below 0 on all four versions' 120 held-out questions
    (balanced accuracy 0.570 vs 0.605 for the first SFT candidate, 0.510 vs 0.613 for the second;
    `bench/calibration_off.py`). A model fine-tuned on balanced Yes/No labels is calibrated at 0 by
    its training; the threshold moves only when the dev split shows it must."""
    def at(t: float):
        return lambda idx: balanced_accuracy([golds[i] for i in idx], [decide(margins[i], t).lower() for i in idx])

    return paired_bootstrap(len(golds), at(threshold), at(0.0), 1000).p_value <= THRESHOLD_P


@dataclass(frozen=True)
class Reply:
    """One answer: its text, and for a decided yes/no question the margin it was decided on."""

    text: str
    margin: float | None = None


def decides(model: ChatModel, program: object | None = None) -> bool:
    """Whether yes/no questions get the calibrated decision with this model (and compiled program)."""
    inner = getattr(model, "wrapped", model)  # a reply cache (models/cache.py) scores with its wrapped model
    return program is None and isinstance(inner, YesNoScorer)


def answer_conversations(model: ChatModel, questions: Sequence[str], conversations: Sequence[list[Message]],
                         params: GenerationParams, threshold: float | None, decided: bool,
                         chat=None, passages: Sequence[Sequence[str]] | None = None,
                         copy_min_overlap: float | None = None) -> list[Reply]:
    """Replies to `conversations` (one per question): yes/no questions decided by the margin when
    `decided`, the others generated by `chat(conversations, params)` (default: `model.chat`) and,
    with `copy_min_overlap` and each conversation's `passages`, turned into the passage span they
    point at (`programs/copy.py`)."""
    if copy_min_overlap is not None and (passages is None or len(passages) != len(questions)):
        raise ValueError("copying answers needs the passages of every conversation")
    yes_no = [i for i, q in enumerate(questions) if decided and is_yes_no_question(q)]
    free = [i for i in range(len(questions)) if i not in set(yes_no)]
    replies: list[Reply | None] = [None] * len(questions)
    if yes_no:
        margins = model.yes_no_margins([conversations[i] for i in yes_no])  # type: ignore[attr-defined]
        for i, m in zip(yes_no, margins):
            replies[i] = Reply(decide(m, threshold), m if math.isfinite(m) else None)
    if free:
        texts = (chat or model.chat)([conversations[i] for i in free], params)
        for i, t in zip(free, texts):
            if copy_min_overlap is not None:
                t = copy_answer(t, questions[i], passages[i], copy_min_overlap)  # type: ignore[index]
            replies[i] = Reply(t)
    return [r if r is not None else Reply("") for r in replies]
