"""Immutable artifact folders (datasets, adapters, eval results, reports).

Each artifact is written into a temporary folder and renamed into place only when complete, so a
crash never leaves a half-written artifact under its final name. Every artifact has a `meta.json`
that says what produced it from what (lineage).

A killed run can leave a temporary folder (`.tmp-KIND-NAME-*`) or, killed between writing an
artifact and committing its store row, a complete standalone artifact that nothing records (its
timestamped name is never reused). The next run of the same stage removes both
(`clean_leftovers`); everything is removed with `safety.safe_rmtree`, inside the artifacts folder.
"""
from __future__ import annotations

import json
import os
import re
import time
import uuid
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import select

from tuneloop.safety import safe_rmtree
from tuneloop.store import Artifact, EvalRun, ModelVersion, Session, utcnow

META_FILE = "meta.json"
TMP_PREFIX = ".tmp-"
# An orphan younger than this may belong to a run that is committing its row right now.
ORPHAN_GRACE_S = 600.0


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
            safe_rmtree(final, inside=root)
        os.replace(tmp, final)
    except BaseException:
        safe_rmtree(tmp, inside=root, ignore_errors=True)
        raise
    return final


def read_meta(path: Path) -> dict[str, Any]:
    return json.loads((path / META_FILE).read_text(encoding="utf-8"))


def clean_temporary(root: Path, kind: str | None = None) -> int:
    """Remove temp folders a crash left behind (all, or only `kind`'s); return how many."""
    if not root.is_dir():
        return 0
    prefix = TMP_PREFIX + (f"{kind}-" if kind else "")
    stale = [p for p in root.iterdir() if p.is_dir() and not p.is_symlink() and p.name.startswith(prefix)]
    for p in stale:
        safe_rmtree(p, inside=root, ignore_errors=True)
    return len(stale)


def standalone_name(stage: str) -> re.Pattern[str]:
    """The names `run_name(stage, None)` gives: `STAGE-YYYYmmdd-HHMMSS-ffffff`."""
    return re.compile(rf"{re.escape(stage)}-\d{{8}}-\d{{6}}-\d{{6}}")


def known_paths(session: Session) -> set[str]:
    """Every artifact path a store row names (resolved)."""
    rows = [*session.scalars(select(Artifact.path)), *session.scalars(select(ModelVersion.adapter_path)),
            *session.scalars(select(EvalRun.artifact_path))]
    return {str(Path(p).resolve()) for p in rows if p}


def remove_orphans(session: Session, root: Path, kind: str, stage: str, grace_s: float = ORPHAN_GRACE_S) -> int:
    """Remove `stage`'s standalone artifacts under root/kind that no store row names; return how many.

    Only timestamped standalone names qualify: a cycle's artifacts (`cycle-NNNN-STAGE`) are reused
    when the cycle resumes. An artifact written less than `grace_s` seconds ago is kept.
    """
    folder = root / kind
    if not folder.is_dir():
        return 0
    pattern, known, now = standalone_name(stage), known_paths(session), time.time()
    removed = 0
    for p in folder.iterdir():
        if (p.is_dir() and not p.is_symlink() and pattern.fullmatch(p.name) and str(p.resolve()) not in known
                and now - p.stat().st_mtime >= grace_s):
            safe_rmtree(p, inside=root, ignore_errors=True)
            removed += 1
    return removed


def clean_leftovers(session: Session, root: Path, kind: str, stage: str) -> int:
    """What a killed run of `stage` left under root: its temp folders and unrecorded artifacts."""
    return clean_temporary(root, kind) + remove_orphans(session, root, kind, stage)


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def run_name(stage: str, cycle_id: int | None) -> str:
    """Artifact name: deterministic inside a cycle (so a resumed step finds it), else timestamped."""
    if cycle_id is not None:
        return f"cycle-{cycle_id:04d}-{stage}"
    return f"{stage}-{datetime.now().strftime('%Y%m%d-%H%M%S-%f')}"
