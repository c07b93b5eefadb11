"""Monitoring signals over live use. Each check returns a `Reading` (value, fired, why) that the
caller records as a SignalValue row, so every signal's history is in the store.

* satisfaction: the positive share of the latest human votes (thumbs, ratings 4-5 up, 1-2 down)
  on answers of the current champion; fires below `monitor.satisfaction_floor`, or when the
  change detector (Page-Hinkley or ADWIN over the champion's whole vote stream) sees a drop.
* query_drift: the latest questions asked since the last cycle started vs the known questions
  (training examples and the questions asked before that cycle), by an MMD permutation test on
  their embeddings; fires when p < `monitor.drift_alpha`.
* documents: watched documents that are new or changed since the last ingest.
* live_judge (`monitor.judge_sample` > 0): the judge grades the champion's new live answers 1-5
  (ScoreAnswer over the passages each interaction stored); fires when the mean is below
  `monitor.judge_floor`, or when the change detector sees a drop in the recorded means.
  Unparseable replies are counted and left out.
* review_queue (`review.enabled`): the share of people's unanswered questions the champion is
  unsure of, in the expert review queue the latest cycle built (`stages/review.py`); fires when it
  is at least `review.trigger_share` and did not fall since the queue before (the cycles are not
  making the model surer of what people ask).
* canary (`monitor.canary_every_seconds` > 0): when due, the champion answers the first
  `monitor.canary_questions` held-out questions through the eval's RAG path; fires when the
  primary metric falls more than `monitor.canary_tolerance` below the champion's stored held-out
  run on the same questions (an index or serving regression, e.g. after a re-ingest).
"""
from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import select

from tuneloop import metrics
from tuneloop.config import Project
from tuneloop.evalsets import EVAL_KIND, eval_examples, predictions_by_example
from tuneloop.ingest.index import IndexNotFoundError
from tuneloop.ingest.loaders import scan_documents
from tuneloop.models.base import ChatModel, Embedder
from tuneloop.monitor.drift import change_points, mmd_test
from tuneloop.programs.decide import threshold_of
from tuneloop.programs.prompts import PromptBuilder
from tuneloop.programs.rag import Retriever, rag_program_path
from tuneloop.programs.scoring import score_examples
from tuneloop.progress import Reporter, SilentReporter
from tuneloop.store import Cycle, EvalRun, Example, Feedback, Interaction, ReviewItem, Session, SignalValue, utcnow
from tuneloop.versions import adapter_folder, champion


@dataclass
class Reading:
    signal: str
    value: float | None
    fired: bool
    reason: str  # why it fired, or why it did not
    detail: dict[str, Any] = field(default_factory=dict)

    def row(self) -> SignalValue:
        return SignalValue(signal=self.signal, value=self.value, fired=self.fired,
                           detail={"reason": self.reason, **self.detail})


def _vote(fb: Feedback) -> float | None:
    if fb.thumbs:
        return 1.0 if fb.thumbs > 0 else 0.0
    if fb.rating:
        return 1.0 if fb.rating >= 4 else 0.0 if fb.rating <= 2 else None
    return None


def satisfaction(project: Project, session: Session) -> Reading:
    m = project.settings.monitor
    champ = champion(session)
    q = (select(Feedback).join(Interaction, Feedback.interaction_id == Interaction.id)
         .where(Feedback.source == "human", Interaction.model_version_id == (champ.id if champ else -1))
         .order_by(Feedback.created_at, Feedback.id))
    votes = [v for v in (_vote(fb) for fb in session.scalars(q)) if v is not None]
    recent = votes[-m.satisfaction_window:]
    if len(recent) < m.min_votes:
        return Reading("satisfaction", None, False, f"{len(recent)} votes on the champion's answers "
                       f"(fewer than {m.min_votes})", {"votes": len(votes)})
    rate = sum(recent) / len(recent)
    detail: dict[str, Any] = {"votes": len(votes), "window": len(recent)}
    if rate < m.satisfaction_floor:
        return Reading("satisfaction", rate, True, f"satisfaction {rate:.2f} < {m.satisfaction_floor} over the "
                       f"latest {len(recent)} votes", detail)
    if m.change_detector != "none":
        points = detail["change_points"] = _dropped(m, votes)
        if points and points[-1] >= len(votes) - len(recent):
            return Reading("satisfaction", rate, True, f"satisfaction dropped ({m.change_detector} change at vote "
                           f"{points[-1] + 1} of {len(votes)}; now {rate:.2f})", detail)
    return Reading("satisfaction", rate, False, f"satisfaction {rate:.2f} over the latest {len(recent)} votes",
                   detail)


