"""Stage: evaluate model versions on the held-out set, and the promotion gate.

Every version is scored on the same held-out items (split "eval", never trained on) with the
retrieval-augmented program it is served with. Results are stored once per (version, eval set),
so a resumed cycle does not evaluate a version twice.
"""
from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from sqlalchemy import select

from tuneloop import metrics
from tuneloop.artifacts import artifact_path, is_complete, read_jsonl, write_artifact, write_jsonl
from tuneloop.config import Project
from tuneloop.errors import StateError
from tuneloop.models.registry import build_chat_model, generation_params
from tuneloop.programs.rag import Retriever, rag_program_path
from tuneloop.programs.rag_dspy import make_answerer
from tuneloop.progress import Reporter
from tuneloop.splits import question_key
from tuneloop.stages.common import champion
from tuneloop.stats import PairedTest, bootstrap_ci, paired_bootstrap
from tuneloop.store import Artifact, EvalRun, Example, ModelVersion, Session, text_hash, utcnow

KIND = "evals"


def eval_examples(project: Project, session: Session) -> list[Example]:
    q = select(Example).where(Example.split == "eval").order_by(Example.id)
    rows = list(session.scalars(q))
    if project.settings.eval.limit:
        rows = rows[: project.settings.eval.limit]
    return rows


def references(example: Example) -> list[str]:
    """The answer first, then any other accepted answers (e.g. CUAD's highlighted evidence spans)."""
    extra = [r for r in (example.meta or {}).get("references", []) if isinstance(r, str) and r.strip()]
    return [example.answer, *extra]


def eval_set_hash(examples: list[Example]) -> str:
    return text_hash(*[e.content_hash for e in examples])


def ensure_base_version(project: Project, session: Session) -> ModelVersion:
    """The untuned student is version 'base', champion until a candidate beats it."""
    base = session.scalar(select(ModelVersion).where(ModelVersion.name == "base"))
    if base is None:
        base = ModelVersion(name="base", base_model=project.settings.models.student.model, adapter_path=None,
                            method="base", status="champion")
        session.add(base)
        session.flush()
    return base


def stored_eval_run(project: Project, session: Session, version: ModelVersion, set_hash: str, kind: str,
                    artifact_name: str, stage: str, score: Callable[[], tuple[list[dict], dict]],
                    cycle_id: int | None = None) -> EvalRun:
    """The EvalRun of `version` on the set `set_hash`: the stored one; else one recorded from the
    complete artifact; else `score()` (rows, summary) is run and written as the artifact first.
    So a version is scored once per set, even across a crash between artifact and row."""
    run = session.scalar(select(EvalRun).where(EvalRun.model_version_id == version.id,
                                               EvalRun.eval_set_hash == set_hash))
    if run is not None:
        return run
    path = artifact_path(project.artifacts, kind, artifact_name)
    if not is_complete(path):
        rows, summary = score()

        def write(tmp: Path) -> None:
            write_jsonl(tmp / "predictions.jsonl", rows)
            (tmp / "metrics.json").write_text(json.dumps(summary, indent=2))
            if stage == "eval":
                (tmp / "by_category.json").write_text(json.dumps(by_category(rows), indent=2))

        write_artifact(project.artifacts, kind, path.name,
                       {"stage": stage, "version": version.name, "eval_set_hash": set_hash, "n": len(rows),
                        "metrics": summary}, write)
    summary = json.loads((path / "metrics.json").read_text())
    run = EvalRun(model_version_id=version.id, eval_set_hash=set_hash, n=len(read_jsonl(path / "predictions.jsonl")),
                  metrics=summary, artifact_path=str(path), cycle_id=cycle_id)
    session.add(run)
    session.add(Artifact(kind="eval", path=str(path), meta={"stage": stage, "version": version.name}))
    version.metrics = {**(version.metrics or {}), **{k: v for k, v in summary.items() if not _nan(v)}}
    session.flush()
    return run


