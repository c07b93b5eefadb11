"""RLAIF with scripted models: both-order consistency, position bias, rubric rewards, calibration
against people's choices, prompts, idempotent store rows and `tuneloop rlaif`."""
from __future__ import annotations

import json
import re
from datetime import datetime, timedelta

import pytest
from sqlalchemy import func, select
from typer.testing import CliRunner

from tests.helpers import ingest_project
from tuneloop.artifacts import read_jsonl
from tuneloop.cli import app
from tuneloop.errors import StateError
from tuneloop.programs.judge import (
    ComparePair,
    ScoreAnswer,
    calibration_report,
    combine,
    parse_choice,
    parse_score,
    score_to_reward,
)
from tuneloop.programs.prompts import PromptBuilder
from tuneloop.programs.rag import SYSTEM_PROMPT, Passage, build_messages
from tuneloop.progress import SilentReporter
from tuneloop.stages.rlaif import RlaifModels, collect_prompts, rlaif
from tuneloop.store import (
    Chunk,
    Document,
    Example,
    Feedback,
    Interaction,
    PreferencePair,
    Reward,
    example_hash,
    open_store,
)
from tuneloop.versions import ensure_base_version

T0 = datetime(2025, 1, 1, 12, 0, 0)
DOES_NOT_SAY = "The document does not say."
RANK = {DOES_NOT_SAY: 0, "No": 1, "Yes": 2}  # what the consistent judge prefers


class FakeStudent:
    """Round k of sampling (read from the seed) answers ANSWERS[k]; "Yes." duplicates "Yes"."""

    name = "fake-student"

    def __init__(self, answers=("Yes", "No", "Yes.", DOES_NOT_SAY)):
        self.answers, self.seeds, self.prompts = answers, [], []

    def chat(self, conversations, params):
        assert params.temperature == 0.8
        self.seeds.append(params.seed)
        k = (params.seed % 1_000_000) // 1000
        for conv in conversations:
            assert conv[0]["content"] == SYSTEM_PROMPT
            self.prompts.append(conv)
        return [self.answers[k % len(self.answers)] for _ in conversations]


def field(conv, label: str) -> str:
    return re.search(rf"^{label}:[ \n](.*)$", conv[-1]["content"], re.M).group(1).strip()


def consistent(a1: str, a2: str) -> str:
    if RANK[a1] == RANK[a2]:
        return "Tie."
    return ("1" if RANK[a1] > RANK[a2] else "2") + ". It quotes the excerpt."


def biased(a1: str, a2: str) -> str:
    return "1. The first answer is better."


def rubric(answer: str) -> str:
    return {"Yes": "Correctness: 5, Faithfulness: 5, Brevity: 5", "No": "2 - not what the passage says"}.get(
        answer, "I cannot tell.")


class FakeJudge:
    """Replies to ComparePair and ScoreAnswer prompts (plain-chat adapter) from functions."""

    name = "fake-judge"

    def __init__(self, compare=consistent, score=rubric):
        self.compare, self.score, self.sent = compare, score, []

    def chat(self, conversations, params):
        assert params.temperature == 0.0
        replies = []
        for conv in conversations:
            self.sent.append(conv)
            system = conv[0]["content"]
            if system == ComparePair.instructions:
                replies.append(self.compare(field(conv, "Answer 1"), field(conv, "Answer 2")))
            elif system == ScoreAnswer.instructions:
                replies.append(self.score(field(conv, "Answer")))
            else:  # pragma: no cover
                raise AssertionError(system[:80])
        return replies


@pytest.fixture
def env(project):
    p = project({"feedback": {"rlaif_candidates": 4}}, pairs=False)  # one round per FakeStudent answer
    retriever = ingest_project(p)
    sessions = open_store(p.store_url)
    with sessions() as s:
        ensure_base_version(p, s)
        s.commit()
        ids = list(s.scalars(select(Chunk.id).order_by(Chunk.id)))
    return p, sessions, retriever, ids


