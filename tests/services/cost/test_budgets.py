"""Budgets end to end: reserved at authorization, never overrun, settled by usage, explained."""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from nats.aio.client import Client
from typer.testing import CliRunner, Result

from broker import Agent, BudgetExceeded
from broker.codec import decode, encode
from broker.connection import connect
from broker.replies import H_CHAIN, H_CHAIN_SIG, request
from broker.runtime.identity import operator_connect_options
from broker.settings import Settings
from schemas import (
    AuthzRequest,
    BudgetList,
    BudgetStatus,
    Decision,
    ListBudgets,
    SetBudget,
    ShowBudget,
)
from services.cli.main import app
from services.runner import Stack

if TYPE_CHECKING:
    from support import AgentFactory, AuditTrail, StackFactory

from support import RawAgent, cost_of, enroll, eventually, lending_policy_dir

# gpt-4o: $10 per million output tokens, so 10,000 estimated tokens (no output cap,
# all priced as output) reserve $0.10.
MODEL = "gpt-4o"


@pytest.fixture
def settings(settings: Settings, database_url: str) -> Settings:
    """Every test here runs on SQLite and on PostgreSQL (when configured): the budget
    counters' row locks are what keeps concurrent reservations under a limit."""
    return settings.model_copy(update={"database_url": database_url})


@pytest.fixture
async def stack(make_stack: StackFactory, tmp_path: Path) -> Stack:
    """The four services on the lending example, plus: orchestrator may ask worker to work."""
    policies = tmp_path / "policies"
    shutil.copytree(lending_policy_dir(), policies)
    (policies / "delegation.cedar").write_text(
        '@id("orchestrator-may-delegate")\n'
        '@description("orchestrator may hand work to worker")\n'
        'permit (principal == Signalbox::Agent::"orchestrator", '
        'action == Signalbox::Action::"call", '
        'resource == Signalbox::Capability::"worker/work");\n'
    )
    return await make_stack(policy_dir=policies, services=["tracing", "registry", "policy", "cost"])


@pytest.fixture
async def operator(stack: Stack, settings: Settings) -> AsyncIterator[Client]:
    options = operator_connect_options(settings)
    nc = await connect(settings.nats_url, name="test-operator", **options)
    yield nc
    await nc.close()


async def _set(operator: Client, stack: Stack, scope: str, name: str, limit: float,
               window: str = "day", **kw: Any) -> BudgetStatus:  # fmt: skip
    status = await request(
        operator, "sb.admin.budgets.set",
        SetBudget(scope=scope, name=name, window=window, limit_usd=limit,  # type: ignore[arg-type]
                  requested_by="ops", **kw),
        BudgetStatus,
    )  # fmt: skip
    key = f"{scope}.{name}.{window}"
    policy = stack.services["policy"]
    # Every replica watches the definitions: wait until policy and cost both see it.
    await eventually(
        lambda: (
            policy.budgets.get(key) == status.budget  # type: ignore[attr-defined]
            and cost_of(stack).budgets.cache.get(key) == status.budget
        ),
        "policy and cost to see the budget",
    )
    return status


async def _agent(make_agent: AgentFactory, stack: Stack, name: str, team: str) -> Agent:
    agent = make_agent(name, team=team)
    await agent.start()
    await eventually(
        lambda: cost_of(stack)._team(name) == team,
        "the cost service to know the agent's team",
    )
    return agent


