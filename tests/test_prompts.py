"""Compiled prompts: the RAG program compiled with DSPy's BootstrapFewShot (or MIPROv2) for a model
version, saved and linked to it; evaluation, gate and serving use the (model, program) pair; the cycle step."""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
from sqlalchemy import select

from tests.helpers import HELDOUT, SEEDS, ingest_project
from tuneloop import loop
from tuneloop.artifacts import read_jsonl, read_meta
from tuneloop.errors import ConfigError, StateError
from tuneloop.models.base import GenerationParams
from tuneloop.programs.rag import PROGRAM_KEY, SYSTEM_PROMPT, RagAnswerer
from tuneloop.programs.rag_dspy import CompiledRag, make_answerer
from tuneloop.progress import SilentReporter
from tuneloop.serve.auth import Caller
from tuneloop.serve.chat import ChatHandler
from tuneloop.serve.limits import KeyLimits
from tuneloop.serve.schemas import ChatRequest
from tuneloop.serve.state import ModelState
from tuneloop.stages.eval import evaluate_version
from tuneloop.stages.prompts import compile_rag_program, rag_metric
from tuneloop.store import Artifact, Cycle, CycleStep, EvalRun, ModelVersion, open_store
from tuneloop.versions import ensure_base_version

GOLD = {row["question"]: row["answer"] for path in (SEEDS, HELDOUT) for row in read_jsonl(path)}
NOT_SURE = "I am not sure."
ENDPOINT_STUDENT = {"models": {"student": {"backend": "openai", "base_url": "http://127.0.0.1:9/v1",
                                           "model": "capable-student"}}}


def field(text: str, name: str) -> str:
    return text.split(f"[[ ## {name} ## ]]\n", 1)[1].split("\n\n", 1)[0].strip()


class DemoLearner:
    """A capable student that follows DSPy's ChatAdapter format and answers right only when its
    prompt holds worked examples (assistant turns); the plain student prompt gets "I am not sure."."""

    name = "capable-student"

    def __init__(self):
        self.sent: list[list[dict]] = []

    def reply(self, conv) -> str:
        if conv[0]["content"] == SYSTEM_PROMPT:  # build_messages: no DSPy format, no demos
            return NOT_SURE
        assert "[[ ## excerpts ## ]]" in conv[0]["content"], conv[0]["content"][:200]
        demos = sum(m["role"] == "assistant" for m in conv)
        answer = GOLD[field(conv[-1]["content"], "question")] if demos else NOT_SURE
        return f"[[ ## answer ## ]]\n{answer}\n\n[[ ## completed ## ]]"

    def chat(self, conversations, params):
        self.sent.extend(conversations)
        return [self.reply(c) for c in conversations]


class FormatFollower(DemoLearner):
    """A capable student for *any* DSPy signature (MIPROv2's proposer asks for a dataset summary, a
    program description and instructions): it reads the output fields from ChatAdapter's system
    message ("Your output fields are: 1. `name` ...") and answers each in `[[ ## name ## ]]` format.
    A proposed instruction carries PROPOSED; the RAG `answer` is right only when the prompt holds
    demos or a proposed instruction, so a right answer shows the optimiser's result was used."""

    def __init__(self):
        super().__init__()
        self.proposals = 0

    def reply(self, conv) -> str:
        system = conv[0]["content"]
        if system == SYSTEM_PROMPT:  # build_messages: no DSPy format, no demos
            return NOT_SURE
        block = system.split("Your output fields are:\n", 1)[1].split("\nAll interactions", 1)[0]
        names = re.findall(r"^\d+\. `(\w+)`", block, re.M)
        assert names, system[:300]
        return "".join(f"[[ ## {n} ## ]]\n{self.value(n, conv)}\n\n" for n in names) + "[[ ## completed ## ]]"

    def value(self, name: str, conv) -> str:
        if name == "answer":
            assert "[[ ## excerpts ## ]]" in conv[0]["content"], conv[0]["content"][:200]
            demos = any(m["role"] == "assistant" for m in conv)
            told = PROPOSED in conv[0]["content"]
            return GOLD[field(conv[-1]["content"], "question")] if demos or told else NOT_SURE
        if name == "proposed_instruction":
            self.proposals += 1
            return f"{PROPOSED} (proposal {self.proposals})"
        return f"Some {name.replace('_', ' ')} of this task."


PROPOSED = "Quote the exact words of the excerpts that answer the question"


