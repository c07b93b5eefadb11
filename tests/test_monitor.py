"""Monitoring signals and the watch loop: satisfaction, query drift, documents, lock, debounce, resume."""
from __future__ import annotations

import hashlib
import os
import signal
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import select

from tests.helpers import KILLABLE_PROJECT, RecordingReporter, ingest_project, kill_9_during_training
from tuneloop.lock import CycleBusy, cycle_lock
from tuneloop.monitor import signals
from tuneloop.monitor.watch import tick
from tuneloop.progress import SilentReporter
from tuneloop.store import Cycle, Feedback, Interaction, ModelVersion, SignalValue, open_store, utcnow
from tuneloop.versions import ensure_base_version

REPO = Path(__file__).resolve().parents[1]
T0 = utcnow() - timedelta(days=1)


class TopicEmbedder:
    """8-d vectors, random per text; questions about crypto lie elsewhere (a shifted mean)."""

    name = "topic-embedder"

    def embed(self, texts):
        out = []
        for t in texts:
            seed = int(hashlib.sha256(t.encode()).hexdigest()[:8], 16)
            v = np.random.default_rng(seed).normal(0, 1, 8)
            if "crypto" in t:
                v[0] += 2.0
            out.append(v)
        return np.array(out)


def add_votes(s, version, votes, start=0):
    for k, up in enumerate(votes):
        it = Interaction(question=f"question {start + k}?", answer="a", model_version_id=version.id,
                         created_at=T0 + timedelta(minutes=start + k))
        s.add(it)
        s.flush()
        s.add(Feedback(interaction_id=it.id, thumbs=1 if up else -1, created_at=it.created_at))
    s.flush()


@pytest.fixture
def env(project):
    def make(overrides=None, pairs=True):
        p = project(overrides, pairs=pairs)
        s = open_store(p.store_url)()
        base = ensure_base_version(p, s)
        s.commit()
        return p, s, base
    return make


def test_satisfaction_floor_window_and_versions(env):
    p, s, base = env({"monitor": {"min_votes": 20, "satisfaction_window": 50, "change_detector": "none"}})
    add_votes(s, base, [1, 0] * 5)
    r = signals.satisfaction(p, s)
    assert (r.value, r.fired) == (None, False) and "10 votes" in r.reason
    add_votes(s, base, [1, 1, 1, 0] * 10, start=10)  # 40 more: the latest 50 are 35/50 up
    r = signals.satisfaction(p, s)
    assert r.value == pytest.approx(0.70) and not r.fired
    add_votes(s, base, [0] * 20, start=50)  # latest 50: the last 30 of the 40 (22 up) and 20 down
    r = signals.satisfaction(p, s)
    assert r.value == pytest.approx(0.44) and r.fired and "0.44 < 0.6" in r.reason
    # votes on another version's answers are not the champion's satisfaction
    other = ModelVersion(name="v9", base_model="m", method="sft", status="retired")
    s.add(other)
    s.flush()
    add_votes(s, other, [1] * 100, start=100)
    assert signals.satisfaction(p, s).value == pytest.approx(0.44)


def test_satisfaction_change_detector_sees_a_drop_above_the_floor(env):
    p, s, base = env({"monitor": {"satisfaction_floor": 0.3, "min_votes": 20}})
    rng = np.random.default_rng(0)
    add_votes(s, base, list(rng.random(200) < 0.9))
    r = signals.satisfaction(p, s)
    assert not r.fired and r.detail["change_points"] == []
    add_votes(s, base, list(rng.random(40) < 0.45), start=200)
    r = signals.satisfaction(p, s)
    assert r.fired and r.value > 0.3 and "dropped (page_hinkley" in r.reason


def test_query_drift_quiet_on_the_same_topics_and_fires_on_new_ones(env):
    p, s, base = env({"monitor": {"min_queries": 30, "drift_alpha": 0.01, "drift_permutations": 300}})
    emb = TopicEmbedder()
    for k in range(40):
        s.add(Interaction(question=f"is clause {k} of the lease binding?", answer="a", created_at=T0))
    s.flush()
    r = signals.query_drift(p, s, emb)
    assert not r.fired and r.value > 0.01 and r.detail["n_recent"] == 40 and r.detail["n_known"] == 20
    # a cycle starts: those questions become known; then questions about crypto arrive
    s.add(Cycle(trigger="test", status="done", started_at=T0 + timedelta(hours=1)))
    s.flush()
    assert "0 new questions" in signals.query_drift(p, s, emb).reason
    for k in range(40):
        s.add(Interaction(question=f"may the crypto wallet {k} be frozen?", answer="a",
                          created_at=T0 + timedelta(hours=2)))
    s.flush()
    r = signals.query_drift(p, s, emb)
    assert r.fired and r.value < 0.01 and r.detail["n_known"] == 60 and "query drift: MMD p=" in r.reason