def score_examples(project: Project, adapter: Path | None, examples: list[Example], retriever: Retriever,
                   reporter: Reporter, program: Path | None = None) -> tuple[list[dict], dict]:
    """Answer `examples` with the retrieval-augmented student (`adapter` applied; `program`: a
    compiled DSPy RAG program, else the plain prompt): per-item rows and the aggregate metrics.
    Shared by the held-out eval and WiSE-FT's dev-set scoring."""
    role = project.settings.models.student
    answerer = make_answerer(retriever, build_chat_model(project, role, adapter), generation_params(role), program)
    answers = answerer.answer_many([(e.question, e.document) for e in examples], reporter, role.batch_size)
    items = []
    for e, a in zip(examples, answers):
        refs = references(e)
        items.append({"example_id": e.id, "question": e.question, "references": refs, "prediction": a.text,
                      "category": (e.meta or {}).get("category") or ("yes/no" if metrics.is_yes_no_reference(
                          refs[0]) else "extraction"),
                      "chunk_ids": [p.chunk_id for p in a.passages],
                      "retrieval_hit": metrics.retrieval_hit([p.text for p in a.passages], refs),
                      **metrics.score_item(a.text, refs)})
    embedder = getattr(retriever, "embedder", None)
    if embedder is not None:
        add_semantic_similarity(items, embedder)
    return items, metrics.aggregate(items)


def add_semantic_similarity(items: list[dict], embedder) -> None:
    """Extraction items get "semantic_similarity": the best cosine between the prediction's and a
    reference's embedding (yes/no items are scored on their label instead)."""
    import numpy as np

    todo = [it for it in items if not metrics.is_yes_no_reference(it["references"][0])]
    if not todo:
        return
    preds = embedder.embed([it["prediction"] for it in todo])
    refs = [r for it in todo for r in it["references"]]
    ref_vecs = embedder.embed(refs)

    def unit(v):
        return v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-12)

    preds, ref_vecs = unit(np.asarray(preds, dtype=float)), unit(np.asarray(ref_vecs, dtype=float))
    start = 0
    for it, p in zip(todo, preds):
        n = len(it["references"])
        it["semantic_similarity"] = float(max(ref_vecs[start:start + n] @ p))
        start += n


def intervals(project: Project, items: list[dict]) -> dict[str, float]:
    """95% (`eval.confidence`) bootstrap interval of the primary metric over the questions."""
    s = project.settings.eval
    scored = metrics.score_items(items)
    ci = bootstrap_ci(len(scored), lambda idx: metrics.summarize([scored[i] for i in idx]).get(s.primary_metric,
                      math.nan), s.bootstrap_resamples, s.confidence)
    return {f"{s.primary_metric}_ci_low": ci.low, f"{s.primary_metric}_ci_high": ci.high}


def by_category(items: list[dict]) -> dict[str, dict[str, float]]:
    """The aggregate metrics of each question category (the seed's `category`, else yes/no or extraction)."""
    groups: dict[str, list[dict]] = {}
    for item in items:
        groups.setdefault(item.get("category") or "-", []).append(item)
    return {name: metrics.aggregate(rows) for name, rows in sorted(groups.items())}


def check_no_overlap(session: Session, examples: list[Example]) -> None:
    """Refuse a held-out set that shares a question (about the same document) with the training
    split: checked on every evaluation, not assumed from how the data was imported."""
    def key(e: Example) -> tuple[str, str]:
        return question_key(e.question, e.document)

    trained = {key(e): e for e in session.scalars(select(Example).where(Example.split == "train"))}
    overlap = [e for e in examples if key(e) in trained]
    if overlap:
        raise StateError(f"{len(overlap)} held-out question(s) are also training questions (e.g. "
                         f"{overlap[0].question!r}, example {overlap[0].id} and {trained[key(overlap[0])].id}): "
                         "remove them from one of the splits")


