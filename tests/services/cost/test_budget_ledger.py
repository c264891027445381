"""Budget ledger on SQLite and PostgreSQL: reservations never overrun, settle once, expire."""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from schemas import Budget
from services.cost.budgets import BudgetLedger, window_bounds
from services.cost.prices import NANOS_PER_USD, load_prices
from services.cost.store import UsageStore

# 2026-03-14 12:00 UTC
NOON = dt.datetime(2026, 3, 14, 12, tzinfo=dt.UTC).timestamp()
CENT = NANOS_PER_USD // 100


@pytest.fixture
def store(database_url: str) -> Iterator[UsageStore]:
    s = UsageStore(database_url, load_prices(None))
    s.create_schema()
    yield s
    s.close()


def _budget(scope: str = "agent", name: str = "fraud", window: str = "day", **kw: Any) -> Budget:
    return Budget(scope=scope, name=name, window=window, limit_usd=kw.pop("limit", 1.0), **kw)  # type: ignore[arg-type]


def _reserve(
    ledger: BudgetLedger, budgets: list[Budget], rid: str, cents: int, now: float = NOON
) -> Any:
    return ledger.reserve(
        budgets, reservation_id=rid, agent="fraud", amount_nanos=cents * CENT,
        now=now, expires_at=now + 60,
    )  # fmt: skip


def _usage(rid: str, cents: int, *, agent: str = "fraud", report: str = "", t: float = NOON,
           team: str = "risk", project: str = "", obo: str = "") -> dict[str, Any]:  # fmt: skip
    return {
        "agent": agent, "id": report or f"r-{rid}", "time": t, "hour": 0, "day": 0,
        "team": team, "project": project, "model": "gpt-4o", "provider": "", "input_tokens": 1,
        "output_tokens": 1, "cached_tokens": 0, "tool_calls": 0, "latency_ms": 0.0,
        "cost_nanos": cents * CENT, "priced_by_fallback": False, "trace_id": "",
        "on_behalf_of": obo, "received_at": t, "reservation_id": rid, "batch": "",
        "agent_version": "",
    }  # fmt: skip


def _state(store: UsageStore, rid: str) -> str:
    row = store.ledger.reservation(rid)
    assert row is not None
    return str(row["state"])


def test_windows_are_utc_calendar_days_and_months() -> None:
    assert window_bounds("day", NOON) == (
        int(dt.datetime(2026, 3, 14, tzinfo=dt.UTC).timestamp()),
        int(dt.datetime(2026, 3, 15, tzinfo=dt.UTC).timestamp()),
    )
    start, end = window_bounds("month", NOON)
    assert (end - start) == 31 * 86_400
    assert (
        window_bounds("month", dt.datetime(2028, 2, 10, tzinfo=dt.UTC).timestamp())[1]
        - (window_bounds("month", dt.datetime(2028, 2, 10, tzinfo=dt.UTC).timestamp())[0])
        == 29 * 86_400
    )


def test_reserve_up_to_the_limit_then_refuse_naming_the_budget(store: UsageStore) -> None:
    ledger = store.ledger
    budget = _budget(limit=1.0)
    for i in range(4):
        assert _reserve(ledger, [budget], f"r{i}", 25).granted
    refused = _reserve(ledger, [budget], "r5", 1)
    assert not refused.granted
    assert refused.refused.key == "agent.fraud.day"
    assert refused.refused.limit_usd == 1.0
    assert refused.refused.reserved_usd == pytest.approx(1.0)
    assert refused.refused.spent_usd == 0
    assert not refused.exhausted  # reserved, not spent: it may come back
    assert ledger.reservation("r5") is None  # nothing held for a refusal


def test_settlement_replaces_the_reservation_with_the_actual_cost_once(store: UsageStore) -> None:
    budget = _budget(limit=1.0)
    budgets = {budget.key: budget}
    assert _reserve(store.ledger, [budget], "a", 50).granted
    row = _usage("a", 10)
    store.record([dict(row)], budgets)
    store.record([dict(row)], budgets)  # redelivered: no second charge
    [status] = store.ledger.status(budget, NOON)
    assert status.spent_usd == pytest.approx(0.10)
    assert status.reserved_usd == 0
    assert _state(store, "a") == "settled"
    # Room again for 90 cents, not for 91.
    assert _reserve(store.ledger, [budget], "b", 90).granted
    assert not _reserve(store.ledger, [budget], "c", 1).granted


def test_usage_without_a_reservation_counts_against_the_budget(store: UsageStore) -> None:
    budget = _budget(scope="team", name="risk", limit=0.30)
    budgets = {budget.key: budget}
    store.record([_usage("", 20, report="x1"), _usage("", 20, report="x2")], budgets)
    [status] = store.ledger.status(budget, NOON)
    assert status.spent_usd == pytest.approx(0.40)
    refused = store.ledger.reserve(
        [budget], reservation_id="z", agent="fraud", amount_nanos=1, now=NOON, expires_at=NOON + 1
    )
    assert not refused.granted and refused.exhausted
    assert [a.hard for a in refused.alerts] == []  # the settlement already flagged it


