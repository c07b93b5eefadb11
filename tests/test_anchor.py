"""The general-ability anchor set: scoring, storage once per version, and the gate's guard."""
from __future__ import annotations

import pytest
from sqlalchemy import select

from tests.helpers import use_teacher
from tuneloop import loop
from tuneloop.evalsets import anchor_items
from tuneloop.progress import SilentReporter
from tuneloop.stages import anchor
from tuneloop.stages import gate as gate_stage
from tuneloop.stages.anchor import contains_reference, evaluate_anchor, score_anchor
from tuneloop.stages.gate import anchor_guard
from tuneloop.store import Cycle, EvalRun, ModelVersion, open_store
from tuneloop.versions import ensure_base_version


class Oracle:
    """Answers anchor questions: right for the first `right` questions seen, wrong after."""

    def __init__(self, right: int = 10**9, name: str = "oracle"):
        self.right, self.name, self.seen = right, name, 0
        self.answers = {i["instruction"]: i["references"][0] for i in anchor_items()}

    def chat(self, conversations, params):
        out = []
        for conv in conversations:
            self.seen += 1
            ref = self.answers.get(conv[-1]["content"])
            out.append(f"I think it is {ref}." if ref and self.seen <= self.right else "I do not know.")
        return out


def test_the_anchor_set_is_well_formed():
    items = anchor_items()
    assert len(items) >= 25
    assert len({i["instruction"] for i in items}) == len(items)
    assert all(i["instruction"].strip() and i["references"] and all(r.strip() for r in i["references"])
               for i in items)
    # every reference survives normalisation (a bare "A" would be dropped as an article: never matched)
    assert all(contains_reference(r, [r]) for i in items for r in i["references"])


@pytest.mark.parametrize("prediction, refs, expected", [
    ("The capital of France is Paris.", ["Paris"], True),
    ("Paris Hilton", ["Paris"], True),
    ("It is parisian style", ["Paris"], False),  # whole words only
    ("a blue whale, surely", ["blue whale"], True),
    ("blue whale!", ["Blue Whale"], True),  # case and punctuation are normalised
    ("whale blue", ["blue whale"], False),
    ("56", ["56", "fifty-six"], True),
    ("", ["Z"], False),
])
def test_contains_reference(prediction, refs, expected):
    assert contains_reference(prediction, refs) is expected


def test_score_anchor_counts_matches():
    items = anchor_items()[:4]
    preds = [items[0]["references"][0], "no idea", items[2]["references"][-1], "nope"]
    rows, summary = score_anchor(preds, items)
    assert [r["match"] for r in rows] == [True, False, True, False]
    assert summary["anchor_score"] == 0.5 and summary["anchor_n"] == 4


def test_each_version_is_scored_once_and_stored(project, monkeypatch):
    p = project(pairs=False)
    oracle = Oracle()
    monkeypatch.setattr(anchor, "build_chat_model", lambda proj, role, adapter=None: oracle)
    with open_store(p.store_url)() as s:
        base = ensure_base_version(p, s)
        run = evaluate_anchor(p, s, base, SilentReporter())
        s.commit()
        assert run.metrics["anchor_score"] == 1.0 and run.n == len(anchor_items())
        assert base.metrics["anchor_score"] == 1.0
        seen = oracle.seen
        again = evaluate_anchor(p, s, base, SilentReporter())
        assert again.id == run.id and oracle.seen == seen  # stored once, no new model calls


def test_the_gate_refuses_a_candidate_that_forgets(project, fake_teacher, monkeypatch):
    """The candidate beats the champion on the held-out set but loses the anchor set: refused."""
    p = project({"continual": {"anchor": True, "anchor_tolerance": 0.05},
                 "eval": {"significance": "none"}})  # the primary metric is faked below, its items are not
    use_teacher(monkeypatch, fake_teacher)
    n = len(anchor_items())
    models = iter([Oracle(name="champion"), Oracle(right=n // 2, name="candidate")])  # champion asked first
    monkeypatch.setattr(anchor, "build_chat_model", lambda proj, role, adapter=None: next(models))
    real_gate = gate_stage.gate

    def primary_improves(project, session, candidate, cand_run, champ_run, guards=()):
        cand_run.metrics = {**cand_run.metrics, project.settings.eval.primary_metric: 1.0}
        champ_run.metrics = {**champ_run.metrics, project.settings.eval.primary_metric: 0.0}
        return real_gate(project, session, candidate, cand_run, champ_run, guards)

    monkeypatch.setattr(gate_stage, "gate", primary_improves)  # what stages.gate.decide calls
    cycle = loop.run_cycle(p, SilentReporter(), trigger="test")
    with open_store(p.store_url)() as s:
        versions = {v.name: v for v in s.scalars(select(ModelVersion))}
        assert versions["v1"].status == "rejected" and versions["base"].status == "champion"
        outcome = s.get(Cycle, cycle.id).outcome
        assert "refused by guard: anchor_score fell from 1.000 to 0.500" in outcome
        anchor_runs = [r for r in s.scalars(select(EvalRun)) if r.eval_set_hash.startswith("anchor-")]
        assert len(anchor_runs) == 2


def test_anchor_guard_tolerance(project):
    p = project(pairs=False)
    assert anchor_guard(p, 0.80, 0.82) is None  # within the default 0.05
    assert "fell from 0.900 to 0.800" in anchor_guard(p, 0.80, 0.90)
    assert anchor_guard(p, None, 0.9) is None
