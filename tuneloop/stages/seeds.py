"""Import expert-written question/answer pairs (JSONL or CSV) as seed or held-out examples.

Each row has `question`, `answer`, optionally the document it is about (`source`, `document` or
`contract`: its file name), optionally a `category` (the evaluation breaks scores down by it) and,
in JSONL, `references` (or `evidence`): other accepted answers.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select

from tuneloop.errors import InputError
from tuneloop.jsonl import json_objects
from tuneloop.splits import heldout_side, question_key
from tuneloop.store import Example, Session, example_hash

_DOC_KEYS = ("source", "document", "contract")


@dataclass
class ImportResult:
    added: int
    duplicates: int
    other_split: int
    held_out: int = 0  # of `added`, put into split "eval" by `holdout`


def read_pairs(path: Path) -> list[dict[str, str | None]]:
    """Rows with question, answer and optional document, validated; errors name file and line."""
    if not path.is_file():
        raise InputError(f"seed file not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        raw = [(where, obj) for _, where, obj in json_objects(path, path.read_text(encoding="utf-8"))]
    elif suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as f:
            raw = [(f"{path} line {n}", row) for n, row in enumerate(csv.DictReader(f), 2)]
    else:
        raise InputError(f"{path}: unsupported seed file type '{suffix}' (use .jsonl or .csv)")
    rows = []
    for where, obj in raw:
        q, a = obj.get("question"), obj.get("answer")
        if not isinstance(q, str) or not q.strip():
            raise InputError(f"{where}: missing or empty 'question'")
        if not isinstance(a, str) or not a.strip():
            raise InputError(f"{where}: missing or empty 'answer'")
        doc = next((obj[k] for k in _DOC_KEYS if obj.get(k)), None)
        refs = obj.get("references") or obj.get("evidence") or []
        if isinstance(refs, str) or not all(isinstance(r, str) for r in refs):
            raise InputError(f"{where}: 'references' must be a list of strings")
        category = obj.get("category")
        if category is not None and not isinstance(category, str):
            raise InputError(f"{where}: 'category' must be a string")
        rows.append({"question": q.strip(), "answer": a.strip(), "document": str(doc) if doc else None,
                     "references": [r for r in refs if r.strip()], "category": (category or "").strip() or None})
    if not rows:
        raise InputError(f"{path}: no question/answer pairs found")
    return rows


def import_pairs(session: Session, path: Path, split: str, holdout: float = 0.0) -> ImportResult:
    """Add pairs to the session as seeds (split train), held-out items (split eval) or dev items (split
    dev: only used to pick the WiSE-FT mixing weight). With split train, `holdout` (0-1) sends about
    that share of the questions to the held-out set instead, by a stable hash of the question and
    its document (`tuneloop.splits`): re-importing the file splits it the same way."""
    if not 0.0 <= holdout < 1.0:
        raise InputError(f"--holdout must be at least 0 and below 1, not {holdout}")
    if holdout and split != "train":
        raise InputError("--holdout splits seeds (split train) into train and eval; it does not apply to "
                         f"split '{split}'")
    rows = read_pairs(path)
    existing = {(h, s) for h, s in session.execute(select(Example.content_hash, Example.split))}
    hashes = {h for h, _ in existing}
    added = dup = other = held = 0
    for row in rows:
        h = example_hash(row["question"], row["answer"], row["document"])
        row_split = split
        if holdout and heldout_side(question_key(row["question"], row["document"]), holdout) == "eval":
            row_split = "eval"
        if (h, row_split) in existing:
            dup += 1
            continue
        if h in hashes:  # never let one item be both trained on and evaluated
            other += 1
            continue
        existing.add((h, row_split))
        hashes.add(h)
        held += row_split != split
        session.add(Example(kind="seed", split=row_split, question=row["question"], answer=row["answer"],
                            document=row["document"], content_hash=h,
                            meta={"imported_from": str(path), "references": row["references"],
                                  **({"category": row["category"]} if row["category"] else {})}))
        added += 1
    return ImportResult(added, dup, other, held)
