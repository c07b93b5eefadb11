"""Filters and diversity measures for synthetic (self-instruct) Q/A data.

Everything here is pure: no model calls, no I/O. Embedding vectors are the rows produced by
``Embedder.embed``: float32, L2-normalised, so a dot product is a cosine similarity. Dot products
are taken in float64 so that thresholds compare reproducibly.

- :class:`NoveltyFilter`, :func:`support`, :func:`answer_problem`: lexical question/answer checks.
- :class:`NearDuplicateFilter`: a question too close (cosine) to an earlier one.
- :class:`ContaminationFilter`: a question too close to an evaluation question, by ROUGE-L (the
  n-gram measure) or by cosine (catches paraphrases that share few words).
- :func:`is_negative_answer`, :data:`NEGATIVE_ANSWER`: the "the document does not say" answer.
- :func:`round_trip_agree`: do two answers to one question agree?
- :func:`distinct_n`, :func:`embedding_spread`: diversity of a set of questions.

Every threshold is inclusive: a score equal to the threshold rejects.
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Literal

import numpy as np

from tuneloop.metrics import is_yes_no_reference, normalize_tokens, rouge_l, token_f1
from tuneloop.negative import NEGATIVE_ANSWER, is_negative_answer

__all__ = [
    "NEGATIVE_ANSWER",
    "ContaminationFilter",
    "NearDuplicateFilter",
    "NoveltyFilter",
    "answer_problem",
    "distinct_n",
    "embedding_spread",
    "is_negative_answer",
    "round_trip_agree",
    "support",
]


_QUOTE_SHOWN = 60  # characters of an evaluation question shown in a contamination reason


# --------------------------------------------------------------------------- lexical filters


class NoveltyFilter:
    """Self-Instruct's novelty rule: reject a question whose ROUGE-L with any earlier one is >= threshold."""

    def __init__(self, history: Iterable[str], threshold: float):
        self.threshold = threshold
        self.pool: list[str] = [q for q in history if q.strip()]
        self.seen = {" ".join(normalize_tokens(q)) for q in self.pool}

    def check(self, question: str, min_chars: int, max_chars: int) -> str | None:
        """The reason to reject `question`, or None when it is acceptable."""
        if not question.strip():
            return "empty"
        if len(question) < min_chars:
            return "too short"
        if len(question) > max_chars:
            return "too long"
        if not question.rstrip().endswith("?"):
            return "not a question (no '?')"
        if " ".join(normalize_tokens(question)) in self.seen:
            return "duplicate"
        if self.pool and rouge_l(question, self.pool) >= self.threshold:
            return f"rouge-l >= {self.threshold} vs an earlier question"
        return None

    def add(self, question: str) -> None:
        self.pool.append(question)
        self.seen.add(" ".join(normalize_tokens(question)))


def support(answer: str, context: str) -> float:
    """Share of the answer's words that occur in the context (a cheap lexical grounding check)."""
    words = normalize_tokens(answer)
    if not words:
        return 0.0
    ctx = set(normalize_tokens(context))
    return sum(w in ctx for w in words) / len(words)


def answer_problem(answer: str, context: str, min_chars: int, max_chars: int, min_support: float) -> str | None:
    """Why a synthetic answer is unusable, or None. Yes/No answers need no lexical support."""
    if len(answer) < min_chars:
        return "answer empty"
    if len(answer) > max_chars:
        return "answer too long"
    if is_yes_no_reference(answer.split(",")[0].split(".")[0]):
        return None
    if support(answer, context) < min_support:
        return f"answer not supported by its passages (< {min_support:.0%} of words)"
    return None


# --------------------------------------------------------------------------- embedding filters


def _as_matrix(vecs: np.ndarray | None, name: str) -> np.ndarray | None:
    """``vecs`` as a 2-D float32 array (None stays None); a 1-D vector becomes one row."""
    if vecs is None:
        return None
    arr = np.asarray(vecs, dtype=np.float32)
    if arr.ndim == 1:
        arr = arr.reshape(1, -1)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array of row vectors, got shape {arr.shape}")
    return arr


def _as_vector(vec: np.ndarray, dim: int | None) -> np.ndarray:
    """One embedding (shape (d,) or (1, d)) as a float64 vector, checked against ``dim``."""
    arr = np.asarray(vec, dtype=np.float64)
    if arr.ndim == 2 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 1:
        raise ValueError(f"expected one vector, got shape {np.shape(vec)}")
    if dim is not None and arr.shape[0] != dim:
        raise ValueError(f"vector has {arr.shape[0]} dimensions, the pool has {dim}")
    return arr


