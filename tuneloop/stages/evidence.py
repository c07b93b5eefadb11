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

Questions answered in words work the same way (`evidence_sentences`, with
`transfer.evidence_spans`): the experts' evidence spans of a seed question are the anchors; in the
documents of the highest `evidence_span_share` of that question's scores (and above the
`evidence_span_floor` quantile of all of them), the document's sentence closest to the anchors
and the question is the candidate answer. `stages/transfer.py` keeps it only when that chunk
is also among the passages the question itself retrieves (the verifier: two signals, the
evidence's meaning and the question's words, point at the same place), so the training prompt
holds the sentence the student learns to copy. Measured on CUAD dev (14 extraction seeds with
evidence, 466 pairs; docs/benchmarks.md): 54 sentences kept, token F1 0.753 against the lawyers'
answers and evidence spans; trained on, they did not lift the student's extraction F1, so
`evidence_spans` is off by default.

On CUAD dev (`bench/label_quality.py` prints the measurement) this orders documents far better than
the 135M student's own Yes/No preference (AUC 0.67 pooled, 0.8-0.9 for clauses such as insurance,
anti-assignment or caps on liability, against 0.53 for the base model's first-token margin), and its
"No" labels are the more precise.
"""
from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

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


Scores = Sequence[float | None]
Population = tuple[Sequence[tuple[str, str]], Scores]  # the pairs (and scores) the shares are taken of


def evidence_labels(pairs: Sequence[tuple[str, str]], scores: Scores, settings: TransferSettings,
                    population: Population | None = None) -> list[str | None]:
    """"Yes", "No" or None (no label) per (question, document) pair, from its anchor score.

    The shares are of `population` (default: `pairs` themselves): pass every pair the seed
    questions could be asked of, labelled earlier or not, so that the cuts stay where they were
    in later cycles; taken of the pairs left unlabelled, each cycle would label the next band of
    the pairs in between (measured on CUAD: label precision 0.82 in cycle 1, 0.71 in cycle 2)."""
    high = top_share(pairs, scores, settings.evidence_yes_share, settings.evidence_yes_floor, population)
    negated = (population[0], _negated(population[1])) if population is not None else None
    low = top_share(pairs, _negated(scores), settings.evidence_no_share, 0.0, negated)
    return [NO if is_low else YES if is_high else None for is_low, is_high in zip(low, high)]


def _negated(scores: Scores) -> list[float | None]:
    return [-s if s is not None else None for s in scores]


def top_share(pairs: Sequence[tuple[str, str]], scores: Scores, share: float, floor_quantile: float,
              population: Population | None = None) -> list[bool]:
    """Whether each pair's score is in the highest `share` of its question's scores and at least
    the `floor_quantile` quantile of all scores (None: never); shares of `population`, by default
    of `pairs` themselves."""
    ref_pairs, ref_scores = population if population is not None else (pairs, scores)
    known = [s for s in ref_scores if s is not None]
    if not known or share <= 0:
        return [False] * len(pairs)
    floor = float(np.quantile(known, floor_quantile))
    by_question: dict[str, list[float]] = defaultdict(list)
    for (question, _), s in zip(ref_pairs, ref_scores):
        if s is not None:
            by_question[question_key(question, None)[0]].append(s)
    cut = {q: float(np.quantile(v, 1 - share)) for q, v in by_question.items()}
    return [s is not None and (q := question_key(question, None)[0]) in cut and s >= cut[q] and s >= floor
            for (question, _), s in zip(pairs, scores)]


def span_anchors(seeds: Sequence[Example]) -> dict[str, list[str]]:
    """Question (normalised words) -> the evidence spans of the seeds that answered it in words."""
    out: dict[str, list[str]] = defaultdict(list)
    for e in seeds:
        if not metrics.is_yes_no_reference(e.answer):
            out[question_key(e.question, None)[0]].extend(references(e)[1:])
    return {q: spans for q, spans in out.items() if spans}


@dataclass(frozen=True)
class EvidenceSentence:
    chunk_id: int  # the chunk holding the sentence
    sentence: str  # the document's sentence closest to the anchors: the candidate answer
    similarity: float  # the chunk's cosine to the anchors (the document's score)


def evidence_sentences(retriever: Retriever, pairs: Sequence[tuple[str, str]], anchors: dict[str, list[str]],
                       settings: TransferSettings,
                       population: Sequence[tuple[str, str]] | None = None) -> list[EvidenceSentence | None]:
    """Per (question, document) pair: the candidate answer of a document whose score is in the
    highest `evidence_span_share` of its question's (see the module docstring), else None. The
    sentence is looked for in every chunk of the document (a chunk holds several clauses, so the
    closest chunk does not always hold the closest sentence), by its cosine to the anchors plus its
    cosine to the question (the anchors alone confuse neighbouring clauses: MiniLM puts "Neither
    party may assign ..." closer to a governing-law clause than "This Agreement is governed by the
    laws of New South Wales"); each document's sentences are embedded once. The shares are of
    `population` (see `evidence_labels`)."""
    embedder = retriever.embedder
    if embedder is None or not anchors:
        return [None] * len(pairs)
    vectors = {q: _unit(embedder.embed(spans)) for q, spans in anchors.items()}
    reference = list(population) if population is not None else list(pairs)
    score_of = {}  # each distinct pair scored once: `pairs` are normally part of `population`
    for question, document in dict.fromkeys([*reference, *pairs]):
        k = question_key(question, None)[0]
        score_of[question, document] = retriever.index.best_similarity(vectors[k], document) if k in vectors else None
    scores = [score_of[pair] for pair in pairs]
    chosen = top_share(pairs, scores, settings.evidence_span_share, settings.evidence_span_floor,
                       (reference, [score_of[pair] for pair in reference]))
    by_document: dict[str, tuple[list[tuple[int, str]], np.ndarray]] = {}
    by_question: dict[str, np.ndarray] = {}
    out: list[EvidenceSentence | None] = []
    for (question, document), similarity, keep in zip(pairs, scores, chosen):
        if not keep or similarity is None:
            out.append(None)
            continue
        if document not in by_document:
            found = [(p.chunk_id, t) for p in retriever.passages.values() if p.document == document
                     for t in split_sentences(p.text)]
            by_document[document] = found, _unit(embedder.embed([t for _, t in found])) if found else np.zeros((0, 1))
        found, sentence_vectors = by_document[document]
        if not found:
            out.append(None)
            continue
        if question not in by_question:
            by_question[question] = _unit(embedder.embed([question]))[0]
        to_anchors = (sentence_vectors @ vectors[question_key(question, None)[0]].T).max(axis=1)
        best = int(np.argmax(to_anchors + sentence_vectors @ by_question[question]))
        out.append(EvidenceSentence(found[best][0], found[best][1], similarity))
    return out


_SENTENCE_BREAK = re.compile(r"(?<=[.;:!?])\s+|\n+")


def split_sentences(text: str) -> list[str]:
    """The sentences (and clauses ending in ";" or ":") of a passage with at least three words."""
    return [s.strip() for s in _SENTENCE_BREAK.split(text) if len(s.split()) >= 3]


def _unit(vectors) -> np.ndarray:
    v = np.asarray(vectors, dtype=np.float32)
    return v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
