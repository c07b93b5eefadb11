"""The store's migrations and the artifact folders' atomicity and immutability."""
from __future__ import annotations

import json
import os
import stat
import time
from pathlib import Path

import pytest
from sqlalchemy import create_engine, func, inspect, select
from sqlalchemy.exc import IntegrityError

from tuneloop import store as st
from tuneloop.artifacts import (
    META_FILE,
    TMP_PREFIX,
    clean_leftovers,
    clean_temporary,
    is_complete,
    read_jsonl,
    read_meta,
    write_artifact,
    write_jsonl,
)


def test_migrations_are_applied_once(store_url):
    url = store_url
    engine = create_engine(url)
    assert st.migrate(engine) == [v for v, _, _ in st.MIGRATIONS]
    assert st.migrate(engine) == []
    sessions = st.open_store(url)  # a third and fourth time, through the public entry point
    st.open_store(url)
    with sessions() as s:
        rows = s.execute(select(st.Migration.version, st.Migration.name)).all()
    assert [r[0] for r in rows] == [v for v, _, _ in st.MIGRATIONS]
    tables = set(inspect(engine).get_table_names())
    assert {"documents", "chunks", "examples", "model_versions", "eval_runs", "cycles", "cycle_steps",
            "artifacts", "schema_migrations"} <= tables


def test_a_new_migration_runs_on_an_existing_database(store_url, monkeypatch):
    url = store_url
    st.open_store(url)
    calls = []
    monkeypatch.setattr(st, "MIGRATIONS", st.MIGRATIONS + [(99, "test step", lambda conn: calls.append(1))])
    engine = create_engine(url)
    assert st.migrate(engine) == [99]
    assert st.migrate(engine) == []
    assert calls == [1]


def test_later_migrations_upgrade_a_version_1_database_without_losing_rows(tmp_path):
    """A database made before serving existed (migration 1 only, old columns) gains the new
    columns (migration 2), the signal table (migration 3), public interaction ids (migration 4) and
    the review queue (migration 5)."""
    from sqlalchemy import text

    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE interactions (id INTEGER PRIMARY KEY, question TEXT, answer TEXT, "
                          "chunk_ids JSON, model_version_id INTEGER, latency_ms FLOAT, created_at DATETIME)"))
        conn.execute(text("CREATE TABLE feedback (id INTEGER PRIMARY KEY, interaction_id INTEGER, thumbs INTEGER, "
                          "rating INTEGER, comment TEXT, corrected_answer TEXT, created_at DATETIME)"))
        conn.execute(text("INSERT INTO interactions (id, question, answer, chunk_ids, latency_ms) "
                          "VALUES (1, 'q?', 'a', '[]', 1.0)"))
        conn.execute(text("INSERT INTO feedback (id, interaction_id, thumbs) VALUES (1, 1, 1)"))
        st.Migration.__table__.create(conn)
        conn.execute(st.Migration.__table__.insert().values(version=1, name="initial schema",
                                                            applied_at=st.utcnow()))
    assert st.migrate(engine) == [2, 3, 4, 5]
    assert {"signal_values", "review_items"} <= set(inspect(engine).get_table_names())
    assert st.migrate(engine) == []  # idempotent
    cols = {c["name"] for c in inspect(engine).get_columns("interactions")}
    assert {"document", "ab_pair", "arm", "client"} <= cols
    columns = {c["name"] for c in inspect(engine).get_columns("feedback")}
    assert {"preferred_interaction_id", "source", "client"} <= columns
    with st.open_store(url)() as s:
        fb = s.get(st.Feedback, 1)
        assert (fb.thumbs, fb.source) == (1, "human") and s.get(st.Interaction, 1).question == "q?"
        assert len(s.get(st.Interaction, 1).public_id) >= 20 and fb.verdict_key is None
        s.add(st.Reward(prompt="q?", completion="a", reward=0.5, source="ai"))
        s.add(st.SignalValue(signal="satisfaction", value=0.5, fired=True, detail={"reason": "test"}))
        s.commit()
        assert s.scalar(select(st.SignalValue)).fired is True