def query_drift(project: Project, session: Session, embedder: Embedder) -> Reading:
    m = project.settings.monitor
    last = session.scalar(select(Cycle).order_by(Cycle.started_at.desc(), Cycle.id.desc()))
    since = last.started_at if last else None
    q = select(Interaction.question).order_by(Interaction.created_at.desc(), Interaction.id.desc())
    recent = list(session.scalars(q.where(Interaction.created_at >= since) if since else q))[: m.drift_window]
    if len(recent) < m.min_queries:
        return Reading("query_drift", None, False, f"{len(recent)} new questions (fewer than {m.min_queries})")
    known = list(session.scalars(select(Example.question).where(Example.split == "train")))
    if since:
        known += list(session.scalars(select(Interaction.question).where(Interaction.created_at < since)))
    if len(known) < 2:
        return Reading("query_drift", None, False, "fewer than 2 known questions to compare with")
    result = mmd_test(embedder.embed(known), embedder.embed(recent), m.drift_permutations, seed=0)
    detail = {"mmd2": result.mmd2, "p_value": result.p_value, "n_known": len(known), "n_recent": len(recent)}
    fired = result.drifted(m.drift_alpha)
    verdict = "<" if fired else ">="
    return Reading("query_drift", result.p_value, fired,
                   f"query drift: MMD p={result.p_value:.3f} {verdict} {m.drift_alpha} ({len(recent)} new vs "
                   f"{len(known)} known questions)", detail)


def documents(project: Project, session: Session) -> Reading:
    paths = [project.path(p) for p in project.settings.documents]
    found = scan_documents(session, [p for p in paths if p.exists()])
    n = len(found["new"]) + len(found["changed"])
    fired = bool(n) and project.settings.monitor.documents
    return Reading("documents", float(n), fired, f"{len(found['new'])} new and {len(found['changed'])} changed "
                   "documents", found)


def review_queue(project: Project, session: Session) -> Reading:
    """The share of people's unanswered questions the champion is unsure of (informativeness at
    least `review.unsure_score`), in the pool of the review queue the latest cycle built; fires
    when it is at least `review.trigger_share` and no lower than in the queue before."""
    r = project.settings.review
    queues = list(session.scalars(select(ReviewItem.queue).where(ReviewItem.cycle_id.is_not(None)).distinct()
                                  .order_by(ReviewItem.queue.desc()).limit(2)))
    if not queues:
        return Reading("review_queue", None, False, "no review queue built by a cycle yet")
    shares: list[tuple[int, float | None]] = []
    for queue in queues:
        scores = list(session.scalars(select(ReviewItem.score).where(ReviewItem.queue == queue,
                                                                     ReviewItem.source == "interaction")))
        shares.append((len(scores), sum(x >= r.unsure_score for x in scores) / len(scores) if scores else None))
    (n, share), before = shares[0], (shares[1][1] if len(shares) > 1 else None)
    detail = {"queue": queues[0], "questions": n, "previous_share": before}
    if share is None or n < r.trigger_min:
        return Reading("review_queue", share, False, f"{n} of people's questions in review queue {queues[0]} "
                       f"(fewer than {r.trigger_min})", detail)
    what = f"the champion is unsure of {share:.0%} of {n} unanswered questions people asked (queue {queues[0]}"
    what += f"; {before:.0%} in the queue before)" if before is not None else ")"
    fired = share >= r.trigger_share and (before is None or share >= before)
    if fired:
        return Reading("review_queue", share, True, f"{what}: at least {r.trigger_share:.0%} and not falling", detail)
    return Reading("review_queue", share, False, what, detail)


def _latest(session: Session, signal: str) -> SignalValue | None:
    q = select(SignalValue).where(SignalValue.signal == signal)
    return session.scalar(q.order_by(SignalValue.created_at.desc(), SignalValue.id.desc()))