def interaction(s, question, answer="Yes", chunk_ids=(), minutes=0, **kw) -> Interaction:
    it = Interaction(question=question, answer=answer, chunk_ids=list(chunk_ids),
                     created_at=T0 + timedelta(minutes=minutes), **kw)
    s.add(it)
    s.flush()
    return it


def stored_prompt(s, question, chunk_ids):
    passages = []
    for cid in chunk_ids:
        c = s.get(Chunk, cid)
        passages.append(Passage(cid, s.get(Document, c.document_id).name, c.text))
    return build_messages(question, passages)


def run(p, s, retriever, student=None, judge=None, **kw):
    models = RlaifModels(student or FakeStudent(), judge or FakeJudge())
    r = rlaif(p, s, models, PromptBuilder(s, lambda: retriever), SilentReporter(), **kw)
    s.commit()
    return r


def two_prompts(s, ids):
    interaction(s, "Does the agreement renew automatically?", chunk_ids=[ids[3], ids[1]], minutes=1)
    interaction(s, "Is there a non-compete clause?", chunk_ids=[ids[2]], minutes=0)
    s.commit()


# --------------------------------------------------------------------------- units


def test_combine_and_parsers():
    assert combine("a", "a") == ("consistent", "a") and combine("b", "b") == ("consistent", "b")
    assert combine("a", "b") == ("inconsistent", None)  # the first position won both times
    assert combine("tie", "tie") == ("tie", None) and combine("tie", "a") == ("inconsistent", None)
    assert combine(None, "a") == ("unparsed", None)
    assert [parse_choice(x) for x in ("2", "Answer 1 is better.", "Tie", "The second one", "hmm")] == [
        "2", "1", "tie", "2", None]
    assert parse_score("Correctness: 5, Faithfulness: 4, Brevity: 3")[0] == 4.0
    assert parse_score("Score: 2/5")[0] == 2.0 and parse_score("great")[0] is None
    assert [score_to_reward(x) for x in (1, 3, 5, 4.5)] == [-1.0, 0.0, 1.0, 0.75]


# --------------------------------------------------------------------------- pairwise


def test_position_biased_judge_keeps_no_pairs(env):
    p, sessions, retriever, ids = env
    with sessions() as s:
        two_prompts(s, ids)
        r = run(p, s, retriever, judge=FakeJudge(compare=biased))
        assert s.scalar(select(func.count(PreferencePair.id))) == 0
    rep = r.report
    assert rep["prompts"]["total"] == 2 and rep["candidates"]["distinct"] == 6  # 3 distinct of 4 per prompt
    assert rep["pairs_judged"] == 6 and rep["inconsistent"] == 6 and rep["kept_pairs"] == r.pairs == 0
    assert rep["position_bias"]["first_position_rate"] == 1.0 and rep["position_bias"]["decisive"] == 12
    assert read_jsonl(r.artifact / "pairs.jsonl") == []
    assert {j["outcome"] for j in read_jsonl(r.artifact / "judgments.jsonl")} == {"inconsistent"}