def test_migration_4_backfills_distinct_public_ids_and_enforces_uniqueness(tmp_path):
    """Interactions stored before migration 4 get random, distinct public ids; the column is unique."""
    from sqlalchemy import text

    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    engine = create_engine(url)
    st.migrate(engine)
    with engine.begin() as conn:  # back to a version-3 database with three old interactions
        conn.execute(text("DROP INDEX ix_interactions_public_id"))
        conn.execute(text("DROP INDEX ix_feedback_verdict_key"))
        conn.execute(text("ALTER TABLE interactions DROP COLUMN public_id"))
        conn.execute(text("ALTER TABLE feedback DROP COLUMN verdict_key"))
        conn.execute(text("DROP TABLE idempotency_keys"))
        conn.execute(text("DELETE FROM schema_migrations WHERE version = 4"))
        for i in (1, 2, 3):
            conn.execute(text(f"INSERT INTO interactions (id, question, answer, chunk_ids, latency_ms, created_at) "
                              f"VALUES ({i}, 'q{i}', 'a', '[]', 1.0, '2026-01-01')"))
    assert st.migrate(engine) == [4]
    with st.open_store(url)() as s:
        ids = [i.public_id for i in s.scalars(select(st.Interaction).order_by(st.Interaction.id))]
        assert len(set(ids)) == 3 and all(len(i) >= 20 and not i.isdigit() for i in ids)
        s.add(st.Interaction(question="q", answer="a", chunk_ids=[], public_id=ids[0]))
        with pytest.raises(IntegrityError):
            s.commit()
    assert "idempotency_keys" in inspect(engine).get_table_names()


def test_store_keeps_rows_and_enforces_unique_examples(store_url):
    sessions = st.open_store(store_url)
    with sessions() as s:
        h = st.text_hash("q", "a")
        s.add(st.Example(kind="seed", split="train", question="q", answer="a", content_hash=h))
        s.commit()
        s.add(st.Example(kind="seed", split="train", question="q", answer="a", content_hash=h))
        with pytest.raises(IntegrityError):
            s.commit()
        s.rollback()
        s.add(st.Example(kind="seed", split="eval", question="q", answer="a", content_hash=h))
        s.commit()
        assert s.scalar(select(func.count(st.Example.id))) == 2
    assert st.text_hash("ab", "c") != st.text_hash("a", "bc")


def schema(url: str) -> dict:
    """Tables -> columns (name, generic type, nullable), indexes and unique constraints, as
    SQLAlchemy reads them back from the database."""
    inspector = inspect(create_engine(url))
    out = {}
    for table in sorted(inspector.get_table_names()):
        columns = {c["name"]: (type(c["type"]).__name__ if not hasattr(c["type"], "length") else
                               f"{type(c['type']).__name__}({c['type'].length})", c["nullable"])
                   for c in inspector.get_columns(table)}
        indexes = {(tuple(i["column_names"]), bool(i["unique"])) for i in inspector.get_indexes(table)}
        uniques = {tuple(u["column_names"]) for u in inspector.get_unique_constraints(table)}
        foreign = {(tuple(f["constrained_columns"]), f["referred_table"]) for f in inspector.get_foreign_keys(table)}
        out[table] = (columns, indexes | {(u, True) for u in uniques}, foreign)
    return out


GENERIC = {"VARCHAR": "String", "TEXT": "Text", "INTEGER": "Integer", "FLOAT": "Float", "DOUBLE_PRECISION": "Float",
           "REAL": "Float", "JSON": "JSON", "DATETIME": "DateTime", "TIMESTAMP": "DateTime", "BOOLEAN": "Boolean"}


def generic(schema_: dict) -> dict:
    def kind(name: str) -> str:
        base, _, length = name.partition("(")
        return GENERIC.get(base, base) + (f"({length}" if length and length != "None)" else "")
    return {t: ({c: (kind(k), n) for c, (k, n) in cols.items()}, idx, fk) for t, (cols, idx, fk) in schema_.items()}