def evaluate_version(project: Project, session: Session, version: ModelVersion, retriever: Retriever,
                     reporter: Reporter, cycle_id: int | None = None, judge=None) -> EvalRun:
    """Score `version` on the held-out set (reusing a stored run for the same set).

    With `eval.judge_metrics` the judge also rates each answer (`stages/judge_eval.py`); `judge`
    (an EvalJudge or a factory; default: the judge role) is built only when a run is scored."""
    examples = eval_examples(project, session)
    if not examples:
        raise StateError("no held-out questions: import some with `tuneloop seeds import FILE --split eval`")
    check_no_overlap(session, examples)
    set_hash = eval_set_hash(examples)

    def score() -> tuple[list[dict], dict]:
        reporter.log(f"evaluating {version.name} on {len(examples)} held-out questions")
        adapter = Path(version.adapter_path) if version.adapter_path else None
        program = rag_program_path(version)  # the (model, program) pair the gate judges
        items, summary = score_examples(project, adapter, examples, retriever, reporter, program)
        summary = {**summary, **intervals(project, items)}  # not in score_examples: WiSE-FT needs no CI
        if project.settings.eval.judge_metrics:
            from tuneloop.stages.judge_eval import judge_items  # lazy: judge_eval imports feedback.rlaif -> here

            summary.update(judge_items(project, session, items, judge, reporter))
        return items, summary

    return stored_eval_run(project, session, version, set_hash, KIND, f"{version.name}-{set_hash[:12]}", "eval",
                           score, cycle_id)


def _nan(v) -> bool:
    return isinstance(v, float) and math.isnan(v)


@dataclass
class GateDecision:
    promoted: bool
    reason: str
    candidate: str
    champion: str


@dataclass
class PairedRuns:
    """The scored predictions of two eval runs on the questions both answered, read once per gate
    decision; `sources[i]`: where question `ids[i]` came from (its example kind)."""

    cand: list[dict]
    champ: list[dict]
    ids: list[int]
    sources: list[str]

    @classmethod
    def read(cls, session: Session, cand_run: EvalRun, champ_run: EvalRun) -> PairedRuns:
        cand, champ = _scored_by_example(cand_run), _scored_by_example(champ_run)
        ids = sorted(set(cand) & set(champ))
        kinds = example_sources(session, ids)
        return cls([cand[i] for i in ids], [champ[i] for i in ids], ids, [kinds.get(i, "-") for i in ids])


def by_source(rows: list[dict], sources: list[str], idx, primary: str) -> dict[str, float]:
    """The primary metric of each held-out source, on the items `idx` (indices into rows/sources)."""
    groups: dict[str, list[dict]] = {}
    for i in idx:
        groups.setdefault(sources[i], []).append(rows[i])
    return {kind: metrics.summarize(g).get(primary, math.nan) for kind, g in sorted(groups.items())}


def gate_metric(project: Project, rows: list[dict], sources: list[str]) -> Callable:
    """items (indices into `rows`) -> the gate's primary value on them.

    `eval.gate_average: items` (default): the primary metric over all the items. `sources`: the
    mean of the primary metric over the held-out sources (example kinds: the imported set "seed",
    the "feedback" questions from use, ...), each computed on its own items, so the questions of
    new traffic weigh as much as the imported set however few they are (a drift scenario's gain
    on them is not diluted by a larger set of old questions). A source with no item in a
    bootstrap resample is left out of that resample's mean."""
    s = project.settings.eval
    if s.gate_average == "items":
        return lambda idx: metrics.summarize([rows[i] for i in idx]).get(s.primary_metric, math.nan)

    def mean_over_sources(idx) -> float:
        values = [v for v in by_source(rows, sources, idx, s.primary_metric).values() if not _nan(v)]
        return sum(values) / len(values) if values else math.nan

    return mean_over_sources


def example_sources(session: Session, ids: list[int]) -> dict[int, str]:
    """Example id -> its kind (where the held-out question came from)."""
    if not ids:
        return {}
    return dict(session.execute(select(Example.id, Example.kind).where(Example.id.in_(ids))).all())


def significance_test(project: Project, session: Session, cand_run: EvalRun, champ_run: EvalRun,
                      paired: PairedRuns | None = None) -> PairedTest | None:
    """Paired bootstrap of the gate's primary value (`gate_metric`), candidate minus champion,
    over the questions both runs answered (their stored predictions); None when fewer than 2 are shared."""
    s = project.settings.eval
    p = paired or PairedRuns.read(session, cand_run, champ_run)
    if len(p.ids) < 2:
        return None
    return paired_bootstrap(len(p.ids), gate_metric(project, p.cand, p.sources),
                            gate_metric(project, p.champ, p.sources), s.bootstrap_resamples, s.confidence)


