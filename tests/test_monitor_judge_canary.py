"""The model-based monitoring signals with scripted models: live_judge (the judge grades new live
answers of the champion) and canary (the champion re-answers held-out questions on a schedule)."""
from __future__ import annotations

import re
from datetime import timedelta

import pytest
from sqlalchemy import select

from tests.helpers import ingest_project
from tuneloop import metrics
from tuneloop.evalsets import eval_examples
from tuneloop.monitor import signals
from tuneloop.programs import scoring
from tuneloop.programs.judge import ScoreAnswer
from tuneloop.programs.rag import SYSTEM_PROMPT
from tuneloop.progress import SilentReporter
from tuneloop.stages import eval as evaluate  # the eval step module
from tuneloop.store import Chunk, EvalRun, Interaction, ModelVersion, SignalValue, open_store, utcnow
from tuneloop.versions import ensure_base_version

GRADES = {"good": "5. Correct, supported and brief.", "fair": "3.5 - mostly right", "bad": "1. Wrong.",
          "odd": "I cannot tell."}  # "odd": no 1-5 grade in the reply


class FakeJudge:
    """Grades a ScoreAnswer prompt (plain-chat adapter) by its answer's first word."""

    name = "fake-judge"

    def __init__(self):
        self.sent = []

    def chat(self, conversations, params):
        assert params.temperature == 0.0
        out = []
        for conv in conversations:
            assert conv[0]["content"] == ScoreAnswer.instructions
            self.sent.append(conv[-1]["content"])
            answer = re.search(r"^Answer:[ \n](.*)$", conv[-1]["content"], re.M).group(1).strip()
            out.append(GRADES[answer.split()[0]])
        return out


def never(*_):
    raise AssertionError("built although the signal is off or not due")


@pytest.fixture
def env(project):
    def make(monitor=None):
        p = project({"monitor": {"change_detector": "none", **(monitor or {})}})
        ingest_project(p)
        s = open_store(p.store_url)()
        base = ensure_base_version(p, s)
        s.commit()
        return p, s, base, list(s.scalars(select(Chunk).order_by(Chunk.id)))
    return make


def add_answers(s, version, answers, chunks):
    its = []
    for k, a in enumerate(answers):
        its.append(Interaction(question=f"live question {k}?", answer=a, model_version_id=version.id,
                               chunk_ids=[chunks[k % len(chunks)].id, chunks[(k + 1) % len(chunks)].id]))
        s.add(its[-1])
    s.flush()
    return its


def readings(s, signal):
    return s.scalars(select(SignalValue).where(SignalValue.signal == signal).order_by(SignalValue.id)).all()


# --------------------------------------------------------------------------- live_judge


def test_live_judge_is_off_by_default_and_builds_no_judge(env):
    p, s, base, chunks = env()
    add_answers(s, base, ["bad"] * 4, chunks)
    out = signals.check_signals(p, s, None, judge=never, retriever=never)
    assert {r.signal for r in out} == {"satisfaction", "documents", "review_queue"} and readings(s, "live_judge") == []


def test_live_judge_quiet_on_high_grades_fires_on_low_ones_of_new_answers_only(env):
    p, s, base, chunks = env({"judge_sample": 10, "judge_floor": 3.0})
    judge = FakeJudge()
    good = add_answers(s, base, ["good"] * 4, chunks)
    other = ModelVersion(name="v9", base_model="m", method="sft", status="retired")
    s.add(other)
    s.flush()
    add_answers(s, other, ["bad"] * 4, chunks)  # not the champion's answers
    (r,) = [r for r in signals.check_signals(p, s, None, judge=judge) if r.signal == "live_judge"]
    assert (r.value, r.fired, r.detail["n"], r.detail["unparsed"]) == (5.0, False, 4, 0)
    assert r.detail["interaction_ids"] == [it.id for it in good] and len(judge.sent) == 4
    # the excerpts are the passages the interaction stored, numbered as the student saw them
    assert f"[1] {chunks[0].text.strip()}" in judge.sent[0] and f"[2] {chunks[1].text.strip()}" in judge.sent[0]
    bad = add_answers(s, base, ["bad"] * 3 + ["good"], chunks)
    r = signals.live_judge(p, s, judge)
    assert r.fired and r.value == pytest.approx(2.0) and "< 3.0" in r.reason
    assert r.detail["interaction_ids"] == [it.id for it in bad] and len(judge.sent) == 8
    s.add(r.row())
    s.flush()
    r = signals.live_judge(p, s, judge)  # nothing new since: nothing judged, nothing fired
    assert (r.value, r.fired, len(judge.sent)) == (None, False, 8) and "no new answers" in r.reason
    row = readings(s, "live_judge")[0]
    assert row.detail["mean"] == 5.0 and row.detail["interaction_ids"] == [it.id for it in good]


def test_live_judge_samples_the_latest_answers(env):
    p, s, base, chunks = env({"judge_sample": 3})
    its = add_answers(s, base, ["bad"] * 3 + ["good"] * 3, chunks)
    r = signals.live_judge(p, s, FakeJudge())
    assert r.detail["interaction_ids"] == [it.id for it in its[3:]] and r.value == 5.0 and not r.fired


