"""The data engine with a scripted teacher: provenance, each filter, novelty, cache, report."""
from __future__ import annotations

import hashlib
import json
import math
import re

import numpy as np
import pytest
from sqlalchemy import func, select

from tests.helpers import FakeTeacher, excerpts, ingest_project, passage_phrase, prompt_question, question_passage
from tuneloop.artifacts import read_jsonl, read_meta
from tuneloop.config import QUESTION_TYPES
from tuneloop.errors import StateError
from tuneloop.filters import NEGATIVE_ANSWER
from tuneloop.metrics import normalize_tokens, rouge_l
from tuneloop.models.cache import CachedChatModel
from tuneloop.progress import SilentReporter
from tuneloop.stages.synth import SynthModels, allocate, synthesize
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


def run(env, models, cycle=True, name=None):
    p, sessions, retriever = env
    with sessions() as s:
        cid = new_cycle(s) if cycle else None
        r = synthesize(p, s, models, retriever, SilentReporter(), cycle_id=cid, name=name)
        s.commit()
    return r, cid


def synthetic(sessions, cycle_id=None):
    with sessions() as s:
        q = select(Example).where(Example.kind == "synthetic")
        if cycle_id is not None:
            q = q.where(Example.cycle_id == cycle_id)
        return list(s.scalars(q.order_by(Example.id)))


def rejected_by(r) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for x in read_jsonl(r.artifact / "rejected.jsonl"):
        out.setdefault(x["filter"], []).append(x)
    return out


class WordEmbedder:
    """A deterministic stand-in embedder: a question's vector is its last word, hashed (so two
    questions ending in the same word are cosine 1.0, others 0)."""

    name = "word-embedder"

    def embed(self, texts):
        out = np.zeros((len(texts), 1 << 16), dtype=np.float32)
        for i, t in enumerate(texts):
            words = normalize_tokens(t) or ["empty"]
            out[i, int(hashlib.md5(words[-1].encode()).hexdigest(), 16) % (1 << 16)] = 1.0
        return out


def test_allocate_mixes_types_in_proportion():
    assert allocate({"fact": 1, "yes_no": 1}, 4) == ["fact", "fact", "yes_no", "yes_no"]
    mix = allocate({"self_instruct": 2, "fact": 2, "yes_no": 2, "explanation": 1, "comparison": 1, "negative": 1}, 6)
    assert sorted(mix) == sorted(QUESTION_TYPES)  # six questions: one of each type
    assert allocate({"fact": 3, "negative": 0}, 5) == ["fact"] * 5


def test_kept_examples_carry_full_provenance(env, fake_teacher):
    p, sessions, retriever = env
    r, cid = run(env, fake_teacher)
    rows = read_jsonl(r.artifact / "data.jsonl")
    report = json.loads((r.artifact / "report.json").read_text())
    assert r.generated == 6 and r.kept == len(rows) >= 4, report
    examples = {e.question: e for e in synthetic(sessions, cid)}
    assert len(examples) == r.kept
    with sessions() as s:
        seed_ids = set(s.scalars(select(Example.id).where(Example.kind == "seed", Example.split == "train")))
    for row in rows:
        assert row["question_type"] in QUESTION_TYPES
        sources = row["source_chunk_ids"]
        assert len(sources) == (2 if row["question_type"] == "comparison" else 1)
        passage = " ".join(retriever.passages[c].text for c in sources)
        assert passage_phrase(passage) in row["question"] or row["question_type"] == "comparison"
        assert all(retriever.passages[c].document == row["document"] for c in sources)
        # the answer rests on cited chunks, which were shown to the teacher with the question
        assert set(row["chunk_ids"]) <= set(row["context_chunk_ids"]) and row["chunk_ids"]
        assert row["context_chunk_ids"][: len(sources)] == sources
        assert row["citations_inferred"] is True  # the fake never writes [n]
        cited_words = " ".join(re.findall(r"[A-Za-z][A-Za-z0-9]+", " ".join(retriever.passages[c].text
                                                                          for c in row["chunk_ids"])))
        assert row["answer"] in cited_words or row["answer"] == NEGATIVE_ANSWER
        assert len(row["seed_ids"]) == p.settings.synth.human_demos and set(row["seed_ids"]) <= seed_ids
        assert row["machine_demo_ids"] == []  # nothing accepted before the first run
        assert re.fullmatch(r"[0-9a-f]{16}", row["prompt_hash"])
        assert row["teacher"] == row["judge"] == "fake-teacher"
        sc = row["scores"]
        assert sc["support"] == 1.0 and sc["judge_supported"] is True and sc["round_trip_score"] >= 0.5
        assert 0 <= sc["rouge_l_max"] < p.settings.synth.rouge_threshold
        assert 0 <= sc["contamination_rouge"] < p.settings.synth.contamination_rouge
        e = examples[row["question"]]
        assert (e.answer, e.document, e.split, e.cycle_id) == (row["answer"], row["document"], "train", cid)
        for key in ("question_type", "source_chunk_ids", "chunk_ids", "seed_ids", "prompt_hash", "teacher", "scores"):
            assert e.meta[key] == row[key]
        assert e.meta["artifact"] == str(r.artifact)
    assert len({row["prompt_hash"] for row in rows}) == len(rows)
    meta = read_meta(r.artifact)
    assert meta["teacher"] == "fake-teacher" and meta["cycle_id"] == cid and meta["report"] == report
    # the demos shown to the teacher are the recorded seeds
    with sessions() as s:
        first = next(pr for pr in fake_teacher.question_prompts if passage_phrase(question_passage(pr)) in
                     rows[0]["question"])
        for sid in rows[0]["seed_ids"]:
            assert s.get(Example, sid).question in first[1]["content"]
        assert s.scalar(select(func.count(Artifact.id)).where(Artifact.path == str(r.artifact))) == 1


