"""The select step: the better of the SFT and the aligned version on the dev set is the candidate."""
from __future__ import annotations

import math

import pytest

from tuneloop import loop
from tuneloop.progress import SilentReporter
from tuneloop.stages import select as select_stage
from tuneloop.store import Cycle, Example, ModelVersion, open_store


@pytest.fixture
def cycle(project):
    """(project, sessions): a cycle with an SFT version v1 and an aligned (DPO) version v2."""
    p = project(pairs=False)
    sessions = open_store(p.store_url)
    with sessions() as s:
        s.add(Cycle(id=1, trigger="test"))
        s.add(ModelVersion(name="base", base_model="m", method="base", status="champion"))
        s.add(ModelVersion(name="v1", base_model="m", adapter_path="/adapters/sft", method="sft",
                           status="candidate", cycle_id=1))
        s.add(ModelVersion(name="v2", base_model="m", adapter_path="/adapters/dpo", method="dpo",
                           status="candidate", cycle_id=1))
        s.commit()
    return p, sessions


def add_dev(sessions, n=3):
    with sessions() as s:
        for i in range(n):
            s.add(Example(kind="seed", split="dev", question=f"dev question {i}?", answer="Yes", content_hash=f"h{i}"))
        s.commit()


def scripted_scores(monkeypatch, by_adapter: dict[str, float]) -> list[str]:
    calls = []

    def fake(project, adapter, examples, retriever, reporter):
        calls.append(str(adapter))
        return by_adapter[str(adapter)]

    monkeypatch.setattr(select_stage, "score_adapter", fake)
    return calls


def run_select(p, sessions):
    ctx = loop.CycleContext(p, SilentReporter(), cycle_id=1)
    ctx.retriever = lambda s: None  # the scripted scorer needs no index
    with sessions() as s:
        result = loop.step_select(ctx, s)
        s.commit()
        return result, loop.cycle_candidate(s, 1).name, {v.name: v.status for v in s.query(ModelVersion)}


def test_sft_wins_on_dev_and_becomes_the_candidate(cycle, monkeypatch):
    p, sessions = cycle
    add_dev(sessions)
    calls = scripted_scores(monkeypatch, {"/adapters/sft": 0.6, "/adapters/dpo": 0.4})
    result, candidate, status = run_select(p, sessions)
    assert sorted(calls) == ["/adapters/dpo", "/adapters/sft"]
    assert result.candidate == "v1" and candidate == "v1" and result.dev_n == 3
    assert status["v2"] == "superseded" and status["v1"] == "candidate"


def test_a_tie_keeps_the_aligned_version(cycle, monkeypatch):
    p, sessions = cycle
    add_dev(sessions)
    scripted_scores(monkeypatch, {"/adapters/sft": 0.5, "/adapters/dpo": 0.5})
    result, candidate, status = run_select(p, sessions)
    assert candidate == "v2" and status["v1"] == "superseded"
    with sessions() as s:
        assert s.query(ModelVersion).filter_by(name="v1").one().metrics["dev_macro_score"] == 0.5


def test_nan_dev_score_never_wins(cycle, monkeypatch):
    p, sessions = cycle
    add_dev(sessions)
    scripted_scores(monkeypatch, {"/adapters/sft": 0.1, "/adapters/dpo": math.nan})
    _, candidate, _ = run_select(p, sessions)
    assert candidate == "v1"


def test_without_a_dev_set_the_aligned_version_is_the_candidate_and_nothing_is_scored(cycle, monkeypatch):
    p, sessions = cycle
    calls = scripted_scores(monkeypatch, {})
    result, candidate, status = run_select(p, sessions)
    assert calls == [] and candidate == "v2" and "no dev set" in result.skipped
    # the SFT version v1 is a step on the way to v2, never gated on its own
    assert status == {"base": "champion", "v1": "intermediate", "v2": "candidate"}