def test_the_migrations_give_the_same_schema_on_sqlite_and_postgresql(tmp_path, postgres_server):
    """The same tables, columns (generic type, length, nullability), indexes, unique and foreign keys."""
    sqlite_url, pg_url = f"sqlite:///{tmp_path / 'db.sqlite'}", postgres_server.new_database()
    st.open_store(sqlite_url)
    st.open_store(pg_url)
    on_sqlite, on_pg = generic(schema(sqlite_url)), generic(schema(pg_url))
    assert on_sqlite.keys() == on_pg.keys() and len(on_sqlite) >= 13
    for table in on_sqlite:
        assert on_sqlite[table] == on_pg[table], table
    with create_engine(pg_url).connect() as conn:
        assert [r[0] for r in conn.execute(select(st.Migration.version))] == [v for v, _, _ in st.MIGRATIONS]


def test_write_artifact_renames_a_complete_folder_into_place(tmp_path):
    def write(tmp: Path) -> None:
        assert tmp.name.startswith(TMP_PREFIX) and tmp.parent == tmp_path
        write_jsonl(tmp / "data.jsonl", [{"x": 1}, {"x": 2}])

    path = write_artifact(tmp_path, "datasets", "d1", {"stage": "test", "parent": "p0"}, write)
    assert path == tmp_path / "datasets" / "d1"
    assert is_complete(path)
    assert read_jsonl(path / "data.jsonl") == [{"x": 1}, {"x": 2}]
    meta = read_meta(path)
    assert (meta["kind"], meta["name"], meta["stage"], meta["parent"]) == ("datasets", "d1", "test", "p0")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(TMP_PREFIX)]


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_a_failing_writer_leaves_nothing_behind(tmp_path, error):
    def write(tmp: Path) -> None:
        (tmp / "half.bin").write_bytes(b"x" * 100)
        raise error("boom")

    with pytest.raises(error):
        write_artifact(tmp_path, "adapters", "a1", {}, write)
    assert not (tmp_path / "adapters" / "a1").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(TMP_PREFIX)]


def test_a_complete_artifact_is_not_rewritten(tmp_path):
    first = write_artifact(tmp_path, "evals", "e1", {"n": 1}, lambda t: (t / "out.txt").write_text("first"))
    before = (first / META_FILE).read_text()
    calls = []

    def write_again(tmp: Path) -> None:
        calls.append(tmp)
        (tmp / "out.txt").write_text("second")

    again = write_artifact(tmp_path, "evals", "e1", {"n": 2}, write_again)
    assert again == first
    assert calls == []
    assert (first / "out.txt").read_text() == "first"
    assert (first / META_FILE).read_text() == before


def test_an_incomplete_leftover_under_the_final_name_is_replaced(tmp_path):
    leftover = tmp_path / "datasets" / "d1"
    leftover.mkdir(parents=True)
    (leftover / "stale.txt").write_text("from a crash")
    assert not is_complete(leftover)
    path = write_artifact(tmp_path, "datasets", "d1", {}, lambda t: (t / "new.txt").write_text("ok"))
    assert sorted(p.name for p in path.iterdir()) == [META_FILE, "new.txt"]


def test_clean_temporary_removes_only_temp_folders(tmp_path):
    assert clean_temporary(tmp_path / "missing") == 0
    (tmp_path / f"{TMP_PREFIX}datasets-x-1234").mkdir()
    (tmp_path / f"{TMP_PREFIX}adapters-y-5678" / "sub").mkdir(parents=True)
    (tmp_path / "datasets" / "keep").mkdir(parents=True)
    (tmp_path / ".work").mkdir()
    (tmp_path / f"{TMP_PREFIX}note.txt").write_text("a file, not a folder")
    assert clean_temporary(tmp_path) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([".work", "datasets", f"{TMP_PREFIX}note.txt"])
    assert clean_temporary(tmp_path) == 0