def use_as_student(monkeypatch, fake):
    """The student role (compile and eval) is `fake`; other roles are untouched."""
    import tuneloop.models.registry as registry
    import tuneloop.programs.scoring as scoring

    real = registry.build_chat_model

    def build(project, role, adapter=None):
        return fake if role is project.settings.models.student else real(project, role, adapter)

    monkeypatch.setattr(registry, "build_chat_model", build)
    monkeypatch.setattr(scoring, "build_chat_model", build)
    return fake


@pytest.fixture
def student(monkeypatch):
    """The student role (compile and eval) is the DemoLearner; other roles are untouched."""
    return use_as_student(monkeypatch, DemoLearner())


def setup(project, overrides: dict | None = None):
    """A project (endpoint student, bootstrap) with base as champion and a cycle's candidate v1."""
    over = {**ENDPOINT_STUDENT, "prompts": {"optimizer": "bootstrap"}, **(overrides or {})}
    p = project(over)
    ingest_project(p)
    sessions = open_store(p.store_url)
    with sessions() as s:
        base = ensure_base_version(p, s)
        cycle = Cycle(trigger="test")
        s.add(cycle)
        s.flush()
        s.add(ModelVersion(name="v1", parent_id=base.id, base_model=base.base_model, adapter_path=None,
                           method="sft", status="candidate", cycle_id=cycle.id))
        s.commit()
        ctx = loop.CycleContext(p, SilentReporter(), cycle.id)
    return p, sessions, ctx


def version(s, name: str) -> ModelVersion:
    return s.scalar(select(ModelVersion).where(ModelVersion.name == name))


def test_metric_follows_the_eval_metric():
    ex = type("Ex", (), {"answer": "sixty (60) days"})
    pred = lambda a: type("Pred", (), {"answer": a})  # noqa: E731
    assert rag_metric(ex, pred("sixty (60) days")) == 1.0 and rag_metric(ex, pred("60 days")) == pytest.approx(0.8)
    assert rag_metric(ex, pred("ninety (90) days")) == pytest.approx(1 / 3)  # token F1, as eval scores it
    assert rag_metric(ex, pred("ninety (90) days"), trace=[]) is False  # bootstrapping: below PASS_SCORE
    assert rag_metric(ex, pred("60 days"), trace=[]) is True
    yes = type("Ex", (), {"answer": "Yes"})
    assert rag_metric(yes, pred("Yes, it does.")) == 1.0 and rag_metric(yes, pred("No")) == 0.0


def test_compiling_saves_demos_and_links_the_program_to_the_version(project, student):
    p, sessions, ctx = setup(project)
    with sessions() as s:
        r = compile_rag_program(p, s, version(s, "v1"), ctx.retriever(s), SilentReporter(), ctx.cycle_id)
        s.commit()
    assert r.report["optimizer"] == "BootstrapFewShot" and r.report["trainset"] == 20
    assert r.report["demos"] == r.report["bootstrapped_demos"] == p.settings.prompts.max_bootstrapped_demos
    saved = json.loads(r.program.read_text())
    demos = saved["respond"]["demos"]
    assert len(demos) == 4 and all(d["augmented"] and d["answer"] == GOLD[d["question"]] for d in demos)
    assert all(d["excerpts"].startswith("[1] ") for d in demos)  # retrieval gave each seed its excerpts
    assert read_meta(r.artifact)["version"] == "v1" and r.artifact.parent.name == "programs"
    with sessions() as s:
        assert version(s, "v1").hyperparams[PROGRAM_KEY] == str(r.program)
        assert PROGRAM_KEY not in (version(s, "base").hyperparams or {})
        assert [a.kind for a in s.scalars(select(Artifact))] == ["program"]
        # a rerun (e.g. a crash before the commit) links the complete artifact without compiling again
        calls = len(student.sent)
        again = compile_rag_program(p, s, version(s, "v1"), ctx.retriever(s), SilentReporter(), ctx.cycle_id)
        s.commit()
        assert again.program == r.program and len(student.sent) == calls
        assert len(s.scalars(select(Artifact)).all()) == 1
    assert len(CompiledRag(r.program).program.respond.demos) == 4


