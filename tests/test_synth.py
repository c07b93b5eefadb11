"""Self-instruct synthesis with a scripted teacher: provenance, novelty, grounding, idempotence."""
from __future__ import annotations

import json
import math
import re

import pytest
from sqlalchemy import func, select

from tests.helpers import FakeTeacher, ingest_project, passage_phrase, question_passage
from tuneloop.artifacts import read_jsonl, read_meta
from tuneloop.errors import StateError
from tuneloop.metrics import rouge_l
from tuneloop.progress import SilentReporter
from tuneloop.stages.synthesize import synthesize
from tuneloop.store import Artifact, Cycle, Example, open_store

SEED_Q = "What law governs the master services agreement?"


@pytest.fixture
def env(project):
    """(project, sessions, retriever): the sample project, ingested BM25-only."""
    p = project()
    retriever = ingest_project(p)
    return p, open_store(p.store_url), retriever


def new_cycle(s) -> int:
    c = Cycle(trigger="test")
    s.add(c)
    s.commit()
    return c.id


def run(env, teacher, cycle=True):
    p, sessions, retriever = env
    with sessions() as s:
        cid = new_cycle(s) if cycle else None
        r = synthesize(p, s, teacher, retriever, SilentReporter(), cycle_id=cid)
        s.commit()
    return r, cid


def synthetic(sessions, cycle_id=None):
    with sessions() as s:
        q = select(Example).where(Example.kind == "synthetic")
        if cycle_id is not None:
            q = q.where(Example.cycle_id == cycle_id)
        return list(s.scalars(q.order_by(Example.id)))


def test_kept_examples_carry_provenance(env, fake_teacher):
    p, sessions, retriever = env
    r, cid = run(env, fake_teacher)
    assert r.generated == 6 and r.kept >= 4, r
    rows = read_jsonl(r.artifact / "data.jsonl")
    examples = {e.question: e for e in synthetic(sessions, cid)}
    assert len(rows) == r.kept == len(examples)
    with sessions() as s:
        seed_ids = set(s.scalars(select(Example.id).where(Example.kind == "seed", Example.split == "train")))
    hashes = set()
    for row in rows:
        (src,) = row["source_chunk_ids"]
        passage = retriever.passages[src]
        # the question was written from that chunk, and the example is about its document
        assert passage_phrase(passage.text) in row["question"]
        assert row["document"] == passage.document
        # the answer's context: chunks retrieved for the question inside that document
        assert row["chunk_ids"] == [x.chunk_id for x in retriever.retrieve(row["question"], row["document"])]
        assert row["answer"] in retriever.passages[row["chunk_ids"][0]].text
        assert len(row["seed_ids"]) == p.settings.synth.demos and set(row["seed_ids"]) <= seed_ids
        assert re.fullmatch(r"[0-9a-f]{16}", row["prompt_hash"])
        hashes.add(row["prompt_hash"])
        assert row["teacher"] == "fake-teacher"
        e = examples[row["question"]]
        assert (e.answer, e.document, e.split, e.cycle_id) == (row["answer"], row["document"], "train", cid)
        for key in ("source_chunk_ids", "chunk_ids", "seed_ids", "prompt_hash", "teacher"):
            assert e.meta[key] == row[key]
        assert e.meta["artifact"] == str(r.artifact)
    assert len(hashes) == len(rows)  # each question came from its own prompt
    meta = read_meta(r.artifact)
    assert meta["teacher"] == "fake-teacher" and meta["cycle_id"] == cid
    assert meta["report"] == json.loads((r.artifact / "report.json").read_text())
    # the demos shown to the teacher are the recorded seeds
    with sessions() as s:
        first_prompt = next(pr for pr in fake_teacher.question_prompts
                            if passage_phrase(question_passage(pr)) in rows[0]["question"])
        for sid in rows[0]["seed_ids"]:
            assert s.get(Example, sid).question in first_prompt[1]["content"]
        assert s.scalar(select(func.count(Artifact.id)).where(Artifact.path == str(r.artifact))) == 1


def test_second_run_does_not_repeat_the_first(env):
    p, sessions, retriever = env
    # Ask for more than half the chunks each time, so run 2 must revisit chunks of run 1 and the
    # teacher (deterministic per chunk) writes some of the very same questions again.
    p.settings.synth.questions_per_cycle = math.ceil(0.7 * len(retriever.passages))
    teacher = FakeTeacher()
    r1, c1 = run(env, teacher)
    r2, c2 = run(env, teacher)
    q1 = [e.question for e in synthetic(sessions, c1)]
    q2 = [e.question for e in synthetic(sessions, c2)]
    assert q1 and q2
    for q in q2:
        assert q not in q1
        assert rouge_l(q, q1) < p.settings.synth.rouge_threshold
    rejected2 = read_jsonl(r2.artifact / "rejected.jsonl")
    assert any(x["reason"] in ("duplicate",) or x["reason"].startswith("rouge-l") for x in rejected2)
    # run 2 preferred chunks no earlier example came from
    used1 = {c for e in synthetic(sessions, c1) for c in e.meta["source_chunk_ids"]}
    src2 = [x["source_chunk_ids"][0] for x in read_jsonl(r2.artifact / "data.jsonl")]
    fresh = len(retriever.passages) - len(used1)
    assert sum(c not in used1 for c in src2) >= min(len(src2), fresh) - 1