def test_dataset_loads_with_datasets_and_report_adds_up(env, fake_teacher):
    from datasets import load_dataset

    r, _ = run(env, fake_teacher)
    ds = load_dataset("json", data_files=str(r.artifact / "data.jsonl"), split="train")
    assert len(ds) == r.kept and {"question", "answer", "chunk_ids", "scores"} <= set(ds.column_names)
    rep = r.report
    assert rep["generated"] == rep["kept"] + sum(rep["rejected"].values())
    assert sum(rep["question_types"]["generated"].values()) == rep["generated"]
    assert sum(rep["question_types"]["kept"].values()) == rep["kept"]
    assert 0 < rep["diversity"]["distinct_1"] <= rep["diversity"]["distinct_2"] <= 1
    assert rep["diversity"]["embedding_spread"] is None and rep["filters_on"]["embedding"] is False  # BM25-only


def test_negative_questions_survive_only_when_retrieval_also_finds_nothing(env):
    p, _, _ = env
    p.settings.synth.strategies = {"negative": 1.0}
    teacher = FakeTeacher(question=lambda conv: "What does the agreement say about "
                                                f"{passage_phrase(question_passage(conv))} on Mars?",
                          round_trip=lambda conv: NEGATIVE_ANSWER if "Mars" in prompt_question(conv) else "Yes")
    r, _ = run(env, teacher)
    rows = read_jsonl(r.artifact / "data.jsonl")
    assert r.kept == 6 and all(x["answer"] == NEGATIVE_ANSWER and x["question_type"] == "negative" for x in rows)
    assert teacher.answer_prompts == [] and teacher.prompts["judge"] == []  # a fixed answer needs neither

    teacher2 = FakeTeacher(question=lambda conv: f"Which clause covers {passage_phrase(question_passage(conv))} now?",
                           round_trip=lambda conv: "Yes")
    r2, _ = run(env, teacher2)
    assert r2.kept == 0 and set(rejected_by(r2)) == {"round-trip"}


@pytest.mark.parametrize("reply, category, reason", [
    ("What law governs the master services agreement exactly?", "novelty (rouge-l)", "rouge-l"),
    (SEED_Q, "duplicate", "duplicate"),
    ("", "format", "no question"),
    ("Why?", "format", "too short"),
    ("The Agreement is entered into as of September 9, 2024.", "format", "not a question"),
])
def test_bad_questions_are_rejected_with_a_reason(env, reply, category, reason):
    env[0].settings.synth.contamination_rouge = 1.0  # the seed question is also near some eval questions
    teacher = FakeTeacher(question=lambda conv: reply)
    r, _ = run(env, teacher)
    assert r.kept == 0 and r.generated == 6
    rejected = read_jsonl(r.artifact / "rejected.jsonl")
    assert len(rejected) == 6 and {x["filter"] for x in rejected} == {category}
    assert all(x["reason"].startswith(reason) for x in rejected[1:]) or category == "duplicate"
    assert rejected[0]["reason"].startswith(reason)
    assert teacher.answer_prompts == []  # nothing worth answering
    assert synthetic(env[1]) == []


