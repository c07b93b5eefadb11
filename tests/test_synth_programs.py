"""DSPy programs of the data engine: plain-chat adapter, LM engine, batched predict, DSPy's own
adapters with a capable (scripted) teacher, and prompt optimisation with BootstrapFewShot."""
from __future__ import annotations

import json
import re

import dspy
import pytest

from tests.helpers import ingest_project, passage_phrase
from tuneloop.artifacts import read_jsonl
from tuneloop.models.base import GenerationParams
from tuneloop.programs.dspy_bridge import (
    ChatModelEngine,
    PlainChatAdapter,
    dspy_lm,
    format_many,
    make_adapter,
    predict_many,
)
from tuneloop.programs.rag import SYSTEM_PROMPT
from tuneloop.programs.synth import TASKS, JudgeGrounding, WriteAnswer, WriteQuestion, parse_verdict
from tuneloop.progress import SilentReporter
from tuneloop.stages.synth import synthesize
from tuneloop.store import open_store

PARAMS = GenerationParams(max_new_tokens=32)


class Scripted:
    """A ChatModel replying from a function of the conversation; records what it was sent."""

    def __init__(self, reply, name="scripted"):
        self.reply, self.name, self.sent = reply, name, []

    def chat(self, conversations, params):
        self.sent.extend(conversations)
        return [self.reply(c) for c in conversations]


def field(text: str, name: str) -> str:
    value = text.split(f"[[ ## {name} ## ]]\n", 1)[1].split("\n\n[[ ##", 1)[0]
    return value.split("\n\nRespond with", 1)[0].strip()


class ChatFormatTeacher:
    """A capable teacher: follows DSPy's ChatAdapter format, cites passages, judges True."""

    name = "capable-teacher"

    def __init__(self):
        self.kinds: list[str] = []

    def reply(self, conv) -> str:
        system, user = conv[0]["content"], conv[-1]["content"]
        if system == SYSTEM_PROMPT:  # the round trip uses the student's plain prompt
            self.kinds.append("round_trip")
            q = user.rsplit("Question:", 1)[1].strip()
            return re.match(r"Which terms cover (.+)\?$", q).group(1)
        if "[[ ## supported ## ]]" in system:
            self.kinds.append("judge")
            return "[[ ## supported ## ]]\nTrue\n\n[[ ## rationale ## ]]\nIt is quoted.\n\n[[ ## completed ## ]]"
        if "[[ ## citations ## ]]" in system:
            self.kinds.append("answer")
            q = field(user, "question")
            return (f"[[ ## answer ## ]]\n{re.match(r'Which terms cover (.+)[?]$', q).group(1)}\n\n"
                    "[[ ## citations ## ]]\n[1]\n\n[[ ## completed ## ]]")
        self.kinds.append("question")
        phrase = passage_phrase(field(user, "passage"))
        return f"[[ ## question ## ]]\nWhich terms cover {phrase}?\n\n[[ ## completed ## ]]"

    def chat(self, conversations, params):
        return [self.reply(c) for c in conversations]


def test_plain_adapter_renders_an_ordinary_chat_prompt():
    adapter = PlainChatAdapter()
    predictor = dspy.Predict(WriteQuestion)
    (conv,) = format_many(predictor, adapter, [{"passage": "Governed by the laws of Delaware.", "task": TASKS["fact"]}],
                          demos=[[{"question": "What law governs?"}, {"question": "Who may assign?"}]])
    assert conv[0] == {"role": "system", "content": WriteQuestion.instructions}
    user = conv[1]["content"]
    assert "[[ ##" not in user and "{" not in user
    assert user.index("- Question: What law governs?") < user.index("Passage:") < user.index(TASKS["fact"])
    assert "Task:" not in user  # the instruction is a plain sentence, not a labelled field
    assert user.endswith("Reply with the question only.")
    assert adapter.parse(WriteQuestion, "1. Question: What is the cap?\nAnd more") == {"question": "What is the cap?"}
    assert adapter.parse(WriteAnswer, "Answer: Delaware [2]") == {"answer": "Delaware", "citations": [2]}
    parsed = adapter.parse(JudgeGrounding, "No - it is not there.")
    assert parsed == {"supported": False, "rationale": "it is not there."}
    with pytest.raises(ValueError):
        adapter.parse(JudgeGrounding, "It depends.")
    assert [parse_verdict(x) for x in ("Yes.", "supported: no", "True", "Perhaps")] == [True, False, True, None]


