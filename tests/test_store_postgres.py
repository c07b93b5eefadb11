"""The store on a real PostgreSQL server the tests start (tests/postgres.py): a project moved from
SQLite with `tuneloop migrate`, row for row, then run on PostgreSQL; clear one-line errors for a
server that cannot be reached and for a target that is not empty."""
from __future__ import annotations

import math
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
from sqlalchemy import func, select
from typer.testing import CliRunner

from tests.helpers import FakeTeacher, deep_merge, free_port, ingest_project, use_teacher, write_settings
from tuneloop import loop
from tuneloop.cli import app
from tuneloop.config import load_project
from tuneloop.progress import SilentReporter
from tuneloop.store import (
    Base,
    Cycle,
    EvalRun,
    Example,
    Feedback,
    IdempotencyKey,
    Interaction,
    ModelVersion,
    open_store,
)
from tuneloop.versions import ensure_base_version


def counts(url: str) -> dict[str, int]:
    with open_store(url)() as s:
        return {t.name: s.scalar(select(func.count()).select_from(t)) for t in Base.metadata.sorted_tables}


def test_migrate_copies_a_project_into_postgresql_row_for_row_and_the_cycle_goes_on_there(
        project, monkeypatch, postgres_server):
    p = project()
    use_teacher(monkeypatch, FakeTeacher())
    loop.run_cycle(p, SilentReporter(), trigger="on sqlite")
    with open_store(p.store_url)() as s:  # people's traffic, with text SQLite and PostgreSQL must both keep
        i = Interaction(question="Qui peut résilier ? 契約", answer="Either party. \u2028", chunk_ids=[1, 2])
        s.add(i)
        s.flush()
        s.add(Feedback(interaction_id=i.id, thumbs=1, comment="ok", client="alice"))
        s.commit()
    before = counts(p.store_url)
    target = postgres_server.new_database()
    result = CliRunner().invoke(app, ["migrate", "--to", target.replace("+psycopg", ""), "--project", str(p.root)])
    assert result.exit_code == 0, result.output
    assert f"copied and checked {sum(before.values()) - before['schema_migrations']} rows" in result.output
    assert counts(target) == before and before["chunks"] > 0 and before["eval_runs"] == 2
    with open_store(target)() as s:
        assert s.scalar(select(Interaction)).question == "Qui peut résilier ? 契約"
        metrics = s.scalars(select(EvalRun.metrics)).all()
        assert all(v is None or math.isfinite(v) for m in metrics for v in m.values() if not isinstance(v, str))

    # the same target again: refused, nothing changed on either side
    again = CliRunner().invoke(app, ["migrate", "--to", target, "--project", str(p.root)])
    assert again.exit_code != 0 and "already holds rows" in again.output and "Traceback" not in again.output
    assert counts(target) == before == counts(p.store_url)

    # the project now lives on PostgreSQL: a second cycle continues it (new ids after the copied ones)
    settings = deep_merge(p.settings.model_dump(mode="json"), {"store_url": target})
    write_settings(p.root, settings)
    moved = load_project(p.root)
    cycle = loop.run_cycle(moved, SilentReporter(), trigger="on postgresql")
    assert cycle.id == 2 and cycle.status == "done"
    with open_store(moved.store_url)() as s:
        assert [c.trigger for c in s.scalars(select(Cycle).order_by(Cycle.id))] == ["on sqlite", "on postgresql"]
        assert s.scalar(select(func.max(ModelVersion.id))) == 3 and s.get(ModelVersion, 3).name == "v2"
        ids = s.scalars(select(Example.id).where(Example.cycle_id == 2)).all()
        assert all(i > before["examples"] for i in ids)