def test_near_copy_score_is_above_the_threshold():
    # guards the scripted reply above: it must be a near copy, not an exact one
    near = "What law governs the master services agreement exactly?"
    assert 0.7 <= rouge_l(near, [SEED_Q]) < 1.0


def test_a_copy_of_an_evaluation_question_is_contamination(env):
    p, sessions, retriever = env
    with sessions() as s:
        held = s.scalars(select(Example).where(Example.split == "eval").order_by(Example.id)).all()
    by_doc = {e.document: e.question for e in held}
    doc_of = {cid: ps.document for cid, ps in retriever.passages.items()}

    def question(conv):  # ask, about this chunk's document, an evaluation question on that document
        passage = question_passage(conv)
        cid = next(c for c, ps in retriever.passages.items() if ps.text.strip()[:200] in passage)
        return by_doc.get(doc_of[cid], "Which clause covers the zebra crossing in the Atlantis annex?")

    r, _ = run(env, FakeTeacher(question=question))
    groups = rejected_by(r)
    assert groups.get("contamination"), groups.keys()
    for x in groups["contamination"]:
        assert x["reason"].startswith("contamination: ROUGE-L 1.00 vs eval question")
        assert x["question"] == by_doc[x["document"]]
    # the same questions on other documents are not contamination (scope: document)
    p.settings.synth.contamination_scope = "document"
    assert all(x["document"] in by_doc for x in groups["contamination"])


def test_paraphrase_of_an_evaluation_question_is_dropped_by_embedding(env, real_embedder):
    p, sessions, retriever = env
    doc = "01-master-services-agreement.md"
    with sessions() as s:
        s.add(Example(kind="seed", split="eval", question="Which state's law governs this agreement?",
                      answer="Delaware", document=doc, content_hash="x-eval-paraphrase"))
        s.commit()
    paraphrase = "Under the laws of which state is this contract governed?"
    assert rouge_l(paraphrase, ["Which state's law governs this agreement?"]) < p.settings.synth.contamination_rouge
    p.settings.synth.strategies = {"fact": 1.0}
    p.settings.synth.questions_per_cycle = len(retriever.passages)
    r, _ = run(env, SynthModels(FakeTeacher(question=lambda conv: paraphrase), embedder=real_embedder))
    groups = rejected_by(r)
    dropped = [x for x in groups.get("contamination", []) if x["document"] == doc]
    assert dropped and all(x["reason"].startswith("contamination: cosine") for x in dropped)
    assert all(x["scores"]["contamination_cosine"] >= p.settings.synth.contamination_cosine for x in dropped)
    # each question was compared with its own document's evaluation questions only (scope: document)
    with sessions() as s:
        eval_qs = {}
        for q, d in s.execute(select(Example.question, Example.document).where(Example.split == "eval")):
            eval_qs.setdefault(d, set()).add(q[:40])
    for x in groups.get("contamination", []):
        quoted = re.search(r"vs eval question '(.*)'$", x["reason"]).group(1)
        assert any(q.startswith(quoted[:40].removesuffix("...")) for q in eval_qs[x["document"]])
    # where no evaluation question is close, the paraphrase is kept (once; then it is a duplicate)
    kept = read_jsonl(r.artifact / "data.jsonl")
    assert len(kept) <= 1 and all(x["document"] != doc for x in kept)
    assert all(x["scores"]["contamination_cosine"] < p.settings.synth.contamination_cosine for x in kept)


def test_embedding_near_duplicates_are_dropped(env):
    endings = iter(["the payment schedule", "the fee schedule", "the delivery schedule", "the audit rights",
                    "the notice period", "the renewal window"])

    def question(conv):
        return f"Which clause in {passage_phrase(question_passage(conv), 3)} covers {next(endings)}?"

    teacher = FakeTeacher(question=question, answer=lambda conv: "Yes", round_trip=lambda conv: "Yes")
    r, _ = run(env, SynthModels(teacher, embedder=WordEmbedder()))
    groups = rejected_by(r)
    near = groups["near-duplicate (embedding)"]
    assert [x["question"].split(" covers ")[1] for x in near] == ["the fee schedule?", "the delivery schedule?"]
    assert all(x["scores"]["near_duplicate_cosine"] == 1.0 for x in near)
    assert r.kept == 4 and r.report["diversity"]["embedding_spread"] == 1.0  # kept ones are orthogonal


