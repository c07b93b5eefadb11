"""Judge metrics of the held-out evaluation, the faithfulness guard and the pairwise win rate.

With `eval.judge_metrics` (off by default: the default 135M judge's verdicts are close to noise):

* every held-out answer gets two yes/no verdicts from the judge role: `judge_correct` (JudgeCorrect:
  does it agree with the expert's reference?) and `judge_faithful` (JudgeGrounding: is every claim
  supported by the passages the student retrieved?); 1, 0, or None when the reply did not parse.
  The run's metrics get `judge_correctness` / `judge_faithfulness` (means over the parsed verdicts),
  `judge_correct_n` / `judge_faithful_n` (parsed verdicts) and `judge_unparsed` (replies without one).
* the gate records the candidate's pairwise win rate against the champion (`pairwise` in its
  metrics; informational): on the questions both runs answered, the judge compares the two answers
  in both orders (`programs.judge.judge_both_orders`); a win or a loss only when both orders agree,
  anything else (tie, inconsistent, unparsed, identical answers) is a tie.

Whenever both runs carry `judge_faithfulness`, the gate's `faithfulness_guard` (`stages/gate.py`)
refuses a candidate whose
faithfulness falls more than `eval.faithfulness_tolerance` below the champion's. A run stored before
the setting was on has no judge metrics (runs are stored once per version and set): no guard then.
"""
from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from typing import Any

from tuneloop.config import Project
from tuneloop.evalsets import predictions_by_example
from tuneloop.feedback.routing import normalize_answer
from tuneloop.programs.dspy_bridge import predict_many
from tuneloop.programs.judge import (
    EvalJudge,
    Judged,
    JudgeSource,
    judge_both_orders,
    parsed_yes_no,
    position_stats,
    resolve_judge,
)
from tuneloop.programs.prompts import PromptBuilder
from tuneloop.programs.rag import Passage
from tuneloop.programs.synth import number_passages
from tuneloop.progress import Reporter
from tuneloop.store import EvalRun, ModelVersion, Session


def passages_of(builder: PromptBuilder, chunk_ids: Sequence[int]) -> list[Passage]:
    """The stored chunks `chunk_ids`, in order and without repeats, as passages (ids no longer
    stored are left out); `builder` caches the chunks across items."""
    ids = list(dict.fromkeys(int(i) for i in chunk_ids))
    return [p for p in builder.stored_passages(ids) if p is not None]


def _flag(verdict: bool | None) -> int | None:
    return None if verdict is None else int(verdict)


# --------------------------------------------------------------------------- per-item metrics


def judge_items(project: Project, session: Session, items: list[dict], judge: JudgeSource,
                reporter: Reporter) -> dict[str, Any]:
    """Add "judge_correct" and "judge_faithful" (1, 0 or None: unparsed) to each eval item (rows of
    `score_examples`) and return their aggregates (`judge_summary`). The judge is built only here."""
    if not items:
        return judge_summary(items)
    j, builder = resolve_judge(project, judge), PromptBuilder(session)
    correct_in = [{"question": it["question"], "reference": "\n".join(it["references"]),
                   "answer": it["prediction"]} for it in items]
    faithful_in = [{"excerpts": number_passages(passages_of(builder, it.get("chunk_ids") or [])),
                    "question": it["question"], "answer": it["prediction"]} for it in items]
    correct = predict_many(j.programs.correct, j.adapter, j.model, correct_in, j.params, reporter,
                           "judge: correct against the reference", j.batch)
    faithful = predict_many(j.programs.faithful, j.adapter, j.model, faithful_in, j.params, reporter,
                            "judge: faithful to the passages", j.batch)
    for it, (pc, _), (pf, _) in zip(items, correct, faithful):
        it["judge_correct"] = _flag(parsed_yes_no(pc, "correct"))
        it["judge_faithful"] = _flag(parsed_yes_no(pf, "supported"))
    return judge_summary(items)


def judge_summary(items: Sequence[dict]) -> dict[str, Any]:
    """Means of the parsed verdicts (NaN when none parsed), their counts, and the unparsed replies."""
    out: dict[str, Any] = {}
    unparsed = 0
    for key, name in (("judge_correct", "judge_correctness"), ("judge_faithful", "judge_faithfulness")):
        values = [it[key] for it in items if it.get(key) is not None]
        out[name] = math.fsum(values) / len(values) if values else math.nan
        out[f"{key}_n"] = len(values)
        unparsed += len(items) - len(values)
    out["judge_unparsed"] = unparsed
    return out


# --------------------------------------------------------------------------- pairwise win rate


def pairwise_win_rate(session: Session, cand_run: EvalRun, champ_run: EvalRun, judge: EvalJudge,
                      reporter: Reporter) -> dict[str, Any]:
    """Candidate vs champion on the questions both runs answered, each pair judged in both orders
    (candidate first, then second); identical answers are ties without a judge call."""
    cand, champ = predictions_by_example(cand_run), predictions_by_example(champ_run)
    ids = sorted(set(cand) & set(champ))
    todo = [i for i in ids if normalize_answer(cand[i]["prediction"]) != normalize_answer(champ[i]["prediction"])]
    builder = PromptBuilder(session)
    items = [(passages_of(builder, [*(cand[i].get("chunk_ids") or []), *(champ[i].get("chunk_ids") or [])]),
              cand[i]["question"], cand[i]["prediction"], champ[i]["prediction"]) for i in todo]
    judged = judge_both_orders(judge.programs, judge.adapter, judge.model, items, judge.params, reporter,
                               "judge: candidate vs champion (both orders)", judge.batch)
    return pairwise_summary(judged, identical=len(ids) - len(todo))


def pairwise_summary(judged: Sequence[Judged], identical: int = 0) -> dict[str, Any]:
    """wins / losses (the candidate is "a"), ties (everything else), win_rate = (wins + ties / 2) / n."""
    outcomes = Counter(j.outcome for j in judged)
    wins = sum(1 for j in judged if j.outcome == "consistent" and j.winner == "a")
    losses = sum(1 for j in judged if j.outcome == "consistent" and j.winner == "b")
    n = len(judged) + identical
    ties = n - wins - losses
    return {"n": n, "wins": wins, "losses": losses, "ties": ties,
            "win_rate": round((wins + 0.5 * ties) / n, 4) if n else None,
            "identical": identical, "judged_ties": outcomes.get("tie", 0),
            "inconsistent": outcomes.get("inconsistent", 0), "unparsed": outcomes.get("unparsed", 0),
            "position_bias": position_stats(judged)}


def record_pairwise(project: Project, session: Session, candidate: ModelVersion, cand_run: EvalRun | None,
                    champ_run: EvalRun | None, reporter: Reporter, judge: JudgeSource = None) -> dict | None:
    """With `eval.judge_metrics`: the pairwise win rate, stored as `candidate.metrics["pairwise"]`
    (informational, not a gate criterion); None when off or a run is missing."""
    if not project.settings.eval.judge_metrics or cand_run is None or champ_run is None:
        return None
    result = pairwise_win_rate(session, cand_run, champ_run, resolve_judge(project, judge), reporter)
    candidate.metrics = {**(candidate.metrics or {}), "pairwise": result}
    session.flush()
    return result
