"""The promotion gate: promote the cycle's candidate or not, and why, in one place.

`decide` reads the candidate's and the champion's held-out eval runs (the eval step stored them)
and asks every guard; `gate` then promotes the candidate only if

* its primary metric beats the champion's by more than `eval.min_improvement` (with
  `eval.gate_average: sources`: the mean over the held-out sources, `gate_metric`);
* the gain is significant (`eval.significance: bootstrap`: a one-sided paired bootstrap,
  `significance_test`);
* no guard objects (`drop_guard`: a metric fell more than its tolerance below the champion's):
  the anchor set (`anchor_guard`, `continual.anchor`), the judge's faithfulness
  (`faithfulness_guard`, when both runs were judged) and, with `eval.gate_average: sources`,
  each held-out source (`source_guards`).

The reason (every number and every guard's objection) is stored in the candidate's metrics
("gate"); a promotion goes through `versions.promote`, a refusal marks the candidate "rejected".
With `eval.judge_metrics` the candidate's pairwise win rate is recorded too (informational).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

from sqlalchemy import select

from tuneloop import metrics
from tuneloop.config import Project
from tuneloop.errors import StateError
from tuneloop.evalsets import anchor_items, anchor_set_hash, eval_examples, eval_set_hash, predictions_by_example
from tuneloop.progress import Reporter
from tuneloop.stages.judge_eval import record_pairwise
from tuneloop.stats import PairedTest, paired_bootstrap
from tuneloop.store import EvalRun, Example, ModelVersion, Session, utcnow
from tuneloop.versions import Status, champion, promote, set_status


def _nan(v) -> bool:
    return isinstance(v, float) and math.isnan(v)


@dataclass
class GateDecision:
    promoted: bool
    reason: str
    candidate: str
    champion: str
    pairwise: dict | None = None  # the judge's pairwise win rate (informational), when recorded


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
    cand, champ = (by_source(rows, paired.sources, everything, s.primary_metric)
                   for rows in (paired.cand, paired.champ))
    reasons = []
    for kind in cand:
        reason = drop_guard(f"{s.primary_metric} on the {kind!r} held-out questions ({paired.sources.count(kind)})",
                            cand[kind], champ[kind], s.source_tolerance)
        reasons += [reason] if reason else []
    return reasons


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
        promote(session, candidate, "gate")  # `current` retires
    else:
        set_status(candidate, Status.REJECTED)
    extra = {"gate_test": asdict(test)} if test is not None else {}
    candidate.metrics = {**(candidate.metrics or {}), "gate": reason, "gated_at": utcnow().isoformat(), **extra}
    session.flush()
    return GateDecision(promoted, reason, candidate.name, current.name)


def anchor_guard(project: Project, candidate_score: float | None, champion_score: float | None) -> str | None:
    """Why the candidate must not be promoted on anchor grounds, or None."""
    return drop_guard("anchor_score", candidate_score, champion_score, project.settings.continual.anchor_tolerance)


def faithfulness_guard(project: Project, cand_run: EvalRun | None, champ_run: EvalRun | None) -> str | None:
    """Why the candidate must not be promoted on faithfulness grounds, or None (also when either
    run has no `judge_faithfulness`)."""
    def value(run: EvalRun | None) -> float | None:
        return (run.metrics or {}).get("judge_faithfulness") if run is not None else None

    return drop_guard("judge_faithfulness", value(cand_run), value(champ_run),
                      project.settings.eval.faithfulness_tolerance)


def _run_on(session: Session, version: ModelVersion, set_hash: str) -> EvalRun | None:
    return session.scalar(select(EvalRun).where(EvalRun.model_version_id == version.id,
                                                EvalRun.eval_set_hash == set_hash))


def decide(project: Project, session: Session, cand: ModelVersion, reporter: Reporter) -> GateDecision:
    """The gate of a cycle: `cand` against the champion on their stored held-out runs, with the
    anchor and faithfulness guards; records the pairwise win rate (`eval.judge_metrics`) in
    `GateDecision.pairwise`. Changes the candidate's status (caller commits)."""
    set_hash = eval_set_hash(eval_examples(project, session))
    champ = champion(session)
    runs = {v.id: _run_on(session, v, set_hash) for v in (cand, champ)}
    guards = []
    if project.settings.continual.anchor:
        anchor_hash = anchor_set_hash(anchor_items())
        scores = [(_run_on(session, v, anchor_hash) or EvalRun(metrics={})).metrics.get("anchor_score")
                  for v in (cand, champ)]
        reason = anchor_guard(project, *scores)
        guards += [reason] if reason else []
    faithful = faithfulness_guard(project, runs[cand.id], runs[champ.id])  # only if both runs were judged
    guards += [faithful] if faithful else []
    pairwise = record_pairwise(project, session, cand, runs[cand.id], runs[champ.id], reporter)  # eval.judge_metrics
    d = gate(project, session, cand, runs[cand.id], runs[champ.id], tuple(guards))
    d.pairwise = pairwise
    return d