async def test_64_concurrent_callers_never_exceed_a_team_budget(
    stack: Stack, operator: Client, make_agent: AgentFactory, audit_trail: AuditTrail
) -> None:
    await _set(operator, stack, "team", "risk", 2.0)  # room for 20 reservations of $0.10
    agents = [await _agent(make_agent, stack, f"scorer-{i}", "risk") for i in range(8)]

    async def ask(agent: Agent) -> Decision:
        return await agent.authorize("use_model", MODEL, estimated_tokens=10_000, timeout=10)

    decisions = await asyncio.gather(*(ask(a) for a in agents for _ in range(8)))
    allowed = [d for d in decisions if d.effect == "allow"]
    refused = [d for d in decisions if d.effect == "deny"]
    assert len(allowed) == 20 and len(refused) == 44
    assert all(d.reservation_id and d.reserved_usd == pytest.approx(0.10) for d in allowed)
    assert len({d.reservation_id for d in allowed}) == 20
    for d in refused:
        assert d.reason_code == "budget_exceeded"
        assert d.budget is not None and d.budget.key == "team.risk.day"
        assert d.budget.limit_usd == 2.0
        assert d.budget.spent_usd + d.budget.reserved_usd <= 2.0 + 1e-9
        assert "limit $2.00" in d.reasons[-1] and "signalbox budgets set" in d.reasons[-1]
    [status] = (await request(operator, "sb.admin.budgets.list", ListBudgets(), BudgetList)).budgets
    assert status.reserved_usd == pytest.approx(2.0)
    assert status.open_reservations == 20
    assert status.remaining_usd == pytest.approx(0.0)
    # Refusals are audited by the cost service (kind budget) and in the decision events.
    await audit_trail.wait_for(
        lambda r: r.kind == "budget" and r.data.get("event") == "refused", count=44
    )
    # The soft threshold (80%) was crossed once in the window: one alert.
    alerts = await audit_trail.wait_for(
        lambda r: r.kind == "budget" and r.data.get("event") == "soft_threshold"
    )
    assert len(alerts) == 1


async def test_model_call_settles_the_reservation_with_the_actual_cost(
    stack: Stack, operator: Client, make_agent: AgentFactory
) -> None:
    await _set(operator, stack, "agent", "fraud", 0.25)
    fraud = await _agent(make_agent, stack, "fraud", "risk")
    cost = cost_of(stack)
    async with fraud.model_call(MODEL, provider="openai", estimated_tokens=10_000) as call:
        assert call.decision is not None and call.decision.reserved_usd == pytest.approx(0.10)
        call.record(input_tokens=1_000, output_tokens=500)  # $0.0025 + $0.005
    rid = call.decision.reservation_id

    async def settled() -> bool:
        row = await asyncio.to_thread(cost.store.ledger.reservation, rid)
        return row is not None and row["state"] == "settled"

    await eventually(settled, "the reservation settled")
    shown = await request(
        operator, "sb.admin.budgets.show", ShowBudget(scope="agent", name="fraud"), BudgetList
    )
    assert shown.budgets[0].spent_usd == pytest.approx(0.0075)
    assert shown.budgets[0].reserved_usd == 0
    # Two more worst cases fit ($0.2075 of $0.25), a third does not, and says why.
    async with fraud.model_call(MODEL, estimated_tokens=10_000):
        pass  # nothing recorded: settles at $0
    for _ in range(2):
        held = await fraud.authorize("use_model", MODEL, estimated_tokens=10_000)
        assert held.effect == "allow"
    with pytest.raises(BudgetExceeded) as refused:
        async with fraud.model_call(MODEL, estimated_tokens=10_000):
            raise AssertionError("the block must not run")
    budget = refused.value.details["budget"]
    assert budget["key"] == "agent.fraud.day" and budget["limit_usd"] == 0.25
    assert "agent.fraud.day" in refused.value.message


async def test_an_error_inside_the_block_still_settles(
    stack: Stack, operator: Client, make_agent: AgentFactory
) -> None:
    await _set(operator, stack, "agent", "flaky", 1.0)
    flaky = await _agent(make_agent, stack, "flaky", "risk")
    with pytest.raises(RuntimeError, match="provider down"):
        async with flaky.model_call(MODEL, estimated_tokens=10_000) as call:
            call.record(input_tokens=10)
            raise RuntimeError("provider down")
    assert call.report_id
    cost = cost_of(stack)
    rid = call.decision.reservation_id if call.decision else ""

    async def settled() -> bool:
        row = await asyncio.to_thread(cost.store.ledger.reservation, rid)
        return row is not None and row["state"] == "settled"

    await eventually(settled, "the reservation settled")


async def test_budgets_fail_closed(
    stack: Stack, operator: Client, make_agent: AgentFactory
) -> None:
    await _set(operator, stack, "agent", "vague", 1.0)
    vague = await _agent(make_agent, stack, "vague", "risk")
    no_estimate = await vague.authorize("use_model", MODEL)
    assert (no_estimate.effect, no_estimate.reason_code) == ("deny", "estimate_required")
    # Unbudgeted agents need neither an estimate nor the cost service.
    free = await _agent(make_agent, stack, "free", "other")
    assert (await free.authorize("use_model", MODEL)).effect == "allow"
    await cost_of(stack).stop()
    down = await vague.authorize("use_model", MODEL, estimated_tokens=100)
    assert (down.effect, down.reason_code) == ("deny", "budget_unavailable")
    assert "cost service" in down.reasons[-1]
    assert (await free.authorize("use_model", MODEL, estimated_tokens=100)).effect == "allow"