def test_unsupported_answers_are_rejected(env):
    teacher = FakeTeacher(answer=lambda conv: "zebras quokkas and narwhals in Atlantis")
    p, _, _ = env
    p.settings.synth.strategies = {"fact": 1.0}
    r, _ = run(env, teacher)
    rejected = read_jsonl(r.artifact / "rejected.jsonl")
    assert r.kept == 0 and len(rejected) == 6
    assert all(x["filter"] == "answer" and x["reason"].startswith("answer not supported") for x in rejected)
    assert all(x["answer"] == "zebras quokkas and narwhals in Atlantis" for x in rejected)
    assert teacher.prompts["judge"] == []  # filtered before the (costlier) judge


def test_answer_formats(env):
    p, _, _ = env
    p.settings.synth.strategies = {"yes_no": 1.0}
    answers = iter(["Yes [1]", "", "No, it does not.", "x " * 150, "Answer: Yes", "The document does not say."])
    teacher = FakeTeacher(answer=lambda conv: next(answers), round_trip=lambda conv: "Yes")
    p.settings.synth.round_trip = False
    r, _ = run(env, teacher)
    kept = read_jsonl(r.artifact / "data.jsonl")
    reasons = sorted(x["reason"] for x in read_jsonl(r.artifact / "rejected.jsonl"))
    assert sorted(x["answer"] for x in kept) == ["No, it does not.", "Yes", "Yes"]  # prefix and [1] stripped
    cited = next(x for x in kept if not x["citations_inferred"])  # "Yes [1]": an explicit citation
    assert cited["chunk_ids"] == cited["context_chunk_ids"][:1]
    assert reasons == ["answer too long", "no answer in the teacher's reply", "teacher found no answer in the passages"]


def test_judge_rejects_unsupported_and_unreadable_verdicts(env):
    p, _, _ = env
    p.settings.synth.strategies = {"fact": 1.0}
    verdicts = iter(["No. The excerpt says nothing about it."] * 2 + ["Maybe, hard to say."] * 2 + ["Yes."] * 2)
    teacher = FakeTeacher(judge=lambda conv: next(verdicts))
    r, _ = run(env, teacher)
    groups = rejected_by(r)
    reasons = sorted(x["reason"] for x in groups["grounding (judge)"])
    assert reasons == ["judge gave no Yes/No verdict"] * 2 + ["judge: answer not supported by its cited passages"] * 2
    assert r.kept == 2
    # the judge saw exactly the cited passages and the answer
    for conv in teacher.prompts["judge"]:
        assert conv[-1]["content"].rstrip().endswith("Reply Yes or No, then a reason.")
        assert "Answer:" in conv[-1]["content"] and excerpts(conv).startswith("[1] ")


def test_round_trip_disagreement_is_rejected(env):
    p, _, _ = env
    p.settings.synth.strategies = {"fact": 1.0}
    replies = iter(["something else entirely"] * 3 + [None] * 3)
    teacher = FakeTeacher(round_trip=lambda conv: next(replies) or prompt_question(conv)[len("Which terms cover "):-1])
    r, _ = run(env, teacher)
    groups = rejected_by(r)
    assert len(groups["round-trip"]) == 3 and r.kept == 3
    assert all(x["scores"]["round_trip_answer"] == "something else entirely" for x in groups["round-trip"])
    # the round trip used the student's own serving prompt
    from tuneloop.programs.rag import SYSTEM_PROMPT

    assert all(c[0]["content"] == SYSTEM_PROMPT for c in teacher.prompts["round_trip"])


def test_self_distillation_keeps_agreeing_rewrites_only(env, monkeypatch):
    p, _, _ = env
    p.settings.synth.strategies = {"fact": 1.0}
    p.settings.synth.self_distill = True
    n = {"i": 0}

    def rewrite(conv):
        n["i"] += 1
        ref = conv[-1]["content"].split("Reference answer:", 1)[1].strip()
        return f"{ref} indeed" if n["i"] % 2 else "bananas"

    student = FakeTeacher(rewrite=rewrite, name="fake-student")
    r, _ = run(env, SynthModels(FakeTeacher(), student=student))
    rows = read_jsonl(r.artifact / "data.jsonl")
    rewritten = [x for x in rows if x["teacher_answer"]]
    assert rewritten and len(rewritten) < len(rows)
    for x in rewritten:
        assert x["answer"] == f"{x['teacher_answer']} indeed"
    assert all(x["answer"] != "bananas" for x in rows)
    assert r.report["self_distilled"] == len(rewritten)


