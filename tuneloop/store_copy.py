"""`tuneloop migrate --to URL`: copy a project's store (SQLite, usually) into an empty database
(PostgreSQL, usually), row for row, and check the copy.

Written here, not taken from a tool: the copy must go through the store's own migrations on the
target (so both schemas are tuneloop's, not a converter's guess), keep every id (other rows and
the artifacts' meta.json refer to them), move PostgreSQL's id sequences past the copied ids, and
compare every row afterwards. One transaction on the target: a failure leaves it as it was.
"""
from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import Table, func, select, text
from sqlalchemy.engine import Connection, Engine

from tuneloop.errors import ConfigError
from tuneloop.store import Base, Migration, open_engine

CHUNK = 1000  # rows per INSERT


@dataclass
class Copied:
    tables: dict[str, int]  # table -> rows copied (and checked)

    @property
    def rows(self) -> int:
        return sum(self.tables.values())


def copy_store(source_url: str, target_url: str) -> Copied:
    """Copy every row of the store at `source_url` into the empty store at `target_url` (created and
    migrated if needed), keeping ids; then check the target row for row. `ConfigError` when the
    target already holds rows or is the source."""
    if source_url == target_url:
        raise ConfigError("tuneloop migrate: the target is the project's own store")
    source, target = open_engine(source_url), open_engine(target_url)
    tables = [t for t in Base.metadata.sorted_tables if t.name != Migration.__tablename__]  # parents first
    with source.connect() as src, target.begin() as dst:
        full = [t.name for t in tables if dst.scalar(select(func.count()).select_from(t))]
        if full:
            raise ConfigError(f"tuneloop migrate: the target database already holds rows ({', '.join(full)}); "
                              "give an empty database")
        counts = {t.name: _copy_table(src, dst, t) for t in tables}
        if target.dialect.name == "postgresql":
            _move_sequences(dst, tables)
    _check(source, target, tables)
    return Copied(counts)


def _ordered(table: Table):
    return select(table).order_by(*table.primary_key.columns)


def _copy_table(src: Connection, dst: Connection, table: Table) -> int:
    n, batch = 0, []
    for row in src.execute(_ordered(table)).mappings():  # id order: a version's parent comes before it
        batch.append(dict(row))
        if len(batch) == CHUNK:
            dst.execute(table.insert(), batch)
            n, batch = n + len(batch), []
    if batch:
        dst.execute(table.insert(), batch)
        n += len(batch)
    return n


def _move_sequences(dst: Connection, tables: list[Table]) -> None:
    """The next id PostgreSQL hands out comes after the copied ones (rows were inserted with their ids)."""
    for table in tables:
        if "id" in table.c and table.c.id.primary_key:
            dst.execute(text(f"SELECT setval(pg_get_serial_sequence('{table.name}', 'id'), "
                             f"COALESCE((SELECT MAX(id) FROM {table.name}), 0) + 1, false)"))


def _check(source: Engine, target: Engine, tables: list[Table]) -> None:
    """Every row of every table is in the target, equal, in the same order."""
    with source.connect() as src, target.connect() as dst:
        for table in tables:
            a = src.execute(_ordered(table)).all()
            b = dst.execute(_ordered(table)).all()
            if a != b:
                raise ConfigError(f"tuneloop migrate: table {table.name} differs after the copy "
                                  f"({len(a)} rows in the source, {len(b)} in the target)")