async def test_a_parent_task_pays_for_calls_made_on_its_behalf(
    stack: Stack, operator: Client, make_agent: AgentFactory, settings: Settings
) -> None:
    """The delegation chain the policy service signed decides whose budgets a model call
    also charges: a worker's model calls while serving orchestrator charge orchestrator's
    budget; naming someone in ``on_behalf_of``, or forging the chain, charges nobody."""
    await _set(operator, stack, "agent", "orchestrator", 0.15)
    await _set(operator, stack, "agent", "victim", 0.01)
    worker = make_agent("worker", team="ops")

    @worker.capability("work")
    async def work(_: dict[str, Any]) -> str:
        decision = await worker.authorize("use_model", MODEL, estimated_tokens=10_000)
        if decision.effect != "allow":
            return decision.reason_code + ":" + (decision.budget.key if decision.budget else "")
        return "allow"

    await worker.start()
    orchestrator = await _agent(make_agent, stack, "orchestrator", "ops")
    await eventually(
        lambda: cost_of(stack)._team("worker") == "ops",
        "the cost service to know worker's team",
    )
    assert await orchestrator.call("worker", "work", {}) == "allow"  # $0.10 of $0.15
    assert await orchestrator.call("worker", "work", {}) == "budget_exceeded:agent.orchestrator.day"
    # Outside a call it serves, the worker has no budget of its own: allowed.
    assert (await worker.authorize("use_model", MODEL, estimated_tokens=10_000)).effect == "allow"
    # Naming another agent does not charge it, nor does a chain nobody signed.
    named = await worker.authorize(
        "use_model", MODEL, estimated_tokens=10_000, on_behalf_of=("victim",)
    )
    assert named.effect == "allow"
    await _agent(make_agent, stack, "mallory", "ops")  # registered: policy allows its model use
    raw = RawAgent()
    assert settings.nats_url
    nc = await raw.connect(settings.nats_url, "mallory", enroll(settings, "mallory"))
    try:
        forged = await nc.request(
            "sb.authz.mallory",
            encode(AuthzRequest(action="use_model", resource=MODEL, estimated_tokens=10_000)),
            headers={H_CHAIN: "victim", H_CHAIN_SIG: "99999999999.000000"},
            timeout=5,
        )
    finally:
        await nc.close()
    assert decode(forged.data, Decision).effect == "allow"
    shown = await request(
        operator, "sb.admin.budgets.show", ShowBudget(scope="agent", name="victim"), BudgetList
    )
    assert shown.budgets[0].reserved_usd == 0 and shown.budgets[0].spent_usd == 0


async def test_agents_cannot_reserve_or_change_budgets(stack: Stack, settings: Settings) -> None:
    raw = RawAgent()
    assert settings.nats_url
    await raw.connect(settings.nats_url, "mallory", enroll(settings, "mallory"))
    try:
        await raw.violation(lambda nc: nc.publish("sb.cost.reserve", b"{}"), "sb.cost.reserve")
        await raw.violation(
            lambda nc: nc.publish(
                "sb.admin.budgets.set",
                encode(SetBudget(scope="agent", name="mallory", window="day", limit_usd=1e6)),
            ),
            "sb.admin.budgets.set",
        )
        await raw.violation(lambda nc: nc.publish("$KV.sb_budgets.agent.mallory.day", b"x"), "$KV.")
    finally:
        assert raw.nc is not None
        await raw.nc.close()


runner = CliRunner()


async def _cli(*args: str) -> Result:
    return await asyncio.to_thread(runner.invoke, app, ["budgets", *args])


