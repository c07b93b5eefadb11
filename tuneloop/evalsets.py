"""The evaluation sets every version is scored on, and the stored runs' predictions.

* the held-out set: the examples of split "eval" (`eval.limit` first ones), identified by a hash
  of their content hashes, so a run is stored once per (version, set) and a grown set is a new set;
* the general-ability anchor set (`tuneloop/sample/anchor.jsonl`, see `stages/anchor.py`).

Lower than the stages: the evaluation and gate read these, and so do monitoring and the report
(which only look at stored runs, never score).
"""
from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

from sqlalchemy import select

from tuneloop.artifacts import read_jsonl
from tuneloop.config import Project
from tuneloop.store import EvalRun, Example, Session, text_hash

EVAL_KIND = "evals"  # artifacts/evals/: held-out eval runs


def split_examples(session: Session, split: str) -> list[Example]:
    """The examples of one split ("train", "dev", "eval"), in the order they were stored."""
    return list(session.scalars(select(Example).where(Example.split == split).order_by(Example.id)))


def eval_examples(project: Project, session: Session) -> list[Example]:
    rows = split_examples(session, "eval")
    if project.settings.eval.limit:
        rows = rows[: project.settings.eval.limit]
    return rows


def references(example: Example) -> list[str]:
    """The answer first, then any other accepted answers (e.g. CUAD's highlighted evidence spans)."""
    extra = [r for r in (example.meta or {}).get("references", []) if isinstance(r, str) and r.strip()]
    return [example.answer, *extra]


def eval_set_hash(examples: list[Example]) -> str:
    return text_hash(*[e.content_hash for e in examples])


def predictions_by_example(run: EvalRun) -> dict[int, dict]:
    """The stored per-question rows of an eval run (its predictions.jsonl), by example id."""
    return {row["example_id"]: row for row in read_jsonl(Path(run.artifact_path) / "predictions.jsonl")}


def anchor_items(path: Path | None = None) -> list[dict]:
    """The anchor set: [{"instruction": str, "references": [str, ...]}, ...]."""
    text = path.read_text(encoding="utf-8") if path else \
        (resources.files("tuneloop") / "sample" / "anchor.jsonl").read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def anchor_set_hash(items: list[dict]) -> str:
    return "anchor-" + text_hash(*[json.dumps(i, sort_keys=True) for i in items])[:58]
