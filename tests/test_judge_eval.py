"""Judge metrics of the held-out evaluation (correctness, faithfulness), the faithfulness guard of
the gate and the pairwise win rate judged in both orders, all with a scripted judge."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from sqlalchemy import select

from tests.helpers import deep_merge, ingest_project
from tuneloop import loop, metrics
from tuneloop.artifacts import read_jsonl, write_jsonl
from tuneloop.evalsets import eval_examples, eval_set_hash, references
from tuneloop.programs import scoring
from tuneloop.programs.judge import ComparePair, JudgeCorrect, build_judge, parse_yes_no, parsed_yes_no
from tuneloop.programs.synth import JudgeGrounding
from tuneloop.progress import SilentReporter
from tuneloop.stages import eval as evaluate  # the eval step module
from tuneloop.stages.judge_eval import judge_items
from tuneloop.steps import to_row
from tuneloop.store import Chunk, Cycle, EvalRun, ModelVersion, open_store
from tuneloop.versions import ensure_base_version

DOES_NOT_SAY = "The document does not say."
GARBLED = "zzz qqq"  # the scripted judge gives no verdict on this answer


def field(conv, label: str) -> str:
    return re.search(rf"^{label}:[ \n](.*)$", conv[-1]["content"], re.M).group(1).strip()


def shown_excerpts(conv) -> str:
    user = conv[-1]["content"]
    return user.split("Excerpts:\n", 1)[1].split("\nQuestion:", 1)[0] if "Excerpts:" in user else ""


def correct_by_reference(conv) -> str:
    answer = field(conv, "Answer")
    if answer == GARBLED:
        return "I am not sure what to say."
    return "Yes, it matches." if answer == field(conv, "Reference") else "No, it differs."


def faithful_by_excerpts(conv) -> str:
    answer = field(conv, "Answer")
    if answer == GARBLED:
        return "Hard to tell."
    return "Yes." if answer.lower() in shown_excerpts(conv).lower() else "No, not in the excerpts."


def first_position(conv) -> str:
    return "1. The first answer is better."


class FakeJudge:
    """Replies to JudgeCorrect, JudgeGrounding and ComparePair prompts (plain-chat adapter)."""

    name = "fake-judge"

    def __init__(self, correct=correct_by_reference, faithful=faithful_by_excerpts, compare=first_position):
        self.handlers = {JudgeCorrect.instructions: correct, JudgeGrounding.instructions: faithful,
                         ComparePair.instructions: compare}
        self.sent: list = []

    def chat(self, conversations, params):
        assert params.temperature == 0.0
        self.sent += conversations
        return [self.handlers[conv[0]["content"]](conv) for conv in conversations]

    def kinds(self) -> list[str]:
        names = {JudgeCorrect.instructions: "correct", JudgeGrounding.instructions: "faithful",
                 ComparePair.instructions: "compare"}
        return [names[c[0]["content"]] for c in self.sent]


# --------------------------------------------------------------------------- parsing


@pytest.mark.parametrize("reply, verdict", [
    ("Yes.", True), ("No - the answer adds a date", False), ("Supported: no", False), ("Incorrect.", False),
    ("Correct: yes", True), ("Not supported by the excerpts", False), ("Yesterday it was", None), ("Maybe", None),
])
def test_parse_yes_no(reply, verdict):
    assert parse_yes_no(reply) is verdict
    assert parsed_yes_no({"supported": reply}, "supported") is verdict  # DSPy adapters' string fields


# --------------------------------------------------------------------------- per-item metrics


def test_correctness_and_faithfulness_are_scored_as_the_judge_says(project):
    p = project(pairs=False)
    ingest_project(p)
    with open_store(p.store_url)() as s:
        chunks = list(s.scalars(select(Chunk).order_by(Chunk.id)))
        name = "Northwind Robotics GmbH"
        with_name = next(c.id for c in chunks if name in c.text)
        without = next(c.id for c in chunks if name.lower() not in c.text.lower())
        items = [
            {"question": "Who is the Customer?", "references": [name], "prediction": name, "chunk_ids": [with_name]},
            {"question": "What is the term?", "references": ["three (3) years"], "prediction": name,
             "chunk_ids": [without]},
            {"question": "Who signs?", "references": ["the CEO"], "prediction": GARBLED, "chunk_ids": [with_name]},
        ]
        judge = FakeJudge()
        summary = judge_items(p, s, items, build_judge(p, judge), SilentReporter())
    assert [it["judge_correct"] for it in items] == [1, 0, None]
    assert [it["judge_faithful"] for it in items] == [1, 0, None]
    assert summary == {"judge_correctness": 0.5, "judge_correct_n": 2, "judge_faithfulness": 0.5,
                       "judge_faithful_n": 2, "judge_unparsed": 2}  # the garbled item is counted, not scored
    assert sorted(judge.kinds()) == ["correct"] * 3 + ["faithful"] * 3
    faithful_prompts = [c for c, k in zip(judge.sent, judge.kinds()) if k == "faithful"]
    assert name in shown_excerpts(faithful_prompts[0]) and name not in shown_excerpts(faithful_prompts[1])


class ScriptedStudent:
    """Answers each question of its script (question -> answer) with the scripted answer."""

    name = "scripted-student"

    def __init__(self, script: dict[str, str]):
        self.script = script

    def chat(self, conversations, params):
        return [self.script[conv[-1]["content"].rsplit("Question:", 1)[1].strip()] for conv in conversations]


@pytest.mark.parametrize("on", [True, False])
def test_evaluate_version_stores_the_judge_metrics_only_when_on(project, monkeypatch, on):
    p = project({"eval": {"judge_metrics": on}})
    retriever = ingest_project(p)
    judge = FakeJudge(faithful=lambda conv: "No." if field(conv, "Answer") == DOES_NOT_SAY else "Yes.")
    with open_store(p.store_url)() as s:
        examples = eval_examples(p, s)
        assert len(examples) == 6
        scripted = [e.answer for e in examples[:3]] + [DOES_NOT_SAY, DOES_NOT_SAY, GARBLED]
        student = ScriptedStudent({e.question: a for e, a in zip(examples, scripted)})
        monkeypatch.setattr(scoring, "build_chat_model", lambda proj, role, adapter=None: student)
        factory = (lambda: build_judge(p, judge)) if on else (lambda: pytest.fail("judge built while off"))
        run = evaluate.evaluate_version(p, s, ensure_base_version(p, s), retriever, SilentReporter(), judge=factory)
        s.commit()
        stored = json.loads((Path(run.artifact_path) / "metrics.json").read_text())
        rows = read_jsonl(Path(run.artifact_path) / "predictions.jsonl")
    if not on:
        assert not any(k.startswith("judge_") for k in run.metrics) and "judge_correct" not in rows[0]
        return
    # correct: 3 references + 2 refusals = 3 of 5 parsed; the garbled answer is unparsed
    # faithful: 3 references and the garbled answer "Yes", the 2 refusals "No" = 4 of 6
    expected = {"judge_correctness": 0.6, "judge_correct_n": 5, "judge_faithfulness": pytest.approx(4 / 6),
                "judge_faithful_n": 6, "judge_unparsed": 1}
    assert {k: run.metrics[k] for k in expected} == expected
    assert {k: stored[k] for k in expected} == expected  # in the artifact's metrics.json too
    assert [r["judge_correct"] for r in rows] == [1, 1, 1, 0, 0, None]
    assert [r["judge_faithful"] for r in rows] == [1, 1, 1, 0, 0, 1]


# --------------------------------------------------------------------------- gate


def _eval_run(tmp_path, s, version, examples, set_hash, predict, extra=None) -> EvalRun:
    rows = [{"example_id": e.id, "question": e.question, "references": references(e),
             "prediction": predict(i, references(e)[0]), "chunk_ids": []} for i, e in enumerate(examples)]
    folder = tmp_path / f"run-{version.name}"
    folder.mkdir()
    write_jsonl(folder / "predictions.jsonl", rows)
    run = EvalRun(model_version_id=version.id, eval_set_hash=set_hash, n=len(rows),
                  metrics={**metrics.aggregate(rows), **(extra or {})}, artifact_path=str(folder))
    s.add(run)
    s.flush()
    return run


def right(i: int, ref: str) -> str:
    return ref


def wrong(i: int, ref: str) -> str:
    return {"Yes": "No", "No": "Yes"}.get(ref, f"something else entirely {i}")


@pytest.fixture
def gate_step(project, tmp_path, monkeypatch):
    """`run(overrides, cand_faith, champ_faith, champ_predict)`: a cycle whose candidate answers every
    held-out question right and the champion none (unless `champ_predict`); runs the gate step."""
    def run(overrides=None, cand_faith=None, champ_faith=None, champ_predict=wrong, judge=None):
        import tuneloop.models.registry as registry

        p = project(deep_merge({"eval": {"significance": "none"}}, overrides or {}))
        monkeypatch.setattr(registry, "build_chat_model", lambda proj, role, adapter=None: (
            judge if judge is not None and role is proj.settings.models.judge else pytest.fail("model built")))
        s = open_store(p.store_url)()
        base = ensure_base_version(p, s)
        cycle = Cycle(trigger="test")
        s.add(cycle)
        s.flush()
        cand = ModelVersion(name="v1", parent_id=base.id, base_model=base.base_model, method="sft",
                            status="candidate", adapter_path=str(tmp_path / "adapter"), cycle_id=cycle.id)
        s.add(cand)
        s.flush()
        examples = eval_examples(p, s)
        set_hash = eval_set_hash(examples)
        faith = [{} if f is None else {"judge_faithfulness": f} for f in (cand_faith, champ_faith)]
        _eval_run(tmp_path, s, cand, examples, set_hash, right, faith[0])
        _eval_run(tmp_path, s, base, examples, set_hash, champ_predict, faith[1])
        result = to_row(loop.step_gate(loop.CycleContext(p, SilentReporter(), cycle.id), s))  # as stored
        return result, cand, base, s
    return run


def test_a_faithfulness_drop_past_the_tolerance_refuses_a_better_candidate(gate_step):
    result, cand, base, s = gate_step(cand_faith=0.70, champ_faith=0.90)
    assert not result["promoted"] and (cand.status, base.status) == ("rejected", "champion")
    assert "macro_score 1.0000 beats champion" in result["reason"]  # it would have been promoted
    assert "refused by guard: judge_faithfulness fell from 0.900 to 0.700" in result["reason"]
    assert "pairwise" not in result and "pairwise" not in cand.metrics  # eval.judge_metrics is off


@pytest.mark.parametrize("cand_faith, champ_faith", [(0.87, 0.90), (0.95, 0.90), (None, 0.90), (0.5, None)])
def test_faithfulness_within_the_tolerance_or_unjudged_does_not_block(gate_step, cand_faith, champ_faith):
    result, cand, base, s = gate_step(cand_faith=cand_faith, champ_faith=champ_faith)
    assert result["promoted"] and (cand.status, base.status) == ("champion", "retired")
    assert "guard" not in result["reason"]


def test_a_stricter_tolerance_refuses_the_same_drop(gate_step):
    result, *_ = gate_step({"eval": {"faithfulness_tolerance": 0.01}}, cand_faith=0.87, champ_faith=0.90)
    assert not result["promoted"] and "judge_faithfulness fell from 0.900 to 0.870" in result["reason"]


# --------------------------------------------------------------------------- pairwise win rate


def test_a_judge_that_prefers_the_first_position_gives_only_ties(gate_step):
    judge = FakeJudge(compare=first_position)
    same_first = lambda i, ref: ref if i == 0 else wrong(i, ref)  # noqa: E731 - question 0: identical answers
    result, cand, base, s = gate_step({"eval": {"judge_metrics": True}}, champ_predict=same_first, judge=judge)
    pw = cand.metrics["pairwise"]
    assert (pw["n"], pw["wins"], pw["losses"], pw["ties"], pw["win_rate"]) == (6, 0, 0, 6, 0.5)
    assert pw["identical"] == 1 and pw["inconsistent"] == 5  # the identical pair needs no judge
    assert pw["position_bias"]["first_position_rate"] == 1.0 and pw["position_bias"]["verdicts"] == 10
    assert judge.kinds() == ["compare"] * 10 and result["pairwise"] == pw
    assert result["promoted"]  # informational: not a gate criterion


def test_a_judge_that_prefers_the_candidate_in_both_orders_gives_win_rate_one(gate_step):
    def prefers_candidate(conv) -> str:  # the champion's answers all start with "off topic"
        return ("2" if field(conv, "Answer 1").startswith("off topic") else "1") + ". It is correct."

    judge = FakeJudge(compare=prefers_candidate)
    result, cand, base, s = gate_step({"eval": {"judge_metrics": True}}, judge=judge,
                                      champ_predict=lambda i, ref: f"off topic {i}")
    pw = cand.metrics["pairwise"]
    assert (pw["n"], pw["wins"], pw["losses"], pw["ties"], pw["win_rate"]) == (6, 6, 0, 0, 1.0)
    assert pw["position_bias"]["first_position_rate"] == 0.5  # the candidate was shown first, then second
    firsts = [field(c, "Answer 1").startswith("off topic") for c in judge.sent]
    assert firsts == [False, True] * 6  # each question: candidate first, then champion first
