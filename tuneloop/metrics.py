"""Reference-based answer metrics for question answering (no model calls).

All text metrics share one normalisation, :func:`normalize_tokens` (SQuAD style): lowercase,
every character outside ``[a-z0-9]`` becomes a space, split on whitespace, drop the articles
"a", "an" and "the". Non-ASCII letters are therefore dropped too.

Every per-item metric takes one prediction and one or more reference answers and returns the best
score over the references, in [0, 1].

Yes/no questions are scored on the label, not on span overlap: when the first reference of an item
normalises to exactly "yes" or "no", :func:`score_item` reads the prediction's label
(:func:`answer_label`: its leading yes/no; a free-text answer is "no" when it says the document is
silent, else "yes") and every metric of that item is 1.0 when the labels agree, else 0.0. A small
model answering "Yes, the contract contains a non-compete clause" is right, although its token
overlap with the reference "Yes" is low.

Aggregates over an empty set of items are ``math.nan``; callers render nan as "-".
"""
from __future__ import annotations

import functools
import math
import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from tuneloop.negative import is_negative_answer

if TYPE_CHECKING:
    from rouge_score.rouge_scorer import RougeScorer

_ARTICLES = frozenset({"a", "an", "the"})
_NON_ALNUM = re.compile(r"[^a-z0-9]+")
_YES_NO = ("yes", "no")
_SPAN_METRICS = ("exact_match", "token_f1", "rouge_l", "cuad_match")
# The CUAD paper counts a predicted clause as found when its Jaccard similarity with the gold
# clause is at least this.
CUAD_JACCARD_THRESHOLD = 0.5


def raw_tokens(text: str) -> list[str]:
    """Lowercase, replace non-[a-z0-9] characters with spaces and split (articles kept)."""
    return _NON_ALNUM.sub(" ", text.lower()).split()


def normalize_tokens(text: str) -> list[str]:
    """Return the SQuAD-style normalised tokens of ``text``.

    Lowercases, replaces every character outside ``[a-z0-9]`` with a space, splits on whitespace
    and drops the articles "a", "an" and "the".
    """
    return [token for token in raw_tokens(text) if token not in _ARTICLES]


def _check_references(references: Sequence[str]) -> None:
    if isinstance(references, str):
        raise TypeError("references must be a sequence of strings, not a single string")
    if len(references) == 0:
        raise ValueError("at least one reference answer is needed")


def exact_match(prediction: str, references: Sequence[str]) -> float:
    """1.0 when the normalised tokens of ``prediction`` equal those of any reference, else 0.0."""
    _check_references(references)
    predicted = normalize_tokens(prediction)
    return 1.0 if any(predicted == normalize_tokens(ref) for ref in references) else 0.0


def _f1(predicted: list[str], gold: list[str]) -> float:
    """SQuAD token F1 between two token lists (multiset overlap)."""
    if not predicted and not gold:
        return 1.0
    if not predicted or not gold:
        return 0.0
    remaining: dict[str, int] = {}
    for token in gold:
        remaining[token] = remaining.get(token, 0) + 1
    common = 0
    for token in predicted:
        if remaining.get(token, 0) > 0:
            remaining[token] -= 1
            common += 1
    if common == 0:
        return 0.0
    precision = common / len(predicted)
    recall = common / len(gold)
    return 2 * precision * recall / (precision + recall)


def token_f1(prediction: str, references: Sequence[str]) -> float:
    """Best SQuAD token F1 of ``prediction`` over ``references``.

    Tokens come from :func:`normalize_tokens` and overlap is counted as a multiset. When both sides
    have no tokens the score is 1.0; when only one side has none it is 0.0.
    """
    _check_references(references)
    predicted = normalize_tokens(prediction)
    return max(_f1(predicted, normalize_tokens(ref)) for ref in references)


@functools.lru_cache(maxsize=1)
def _rouge_scorer() -> RougeScorer:
    """The one ROUGE-L scorer, built on first use (no stemming).

    ``rouge_score`` is imported here, not at module level: it imports nltk, which takes ~2 s.
    """
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"])


def rouge_l(prediction: str, references: Sequence[str]) -> float:
    """Best ROUGE-L F-measure of ``prediction`` over ``references`` (``rouge_score``, no stemming).

    ``rouge_score`` tokenises much like :func:`normalize_tokens` but keeps articles. It scores 0.0
    when a side has no tokens; to agree with :func:`token_f1`, two token-less texts score 1.0 here.
    """
    _check_references(references)
    scorer = _rouge_scorer()
    prediction_empty = not raw_tokens(prediction)
    best = 0.0
    for ref in references:
        if prediction_empty and not raw_tokens(ref):
            return 1.0
        best = max(best, scorer.score(ref, prediction)["rougeL"].fmeasure)
    return float(best)


