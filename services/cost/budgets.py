"""Budget ledger: spend and reservations per budget window, changed under a row lock.

Tables (same database as ``cost_usage``)::

    cost_budget_window  one row per (budget key, window start): spent and
                        reserved nano-dollars, whether the soft alert fired
    cost_reservation    one row per reservation: amount, the windows it
                        holds, expiry, state (open, settled, expired)

Atomicity. Every change to a window's counters happens in a transaction
that first locks the window rows it touches, always in key order (so two
transactions never wait on each other in a cycle): ``SELECT ... FOR UPDATE``
on PostgreSQL, and on SQLite the database write lock taken at ``BEGIN
IMMEDIATE``. A reservation reads spent + reserved, checks the limit and adds
its amount while holding those locks, so concurrent reservations on one
budget are serialized: one writer per budget at a time, across every cost
replica, and the limit cannot be overrun however many callers race.

Exactly once. Settlement runs inside the metering transaction that inserts
the usage rows. Rows carry the id of the transaction that inserted them
(``batch``); reading back ``WHERE batch = <this transaction>`` yields exactly
the reports this transaction added (a redelivered report conflicts and keeps
its old batch id), so a report is charged once however often it arrives.

Renewal. A model call in progress keeps its reservation open
(:meth:`BudgetLedger.renew`): each renewal moves its expiry to at most the
TTL from now, never past the reservation's longest life, and only for the
agent that made it while it is open.

Overspend. Usage that no live reservation covers (its reservation expired
first, it named none, or it cost more than was reserved) is charged all the
same: the money was spent and the ledger must say so. When such a charge
leaves a budget's spent plus what others still hold reserved above its
limit, settlement reports it (:class:`~services.cost.budget_outcomes.Overspend`)
so the service can alert and stop the agent: spend never exceeds a hard limit
silently.

Windows are UTC calendar days or months: a new window is a new row, so spend
"resets" without anyone resetting it, and past windows stay for ``show``.
"""

from __future__ import annotations

import calendar
import datetime as dt
import json
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, cast

from sqlalchemy import BigInteger, Boolean, Float, Index, String, Text, select, text
from sqlalchemy.engine import Connection, Engine
from sqlmodel import Field, SQLModel

from broker.runtime.budgets import BudgetLookup, applicable_keys
from broker.runtime.sql import table_of
from schemas import Budget, BudgetCharge, BudgetStatus, BudgetWindow, ReservationState
from services.cost.budget_outcomes import (
    BudgetAlert,
    Grant,
    Overspend,
    OverspendCause,
    Renewal,
    Settlement,
)
from services.cost.prices import NANOS_PER_USD

__all__ = [
    "BudgetLedger",
    "ReservationRow",
    "WindowRow",
    "window_bounds",
]

_Key = String(200).with_variant(String(200, collation="C"), "postgresql")
OPEN: Final = "open"
SETTLED: Final = "settled"
EXPIRED: Final = "expired"


class WindowRow(SQLModel, table=True):
    """Spend and reservations of one budget in one window."""

    __tablename__ = "cost_budget_window"

    key: str = Field(primary_key=True, sa_type=_Key)
    window_start: int = Field(primary_key=True, sa_type=BigInteger)
    spent_nanos: int = Field(default=0, sa_type=BigInteger)
    reserved_nanos: int = Field(default=0, sa_type=BigInteger)
    soft_alerted: bool = Field(default=False, sa_type=Boolean)
    exhausted: bool = Field(default=False, sa_type=Boolean)


