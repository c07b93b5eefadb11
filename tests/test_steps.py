"""The cycle steps' typed results (tuneloop/steps.py): stored JSON keys, old rows, unknown keys."""
import math

import pytest

from tuneloop import loop
from tuneloop.errors import StateError
from tuneloop.steps import (
    RESULT_TYPES,
    EvalStepResult,
    FeedbackStepResult,
    GateStepResult,
    RoutedCounts,
    SelectStepResult,
    StepResult,
    step_result,
    to_row,
)


def test_every_step_has_a_result_type():
    assert set(RESULT_TYPES) == set(loop.STEPS) == set(loop.STEP_FUNCTIONS)


def test_a_skipped_step_stores_only_its_reason_and_what_it_set():
    assert to_row(GateStepResult(skipped="why")) == {"skipped": "why"}
    assert to_row(SelectStepResult(skipped="no dev set", candidate="v2")) == {"skipped": "no dev set",
                                                                             "candidate": "v2"}


def test_a_row_stored_before_the_typed_results_reads_back_with_defaults():
    # a feedback row as loop.py stored it as a plain dict (no added_dev: no dev split routed)
    old = {"routed": {"pairs_added": 9, "pairs_updated": 0, "pairs_superseded": 0, "rewards_added": 1,
                      "rewards_updated": 0, "rewards_superseded": 0},
           "corrections": 4, "approvals": 2, "added_train": 5, "added_eval": 1, "already_examples": 0}
    r = step_result("feedback", old)
    assert isinstance(r, FeedbackStepResult) and r.skipped is None and r.error is None
    assert (r.routed.pairs_added, r.added_train, r.added_dev, r.examples_added()) == (9, 5, None, 6)
    assert to_row(r) == old  # written back unchanged
    sparse = step_result("feedback", {"added_eval": 2})  # keys missing from an old row read as their default
    assert (sparse.routed, sparse.added_train, sparse.examples_added()) == (None, None, 2)
    assert step_result("feedback", {"skipped": "no human feedback yet"}).examples_added() is None


def test_unknown_keys_are_kept_and_written_back():
    row = {"version": "v3", "optimizer": "BootstrapFewShot", "program": "p", "a_newer_key": [1, 2]}
    r = step_result("prompts", row)
    assert r.version == "v3" and r.model_extra == {"a_newer_key": [1, 2]} and to_row(r) == row
    other = step_result("a-step-of-a-newer-version", {"x": 1})
    assert type(other) is StepResult and to_row(other) == {"x": 1}


def test_eval_results_are_keyed_by_version_name():
    row = {"v1": {"macro_score": 0.5, "n": 3}, "v2": {"macro_score": 0.75, "n": 3}}
    r = step_result("eval", row)
    assert isinstance(r, EvalStepResult) and r.versions() == row and to_row(r) == row
    assert to_row(EvalStepResult(**row)) == row


def test_a_failed_step_and_not_a_number_are_stored_as_before():
    assert to_row(RESULT_TYPES["eval"](error="no documents")) == {"error": "no documents"}
    stored = to_row(SelectStepResult(candidate="v2", dev_scores={"v1": float("nan")}, dev_n=0))
    assert math.isnan(stored["dev_scores"]["v1"])  # NaN is stored as NaN (SQLAlchemy's JSON), not null
    assert to_row(FeedbackStepResult(routed=RoutedCounts())) == {"routed": dict.fromkeys(
        ("pairs_added", "pairs_updated", "pairs_superseded", "rewards_added", "rewards_updated",
         "rewards_superseded"), 0)}


def test_a_stored_value_of_the_wrong_type_names_the_step_and_key():
    with pytest.raises(StateError, match="the stored result of step synth: kept: "):
        step_result("synth", {"kept": "many"})
