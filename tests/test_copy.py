"""Extraction answers copied from the passages (programs/copy.py): the same in eval and serving."""
from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from tests.helpers import RecordingReporter, ingest_project, prompt_question
from tuneloop.models.base import GenerationParams, Message
from tuneloop.negative import NEGATIVE_ANSWER
from tuneloop.programs.copy import best_span, copy_answer, strip_lead, strip_restatement
from tuneloop.programs.rag import Retriever
from tuneloop.serve import create_app
from tuneloop.stages.eval import evaluate_version
from tuneloop.store import Example, open_store, text_hash
from tuneloop.versions import ensure_base_version

LAW = "This Agreement is governed by the laws of New South Wales, Australia. Each party submits to the courts."


@pytest.mark.parametrize(("reply", "expected"), [
    ("[2] United States of America", "United States of America"),  # the prompt's excerpt marker
    ("3.2 The law is the Consumer Law", "The law is the Consumer Law"),  # a section number
    ("9. General", "General"),
    ("30 days' written notice", "30 days' written notice"),  # a number that is the answer stays
    ("1.5 years", "1.5 years"),
])
def test_markers_and_section_numbers_are_dropped_answers_are_not(reply, expected):
    assert strip_lead(reply) == expected


def test_a_restated_question_is_dropped_up_to_its_link_word():
    q = "What is the initial term of the master services agreement?"
    assert strip_restatement("The initial term of the master services agreement is three years.", q) == "three years."
    assert strip_restatement("The answer is: 2 years", "How long does it last?") == "2 years"
    # the words before "is" are not the question's: the reply says something of its own
    assert strip_restatement("Delaware law is chosen by the parties", "What law governs?") == (
        "Delaware law is chosen by the parties")
    assert strip_restatement("three (3) years", q) == "three (3) years"  # nothing to drop


def test_the_best_span_is_the_highest_f1_and_the_shortest_among_equals():
    span, f1 = best_span("New South Wales", [LAW])
    assert (span, f1) == ("New South Wales", 1.0)  # not "New South Wales, Australia" (lower F1)
    span, f1 = best_span("laws of New South Wales Australia", ["nothing here", LAW])
    assert span == "laws of New South Wales, Australia" and f1 == 1.0  # trailing "." dropped
    assert best_span("unrelated words", [LAW]) == ("", 0.0)
    # ties on F1 (articles are no F1 token) go to the answer's own words; Markdown emphasis is dropped
    assert best_span("the laws of the State of Delaware", ["governed by the laws of the State of Delaware, without"]
                     ) == ("the laws of the State of Delaware", 1.0)
    assert best_span("Northwind Robotics GmbH", ["and **Northwind Robotics GmbH**, a company"]) == (
        "Northwind Robotics GmbH", 1.0)


def test_a_reply_becomes_the_span_it_points_at_or_stays_when_none_is_close():
    q = "What law governs the supply agreement?"
    assert copy_answer("The law governing the supply agreement is the laws of New South Wales.", q, [LAW]) == (
        "the laws of New South Wales")  # the reply's own "the" kept (ties go to its words)
    # nothing in the passages is close: the (cleaned) reply is kept, not replaced by a random quote
    assert copy_answer("The law governing the supply agreement is the Consumer Law of 2018.", q, [LAW]) == (
        "the Consumer Law of 2018")
    assert copy_answer(NEGATIVE_ANSWER, q, [LAW]) == NEGATIVE_ANSWER
    assert copy_answer("", q, [LAW]) == ""
    # the threshold decides: a loose match replaces only under a lower min_overlap
    loose = "the laws of Victoria, Australia"
    assert copy_answer(loose, q, [LAW], min_overlap=0.9) == loose
    assert copy_answer(loose, q, [LAW], min_overlap=0.3) != loose


class RestatingModel:
    """Answers every question by restating it, then a paraphrase of the governing-law clause."""

    name = "restating"

    def chat(self, conversations: list[list[Message]], params: GenerationParams) -> list[str]:
        return ["[1] The law governing the supply agreement is the laws of New South Wales."
                if "law" in prompt_question(c) else "I cannot tell." for c in conversations]


def test_eval_and_serving_copy_the_same_span(project, monkeypatch):
    proj = project(pairs=False)
    ingest_project(proj)
    model = RestatingModel()
    monkeypatch.setattr("tuneloop.programs.scoring.build_chat_model", lambda *a, **k: model)
    question = "What law governs the supply agreement?"
    with open_store(proj.store_url)() as s:
        s.add(Example(kind="seed", split="eval", question=question, answer="the laws of New South Wales, Australia",
                      document="05-supply-agreement.md", content_hash=text_hash(question, "eval")))
        s.commit()
        base = ensure_base_version(proj, s)
        run = evaluate_version(proj, s, base, Retriever.load(proj, s, None), RecordingReporter())
        s.commit()
    rows = [json.loads(line) for line in (run.artifact_path and open(f"{run.artifact_path}/predictions.jsonl"))]
    assert [r["prediction"] for r in rows] == ["the laws of New South Wales"]
    assert rows[0]["token_f1"] > 0.8 and rows[0]["exact_match"] == 0.0  # "Australia" is missing: F1, not EM

    with TestClient(create_app(proj, model_factory=lambda project, version: model, auth=False)) as c:
        for stream in (False, True):
            r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": question}],
                                                     "document": "05-supply-agreement.md", "stream": stream})
            assert r.status_code == 200, r.text
            if stream:
                pieces = [choice.get("delta", {}).get("content") for line in r.text.splitlines()
                          if line.startswith("data: {") for choice in json.loads(line[6:]).get("choices", [])]
                text = "".join(p for p in pieces if p)
            else:
                text = r.json()["choices"][0]["message"]["content"]
            assert text == "the laws of New South Wales"  # exactly eval's answer

    with TestClient(create_app(proj, model_factory=lambda project, version: model, auth=False)) as c:
        assert c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Who pays?"}]}
                      ).json()["choices"][0]["message"]["content"] == "I cannot tell."  # no close span: kept