class NearDuplicateFilter:
    """Reject a question whose embedding has cosine >= ``threshold`` with any earlier question.

    ``history`` holds the embeddings (rows) of questions already accepted; None or an empty array
    is an empty pool. Vectors must be L2-normalised (as ``Embedder.embed`` returns them).
    """

    def __init__(self, history: np.ndarray | None, threshold: float):
        self.threshold = threshold
        pool = _as_matrix(history, "history")
        if pool is None or pool.shape[0] == 0:
            self._buf = np.zeros((0, 0 if pool is None else pool.shape[1]), dtype=np.float32)
            self._n = 0
            self._dim: int | None = None if pool is None or pool.shape[1] == 0 else pool.shape[1]
        else:
            self._buf = pool.copy()
            self._n = pool.shape[0]
            self._dim = pool.shape[1]

    def __len__(self) -> int:
        return self._n

    @property
    def pool(self) -> np.ndarray:
        """The vectors in the pool, one per row (a view: do not modify)."""
        return self._buf[: self._n]

    def max_cosine(self, vec: np.ndarray) -> float:
        """Highest cosine of ``vec`` with the pool; 0.0 for an empty pool."""
        v = _as_vector(vec, self._dim)
        if self._n == 0:
            return 0.0
        return float(np.max(self.pool.astype(np.float64) @ v))

    def check(self, vec: np.ndarray) -> tuple[str | None, float]:
        """``(reason, max_cosine)``: reason is e.g. "near-duplicate (cosine 0.97 >= 0.95)", else None."""
        best = self.max_cosine(vec)
        if self._n and best >= self.threshold:
            return f"near-duplicate (cosine {best:.2f} >= {self.threshold:.2f})", best
        return None, best

    def add(self, vec: np.ndarray) -> None:
        """Put ``vec`` in the pool (amortised O(d))."""
        v = _as_vector(vec, self._dim).astype(np.float32)
        if self._dim is None:
            self._dim = v.shape[0]
            self._buf = np.zeros((16, self._dim), dtype=np.float32)
        if self._n == self._buf.shape[0]:
            grown = np.zeros((max(16, 2 * self._n), self._dim), dtype=np.float32)
            grown[: self._n] = self._buf[: self._n]
            self._buf = grown
        self._buf[self._n] = v
        self._n += 1


def _shorten(text: str, limit: int = _QUOTE_SHOWN) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3].rstrip() + "..."


class ContaminationFilter:
    """Reject a synthetic question that is (close to) an evaluation question.

    ``eval_items`` are the evaluation set's ``(question, document or None)``; ``eval_vecs``, when
    given, their embeddings in the same order (L2-normalised rows). A synthetic question is
    compared with the evaluation questions in scope:

    - ``"document"``: those on the same document (exact string match) and those with no document.
      A synthetic question with no document is compared with every evaluation question.
    - ``"all"``: every evaluation question.

    It is rejected when its ROUGE-L with one of them is >= ``rouge_threshold`` (the n-gram
    overlap check), or when the cosine of the embeddings is >= ``cosine_threshold`` (catches
    paraphrases that share few words). The cosine check runs only when both ``eval_vecs`` and the
    question's vector are given.
    """

    def __init__(
        self,
        eval_items: Sequence[tuple[str, str | None]],
        eval_vecs: np.ndarray | None,
        rouge_threshold: float,
        cosine_threshold: float,
        scope: Literal["document", "all"] = "document",
    ):
        if scope not in ("document", "all"):
            raise ValueError(f"scope must be 'document' or 'all', not {scope!r}")
        self.questions = [q for q, _ in eval_items]
        self.documents = [d for _, d in eval_items]
        self.vecs = _as_matrix(eval_vecs, "eval_vecs")
        if self.vecs is not None and self.vecs.shape[0] != len(self.questions):
            raise ValueError(f"{len(self.questions)} evaluation questions but {self.vecs.shape[0]} vectors")
        self.rouge_threshold = rouge_threshold
        self.cosine_threshold = cosine_threshold
        self.scope = scope
        self._by_document: dict[str, list[int]] = {}
        self._no_document: list[int] = []
        for i, doc in enumerate(self.documents):
            if doc is None:
                self._no_document.append(i)
            else:
                self._by_document.setdefault(doc, []).append(i)

    def candidates(self, document: str | None) -> list[int]:
        """Indices of the evaluation questions compared with a question on ``document``."""
        if self.scope == "all" or document is None:
            return list(range(len(self.questions)))
        return sorted(self._by_document.get(document, []) + self._no_document)

    def check(
        self, question: str, document: str | None, vec: np.ndarray | None = None
    ) -> tuple[str | None, dict[str, float | None]]:
        """``(reason or None, scores)``.

        ``scores`` has "contamination_rouge" (max ROUGE-L over the compared evaluation questions,
        0.0 when none) and "contamination_cosine" (max cosine, 0.0 when none compared, None when
        there are no vectors to compare).
        """
        idx = self.candidates(document)
        rouge_best, rouge_at = 0.0, -1
        for i in idx:
            score = rouge_l(question, [self.questions[i]])
            if score > rouge_best:
                rouge_best, rouge_at = score, i
        cos_best: float | None = None
        cos_at = -1
        if self.vecs is not None and vec is not None:
            v = _as_vector(vec, self.vecs.shape[1])
            cos_best = 0.0
            if idx:
                sims = self.vecs[idx].astype(np.float64) @ v
                k = int(np.argmax(sims))
                cos_best, cos_at = float(sims[k]), idx[k]
        scores: dict[str, float | None] = {"contamination_rouge": rouge_best, "contamination_cosine": cos_best}
        if rouge_at >= 0 and rouge_best >= self.rouge_threshold:
            quoted = _shorten(self.questions[rouge_at])
            return f"contamination: ROUGE-L {rouge_best:.2f} vs eval question '{quoted}'", scores
        if cos_at >= 0 and cos_best is not None and cos_best >= self.cosine_threshold:
            quoted = _shorten(self.questions[cos_at])
            return f"contamination: cosine {cos_best:.2f} vs eval question '{quoted}'", scores
        return None, scores