def _jaccard(first: set[str], second: set[str]) -> float:
    if not first and not second:
        return 1.0
    return len(first & second) / len(first | second)


def cuad_match(prediction: str, references: Sequence[str]) -> float:
    """1.0 when ``prediction`` matches any reference by the CUAD paper's rule, else 0.0.

    The rule: the word-level Jaccard similarity of the two answers is at least 0.5. Words are the
    *sets* of tokens from :func:`normalize_tokens`, so articles are dropped here just as in the
    other metrics (the CUAD reference code keeps them; dropping them changes few scores). Two
    token-less texts count as a match.
    """
    _check_references(references)
    predicted = set(normalize_tokens(prediction))
    for ref in references:
        if _jaccard(predicted, set(normalize_tokens(ref))) >= CUAD_JACCARD_THRESHOLD:
            return 1.0
    return 0.0


def yes_no_label(text: str) -> str | None:
    """Return "yes" or "no" when ``text`` starts with that word, else None.

    Leading characters outside ``[A-Za-z0-9]`` (spaces, quotes, bullets) are skipped, case is
    ignored and the word must end there: "No." and "No, it does not" give "no", "Yes - section 4"
    gives "yes", while "None", "Nothing", "Yesterday" and "" give None.
    """
    tokens = raw_tokens(text)
    if tokens and tokens[0] in _YES_NO:
        return tokens[0]
    return None


_HEDGE = re.compile(r"\b(?:not sure|unsure|uncertain|not certain|no idea"
                    r"|(?:do not|don't|cannot|can't) (?:know|tell|say))\b")


def answer_label(text: str) -> str | None:
    """The yes/no reading of an answer to a yes/no question: its leading "Yes"/"No"
    (:func:`yes_no_label`); else "no" when it says the source is silent ("The document does not
    say"), "yes" when it answers with content (asked "What is the warranty period?" of a yes/no
    category, "twelve months" says there is one); None for an empty or hedging answer ("I am not
    sure"), which is wrong whatever the gold label."""
    label = yes_no_label(text)
    if label is not None or not raw_tokens(text):
        return label
    if is_negative_answer(text):
        return "no"
    return None if _HEDGE.search(text.lower().replace("\u2019", "'")) else "yes"


def is_yes_no_reference(answer: str) -> bool:
    """True when the reference ``answer`` normalises to exactly "yes" or exactly "no"."""
    tokens = normalize_tokens(answer)
    return len(tokens) == 1 and tokens[0] in _YES_NO


def yes_no_reference_label(answer: str) -> str | None:
    """"yes"/"no" when ``answer`` is a bare Yes or No (:func:`is_yes_no_reference`), else None."""
    return yes_no_label(answer) if is_yes_no_reference(answer) else None


def _gold_label(answer: str) -> str:
    """The label of a yes/no reference (see :func:`is_yes_no_reference`)."""
    return normalize_tokens(answer)[0]


def balanced_accuracy(golds: Sequence[str], preds: Sequence[str | None]) -> float:
    """Mean over the classes present in ``golds`` of the recall of that class.

    ``golds`` are labels such as "yes"/"no"; a prediction of None (unparseable answer) is wrong
    for every class. Unlike raw accuracy, always answering the majority class scores 1/k for k
    classes. Returns ``math.nan`` when there are no items.
    """
    if len(golds) != len(preds):
        raise ValueError(f"{len(golds)} gold labels but {len(preds)} predictions")
    if not golds:
        return math.nan
    totals: dict[str, int] = {}
    hits: dict[str, int] = {}
    for gold, pred in zip(golds, preds):
        totals[gold] = totals.get(gold, 0) + 1
        if pred == gold:
            hits[gold] = hits.get(gold, 0) + 1
    recalls = [hits.get(label, 0) / count for label, count in totals.items()]
    return math.fsum(recalls) / len(recalls)


def score_item(prediction: str, references: Sequence[str]) -> dict[str, float]:
    """All per-item metrics of ``prediction`` against ``references``.

    Keys: "exact_match", "token_f1", "rouge_l", "cuad_match". When the first reference is a
    yes/no answer (:func:`is_yes_no_reference`) the item is a yes/no item: the key
    "yes_no_correct" is added and all five values are 1.0 when the prediction's label
    (:func:`answer_label`) equals the gold label, else 0.0, because a right answer with a
    justification ("Yes, the contract contains ...") has little span overlap with "Yes".
    """
    _check_references(references)
    if is_yes_no_reference(references[0]):
        correct = 1.0 if answer_label(prediction) == _gold_label(references[0]) else 0.0
        scores = {name: correct for name in _SPAN_METRICS}
        scores["yes_no_correct"] = correct
        return scores
    return {
        "exact_match": exact_match(prediction, references),
        "token_f1": token_f1(prediction, references),
        "rouge_l": rouge_l(prediction, references),
        "cuad_match": cuad_match(prediction, references),
    }


