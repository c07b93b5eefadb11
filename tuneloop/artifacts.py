"""Immutable artifact folders (datasets, adapters, eval results, reports).

Each artifact is written into a temporary folder and renamed into place only when complete, so a
crash never leaves a half-written artifact under its final name. Every artifact has a `meta.json`
that says what produced it from what (lineage).
"""
from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tuneloop.store import utcnow

META_FILE = "meta.json"
TMP_PREFIX = ".tmp-"


def artifact_path(root: Path, kind: str, name: str) -> Path:
    return root / kind / name


def is_complete(path: Path) -> bool:
    """An artifact is complete once its folder exists under the final name with a meta.json."""
    return (path / META_FILE).is_file()


def write_artifact(
    root: Path, kind: str, name: str, meta: dict[str, Any], write: Callable[[Path], None]
) -> Path:
    """Run `write(tmp_dir)`, add meta.json, then atomically rename the folder to root/kind/name.

    If a complete artifact already sits at that name, it is returned unchanged (artifacts are
    immutable; a finished step is not redone).
    """
    final = artifact_path(root, kind, name)
    if is_complete(final):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = root / f"{TMP_PREFIX}{kind}-{name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        write(tmp)
        full_meta = {"kind": kind, "name": name, "created_at": utcnow().isoformat(), **meta}
        (tmp / META_FILE).write_text(json.dumps(full_meta, indent=2, default=str), encoding="utf-8")
        if final.exists():  # an incomplete leftover (no meta.json) from a crash
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def read_meta(path: Path) -> dict[str, Any]:
    return json.loads((path / META_FILE).read_text(encoding="utf-8"))


def clean_temporary(root: Path) -> int:
    """Remove temp folders left behind by a crash; return how many were removed."""
    if not root.is_dir():
        return 0
    stale = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(TMP_PREFIX)]
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    return len(stale)


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