class ReservationRow(SQLModel, table=True):
    """One reservation of a model call's worst-case cost."""

    __tablename__ = "cost_reservation"
    __table_args__ = (Index("ix_cost_reservation_state_expires", "state", "expires_at"),)

    id: str = Field(primary_key=True, sa_type=String(64))
    agent: str = Field(sa_type=_Key)
    created_at: float = Field(sa_type=Float)
    expires_at: float = Field(sa_type=Float)
    amount_nanos: int = Field(sa_type=BigInteger)
    #: JSON list of [key, window_start] the amount is reserved on.
    windows: str = Field(sa_type=Text)
    state: str = Field(default=OPEN, sa_type=String(16))
    settled_nanos: int = Field(default=0, sa_type=BigInteger)
    report_id: str = Field(default="", sa_type=String(256))
    trace_id: str = Field(default="", sa_type=String(256))


_W = table_of(WindowRow)
_R = table_of(ReservationRow)
TABLES: Final = (_W, _R)

# The statements of the hot paths (reserve, settle), written once: building
# them with SQLAlchemy's expression language on every call cost ~2 ms of CPU
# per reservation, ten times SQLite's own work (bench/cost.py).
_WINDOW_COLUMNS = '"key", window_start, spent_nanos, reserved_nanos, soft_alerted, exhausted'
_ENSURE_WINDOW = text(
    f"INSERT INTO cost_budget_window ({_WINDOW_COLUMNS}) "
    'VALUES (:key, :start, 0, 0, false, false) ON CONFLICT ("key", window_start) DO NOTHING'
)
_LOCK_WINDOW = (
    f'SELECT {_WINDOW_COLUMNS} FROM cost_budget_window WHERE "key" = :key AND window_start = :start'
)
_LOCK_SQLITE = text(_LOCK_WINDOW)  # the write lock of BEGIN IMMEDIATE covers it
_LOCK_POSTGRES = text(_LOCK_WINDOW + " FOR UPDATE")
_SET_WINDOW = text(
    "UPDATE cost_budget_window SET spent_nanos = :spent, reserved_nanos = :reserved, "
    'soft_alerted = :soft, exhausted = :exhausted WHERE "key" = :key AND window_start = :start'
)
_NEW_RESERVATION = text(
    "INSERT INTO cost_reservation (id, agent, created_at, expires_at, amount_nanos, windows, "
    "state, settled_nanos, report_id, trace_id) VALUES (:id, :agent, :created, :expires, "
    f":amount, :windows, '{OPEN}', 0, '', :trace)"
)
_SETTLE_RESERVATION = text(
    f"UPDATE cost_reservation SET state = '{SETTLED}', settled_nanos = :cost, report_id = :report "
    "WHERE id = :id"
)
# Conditional: a reservation settled, expired or renewed meanwhile is left as it is.
_RENEW_RESERVATION = text(
    "UPDATE cost_reservation SET expires_at = :expires "
    f"WHERE id = :id AND agent = :agent AND state = '{OPEN}' AND expires_at < :expires"
)
# An expired reservation's late report: kept on the reservation, for operators.
_LATE_REPORT = text(
    "UPDATE cost_reservation SET settled_nanos = :cost, report_id = :report "
    f"WHERE id = :id AND state = '{EXPIRED}'"
)
#: A renewal that would move the expiry by less than this share of the TTL writes nothing.
_RENEW_STEP: Final = 0.1


def window_bounds(window: BudgetWindow, at: float) -> tuple[int, int]:
    """Start and end (Unix seconds, UTC) of the ``window`` containing ``at``."""
    when = dt.datetime.fromtimestamp(at, dt.UTC)
    if window == "day":
        start = dt.datetime(when.year, when.month, when.day, tzinfo=dt.UTC)
        return int(start.timestamp()), int(start.timestamp()) + 86_400
    start = dt.datetime(when.year, when.month, 1, tzinfo=dt.UTC)
    days = calendar.monthrange(when.year, when.month)[1]
    return int(start.timestamp()), int(start.timestamp()) + days * 86_400


def _usd(nanos: int) -> float:
    return nanos / NANOS_PER_USD


def _state(value: Any) -> ReservationState:
    """A stored reservation state (only the ledger writes it: one of the three)."""
    return cast(ReservationState, str(value))


