"""Import expert-written question/answer pairs (JSONL or CSV) as seed or held-out examples.

Each row has `question`, `answer`, optionally the document it is about (`source`, `document` or
`contract`: its file name), optionally a `category` (the evaluation breaks scores down by it) and,
in JSONL, `references` (or `evidence`): other accepted answers.
"""
from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select

from tuneloop.errors import InputError
from tuneloop.jsonl import json_objects
from tuneloop.splits import heldout_side, question_key
from tuneloop.store import Example, Session, example_hash
from tuneloop.textfile import read_text

_DOC_KEYS = ("source", "document", "contract")
# CSV columns read (a JSONL record may carry other keys: files exported from elsewhere often do).
# "id" is a row label, allowed and ignored. Any other column is an error rather than silently lost.
CSV_COLUMNS = ("question", "answer", *_DOC_KEYS, "category", "id")
# Field limits: an expert question fits in a prompt; longer input is a mistake (a whole document
# pasted into a cell), and would cost a training example thousands of tokens.
MAX_QUESTION_CHARS = 4_000
MAX_ANSWER_CHARS = 20_000  # also each of `references`
MAX_CATEGORY_CHARS = 200
MAX_DOCUMENT_CHARS = 1_000  # a document's file name


@dataclass
class ImportResult:
    added: int
    duplicates: int
    other_split: int
    held_out: int = 0  # of `added`, put into split "eval" by `holdout`


def _csv_rows(path: Path, text: str) -> list[tuple[str, dict]]:
    """(where, row) per CSV record; the header must name question and answer and no unknown column."""
    reader = csv.DictReader(io.StringIO(text, newline=""))  # fields beyond the header go under key None
    rows = []
    try:
        header = reader.fieldnames or []
        missing = [c for c in ("question", "answer") if c not in header]
        unknown = [c for c in header if c not in CSV_COLUMNS]
        if header and missing:
            raise InputError(f"{path} line 1: the header has no {' or '.join(repr(c) for c in missing)} column")
        if unknown:
            raise InputError(f"{path} line 1: unknown column(s) {', '.join(repr(c) for c in unknown)} "
                             f"(known: {', '.join(CSV_COLUMNS)})")
        for row in reader:
            where = f"{path} line {reader.line_num}"
            if None in row:
                raise InputError(f"{where}: {len(header) + len(row[None])} fields, but the header names "
                                 f"{len(header)}")
            rows.append((where, row))
    except csv.Error as exc:
        raise InputError(f"{path} line {reader.line_num}: malformed CSV ({exc})") from None
    return rows


def _text_field(where: str, obj: dict, key: str, limit: int) -> str | None:
    """obj[key] stripped, None when absent or empty; an error naming the field if not text or too long."""
    value = obj.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise InputError(f"{where}: '{key}' must be a string")
    if len(value) > limit:
        raise InputError(f"{where}: '{key}' is {len(value):,} characters long; the limit is {limit:,}")
    if "\x00" in value:  # JSON may escape one (\u0000); no database column should hold it
        raise InputError(f"{where}: '{key}' contains a NUL character")
    return value.strip() or None


def _references(where: str, obj: dict) -> list[str]:
    key = "references" if obj.get("references") not in (None, []) else "evidence"
    refs = obj.get(key)
    if refs is None:
        return []
    if not isinstance(refs, list) or not all(isinstance(r, str) for r in refs):
        raise InputError(f"{where}: '{key}' must be a list of strings")
    for r in refs:
        if "\x00" in r:
            raise InputError(f"{where}: an entry of '{key}' contains a NUL character")
        if len(r) > MAX_ANSWER_CHARS:
            raise InputError(f"{where}: an entry of '{key}' is {len(r):,} characters long; the limit is "
                             f"{MAX_ANSWER_CHARS:,}")
    return [r for r in refs if r.strip()]


def _document(where: str, obj: dict) -> str | None:
    for key in _DOC_KEYS:
        value = obj.get(key)
        if isinstance(value, bool) or not isinstance(value, (str, int, type(None))):
            raise InputError(f"{where}: '{key}' must be a string (the document's file name)")
        if value is not None and value != "":
            _text_field(where, {key: str(value)}, key, MAX_DOCUMENT_CHARS)  # size and NUL checks
            return str(value)  # as given (not stripped): it is part of each stored example's hash
    return None


def read_pairs(path: Path) -> list[dict[str, str | None]]:
    """Rows with question, answer and optional document, validated; errors name file, line and field."""
    if not path.is_file():
        raise InputError(f"seed file not found: {path}")
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".csv"):
        raise InputError(f"{path}: unsupported seed file type '{suffix}' (use .jsonl or .csv)")
    text = read_text(path)
    if suffix == ".jsonl":
        raw = [(where, obj) for _, where, obj in json_objects(path, text)]
    else:
        raw = _csv_rows(path, text)
    rows = []
    for where, obj in raw:
        q = _text_field(where, obj, "question", MAX_QUESTION_CHARS)
        if q is None:
            raise InputError(f"{where}: missing or empty 'question'")
        a = _text_field(where, obj, "answer", MAX_ANSWER_CHARS)
        if a is None:
            raise InputError(f"{where}: missing or empty 'answer'")
        rows.append({"question": q, "answer": a, "document": _document(where, obj),
                     "references": _references(where, obj),
                     "category": _text_field(where, obj, "category", MAX_CATEGORY_CHARS)})
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
