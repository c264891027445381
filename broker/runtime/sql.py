"""SQL plumbing shared by the stores (registry, credentials, cost): one way to open a database.

``SIGNALBOX_DATABASE_URL`` (or SQLite at ``<data_dir>/signalbox.db``) goes
through :func:`make_engine`; SQLModel table classes give their
:class:`~sqlalchemy.Table` through :func:`table_of`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import Table, event, inspect
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.pool import StaticPool
from sqlalchemy.schema import CreateColumn
from sqlmodel import SQLModel, create_engine

__all__ = ["add_missing_columns", "make_engine", "table_of"]


def table_of(model: type[SQLModel]) -> Table:
    """The SQLAlchemy table of a SQLModel ``table=True`` class."""
    table = model.__table__  # type: ignore[attr-defined]
    assert isinstance(table, Table)
    return table


def add_missing_columns(conn: Connection, table: Table) -> list[str]:
    """Add ``table``'s columns that an existing table lacks (additive migration).

    ``create_all`` creates missing tables but never alters existing ones, so
    a store created by an earlier release would lack columns added since.
    New columns are always nullable or defaulted (our rule for schema
    changes), which both SQLite and PostgreSQL can add in place. Returns the
    names of the columns added. Call it inside the schema transaction.
    """
    existing = {c["name"] for c in inspect(conn).get_columns(table.name)}
    added = []
    for column in table.columns:
        if column.name in existing:
            continue
        ddl = CreateColumn(column).compile(dialect=conn.dialect)
        conn.exec_driver_sql(f"ALTER TABLE {table.name} ADD COLUMN {ddl}")
        added.append(column.name)
    return added


def make_engine(url: str, *, durable: bool = False) -> Engine:
    """A SQLAlchemy engine for the stores: SQLite (WAL, immediate write locks) or PostgreSQL.

    SQLite files get WAL, ``synchronous=NORMAL`` (``FULL`` when ``durable``:
    every commit is fsynced, for stores whose callers act on a commit, e.g.
    the cost meter acking usage) and a busy timeout; a connection opened
    with the execution option ``sb_write=True`` begins ``IMMEDIATE`` (takes
    the write lock up front). PostgreSQL gets a pre-pinged, recycled pool
    (its commits are durable by default).
    """
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        # Pre-ping: a pooled connection may have been closed by the server or
        # a proxy; recycle before typical idle timeouts.
        return create_engine(
            parsed,
            pool_size=5,
            max_overflow=10,
            pool_timeout=30,
            pool_pre_ping=True,
            pool_recycle=1800,
        )
    database = parsed.database or ""
    in_memory = database in ("", ":memory:") or database.startswith("file::memory:")
    if in_memory:
        # One shared connection, or every pooled connection would be a new,
        # empty database; fine for tests, not for concurrent use.
        engine = create_engine(
            parsed, connect_args={"check_same_thread": False}, poolclass=StaticPool
        )
    else:
        if not database.startswith("file:"):
            Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        # Threads from asyncio.to_thread share the pool; writers queue on
        # SQLite's lock for up to `timeout` seconds instead of failing.
        engine = create_engine(
            parsed,
            connect_args={"check_same_thread": False, "timeout": 30},
            pool_size=8,
            max_overflow=8,
            pool_timeout=30,
        )

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # pysqlite's own transaction handling issues BEGIN lazily before the
        # first write, so a read-check-then-write would not be atomic; take
        # control of BEGIN (see _on_begin).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            if not in_memory:
                # Readers never block the writer and vice versa.
                cursor.execute("PRAGMA journal_mode=WAL")
                # In WAL mode NORMAL cannot corrupt the database; a power cut
                # may lose the last commits, which agents repeat (they
                # re-register when a heartbeat is refused), and it keeps a
                # heartbeat write from costing an fsync. A durable store
                # (acked usage, budget reservations) fsyncs every commit.
                cursor.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
                # Reads through the OS page cache, shared by the pooled
                # connections, instead of each one's small private cache.
                cursor.execute("PRAGMA mmap_size=268435456")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA busy_timeout=30000")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        # Writes take the database lock up front (IMMEDIATE): their reads
        # (ownership check, existing row) then see the state they write over,
        # and a busy database makes them wait instead of failing mid-way.
        mode = "IMMEDIATE" if conn.get_execution_options().get("sb_write") else "DEFERRED"
        conn.exec_driver_sql(f"BEGIN {mode}")

    return engine