async def test_operators_manage_budgets_from_the_cli(
    stack: Stack, settings: Settings, make_agent: AgentFactory,
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, audit_trail: AuditTrail,
) -> None:  # fmt: skip
    monkeypatch.setenv("SIGNALBOX_SECRETS_DIR", str(tmp_path / "data" / "secrets"))
    url = ["--nats-url", settings.nats_url or ""]
    empty = await _cli("list", *url)
    assert empty.exit_code == 0 and "No budgets" in empty.output
    made = await _cli("set", "team:risk", "--limit", "0.15", "--soft", "50%", *url)
    assert made.exit_code == 0, made.output
    assert "team:risk" in made.output and "$0.15 per day" in made.output
    bad = await _cli("set", "squad:risk", "--limit", "1", *url)
    assert bad.exit_code == 1 and "agent:NAME, team:NAME or project:NAME" in bad.output
    bad_soft = await _cli("set", "team:risk", "--limit", "1", "--soft", "150%", *url)
    assert bad_soft.exit_code == 1 and "at most 100%" in bad_soft.output

    fraud = await _agent(make_agent, stack, "fraud", "risk")
    await eventually(
        lambda: stack.services["policy"].budgets.get("team.risk.day"),  # type: ignore[attr-defined]
        "the policy service to see team.risk.day",
    )
    async with fraud.model_call(MODEL, estimated_tokens=10_000) as call:
        call.record(input_tokens=4_000, output_tokens=1_000)  # $0.01 + $0.01
    cost = cost_of(stack)

    async def spent() -> bool:
        [status] = await asyncio.to_thread(
            cost.store.ledger.status, cost.budgets.cache.get("team.risk.day"), time.time()
        )
        return status.spent_usd > 0

    await eventually(spent, "spend on team.risk.day")
    listed = await _cli("list", "--json", *url)
    assert listed.exit_code == 0, listed.output
    [row] = json.loads(listed.output)["budgets"]
    assert row["spent_usd"] == pytest.approx(0.02) and row["reserved_usd"] == 0
    shown = await _cli("show", "team:risk", *url)
    assert shown.exit_code == 0 and "$0.02" in shown.output
    missing = await _cli("show", "agent:nobody", *url)
    assert missing.exit_code == 1 and "signalbox budgets set agent:nobody" in missing.output
    removed = await _cli("remove", "team:risk", *url)
    assert removed.exit_code == 0, removed.output
    again = await _cli("remove", "team:risk", *url)
    assert again.exit_code == 1 and "budgets list" in again.output
    changes = await audit_trail.wait_for(
        lambda r: r.kind == "admin" and str(r.data.get("op", "")).startswith("budget_"), count=2
    )
    assert [c.data["op"] for c in changes] == ["budget_set", "budget_removed"]
    assert all(c.actor.startswith("bootstrap") for c in changes)  # the shared operator


async def test_an_exhausted_budget_trips_the_breaker_until_it_is_raised(
    stack: Stack, operator: Client, make_agent: AgentFactory, audit_trail: AuditTrail
) -> None:
    await _set(operator, stack, "agent", "runaway", 0.05)
    runaway = await _agent(make_agent, stack, "runaway", "risk")
    # Spend reported without reservations (an agent that skips model_call) still counts.
    for _ in range(3):
        await runaway.report_usage(model=MODEL, output_tokens=2_000)  # $0.02 each
    policy = stack.services["policy"]
    await eventually(lambda: policy.breakers.get("agent.runaway"), "the budget breaker of runaway")  # type: ignore[attr-defined]
    breaker = policy.breakers.get("agent.runaway")  # type: ignore[attr-defined]
    assert (breaker.state, breaker.reason) == ("open", "budget")
    assert "agent.runaway.day exhausted" in breaker.text
    refused = await runaway.authorize("use_model", MODEL, estimated_tokens=10)
    assert (refused.effect, refused.reason_code) == ("deny", "breaker_open")
    exhausted = await audit_trail.wait_for(
        lambda r: r.kind == "budget" and r.data.get("event") == "exhausted"
    )
    assert exhausted[0].data["charge"]["spent_usd"] == pytest.approx(0.06)

    await _set(operator, stack, "agent", "runaway", 1.0)
    await eventually(
        lambda: policy.breakers.get("agent.runaway").state == "closed",
        "runaway's breaker closed",  # type: ignore[attr-defined]
    )
    again = await runaway.authorize("use_model", MODEL, estimated_tokens=10)
    assert again.effect == "allow" and again.reservation_id