# --------------------------------------------------------------------------- round trip

_LEAD_CLAUSE = re.compile(r"[,.;:!?()\-\u2013\u2014]")


def _lead_label(text: str) -> str | None:
    """"yes"/"no" when the answer's leading clause is exactly that word ("Yes", "No, it ...")."""
    lead = _LEAD_CLAUSE.split(text.strip(), maxsplit=1)[0]
    if is_yes_no_reference(lead):
        return normalize_tokens(lead)[0]
    return None


def round_trip_agree(first: str, second: str, min_f1: float) -> tuple[bool, float]:
    """Whether two answers to one question agree, and the agreement score in [0, 1].

    - Both yes/no answers (the leading clause is exactly "yes" or "no", so "Yes, clause 4 ..."
      counts as "yes"): agree iff the labels are equal (score 1.0 or 0.0).
    - Both negative (:func:`is_negative_answer`): agree, 1.0. Exactly one negative: disagree, 0.0.
    - Otherwise: score = token F1 (:mod:`tuneloop.metrics`); agree iff score >= ``min_f1``.

    A yes/no answer is read as its label before the negative check: "No, the document does not
    mention a non-compete" is a "no".
    """
    label_a, label_b = _lead_label(first), _lead_label(second)
    if label_a is not None and label_b is not None:
        return (True, 1.0) if label_a == label_b else (False, 0.0)
    neg_a = label_a is None and is_negative_answer(first)
    neg_b = label_b is None and is_negative_answer(second)
    if neg_a and neg_b:
        return True, 1.0
    if neg_a or neg_b:
        return False, 0.0
    score = token_f1(first, [second])
    return score >= min_f1, score


# --------------------------------------------------------------------------- diversity


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Distinct n-grams / total n-grams over all ``texts`` (0.0 when there are none).

    Tokens come from :func:`tuneloop.metrics.normalize_tokens`; n-grams do not cross text
    boundaries. 1.0 means no n-gram repeats anywhere in the set.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, not {n}")
    total = 0
    seen: set[tuple[str, ...]] = set()
    for text in texts:
        tokens = normalize_tokens(text)
        for i in range(len(tokens) - n + 1):
            seen.add(tuple(tokens[i : i + n]))
            total += 1
    return len(seen) / total if total else 0.0


def embedding_spread(vecs: np.ndarray) -> float | None:
    """Mean cosine distance (1 - cosine) over all distinct pairs of rows; None for fewer than 2.

    Rows must be L2-normalised. 0.0 means all rows are identical; unrelated sentences under MiniLM
    give about 0.7-0.9. O(n * d): the sum over pairs comes from the norm of the sum of the rows.
    """
    arr = _as_matrix(vecs, "vecs")
    assert arr is not None
    n = arr.shape[0]
    if n < 2:
        return None
    rows = arr.astype(np.float64)
    total = rows.sum(axis=0)
    pair_dots = (float(total @ total) - float(np.einsum("ij,ij->", rows, rows))) / 2.0
    pairs = n * (n - 1) / 2.0
    return 1.0 - pair_dots / pairs


def copied_span(answer: str, passages: Sequence[str]) -> str | None:
    """The passage text whose words are exactly the answer's words (lowercase letters and digits,
    articles included), in the document's own case and punctuation; None when the answer is not a
    contiguous span of one passage."""
    words = _WORDS.findall(answer.lower())
    if not words:
        return None
    for text in passages:
        span = _find_span(words, text)
        if span is not None:
            return span
    return None


_WORDS = re.compile(r"[a-z0-9]+")


def _find_span(words: list[str], text: str) -> str | None:
    tokens = [(m.start(), m.end(), m.group(0)) for m in _WORDS.finditer(text.lower())]
    n = len(words)
    for i in range(len(tokens) - n + 1):
        if tokens[i][2] == words[0] and [t[2] for t in tokens[i:i + n]] == words:
            return text[tokens[i][0]:tokens[i + n - 1][1]]
    return None
