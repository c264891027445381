"""Which budgets a model call charges, and the refusal an unreadable one gives
(broker/runtime/budgets.py).

(Not ``test_budgets.py``: tests/services/cost/ has one, and test files
without packages need names of their own.)
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator

import pytest
from nats.aio.client import Client
from nats.js.kv import KeyValue

from broker.codec import encode
from broker.connection import connect
from broker.errors import ConfigError
from broker.runtime.budgets import (
    applicable_keys,
    candidate_keys,
    unreadable_budget,
    unreadable_keys,
)
from broker.runtime.kvcache import KVCache
from schemas import Budget, BudgetScope, BudgetWindow


def budget(scope: BudgetScope, name: str, window: BudgetWindow = "day") -> Budget:
    return Budget(scope=scope, name=name, window=window, limit_usd=1.0)


def stored(*budgets: Budget) -> dict[str, Budget]:
    return {b.key: b for b in budgets}


def test_a_call_could_be_charged_to_the_agent_its_team_its_project_and_its_delegators() -> None:
    keys = candidate_keys(agent="a", team="risk", project="p1", on_behalf_of=("boss", "lead"))
    assert keys == [
        "agent.a.day", "agent.a.month",
        "team.risk.day", "team.risk.month",
        "project.p1.day", "project.p1.month",
        "agent.boss.day", "agent.boss.month",
        "agent.lead.day", "agent.lead.month",
    ]  # fmt: skip


def test_no_team_no_project_and_the_agent_itself_in_its_chain_add_no_keys() -> None:
    keys = candidate_keys(agent="a", team="", project="", on_behalf_of=("", "a"))
    assert keys == ["agent.a.day", "agent.a.month"]


def test_only_stored_budgets_apply_each_once_in_key_order() -> None:
    found = stored(
        budget("team", "risk", "month"),
        budget("agent", "boss"),
        budget("agent", "a"),
        budget("project", "p1"),
        budget("agent", "stranger"),  # not in this call's chain
        budget("team", "other"),
    )
    applied = applicable_keys(
        found, agent="a", team="risk", project="p1", on_behalf_of=("boss", "boss")
    )
    assert [b.key for b in applied] == [
        "agent.a.day", "agent.boss.day", "project.p1.day", "team.risk.month",
    ]  # fmt: skip
    assert applicable_keys({}, agent="a", team="risk", project="", on_behalf_of=()) == []


def test_unreadable_records_are_found_among_the_calls_keys_only() -> None:
    unreadable = {
        "team.risk.day": "not JSON",
        "agent.a.month": "wrong tag",
        "agent.other.day": "not JSON",  # someone else's
    }
    found = unreadable_keys(unreadable, agent="a", team="risk", project="", on_behalf_of=())
    assert found == [("agent.a.month", "wrong tag"), ("team.risk.day", "not JSON")]
    assert unreadable_keys({}, agent="a", team="risk", project="", on_behalf_of=()) == []


def test_an_unreadable_budget_refuses_naming_the_record_and_the_fix() -> None:
    err = unreadable_budget("team.risk-ops.month", "expected an object")
    assert isinstance(err, ConfigError)
    assert "team.risk-ops.month" in err.message and "expected an object" in err.message
    fix = "signalbox budgets set team:risk-ops --limit USD --window month"
    assert fix in err.message
    assert "signalbox budgets remove team:risk-ops --window month" in err.message
    assert err.details == {
        "budget": "team.risk-ops.month",
        "bucket": "sb_budgets",
        "reason": "expected an object",
        "reason_code": "budget_unreadable",
        "fix": fix,
    }


# -- with the watched bucket as the lookup -----------------------------------------------------


@pytest.fixture
async def kv(nats_url: str) -> AsyncIterator[KeyValue]:
    """A budgets bucket of its own on the session server, removed afterwards."""
    nc: Client = await connect(nats_url, name="test-budgets")
    js = nc.jetstream()
    name = f"test_budgets_{os.urandom(4).hex()}"
    try:
        yield await js.create_key_value(bucket=name, history=2)
    finally:
        await js.delete_key_value(name)
        await nc.close()


@pytest.mark.nats
async def test_the_watched_cache_is_a_lookup_and_names_its_unreadable_records(
    kv: KeyValue,
) -> None:
    await kv.put("agent.a.day", encode(budget("agent", "a")))
    await kv.put("team.risk.day", b"garbage")
    await kv.put("team.other.day", encode(budget("team", "other")))
    cache = KVCache(kv, Budget)
    await cache.start(timeout=5)
    try:
        call = {"agent": "a", "team": "risk", "project": "", "on_behalf_of": ()}
        assert [b.key for b in applicable_keys(cache, **call)] == ["agent.a.day"]
        [(key, reason)] = unreadable_keys(cache.unreadable, **call)
        assert key == "team.risk.day"
        assert reason in unreadable_budget(key, reason).message
    finally:
        await cache.stop()