def test_cycle_steps_compile_then_eval_and_gate_judge_the_pair(project, student):
    p, sessions, ctx = setup(project)
    assert loop.STEPS.index("wise") < loop.STEPS.index("prompts") < loop.STEPS.index("eval")
    for name in ("prompts", "eval", "gate"):
        loop.run_step(sessions, ctx, name)
    with sessions() as s:
        cand, base = version(s, "v1"), version(s, "base")
        program = json.loads(open(cand.hyperparams[PROGRAM_KEY]).read())
        demo_questions = {d["question"] for d in program["respond"]["demos"]}
        runs = {r.model_version_id: r for r in s.scalars(select(EvalRun))}
        preds = read_jsonl(Path(runs[cand.id].artifact_path) / "predictions.jsonl")
        assert all(row["prediction"] == GOLD[row["question"]] for row in preds)  # parsed answer field only
        assert runs[cand.id].metrics["macro_score"] == 1.0 and runs[base.id].metrics["macro_score"] == 0.0
        assert cand.status == "champion" and base.status == "retired"
    # the candidate's eval prompts carried the compiled demos; the base version kept the plain prompt
    heldout = set(row["question"] for row in preds)
    cand_prompts = [c for c in student.sent if c[0]["content"] != SYSTEM_PROMPT
                    and field(c[-1]["content"], "question") in heldout]
    assert len(cand_prompts) == len(preds)
    assert all({field(m["content"], "question") for m in c if m["role"] == "user"} >= demo_questions
               for c in cand_prompts)
    assert sum(c[0]["content"] == SYSTEM_PROMPT for c in student.sent) == len(preds)


def test_the_champion_is_served_with_its_program(project, student):
    p, sessions, ctx = setup(project)
    for name in ("prompts", "eval", "gate"):
        loop.run_step(sessions, ctx, name)
    state = ModelState(p, sessions, model_factory=lambda project, v: student)
    served = state.load()
    assert served.champion.name == "v1" and served.champion.program is not None
    question = read_jsonl(HELDOUT)[0]["question"]
    req = ChatRequest(messages=[{"role": "user", "content": question}])
    handler = ChatHandler(p, sessions, KeyLimits(0, 0))
    body = json.loads(handler(req, served, Caller("test")).body)
    assert body["choices"][0]["message"]["content"] == GOLD[question]  # no [[ ## ]] markers
    last = student.sent[-1]
    assert sum(m["role"] == "assistant" for m in last) == 4 and "[[ ## excerpts ## ]]" in last[0]["content"]
    streamed = "".join(handler(ChatRequest(messages=req.messages, stream=True), served, Caller("test")))
    assert json.dumps(GOLD[question])[1:-1] in streamed and "[[ ##" not in streamed


def test_plain_path_is_unchanged_without_a_program(project, student):
    p, sessions, ctx = setup(project)
    params = GenerationParams(max_new_tokens=8)
    with sessions() as s:
        retriever = ctx.retriever(s)
        assert type(make_answerer(retriever, student, params)) is RagAnswerer
        run = evaluate_version(p, s, version(s, "v1"), retriever, SilentReporter())
        assert run.metrics["macro_score"] == 0.0
        assert all(c[0]["content"] == SYSTEM_PROMPT for c in student.sent)
        # compiling now would leave the stored eval describing the plain prompt: refused
        with pytest.raises(StateError, match="already evaluated"):
            compile_rag_program(p, s, version(s, "v1"), retriever, SilentReporter())


def test_optimizer_none_skips_the_step(project, student):
    p, sessions, ctx = setup(project, {"prompts": {"optimizer": "none"}})
    assert p.settings.prompts.optimizer == "none"
    loop.run_step(sessions, ctx, "prompts")
    with sessions() as s:
        step = s.scalar(select(CycleStep).where(CycleStep.name == "prompts"))
        assert (step.status, step.result) == ("done", {"skipped": "prompts.optimizer is none"})
        assert PROGRAM_KEY not in (version(s, "v1").hyperparams or {}) and not s.scalars(select(Artifact)).all()
    assert student.sent == [] and not (p.artifacts / "programs").exists()


def test_a_local_student_is_refused_unless_allowed(project, student):
    p, sessions, ctx = setup(project, {"models": {}})  # the default local student
    assert p.settings.models.student.backend == "local" and not p.settings.prompts.allow_local
    with sessions() as s:
        with pytest.raises(ConfigError, match="cannot follow DSPy's formats") as err:
            compile_rag_program(p, s, version(s, "v1"), ctx.retriever(s), SilentReporter())
        assert "prompts.allow_local: true" in str(err.value) and student.sent == []
        p.settings.prompts.allow_local = True  # the user vouches for the local model
        r = compile_rag_program(p, s, version(s, "v1"), ctx.retriever(s), SilentReporter())
        assert r.report["demos"] == 4