def test_documents_signal_and_recorded_readings(env):
    p, s, _ = env(pairs=False)
    r = signals.documents(p, s)
    assert r.fired and r.value == 6 and len(r.detail["new"]) == 6  # nothing ingested yet
    s.close()
    ingest_project(p)
    s = open_store(p.store_url)()
    assert not signals.documents(p, s).fired
    docs = p.path("documents")
    (docs / "99-new.md").write_text("# A new agreement\n\nThe term is two years.\n")
    first = sorted(docs.glob("0*.md"))[0]
    first.write_text(first.read_text() + "\nAmendment: the notice period is 60 days.\n")
    readings = signals.check_signals(p, s, None)
    (doc,) = [r for r in readings if r.signal == "documents"]
    assert doc.fired and doc.detail == {"new": ["99-new.md"], "changed": [first.name]}
    s.commit()
    rows = s.scalars(select(SignalValue)).all()
    assert {r.signal for r in rows} == {"satisfaction", "documents", "review_queue"} and any(r.fired for r in rows)


class FakeCycles:
    """run_cycle stand-in: records a finished Cycle row per call."""

    def __init__(self):
        self.triggers = []

    def __call__(self, project, reporter, trigger="manual"):
        with cycle_lock(project.root):
            self.triggers.append(trigger)
            with open_store(project.store_url)() as s:
                c = Cycle(trigger=trigger, status="done", finished_at=utcnow())
                s.add(c)
                s.commit()
                return c


def test_a_burst_of_triggers_starts_exactly_one_cycle(env):
    p, s, base = env({"monitor": {"cooldown_seconds": 3600, "min_votes": 5, "change_detector": "none"}},
                     pairs=False)
    add_votes(s, base, [0] * 10)  # satisfaction 0.0 and 6 new documents: two signals fire at once
    s.commit()
    cycles = FakeCycles()
    first = tick(p, SilentReporter(), None, cycles)
    assert first.started is not None and len(cycles.triggers) == 1
    assert "satisfaction 0.00" in cycles.triggers[0] and "6 new" in cycles.triggers[0]
    for _ in range(3):  # still firing: the cooldown holds them back
        t = tick(p, SilentReporter(), None, cycles)
        assert t.started is None and t.skipped.startswith("cooldown")
    assert len(cycles.triggers) == 1
    with open_store(p.store_url)() as s2:
        assert s2.scalar(select(Cycle)).trigger.startswith("watch: ")


def test_no_second_cycle_while_one_holds_the_lock(env):
    p, _, _ = env({"monitor": {"cooldown_seconds": 0}}, pairs=False)
    cycles = FakeCycles()
    with cycle_lock(p.root):
        t = tick(p, SilentReporter(), None, cycles)
        with pytest.raises(CycleBusy, match=f"pid {os.getpid()}"):
            with cycle_lock(p.root):
                pass
    assert t.started is None and "another cycle is running" in t.skipped and cycles.triggers == []
    assert tick(p, SilentReporter(), None, cycles).started is not None  # released


WATCH_SCRIPT = """
import sys
sys.path.insert(0, {repo!r})
import tests.helpers  # noqa: F401  (environment: offline, one thread)
from pathlib import Path
from tuneloop.config import load_project
from tuneloop.loop import run_cycle
from tuneloop.monitor.watch import watch
from tuneloop.progress import SilentReporter
watch(load_project(Path({root!r})), SilentReporter(), None, run_cycle, once=True)
print("FINISHED")
"""


def test_watch_resumes_its_cycle_after_kill_9(project, tmp_path):
    """`watch` starts a cycle (new documents), is killed mid-training; the next tick resumes it."""
    from tuneloop import loop

    p = project(KILLABLE_PROJECT)
    assert kill_9_during_training(WATCH_SCRIPT.format(repo=str(REPO), root=str(p.root)), p, tmp_path) == -signal.SIGKILL
    with open_store(p.store_url)() as s:
        (cycle,) = s.scalars(select(Cycle)).all()
        assert cycle.status == "running" and cycle.trigger.startswith("watch: ") and "new" in cycle.trigger
    rep = RecordingReporter()
    t = tick(p, rep, None, loop.run_cycle)  # the dead process's lock is gone with it
    assert t.resumed and t.started == cycle.id
    assert any(m.startswith("resuming training from") for m in rep.messages)
    with open_store(p.store_url)() as s:
        (cycle,) = s.scalars(select(Cycle)).all()
        assert cycle.status == "done"


def test_cli_monitor_prints_and_records_the_signals(env, monkeypatch):
    from typer.testing import CliRunner

    from tuneloop.cli import app

    monkeypatch.setenv("COLUMNS", "200")
    p, s, _ = env(pairs=False)
    result = CliRunner().invoke(app, ["monitor", "-p", str(p.root)])
    assert result.exit_code == 0, result.output
    assert "documents" in result.output and "6 new and 0 changed" in result.output and "yes" in result.output
    with open_store(p.store_url)() as s2:
        assert s2.scalar(select(SignalValue).where(SignalValue.signal == "documents")).fired
