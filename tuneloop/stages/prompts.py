"""Stage: compile the student's retrieval-augmented prompt with a DSPy optimiser (prompts are parameters too).

For a model version whose model follows DSPy's formats (an endpoint, or a local model the user
vouches for with `prompts.allow_local`), `compile_rag_program` runs `prompts.optimizer` on the
training seeds (retrieval gives each its excerpts) against the evaluation metric's per-item score,
saves the compiled program as a `programs` artifact and names it in the version's
`hyperparams["rag_program"]`. Evaluation and serving then answer with that program
(`programs/rag_dspy.make_answerer`), so the gate judges the (model, program) pair and the champion
is served with the program it was judged with.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import dspy
from sqlalchemy import select

from tuneloop import metrics
from tuneloop.artifacts import artifact_path, is_complete, read_meta, write_artifact
from tuneloop.config import Project
from tuneloop.errors import ConfigError, StateError
from tuneloop.models import registry
from tuneloop.programs.dspy_bridge import dspy_lm
from tuneloop.programs.rag import PROGRAM_KEY, Retriever
from tuneloop.programs.rag_dspy import RagProgram, program_inputs
from tuneloop.progress import Reporter
from tuneloop.store import Artifact, EvalRun, Example, ModelVersion, Session
from tuneloop.versions import adapter_folder

KIND = "programs"
PROGRAM_FILE = "program.json"
PASS_SCORE = 0.5  # bootstrapping keeps a demo only when its answer scores at least this


@dataclass
class PromptsResult:
    artifact: Path
    program: Path
    report: dict


def check_prompts_usable(project: Project) -> None:
    """Raise ConfigError unless `prompts.optimizer` can run for this project's student."""
    s, student = project.settings.prompts, project.settings.models.student
    if s.optimizer == "none":
        raise ConfigError("prompts.optimizer is none: set it to bootstrap or mipro to compile the RAG program")
    if student.backend == "local" and not s.allow_local:
        raise ConfigError(
            f"prompts.optimizer: {s.optimizer} needs a student that follows DSPy's [[ ## field ## ]] format, and "
            f"the student is a local model ({student.model}); small local models cannot follow DSPy's formats "
            "(every reply is a parse error). Use an endpoint (models.student.backend: openai), set "
            "prompts.allow_local: true for a capable local model, or prompts.optimizer: none")
    if s.optimizer == "mipro":
        try:
            import optuna  # noqa: F401  (MIPROv2's search over instructions and demos)
        except ImportError:
            raise ConfigError("prompts.optimizer: mipro runs DSPy's MIPROv2, which needs the optional package "
                              "optuna (pip install 'tuneloop[mipro]'); or use prompts.optimizer: bootstrap") from None


def rag_metric(example, pred, trace=None) -> float | bool:
    """The eval metric of one answer (`metrics.score_item`): yes/no label correctness for yes/no
    references, else token F1. While bootstrapping (`trace` given): whether it reaches PASS_SCORE."""
    scores = metrics.score_item(str(getattr(pred, "answer", "") or ""), [example.answer])
    score = scores.get("yes_no_correct", scores["token_f1"])
    return score >= PASS_SCORE if trace is not None else score


def build_trainset(session: Session, retriever: Retriever) -> list[dspy.Example]:
    """The training seeds as DSPy examples, each with the excerpts retrieval finds for it."""
    seeds = session.scalars(select(Example).where(Example.kind == "seed", Example.split == "train")
                            .order_by(Example.id))
    return [dspy.Example(**program_inputs(e.question, retriever.retrieve(e.question, e.document)), answer=e.answer)
            .with_inputs("excerpts", "question") for e in seeds]


def _optimizer(project: Project, lm: dspy.LM):
    s = project.settings.prompts
    if s.optimizer == "mipro":
        return dspy.MIPROv2(metric=rag_metric, prompt_model=lm, task_model=lm, auto="light", num_threads=1,
                            max_bootstrapped_demos=s.max_bootstrapped_demos, max_labeled_demos=s.max_labeled_demos)
    return dspy.BootstrapFewShot(metric=rag_metric, max_bootstrapped_demos=s.max_bootstrapped_demos,
                                 max_labeled_demos=s.max_labeled_demos)


def _compile(project: Project, session: Session, version: ModelVersion, retriever: Retriever,
             reporter: Reporter) -> tuple[RagProgram, dict]:
    trainset = build_trainset(session, retriever)
    if not trainset:
        raise StateError("no training seeds to compile the RAG program on: run `tuneloop seeds import FILE` first")
    if project.settings.prompts.optimizer == "mipro" and len(trainset) < 2:
        # MIPROv2 (auto=light, no valset) keeps 80% of the seeds to score candidates, the rest to bootstrap
        # demos from, and refuses fewer than 2; say so in our terms rather than as DSPy's ValueError
        raise StateError(f"prompts.optimizer: mipro needs at least 2 training seeds, found {len(trainset)}: "
                         "import more (`tuneloop seeds import FILE`) or use prompts.optimizer: bootstrap")
    role = project.settings.models.student
    adapter = adapter_folder(version)
    lm = dspy_lm(registry.build_chat_model(project, role, adapter), registry.generation_params(role))
    optimizer = _optimizer(project, lm)
    with reporter.task(f"compiling the RAG program of {version.name} ({type(optimizer).__name__})", None), \
            dspy.context(lm=lm, adapter=dspy.ChatAdapter()):
        compiled = optimizer.compile(RagProgram(), trainset=trainset)
    demos = compiled.respond.demos
    changed = compiled.respond.signature.instructions != RagProgram().respond.signature.instructions
    return compiled, {"optimizer": type(optimizer).__name__, "trainset": len(trainset), "demos": len(demos),
                      "bootstrapped_demos": sum(1 for d in demos if d.get("augmented")),
                      "instructions_changed": changed}  # MIPROv2 picked a proposed instruction


def compile_rag_program(project: Project, session: Session, version: ModelVersion, retriever: Retriever,
                        reporter: Reporter, cycle_id: int | None = None) -> PromptsResult:
    """Compile the RAG program for `version`'s model, save it, link it to the version (caller commits).

    A complete artifact from an earlier run (a crash before the commit) is linked, not recompiled.
    A version already evaluated without a program is refused: its stored eval would not be the pair's.
    """
    check_prompts_usable(project)
    name = f"rag-{version.name}"
    path = artifact_path(project.artifacts, KIND, name)
    if not is_complete(path):
        if session.scalar(select(EvalRun.id).where(EvalRun.model_version_id == version.id).limit(1)) is not None:
            raise StateError(f"{version.name} was already evaluated with the plain prompt; compile its program "
                             "before evaluating it (or compile for a new version)")
        compiled, report = _compile(project, session, version, retriever, reporter)
        meta = {"stage": "prompts", "cycle_id": cycle_id, "version": version.name, "report": report,
                "settings": project.settings.prompts.model_dump()}
        path = write_artifact(project.artifacts, KIND, name, meta, lambda tmp: compiled.save(str(tmp / PROGRAM_FILE)))
    return _record(session, version, path, cycle_id)


def _record(session: Session, version: ModelVersion, path: Path, cycle_id: int | None) -> PromptsResult:
    program = path / PROGRAM_FILE
    version.hyperparams = {**(version.hyperparams or {}), PROGRAM_KEY: str(program)}
    if not session.scalar(select(Artifact).where(Artifact.path == str(path))):
        session.add(Artifact(kind="program", path=str(path),
                             meta={"stage": "prompts", "version": version.name, "cycle_id": cycle_id}))
    session.flush()
    return PromptsResult(path, program, read_meta(path)["report"])
