"""The cost service's SQL store: one row per metered usage report.

Same database as the registry by default (``settings.resolved_database_url``:
a SQLite file under the data dir, or PostgreSQL), in tables of its own::

    cost_usage   one row per (agent, report id): the report's fields, the team,
                 project and delegating agents it was charged to (never the
                 report's word: see services.cost.metering), what the report
                 named but was not honoured (``ignored_project``,
                 ``dropped_on_behalf_of``), its cost in nano-dollars, hour and
                 day buckets, whether the fallback price was used, whether
                 a budget applied but no reservation was settled (``unreserved``),
                 and the caller it was made for (``caller``, ``caller_team``:
                 NULL for usage made on behalf of no one)

Exactly once. The primary key is ``(agent, id)``: the report id is the
``Nats-Msg-Id`` the SDK sends, scoped to the agent the subject proves (so one
agent cannot pre-empt another's ids). A batch is inserted with ``ON CONFLICT
DO NOTHING`` in one transaction; a redelivered or duplicated report is a
no-op, so acking only after the commit gives exactly-once totals.

Budgets. The same transaction settles the batch's reports against their
budgets (:mod:`services.cost.budgets`): each row records the id of the
transaction that inserted it (``batch``), so reading back this
transaction's rows gives exactly the reports it added, and a redelivered
report (which conflicts and keeps its first batch id) is never charged twice.

Aggregates are ``GROUP BY`` queries over this raw table, not counters kept
on the side: there is nothing to keep consistent under redelivery, and the
``(time)`` and ``(<key>, time)`` indexes make a report over a time range read
one index range. Every method is synchronous; the service calls them through
:func:`asyncio.to_thread`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, Final

from sqlalchemy import (
    BigInteger,
    Boolean,
    Float,
    Index,
    String,
    Table,
    Text,
    bindparam,
    case,
    false,
    func,
    literal_column,
    or_,
    select,
    text,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, make_url
from sqlmodel import Field, SQLModel

from broker.errors import ConfigError
from broker.runtime.budgets import BudgetLookup
from broker.runtime.sql import add_missing_columns, make_engine
from schemas import CostGroup, CostReport, CostRow, UsageReport
from schemas.cost import DIRECT_CALLER
from services.cost.budget_outcomes import BudgetAlert
from services.cost.budgets import TABLES as BUDGET_TABLES
from services.cost.budgets import BudgetLedger
from services.cost.prices import NANOS_PER_USD, Prices

__all__ = ["UsageRow", "UsageStore"]

_HOUR: Final = 3600
_DAY: Final = 86_400
_Key = String(128).with_variant(String(128, collation="C"), "postgresql")
# Distinct from the registry's advisory lock key.
_SCHEMA_LOCK: Final = 0x5B_C057
#: Bound parameters per statement SQLite accepts everywhere (its default since 3.32).
_SQLITE_MAX_VARIABLES: Final = 32_766


class UsageRow(SQLModel, table=True):
    """One metered usage report."""

    __tablename__ = "cost_usage"
    __table_args__ = (
        Index("ix_cost_usage_time", "time"),
        Index("ix_cost_usage_team_time", "team", "time"),
        Index("ix_cost_usage_agent_time", "agent", "time"),
        Index("ix_cost_usage_project_time", "project", "time"),
        Index("ix_cost_usage_model_time", "model", "time"),
    )

    agent: str = Field(primary_key=True, sa_type=_Key)
    id: str = Field(primary_key=True, sa_type=String(256))
    time: float = Field(sa_type=Float)
    hour: int = Field(sa_type=BigInteger)
    day: int = Field(sa_type=BigInteger)
    team: str = Field(default="", sa_type=_Key)
    project: str = Field(default="", sa_type=_Key)
    model: str = Field(default="", sa_type=_Key)
    provider: str = Field(default="", sa_type=_Key)
    input_tokens: int = Field(default=0, sa_type=BigInteger)
    output_tokens: int = Field(default=0, sa_type=BigInteger)
    cached_tokens: int = Field(default=0, sa_type=BigInteger)
    tool_calls: int = Field(default=0, sa_type=BigInteger)
    latency_ms: float = Field(default=0.0, sa_type=Float)
    cost_nanos: int = Field(default=0, sa_type=BigInteger)
    priced_by_fallback: bool = Field(default=False, sa_type=Boolean)
    trace_id: str = Field(default="", sa_type=String(256))
    on_behalf_of: str = Field(default="", sa_type=Text)
    received_at: float = Field(default=0.0, sa_type=Float)
    # Added after the first release: server defaults let add_missing_columns
    # add them to an existing table.
    reservation_id: str = Field(
        default="", sa_type=String(64), sa_column_kwargs={"server_default": ""}
    )
    batch: str = Field(default="", sa_type=String(32), sa_column_kwargs={"server_default": ""})
    agent_version: str = Field(
        default="", sa_type=String(64), sa_column_kwargs={"server_default": ""}
    )
    #: A budget applied but the report settled no open reservation of its agent.
    unreserved: bool = Field(
        default=False, sa_type=Boolean, sa_column_kwargs={"server_default": false()}
    )
    #: The project the report named, when it is not one bound to the agent (not charged).
    ignored_project: str = Field(default="", sa_type=_Key, sa_column_kwargs={"server_default": ""})
    #: Delegating agents the report named without a chain signed by the policy service.
    dropped_on_behalf_of: str = Field(
        default="", sa_type=Text, sa_column_kwargs={"server_default": ""}
    )
    #: The agent whose call this usage was made while serving: the last delegating agent
    #: of the chain the policy service signed (NULL: none, or metered before this column).
    caller: str | None = Field(default=None, sa_type=_Key, nullable=True)
    #: The team ``caller`` was bound to when the usage was metered ("" unknown; NULL: no caller).
    caller_team: str | None = Field(default=None, sa_type=_Key, nullable=True)


_U: Table = UsageRow.__table__  # type: ignore[attr-defined]
#: Columns added after the first rows were built by hand (tests, benchmarks): their defaults.
_LATER_COLUMNS: Final[dict[str, Any]] = {
    "unreserved": False,
    "ignored_project": "",
    "dropped_on_behalf_of": "",
    "caller": None,
    "caller_team": None,
}
#: Columns settlement reads back of the rows a metering transaction inserted.
_INSERTED: Final = (
    "agent", "id", "time", "team", "project", "on_behalf_of", "cost_nanos", "reservation_id",
)  # fmt: skip


class UsageStore:
    """Metered usage in SQL (SQLite or PostgreSQL).

    Args:
        url: SQLAlchemy URL (``sqlite:///<path>`` or ``postgresql+psycopg://...``).
        prices: Prices used to cost each report as it is recorded.

    Raises:
        ConfigError: the URL names another kind of database.
    """

    def __init__(self, url: str, prices: Prices) -> None:
        backend = make_url(url).get_backend_name()
        if backend not in ("sqlite", "postgresql"):
            raise ConfigError(
                f"unsupported database {backend!r} in the cost service's database URL; use "
                "sqlite:///<path> or postgresql+psycopg://user:password@host/db",
                details={"backend": backend},
            )
        self.prices = prices
        # FULL sync: the meter acks usage after the commit, so the commit must be on disk.
        self._engine = make_engine(url, durable=True)
        self._writer = self._engine.execution_options(sb_write=True)
        self._postgres = self._engine.dialect.name == "postgresql"
        dialect_insert = postgresql.insert if self._postgres else sqlite.insert
        insert = dialect_insert(_U).on_conflict_do_nothing(index_elements=[_U.c.agent, _U.c.id])
        # Compiled once to the driver's SQL: SQLAlchemy's per-batch statement
        # handling would cost more than the insert itself.
        compiled = insert.compile(
            dialect=self._engine.dialect, column_keys=[c.name for c in _U.columns]
        )
        self._insert_sql = compiled.string
        self._multi_sql: dict[int, str] = {}
        self._insert_order = (
            tuple(compiled.positiontup or ()) if self._engine.dialect.positional else None
        )
        #: Budget windows and reservations, in the same database.
        self.ledger = BudgetLedger(self._engine)

    def create_schema(self) -> None:
        """Create the table and indexes if missing (idempotent)."""
        with self._writer.begin() as conn:
            if self._postgres:
                conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _SCHEMA_LOCK})
            SQLModel.metadata.create_all(conn, tables=[_U, *BUDGET_TABLES])
            add_missing_columns(conn, _U)

    def close(self) -> None:
        """Close every pooled connection."""
        self._engine.dispose()

    def row(
        self,
        report: UsageReport,
        *,
        team: str,
        now: float,
        project: str | None = None,
        on_behalf_of: Sequence[str] | None = None,
        ignored_project: str = "",
        dropped_on_behalf_of: Sequence[str] = (),
        caller: str | None = None,
        caller_team: str | None = None,
    ) -> dict[str, Any]:
        """The row recording ``report`` (costed with :attr:`prices`).

        Args:
            report: The usage report.
            team: The team charged (the agent's, from the registry).
            now: Time of metering.
            project: The project charged (default: the report's).
            on_behalf_of: The delegating agents charged (default: the report's).
            ignored_project: The project the report named but is not charged.
            dropped_on_behalf_of: Agents the report named but are not charged.
            caller: The agent whose call the usage was made while serving (verified).
            caller_team: ``caller``'s bound team (with ``caller`` only).
        """
        priced = self.prices.cost(
            report.model, report.input_tokens, report.output_tokens, report.cached_tokens
        )
        return {
            "agent": report.agent,
            "id": report.id,
            "time": report.time,
            "hour": int(report.time // _HOUR) * _HOUR,
            "day": int(report.time // _DAY) * _DAY,
            "team": team,
            "project": report.project if project is None else project,
            "model": report.model,
            "provider": report.provider,
            "input_tokens": report.input_tokens,
            "output_tokens": report.output_tokens,
            "cached_tokens": report.cached_tokens,
            "tool_calls": report.tool_calls,
            "latency_ms": report.latency_ms,
            "cost_nanos": priced.nanos,
            "priced_by_fallback": priced.fallback,
            "trace_id": report.trace_id,
            "on_behalf_of": ",".join(report.on_behalf_of if on_behalf_of is None else on_behalf_of),
            "received_at": now,
            "reservation_id": report.reservation_id,
            "agent_version": report.agent_version,
            "batch": "",
            "unreserved": False,
            "ignored_project": ignored_project,
            "dropped_on_behalf_of": ",".join(dropped_on_behalf_of),
            "caller": caller,
            "caller_team": caller_team if caller is not None else None,
        }

    def record(
        self, rows: Sequence[dict[str, Any]], budgets: BudgetLookup | None = None
    ) -> list[BudgetAlert]:
        """Insert ``rows`` and settle their budgets in one transaction; stored rows are skipped.

        Returns once committed (the caller acks after that), with the budget
        thresholds the batch crossed (to audit, and to trip breakers on).
        Rows a budget applied to but that settled no reservation are stored
        with ``unreserved`` set, and marked so in ``rows`` too (``row["unreserved"]``;
        ``row["reservation_expired"]`` when the reservation they named had
        expired). Rows whose uncovered cost took a budget past its limit carry
        their :class:`~services.cost.budget_outcomes.Overspend` records in
        ``row["overspends"]`` (alert on them, stop the agent).
        """
        if not rows:
            return []
        batch = os.urandom(16).hex()
        for row in rows:
            row["batch"] = batch
            for key, default in _LATER_COLUMNS.items():  # rows built before these existed
                row.setdefault(key, default)
        order = self._insert_order
        params: list[Any] = [tuple(row[k] for k in order) for row in rows] if order else list(rows)
        settle = budgets is not None or any(row["reservation_id"] for row in rows)
        with self._writer.begin() as conn:
            self._insert(conn, params)
            if not settle:
                return []
            inserted = self._inserted_rows(conn, batch, rows)
            settled = self.ledger.settle(conn, inserted, budgets or {})
            if settled.overspends or settled.expired:
                by_row = {(row["agent"], row["id"]): row for row in rows}
                for agent, id_ in settled.expired:
                    by_row[(agent, id_)]["reservation_expired"] = True
                for over in settled.overspends:
                    by_row[(over.agent, over.report_id)].setdefault("overspends", []).append(over)
            if settled.unreserved:
                conn.execute(
                    _U.update()
                    .where(_U.c.agent == bindparam("p_agent"), _U.c.id == bindparam("p_id"))
                    .values(unreserved=True),
                    [{"p_agent": agent, "p_id": id_} for agent, id_ in settled.unreserved],
                )
                unreserved = set(settled.unreserved)
                for row in rows:
                    if (row["agent"], row["id"]) in unreserved:
                        row["unreserved"] = True
            return settled.alerts

    def by_version(self, agent: str, since: float) -> list[CostRow]:
        """``agent``'s spend per version (``key``) since ``since``, in version order."""
        query = (
            select(_U.c.agent_version, *_sums())
            .where(_U.c.agent == agent, _U.c.time >= since)
            .group_by(_U.c.agent_version)
            .order_by(_U.c.agent_version)
        )  # fmt: skip
        with self._engine.connect() as conn:
            return [_cost_row(str(r[0]), r[1:]) for r in conn.execute(query)]

    def _insert(self, conn: Connection, params: list[Any]) -> None:
        """Insert a batch's rows (skipping stored ones) in this transaction.

        SQLite: one multi-row ``INSERT ... VALUES (...), (...)`` per up to
        :data:`_SQLITE_MAX_VARIABLES` parameters instead of ``executemany``,
        which steps the statement once per row and so gives up and retakes
        the GIL once per row: each retake waits for the event loop's thread
        to let go (up to the 5 ms switch interval while it is busy). Measured
        with a busy second thread: ~5,000 µs per row with ``executemany``,
        ~55 µs with multi-row statements (~14 µs either way alone).
        PostgreSQL: psycopg pipelines ``executemany``.
        """
        order = self._insert_order
        if self._postgres or not order:
            conn.exec_driver_sql(self._insert_sql, params)
            return
        per = max(1, _SQLITE_MAX_VARIABLES // len(order))
        for start in range(0, len(params), per):
            chunk = params[start : start + per]
            conn.exec_driver_sql(
                self._values_sql(len(chunk)), tuple(v for row in chunk for v in row)
            )

    def _values_sql(self, rows: int) -> str:
        """The insert statement with ``rows`` value groups (cached per count)."""
        sql = self._multi_sql.get(rows)
        if sql is None:
            single = self._insert_sql
            at = single.index(" VALUES (") + len(" VALUES ")
            end = single.index(")", at) + 1
            sql = single[:at] + ", ".join([single[at:end]] * rows) + single[end:]
            self._multi_sql[rows] = sql
        return sql

    def _inserted_rows(
        self, conn: Connection, batch: str, rows: Sequence[dict[str, Any]]
    ) -> list[dict[str, Any]]:
        """The rows of ``rows`` this transaction (``batch``) inserted, each once.

        A join from the batch's distinct keys finds every row by primary key.
        (``(agent, id) IN (VALUES ...)``, what SQLAlchemy renders for a tuple
        IN, makes SQLite scan the whole table for every settled batch.)
        Driver-level SQL: SQLAlchemy's handling of a 1,000-parameter
        expression per batch cost more than the query.
        """
        keys = list(dict.fromkeys((row["agent"], row["id"]) for row in rows))
        mark = "?" if self._engine.dialect.paramstyle == "qmark" else "%s"
        values = ", ".join([f"({mark}, {mark})"] * len(keys))
        sql = (
            f"WITH k (agent, id) AS (VALUES {values}) "
            f"SELECT {', '.join('u.' + c for c in _INSERTED)} "
            f"FROM k JOIN {_U.name} u ON u.agent = k.agent AND u.id = k.id "
            f"WHERE u.batch = {mark}"
        )
        params = (*(v for key in keys for v in key), batch)
        return [dict(zip(_INSERTED, r, strict=True)) for r in conn.exec_driver_sql(sql, params)]

    def report(self, by: CostGroup, since: float | None, until: float | None) -> CostReport:
        """Totals per ``by`` over ``[since, until)``, most expensive first, and the total.

        ``caller``/``caller_team``: usage made on behalf of no caller is the group
        :data:`~schemas.cost.DIRECT_CALLER`.
        """
        key = _group_key(by)
        sums = _sums()
        conditions = []
        if since is not None:
            conditions.append(_U.c.time >= since)
        if until is not None:
            conditions.append(_U.c.time < until)
        grouped = select(key, *sums).where(*conditions).group_by(key)
        total = select(*sums).where(*conditions)
        with self._engine.connect() as conn:
            rows = [_cost_row(str(r[0]), r[1:]) for r in conn.execute(grouped)]
            total_row = _cost_row("", conn.execute(total).one())
        rows.sort(key=lambda r: (-r.cost_usd, r.key))
        return CostReport(
            by=by,
            since=since,
            until=until,
            rows=tuple(rows),
            total=total_row,
            prices_as_of=self.prices.as_of,
        )


def _group_key(by: CostGroup) -> Any:
    """The column (or expression) a report groups by."""
    # Constants inline, not bound: PostgreSQL matches a SELECT expression to its GROUP BY
    # textually, and two bound parameters ($1, $2) would not match.
    direct = literal_column(f"'{DIRECT_CALLER}'", String)
    if by == "caller":
        return func.coalesce(_U.c.caller, direct)
    if by == "caller_team":
        team = func.coalesce(_U.c.caller_team, literal_column("''", String))
        return case((_U.c.caller.is_(None), direct), else_=team)
    return _U.c[by]


def _sums() -> tuple[Any, ...]:
    """The aggregate columns of a :class:`CostRow`, in :func:`_cost_row`'s order."""
    return (
        func.count(),
        func.coalesce(func.sum(_U.c.input_tokens), 0),
        func.coalesce(func.sum(_U.c.output_tokens), 0),
        func.coalesce(func.sum(_U.c.cached_tokens), 0),
        func.coalesce(func.sum(_U.c.tool_calls), 0),
        func.coalesce(func.sum(_U.c.cost_nanos), 0),
        func.coalesce(func.sum(case((_U.c.priced_by_fallback, 1), else_=0)), 0),
        func.coalesce(func.sum(case((_U.c.unreserved, 1), else_=0)), 0),
        func.coalesce(
            func.sum(
                case((or_(_U.c.ignored_project != "", _U.c.dropped_on_behalf_of != ""), 1), else_=0)
            ),
            0,
        ),
    )


def _cost_row(key: str, sums: Sequence[Any]) -> CostRow:
    reports, inp, out, cached, tools, nanos, fallback, unreserved, dropped = (
        int(v or 0) for v in sums
    )
    return CostRow(
        key=key,
        reports=reports,
        input_tokens=inp,
        output_tokens=out,
        cached_tokens=cached,
        tool_calls=tools,
        cost_usd=nanos / NANOS_PER_USD,
        fallback_priced=fallback,
        unreserved=unreserved,
        attribution_dropped=dropped,
    )
