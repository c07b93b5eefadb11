"""Tests for tuneloop.filters: novelty, negative answers, near-duplicates, contamination,
round-trip agreement and diversity measures."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from tuneloop.config import SynthSettings
from tuneloop.filters import (
    NEGATIVE_ANSWER,
    ContaminationFilter,
    NearDuplicateFilter,
    NoveltyFilter,
    answer_problem,
    distinct_n,
    embedding_spread,
    is_negative_answer,
    round_trip_agree,
    support,
)
from tuneloop.metrics import rouge_l


def unit(*xs: float) -> np.ndarray:
    v = np.asarray(xs, dtype=np.float32)
    return v / np.linalg.norm(v)


E1, E2, E3 = unit(1, 0, 0), unit(0, 1, 0), unit(0, 0, 1)
SKEW = unit(1, 1, 1)  # cosine 0.577 with each of E1, E2, E3
HALF = np.asarray([0.5, math.sqrt(0.75), 0.0], dtype=np.float32)  # cosine with E1 is exactly 0.5


# --------------------------------------------------------------------------- novelty, support


def test_novelty_filter_rejects_malformed_duplicate_and_similar_questions():
    novelty = NoveltyFilter(["What law governs the agreement?", "   "], threshold=0.7)
    assert novelty.pool == ["What law governs the agreement?"]
    assert novelty.check("  ", 5, 200) == "empty"
    assert novelty.check("Why?", 5, 200) == "too short"
    assert novelty.check("Why " * 60 + "?", 5, 200) == "too long"
    assert novelty.check("What law governs the agreement", 5, 200) == "not a question (no '?')"
    assert novelty.check("what LAW governs THE agreement ?", 5, 200) == "duplicate"
    assert novelty.check("What law governs the licence agreement?", 5, 200) == "rouge-l >= 0.7 vs an earlier question"
    assert novelty.check("Who may terminate the lease early?", 5, 200) is None
    novelty.add("Who may terminate the lease early?")
    assert novelty.check("Who may terminate the lease early?", 5, 200) == "duplicate"


def test_support_and_answer_problem():
    context = "The Tenant shall pay a security deposit of EUR 10,000."
    assert support("a security deposit of EUR 10,000", context) == 1.0
    assert support("ten thousand", context) == 0.0
    assert support("", context) == 0.0
    assert answer_problem("", context, 1, 100, 0.5) == "answer empty"
    assert answer_problem("x" * 101, context, 1, 100, 0.5) == "answer too long"
    assert answer_problem("Yes, it must.", context, 1, 100, 0.5) is None  # yes/no needs no support
    assert answer_problem("EUR 10,000", context, 1, 100, 0.5) is None
    assert answer_problem("Twelve months' rent", context, 1, 100, 0.5).startswith("answer not supported")


# --------------------------------------------------------------------------- negative answers


@pytest.mark.parametrize(
    "answer",
    [
        NEGATIVE_ANSWER,
        "The document does not say",
        "the excerpts do not say.",
        "Not stated in the document.",
        "The document doesn't specify.",
        "The document doesn\u2019t specify the notice period.",
        "THE PASSAGES ARE SILENT ON THIS POINT.",
        "The provided text does not contain any information about termination.",
        "There is no information about the deposit in the provided excerpts.",
        "This is not mentioned in any of the excerpts.",
        "The context does not explicitly state the term.",
        "The excerpts make no mention of a liability cap.",
        "This cannot be determined from the document.",
        "I cannot find this in the passages.",
        "Not specified.",
        "Unknown",
    ],
)
def test_is_negative_answer_recognises_variants(answer):
    assert is_negative_answer(answer)


@pytest.mark.parametrize(
    "answer",
    [
        "The Licensee may not assign the agreement without consent.",
        "Notice is not required for termination for cause.",
        "No",
        "No, the agreement does not contain a non-compete clause.",
        "The agreement does not specify a liability cap.",  # a fact about the contract, not a refusal
        "The document does not contain a non-compete clause.",  # ditto
        "The price cannot be determined unilaterally by the Supplier.",
        "The source code is not held in escrow.",
        "Not later than 30 days after the invoice date.",
        "sixty (60) days",
        "",
    ],
)
def test_is_negative_answer_leaves_ordinary_answers(answer):
    assert not is_negative_answer(answer)


# --------------------------------------------------------------------------- near-duplicates


@pytest.mark.parametrize("history", [None, np.zeros((0, 3), dtype=np.float32)])
def test_near_duplicate_empty_pool_keeps_everything(history):
    dup = NearDuplicateFilter(history, threshold=0.95)
    assert len(dup) == 0
    assert dup.check(E1) == (None, 0.0)
    dup.add(E1)
    reason, cosine = dup.check(E1)
    assert reason == "near-duplicate (cosine 1.00 >= 0.95)" and cosine == pytest.approx(1.0)
    assert dup.check(E2) == (None, 0.0)


def test_near_duplicate_threshold_is_inclusive():
    dup = NearDuplicateFilter(np.stack([E1, E3]), threshold=0.5)
    reason, cosine = dup.check(HALF)
    assert cosine == 0.5 and reason == "near-duplicate (cosine 0.50 >= 0.50)"
    strict = NearDuplicateFilter(np.stack([E1, E3]), threshold=0.51)
    assert strict.check(HALF) == (None, 0.5)


def test_near_duplicate_pool_grows_and_accepts_row_vectors():
    dup = NearDuplicateFilter(E1, threshold=0.9)  # a single 1-D vector is a one-row history
    rng = np.random.default_rng(0)
    vecs = rng.normal(size=(40, 3)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    for v in vecs:
        dup.add(v.reshape(1, -1))
    assert len(dup) == 41 and dup.pool.shape == (41, 3)
    probe = unit(0.3, -0.2, 0.9)
    expected = float(np.max(np.vstack([E1, vecs]).astype(np.float64) @ probe.astype(np.float64)))
    assert dup.check(probe)[1] == pytest.approx(expected)
    with pytest.raises(ValueError, match="dimensions"):
        dup.check(np.ones(4, dtype=np.float32))


# --------------------------------------------------------------------------- contamination

EVAL = [
    ("What law governs the software licence agreement?", "licence.md"),
    ("How many parking spaces does the Landlord make available to the Tenant?", "lease.md"),
    ("Who are the parties to the agreement?", None),
]
EVAL_VECS = np.stack([E1, E2, E3])


def test_contamination_rouge_rejects_same_document_and_keeps_other_documents():
    filt = ContaminationFilter(EVAL, EVAL_VECS, rouge_threshold=0.6, cosine_threshold=0.85, scope="document")
    question = "Which law governs the software licence agreement?"
    reason, scores = filt.check(question, "licence.md", SKEW)
    assert scores["contamination_rouge"] == pytest.approx(rouge_l(question, [EVAL[0][0]])) and scores[
        "contamination_rouge"
    ] >= 0.6
    assert reason == (
        f"contamination: ROUGE-L {scores['contamination_rouge']:.2f} "
        "vs eval question 'What law governs the software licence agreement?'"
    )
    # The same words on another document: that eval question is not compared at all.
    reason, scores = filt.check(question, "lease.md", SKEW)
    assert reason is None
    assert scores["contamination_rouge"] < 0.6
    # ... but every document is compared with the eval question that has no document.
    reason, _ = filt.check("Who are the parties to the agreement?", "lease.md", E1)
    assert reason is not None and "Who are the parties" in reason


def test_contamination_scope_all_compares_every_eval_question():
    question = "Which law governs the software licence agreement?"
    filt = ContaminationFilter(EVAL, EVAL_VECS, rouge_threshold=0.6, cosine_threshold=0.85, scope="all")
    reason, _ = filt.check(question, "lease.md", E2)
    assert reason is not None and reason.startswith("contamination: ROUGE-L")
    # A synthetic question without a document is compared with everything even under "document".
    doc_scope = ContaminationFilter(EVAL, EVAL_VECS, 0.6, 0.85, scope="document")
    assert doc_scope.candidates(None) == [0, 1, 2]
    assert doc_scope.candidates("lease.md") == [1, 2]
    assert doc_scope.candidates("other.md") == [2]
    assert doc_scope.check(question, None, E2)[0] is not None


def test_contamination_cosine_rejects_and_names_the_question_truncated():
    long_q = "Under which circumstances may the Supplier suspend deliveries to the Buyer without notice?"
    filt = ContaminationFilter([(long_q, "supply.md")], E1, rouge_threshold=0.6, cosine_threshold=0.5, scope="document")
    reason, scores = filt.check("Is a delivery stop allowed?", "supply.md", HALF)  # cosine exactly 0.5: inclusive
    assert scores["contamination_cosine"] == 0.5 and scores["contamination_rouge"] < 0.6
    quoted = reason.split("'", 1)[1].rsplit("'", 1)[0]
    assert reason.startswith("contamination: cosine 0.50 vs eval question '")
    assert len(quoted) == 60 and quoted.endswith("...") and long_q.startswith(quoted[:-3])
    # Below the threshold, or on another document, it is kept.
    assert filt.check("Is a delivery stop allowed?", "supply.md", E2) == (
        None, {"contamination_rouge": scores["contamination_rouge"], "contamination_cosine": 0.0},
    )
    reason, scores = filt.check("Is a delivery stop allowed?", "lease.md", E1)
    assert reason is None and scores == {"contamination_rouge": 0.0, "contamination_cosine": 0.0}


def test_contamination_without_vectors_uses_rouge_only():
    filt = ContaminationFilter(EVAL, None, rouge_threshold=1.0, cosine_threshold=0.01, scope="all")
    reason, scores = filt.check(EVAL[1][0], "lease.md", E2)  # exact copy: ROUGE-L 1.0 >= 1.0
    assert scores == {"contamination_rouge": 1.0, "contamination_cosine": None}
    assert reason.startswith("contamination: ROUGE-L 1.00 vs eval question 'How many parking spaces")
    with_vecs = ContaminationFilter(EVAL, EVAL_VECS, 0.6, 0.85, scope="all")
    assert with_vecs.check("Who signs?", None, None)[1]["contamination_cosine"] is None  # no vector given


def test_contamination_empty_eval_set_and_bad_input():
    empty = ContaminationFilter([], None, 0.6, 0.85, scope="document")
    assert empty.check("What law governs?", "a.md", E1) == (
        None, {"contamination_rouge": 0.0, "contamination_cosine": None},
    )
    with pytest.raises(ValueError, match="vectors"):
        ContaminationFilter(EVAL, EVAL_VECS[:2], 0.6, 0.85, scope="all")
    with pytest.raises(ValueError, match="scope"):
        ContaminationFilter(EVAL, None, 0.6, 0.85, scope="corpus")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- round trip


@pytest.mark.parametrize(
    ("first", "second", "expected"),
    [
        ("Yes", "Yes, the licensor's liability is capped at the fees paid.", (True, 1.0)),
        ("yes.", "YES", (True, 1.0)),
        ("No", "Yes - section 4 allows it.", (False, 0.0)),
        ("No, the document does not mention a non-compete.", "No", (True, 1.0)),  # label before refusal
        (NEGATIVE_ANSWER, "Not stated in the excerpts.", (True, 1.0)),
        ("No", NEGATIVE_ANSWER, (False, 0.0)),
        ("sixty (60) days", "The document doesn't specify.", (False, 0.0)),
        ("sixty (60) days", "60 days", (True, 0.8)),  # F1: [sixty, 60, days] vs [60, days]
        ("the laws of England and Wales", "the State of Delaware", (False, 0.25)),  # only "of" shared
        ("Nothing", "Nothing", (True, 1.0)),  # "Nothing" is no "no" label: plain F1
    ],
)
def test_round_trip_agree(first, second, expected):
    agree, score = round_trip_agree(first, second, min_f1=0.5)
    assert agree is expected[0] and score == pytest.approx(expected[1])


def test_round_trip_f1_threshold_is_inclusive():
    # [a1, b1] vs [a1, c1]: P = R = 1/2, F1 = 0.5.
    assert round_trip_agree("a1 b1", "a1 c1", min_f1=0.5) == (True, 0.5)
    assert round_trip_agree("a1 b1", "a1 c1", min_f1=0.51) == (False, 0.5)


# --------------------------------------------------------------------------- diversity


def test_distinct_n_exact_values():
    texts = ["The cat sat.", "the cat ran"]  # tokens [cat, sat], [cat, ran]
    assert distinct_n(texts, 1) == 0.75  # {cat, sat, ran} / 4
    assert distinct_n(texts, 2) == 1.0  # (cat, sat), (cat, ran)
    assert distinct_n(["x y", "y z", "x y"], 2) == pytest.approx(2 / 3)  # no n-gram spans two texts
    assert distinct_n(texts, 3) == 0.0  # no trigrams
    assert distinct_n([], 1) == 0.0
    with pytest.raises(ValueError):
        distinct_n(texts, 0)


def test_embedding_spread_exact_values():
    assert embedding_spread(np.stack([E1, E2, E1])) == pytest.approx(2 / 3)  # distances 1, 0, 1
    assert embedding_spread(np.stack([E1, -E1])) == pytest.approx(2.0)
    assert embedding_spread(np.stack([E2, E2, E2])) == pytest.approx(0.0, abs=1e-12)
    assert embedding_spread(np.stack([E1, HALF])) == pytest.approx(0.5)
    assert embedding_spread(E1.reshape(1, -1)) is None
    assert embedding_spread(np.zeros((0, 3), dtype=np.float32)) is None
    rng = np.random.default_rng(1)
    vecs = rng.normal(size=(7, 5))
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    brute = np.mean([1 - vecs[i] @ vecs[j] for i, j in itertools.combinations(range(7), 2)])
    assert embedding_spread(vecs.astype(np.float32)) == pytest.approx(brute, abs=1e-6)


# --------------------------------------------------------------------------- the real MiniLM embedder

# Measured cosines under builtin:all-minilm-l6-v2 (CPU, fp32): paraphrases of evaluation questions
# scored 0.47-0.96 (median ~0.81); the first paraphrase below scores 0.81, so the default
# contamination_cosine is 0.80 (at 0.85 it slipped through). The tests read the default.

RECOMMENDED_COSINE = SynthSettings().contamination_cosine


@pytest.fixture
def minilm(real_embedder):
    return real_embedder


@pytest.mark.parametrize(
    ("eval_question", "paraphrase"),
    [
        ("Which state's law governs this agreement?", "Under the laws of which state is this contract governed?"),
        (
            "What law governs the software licence agreement?",
            "Under which country's laws is the software licence agreement governed?",
        ),
        (
            "Within how many days of the invoice date must the Distributor pay?",
            "How long does the Distributor have to pay an invoice?",
        ),
    ],
)
def test_real_embedder_catches_paraphrased_eval_question(minilm, eval_question, paraphrase):
    defaults = SynthSettings()
    unrelated = "How many days' notice is required to terminate?"
    vecs = minilm.embed([eval_question, paraphrase, unrelated])
    assert vecs.dtype == np.float32 and np.allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    filt = ContaminationFilter(
        [(eval_question, "contract.md"), ("Who are the parties?", "other.md")],
        np.stack([vecs[0], minilm.embed(["Who are the parties?"])[0]]),
        rouge_threshold=defaults.contamination_rouge,
        cosine_threshold=RECOMMENDED_COSINE,
        scope="document",
    )
    reason, scores = filt.check(paraphrase, "contract.md", vecs[1])
    print(f"\ncosine {scores['contamination_cosine']:.4f} rouge-l {scores['contamination_rouge']:.3f}: {paraphrase!r}")
    # ROUGE-L alone would keep it; the embedding catches it.
    assert scores["contamination_rouge"] < defaults.contamination_rouge
    assert scores["contamination_cosine"] >= RECOMMENDED_COSINE
    assert reason is not None and reason.startswith("contamination: cosine")
    assert eval_question[:40] in reason

    reason, scores = filt.check(unrelated, "contract.md", vecs[2])
    print(f"cosine {scores['contamination_cosine']:.4f} rouge-l {scores['contamination_rouge']:.3f}: {unrelated!r}")
    assert reason is None and scores["contamination_cosine"] < 0.5


def test_real_embedder_near_duplicates(minilm):
    texts = [
        "What is the governing law?",
        "What's the governing law?",  # a near-duplicate
        "How many days' notice is required to terminate?",
        "How many days' notice is required to renew?",  # same template, different question
    ]
    vecs = minilm.embed(texts)
    threshold = SynthSettings().embed_dup_threshold
    dup = NearDuplicateFilter(None, threshold)
    verdicts = []
    for text, vec in zip(texts, vecs):
        reason, cosine = dup.check(vec)
        print(f"\n{cosine:.4f} {text!r}: {reason}")
        verdicts.append(reason)
        if reason is None:
            dup.add(vec)
    assert verdicts[0] is None and verdicts[2] is None and verdicts[3] is None
    assert verdicts[1] is not None and verdicts[1].startswith("near-duplicate (cosine 0.9")
    assert len(dup) == 3
    spread = embedding_spread(dup.pool)
    assert spread is not None and 0.3 < spread < 1.0
