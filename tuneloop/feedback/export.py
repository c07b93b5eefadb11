"""Stage: `tuneloop feedback export`, every kind of feedback written as a training dataset.

artifacts/feedback/<name>/
    preferences.jsonl  {"prompt": [...], "chosen": [assistant], "rejected": [assistant], provenance}
                       human A/B choices, corrections and (unless excluded) the AI judge's pairs
    kto.jsonl          {"prompt": [...], "completion": [assistant], "label": bool, provenance}
    rewards.jsonl      {"prompt": [...], "completion": [assistant], "reward": float in [-1, 1], provenance}
    report.json        what was routed, merged, dropped and why
    meta.json

Each file loads with `datasets.load_dataset("json", data_files=...)` and is in TRL's
conversational format (DPOTrainer/ORPOTrainer, KTOTrainer, reward-weighted training). Human pairs
and ratings are also kept in the store (PreferencePair source human|correction, Reward source
human), idempotently: rerunning the export adds no duplicate rows.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import func, select

from tuneloop.artifacts import run_name, write_artifact, write_jsonl
from tuneloop.config import Project
from tuneloop.errors import StateError
from tuneloop.feedback.routing import merge_pairs, route_feedback, store_human, stored_ai_pairs, stored_ai_rewards
from tuneloop.programs.prompts import PromptBuilder
from tuneloop.progress import Reporter
from tuneloop.store import Artifact, Feedback, PreferencePair, Reward, Session

KIND = "feedback"
FILES = ("preferences", "kto", "rewards")


@dataclass
class ExportResult:
    artifact: Path
    counts: dict[str, int]  # rows per dataset
    report: dict[str, Any] = field(default_factory=dict)

    def path(self, kind: str) -> Path:
        return self.artifact / f"{kind}.jsonl"


def export_feedback(project: Project, session: Session, builder: PromptBuilder, reporter: Reporter,
                    name: str | None = None, include_ai: bool = True) -> ExportResult:
    """Route human feedback, update the store's human pairs/rewards and write the datasets artifact.

    Raises StateError when there is nothing to export (no feedback, and no AI pairs or rewards).
    Caller commits.
    """
    rule = project.settings.feedback.contradiction_rule
    n_feedback = session.scalar(select(func.count(Feedback.id))) or 0
    n_ai = 0
    if include_ai:
        n_ai = (session.scalar(select(func.count(PreferencePair.id)).where(PreferencePair.source == "ai")) or 0) + (
            session.scalar(select(func.count(Reward.id)).where(Reward.source == "ai")) or 0)
    if not n_feedback and not n_ai:
        raise StateError("no feedback to export yet: collect some with `tuneloop serve` "
                         "(or create AI preferences with `tuneloop rlaif`)")
    with reporter.task("routing feedback", None):
        routed = route_feedback(session, builder, rule)
        stored = store_human(session, routed)
    pairs = list(routed.pairs)
    rewards = list(routed.rewards)
    ai_report = {"included": include_ai, "pairs": 0, "rewards": 0, "skipped_without_prompt": 0}
    if include_ai:
        ai_pairs, skip_p = stored_ai_pairs(session)
        ai_rewards, skip_r = stored_ai_rewards(session)
        pairs += ai_pairs
        rewards += ai_rewards
        ai_report.update(pairs=len(ai_pairs), rewards=len(ai_rewards), skipped_without_prompt=skip_p + skip_r)
    pairs, merged = merge_pairs(pairs)
    rewards = _merge_rewards(rewards)
    data = {"preferences": [p.to_row() for p in pairs], "kto": [k.to_row() for k in routed.kto],
            "rewards": [r.to_row() for r in rewards]}
    counts = {k: len(v) for k, v in data.items()}
    report = {**routed.report, "prompts": builder.report(), "store": stored, "ai": ai_report,
              "preferences_merged_across_sources": merged, "datasets": counts}

    def write(tmp: Path) -> None:
        for kind in FILES:
            write_jsonl(tmp / f"{kind}.jsonl", data[kind])
        (tmp / "report.json").write_text(json.dumps(report, indent=2, default=str), encoding="utf-8")

    name = name or run_name("feedback", None)
    meta = {"stage": "feedback-export", "contradiction_rule": rule, "counts": counts, "report": report,
            "format": {"preferences": "trl conversational preference (prompt/chosen/rejected)",
                       "kto": "trl conversational unpaired preference (prompt/completion/label)",
                       "rewards": "prompt/completion/reward in [-1, 1]"}}
    path = write_artifact(project.artifacts, KIND, name, meta, write)
    if not session.scalar(select(Artifact).where(Artifact.path == str(path))):
        session.add(Artifact(kind="dataset", path=str(path), meta={"stage": "feedback-export", "counts": counts}))
    session.flush()
    report = json.loads((path / "report.json").read_text(encoding="utf-8"))
    counts = report.get("datasets", counts)
    return ExportResult(path, counts, report)


def _merge_rewards(rows):
    """One reward per (prompt, completion, source). A person's mean rating and the judge's score of
    the same answer stay separate rows (different signals: filter on `source`). Within a source
    the store already holds one row per answer; a repeat only adds its ids."""
    out = {}
    for r in rows:
        key = (r.key, r.source)
        if key not in out:
            out[key] = r
            continue
        first = out[key]
        first.interaction_ids = sorted(set(first.interaction_ids) | set(r.interaction_ids))
        first.feedback_ids = sorted(set(first.feedback_ids) | set(r.feedback_ids))
        first.reward_ids = sorted(set(first.reward_ids) | set(r.reward_ids))
    return list(out.values())