def _built(obj: Any, attr: str) -> Any:
    """`obj` itself when it already has `attr` (a model, a retriever), else the factory's result."""
    return obj if hasattr(obj, attr) else obj()


def _dropped(m, values: list[float]) -> list[int]:
    """The change detector's change points on `values` (falling values for Page-Hinkley)."""
    params = ({"threshold": m.page_hinkley_threshold, "delta": m.page_hinkley_delta, "mode": "down"}
              if m.change_detector == "page_hinkley" else {})
    return change_points(values, m.change_detector, **params)


def grade_answers(project: Project, session: Session, interactions: list[Interaction],
                  judge: ChatModel | Callable[[], ChatModel], retriever: Any = None,
                  reporter: Reporter | None = None) -> list[float | None]:
    """The judge's 1-5 ScoreAnswer grade of each interaction's answer over the passages it stored
    (retrieved again, as in routing, when a re-ingest deleted them); None when unparseable."""
    # deferred: this imports dspy (seconds), needed only when the judge grades answers
    from tuneloop.programs.judge import build_judge, grade  # the judge role's adapter, greedy decoding

    builder = PromptBuilder(session, retriever)
    items = [(builder.for_interaction(it).passages, it.question, it.answer) for it in interactions]
    return grade(build_judge(project, _built(judge, "chat")), items, reporter, "judging live answers")


def live_judge(project: Project, session: Session, judge: ChatModel | Callable[[], ChatModel],
               retriever: Any = None, reporter: Reporter | None = None) -> Reading:
    """The judge's mean grade of the champion's latest `judge_sample` answers after those judged at
    the previous check; fires below `judge_floor` or on a change-detector drop of the means."""
    m = project.settings.monitor
    champ = champion(session)
    last = _latest(session, "live_judge")
    after = int(((last.detail or {}) if last else {}).get("last_interaction_id") or 0)
    q = (select(Interaction).where(Interaction.model_version_id == (champ.id if champ else -1),
                                   Interaction.id > after).order_by(Interaction.id.desc()).limit(m.judge_sample))
    its = list(session.scalars(q))[::-1]
    if not its:
        return Reading("live_judge", None, False, "no new answers of the champion since the last check",
                       {"last_interaction_id": after})
    scores = grade_answers(project, session, its, judge, retriever, reporter)
    valid = [x for x in scores if x is not None]
    detail: dict[str, Any] = {"interaction_ids": [it.id for it in its], "scores": scores, "n": len(valid),
                              "unparsed": len(scores) - len(valid), "last_interaction_id": its[-1].id}
    if not valid:
        return Reading("live_judge", None, False, f"no parseable grade in the judge's {len(its)} replies", detail)
    mean = detail["mean"] = sum(valid) / len(valid)
    what = f"judge's mean grade {mean:.2f} of {len(valid)} new champion answers ({detail['unparsed']} unparsed)"
    if mean < m.judge_floor:
        return Reading("live_judge", mean, True, f"{what} < {m.judge_floor}", detail)
    if m.change_detector != "none":
        history = list(session.scalars(select(SignalValue.value).where(
            SignalValue.signal == "live_judge", SignalValue.value.is_not(None))
            .order_by(SignalValue.created_at, SignalValue.id))) + [mean]
        points = detail["change_points"] = _dropped(m, history)
        if points and points[-1] == len(history) - 1:
            return Reading("live_judge", mean, True, f"{what}: dropped ({m.change_detector})", detail)
    return Reading("live_judge", mean, False, what, detail)


def canary_due(project: Project, session: Session, now: datetime | None = None) -> bool:
    """True when the canary is on and no canary reading is younger than `canary_every_seconds`
    (read from the store, so a restarted watcher keeps the schedule)."""
    every = project.settings.monitor.canary_every_seconds
    last = _latest(session, "canary")
    return every > 0 and (last is None or (now or utcnow()) - last.created_at >= timedelta(seconds=every))


