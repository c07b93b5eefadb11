"""The one way tuneloop removes a folder: `safe_rmtree`.

Every folder tuneloop deletes is one it made (a temporary folder, a training work folder, a
replaced export) inside a folder it owns (the artifacts folder, the index's parent, an export's
parent). `safe_rmtree` checks that before deleting, so a wrong path (a setting, a flag, a bug)
raises one clear error instead of deleting a project: the path must lie strictly inside `inside`,
and no folder holding a project's settings or store, at any depth, is ever removed.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from tuneloop.config import SETTINGS_FILE
from tuneloop.errors import StateError

STORE_FILE = "tuneloop.db"  # the default SQLite store's file name (Project.store_url)
PROJECT_FILES = (SETTINGS_FILE, STORE_FILE)


class UnsafeRemoval(StateError):
    """A removal that could delete something tuneloop does not own; nothing was deleted."""


def holds_project(path: Path) -> bool:
    """Whether `path` or any folder below it holds a tuneloop.yaml or a tuneloop.db."""
    for _, _, files in os.walk(path):
        if any(name in files for name in PROJECT_FILES):
            return True
    return False


def safe_rmtree(path: Path, *, inside: Path, ignore_errors: bool = False) -> bool:
    """Remove the folder `path`, which tuneloop made strictly inside the folder `inside`.

    Returns False when `path` does not exist. Raises UnsafeRemoval (deleting nothing) when `path`
    is `inside` itself, lies outside it, is not a folder, or holds a project (see holds_project);
    `ignore_errors` only skips OSErrors while deleting (as shutil.rmtree's flag does), for cleanup
    on an error path. A symlink at `path` is unlinked, never followed.
    """
    path, inside = Path(path), Path(inside)
    if not path.exists() and not path.is_symlink():
        return False
    # A symlink is removed itself, so only its folder is resolved; anything else fully (.., links).
    real = path.parent.resolve() / path.name if path.is_symlink() else path.resolve()
    if inside.resolve() not in real.parents:
        raise UnsafeRemoval(f"refusing to delete {path}: it is not inside {inside}")
    if path.is_symlink():
        path.unlink()
        return True
    if not path.is_dir():
        raise UnsafeRemoval(f"refusing to delete {path}: it is not a folder")
    if holds_project(path):
        raise UnsafeRemoval(f"refusing to delete {path}: it holds a tuneloop project "
                            f"({' or '.join(PROJECT_FILES)})")
    shutil.rmtree(path, ignore_errors=ignore_errors)
    return True
