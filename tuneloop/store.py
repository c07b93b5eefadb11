"""The system of record: SQLite by default (a URL switches to PostgreSQL), via SQLAlchemy 2.

Schema changes are append-only named migrations (see MIGRATIONS). Migration 1 creates the tables
from the ORM classes below; a later change to a class must add a migration that alters existing
databases and is a no-op where the column already exists (fresh databases get it from migration 1).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import secrets
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    event,
    select,
    update,
)
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from tuneloop.errors import ConfigError


def utcnow() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


def example_hash(question: str, answer: str, document: str | None) -> str:
    """Identity of a Q/A example. The document is part of it: the same question with the same
    answer ("Is there a non-compete clause?" / "No") about two contracts is two examples."""
    return text_hash(question, answer, document or "")


def new_public_id() -> str:
    """An unguessable id for an interaction, shown to clients instead of the row id (128 random bits)."""
    return secrets.token_urlsafe(16)


def text_hash(*parts: str) -> str:
    """A stable content hash, used to deduplicate rows."""
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode("utf-8"))
        h.update(b"\x00")
    return h.hexdigest()


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON}


class Migration(Base):
    __tablename__ = "schema_migrations"
    version: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    applied_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class Document(Base):
    __tablename__ = "documents"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(500), unique=True)  # stable key (file name)
    source: Mapped[str] = mapped_column(Text)  # path it was read from
    sha256: Mapped[str] = mapped_column(String(64))
    n_chars: Mapped[int] = mapped_column(Integer)
    ingested_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class Chunk(Base):
    __tablename__ = "chunks"
    id: Mapped[int] = mapped_column(primary_key=True)
    document_id: Mapped[int] = mapped_column(ForeignKey("documents.id", ondelete="CASCADE"), index=True)
    position: Mapped[int] = mapped_column(Integer)
    text: Mapped[str] = mapped_column(Text)
    start: Mapped[int] = mapped_column(Integer)  # character offsets in the document text
    end: Mapped[int] = mapped_column(Integer)
    n_tokens: Mapped[int] = mapped_column(Integer)


class Example(Base):
    """A question/answer pair: a human seed, a synthetic example, or one derived from feedback."""

    __tablename__ = "examples"
    __table_args__ = (UniqueConstraint("content_hash", "split"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    kind: Mapped[str] = mapped_column(String(20))  # seed | synthetic | feedback
    split: Mapped[str] = mapped_column(String(10), default="train")  # train | eval | dev
    question: Mapped[str] = mapped_column(Text)
    answer: Mapped[str] = mapped_column(Text)
    document: Mapped[str | None] = mapped_column(String(500), nullable=True)  # Document.name
    content_hash: Mapped[str] = mapped_column(String(64))
    cycle_id: Mapped[int | None] = mapped_column(ForeignKey("cycles.id"), nullable=True)
    meta: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)  # provenance
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class Interaction(Base):
    __tablename__ = "interactions"
    id: Mapped[int] = mapped_column(primary_key=True)
    question: Mapped[str] = mapped_column(Text)
    answer: Mapped[str] = mapped_column(Text)
    chunk_ids: Mapped[list[Any]] = mapped_column(JSON, default=list)
    model_version_id: Mapped[int | None] = mapped_column(ForeignKey("model_versions.id"), nullable=True)
    latency_ms: Mapped[float] = mapped_column(Float, default=0.0)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    # migration 2: serving
    document: Mapped[str | None] = mapped_column(Text, nullable=True)  # retrieval restricted to it
    ab_pair: Mapped[str | None] = mapped_column(String(40), nullable=True, index=True)  # shared by an A/B pair
    arm: Mapped[str | None] = mapped_column(String(20), nullable=True)  # champion | challenger (A/B)
    client: Mapped[str | None] = mapped_column(String(100), nullable=True)  # which API key asked
    # migration 4: the id clients see (the row id stays internal); filled for old rows by the migration
    public_id: Mapped[str | None] = mapped_column(String(40), nullable=True, unique=True, index=True,
                                                  default=new_public_id)


class Feedback(Base):
    __tablename__ = "feedback"
    id: Mapped[int] = mapped_column(primary_key=True)
    interaction_id: Mapped[int] = mapped_column(ForeignKey("interactions.id"), index=True)
    thumbs: Mapped[int | None] = mapped_column(Integer, nullable=True)  # +1 / -1
    rating: Mapped[int | None] = mapped_column(Integer, nullable=True)  # 1..5
    comment: Mapped[str | None] = mapped_column(Text, nullable=True)
    corrected_answer: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    # migration 2: A/B choices and who gave the feedback
    preferred_interaction_id: Mapped[int | None] = mapped_column(ForeignKey("interactions.id"), nullable=True)
    source: Mapped[str] = mapped_column(String(20), default="human")  # human | ai
    client: Mapped[str | None] = mapped_column(String(100), nullable=True)
    # migration 4: one verdict per client and answer ("answer:<client>:<interaction id>") or A/B pair
    # ("choice:<client>:<ab_pair>"); a later one updates the row. NULL (older rows, AI feedback): no limit.
    verdict_key: Mapped[str | None] = mapped_column(String(300), nullable=True, unique=True, index=True)


class IdempotencyKey(Base):
    """The first response to a `POST /v1/feedback` sent with an `Idempotency-Key` header (migration 4)."""

    __tablename__ = "idempotency_keys"
    __table_args__ = (UniqueConstraint("client", "key"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    client: Mapped[str] = mapped_column(String(100))
    key: Mapped[str] = mapped_column(String(200))
    request_hash: Mapped[str] = mapped_column(String(64))  # the same key with another body is refused
    status: Mapped[int] = mapped_column(Integer)
    response: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class PreferencePair(Base):
    __tablename__ = "preference_pairs"
    id: Mapped[int] = mapped_column(primary_key=True)
    prompt: Mapped[str] = mapped_column(Text)
    chosen: Mapped[str] = mapped_column(Text)
    rejected: Mapped[str] = mapped_column(Text)
    source: Mapped[str] = mapped_column(String(20))  # human | ai | correction
    meta: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class Reward(Base):
    """A scalar reward for one (prompt, completion): a person's rating or the AI judge's rubric score."""

    __tablename__ = "rewards"
    id: Mapped[int] = mapped_column(primary_key=True)
    prompt: Mapped[str] = mapped_column(Text)
    completion: Mapped[str] = mapped_column(Text)
    reward: Mapped[float] = mapped_column(Float)
    source: Mapped[str] = mapped_column(String(20))  # human | ai
    interaction_id: Mapped[int | None] = mapped_column(ForeignKey("interactions.id"), nullable=True)
    meta: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class ModelVersion(Base):
    __tablename__ = "model_versions"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    parent_id: Mapped[int | None] = mapped_column(ForeignKey("model_versions.id"), nullable=True)
    base_model: Mapped[str] = mapped_column(Text)
    adapter_path: Mapped[str | None] = mapped_column(Text, nullable=True)  # None: the base model itself
    method: Mapped[str] = mapped_column(String(20))  # base | sft | dpo | ...
    training_example_ids: Mapped[list[Any]] = mapped_column(JSON, default=list)
    hyperparams: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    status: Mapped[str] = mapped_column(String(20))  # a versions.Status value (champion, candidate, ...)
    cycle_id: Mapped[int | None] = mapped_column(ForeignKey("cycles.id"), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class EvalRun(Base):
    __tablename__ = "eval_runs"
    __table_args__ = (UniqueConstraint("model_version_id", "eval_set_hash"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    model_version_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id"), index=True)
    eval_set_hash: Mapped[str] = mapped_column(String(64))  # which held-out items, in order
    n: Mapped[int] = mapped_column(Integer)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    artifact_path: Mapped[str] = mapped_column(Text)  # per-item predictions
    cycle_id: Mapped[int | None] = mapped_column(ForeignKey("cycles.id"), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class Cycle(Base):
    __tablename__ = "cycles"
    id: Mapped[int] = mapped_column(primary_key=True)
    status: Mapped[str] = mapped_column(String(20), default="running")  # running | done | failed
    trigger: Mapped[str] = mapped_column(String(200), default="manual")
    outcome: Mapped[str | None] = mapped_column(Text, nullable=True)
    started_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)


class CycleStep(Base):
    __tablename__ = "cycle_steps"
    __table_args__ = (UniqueConstraint("cycle_id", "name"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    cycle_id: Mapped[int] = mapped_column(ForeignKey("cycles.id"), index=True)
    name: Mapped[str] = mapped_column(String(50))
    status: Mapped[str] = mapped_column(String(20), default="running")  # running | done | failed
    result: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    started_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)


class Artifact(Base):
    __tablename__ = "artifacts"
    id: Mapped[int] = mapped_column(primary_key=True)
    kind: Mapped[str] = mapped_column(String(30))  # dataset | adapter | eval | report
    path: Mapped[str] = mapped_column(Text, unique=True)
    meta: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class SignalValue(Base):
    """One reading of a monitoring signal (`tuneloop watch` / `tuneloop monitor`)."""

    __tablename__ = "signal_values"
    id: Mapped[int] = mapped_column(primary_key=True)
    signal: Mapped[str] = mapped_column(String(50), index=True)  # satisfaction | query_drift | documents
    value: Mapped[float | None] = mapped_column(Float, nullable=True)
    fired: Mapped[bool] = mapped_column(Boolean, default=False)
    detail: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class ReviewItem(Base):
    """One question in an expert review queue (migration 5; `stages/review.py` builds a queue,
    `review/queue.py` records the verdicts). Every scored candidate of a rebuild is kept with its
    rank and doubts; the first `review.per_cycle` are "open" (shown), the rest "pool"; a rebuild
    marks the open items of earlier queues "expired". A reviewed item becomes an Example."""

    __tablename__ = "review_items"
    __table_args__ = (UniqueConstraint("queue", "item_key"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    public_id: Mapped[str] = mapped_column(String(40), unique=True, index=True, default=new_public_id)
    queue: Mapped[int] = mapped_column(Integer, index=True)  # 1, 2, ...: one per rebuild
    cycle_id: Mapped[int | None] = mapped_column(ForeignKey("cycles.id"), nullable=True)  # the cycle that built it
    item_key: Mapped[str] = mapped_column(String(64), index=True)  # hash of the question key (splits.question_key)
    question: Mapped[str] = mapped_column(Text)
    document: Mapped[str | None] = mapped_column(String(500), nullable=True)
    answer: Mapped[str] = mapped_column(Text)  # the model's answer shown to the reviewer
    chunk_ids: Mapped[list[Any]] = mapped_column(JSON, default=list)  # the passages it used
    source: Mapped[str] = mapped_column(String(20))  # interaction | transfer
    interaction_id: Mapped[int | None] = mapped_column(ForeignKey("interactions.id"), nullable=True)
    question_type: Mapped[str] = mapped_column(String(20))  # yes_no | extraction
    score: Mapped[float] = mapped_column(Float)  # informativeness in [0, 1]
    scores: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)  # each doubt, the version that answered
    rank: Mapped[int] = mapped_column(Integer)  # 1 = asked first (after the diversity rule)
    status: Mapped[str] = mapped_column(String(20), default="open")  # open|pool|expired|confirmed|corrected|skipped
    reviewer: Mapped[str | None] = mapped_column(String(100), nullable=True)
    reviewed_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    final_answer: Mapped[str | None] = mapped_column(Text, nullable=True)
    example_id: Mapped[int | None] = mapped_column(ForeignKey("examples.id"), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


def _m001_initial(conn: Connection) -> None:
    Base.metadata.create_all(conn)


def _add_columns(conn: Connection, table: str, columns: dict[str, str]) -> None:
    """ALTER TABLE ADD COLUMN for each column the table lacks (fresh databases already have them)."""
    from sqlalchemy import inspect, text

    have = {c["name"] for c in inspect(conn).get_columns(table)}
    for name, ddl in columns.items():
        if name not in have:
            conn.execute(text(f"ALTER TABLE {table} ADD COLUMN {name} {ddl}"))


def _m002_serving(conn: Connection) -> None:
    _add_columns(conn, "interactions", {"document": "TEXT", "ab_pair": "VARCHAR(40)", "arm": "VARCHAR(20)",
                                        "client": "VARCHAR(100)"})
    _add_columns(conn, "feedback", {"preferred_interaction_id": "INTEGER REFERENCES interactions(id)",
                                    "source": "VARCHAR(20) NOT NULL DEFAULT 'human'", "client": "VARCHAR(100)"})
    Reward.__table__.create(conn, checkfirst=True)


def _m004_trust(conn: Connection) -> None:
    """Public interaction ids (backfilled), one verdict per client and answer, idempotency keys."""
    _add_columns(conn, "interactions", {"public_id": "VARCHAR(40)"})
    _add_columns(conn, "feedback", {"verdict_key": "VARCHAR(300)"})
    table = Interaction.__table__
    for row_id in list(conn.scalars(select(table.c.id).where(table.c.public_id.is_(None)))):
        conn.execute(update(table).where(table.c.id == row_id).values(public_id=new_public_id()))
    for index in (*table.indexes, *Feedback.__table__.indexes):
        if index.name in ("ix_interactions_public_id", "ix_feedback_verdict_key"):
            index.create(conn, checkfirst=True)
    IdempotencyKey.__table__.create(conn, checkfirst=True)


# Append-only: never edit or reorder an entry that has shipped; add a new one.
MIGRATIONS: list[tuple[int, str, Callable[[Connection], None]]] = [
    (1, "initial schema", _m001_initial),
    (2, "serving: interaction A/B and client columns, feedback choice/source, rewards", _m002_serving),
    (3, "monitoring: signal values", lambda conn: SignalValue.__table__.create(conn, checkfirst=True)),
    (4, "trust: interaction public ids, one verdict per client, idempotency keys", _m004_trust),
    (5, "expert review queue", lambda conn: ReviewItem.__table__.create(conn, checkfirst=True)),
]


def migrate(engine: Engine) -> list[int]:
    """Apply every migration not yet recorded; return the versions applied."""
    Migration.__table__.create(engine, checkfirst=True)
    applied: list[int] = []
    with engine.begin() as conn:
        done = set(conn.scalars(select(Migration.version)))
        for version, name, fn in MIGRATIONS:
            if version in done:
                continue
            fn(conn)
            conn.execute(Migration.__table__.insert().values(version=version, name=name, applied_at=utcnow()))
            applied.append(version)
    return applied


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA journal_mode=WAL")  # readers (the server) do not block the writer (a cycle)
    # A writer waits up to 30 s for another's write lock. pysqlite opens the transaction at the first
    # INSERT/UPDATE/DELETE, not at a SELECT, so this wait applies (no read-to-write upgrade, which
    # SQLite would fail at once); writers keep their transactions short (ingest: rows only).
    cur.execute("PRAGMA busy_timeout=30000")
    cur.close()


SIDE_FILES = ("-wal", "-shm", "-journal")


def _make_private(engine: Engine) -> None:
    """Make a SQLite store file owner-only (0600) whatever the umask: it holds every user's
    questions. The file is created 0600 before SQLite opens it, and SQLite gives its -wal, -shm
    and -journal side files the database file's mode; files an older version made are chmodded."""
    db = engine.url.database
    if engine.dialect.name != "sqlite" or not db or db == ":memory:" or db.startswith("file:"):
        return
    if not os.path.exists(db) and os.path.isdir(os.path.dirname(os.path.abspath(db))):
        os.close(os.open(db, os.O_RDWR | os.O_CREAT, 0o600))  # (no folder: SQLite says so)
    for path in (db, *(db + suffix for suffix in SIDE_FILES)):
        if os.path.isfile(path) and os.stat(path).st_uid == os.getuid():  # another user's file: theirs to set
            os.chmod(path, 0o600)