def test_second_run_does_not_repeat_the_first_and_uses_machine_demos(env):
    p, sessions, retriever = env
    p.settings.synth.questions_per_cycle = math.ceil(0.7 * len(retriever.passages))
    teacher = FakeTeacher()
    r1, c1 = run(env, teacher)
    r2, c2 = run(env, teacher)
    q1 = [e.question for e in synthetic(sessions, c1)]
    q2 = [e.question for e in synthetic(sessions, c2)]
    assert q1 and q2
    for q in q2:
        assert q not in q1 and rouge_l(q, q1) < p.settings.synth.rouge_threshold
    assert {"duplicate", "novelty (rouge-l)"} & set(r2.rejected)
    ids1 = {e.id for e in synthetic(sessions, c1)}
    rows2 = read_jsonl(r2.artifact / "data.jsonl")
    assert all(len(x["machine_demo_ids"]) == 2 and set(x["machine_demo_ids"]) <= ids1 for x in rows2)
    # run 2 planned chunks no kept example came from first (kept and rejected alike)
    used1 = {c for e in synthetic(sessions, c1) for c in e.meta["source_chunk_ids"]}
    planned2 = [x["source_chunk_ids"][0] for x in rows2 + read_jsonl(r2.artifact / "rejected.jsonl")]
    fresh = len(retriever.passages) - len(used1)
    assert sum(c not in used1 for c in planned2) == min(len(planned2), fresh)


def test_a_rerun_after_a_crash_makes_zero_model_calls(env, tmp_path):
    """Generation crashed before its artifact was written: the rerun is answered from the cache."""
    p, sessions, retriever = env
    teacher = FakeTeacher()
    cached = CachedChatModel(teacher, tmp_path / "replies")
    with sessions() as s:
        first = synthesize(p, s, cached, retriever, SilentReporter(), name="crashed")
        s.rollback()  # the crash: nothing was committed
    calls, sent = teacher.calls, cached.calls
    assert calls > 0 and sent > 0
    again = CachedChatModel(teacher, tmp_path / "replies")  # a new process
    with sessions() as s:
        second = synthesize(p, s, again, retriever, SilentReporter(), name="rerun")
        s.commit()
    assert teacher.calls == calls and again.calls == 0 and again.hits == sent
    assert read_jsonl(second.artifact / "data.jsonl") == read_jsonl(first.artifact / "data.jsonl")


def test_rerunning_the_same_cycle_reuses_its_artifact(env, fake_teacher):
    p, sessions, retriever = env
    r1, cid = run(env, fake_teacher)
    calls = fake_teacher.calls
    with sessions() as s:
        n_before = s.scalar(select(func.count(Example.id)))
        r2 = synthesize(p, s, fake_teacher, retriever, SilentReporter(), cycle_id=cid)
        s.commit()
        r3 = synthesize(p, s, None, retriever, SilentReporter(), cycle_id=cid)  # no teacher needed
        s.commit()
        assert s.scalar(select(func.count(Example.id))) == n_before
        assert s.scalar(select(func.count(Artifact.id)).where(Artifact.kind == "dataset")) == 1
    assert fake_teacher.calls == calls
    assert r2.artifact == r3.artifact == r1.artifact and r2.kept == r1.kept


def test_a_crash_after_the_artifact_recovers_its_rows(env, fake_teacher):
    p, sessions, retriever = env
    with sessions() as s:
        cid = new_cycle(s)
        r1 = synthesize(p, s, fake_teacher, retriever, SilentReporter(), cycle_id=cid)
        s.rollback()  # the crash
    assert synthetic(sessions) == []
    with sessions() as s:
        r2 = synthesize(p, s, None, retriever, SilentReporter(), cycle_id=cid)
        s.commit()
    assert len(synthetic(sessions, cid)) == r1.kept == r2.kept > 0


def test_synthesis_needs_documents_and_a_teacher(project, fake_teacher):
    p = project()
    from tuneloop.ingest.index import HybridIndex
    from tuneloop.programs.rag import Retriever

    empty = Retriever(HybridIndex([], [], None, None, None), {}, 2, 60)
    with open_store(p.store_url)() as s:
        with pytest.raises(StateError, match="ingest"):
            synthesize(p, s, fake_teacher, empty, SilentReporter())
        with pytest.raises(StateError, match="teacher"):
            synthesize(p, s, None, empty, SilentReporter())