def test_meta_is_json_serialisable_with_paths(tmp_path):
    path = write_artifact(tmp_path, "reports", "r", {"source": tmp_path / "x"}, lambda t: None)
    assert json.loads((path / META_FILE).read_text())["source"] == str(tmp_path / "x")


def _artifact(root: Path, kind: str, name: str, age_s: float = 0.0) -> Path:
    path = write_artifact(root, kind, name, {}, lambda t: (t / "data.jsonl").write_text("{}\n"))
    if age_s:
        old = time.time() - age_s
        os.utime(path, (old, old))
    return path


def test_clean_leftovers_removes_a_killed_runs_temp_and_unrecorded_artifacts_only(tmp_path):
    """A synth killed before its commit left `.tmp-datasets-*` and a dataset no row knows."""
    root = tmp_path / "artifacts"
    sessions = st.open_store(f"sqlite:///{tmp_path / 'tuneloop.db'}")
    orphan = _artifact(root, "datasets", "synth-20250101-120000-000001", age_s=3600)
    recorded = _artifact(root, "datasets", "synth-20250101-120000-000002", age_s=3600)
    fresh = _artifact(root, "datasets", "synth-20250101-120000-000003")  # may be committing right now
    cycle = _artifact(root, "datasets", "cycle-0001-synth", age_s=3600)  # a resumed cycle reuses it
    other_stage = _artifact(root, "datasets", "rlaif-20250101-120000-000004", age_s=3600)
    adapter = _artifact(root, "adapters", "synth-20250101-120000-000005", age_s=3600)  # another kind
    (root / f"{TMP_PREFIX}datasets-synth-x-1234" / "sub").mkdir(parents=True)
    (root / f"{TMP_PREFIX}adapters-sft-y-5678").mkdir()
    (root / ".work" / "sft-1").mkdir(parents=True)
    with sessions() as s:
        s.add(st.Artifact(kind="dataset", path=str(recorded)))
        s.commit()
        assert clean_leftovers(s, root, "datasets", "synth") == 2
        assert clean_leftovers(s, root, "datasets", "synth") == 0
    assert not orphan.exists() and not (root / f"{TMP_PREFIX}datasets-synth-x-1234").exists()
    for kept in (recorded, fresh, cycle, other_stage, adapter, root / f"{TMP_PREFIX}adapters-sft-y-5678",
                 root / ".work" / "sft-1"):
        assert kept.is_dir(), kept


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("umask", [0o022, 0o000])
def test_the_store_and_its_side_files_are_private_whatever_the_umask(tmp_path, umask):
    db = tmp_path / "tuneloop.db"
    previous = os.umask(umask)
    try:
        sessions = st.open_store(f"sqlite:///{db}")
        with sessions() as s:  # a write: SQLite creates the -wal and -shm files
            s.add(st.Document(name="d", source="d", sha256="0", n_chars=0))
            s.commit()
            side = [Path(f"{db}{suffix}") for suffix in ("-wal", "-shm")]
            assert all(p.is_file() for p in side)
            assert [_mode(p) for p in (db, *side)] == [0o600] * 3
    finally:
        os.umask(previous)


def test_opening_a_store_an_older_version_made_world_readable_makes_it_private(tmp_path):
    import sqlite3

    db = tmp_path / "tuneloop.db"
    previous = os.umask(0o022)
    try:
        old = sqlite3.connect(db)  # as an older version (or its running server) left it: 0644
        old.execute("PRAGMA journal_mode=WAL")
        old.execute("CREATE TABLE t (x)")
        old.commit()
        side = [Path(f"{db}{suffix}") for suffix in ("-wal", "-shm")]
        assert [_mode(p) for p in (db, *side)] == [0o644] * 3
        st.open_store(f"sqlite:///{db}")
        assert [_mode(p) for p in (db, *side)] == [0o600] * 3
        old.close()
    finally:
        os.umask(previous)
