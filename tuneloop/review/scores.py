"""How informative an expert's answer to a question would be: the model's doubts, and the order of a queue.

Each doubt is a number in [0, 1] (1: the model could hardly be less sure), computed from what the
champion did with the question (`stages/review.py` collects it):

* **margin** (yes/no questions the model decides by its first-token margin, `programs/decide.py`):
  how close the calibrated probability is to the decision threshold. With margin m (log P(Yes) -
  log P(No)) and threshold t the calibrated P(Yes) is sigmoid(m - t); the doubt is
  1 - |2 P(Yes) - 1| = 1 - |tanh((m - t) / 2)|: 1 at the threshold, 0.46 one log-odd away.
* **disagreement** between the sampled answers (the top passages answered greedily, then answers
  sampled on wider passage sets): for yes/no, 1 - |mean vote| over the decisions (+1 Yes, -1 No),
  so 3 agreeing answers give 0 and 2 against 1 give 2/3; for answers in words, 1 - the mean token
  F1 of the other answers against the first.
* **retrieval**: low or flat passage scores: the mean of the parts a search has (a BM25-only index
  has no dense part): BM25 and dense rankers disagreeing on the top passages (1 - the overlap of
  their top k), a flat ranking (the k-th score over the first: all passages look alike), a low
  best dense cosine (1 - it: nothing in the documents resembles the question).
* **judge** (`review.judge`): the judge's 1-5 grade of the answer, as (5 - grade) / 4.

The informativeness is the weighted mean of the doubts an item has (`review.weights`), the yes/no
doubts (margin, and the vote disagreement) weighted down by the champion's **decision skill**:
2 x (its balanced accuracy where its threshold was chosen - 0.5), clipped to [0, 1]. The confidence
of a model whose Yes/No decisions are at chance says nothing about where it errs: on CUAD dev the
untuned 135M model's margin doubt ranked its wrong answers *below* its right ones (AUC 0.32,
bench/review_queue.py), while retrieval doubt still pointed at them (0.63). A skill that is not
known (no labelled yes/no question to calibrate on) counts as 1. A queue is
ordered greedily by informativeness with a diversity rule: each item already queued of the same
document, or with the same question, multiplies a candidate's informativeness by
`review.diversity`, so twenty copies of one doubt do not fill the queue (a maximal marginal
relevance rule over two discrete similarities, written here because it is a dozen lines).
"""
from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from tuneloop import metrics
from tuneloop.programs.decide import YES, decide
from tuneloop.settings_review import ReviewWeights

DOUBTS = ("margin", "disagreement", "retrieval", "judge")


def margin_doubt(margin: float, threshold: float | None) -> float:
    """1 - |2 P(Yes) - 1| with P(Yes) = sigmoid(margin - threshold)."""
    return 1.0 - abs(math.tanh((margin - (threshold or 0.0)) / 2.0))


def yes_no_disagreement(margins: Sequence[float], threshold: float | None) -> float:
    """1 - |mean vote| over the decisions of `margins` (+1 Yes, -1 No)."""
    if len(margins) < 2:
        return 0.0
    votes = [1.0 if decide(m, threshold) == YES else -1.0 for m in margins]
    return 1.0 - abs(sum(votes) / len(votes))


def answer_disagreement(answers: Sequence[str]) -> float:
    """1 - the mean token F1 of answers[1:] against answers[0]."""
    if len(answers) < 2:
        return 0.0
    first = answers[0]
    return 1.0 - sum(metrics.token_f1(a, [first]) for a in answers[1:]) / (len(answers) - 1)


@dataclass(frozen=True)
class Search:
    """What the retriever's rankers saw for one question: each ranker's top chunk ids and scores
    (best first; empty for a ranker the index does not have)."""

    bm25: list[tuple[int, float]] = field(default_factory=list)
    dense: list[tuple[int, float]] = field(default_factory=list)


def retrieval_doubt(search: Search, k: int) -> float | None:
    """The mean of the parts `search` has (see the module doc); None when no ranker found anything."""
    parts: list[float] = []
    bm25, dense = search.bm25[:k], search.dense[:k]
    if bm25 and dense:
        overlap = len({c for c, _ in bm25} & {c for c, _ in dense}) / max(len(bm25), len(dense))
        parts.append(1.0 - overlap)
    ranked = dense or bm25
    if len(ranked) >= 2 and ranked[0][1] > 0:
        parts.append(min(max(ranked[-1][1] / ranked[0][1], 0.0), 1.0))
    if dense:
        parts.append(min(max(1.0 - dense[0][1], 0.0), 1.0))
    if not bm25 and not dense:
        return 1.0  # nothing retrieved: the model answered without evidence
    return sum(parts) / len(parts) if parts else None


def judge_doubt(grade: float | None) -> float | None:
    """(5 - grade) / 4 for a 1-5 grade; None when the judge's reply had no grade."""
    return None if grade is None else min(max((5.0 - grade) / 4.0, 0.0), 1.0)


def decision_skill(balanced_accuracy: float | None) -> float:
    """2 x (balanced accuracy - 0.5) in [0, 1]: 0 at chance, 1 when always right; 1 when unknown."""
    if balanced_accuracy is None or math.isnan(balanced_accuracy):
        return 1.0
    return min(max(2.0 * (balanced_accuracy - 0.5), 0.0), 1.0)


def informativeness(doubts: dict[str, float | None], weights: ReviewWeights, skill: float = 1.0,
                    yes_no: bool = False) -> float:
    """The weighted mean of the doubts present (0 when none is; NaN, from a margin the model could
    not give, counts as absent); for a yes/no item decided by its margin, the margin and the vote
    disagreement weigh `skill` times their weight (`decision_skill`)."""
    def weight(name: str) -> float:
        scaled = yes_no and name in ("margin", "disagreement")
        return getattr(weights, name) * (skill if scaled else 1.0)

    pairs = [(weight(name), value) for name, value in doubts.items()
             if value is not None and not math.isnan(value) and name in DOUBTS and weight(name) > 0]
    total = sum(w for w, _ in pairs)
    return sum(w * v for w, v in pairs) / total if total else 0.0


@dataclass
class Scored:
    """A candidate with its informativeness, and what the diversity rule compares."""

    key: str  # the question key's hash
    question: str  # normalised (splits.question_key)
    document: str
    score: float
    payload: object = None  # what the caller needs back (stages/review.py: the candidate)


def diverse_order(items: Sequence[Scored], diversity: float, limit: int | None = None) -> list[Scored]:
    """Greedy queue order: repeatedly take the item whose score x diversity^(queued items of its
    document + queued items with its question) is highest (ties: the higher raw score, then the key)."""
    left = sorted(items, key=lambda it: (-it.score, it.key))
    out: list[Scored] = []
    per_document: Counter[str] = Counter()
    per_question: Counter[str] = Counter()
    limit = len(left) if limit is None else limit
    while left and len(out) < limit:
        def adjusted(it: Scored) -> float:
            return it.score * diversity ** (per_document[it.document] + per_question[it.question])

        best = max(range(len(left)), key=lambda i: (adjusted(left[i]), -i))
        chosen = left.pop(best)
        out.append(chosen)
        per_document[chosen.document] += 1
        per_question[chosen.question] += 1
    return out
