"""Tests for tuneloop.metrics: reference-based QA metrics."""
from __future__ import annotations

import math

import pytest

from tuneloop.metrics import (
    aggregate,
    answer_label,
    balanced_accuracy,
    cuad_match,
    exact_match,
    is_yes_no_reference,
    normalize_tokens,
    rouge_l,
    score_item,
    token_f1,
    yes_no_label,
)


def test_normalize_tokens_lowercases_strips_punctuation_and_articles():
    assert normalize_tokens("The Seller's  obligations, (a) AN Annex!") == [
        "seller", "s", "obligations", "annex",
    ]
    assert normalize_tokens("") == []
    assert normalize_tokens("  ...  ") == []


@pytest.mark.parametrize(
    "prediction",
    ["The Governing Law.", "governing law", "  GOVERNING, law!! ", "a governing-law"],
)
def test_exact_match_ignores_case_punctuation_and_articles(prediction):
    assert exact_match(prediction, ["governing law"]) == 1.0


def test_exact_match_requires_same_tokens():
    assert exact_match("governing law clause", ["governing law"]) == 0.0
    assert exact_match("law governing", ["governing law"]) == 0.0
    # Any reference may match.
    assert exact_match("New York", ["Delaware", "new york"]) == 1.0


def test_token_f1_partial_overlap_matches_hand_computed_value():
    # pred tokens [cat, sat, on, mat], ref [cat, sat]: common 2, P = 2/4, R = 2/2, F1 = 2/3.
    assert token_f1("The cat sat on the mat", ["a cat sat"]) == pytest.approx(2 / 3)
    # Multiset overlap: pred [cat, cat, cat], ref [cat, dog]: common 1, P = 1/3, R = 1/2,
    # F1 = 2 * (1/6) / (5/6) = 0.4.
    assert token_f1("cat cat cat", ["cat dog"]) == pytest.approx(0.4)


def test_token_f1_takes_best_reference_and_handles_empty():
    assert token_f1("cat sat", ["dog", "cat sat"]) == 1.0
    assert token_f1("cat", ["dog"]) == 0.0
    assert token_f1("", [""]) == 1.0
    assert token_f1("the", ["..."]) == 1.0  # both normalise to no tokens
    assert token_f1("", ["cat"]) == 0.0
    assert token_f1("cat", [""]) == 0.0


def test_metrics_reject_missing_references():
    with pytest.raises(ValueError):
        token_f1("cat", [])
    with pytest.raises(TypeError):
        exact_match("cat", "cat")  # a bare string is not a list of references


def test_rouge_l_identical_and_disjoint():
    text = "The licensee shall not sublicense the software."
    assert rouge_l(text, [text]) == pytest.approx(1.0)
    assert rouge_l("alpha beta gamma", ["delta epsilon zeta"]) == 0.0
    assert rouge_l("alpha beta gamma", ["delta", "alpha beta gamma"]) == pytest.approx(1.0)
    # LCS "a c" (2 tokens) of 3 and 3 tokens: P = R = F = 2/3.
    assert rouge_l("a b c", ["a x c"]) == pytest.approx(2 / 3)


def test_cuad_match_threshold_is_jaccard_half_inclusive():
    ref = " ".join(f"w{i}" for i in range(100))
    exactly_half = " ".join(f"w{i}" for i in range(50))  # |inter| 50, |union| 100
    just_below = exactly_half + " extra"  # |inter| 50, |union| 101
    assert cuad_match(exactly_half, [ref]) == 1.0
    assert cuad_match(just_below, [ref]) == 0.0
    # Small sets: 3/6 is exactly 0.5, 2/5 is below.
    assert cuad_match("one two three", ["one two three four five six"]) == 1.0
    assert cuad_match("one two", ["one two three four five"]) == 0.0
    # Sets, not multisets; best reference wins.
    assert cuad_match("one one one two", ["one two three four"]) == 1.0
    assert cuad_match("one", ["nine", "one"]) == 1.0


@pytest.mark.parametrize(
    ("text", "label"),
    [
        ("No.", "no"),
        ("No, it does not", "no"),
        ("no", "no"),
        ("Yes - section 4", "yes"),
        ("  **YES**, the contract says so", "yes"),
        ("None of the above", None),
        ("Nothing", None),
        ("Yesterday", None),
        ("The answer is yes", None),
        ("", None),
    ],
)
def test_yes_no_label(text, label):
    assert yes_no_label(text) == label


def test_is_yes_no_reference():
    assert is_yes_no_reference("Yes")
    assert is_yes_no_reference(" no. ")
    assert not is_yes_no_reference("No, see section 4")
    assert not is_yes_no_reference("None")
    assert not is_yes_no_reference("")


def test_balanced_accuracy_punishes_majority_guessing():
    golds = ["no"] * 8 + ["yes"] * 2
    preds = ["no"] * 10
    raw_accuracy = sum(g == p for g, p in zip(golds, preds)) / len(golds)
    assert raw_accuracy == pytest.approx(0.8)
    assert balanced_accuracy(golds, preds) == pytest.approx(0.5)


def test_balanced_accuracy_unparseable_is_wrong_and_empty_is_nan():
    assert balanced_accuracy(["yes", "no"], [None, "no"]) == pytest.approx(0.5)
    assert balanced_accuracy(["yes", "yes"], ["yes", None]) == pytest.approx(0.5)
    assert math.isnan(balanced_accuracy([], []))
    with pytest.raises(ValueError):
        balanced_accuracy(["yes"], [])