def stored_predictions(project: Project, session: Session, version) -> tuple[EvalRun | None, dict[int, dict]]:
    """The version's latest held-out EvalRun (not the anchor set's) and its predictions by example id."""
    runs = session.scalars(select(EvalRun).where(EvalRun.model_version_id == version.id).order_by(EvalRun.id.desc()))
    for run in runs:
        path = Path(run.artifact_path)
        if path.parent.name == EVAL_KIND and (path / "predictions.jsonl").is_file():
            return run, predictions_by_example(run)
    return None, {}


def _primary(project: Project, items: list[dict]) -> float | None:
    value = metrics.summarize(metrics.score_items(items)).get(project.settings.eval.primary_metric, math.nan)
    return None if value is None or math.isnan(value) else float(value)


def canary(project: Project, session: Session, retriever: Retriever | Callable[[], Retriever],
           reporter: Reporter | None = None) -> Reading:
    """The champion answers the canary questions (`score_examples`, the eval's RAG path); fires when
    the primary metric falls more than `canary_tolerance` below its stored held-out run on them."""
    m, metric = project.settings.monitor, project.settings.eval.primary_metric
    champ = champion(session)
    examples = eval_examples(project, session)[: m.canary_questions]
    if champ is None or not examples:
        return Reading("canary", None, False, "no champion or no held-out questions to ask")
    run, stored = stored_predictions(project, session, champ)
    shared = [e for e in examples if e.id in stored]
    asked = shared or examples
    detail: dict[str, Any] = {"version": champ.name, "example_ids": [e.id for e in asked],
                              "eval_run_id": run.id if run else None}
    try:
        retriever = _built(retriever, "retrieve")
    except IndexNotFoundError:
        return Reading("canary", None, bool(shared), "no retrieval index: the champion cannot answer with "
                       "retrieval", detail)
    adapter = adapter_folder(champ)
    items, _ = score_examples(project, adapter, asked, retriever, reporter or SilentReporter(), rag_program_path(champ),
                              threshold_of(champ.hyperparams))
    fresh = detail["now"] = _primary(project, items)
    what = f"{metric} {'undefined' if fresh is None else f'{fresh:.4f}'} on {len(asked)} canary questions"
    if not shared:
        return Reading("canary", fresh, False, f"{what}; no stored held-out run of {champ.name} on them to "
                       "compare with", detail)
    before = detail["stored"] = _primary(project, [stored[e.id] for e in shared])
    detail["changed_answers"] = sum(it["prediction"] != stored[it["example_id"]]["prediction"] for it in items)
    if fresh is None or before is None:
        return Reading("canary", fresh, False, f"{what}; {metric} undefined on them", detail)
    drop = detail["drop"] = before - fresh
    fired = drop > m.canary_tolerance
    return Reading("canary", fresh, fired, f"{what} vs {before:.4f} in {champ.name}'s stored run (drop {drop:+.4f} "
                   + (">" if fired else "<=") + f" {m.canary_tolerance})", detail)


def check_signals(project: Project, session: Session, embedder: Embedder | None,
                  judge: ChatModel | Callable[[], ChatModel] | None = None,
                  retriever: Retriever | Callable[[], Retriever] | None = None,
                  reporter: Reporter | None = None) -> list[Reading]:
    """Every signal's reading, recorded in the session (caller commits).

    `judge` and `retriever` (objects or factories) are built only when live_judge or a due canary
    needs them; by default the judge role and the champion's retriever (its own fine-tuned index
    when it has one, else the project's; `embedder` for the dense half).
    """
    m = project.settings.monitor
    readings = [satisfaction(project, session), documents(project, session)]
    if project.settings.review.enabled:
        readings.append(review_queue(project, session))
    if embedder is not None:
        readings.append(query_drift(project, session, embedder))
    retriever = retriever if retriever is not None else functools.cache(  # the champion's, as it is served
        lambda: Retriever.for_version(project, session, champion(session), embedder))
    if m.judge_sample:
        readings.append(live_judge(project, session, judge if judge is not None else functools.cache(
            lambda: _judge_model(project)), retriever, reporter))
    if canary_due(project, session):
        readings.append(canary(project, session, retriever, reporter))
    for r in readings:
        session.add(r.row())
    session.flush()
    return readings


def _judge_model(project: Project) -> ChatModel:
    from tuneloop.models.registry import build_chat_model  # looked up at call time (tests replace it)

    return build_chat_model(project, project.settings.models.judge)