def test_a_server_that_cannot_be_reached_is_one_line_naming_store_url(project, tmp_path):
    port = free_port()
    url = f"postgresql://someone:secret@127.0.0.1:{port}/tuneloop"
    p = project({"store_url": url}, pairs=False)
    result = CliRunner().invoke(app, ["status", "--project", str(p.root)])
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert f"store_url postgresql+psycopg://someone:***@127.0.0.1:{port}/tuneloop: cannot use the database" in \
        " ".join(result.output.split())
    assert "secret" not in result.output  # the password never reaches a message
    bad = CliRunner().invoke(app, ["migrate", "--to", "postgres:/nowhere", "--project", str(p.root)])
    assert bad.exit_code != 0 and "store_url" in bad.output and "Traceback" not in bad.output


def start_serve(root, port: int, env: dict) -> subprocess.Popen:
    """`tuneloop serve` in its own process; returns once it answers."""
    tuneloop = Path(sys.executable).parent / "tuneloop"  # the installed command
    proc = subprocess.Popen([str(tuneloop), "serve", "--port", str(port), "-p", str(root)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v1/models", headers={"Authorization": "Bearer key-alice"},
                         timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise AssertionError(proc.stderr.read().decode()[-3000:])
        time.sleep(0.2)
    proc.kill()
    raise AssertionError("tuneloop serve did not answer in 120 s")


def test_two_servers_on_one_postgresql_store_every_post_exactly_once(project, postgres_server):
    """Two `tuneloop serve` processes, one database: each post is sent to both at the same moment
    with the same Idempotency-Key (a client retrying on the other server); each is stored once and
    both servers answer with the same feedback id."""
    p = project({"store_url": postgres_server.new_database()}, pairs=False)
    ingest_project(p)
    with open_store(p.store_url)() as s:
        ensure_base_version(p, s)
        owned = {c: [] for c in ("alice", "bob")}
        for j in range(24):
            client = "alice" if j % 2 else "bob"
            i = Interaction(question=f"Question {j}?", answer=f"Answer {j}.", chunk_ids=[], client=client)
            s.add(i)
            owned[client].append(i)
        s.commit()
        targets = [(c, i.public_id) for c, rows in owned.items() for i in rows]
    env = {**os.environ, "TUNELOOP_API_KEYS": "alice:key-alice,bob:key-bob", "TUNELOOP_ADMIN_TOKEN": "admin-x",
           "HF_HUB_OFFLINE": "1"}
    ports = [free_port(), free_port()]
    servers = [start_serve(p.root, port, env) for port in ports]
    try:
        answers: dict[tuple[int, int], httpx.Response] = {}

        def post(n: int, side: int, barrier: threading.Barrier) -> None:
            client, public_id = targets[n]
            body = {"interaction_id": public_id, "thumbs": "up" if n % 3 else "down", "comment": f"post {n}"}
            barrier.wait()
            answers[(n, side)] = httpx.post(f"http://127.0.0.1:{ports[side]}/v1/feedback", json=body, timeout=30,
                                            headers={"Authorization": f"Bearer key-{client}",
                                                     "Idempotency-Key": f"retry-{n}"})

        for n in range(len(targets)):
            barrier = threading.Barrier(2)
            pair = [threading.Thread(target=post, args=(n, side, barrier)) for side in (0, 1)]
            for t in pair:
                t.start()
            for t in pair:
                t.join()
    finally:
        for server in servers:
            server.terminate()
            server.wait(timeout=30)
    for n in range(len(targets)):
        first, second = answers[(n, 0)], answers[(n, 1)]
        assert (first.status_code, second.status_code) == (201, 201), (first.text, second.text)
        assert first.json()["id"] == second.json()["id"]  # one of them replayed the other's response
    with open_store(p.store_url)() as s:
        rows = s.scalars(select(Feedback)).all()
        assert len(rows) == len(targets) == s.scalar(select(func.count(IdempotencyKey.id)))
        assert sorted(f.comment for f in rows) == sorted(f"post {n}" for n in range(len(targets)))
        by_id = {i.id: i.client for i in s.scalars(select(Interaction))}
        assert all(by_id[f.interaction_id] == f.client for f in rows)  # each by the key that owns the answer