def test_consistent_judge_yields_pairs_with_rationale(env):
    p, sessions, retriever, ids = env
    student, judge = FakeStudent(), FakeJudge()
    with sessions() as s:
        two_prompts(s, ids)
        r = run(p, s, retriever, student, judge, name="first")
        pairs = list(s.scalars(select(PreferencePair).order_by(PreferencePair.id)))
        renew, compete = "Does the agreement renew automatically?", "Is there a non-compete clause?"
        expected = {renew: stored_prompt(s, renew, [ids[3], ids[1]]), compete: stored_prompt(s, compete, [ids[2]])}
        first_chunk = "[1] " + s.get(Chunk, ids[2]).text.strip()
    rep = r.report
    assert rep["pairs_judged"] == 6 and rep["consistent"] == 6 and rep["kept_pairs"] == len(pairs) == 6
    assert rep["position_bias"]["first_position_rate"] == 0.5
    assert rep["calibration"]["pairs"] == 0 and rep["calibration"]["agreement"] is None
    for pair in pairs:
        assert pair.source == "ai" and RANK[pair.chosen] > RANK[pair.rejected]
        assert pair.meta["rationale"] == "It quotes the excerpt." and pair.meta["judge"] == "fake-judge"
        assert pair.meta["prompt_messages"] == expected[pair.prompt]  # the serving prompt, stored chunks
        assert [v["order"] for v in pair.meta["verdicts"]] == ["ab", "ba"]
        assert len({v["winner"] for v in pair.meta["verdicts"]}) == 1  # the same answer won in both orders
        assert [v["choice"] for v in pair.meta["verdicts"]] in (["1", "2"], ["2", "1"])
    # the student was sampled with the serving prompt, one distinct seed per round
    assert {json.dumps(c) for c in student.prompts} == {json.dumps(m) for m in expected.values()}
    assert len(set(student.seeds)) == 4
    # the judge saw the prompt's passages
    assert any(first_chunk in conv[-1]["content"] for conv in judge.sent)
    # the artifact rows are TRL preference rows
    rows = read_jsonl(r.artifact / "pairs.jsonl")
    assert all(row["chosen"][0]["role"] == "assistant" and row["prompt"][0]["role"] == "system" for row in rows)

    # a rerun (new artifact name, same cached verdicts) adds no duplicate rows
    with sessions() as s:
        again = run(p, s, retriever, FakeStudent(), FakeJudge(), name="second")
        assert again.pairs == 6 and again.added["pairs"] == 0
        assert s.scalar(select(func.count(PreferencePair.id))) == 6
        # a finished artifact is only recorded again, without any model
        done = rlaif(p, s, lambda: pytest.fail("models built"), PromptBuilder(s, None), SilentReporter(), name="first")
        assert done.artifact == r.artifact and done.added["pairs"] == 0


def test_prompts_interactions_first_then_synthetic(env):
    p, sessions, retriever, ids = env
    with sessions() as s:
        interaction(s, "Old question?", chunk_ids=[ids[0]], minutes=0)
        interaction(s, "New question?", chunk_ids=[ids[1]], minutes=5)
        interaction(s, "new question", chunk_ids=[ids[1]], minutes=1)  # the same question again
        for q in ("Who signs the agreement?", "Old question?", "What is the term?"):
            doc = "01-master-services-agreement.md"
            s.add(Example(kind="synthetic", question=q, answer="x", document=doc if q != "Old question?" else None,
                          content_hash=example_hash(q, "x", doc)))
        s.commit()
        prompts = collect_prompts(s, PromptBuilder(s, lambda: retriever), limit=4)
        assert [(x.origin, x.info.question) for x in prompts] == [
            ("interaction", "New question?"), ("interaction", "Old question?"),
            ("synthetic", "What is the term?"), ("synthetic", "Who signs the agreement?")]  # "Old question?" repeats
        assert prompts[0].info.messages == stored_prompt(s, "New question?", [ids[1]])
        assert prompts[0].info.source == "stored" and prompts[2].info.source == "retrieved"
        q, doc = "What is the term?", "01-master-services-agreement.md"
        assert prompts[2].info.messages == build_messages(q, retriever.retrieve(q, doc))
        assert len(collect_prompts(s, PromptBuilder(s, lambda: retriever), limit=1)) == 1
        # then the training seeds' questions; held-out (eval) seeds are never used
        questions = (("Who may terminate?", "train"), ("What law governs?", "eval"), ("What is the term?", "train"))
        for q, split in questions:
            s.add(Example(kind="seed", split=split, question=q, answer="x", document="01-master-services-agreement.md",
                          content_hash=example_hash(q, split, "seed")))
        s.commit()
        prompts = collect_prompts(s, PromptBuilder(s, lambda: retriever), limit=10)
        assert [(x.origin, x.info.question) for x in prompts][4:] == [
            ("seed", "Who may terminate?")]  # "What is the term?" is already there
        assert prompts[-1].example_id is not None


def test_no_prompts_is_a_clear_error(env):
    p, sessions, retriever, ids = env
    with sessions() as s, pytest.raises(StateError, match="no prompts for RLAIF"):
        rlaif(p, s, lambda: pytest.fail("models built"), PromptBuilder(s, None), SilentReporter())