def source_guards(project: Project, paired: PairedRuns) -> list[str]:
    """With `eval.gate_average: sources`: why the candidate must not be promoted because its primary
    metric on one held-out source fell more than `eval.source_tolerance` below the champion's
    (a gain on new traffic must not be bought with the old questions); [] with one source."""
    s = project.settings.eval
    if len(set(paired.sources)) < 2:
        return []
    everything = range(len(paired.ids))
    cand, champ = (by_source(rows, paired.sources, everything, s.primary_metric) for rows in (paired.cand, paired.champ))
    reasons = []
    for kind in cand:
        reason = drop_guard(f"{s.primary_metric} on the {kind!r} held-out questions ({paired.sources.count(kind)})",
                            cand[kind], champ[kind], s.source_tolerance)
        reasons += [reason] if reason else []
    return reasons


def predictions_by_example(run: EvalRun) -> dict[int, dict]:
    """The stored per-question rows of an eval run (its predictions.jsonl), by example id."""
    return {row["example_id"]: row for row in read_jsonl(Path(run.artifact_path) / "predictions.jsonl")}


def _scored_by_example(run: EvalRun) -> dict[int, dict]:
    rows = predictions_by_example(run)
    return dict(zip(rows, metrics.score_items(list(rows.values()))))


def drop_guard(metric: str, candidate: float | None, champion: float | None, tolerance: float) -> str | None:
    """Why the candidate must not be promoted: `metric` fell more than `tolerance` below the
    champion's (the gate's guards: anchor set, judge faithfulness); None when it did not or a value is missing."""
    if candidate is None or champion is None or _nan(candidate) or _nan(champion):
        return None
    if candidate < champion - tolerance:
        return f"{metric} fell from {champion:.3f} to {candidate:.3f} (more than the {tolerance} tolerance)"
    return None


def gate(project: Project, session: Session, candidate: ModelVersion, cand_run: EvalRun,
         champ_run: EvalRun, guards: tuple[str, ...] = ()) -> GateDecision:
    """Promote `candidate` only if its primary metric beats the champion's by more than
    min_improvement, the gain is significant (`eval.significance: bootstrap`: a one-sided paired
    bootstrap p-value below 1 - `eval.confidence`), and no guard objects (`guards`: reasons from
    guard metrics such as the anchor set). A rejected candidate keeps its eval runs and the reason."""
    s = project.settings.eval
    current = champion(session)
    if current is None:
        raise StateError("no champion to compare against")
    c, b = cand_run.metrics.get(s.primary_metric), champ_run.metrics.get(s.primary_metric)
    what = s.primary_metric
    paired = PairedRuns.read(session, cand_run, champ_run) if s.gate_average == "sources" else None
    if paired is not None and c is not None and b is not None:
        c, b = (float(gate_metric(project, rows, paired.sources)(range(len(paired.ids))))
                for rows in (paired.cand, paired.champ))
        what = f"{s.primary_metric} (mean over held-out sources)"
    test = None
    if c is None or b is None or _nan(c) or _nan(b):
        promoted, reason = False, f"{s.primary_metric} is undefined on this eval set"
    else:
        promoted = c > b + s.min_improvement
        verb = "beats" if promoted else "does not beat"
        reason = f"{what} {c:.4f} {verb} champion {b:.4f} (+{s.min_improvement} required)"
        if promoted and s.significance == "bootstrap":
            test = significance_test(project, session, cand_run, champ_run, paired)
            alpha = 1.0 - s.confidence
            if test is None:
                promoted, reason = False, reason + "; too few shared questions for a significance test"
            else:
                promoted = test.p_value < alpha
                reason += (f"; paired bootstrap gain {test.diff:+.4f}, {s.confidence:.0%} CI "
                           f"[{test.low:+.4f}, {test.high:+.4f}], p={test.p_value:.3f} "
                           + ("<" if promoted else ">=") + f" {alpha:.2f}"
                           + ("" if promoted else ": not significant"))
    guards = (*guards, *(source_guards(project, paired) if paired is not None else ()))
    if promoted and guards:
        promoted = False
        reason += "; refused by guard: " + "; ".join(guards)
    if promoted:
        current.status = "retired"
        candidate.status = "champion"
    else:
        candidate.status = "rejected"
    extra = {"gate_test": asdict(test)} if test is not None else {}
    candidate.metrics = {**(candidate.metrics or {}), "gate": reason, "gated_at": utcnow().isoformat(), **extra}
    session.flush()
    return GateDecision(promoted, reason, candidate.name, current.name)