def open_store(url: str) -> sessionmaker[Session]:
    """Connect, migrate to the latest schema, and return a session factory. A missing database
    driver or a server that cannot be reached is a `ConfigError` naming `store_url`."""
    return sessionmaker(open_engine(url), expire_on_commit=False)


def json_text(value: Any) -> str:
    """JSON columns as standard JSON: a NaN or infinite number (a metric that could not be computed)
    is stored as null. SQLite would keep Python's `NaN`, which PostgreSQL refuses as invalid JSON;
    the same rows must read the same on both."""
    return json.dumps(_finite(value))


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def open_engine(url: str) -> Engine:
    """The store's engine, its schema migrated to the latest (see `open_store`)."""
    try:
        engine = create_engine(url, json_serializer=json_text)
    except ModuleNotFoundError as exc:  # postgresql+psycopg without the extra
        raise ConfigError(f"store_url {_shown(url)} needs the {exc.name} driver: "
                          "pip install 'tuneloop[postgres]'") from None
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
    _make_private(engine)
    try:
        migrate(engine)
    except OperationalError as exc:
        if engine.dialect.name == "sqlite":
            raise
        reason = str(exc.orig).strip().splitlines()[0] if exc.orig else str(exc)
        raise ConfigError(f"store_url {_shown(url)}: cannot use the database ({reason})") from None
    return engine


def _shown(url: str) -> str:
    """The URL with its password masked (it goes into error messages)."""
    return make_url(url).render_as_string(hide_password=True)
