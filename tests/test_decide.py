"""Yes/no questions as a calibrated decision: chosen on dev, stored with the version, used by eval and serving."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from tests.helpers import RecordingReporter, ingest_project, prompt_question
from tuneloop.models.base import GenerationParams, Message
from tuneloop.models.local import LocalChatModel
from tuneloop.programs.decide import (
    THRESHOLD_KEY,
    answer_conversations,
    choose_threshold,
    decide,
    decides,
    is_yes_no_question,
    threshold_of,
)
from tuneloop.programs.rag import Retriever
from tuneloop.serve import create_app
from tuneloop.stages.calibrate import calibrate_version, calibration_set
from tuneloop.stages.eval import evaluate_version
from tuneloop.store import Example, ModelVersion, open_store, text_hash
from tuneloop.versions import ensure_base_version


@pytest.mark.parametrize("question,expected", [
    ("Is there a cap on liability?", True),
    ("Does the contract allow assignment to an affiliate?", True),
    ("  can either party terminate for convenience?", True),
    ("Has the Provider agreed to keep insurance?", True),
    ("What is the governing law?", False),
    ("Who are the parties?", False),
    ("Which state's law governs the agreement?", False),
    ("Island rules: what applies?", False),  # "Island" is not "Is"
    ("", False),
])
def test_yes_no_questions_are_told_by_their_wording(question, expected):
    assert is_yes_no_question(question) is expected


def test_the_threshold_maximises_balanced_accuracy():
    # the model leans to "No" (every margin negative) but still ranks the Yes questions higher
    margins = [-4.0, -3.5, -3.0, -2.5, -1.2, -1.0, -0.8]
    labels = [False, False, False, False, True, True, True]
    t = choose_threshold(margins, labels, "dev")
    assert -2.5 < t.value <= -1.2 and t.balanced_accuracy == 1.0 and (t.source, t.n) == ("dev", 7)
    assert [decide(m, t.value) for m in margins] == ["No"] * 4 + ["Yes"] * 3
    assert [decide(m, None) for m in margins] == ["No"] * 7  # uncalibrated: the likelier token always says No


def test_a_threshold_that_beats_zero_only_by_chance_stays_at_zero():
    # 4 dev questions: 0.6 separates them perfectly, but 0 misses only one; on so few that is chance
    t = choose_threshold([1.5, 1.0, 0.2, -0.5], [True, True, False, False], "dev")
    assert t.value == 0.0 and t.balanced_accuracy == 0.75
    # the same shift seen on 24 questions is no longer chance
    margins = [1.5, 1.0, 0.9, 0.8] * 3 + [0.2, 0.3, 0.1, -0.5] * 3
    t = choose_threshold(margins, [True] * 12 + [False] * 12, "dev")
    assert 0.3 < t.value < 0.8 and t.balanced_accuracy == 1.0


def test_the_threshold_must_hold_on_other_documents():
    margins = [1.5, 1.0, 0.9, 0.8] * 3 + [0.2, 0.3, 0.1, -0.5] * 3
    labels = [True] * 12 + [False] * 12
    # six contracts, each with Yes and No questions: a threshold chosen on three holds on the others
    spread = [f"c{i % 6}" for i in range(24)]
    assert 0.3 < choose_threshold(margins, labels, "dev", spread).value < 0.8
    # every Yes question about one contract and every No about another: half of the contracts
    # cannot choose a threshold for the other half, so it stays at the model's own preference
    split = ["a"] * 12 + ["b"] * 12
    t = choose_threshold(margins, labels, "dev", split)
    assert t.value == 0.0 and t.balanced_accuracy == 0.625  # 0.2, 0.3 and 0.1 stay "Yes"


def test_ties_prefer_the_threshold_nearest_zero_and_one_answer_is_refused():
    t = choose_threshold([5.0, -5.0], [True, False], "dev")  # every threshold in (-5, 5] is perfect
    assert t.value == 0.0 and t.balanced_accuracy == 1.0
    with pytest.raises(ValueError, match="both answers"):
        choose_threshold([1.0, 2.0], [True, True], "dev")


class ScriptedScorer:
    """A chat model whose Yes/No margin is scripted per question and whose free replies echo it."""

    name = "scripted"

    def __init__(self, margins: dict[str, float]):
        self.margins, self.chatted, self.scored = margins, [], []

    def chat(self, conversations: list[list[Message]], params: GenerationParams) -> list[str]:
        self.chatted += [prompt_question(c) for c in conversations]
        return [f"free: {prompt_question(c)}" for c in conversations]

    def yes_no_margins(self, conversations: list[list[Message]]) -> list[float]:
        self.scored += [prompt_question(c) for c in conversations]
        return [self.margins[prompt_question(c)] for c in conversations]


def test_yes_no_questions_are_decided_and_the_others_generated():
    model = ScriptedScorer({"Is there an audit right?": -1.0, "Does it renew?": -3.0})
    questions = ["Is there an audit right?", "Who pays?", "Does it renew?"]
    convs = [[{"role": "user", "content": f"Excerpts:\n[1] x\n\nQuestion: {q}"}] for q in questions]
    replies = answer_conversations(model, questions, convs, GenerationParams(), -2.0, decides(model))
    assert [r.text for r in replies] == ["Yes", "free: Who pays?", "No"]
    assert [r.margin for r in replies] == [-1.0, None, -3.0]
    assert model.chatted == ["Who pays?"] and model.scored == ["Is there an audit right?", "Does it renew?"]
    assert not decides(model, program="compiled.json")  # a compiled DSPy program answers in its own format


def test_local_margins_are_the_same_alone_and_in_a_padded_batch(tiny_model_dir):
    model = LocalChatModel(tiny_model_dir, batch_size=4)
    convs = [[{"role": "user", "content": q}] for q in
             ["Is there a cap?", "Does the Supplier indemnify the Customer against third party claims?"]]
    together = model.yes_no_margins(convs)
    alone = [model.yes_no_margins([c])[0] for c in convs]
    assert together == pytest.approx(alone, abs=1e-4)
    assert together[0] != pytest.approx(together[1])  # the prompt matters


def _add(session, question: str, answer: str, split: str, document: str | None) -> None:
    session.add(Example(kind="seed", split=split, question=question, answer=answer, document=document,
                        content_hash=text_hash(question, answer, split)))


def test_the_threshold_is_chosen_on_dev_stored_and_used_by_eval_and_serving(project, monkeypatch):
    proj = project(pairs=False)
    ingest_project(proj)
    # the model leans to "Yes": on dev every "No" question has a margin between 0.1 and 0.3
    dev = {f"Is dev question {i} a yes?": (m, "Yes") for i, m in enumerate([1.5, 1.4, 1.2, 1.0, 0.9, 0.8])}
    dev |= {f"Is dev question {i} a no?": (m, "No") for i, m in enumerate([0.3, 0.25, 0.2, 0.15, 0.1, -0.5])}
    margins = {q: m for q, (m, _) in dev.items()} | {"Is the train question a yes?": 9.0,
                                                      "Does the held-out question hold?": 0.4}
    model = ScriptedScorer(margins)
    monkeypatch.setattr("tuneloop.stages.calibrate.build_chat_model", lambda *a, **k: model)
    monkeypatch.setattr("tuneloop.programs.scoring.build_chat_model", lambda *a, **k: model)
    with open_store(proj.store_url)() as s:
        for q, (_, a) in dev.items():
            _add(s, q, a, "dev", None)
        _add(s, "Is the train question a yes?", "No", "train", None)
        _add(s, "Does the held-out question hold?", "No", "eval", None)
        s.commit()
        examples, source = calibration_set(s)
        assert source == "dev" and len(examples) == 12  # dev has both answers: the train question is not used
        base = ensure_base_version(proj, s)
        retriever = Retriever.load(proj, s, None)
        threshold = calibrate_version(proj, s, base, retriever, RecordingReporter())
        assert 0.3 < threshold.value <= 0.8 and threshold.balanced_accuracy == 1.0
        assert base.hyperparams[THRESHOLD_KEY]["source"] == "dev"
        run = evaluate_version(proj, s, base, retriever, RecordingReporter())
        s.commit()
        assert run.metrics["yes_no_threshold"] == threshold.value
    # the held-out question (margin 0.4) sits between the uncalibrated (0) and the chosen threshold
    with open_store(proj.store_url)() as s:
        items = {e: p for e, p in _predictions(run)}
        assert items["Does the held-out question hold?"] == "No"
        version = s.scalar(select(ModelVersion).where(ModelVersion.name == "base"))
        assert threshold_of(version.hyperparams) == threshold.value

    with TestClient(create_app(proj, model_factory=lambda project, version: model, auth=False)) as c:
        for stream in (False, True):
            r = c.post("/v1/chat/completions", json={"messages": [
                {"role": "user", "content": "Does the held-out question hold?"}], "stream": stream})
            assert r.status_code == 200
            text = r.json()["choices"][0]["message"]["content"] if not stream else "".join(
                part for part in _streamed(r.text))
            assert text == "No"  # 0.4 < threshold: exactly eval's answer, not the uncalibrated "Yes"


def _predictions(run):
    for line in (Path(run.artifact_path) / "predictions.jsonl").read_text().splitlines():
        row = json.loads(line)
        yield row["question"], row["prediction"]


def _streamed(body: str):
    for line in body.splitlines():
        if line.startswith("data: ") and line != "data: [DONE]":
            for choice in json.loads(line[6:]).get("choices", []):
                yield choice.get("delta", {}).get("content") or ""
