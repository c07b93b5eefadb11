"""Evidence-anchored yes/no labels for transferred questions (part of `stages/transfer.py`).

When experts answered a yes/no question "Yes" and highlighted the clause that says so
(`references`), that clause is an anchor: in another document, a passage very like it suggests the
answer is Yes there too, and a document whose closest passage is far from it suggests No. The
score of a document is the best cosine between the anchor clauses and the document's chunks (the
retrieval index's own dense vectors). Scores are compared *within* one question, across the
documents it is asked of, because how similar a clause must be depends on the clause:

* "No" for the documents in the lowest `evidence_no_share` of that question's scores;
* "Yes" for those in the highest `evidence_yes_share`, and only when the score is also in the top
  `1 - evidence_yes_floor` of all evidence scores of the pass (a question whose best match is
  still a poor match gets no "Yes");
* no label in between: those go to the labeller of `stages/transfer.py` (the champion student,
  once its own yes/no decisions are accurate enough).

On CUAD dev (`bench/label_quality.py` prints the measurement) this orders documents far better than
the 135M student's own Yes/No preference (AUC 0.67 pooled, 0.8-0.9 for clauses such as insurance,
anti-assignment or caps on liability, against 0.53 for the base model's first-token margin), and its
"No" labels are the more precise.
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import numpy as np

from tuneloop import metrics
from tuneloop.config import TransferSettings
from tuneloop.evalsets import references
from tuneloop.programs.rag import Retriever
from tuneloop.splits import question_key
from tuneloop.store import Example

YES, NO = "Yes", "No"


def anchor_clauses(seeds: Sequence[Example]) -> dict[str, list[str]]:
    """Question (normalised words) -> the evidence spans of the seeds that answered it "Yes"."""
    out: dict[str, list[str]] = defaultdict(list)
    for e in seeds:
        if metrics.yes_no_reference_label(e.answer) == "yes":
            out[question_key(e.question, None)[0]].extend(references(e)[1:])
    return {q: spans for q, spans in out.items() if spans}


def similarity_scores(retriever: Retriever, pairs: Sequence[tuple[str, str]],
                      anchors: dict[str, list[str]]) -> list[float | None]:
    """The anchor similarity of each (question, document) pair (None: no anchor or no dense index)."""
    embedder = retriever.embedder
    if embedder is None:
        return [None] * len(pairs)
    vectors = {q: embedder.embed(spans) for q, spans in anchors.items()}
    out: list[float | None] = []
    for question, document in pairs:
        q = question_key(question, None)[0]
        out.append(retriever.index.best_similarity(vectors[q], document) if q in vectors else None)
    return out


def evidence_labels(pairs: Sequence[tuple[str, str]], scores: Sequence[float | None],
                    settings: TransferSettings) -> list[str | None]:
    """"Yes", "No" or None (no label) per (question, document) pair, from its anchor score."""
    known = [s for s in scores if s is not None]
    if not known:
        return [None] * len(pairs)
    floor = float(np.quantile(known, settings.evidence_yes_floor))
    by_question: dict[str, list[float]] = defaultdict(list)
    for (question, _), s in zip(pairs, scores):
        if s is not None:
            by_question[question_key(question, None)[0]].append(s)
    no_share, yes_share = settings.evidence_no_share, settings.evidence_yes_share
    cuts = {q: (float(np.quantile(v, no_share)), float(np.quantile(v, 1 - yes_share))) for q, v in by_question.items()}
    labels: list[str | None] = []
    for (question, _), s in zip(pairs, scores):
        if s is None:
            labels.append(None)
            continue
        low, high = cuts[question_key(question, None)[0]]
        labels.append(NO if s <= low else YES if s >= high and s >= floor else None)
    return labels