def test_thresholds_alert_once_per_window(store: UsageStore) -> None:
    budget = _budget(limit=1.0, soft_ratio=0.5)
    budgets = {budget.key: budget}
    first = store.record([_usage("", 60, report="u1")], budgets)
    assert [(a.budget.key, a.hard) for a in first] == [("agent.fraud.day", False)]
    assert store.record([_usage("", 10, report="u2")], budgets) == []
    hard = store.record([_usage("", 40, report="u3")], budgets)
    assert [a.hard for a in hard] == [True]
    assert store.record([_usage("", 40, report="u4")], budgets) == []
    # The next day is a new window: nothing spent, alerts again possible.
    tomorrow = NOON + 86_400
    assert _reserve(store.ledger, [budget], "t", 90, now=tomorrow).granted


def test_unsettled_reservations_expire(store: UsageStore) -> None:
    budget = _budget(limit=1.0)
    assert _reserve(store.ledger, [budget], "gone", 100).granted
    assert not _reserve(store.ledger, [budget], "blocked", 1).granted
    assert store.ledger.expire(NOON + 30) == 0
    assert store.ledger.expire(NOON + 61) == 1
    assert _state(store, "gone") == "expired"
    assert _reserve(store.ledger, [budget], "after", 100).granted
    # A late report for the expired reservation still counts, as plain usage.
    store.record([_usage("gone", 30)], {budget.key: budget})
    [status] = store.ledger.status(budget, NOON)
    assert status.spent_usd == pytest.approx(0.30)
    assert status.reserved_usd == pytest.approx(1.0)


def test_a_reservation_cannot_be_settled_by_another_agent(store: UsageStore) -> None:
    budget = _budget(limit=1.0)
    assert _reserve(store.ledger, [budget], "mine", 80).granted
    store.record([_usage("mine", 5, agent="intruder", team="x")], {budget.key: budget})
    assert _state(store, "mine") == "open"


def test_parent_budgets_are_charged_too(store: UsageStore) -> None:
    parent = _budget(name="orchestrator", limit=0.5)
    child = _budget(name="fraud", limit=5.0)
    budgets = {parent.key: parent, child.key: child}
    store.record([_usage("", 30, obo="orchestrator", report="p1")], budgets)
    [p] = store.ledger.status(parent, NOON)
    [c] = store.ledger.status(child, NOON)
    assert p.spent_usd == pytest.approx(0.30) and c.spent_usd == pytest.approx(0.30)


def test_concurrent_reservations_never_overrun_the_limit(store: UsageStore) -> None:
    """64 threads race for one budget with room for exactly 20 reservations."""
    budget = _budget(limit=2.0)
    granted: list[bool] = []
    lock = threading.Lock()
    start = threading.Barrier(64)

    def worker(i: int) -> None:
        start.wait()
        ok = _reserve(store.ledger, [budget], f"c{i}", 10).granted
        with lock:
            granted.append(ok)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(64)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert granted.count(True) == 20
    [status] = store.ledger.status(budget, NOON)
    assert status.reserved_usd == pytest.approx(2.0)
    assert status.open_reservations == 20


def test_a_store_created_by_an_earlier_release_gains_the_new_columns(database_url: str) -> None:
    """``cost_usage`` without ``reservation_id`` and ``batch`` (the first release's shape)."""
    from sqlalchemy import inspect, text

    from broker.runtime.sql import make_engine
    from services.cost.store import UsageRow

    table = UsageRow.__table__  # type: ignore[attr-defined]
    old = [c for c in table.columns if c.name not in ("reservation_id", "batch")]
    engine = make_engine(database_url)
    columns = ", ".join(f"{c.name} {c.type.compile(engine.dialect)}" for c in old)
    with engine.begin() as conn:
        conn.execute(text(f"CREATE TABLE cost_usage ({columns}, PRIMARY KEY (agent, id))"))
    engine.dispose()
    s = UsageStore(database_url, load_prices(None))
    try:
        s.create_schema()
        s.create_schema()  # idempotent
        names = {c["name"] for c in inspect(s._engine).get_columns("cost_usage")}
        assert {"reservation_id", "batch"} <= names
        budget = _budget(limit=1.0)
        assert _reserve(s.ledger, [budget], "m", 50).granted
        s.record([_usage("m", 5)], {budget.key: budget})
        assert _state(s, "m") == "settled"
    finally:
        s.close()


def test_the_cost_store_fsyncs_every_commit_on_sqlite(tmp_path: Path) -> None:
    """The meter acks usage after the commit: the commit must be durable (synchronous=FULL)."""
    s = UsageStore(f"sqlite:///{tmp_path / 'cost.db'}", load_prices(None))
    try:
        with s._engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL
    finally:
        s.close()
