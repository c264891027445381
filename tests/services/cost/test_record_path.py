"""UsageStore.record: a batch settles exactly the reports it inserted, each once."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from schemas import Budget, UsageReport
from services.cost.prices import NANOS_PER_USD, load_prices
from services.cost.store import UsageStore


@pytest.fixture
def store(database_url: str) -> Iterator[UsageStore]:
    s = UsageStore(database_url, load_prices(None))
    s.create_schema()
    yield s
    s.close()


def _rows(store: UsageStore, ids: list[str], *, agent: str = "fraud") -> list[dict[str, Any]]:
    now = time.time()
    return [
        store.row(
            UsageReport(id=i, agent=agent, time=now, model="gpt-4o", input_tokens=1_000_000),
            team="risk",
            now=now,
        )
        for i in ids
    ]


def test_a_report_twice_in_one_batch_and_again_later_is_charged_once(store: UsageStore) -> None:
    budget = Budget(scope="team", name="risk", window="day", limit_usd=1_000.0)
    budgets = {budget.key: budget}
    # "b" arrives twice in the same batch (a redelivery next to its original).
    store.record(_rows(store, ["a", "b", "b"]), budgets)
    store.record(_rows(store, ["b", "c"]), budgets)  # and once more later
    [status] = store.ledger.status(budget, time.time())
    one = 2.5  # a million gpt-4o input tokens
    assert status.spent_usd == pytest.approx(3 * one)
    assert store.report("agent", None, None).total.reports == 3


def test_settlement_reads_back_only_this_batch_among_many_stored(store: UsageStore) -> None:
    # Reports of an agent no budget applies to fill the table first.
    store.record(_rows(store, [f"x{i}" for i in range(600)], agent="other"))
    budget = Budget(scope="agent", name="fraud", window="day", limit_usd=1_000.0)
    store.record(_rows(store, ["x1", "x2"]), {budget.key: budget})  # same ids, another agent
    [status] = store.ledger.status(budget, time.time())
    assert round(status.spent_usd * NANOS_PER_USD) == 2 * 2_500_000_000