# --------------------------------------------------------------------------- rubric


def test_rubric_mode_writes_rewards_in_range(env):
    p, sessions, retriever, ids = env
    with sessions() as s:
        two_prompts(s, ids)
        r = run(p, s, retriever, mode="rubric")
        rewards = list(s.scalars(select(Reward).order_by(Reward.id)))
        first = run(p, s, retriever, mode="rubric", name="again")
        assert s.scalar(select(func.count(Reward.id))) == len(rewards) and first.added["rewards"] == 0
    assert r.report["mode"] == "rubric" and r.report["pairs_judged"] == 0
    assert r.report["rubric"] == {"scored": 6, "unparsed": 2, "rewards": 4, "mean_reward": 0.25}
    assert len(rewards) == r.rewards == 4
    by_answer = {}
    for rw in rewards:
        assert rw.source == "ai" and -1.0 <= rw.reward <= 1.0 and rw.interaction_id is not None
        assert rw.meta["prompt_messages"][0]["content"] == SYSTEM_PROMPT and rw.meta["judge"] == "fake-judge"
        by_answer[rw.completion] = rw
    assert by_answer["Yes"].reward == 1.0 and by_answer["Yes"].meta["criteria"] == {
        "correctness": 5, "faithfulness": 5, "brevity": 5}
    assert by_answer["No"].reward == -0.5 and by_answer["No"].meta["rationale"] == "not what the passage says"
    assert DOES_NOT_SAY not in by_answer  # the judge gave no score: dropped


# --------------------------------------------------------------------------- calibration


def test_calibration_agreement_with_people(env):
    p, sessions, retriever, ids = env
    with sessions() as s:
        # three A/B choices: people pick Yes, Yes, then No over Yes (the judge prefers Yes)
        picks = [("Yes", "No", 0), ("Yes", DOES_NOT_SAY, 0), ("Yes", "No", 1)]
        for n, (first, second, picked) in enumerate(picks):
            a = interaction(s, f"Question {n}?", first, [ids[n]], ab_pair=f"p{n}", minutes=n)
            b = interaction(s, f"Question {n}?", second, [ids[n]], ab_pair=f"p{n}", minutes=n)
            chosen = (a, b)[picked]
            s.add(Feedback(interaction_id=chosen.id, preferred_interaction_id=chosen.id))
        s.commit()
        r = run(p, s, retriever, limit=1)
    cal = r.report["calibration"]
    assert cal["pairs"] == 3 and cal["agree"] == 2 and cal["disagree"] == 1 and cal["inconsistent"] == 0
    assert cal["agreement"] == pytest.approx(0.6667, abs=1e-4) and cal["agreement_when_consistent"] == cal["agreement"]
    assert cal["by_source"]["human"]["pairs"] == 3
    rows = read_jsonl(r.artifact / "calibration.jsonl")
    assert sorted(row["agrees"] for row in rows) == [False, True, True]
    assert next(row for row in rows if not row["agrees"])["judge_prefers"] == "rejected"

    # a position-biased judge is inconsistent on every human pair: agreement 0
    with sessions() as s:
        s.add(Feedback(interaction_id=1, corrected_answer="Yes, for one year."))
        s.commit()
        biased_run = run(p, s, retriever, judge=FakeJudge(compare=lambda a1, a2: "1"), limit=1, name="biased")
    cal = biased_run.report["calibration"]
    assert cal["pairs"] == 4 and cal["agree"] == 0 and cal["inconsistent"] == 4 and cal["agreement"] == 0.0
    assert cal["by_source"]["correction"]["pairs"] == 1 and cal["position_bias"]["first_position_rate"] == 1.0


def test_calibration_report_counts():
    from tuneloop.programs.judge import Judged

    def j(outcome, winner):
        return Judged("c", "r", ("", ""), ("1", "1"), ("", ""), outcome, winner)

    rep = calibration_report([j("consistent", "a"), j("consistent", "a"), j("consistent", "b"), j("inconsistent", None),
                              j("tie", None)], ["human", "human", "correction", "human", "correction"])
    assert (rep["pairs"], rep["agree"], rep["disagree"], rep["inconsistent"], rep["ties"]) == (5, 2, 1, 1, 1)
    assert rep["agreement"] == 0.4 and rep["agreement_when_consistent"] == pytest.approx(0.6667, abs=1e-4)
    assert rep["by_source"]["correction"]["agreement"] == 0.0


