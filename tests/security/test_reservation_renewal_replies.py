"""Reservation renewals (``sb.cost.renew.<agent>``) cannot be turned against anyone.

An agent renews the budget reservation of its own model call in progress. The cost
service publishes its answer with its own rights, so, like every agent endpoint,
it must answer only into the asking agent's own inbox: a request naming any other
reply subject (a KV key, another agent's or a service's inbox, an admin or usage
subject, none at all) is refused before any work, unanswered, with no effect on the
reservation, counted and audited with the real sender. And an agent cannot renew
as another agent: the server lets it publish only under its own name.

The attacker is a raw nats-py client holding agent ``a``'s credential.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import pytest

from broker import Agent
from broker.codec import decode, encode
from broker.connection import connect, sync_connection
from broker.replies import H_ERROR, request
from broker.runtime.identity import operator_connect_options
from broker.settings import Settings
from schemas import BudgetStatus, RenewReservation, ReservationRenewed, SetBudget
from services.runner import Stack

if TYPE_CHECKING:
    from support import AgentFactory, AuditTrail, ServiceConnector, StackFactory

from support import RawAgent, cost_of, enroll, eventually, lending_policy_dir

#: Reply subjects agent ``a`` must not make the cost service publish to ("": none).
BAD_REPLIES = (
    "$KV.sb_breakers.agent.b",  # open b's circuit breaker
    "$KV.sb_budgets.agent.a.day",  # give itself a budget
    "sb.admin.budgets.set",  # an operator's endpoint
    "sb.usage.b",  # report usage as b
    "sb.cost.reserve",  # the policy service's endpoint
    "_INBOX.agent.b.x",  # forge an answer to b
    "_INBOX.agent.ab.x",  # an agent whose name starts with "a"
    "_INBOX.service.x",  # forge an answer to a service's pending request
    "_INBOX.operator.x",  # forge an answer to an operator's CLI
    "",  # no reply at all
)


@pytest.fixture
async def stack(make_stack: StackFactory) -> Stack:
    return await make_stack(
        policy_dir=lending_policy_dir(), services=["tracing", "registry", "policy", "cost"],
        budget_reservation_ttl=60.0, refusal_summary_window=0.5,
    )  # fmt: skip


@pytest.fixture
async def agent_a(stack: Stack, settings: Settings, make_agent: AgentFactory) -> Agent:
    """Agent ``a`` (SDK) with a budget, so its model use is reserved."""
    assert settings.nats_url
    operator = await connect(
        settings.nats_url, name="test-operator", **operator_connect_options(settings)
    )
    try:
        status = await request(
            operator, "sb.admin.budgets.set",
            SetBudget(scope="agent", name="a", window="day", limit_usd=1.0), BudgetStatus,
        )  # fmt: skip
    finally:
        await operator.close()
    a = make_agent("a", heartbeat_interval=0)
    await a.start()
    policy: Any = stack.services["policy"]
    await eventually(
        lambda: (
            policy.budgets.get("agent.a.day") == status.budget
            and cost_of(stack).budgets.cache.get("agent.a.day") == status.budget
            and cost_of(stack)._team("a") == "team-1"
        ),
        "policy and cost to see the budget",
    )
    return a


@pytest.fixture
async def attacker(settings: Settings) -> AsyncIterator[RawAgent]:
    raw = RawAgent()
    assert settings.nats_url
    await raw.connect(settings.nats_url, "a", enroll(settings, "a"))
    yield raw
    if raw.nc is not None:
        await raw.nc.close()


async def test_a_renewal_answers_only_into_the_asking_agents_inbox(
    stack: Stack,
    agent_a: Agent,
    attacker: RawAgent,
    service_nc: ServiceConnector,
    audit_trail: AuditTrail,
) -> None:
    decision = await agent_a.authorize("use_model", "gpt-4o", estimated_tokens=1_000)
    rid = decision.reservation_id
    assert rid
    cost = cost_of(stack)
    ledger = cost.store.ledger
    before = await asyncio.to_thread(ledger.reservation, rid)
    # Everything a deputized answer would reach, watched by a service connection.
    svc = await service_nc("watcher")
    watched = [await svc.subscribe(s) for s in BAD_REPLIES if s]
    watched += [await svc.subscribe(f"$KV.{b}.>") for b in ("sb_breakers", "sb_budgets")]
    await sync_connection(svc)
    nc = attacker.nc
    assert nc is not None
    body = encode(RenewReservation(reservation_id=rid))
    for reply in BAD_REPLIES:
        await nc.publish("sb.cost.renew.a", body, reply=reply)
    # The sentinel: the same request into a's own inbox is answered (after the attacks:
    # the server relays one publisher's messages in order).
    answer = decode((await nc.request("sb.cost.renew.a", body, timeout=5)).data, ReservationRenewed)
    assert (answer.reservation_id, answer.state) == (rid, "open")
    await sync_connection(svc)
    assert [(s.subject, s.pending_msgs) for s in watched if s.pending_msgs] == []
    assert cost.rejected["invalid_reply_subject"] == len(BAD_REPLIES)
    assert await asyncio.to_thread(ledger.reservation, rid) == before
    assert attacker.errors == []  # all of it was a's to publish
    # Accountable: the refusals are audited with a as the actor (summarized per window).

    async def all_audited() -> bool:
        total = 0
        for r in await audit_trail.settle():
            if (r.kind, r.actor) != ("rejected", "a") or not r.subject.startswith("sb.cost."):
                continue
            if r.data.get("code") == "invalid_reply_subject":
                summary = r.data.get("summary")
                total += summary["count"] - 1 if summary else 1
        return total >= len(BAD_REPLIES)

    await eventually(all_audited, "the refusals audited")


async def test_an_agent_cannot_renew_as_another_agent(
    stack: Stack, agent_a: Agent, settings: Settings
) -> None:
    mallory = RawAgent()
    assert settings.nats_url
    await mallory.connect(settings.nats_url, "mallory", enroll(settings, "mallory"))
    try:
        decision = await agent_a.authorize("use_model", "gpt-4o", estimated_tokens=1_000)
        body = encode(RenewReservation(reservation_id=decision.reservation_id))
        await mallory.violation(lambda nc: nc.publish("sb.cost.renew.a", body), "sb.cost.renew.a")
        # Under its own name it is asked as itself, and a's reservation is not its own.
        assert mallory.nc is not None
        reply = await mallory.nc.request("sb.cost.renew.mallory", body, timeout=5)
        assert (reply.headers or {}).get(H_ERROR) == "not_found"
    finally:
        assert mallory.nc is not None
        await mallory.nc.close()
