"""One cycle at a time per project: an exclusive OS file lock (`flock`) on `<project>/.cycle.lock`.

The kernel releases the lock when its process ends in any way (exit, exception, kill -9), so a
crash never leaves a stale lock behind, and two processes (`tuneloop cycle`, `tuneloop watch`,
a second watcher) can never run a cycle at the same time. The file keeps the holder's pid for the
error message only; the lock itself is the flock. (POSIX only, like the rest of the CLI's
process handling.)
"""
from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tuneloop.errors import StateError

LOCK_NAME = ".cycle.lock"


class CycleBusy(StateError):
    """Another process holds this project's cycle lock."""


@contextmanager
def cycle_lock(root: Path) -> Iterator[None]:
    path = Path(root) / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            raise CycleBusy(f"another cycle is running in this project (pid {holder}); "
                            "wait for it or stop it first") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
