"""`tuneloop watch`: check the signals every `monitor.interval_seconds`; when one fires, start a
cycle with the reasons as its trigger.

* One cycle at a time: `run_cycle` holds the project's flock (`lock.py`), so a second watcher or a
  manual `tuneloop cycle` never runs alongside; the kernel drops the lock if the process dies.
* Debounced: a burst of firing signals starts one cycle, and no triggered cycle starts within
  `monitor.cooldown_seconds` of the last cycle's start (read from the store, so restarts keep it).
* Resumable: an unfinished cycle (a crash, kill -9) is resumed before any signal is checked;
  every step of it skips what it finished before.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta

from sqlalchemy import select

from tuneloop.config import Project
from tuneloop.lock import CycleBusy
from tuneloop.monitor.signals import Reading, check_signals
from tuneloop.progress import Reporter
from tuneloop.store import Cycle, open_store, utcnow


@dataclass
class Tick:
    """What one check did."""

    readings: list[Reading] = field(default_factory=list)
    started: int | None = None  # the cycle run to the end, if any
    resumed: bool = False
    skipped: str | None = None  # why a firing signal did not start a cycle


def _unfinished(sessions) -> Cycle | None:
    with sessions() as s:
        return s.scalar(select(Cycle).where(Cycle.status == "running").order_by(Cycle.id.desc()))


def _cooling(sessions, cooldown: float) -> str | None:
    with sessions() as s:
        last = s.scalar(select(Cycle).order_by(Cycle.started_at.desc(), Cycle.id.desc()))
    if last is None or cooldown <= 0:
        return None
    wait = last.started_at + timedelta(seconds=cooldown) - utcnow()
    if wait.total_seconds() > 0:
        return f"cooldown: cycle {last.id} started less than {cooldown:g} s ago ({wait.total_seconds():.0f} s left)"
    return None


def tick(project: Project, reporter: Reporter, embedder, run_cycle: Callable) -> Tick:
    """One pass: resume an unfinished cycle, else check the signals and maybe start a cycle."""
    sessions = open_store(project.store_url)
    out = Tick()
    try:
        if (pending := _unfinished(sessions)) is not None:
            reporter.log(f"resuming unfinished cycle {pending.id} (trigger: {pending.trigger})")
            out.started, out.resumed = run_cycle(project, reporter, trigger=pending.trigger).id, True
            return out
        with sessions() as s:
            out.readings = check_signals(project, s, embedder)
            s.commit()
        for r in out.readings:
            reporter.log(("[bold red]fired[/bold red] " if r.fired else "") + f"{r.signal}: {r.reason}")
        reasons = [r.reason for r in out.readings if r.fired]
        if not reasons:
            return out
        out.skipped = _cooling(sessions, project.settings.monitor.cooldown_seconds)
        if out.skipped is None:
            out.started = run_cycle(project, reporter, trigger="watch: " + "; ".join(reasons)[:190]).id
    except CycleBusy as err:
        out.skipped = str(err)
    if out.skipped:
        reporter.log(f"no cycle started: {out.skipped}")
    return out


def watch(project: Project, reporter: Reporter, embedder, run_cycle: Callable, once: bool = False,
          sleep: Callable[[float], None] = time.sleep) -> list[Tick]:
    """Tick every `monitor.interval_seconds` until interrupted (or once)."""
    ticks = []
    while True:
        try:
            ticks.append(tick(project, reporter, embedder, run_cycle))
        except Exception as err:  # a failing cycle must not end the watch: its next tick resumes it
            if once:
                raise
            reporter.log(f"[red]cycle failed:[/red] {err}; retrying in {project.settings.monitor.interval_seconds:g} s")
        if once:
            return ticks
        sleep(project.settings.monitor.interval_seconds)
