"""``budgets set`` changes only what it is given, atomically (issue 16, item 5).

An existing budget keeps every field the operator did not give; a new one
gets the documented defaults (soft threshold 80%, daily window) and must be
given a limit; two operators changing different fields at once both land;
a client that sends every field (any client before partial updates) still
sets them all.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import pytest
from nats.aio.client import Client
from nats.js.errors import KeyNotFoundError
from support import ainvoke, cost_of

from broker.codec import decode
from broker.connection import connect
from broker.errors import InvalidInput
from broker.replies import request
from broker.runtime.identity import operator_connect_options
from broker.settings import Settings
from schemas import Budget, BudgetStatus, SetBudget

if TYPE_CHECKING:
    from support import AuditTrail, StackFactory

    from services.runner import Stack

pytestmark = pytest.mark.usefixtures("cli_operator")


@pytest.fixture
async def stack(make_stack: StackFactory) -> Stack:
    return await make_stack(services=["tracing", "cost"])


@pytest.fixture
async def operator(stack: Stack, settings: Settings) -> AsyncIterator[Client]:
    options = operator_connect_options(settings)
    nc = await connect(settings.nats_url, name="test-operator", **options)
    yield nc
    await nc.close()


async def _set(operator: Client, **fields: Any) -> Budget:
    body = SetBudget(requested_by="ops", **fields)
    return (await request(operator, "sb.admin.budgets.set", body, BudgetStatus)).budget


async def _stored(stack: Stack, key: str) -> Budget:
    """The definition in ``sb_budgets`` itself (not a replica's watched copy)."""
    entry = await cost_of(stack).budgets.kv.get(key)
    assert entry.value is not None
    return decode(entry.value, Budget)


async def _cli(settings: Settings, *args: str) -> tuple[int, str]:
    result = await ainvoke(["budgets", "set", *args, "--nats-url", settings.nats_url or ""])
    return result.exit_code, result.output


async def test_a_partial_update_keeps_what_it_does_not_give(
    stack: Stack, settings: Settings, audit_trail: AuditTrail
) -> None:
    code, out = await _cli(settings, "team:risk", "--limit", "1", "--soft", "50%", "--json")
    assert code == 0, out
    assert json.loads(out)["budget"]["soft_ratio"] == 0.5
    # Only the limit: the soft threshold stays at 50% (it was reset to 80%).
    code, out = await _cli(settings, "team:risk", "--limit", "5", "--json")
    assert code == 0, out
    budget = json.loads(out)["budget"]
    assert (budget["limit_usd"], budget["soft_ratio"], budget["window"]) == (5.0, 0.5, "day")
    # Only the threshold: the limit stays.
    code, out = await _cli(settings, "team:risk", "--soft", "90%")
    assert code == 0, out
    assert "$5.00 per day (alert at 90%)" in out
    stored = await _stored(stack, "team.risk.day")
    assert (stored.limit_usd, stored.soft_ratio) == (5.0, 0.9)

    # Audited as before, with the resulting budget, the one it replaced and what was given.
    [*_, change] = await audit_trail.wait_for(
        lambda r: r.kind == "admin" and r.data.get("op") == "budget_set", count=3
    )
    assert change.data["budget"]["limit_usd"] == 5.0
    assert change.data["budget"]["soft_ratio"] == 0.9
    assert change.data["previous"]["soft_ratio"] == 0.5
    assert change.data["given"] == ["soft_ratio"]


async def test_a_new_budget_gets_the_defaults_and_needs_a_limit(
    stack: Stack, operator: Client, settings: Settings
) -> None:
    made = await _set(operator, scope="agent", name="fraud", limit_usd=2.0)
    assert (made.window, made.limit_usd, made.soft_ratio) == ("day", 2.0, 0.8)
    assert made.set_by  # the operator who set it

    with pytest.raises(InvalidInput, match="give its limit") as err:
        await _set(operator, scope="team", name="nobody", soft_ratio=0.5)
    assert err.value.details["path"] == "$.limit_usd"
    code, out = await _cli(settings, "team:nobody", "--soft", "50%")
    assert code == 1 and "--limit USD" in out
    code, out = await _cli(settings, "team:nobody")
    assert code == 1 and "nothing to set" in out


async def test_a_left_out_window_is_the_owners_only_budget(
    stack: Stack, operator: Client, settings: Settings
) -> None:
    await _set(operator, scope="project", name="alpha", window="month", limit_usd=30.0)
    changed = await _set(operator, scope="project", name="alpha", soft_ratio=0.6)
    assert (changed.window, changed.limit_usd, changed.soft_ratio) == ("month", 30.0, 0.6)
    with pytest.raises(KeyNotFoundError):  # no daily budget was created
        await cost_of(stack).budgets.kv.get("project.alpha.day")

    await _set(operator, scope="project", name="alpha", window="day", limit_usd=2.0)
    code, out = await _cli(settings, "project:alpha", "--limit", "3")
    assert code == 1 and "daily and a monthly budget" in out and "--window" in out
    assert (await _stored(stack, "project.alpha.month")).limit_usd == 30.0
    assert (await _stored(stack, "project.alpha.day")).limit_usd == 2.0


async def test_a_client_sending_every_field_still_sets_them_all(
    stack: Stack, operator: Client
) -> None:
    await _set(operator, scope="team", name="risk", window="day", limit_usd=1.0, soft_ratio=0.5)
    # What a client from before partial updates sends: every field, the defaults included.
    old = (
        b'{"type":"set_budget.v1","scope":"team","name":"risk","window":"day",'
        b'"limit_usd":4.0,"soft_ratio":0.8,"requested_by":"ops"}'
    )
    reply = await operator.request("sb.admin.budgets.set", old, timeout=5)
    budget = decode(reply.data, BudgetStatus).budget
    assert (budget.limit_usd, budget.soft_ratio) == (4.0, 0.8)


async def test_concurrent_partial_updates_do_not_lose_each_others_fields(
    stack: Stack, operator: Client
) -> None:
    await _set(operator, scope="team", name="risk", limit_usd=1.0, soft_ratio=0.8)
    for round_ in range(6):
        limit, soft = 10.0 + round_, 0.3 + round_ / 20
        await asyncio.gather(
            _set(operator, scope="team", name="risk", limit_usd=limit),
            _set(operator, scope="team", name="risk", soft_ratio=soft),
            _set(operator, scope="team", name="risk", window="day", limit_usd=limit),
            _set(operator, scope="team", name="risk", window="day", soft_ratio=soft),
        )
        stored = await _stored(stack, "team.risk.day")
        assert stored.limit_usd == limit and stored.soft_ratio == pytest.approx(soft), round_