# --------------------------------------------------------------------------- CLI


def test_cli_rlaif(env, monkeypatch):
    import tuneloop.models.registry as registry

    monkeypatch.setenv("COLUMNS", "200")
    p, sessions, retriever, ids = env
    student, judge = FakeStudent(), FakeJudge()

    def build(project, role, adapter=None):
        if role is project.settings.models.student:
            assert adapter is None  # the champion is the base model
            return student
        assert role is project.settings.models.judge
        return judge

    monkeypatch.setattr(registry, "build_chat_model", build)
    runner = CliRunner()
    result = runner.invoke(app, ["rlaif", "-p", str(p.root)])
    assert result.exit_code == 3, result.output
    lines = [ln for ln in result.output.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: no prompts for RLAIF"), result.output
    assert student.prompts == [] and judge.sent == []

    with sessions() as s:
        two_prompts(s, ids)
    result = runner.invoke(app, ["rlaif", "--name", "cli", "-p", str(p.root)])
    assert result.exit_code == 0, (result.output, result.exception)
    assert re.search(r"kept preference pairs\s+│?\s*6 \(6 new", result.output), result.output
    assert "first position wins" in result.output and "0.500" in result.output
    result = runner.invoke(app, ["rlaif", "--mode", "rubric", "-p", str(p.root)])
    assert result.exit_code == 0, (result.output, result.exception)
    assert "rewards (mean)" in result.output and "4 (0.250)" in result.output
    result = runner.invoke(app, ["rlaif", "--mode", "best", "-p", str(p.root)])
    assert result.exit_code != 0 and result.output.startswith("error: --mode"), result.output
    with sessions() as s:
        assert s.scalar(select(func.count(PreferencePair.id))) == 6
        assert s.scalar(select(func.count(Reward.id))) == 4


def test_seed_prompts_are_ranked_by_the_expert_answer_before_the_judge(env):
    p, sessions, retriever, ids = env
    with sessions() as s:
        s.add(Example(kind="seed", split="train", question="Does the agreement renew automatically?", answer="Yes",
                      document="01-master-services-agreement.md", content_hash=example_hash("r", "Yes", "seed")))
        s.commit()
        judge = FakeJudge()
        r = run(p, s, retriever, judge=judge, name="ref")
        # candidates "Yes", "No", DOES_NOT_SAY ("Yes." repeats "Yes"): against the expert's "Yes",
        # Yes beats No and Yes beats DOES_NOT_SAY by the reference; No vs DOES_NOT_SAY (both 0) goes to the judge
        assert r.report["reference_pairs"] == 2 and r.report["pairs_judged"] == 1
        assert len(judge.sent) == 2  # one pair, both orders
        assert {field(c, "Answer 1") for c in judge.sent} == {"No", DOES_NOT_SAY}
        pairs = s.scalars(select(PreferencePair)).all()
        by_judge = {(x.chosen, x.rejected): x.meta["judge"] for x in pairs}
        assert by_judge == {("Yes", "No"): "reference", ("Yes", DOES_NOT_SAY): "reference",
                            ("No", DOES_NOT_SAY): "fake-judge"}
        assert "1.00 vs 0.00" in next(x for x in pairs if x.meta["judge"] == "reference").meta["rationale"]
    # the same project with reference ranking off: every pair is judged
    p2 = p.__class__(p.root, p.settings.model_copy(update={"feedback": p.settings.feedback.model_copy(
        update={"rlaif_reference": False})}))
    with sessions() as s:
        judge = FakeJudge()
        r = run(p2, s, retriever, judge=judge, name="no-ref")
        assert r.report["reference_pairs"] == 0 and r.report["pairs_judged"] == 3 and len(judge.sent) == 6