RETRIEVAL_RECALL = 0.5  # share of a reference's distinct tokens one passage must hold to count as found


def retrieval_hit(passages: Sequence[str], references: Sequence[str]) -> float | None:
    """1.0 when one of the retrieved `passages` holds a reference answer, else 0.0; None when the
    item has no textual reference (a yes/no item whose evidence was not given).

    The references checked are the answer itself, or for a yes/no item only its further references
    (the evidence clause). A passage holds a reference when it contains at least half of the
    reference's distinct normalised tokens: CUAD evidence clauses are often longer than one chunk.
    """
    _check_references(references)
    refs = list(references[1:]) if is_yes_no_reference(references[0]) else list(references)
    wanted = [set(normalize_tokens(r)) for r in refs]
    wanted = [w for w in wanted if w]
    if not wanted:
        return None
    have = [set(normalize_tokens(p)) for p in passages]
    return 1.0 if any(len(w & h) / len(w) >= RETRIEVAL_RECALL for w in wanted for h in have) else 0.0


def _mean(values: Sequence[float]) -> float:
    return math.fsum(values) / len(values) if values else math.nan


def aggregate(items: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Score every item and average the results.

    Each item is ``{"prediction": str, "references": list[str]}``. Returns:

    - "n" and the means over all items of "exact_match", "token_f1", "rouge_l", "cuad_match"
      (yes/no items contribute their label correctness, see :func:`score_item`);
    - over yes/no items: "yes_no_n", "yes_no_accuracy", "yes_no_balanced_accuracy";
    - over the other (extraction) items: "extract_n", "extract_token_f1", "extract_cuad_match" and
      "extract_exact_match" (the answer is the reference span, normalised);
    - "extract_semantic_similarity": over extraction items carrying a "semantic_similarity"
      (embedding cosine of prediction and reference, added by the evaluation stage);
    - "retrieval_n" and "retrieval_hit": over items carrying a "retrieval_hit" (see
      :func:`retrieval_hit`), the share whose retrieved passages held the reference;
    - "macro_score": the mean of yes/no balanced accuracy and extraction token F1 (those defined).
      It is the default primary metric: on CUAD ~80% of yes/no answers are "No", so plain
      accuracy or F1 over all items would reward a model that always says No.

    Counts are ints; every mean over an empty subset is ``math.nan``.
    """
    return summarize(score_items(items))


def score_items(items: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per-item scores (:func:`score_item`); yes/no items also carry their "gold" and predicted "label"."""
    scored: list[dict[str, Any]] = []
    for item in items:
        prediction, references = item["prediction"], item["references"]
        scores: dict[str, Any] = score_item(prediction, references)
        if "yes_no_correct" in scores:
            scores = {**scores, "gold": _gold_label(references[0]), "label": answer_label(prediction)}
        for extra in ("retrieval_hit", "semantic_similarity"):  # computed by the caller (passages, embedder)
            if item.get(extra) is not None:
                scores[extra] = item[extra]
        scored.append(scores)
    return scored


def summarize(scored: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """The aggregates of :func:`aggregate` from already scored items (cheap: the bootstrap resamples these)."""
    yes_no = [s for s in scored if "yes_no_correct" in s]
    extract = [s for s in scored if "yes_no_correct" not in s]
    result: dict[str, float] = {"n": len(scored)}
    for name in _SPAN_METRICS:
        result[name] = _mean([s[name] for s in scored])
    result["yes_no_n"] = len(yes_no)
    result["yes_no_accuracy"] = _mean([s["yes_no_correct"] for s in yes_no])
    result["yes_no_balanced_accuracy"] = balanced_accuracy([s["gold"] for s in yes_no], [s["label"] for s in yes_no])
    result["extract_n"] = len(extract)
    result["extract_token_f1"] = _mean([s["token_f1"] for s in extract])
    result["extract_cuad_match"] = _mean([s["cuad_match"] for s in extract])
    result["extract_exact_match"] = _mean([s["exact_match"] for s in extract])
    result["extract_semantic_similarity"] = _mean([s["semantic_similarity"] for s in extract
                                                    if "semantic_similarity" in s])
    hits = [s["retrieval_hit"] for s in scored if "retrieval_hit" in s]
    result["retrieval_n"] = len(hits)
    result["retrieval_hit"] = _mean(hits)
    parts = [v for v in (result["yes_no_balanced_accuracy"], result["extract_token_f1"]) if not math.isnan(v)]
    result["macro_score"] = _mean(parts)
    return result
