"""The cycle: ingest -> feedback -> synth -> (dapt) -> sft -> rlaif -> align -> select -> (wise) -> (prompts)
-> (retriever) -> eval -> gate -> review.

Every step is resumable.

Each step's outputs (artifact rows, examples, model versions) are committed in the same
transaction that marks the step done, and artifacts are renamed into place only when complete.
So after a crash (even kill -9) at any point, running the cycle again skips finished steps,
reuses complete artifacts, resumes training from its last checkpoint, and never duplicates rows.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select

from tuneloop.artifacts import artifact_path, clean_temporary, is_complete, run_name
from tuneloop.config import Project
from tuneloop.errors import ConfigError, StateError
from tuneloop.feedback.routing import route_feedback, store_human
from tuneloop.lock import cycle_lock
from tuneloop.models.registry import build_embedder
from tuneloop.programs.prompts import PromptBuilder
from tuneloop.programs.rag import Retriever
from tuneloop.progress import Reporter
from tuneloop.stages.align import train_align
from tuneloop.stages.anchor import evaluate_anchor
from tuneloop.stages.dapt import dapt_parent, train_dapt
from tuneloop.stages.eval import evaluate_version
from tuneloop.stages.feedback import feedback_to_examples
from tuneloop.stages.gate import decide
from tuneloop.stages.ingest import ensure_index, ingest_paths
from tuneloop.stages.methods import PAIR_METHODS
from tuneloop.stages.prompts import compile_rag_program
from tuneloop.stages.retriever import tune_retriever
from tuneloop.stages.review import build_queue
from tuneloop.stages.rlaif import build_rlaif_models, rlaif
from tuneloop.stages.select import pick_on_dev
from tuneloop.stages.sft import train_sft
from tuneloop.stages.synth import KIND as SYNTH_KIND
from tuneloop.stages.synth import build_synth_models, synthesize
from tuneloop.stages.wise import choose_alpha, dev_examples
from tuneloop.steps import (
    AlignStepResult,
    DaptStepResult,
    EvalStepResult,
    FeedbackStepResult,
    GateStepResult,
    IngestStepResult,
    PromptsStepResult,
    RetrieverStepResult,
    ReviewStepResult,
    RlaifStepResult,
    RoutedCounts,
    SelectStepResult,
    SftStepResult,
    StepResult,
    SynthStepResult,
    WiseStepResult,
    result_type,
    to_row,
)
from tuneloop.store import Chunk, Cycle, CycleStep, Feedback, ModelVersion, Session, open_store, utcnow
from tuneloop.tracking import check_tracking, mirror
from tuneloop.versions import Status, champion, cycle_candidate, ensure_base_version, set_status

# where a dev split comes from, for the steps that skip without one (select, wise)
NO_DEV_SET = "no dev set (feedback.dev_fraction, or tuneloop seeds import FILE --split dev)"
STEPS = ("ingest", "feedback", "synth", "dapt", "sft", "rlaif", "align", "select", "wise", "prompts", "retriever",
         "eval", "gate", "review")


@dataclass
class CycleContext:
    """What the steps of one cycle share; models are built lazily and only once."""

    project: Project
    reporter: Reporter
    cycle_id: int
    _embedder: Any = field(default=None, repr=False)
    _embedder_built: bool = False

    def embedder(self):
        if not self._embedder_built:
            self._embedder = build_embedder(self.project)
            self._embedder_built = True
        return self._embedder

    def retriever(self, session: Session) -> Retriever:
        return Retriever.load(self.project, session, self.embedder())

    def version_retriever(self, session: Session, version: ModelVersion) -> Retriever:
        """The retriever `version` answers with (its own, from the `retriever` step, or the project's)."""
        return Retriever.for_version(self.project, session, version, self.embedder())


def step_ingest(ctx: CycleContext, s: Session) -> IngestStepResult:
    paths = [ctx.project.path(p) for p in ctx.project.settings.documents]
    if paths:
        r = ingest_paths(ctx.project, s, paths, ctx.embedder(), ctx.reporter)
        result = IngestStepResult(added=len(r.added), changed=len(r.changed), unchanged=len(r.unchanged),
                                  embedded=r.embedded, reused=r.reused)
    else:
        result = IngestStepResult(index_rebuilt=ensure_index(ctx.project, s, ctx.embedder(), ctx.reporter))
    if not s.scalar(select(Chunk.id).limit(1)):
        raise StateError("no documents: set `documents:` in tuneloop.yaml or run `tuneloop ingest PATH`")
    return result


def step_feedback(ctx: CycleContext, s: Session) -> FeedbackStepResult:
    """People's feedback becomes training data: A/B choices and corrections -> preference pairs and
    ratings -> rewards in the store (what `tuneloop feedback export` stores; align reads them), and
    corrected and approved answers -> examples (most train SFT, a share joins the held-out set)."""
    settings = ctx.project.settings.feedback
    if not s.scalar(select(Feedback.id).where(Feedback.source == "human").limit(1)):
        return FeedbackStepResult(skipped="no human feedback yet")
    routed = route_feedback(s, PromptBuilder(s, lambda: ctx.retriever(s)), settings.contradiction_rule)
    counts = RoutedCounts(**store_human(s, routed))
    if not settings.corrections_to_examples:
        return FeedbackStepResult(routed=counts)
    return FeedbackStepResult(routed=counts, **feedback_to_examples(ctx.project, s, ctx.cycle_id).as_dict())


def step_synth(ctx: CycleContext, s: Session) -> SynthStepResult:
    done = is_complete(artifact_path(ctx.project.artifacts, SYNTH_KIND, run_name("synth", ctx.cycle_id)))
    models = None if done else build_synth_models(ctx.project, ctx.embedder())
    r = synthesize(ctx.project, s, models, ctx.retriever(s), ctx.reporter, cycle_id=ctx.cycle_id)
    return SynthStepResult(generated=r.generated, kept=r.kept, rejected=r.rejected, artifact=str(r.artifact))


def step_dapt(ctx: CycleContext, s: Session) -> DaptStepResult:
    """Domain-adaptive pre-training on the raw chunks (+ general text), optional; SFT continues it."""
    if not ctx.project.settings.continual.dapt:
        return DaptStepResult(skipped="continual.dapt is false")
    ensure_base_version(ctx.project, s)
    r = train_dapt(ctx.project, s, ctx.reporter, cycle_id=ctx.cycle_id)
    return DaptStepResult(version=r.version.name, first_loss=r.first_loss, last_loss=r.last_loss,
                          artifact=str(r.artifact))


def step_sft(ctx: CycleContext, s: Session) -> SftStepResult:
    ensure_base_version(ctx.project, s)
    parent = dapt_parent(s, ctx.cycle_id)  # None unless the dapt step ran
    r = train_sft(ctx.project, s, ctx.retriever(s), ctx.reporter, cycle_id=ctx.cycle_id, parent=parent)
    return SftStepResult(version=r.version.name, parent=(parent or champion(s)).name, first_loss=r.first_loss,
                         last_loss=r.last_loss, artifact=str(r.artifact))


def _sft_version(s: Session, cycle_id: int) -> ModelVersion | None:
    return s.scalar(select(ModelVersion).where(ModelVersion.cycle_id == cycle_id, ModelVersion.method == "sft"))


def step_rlaif(ctx: CycleContext, s: Session) -> RlaifStepResult:
    """AI feedback on the SFT candidate's own answers (on-policy pairs for the align step)."""
    settings = ctx.project.settings.align
    if not (settings.enabled and settings.ai_feedback):
        return RlaifStepResult(skipped="align.enabled or align.ai_feedback is false")
    if settings.method not in PAIR_METHODS:
        return RlaifStepResult(skipped=f"align.method {settings.method} does not train on preference pairs")
    sft = _sft_version(s, ctx.cycle_id)
    builder = PromptBuilder(s, lambda: ctx.retriever(s))
    try:
        r = rlaif(ctx.project, s, lambda: build_rlaif_models(ctx.project, s, student=sft), builder, ctx.reporter,
                  mode="pairwise", name=run_name("rlaif", ctx.cycle_id), cycle_id=ctx.cycle_id)
    except StateError as err:  # no prompts at all
        ctx.reporter.log(f"rlaif skipped: {err}")
        return RlaifStepResult(skipped=str(err))
    rep = r.report
    return RlaifStepResult(student=sft.name, prompts=rep["prompts"]["total"], pairs_judged=rep["pairs_judged"],
                           kept_pairs=r.pairs, reference_pairs=rep.get("reference_pairs", 0),
                           new_pairs=r.added.get("pairs", 0),
                           consistency_rate=rep["consistency_rate"], artifact=str(r.artifact))


def step_align(ctx: CycleContext, s: Session) -> AlignStepResult:
    """Preference alignment of the SFT candidate when preference data exists (else skipped)."""
    settings = ctx.project.settings.align
    if not settings.enabled:
        return AlignStepResult(skipped="align.enabled is false")
    sft = _sft_version(s, ctx.cycle_id)
    try:
        r = train_align(ctx.project, s, ctx.retriever(s), ctx.reporter, cycle_id=ctx.cycle_id,
                        name=run_name(f"align-{settings.method}", ctx.cycle_id), parent=sft)
    except (StateError, ConfigError) as err:  # no preference data yet, or a method not usable here
        ctx.reporter.log(f"align skipped: {err}")
        return AlignStepResult(skipped=str(err))
    return AlignStepResult(version=r.version.name, method=r.method, parent=sft.name, first_loss=r.first_loss,
                           last_loss=r.last_loss, artifact=str(r.artifact))


def step_select(ctx: CycleContext, s: Session) -> SelectStepResult:
    """When alignment ran: the better of the SFT and the aligned version on the dev set is the candidate."""
    sft, candidate = _sft_version(s, ctx.cycle_id), cycle_candidate(s, ctx.cycle_id)
    if sft is None or candidate.id == sft.id:
        return SelectStepResult(skipped="no aligned version in this cycle", candidate=candidate.name)
    r = pick_on_dev(ctx.project, s, sft, candidate, ctx.retriever(s), ctx.reporter)
    if r is None:  # the SFT version is a step on the way, like a DAPT version: never gated on its own
        set_status(sft, Status.INTERMEDIATE)
        return SelectStepResult(skipped=f"{NO_DEV_SET}: the aligned version is the candidate", candidate=candidate.name)
    return SelectStepResult(candidate=r.chosen.name, dev_scores=r.scores, dev_n=r.n_dev)


def step_wise(ctx: CycleContext, s: Session) -> WiseStepResult:
    """WiSE-FT: average champion and candidate weights, alpha chosen on the dev split (optional)."""
    if not ctx.project.settings.continual.wise_ft:
        return WiseStepResult(skipped="continual.wise_ft is false")
    if not dev_examples(ctx.project, s):  # e.g. cycle 1, before feedback.dev_fraction has routed any
        ctx.reporter.log(f"WiSE-FT skipped: {NO_DEV_SET}")
        return WiseStepResult(skipped=NO_DEV_SET)
    candidate = cycle_candidate(s, ctx.cycle_id)
    r = choose_alpha(ctx.project, s, champion(s), candidate, ctx.retriever(s), ctx.reporter, cycle_id=ctx.cycle_id)
    set_status(candidate, Status.SUPERSEDED)  # the averaged version is what the gate judges
    return WiseStepResult(version=r.version.name, alpha=r.alpha, dev_scores={str(a): v for a, v in r.scores.items()},
                          anchor_scores={str(a): v for a, v in r.anchor.items()} if r.anchor else None,
                          averaged=candidate.name)


def step_prompts(ctx: CycleContext, s: Session) -> PromptsStepResult:
    """Compile the candidate's RAG program with a DSPy optimiser (optional); eval and gate judge the pair."""
    if ctx.project.settings.prompts.optimizer == "none":
        return PromptsStepResult(skipped="prompts.optimizer is none")
    candidate = cycle_candidate(s, ctx.cycle_id)
    r = compile_rag_program(ctx.project, s, candidate, ctx.retriever(s), ctx.reporter, ctx.cycle_id)
    return PromptsStepResult(**{"version": candidate.name, **r.report, "program": str(r.program)})


def step_retriever(ctx: CycleContext, s: Session) -> RetrieverStepResult:
    """Fine-tune the embedder on the training examples' evidence passages; the candidate retrieves
    with it, and eval and the gate judge the pair (`stages/retriever.py`)."""
    r = tune_retriever(ctx.project, s, cycle_candidate(s, ctx.cycle_id), champion(s), ctx.embedder(), ctx.reporter,
                       ctx.cycle_id)
    return RetrieverStepResult(**r)


def step_eval(ctx: CycleContext, s: Session) -> EvalStepResult:
    out = {}
    for version in (champion(s), cycle_candidate(s, ctx.cycle_id)):
        retriever = ctx.version_retriever(s, version)  # each version retrieves as it will be served
        run = evaluate_version(ctx.project, s, version, retriever, ctx.reporter, ctx.cycle_id)
        out[version.name] = {k: v for k, v in run.metrics.items() if v == v}  # drop NaN
        if ctx.project.settings.continual.anchor:  # forgetting shows up as a number
            out[version.name].update(evaluate_anchor(ctx.project, s, version, ctx.reporter, ctx.cycle_id).metrics)
    return EvalStepResult(**out)  # keyed by version name, as stored before the typed results


def step_gate(ctx: CycleContext, s: Session) -> GateStepResult:
    """Promote the candidate or not (`stages/gate.py` decides, and says why); the cycle records the outcome."""
    d = decide(ctx.project, s, cycle_candidate(s, ctx.cycle_id), ctx.reporter)
    cycle = s.get(Cycle, ctx.cycle_id)
    cycle.outcome = ("promoted " if d.promoted else "kept champion; rejected ") + f"{d.candidate}: {d.reason}"
    return GateStepResult(promoted=d.promoted, reason=d.reason, candidate=d.candidate, champion_before=d.champion,
                          pairwise=d.pairwise or None)


def step_review(ctx: CycleContext, s: Session) -> ReviewStepResult:
    """Rebuild the expert review queue with the champion the gate left (`stages/review.py`)."""
    if not ctx.project.settings.review.enabled:
        return ReviewStepResult(skipped="review.enabled is false")
    built = build_queue(ctx.project, s, lambda version: ctx.version_retriever(s, version), ctx.reporter, ctx.cycle_id)
    if built.queue is None:
        return ReviewStepResult(skipped="no question to review (every candidate has a known answer)",
                                version=built.version)
    return ReviewStepResult(queue=built.queue, candidates=built.candidates, opened=built.opened,
                            by_source=built.by_source, mean_informativeness=built.mean_informativeness,
                            unsure_share=built.unsure_share, version=built.version)


STEP_FUNCTIONS: dict[str, Callable[[CycleContext, Session], StepResult]] = {
    "ingest": step_ingest, "feedback": step_feedback, "synth": step_synth, "dapt": step_dapt, "sft": step_sft,
    "rlaif": step_rlaif, "align": step_align, "select": step_select,
    "wise": step_wise, "prompts": step_prompts, "retriever": step_retriever, "eval": step_eval, "gate": step_gate,
    "review": step_review,
}


def _open_cycle(sessions, trigger: str, reporter: Reporter) -> int:
    with sessions() as s:
        cycle = s.scalar(select(Cycle).where(Cycle.status == "running").order_by(Cycle.id.desc()))
        if cycle is not None:
            reporter.log(f"resuming cycle {cycle.id}")
            return cycle.id
        cycle = Cycle(trigger=trigger)
        s.add(cycle)
        s.commit()
        reporter.log(f"starting cycle {cycle.id} (trigger: {trigger})")
        return cycle.id


def run_cycle(project: Project, reporter: Reporter, trigger: str = "manual") -> Cycle:
    """Run (or resume) one cycle to the end and return it. Holds the project's cycle lock
    (`lock.cycle_lock`): while another process runs a cycle this raises `CycleBusy`."""
    if project.settings.compute.engine == "ray":  # join the cluster now: a bad address fails before any step
        from tuneloop.compute.ray_engine import connect  # imports Ray: only with compute.engine: ray

        connect(project.settings.compute)
    check_tracking(project)  # tracking.mlflow without MLflow installed fails now, not after the first step
    with cycle_lock(project.root):
        return _run_cycle(project, reporter, trigger)


def _run_cycle(project: Project, reporter: Reporter, trigger: str) -> Cycle:
    sessions = open_store(project.store_url)
    clean_temporary(project.artifacts)
    cycle_id = _open_cycle(sessions, trigger, reporter)
    ctx = CycleContext(project, reporter, cycle_id)
    for name in STEPS:
        run_step(sessions, ctx, name)
        mirror(project, sessions, reporter.log)  # tracking.mlflow: the step's runs and numbers (never fails)
    with sessions() as s:
        cycle = s.get(Cycle, cycle_id)
        cycle.status, cycle.finished_at = "done", utcnow()
        s.commit()
    mirror(project, sessions, reporter.log)
    with sessions() as s:
        return s.get(Cycle, cycle_id)


def run_step(sessions, ctx: CycleContext, name: str) -> None:
    """Run step `name` of the cycle in `ctx` in its own transaction (skipped when already done); a
    failure is recorded on the step (status "failed", the error) and raised."""
    with sessions() as s:
        step = s.scalar(select(CycleStep).where(CycleStep.cycle_id == ctx.cycle_id, CycleStep.name == name))
        if step is not None and step.status == "done":
            ctx.reporter.log(f"[dim]step {name}: already done[/dim]")
            return
        if step is None:
            step = CycleStep(cycle_id=ctx.cycle_id, name=name)
            s.add(step)
        step.status, step.started_at, step.result = "running", utcnow(), {}
        s.commit()
        ctx.reporter.log(f"[bold]step {name}[/bold]")
        try:
            result = STEP_FUNCTIONS[name](ctx, s)
        except BaseException as err:
            s.rollback()
            step = s.get(CycleStep, step.id)
            step.status, step.result = "failed", to_row(result_type(name)(error=str(err) or type(err).__name__))
            s.commit()
            raise
        step.status, step.result, step.finished_at = "done", to_row(result), utcnow()
        s.commit()
