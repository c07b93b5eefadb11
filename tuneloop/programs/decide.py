"""Yes/no questions answered as a calibrated decision, the same way in eval, the gate and serving.

A small model asked a yes/no question often writes something that is neither "Yes" nor "No", or
says "No" to almost everything. Its *preference* between the two is still informative: the
log-probability of "Yes" minus that of "No" as the first answer token (the **margin**). The answer
is "Yes" when the margin reaches the version's threshold, else "No". The threshold is chosen on
the dev split to maximise balanced accuracy, and moves from 0 only when choosing it that way beats
0 on dev questions it was not chosen on (`choose_threshold`, run by `stages/calibrate.py`); it is
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


def stored_threshold(hyperparams: dict | None) -> Threshold | None:
    """The threshold a version stored with how it was chosen (`stages/calibrate.py`), or None."""
    stored = (hyperparams or {}).get(THRESHOLD_KEY)
    return Threshold(**stored) if isinstance(stored, dict) else None


def threshold_of(hyperparams: dict | None) -> float | None:
    """The stored threshold value of a version (None: not calibrated)."""
    stored = (hyperparams or {}).get(THRESHOLD_KEY)
    return float(stored["value"]) if isinstance(stored, dict) and "value" in stored else None


def decide(margin: float, threshold: float | None) -> str:
    """ "Yes" when the margin reaches the threshold (0 when uncalibrated: the likelier token), else "No"."""
    return YES if margin >= (threshold if threshold is not None else 0.0) else NO


def choose_threshold(margins: Sequence[float], labels: Sequence[bool], source: str,
                     documents: Sequence[str | None] | None = None) -> Threshold:
    """The threshold that maximises balanced accuracy of `decide` on (margin, is-yes) pairs.

    Candidates are the midpoints between consecutive distinct margins (and one below/above all);
    among equally good ones the one closest to 0 wins, so few or separable points do not push the
    threshold to an extreme; and the best stays 0 unless choosing a threshold this way beats 0 on
    questions it was not chosen on, about other `documents` when given (`_holds_out_of_sample`).
    Needs at least one question of each class."""
    if len(margins) != len(labels):
        raise ValueError("margins and labels differ in length")
    golds = ["yes" if y else "no" for y in labels]
    if len(set(golds)) < 2:
        raise ValueError("choosing a yes/no threshold needs questions of both answers (Yes and No)")
    best = _best_threshold(margins, golds)
    if best != 0.0 and not _holds_out_of_sample(golds, margins, documents):
        best = 0.0
    return Threshold(value=float(best), source=source, n=len(margins),
                     balanced_accuracy=_balanced(golds, margins, [best] * len(margins)))


THRESHOLD_P = 0.05  # a threshold other than 0 must beat 0 out of sample at this one-sided p


def _halves(golds: Sequence[str], documents: Sequence[str | None] | None) -> list[int]:
    """0/1 per question: whole documents go to the half with fewer questions (largest first, then
    by name); without two documents, questions alternate within each answer."""
    if documents is None or len(set(documents)) < 2:
        ranks: dict[str, int] = {}
        half = []
        for g in golds:
            half.append(ranks.get(g, 0) % 2)
            ranks[g] = ranks.get(g, 0) + 1
        return half
    sizes: dict[str | None, int] = {}
    for doc in documents:
        sizes[doc] = sizes.get(doc, 0) + 1
    side, load = {}, [0, 0]
    for doc in sorted(sizes, key=lambda d: (-sizes[d], str(d))):
        side[doc] = 0 if load[0] <= load[1] else 1
        load[side[doc]] += sizes[doc]
    return [side[doc] for doc in documents]


def _balanced(golds: Sequence[str], margins: Sequence[float], thresholds: Sequence[float]) -> float:
    return balanced_accuracy(list(golds), [decide(m, t).lower() for m, t in zip(margins, thresholds)])


def _best_threshold(margins: Sequence[float], golds: Sequence[str]) -> float:
    """The candidate threshold with the best balanced accuracy on these questions (ties: nearest 0)."""
    points = sorted(set(margins))
    candidates = [points[0] - 1.0, *((a + b) / 2 for a, b in zip(points, points[1:])), points[-1] + 1.0, 0.0]
    return max(candidates, key=lambda t: (round(_balanced(golds, margins, [t] * len(margins)), 12), -abs(t)))


def _holds_out_of_sample(golds: list[str], margins: Sequence[float], documents: Sequence[str | None] | None) -> bool:
    """Whether choosing a threshold beats 0 (the model's own preference) on questions it was not
    chosen on: the questions are split in two halves (by document when there are two or more, as
    the held-out set asks about contracts the model never saw; else alternating within each
    answer), each half is decided by the threshold chosen on the other, and those decisions must
    beat threshold 0 by a paired bootstrap of balanced accuracy at p <= `THRESHOLD_P`.

    Testing the best threshold on the questions it was picked from trusts it too much. On CUAD (20
    dev yes/no questions) thresholds picked that way scored below 0 on 120 held-out questions of
    other contracts for all seven versions measured (0.570 vs 0.605 and 0.510 vs 0.613 without a
    test; 0.503 vs 0.617 for one that beat 0 on dev at p <= 0.05; `bench/calibration_off.py`).
    That loss is far beyond what i.i.d. questions would give (`bench/threshold_guard.py`: there
    the in-sample test costs < 0.005 on average): margins shift between documents, so the halves
    are split by document. The price, in the same simulation: when a threshold other than 0 is
    really better, this test finds it less often (0.23 vs 0.62 of draws at a 1-sd effect on 20
    questions) and keeps less of the gain (+0.026 vs +0.067 balanced accuracy on average)."""
    half = _halves(golds, documents)
    thresholds = [0.0] * len(golds)
    for h in (0, 1):
        fit = [i for i in range(len(golds)) if half[i] != h]
        if len({golds[i] for i in fit}) < 2:
            return False  # a half without both answers cannot choose a threshold
        chosen = _best_threshold([margins[i] for i in fit], [golds[i] for i in fit])
        for i in range(len(golds)):
            if half[i] == h:
                thresholds[i] = chosen

    def at(ts: Sequence[float]):
        return lambda idx: _balanced([golds[i] for i in idx], [margins[i] for i in idx], [ts[i] for i in idx])

    return paired_bootstrap(len(golds), at(thresholds), at([0.0] * len(golds)), 1000).p_value <= THRESHOLD_P


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