def _charge(budget: Budget, start: int, spent: int, reserved: int) -> BudgetCharge:
    """Where ``budget`` stands in its window starting at ``start``."""
    return BudgetCharge(
        key=budget.key, limit_usd=budget.limit_usd, spent_usd=_usd(spent),
        reserved_usd=_usd(reserved), window_start=start,
        window_end=window_bounds(budget.window, start)[1],
    )  # fmt: skip


@dataclass(frozen=True, slots=True)
class _Charge:
    """What settling one usage row does: adds its cost to ``windows``, releases
    ``released`` (its reservation's amount) there, of which ``uncovered`` nanos no
    live reservation held."""

    row: Mapping[str, Any]
    windows: list[tuple[str, int]]
    released: int
    uncovered: int
    cause: OverspendCause


class BudgetLedger:
    """Reservations and spend per budget window (SQL, row-locked).

    Args:
        engine: The cost store's engine (shared, so settlement can join the
            metering transaction).
    """

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._writer = engine.execution_options(sb_write=True)
        self._postgres = engine.dialect.name == "postgresql"

    # -- locking ---------------------------------------------------------------

    def _lock(
        self, conn: Connection, windows: Sequence[tuple[str, int]]
    ) -> dict[tuple[str, int], Any]:
        """Create missing window rows, lock them in key order, return them by (key, start)."""
        wanted = sorted(set(windows))
        if not wanted:
            return {}
        conn.execute(_ENSURE_WINDOW, [{"key": k, "start": w} for k, w in wanted])
        lock = _LOCK_POSTGRES if self._postgres else _LOCK_SQLITE
        return {(k, w): conn.execute(lock, {"key": k, "start": w}).one() for k, w in wanted}

    @staticmethod
    def _set(conn: Connection, key: str, start: int, row: Any, **changes: Any) -> None:
        """Write a locked window row back with ``changes`` (absolute values: the lock is held)."""
        values = {
            "spent": row.spent_nanos, "reserved": row.reserved_nanos,
            "soft": bool(row.soft_alerted), "exhausted": bool(row.exhausted),
        }  # fmt: skip
        values.update(changes)
        conn.execute(_SET_WINDOW, {**values, "key": key, "start": start})

    # -- reserve ---------------------------------------------------------------

    def reserve(
        self,
        budgets: Sequence[Budget],
        *,
        reservation_id: str,
        agent: str,
        amount_nanos: int,
        now: float,
        expires_at: float,
        trace_id: str = "",
    ) -> Grant:
        """Reserve ``amount_nanos`` on every budget in ``budgets``, or on none.

        Refused (nothing written) if any budget's spent + reserved + amount
        would exceed its limit; the first such budget is named.
        """
        bounds = {b.key: window_bounds(b.window, now) for b in budgets}
        with self._writer.begin() as conn:
            rows = self._lock(conn, [(b.key, bounds[b.key][0]) for b in budgets])
            grant = Grant(granted=True)
            for budget in budgets:
                start, end = bounds[budget.key]
                row = rows[(budget.key, start)]
                limit = round(budget.limit_usd * NANOS_PER_USD)
                if row.spent_nanos + row.reserved_nanos + amount_nanos > limit:
                    grant.granted = False
                    grant.exhausted = row.spent_nanos >= limit
                    grant.refused = BudgetCharge(
                        key=budget.key, limit_usd=budget.limit_usd,
                        spent_usd=_usd(row.spent_nanos), reserved_usd=_usd(row.reserved_nanos),
                        window_start=start, window_end=end,
                    )  # fmt: skip
                    if grant.exhausted and not row.exhausted:
                        self._set(conn, budget.key, start, row, exhausted=True)
                        grant.alerts.append(BudgetAlert(budget, grant.refused, hard=True))
                    break
            if not grant.granted:
                return grant  # the exhausted flag (if any) commits; no amount does
            for budget in budgets:
                start, end = bounds[budget.key]
                row = rows[(budget.key, start)]
                reserved = row.reserved_nanos + amount_nanos
                limit = round(budget.limit_usd * NANOS_PER_USD)
                soft = (row.spent_nanos + reserved) >= budget.soft_ratio * limit
                self._set(
                    conn, budget.key, start, row,
                    reserved=reserved, soft=bool(row.soft_alerted) or soft,
                )  # fmt: skip
                charge = BudgetCharge(
                    key=budget.key, limit_usd=budget.limit_usd,
                    spent_usd=_usd(row.spent_nanos), reserved_usd=_usd(reserved),
                    window_start=start, window_end=end,
                )  # fmt: skip
                grant.charges.append(charge)
                if soft and not row.soft_alerted:
                    grant.alerts.append(BudgetAlert(budget, charge, hard=False))
            conn.execute(
                _NEW_RESERVATION,
                {
                    "id": reservation_id, "agent": agent, "created": now, "expires": expires_at,
                    "amount": amount_nanos, "trace": trace_id,
                    "windows": json.dumps([[b.key, bounds[b.key][0]] for b in budgets]),
                },
            )  # fmt: skip
        return grant

    # -- settle ----------------------------------------------------------------

    def settle(
        self,
        conn: Connection,
        usage: Sequence[Mapping[str, Any]],
        budgets: BudgetLookup,
    ) -> Settlement:
        """Charge newly inserted usage rows to their budgets, inside the metering transaction.

        ``usage`` rows (``agent``, ``id``, ``time``, ``team``, ``project``,
        ``on_behalf_of``, ``cost_nanos``, ``reservation_id``) must be exactly
        the rows this transaction inserted. A row whose reservation is open
        (and belongs to its agent) replaces the reserved amount with its cost
        on the reserved windows; any other row adds its cost to the windows
        of the budgets that apply to it now, and is reported ``unreserved``
        when there are any (and ``expired`` when the reservation it names, its
        agent's, had expired).

        Rows are charged in report-time order. A row's cost that no live
        reservation held (all of it, or what it cost beyond its reservation)
        is an :class:`~services.cost.budget_outcomes.Overspend` on every budget
        whose spent plus reserved amounts it leaves above the limit.
        """
        ids = sorted({r["reservation_id"] for r in usage if r.get("reservation_id")})
        known: dict[str, Any] = {}
        if ids:
            query = (
                select(_R)
                .where(_R.c.id.in_(ids), _R.c.state.in_((OPEN, EXPIRED)))
                .order_by(_R.c.id)
            )
            if self._postgres:
                query = query.with_for_update()
            known = {r.id: r for r in conn.execute(query)}
        plans: list[_Charge] = []
        settled: list[tuple[str, int, str]] = []
        late: list[tuple[str, int, str]] = []
        out = Settlement()
        for row in sorted(usage, key=lambda r: (r["time"], r["agent"], r["id"])):
            cost = int(row["cost_nanos"])
            reservation = known.get(row.get("reservation_id") or "")
            if reservation is not None and reservation.agent != row["agent"]:
                reservation = None  # another agent's: not this report's to settle
            if reservation is not None and reservation.state == OPEN:
                del known[reservation.id]  # a reservation settles one report
                windows = [(key, int(start)) for key, start in json.loads(reservation.windows)]
                uncovered = max(0, cost - reservation.amount_nanos)
                plans.append(
                    _Charge(row, windows, reservation.amount_nanos, uncovered, "over_reservation")
                )
                settled.append((reservation.id, cost, row["id"]))
                continue
            expired = reservation is not None and reservation.state == EXPIRED
            if reservation is not None and expired:
                del known[reservation.id]
                late.append((reservation.id, cost, row["id"]))
            applicable = applicable_keys(
                budgets,
                agent=row["agent"],
                team=row["team"],
                project=row["project"],
                on_behalf_of=[p for p in str(row["on_behalf_of"]).split(",") if p],
            )
            if applicable:
                out.unreserved.append((row["agent"], row["id"]))
                if expired:
                    out.expired.append((row["agent"], row["id"]))
            windows = [(b.key, window_bounds(b.window, row["time"])[0]) for b in applicable]
            cause: OverspendCause = "expired_reservation" if expired else "unreserved"
            plans.append(_Charge(row, windows, 0, cost, cause))
        if late:
            conn.execute(
                _LATE_REPORT,
                [{"id": rid, "cost": cost, "report": report} for rid, cost, report in late],
            )
        touched = sorted({w for plan in plans for w in plan.windows})
        if not touched:
            return out
        rows = self._lock(conn, touched)
        spent = {w: int(rows[w].spent_nanos) for w in touched}
        reserved = {w: int(rows[w].reserved_nanos) for w in touched}
        for plan in plans:
            cost = int(plan.row["cost_nanos"])
            for w in plan.windows:
                reserved[w] = max(0, reserved[w] - plan.released)
                spent[w] += cost
            if plan.uncovered <= 0:
                continue
            for w in plan.windows:
                defined = budgets.get(w[0])
                if defined is None:
                    continue
                if spent[w] + reserved[w] > round(defined.limit_usd * NANOS_PER_USD):
                    out.overspends.append(
                        Overspend(
                            budget=defined, charge=_charge(defined, w[1], spent[w], reserved[w]),
                            agent=plan.row["agent"], report_id=plan.row["id"],
                            reservation_id=plan.row.get("reservation_id") or "",
                            cause=plan.cause, cost_nanos=cost, uncovered_nanos=plan.uncovered,
                        )
                    )  # fmt: skip
        for key, start in touched:
            win = rows[(key, start)]
            new_spent, new_reserved = spent[(key, start)], reserved[(key, start)]
            defined = budgets.get(key)
            soft = win.soft_alerted
            exhausted = win.exhausted
            if defined is not None:
                limit = round(defined.limit_usd * NANOS_PER_USD)
                charge = _charge(defined, start, new_spent, new_reserved)
                if not soft and new_spent + new_reserved >= defined.soft_ratio * limit:
                    soft = True
                    out.alerts.append(BudgetAlert(defined, charge, hard=False))
                if not exhausted and new_spent >= limit:
                    exhausted = True
                    out.alerts.append(BudgetAlert(defined, charge, hard=True))
            self._set(
                conn, key, start, win, spent=new_spent, reserved=new_reserved,
                soft=bool(soft), exhausted=bool(exhausted),
            )  # fmt: skip
        if settled:
            conn.execute(
                _SETTLE_RESERVATION,
                [{"id": rid, "cost": cost, "report": report} for rid, cost, report in settled],
            )
        return out

    # -- renew -----------------------------------------------------------------

    def renew(
        self,
        reservation_id: str,
        *,
        agent: str,
        now: float,
        ttl: float,
        max_lifetime: float,
    ) -> Renewal | None:
        """Keep ``agent``'s open reservation alive: its expiry moves to ``now + ttl``, never
        earlier than it is and never past ``max_lifetime`` after the reservation was made.

        An open reservation past its expiry that the expiry loop has not
        released yet still holds its amount, so it is renewed too. A renewal
        that would move the expiry by less than a tenth of ``ttl`` (asked long
        before it is due) writes nothing.

        Returns:
            None if ``agent`` has no reservation ``reservation_id`` (another
            agent's is never touched, nor said to exist); else the outcome.
        """
        with self._engine.connect() as conn:
            found = conn.execute(select(_R).where(_R.c.id == reservation_id)).first()
        if found is None or found.agent != agent:
            return None
        cap = float(found.created_at) + max_lifetime
        target = min(now + ttl, cap)
        if found.state != OPEN:
            return Renewal(state=_state(found.state), expires_at=float(found.expires_at))
        gain = target - float(found.expires_at)
        if gain <= 0 or (gain < ttl * _RENEW_STEP and target < cap):
            return Renewal(
                state=OPEN, expires_at=float(found.expires_at),
                capped=float(found.expires_at) >= cap,
            )  # fmt: skip
        with self._writer.begin() as conn:
            moved = conn.execute(
                _RENEW_RESERVATION, {"id": reservation_id, "agent": agent, "expires": target}
            ).rowcount
            if not moved:  # settled, expired or renewed since it was read: say how it is now
                now_row = conn.execute(select(_R).where(_R.c.id == reservation_id)).one()
                return Renewal(
                    state=_state(now_row.state), expires_at=float(now_row.expires_at),
                    capped=float(now_row.expires_at) >= cap,
                )  # fmt: skip
        return Renewal(state=OPEN, expires_at=target, renewed=True, capped=target >= cap)

    # -- expire ----------------------------------------------------------------

    def expire(self, now: float, limit: int = 1000) -> int:
        """Release open reservations past their expiry; returns how many."""
        with self._writer.begin() as conn:
            query = (
                select(_R)
                .where(_R.c.state == OPEN, _R.c.expires_at < now)
                .order_by(_R.c.id)
                .limit(limit)
            )
            if self._postgres:
                query = query.with_for_update(skip_locked=True)
            expired = list(conn.execute(query))
            if not expired:
                return 0
            released: dict[tuple[str, int], int] = defaultdict(int)
            for reservation in expired:
                for key, start in json.loads(reservation.windows):
                    released[(key, int(start))] += reservation.amount_nanos
            rows = self._lock(conn, list(released))
            for (key, start), amount in sorted(released.items()):
                row = rows[(key, start)]
                self._set(conn, key, start, row, reserved=max(0, row.reserved_nanos - amount))
            conn.execute(
                _R.update()
                .where(_R.c.id.in_([r.id for r in expired]), _R.c.state == OPEN)
                .values(state=EXPIRED)
            )
        return len(expired)

    # -- read ------------------------------------------------------------------

    def status(self, budget: Budget, now: float, windows: int = 1) -> list[BudgetStatus]:
        """``budget`` in its current window and up to ``windows - 1`` earlier ones, newest first."""
        start, _ = window_bounds(budget.window, now)
        with self._engine.connect() as conn:
            rows = {
                r.window_start: r
                for r in conn.execute(
                    select(_W)
                    .where(_W.c.key == budget.key, _W.c.window_start <= start)
                    .order_by(_W.c.window_start.desc())
                    .limit(windows)
                )
            }
            open_count = self._open_in(conn, budget.key, start, now)
        starts = sorted(set(rows) | {start}, reverse=True)[:windows]
        limit = round(budget.limit_usd * NANOS_PER_USD)
        out = []
        for s in starts:
            row = rows.get(s)
            spent = row.spent_nanos if row is not None else 0
            reserved = row.reserved_nanos if row is not None else 0
            out.append(
                BudgetStatus(
                    budget=budget, spent_usd=_usd(spent), reserved_usd=_usd(reserved),
                    remaining_usd=_usd(max(0, limit - spent - reserved)),
                    window_start=s, window_end=window_bounds(budget.window, s)[1],
                    soft_alerted=bool(row.soft_alerted) if row is not None else False,
                    open_reservations=open_count if s == start else 0,
                )
            )  # fmt: skip
        return out

    def _open_in(self, conn: Connection, key: str, start: int, now: float) -> int:
        needle = json.dumps([key, start])
        return sum(
            1
            for (windows,) in conn.execute(
                select(_R.c.windows).where(_R.c.state == OPEN, _R.c.expires_at >= now)
            )
            if needle in windows
        )

    def reservation(self, reservation_id: str) -> dict[str, Any] | None:
        """One reservation as a dict (tests, operators), or None."""
        with self._engine.connect() as conn:
            row = conn.execute(select(_R).where(_R.c.id == reservation_id)).first()
        return dict(row._mapping) if row is not None else None