def test_mipro_without_optuna_is_a_clear_config_error(project, student, monkeypatch):
    p, sessions, ctx = setup(project, {"prompts": {"optimizer": "mipro"}})
    monkeypatch.setitem(sys.modules, "optuna", None)  # import optuna -> ImportError
    with sessions() as s:
        with pytest.raises(ConfigError, match="optuna"):
            compile_rag_program(p, s, version(s, "v1"), ctx.retriever(s), SilentReporter())
    assert student.sent == []


def test_a_served_challenger_picks_up_its_new_program_without_reloading_the_model(project, student):
    p, sessions, ctx = setup(project)
    built: list[str] = []
    state = ModelState(p, sessions, model_factory=lambda project, v: built.append(v.name) or student)
    before = state.load()
    assert before.challenger.name == "v1" and before.challenger.program is None
    loop.run_step(sessions, ctx, "prompts")
    assert state.check()
    after = state.current()
    assert after is not before and after.challenger.program is not None
    assert after.challenger.lock is before.challenger.lock and built == ["base", "v1"]  # the model is reused
    assert state.check() and state.current() is after  # nothing changed since: no new snapshot


def test_mipro_compiles_instructions_and_demos_and_eval_uses_them(project, monkeypatch):
    fake = use_as_student(monkeypatch, FormatFollower())
    p, sessions, ctx = setup(project, {"prompts": {"optimizer": "mipro"}})
    with sessions() as s:
        r = compile_rag_program(p, s, version(s, "v1"), ctx.retriever(s), SilentReporter(), ctx.cycle_id)
        s.commit()
    assert r.report["optimizer"] == "MIPROv2" and r.report["trainset"] == 20
    outputs = {re.findall(r"output fields are:\n1\. `(\w+)`", c[0]["content"])[0] for c in fake.sent}
    assert {"observations", "summary", "program_description", "module_description",
            "proposed_instruction", "answer"} <= outputs  # the proposer ran on the same LM
    assert fake.proposals >= 1
    saved = json.loads(r.program.read_text())["respond"]
    instructions, demos = saved["signature"]["instructions"], saved["demos"]
    assert demos or PROPOSED in instructions  # the optimiser's pick, not the plain program
    assert r.report["demos"] == len(demos) and r.report["instructions_changed"] == (instructions != SYSTEM_PROMPT)
    assert all(d["answer"] == GOLD[d["question"]] for d in demos)
    assert read_meta(r.artifact)["version"] == "v1" and r.artifact.parent.name == "programs"
    with sessions() as s:
        assert version(s, "v1").hyperparams[PROGRAM_KEY] == str(r.program)
        assert [a.kind for a in s.scalars(select(Artifact))] == ["program"]
    compiled = CompiledRag(r.program).program.respond
    assert compiled.signature.instructions == instructions and len(compiled.demos) == len(demos)
    # eval and gate answer through the saved program: right answers for v1, "not sure" for base
    fake.sent.clear()
    for name in ("eval", "gate"):
        loop.run_step(sessions, ctx, name)
    with sessions() as s:
        cand, base = version(s, "v1"), version(s, "base")
        runs = {run.model_version_id: run for run in s.scalars(select(EvalRun))}
        preds = read_jsonl(Path(runs[cand.id].artifact_path) / "predictions.jsonl")
        assert preds and all(row["prediction"] == GOLD[row["question"]] for row in preds)
        assert runs[cand.id].metrics["macro_score"] == 1.0 and runs[base.id].metrics["macro_score"] == 0.0
        assert cand.status == "champion"
    program_prompts = [c for c in fake.sent if c[0]["content"] != SYSTEM_PROMPT]
    assert len(program_prompts) == len(preds)
    assert all(instructions in c[0]["content"] and sum(m["role"] == "assistant" for m in c) == len(demos)
               for c in program_prompts)


def test_mipro_needs_two_seeds(project, monkeypatch):
    import tuneloop.stages.prompts as prompts

    fake = use_as_student(monkeypatch, FormatFollower())
    p, sessions, ctx = setup(project, {"prompts": {"optimizer": "mipro"}})
    real = prompts.build_trainset
    monkeypatch.setattr(prompts, "build_trainset", lambda session, retriever: real(session, retriever)[:1])
    with sessions() as s:
        with pytest.raises(StateError, match="at least 2 training seeds, found 1"):
            compile_rag_program(p, s, version(s, "v1"), ctx.retriever(s), SilentReporter())
    assert fake.sent == []