def test_unparseable_grades_are_counted_and_left_out(env):
    p, s, base, chunks = env({"judge_sample": 10})
    add_answers(s, base, ["odd", "good", "odd", "good"], chunks)
    r = signals.live_judge(p, s, FakeJudge())
    assert (r.value, r.fired, r.detail["n"], r.detail["unparsed"]) == (5.0, False, 2, 2)
    assert r.detail["scores"] == [None, 5.0, None, 5.0]
    s.add(r.row())
    add_answers(s, base, ["odd", "odd"], chunks)
    r = signals.live_judge(p, s, FakeJudge())
    assert (r.value, r.fired, r.detail["unparsed"]) == (None, False, 2) and "no parseable grade" in r.reason


def test_live_judge_change_detector_sees_a_drop_above_the_floor(env):
    p, s, base, chunks = env({"judge_sample": 5, "judge_floor": 3.0, "page_hinkley_threshold": 1.0})
    t0 = utcnow() - timedelta(days=1)
    for k in range(40):  # a long history of top grades
        s.add(SignalValue(signal="live_judge", value=5.0, created_at=t0 + timedelta(minutes=k)))
    s.flush()
    add_answers(s, base, ["fair"] * 5, chunks)
    r = signals.live_judge(p, s, FakeJudge())
    assert r.value == 3.5 and not r.fired  # above the floor, and no change detector
    p.settings.monitor.change_detector = "page_hinkley"
    r = signals.live_judge(p, s, FakeJudge())  # the same answers (nothing was recorded)
    assert r.value == 3.5 and r.fired and "dropped (page_hinkley)" in r.reason and r.detail["change_points"] == [40]
    s.add(r.row())
    s.flush()
    add_answers(s, base, ["fair"] * 5, chunks)
    r = signals.live_judge(p, s, FakeJudge())  # the same level again: one shift fires once
    assert r.value == 3.5 and not r.fired


# --------------------------------------------------------------------------- canary


class Oracle:
    """A student that gives the held-out answer when its excerpts hold it (yes/no: always right),
    else says the document does not say."""

    name = "oracle-student"

    def __init__(self, answers):
        self.answers, self.calls = answers, 0

    def chat(self, conversations, params):
        self.calls += 1
        out = []
        for conv in conversations:
            assert conv[0]["content"] == SYSTEM_PROMPT
            user = conv[-1]["content"]
            answer = self.answers[user.rsplit("Question: ", 1)[1].strip()]
            found = " ".join(metrics.normalize_tokens(answer)) in " ".join(metrics.normalize_tokens(user))
            out.append(answer if found or metrics.is_yes_no_reference(answer) else "The document does not say.")
        return out


@pytest.fixture
def canary_env(env, monkeypatch):
    def make(monitor=None, stored=True):
        p, s, base, chunks = env({"canary_every_seconds": 3600, **(monitor or {})})
        oracle = Oracle({e.question: e.answer for e in eval_examples(p, s)})
        monkeypatch.setattr(scoring, "build_chat_model", lambda project, role, adapter=None: oracle)
        if stored:
            evaluate.evaluate_version(p, s, base, ingest_project(p), SilentReporter())
            s.commit()
            oracle.calls = 0
        return p, s, base, oracle
    return make


def canary_reading(p, s):
    found = [r for r in signals.check_signals(p, s, None) if r.signal == "canary"]
    s.commit()
    return found[0] if found else None


def break_documents(p):
    """Re-ingest documents that lost their content: retrieval no longer finds the answers."""
    for doc in p.path("documents").glob("*.md"):
        doc.write_text(f"# {doc.stem}\n\nThis agreement was replaced; see the new version.\n")
    ingest_project(p)


def test_canary_is_off_by_default(env):
    p, s, _, _ = env()
    out = signals.check_signals(p, s, None, retriever=never)
    assert "canary" not in {r.signal for r in out}


def test_canary_runs_when_due_and_stays_quiet_when_unchanged(canary_env):
    p, s, base, oracle = canary_env()
    r = canary_reading(p, s)
    (run,) = s.scalars(select(EvalRun)).all()
    assert r is not None and not r.fired and oracle.calls == 1
    assert r.value == pytest.approx(run.metrics["macro_score"]) and r.detail["drop"] == pytest.approx(0.0)
    assert r.detail["changed_answers"] == 0 and r.detail["eval_run_id"] == run.id
    assert r.detail["example_ids"] == [e.id for e in eval_examples(p, s)]
    assert canary_reading(p, s) is None and oracle.calls == 1  # not due: not run
    row = readings(s, "canary")[-1]
    row.created_at -= timedelta(hours=2)  # as after a restart two hours later: the schedule is in the store
    s.commit()
    assert canary_reading(p, s) is not None and oracle.calls == 2


def test_canary_fires_when_the_index_regresses(canary_env):
    p, s, base, oracle = canary_env({"canary_questions": 4})
    stored = eval_examples(p, s)[:4]
    break_documents(p)
    r = canary_reading(p, s)
    assert r.fired and oracle.calls == 1 and r.detail["example_ids"] == [e.id for e in stored]
    assert r.detail["stored"] - r.value > 0.1 and r.detail["changed_answers"] >= 1
    assert "drop" in r.reason and "> 0.1" in r.reason
    assert readings(s, "canary")[-1].fired


def test_canary_tolerance_and_no_stored_run(canary_env):
    p, s, base, oracle = canary_env({"canary_tolerance": 1.0})
    break_documents(p)
    r = canary_reading(p, s)
    assert not r.fired and r.detail["drop"] > 0.1  # worse, but within the tolerance
    p2, s2, _, oracle2 = canary_env(stored=False)
    r = canary_reading(p2, s2)
    assert r.value is not None and not r.fired and oracle2.calls == 1 and "no stored held-out run" in r.reason