def test_score_item_yes_no_uses_label_not_span_overlap():
    scores = score_item("Yes, the contract contains a non-compete clause.", ["Yes"])
    assert scores == {
        "exact_match": 1.0, "token_f1": 1.0, "rouge_l": 1.0, "cuad_match": 1.0,
        "yes_no_correct": 1.0,
    }
    wrong = score_item("No.", ["yes"])
    assert set(wrong.values()) == {0.0}
    assert score_item("Nothing here", ["no"])["yes_no_correct"] == 0.0


def test_score_item_extraction_has_span_metrics_only():
    scores = score_item("The cat sat on the mat", ["a cat sat"])
    assert set(scores) == {"exact_match", "token_f1", "rouge_l", "cuad_match"}
    assert scores["exact_match"] == 0.0
    assert scores["token_f1"] == pytest.approx(2 / 3)
    assert scores["cuad_match"] == 1.0  # Jaccard {cat, sat} / {cat, sat, on, mat} = 0.5


def test_aggregate_splits_yes_no_and_extraction():
    items = [
        {"prediction": "No, it does not.", "references": ["No"]},  # right
        {"prediction": "No.", "references": ["no"]},  # right
        {"prediction": "No.", "references": ["Yes"]},  # wrong
        {"prediction": "Delaware law", "references": ["Delaware law"]},  # EM 1, F1 1
        {"prediction": "cat cat cat", "references": ["cat dog"]},  # EM 0, F1 0.4, Jaccard 0.5
    ]
    result = aggregate(items)
    assert result["n"] == 5
    assert result["yes_no_n"] == 3
    assert result["extract_n"] == 2
    assert result["yes_no_accuracy"] == pytest.approx(2 / 3)
    # recall(no) = 1, recall(yes) = 0.
    assert result["yes_no_balanced_accuracy"] == pytest.approx(0.5)
    assert result["extract_token_f1"] == pytest.approx((1.0 + 0.4) / 2)
    assert result["extract_cuad_match"] == pytest.approx(1.0)
    assert result["extract_exact_match"] == pytest.approx(0.5)  # the span itself, over extraction items only
    assert result["exact_match"] == pytest.approx((1 + 1 + 0 + 1 + 0) / 5)
    assert result["token_f1"] == pytest.approx((1 + 1 + 0 + 1 + 0.4) / 5)
    assert result["cuad_match"] == pytest.approx((1 + 1 + 0 + 1 + 1) / 5)


def test_aggregate_empty_subsets_are_nan():
    only_extract = aggregate([{"prediction": "Delaware", "references": ["Delaware"]}])
    assert only_extract["yes_no_n"] == 0
    assert math.isnan(only_extract["yes_no_accuracy"])
    assert math.isnan(only_extract["yes_no_balanced_accuracy"])
    assert only_extract["extract_token_f1"] == 1.0

    only_yes_no = aggregate([{"prediction": "yes", "references": ["yes"]}])
    assert only_yes_no["extract_n"] == 0
    assert math.isnan(only_yes_no["extract_token_f1"])
    assert math.isnan(only_yes_no["extract_cuad_match"])
    assert only_yes_no["yes_no_balanced_accuracy"] == 1.0

    empty = aggregate([])
    assert empty["n"] == 0
    for key in ("exact_match", "token_f1", "rouge_l", "cuad_match", "yes_no_accuracy",
                "yes_no_balanced_accuracy", "extract_token_f1", "extract_cuad_match", "extract_exact_match"):
        assert math.isnan(empty[key]), key


def test_retrieval_hit_finds_the_reference_in_a_passage():
    from tuneloop.metrics import retrieval_hit

    passages = ["This Agreement is governed by the laws of the State of Delaware.", "Fees are due monthly."]
    assert retrieval_hit(passages, ["Delaware"]) == 1.0
    assert retrieval_hit(passages, ["New York"]) == 0.0
    # a long evidence clause counts when one passage holds half of its distinct tokens
    assert retrieval_hit(passages, ["governed by the laws of the State of Delaware, without regard to "
                                    "conflicts of law principles"]) == 1.0
    # yes/no: only the evidence references are looked for; none given -> undefined
    assert retrieval_hit(passages, ["Yes"]) is None
    assert retrieval_hit(passages, ["No", "Fees are due monthly"]) == 1.0
    assert retrieval_hit([], ["Delaware"]) == 0.0


def test_aggregate_averages_retrieval_hits_over_items_that_have_them():
    items = [{"prediction": "Delaware", "references": ["Delaware"], "retrieval_hit": 1.0},
             {"prediction": "No", "references": ["No"], "retrieval_hit": None},
             {"prediction": "Ohio", "references": ["Texas"], "retrieval_hit": 0.0}]
    result = aggregate(items)
    assert result["retrieval_n"] == 2 and result["retrieval_hit"] == 0.5
    assert math.isnan(aggregate(items[1:2])["retrieval_hit"])


def test_free_text_answers_to_yes_no_questions_are_read_not_failed():
    assert answer_label("No, it may not be assigned") == "no"
    assert answer_label("The document does not say.") == "no"
    assert answer_label("twelve (12) months from delivery") == "yes"
    assert answer_label("  ") is None
    assert answer_label("I am not sure.") is None and answer_label("I'm uncertain about this") is None
    assert score_item("twelve (12) months from delivery", ["Yes"])["yes_no_correct"] == 1.0
    assert score_item("The excerpts do not mention a warranty.", ["Yes"])["yes_no_correct"] == 0.0