@pytest.mark.parametrize("reply, reason", [
    ("What law governs the master services agreement exactly?", "rouge-l"),
    (SEED_Q, "duplicate"),
    ("", "empty"),
    ("   \n  ", "empty"),
    ("Why?", "too short"),
    ("The Agreement is entered into as of September 9, 2024.", "not a question"),
])
def test_bad_questions_are_rejected_with_a_reason(env, reply, reason):
    teacher = FakeTeacher(question=lambda conv: reply)
    r, cid = run(env, teacher)
    assert r.kept == 0 and r.generated == 6
    rejected = read_jsonl(r.artifact / "rejected.jsonl")
    assert len(rejected) == 6 and all(x["reason"].startswith(reason) for x in rejected)
    assert list(r.rejected) == [rejected[0]["reason"]]
    assert teacher.answer_prompts == []  # nothing worth answering
    assert synthetic(env[1]) == []


def test_near_copy_score_is_above_the_threshold():
    # guards the scripted reply above: it must be a near copy, not an exact one
    near = "What law governs the master services agreement exactly?"
    assert 0.7 <= rouge_l(near, [SEED_Q]) < 1.0


def test_unsupported_answers_are_rejected(env):
    teacher = FakeTeacher(answer=lambda conv: "zebras quokkas and narwhals in Atlantis")
    r, _ = run(env, teacher)
    rejected = read_jsonl(r.artifact / "rejected.jsonl")
    assert r.kept == 0 and len(rejected) == 6
    assert all(x["reason"].startswith("answer not supported") for x in rejected)
    assert all(x["answer"] == "zebras quokkas and narwhals in Atlantis" for x in rejected)


def test_yes_no_and_empty_and_long_answers(env):
    answers = iter(["Yes", "", "No, it does not.", "x " * 150, "Answer: Yes", "maybe"])
    teacher = FakeTeacher(answer=lambda conv: next(answers))
    r, _ = run(env, teacher)
    kept = [row["answer"] for row in read_jsonl(r.artifact / "data.jsonl")]
    reasons = sorted(x["reason"] for x in read_jsonl(r.artifact / "rejected.jsonl"))
    assert sorted(kept) == ["No, it does not.", "Yes", "Yes"]  # "Answer: " prefix stripped
    assert reasons[0] == "answer empty" and reasons[1] == "answer not supported by its passages (< 60% of words)"
    assert reasons[2] == "answer too long"


def test_rerunning_the_same_cycle_makes_no_teacher_calls(env, fake_teacher):
    p, sessions, retriever = env
    r1, cid = run(env, fake_teacher)
    calls, convs = fake_teacher.calls, fake_teacher.conversations
    assert calls > 0
    with sessions() as s:
        n_before = s.scalar(select(func.count(Example.id)))
        r2 = synthesize(p, s, fake_teacher, retriever, SilentReporter(), cycle_id=cid)
        s.commit()
        r3 = synthesize(p, s, None, retriever, SilentReporter(), cycle_id=cid)  # no teacher needed
        s.commit()
        assert s.scalar(select(func.count(Example.id))) == n_before
        assert s.scalar(select(func.count(Artifact.id)).where(Artifact.kind == "dataset")) == 1
    assert (fake_teacher.calls, fake_teacher.conversations) == (calls, convs)
    assert r2.artifact == r3.artifact == r1.artifact and r2.kept == r1.kept


def test_a_crash_after_the_artifact_recovers_its_rows(env, fake_teacher):
    """The artifact is on disk but the transaction adding its rows was lost: rows come back once."""
    p, sessions, retriever = env
    with sessions() as s:
        cid = new_cycle(s)
        r1 = synthesize(p, s, fake_teacher, retriever, SilentReporter(), cycle_id=cid)
        s.rollback()  # the crash
    assert synthetic(sessions) == []
    calls = fake_teacher.calls
    with sessions() as s:
        r2 = synthesize(p, s, None, retriever, SilentReporter(), cycle_id=cid)
        s.commit()
    assert fake_teacher.calls == calls
    assert len(synthetic(sessions, cid)) == r1.kept == r2.kept > 0


def test_synthesis_needs_documents_and_a_teacher(project, fake_teacher):
    p = project()
    from tuneloop.programs.rag import Retriever
    from tuneloop.ingest.index import HybridIndex

    empty = Retriever(HybridIndex([], [], None, None, None), {}, 2, 60)
    with open_store(p.store_url)() as s:
        with pytest.raises(StateError, match="ingest"):
            synthesize(p, s, fake_teacher, empty, SilentReporter())
        with pytest.raises(StateError, match="teacher"):
            synthesize(p, s, None, empty, SilentReporter())
