"""Stage: choose the cycle's candidate between the SFT version and the aligned one, on the dev set.

Alignment on a few preference pairs can help or hurt; which one is not known in advance. When a
dev split exists (`tuneloop seeds import FILE --split dev`: never trained on, never the held-out
set), both versions answer it and the better primary metric becomes the candidate the gate judges;
a tie keeps the aligned version. The loser is marked "superseded" and keeps its dev score.
Without a dev set the aligned version is the candidate, the SFT version is marked "intermediate"
(a step on the way, never gated on its own), and the step says so.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from tuneloop.config import Project
from tuneloop.programs.rag import Retriever
from tuneloop.progress import Reporter
from tuneloop.stages.wise import dev_examples, score_adapter
from tuneloop.store import ModelVersion, Session
from tuneloop.versions import Status, set_status


@dataclass
class Selection:
    chosen: ModelVersion
    scores: dict[str, float]  # dev primary metric per version name
    n_dev: int


def pick_on_dev(project: Project, session: Session, sft: ModelVersion, aligned: ModelVersion,
                retriever: Retriever, reporter: Reporter) -> Selection | None:
    """The better of `sft` and `aligned` on the dev split (None when there is no dev set)."""
    examples = dev_examples(project, session)
    if not examples:
        return None
    scores = {}
    for v in (sft, aligned):
        reporter.log(f"choosing the candidate: {v.name} ({v.method}) answers {len(examples)} dev questions")
        scores[v.name] = score_adapter(project, Path(v.adapter_path), examples, retriever, reporter)
    key = project.settings.eval.primary_metric

    def value(v: ModelVersion) -> float:
        return -math.inf if math.isnan(scores[v.name]) else scores[v.name]

    chosen, loser = (sft, aligned) if value(sft) > value(aligned) else (aligned, sft)
    set_status(loser, Status.SUPERSEDED)
    for v in (sft, aligned):
        v.metrics = {**(v.metrics or {}), f"dev_{key}": scores[v.name]}
    session.flush()
    return Selection(chosen, scores, len(examples))