def test_make_adapter_picks_plain_for_local_models():
    assert isinstance(make_adapter("auto", "local"), PlainChatAdapter)
    assert type(make_adapter("auto", "openai")) is dspy.ChatAdapter
    assert type(make_adapter("json", "local")) is dspy.JSONAdapter
    assert isinstance(make_adapter("plain", "openai"), PlainChatAdapter)


def test_engine_runs_dspy_modules_on_a_tuneloop_chat_model():
    model = Scripted(lambda c: "[[ ## question ## ]]\nWhat is the cap?\n\n[[ ## completed ## ]]")
    lm = dspy_lm(model, PARAMS)
    with dspy.context(lm=lm, adapter=dspy.ChatAdapter()):
        out = dspy.Predict(WriteQuestion)(passage="Liability is capped at fees paid.", task=TASKS["fact"])
    assert out.question == "What is the cap?"
    (conv,) = model.sent
    assert conv[0]["role"] == "system" and "[[ ## question ## ]]" in conv[0]["content"]
    assert "Liability is capped at fees paid." in conv[-1]["content"]
    assert isinstance(ChatModelEngine(model, PARAMS).complete.__self__, ChatModelEngine)


def test_predict_many_batches_and_reports_unparseable_replies():
    replies = iter(["[[ ## question ## ]]\nWhat is A?\n\n[[ ## completed ## ]]", "no markers at all",
                    "[[ ## question ## ]]\nWhat is C?\n\n[[ ## completed ## ]]"])
    model = Scripted(lambda c: next(replies))
    predictor = dspy.Predict(WriteQuestion)
    inputs = [{"passage": p, "task": TASKS["fact"]} for p in ("A", "B", "C")]
    out = predict_many(predictor, dspy.ChatAdapter(), model, inputs, PARAMS, batch=2)
    assert [o[0]["question"] if o[0] else None for o in out] == ["What is A?", None, "What is C?"]
    assert out[1][1] == "no markers at all"
    # the predictor's own (optimised) demos take precedence over per-input demos
    predictor.demos = [dspy.Example(passage="X", task="t", question="Fixed demo question?")]
    convs = format_many(predictor, PlainChatAdapter(), inputs[:1], demos=[[{"question": "Per-input demo?"}]])
    assert "Fixed demo question?" in convs[0][1]["content"] and "Per-input demo?" not in convs[0][1]["content"]


@pytest.fixture
def capable(project):
    p = project({"models": {"teacher": {"adapter": "chat"}, "judge": {"adapter": "chat"}},
                 "synth": {"strategies": {"fact": 1.0}}})
    return p, ingest_project(p)


def test_a_capable_teacher_runs_through_dspys_chat_adapter(capable):
    p, retriever = capable
    teacher = ChatFormatTeacher()
    with open_store(p.store_url)() as s:
        r = synthesize(p, s, teacher, retriever, SilentReporter())
        s.commit()
    rows = read_jsonl(r.artifact / "data.jsonl")
    assert r.report["adapter"] == "ChatAdapter" and r.generated == 6 and r.kept >= 4
    assert not {"format", "grounding (judge)", "answer"} & set(r.rejected)  # every reply parsed and passed
    for row in rows:
        assert row["citations_inferred"] is False and row["chunk_ids"] == row["context_chunk_ids"][:1]
        assert row["scores"]["judge_supported"] is True and row["scores"]["judge_rationale"] == "It is quoted."
    assert {"question", "answer", "judge", "round_trip"} == set(teacher.kinds)


def test_bootstrap_optimises_the_question_writer_for_a_capable_teacher(capable):
    p, retriever = capable
    p.settings.synth.optimize = "bootstrap"
    teacher = ChatFormatTeacher()
    with open_store(p.store_url)() as s:
        r = synthesize(p, s, teacher, retriever, SilentReporter())
        s.commit()
    opt = r.report["optimized"]
    assert opt["optimizer"] == "BootstrapFewShot" and opt["trainset"] > 0 and opt["demos"] > 0
    saved = json.loads((r.artifact / "programs.json").read_text())
    demos = saved["write_question"]["demos"]
    assert len(demos) == opt["demos"] and all(d["question"].endswith("?") for d in demos)
    assert r.kept > 0


def test_bootstrap_is_skipped_with_the_plain_adapter(project, fake_teacher):
    p = project({"synth": {"optimize": "bootstrap"}})
    retriever = ingest_project(p)
    with open_store(p.store_url)() as s:
        r = synthesize(p, s, fake_teacher, retriever, SilentReporter())
    assert "plain" in r.report["optimized"]["skipped"]
    assert json.loads((r.artifact / "programs.json").read_text())["write_question"]["demos"] == []
