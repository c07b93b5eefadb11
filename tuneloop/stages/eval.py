"""Stage: evaluate model versions on the held-out set (the gate that compares them: `stages/gate.py`).

Every version is scored on the same held-out items (split "eval", never trained on) with the
retrieval-augmented program it is served with. Results are stored once per (version, eval set),
so a resumed cycle does not evaluate a version twice.
"""
from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

from sqlalchemy import select

from tuneloop import metrics
from tuneloop.artifacts import artifact_path, is_complete, read_jsonl, write_artifact, write_jsonl
from tuneloop.config import Project
from tuneloop.errors import StateError
from tuneloop.evalsets import EVAL_KIND, eval_examples, eval_set_hash
from tuneloop.programs.rag import Retriever, rag_program_path
from tuneloop.programs.scoring import score_examples
from tuneloop.progress import Reporter
from tuneloop.splits import question_key
from tuneloop.stages.calibrate import calibrate_version
from tuneloop.stages.judge_eval import judge_items
from tuneloop.stats import bootstrap_ci
from tuneloop.store import Artifact, EvalRun, Example, ModelVersion, Session
from tuneloop.versions import adapter_folder


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
    """Score `version` on the held-out set (reusing a stored run for the same set), its yes/no
    threshold chosen first on the dev split (`stages/calibrate.py`).

    With `eval.judge_metrics` the judge also rates each answer (`stages/judge_eval.py`); `judge`
    (an EvalJudge or a factory; default: the judge role) is built only when a run is scored."""
    examples = eval_examples(project, session)
    if not examples:
        raise StateError("no held-out questions: import some with `tuneloop seeds import FILE --split eval`")
    check_no_overlap(session, examples)
    set_hash = eval_set_hash(examples)

    def score() -> tuple[list[dict], dict]:
        reporter.log(f"evaluating {version.name} on {len(examples)} held-out questions")
        adapter = adapter_folder(version)
        program = rag_program_path(version)  # the (model, program) pair the gate judges
        threshold = calibrate_version(project, session, version, retriever, reporter)
        items, summary = score_examples(project, adapter, examples, retriever, reporter, program,
                                        threshold.value if threshold else None)
        if threshold is not None:
            summary["yes_no_threshold"] = threshold.value
        summary = {**summary, **intervals(project, items)}  # not in score_examples: WiSE-FT needs no CI
        if project.settings.eval.judge_metrics:
            summary.update(judge_items(project, session, items, judge, reporter))
        return items, summary

    return stored_eval_run(project, session, version, set_hash, EVAL_KIND, f"{version.name}-{set_hash[:12]}", "eval",
                           score, cycle_id)


def _nan(v) -> bool:
    return isinstance(v, float) and math.isnan(v)
