"""Cost service: usage reports are validated, audited once, and never spoofed."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import nats
import pytest
from nats.aio.client import Client

from broker import Agent
from broker.codec import encode
from broker.identity import service_connect_options
from broker.jetstream import USAGE_STREAM
from broker.replies import H_MSG_ID
from broker.settings import Settings
from schemas import UsageReport
from services.cost.service import CostService
from services.runner import Stack

if TYPE_CHECKING:
    from conftest import AgentFactory, AuditTrail, StackFactory


@pytest.fixture
async def nc(settings: Settings) -> AsyncIterator[Client]:
    conn = await nats.connect(settings.nats_url or "", **service_connect_options(settings))
    yield conn
    await conn.close()


@pytest.fixture
async def metered(make_stack: StackFactory, make_agent: AgentFactory) -> tuple[Stack, Agent]:
    stack = await make_stack(services=["tracing", "registry", "cost"])
    agent = make_agent("loan")
    await agent.start()
    return stack, agent


def _cost(stack: Stack) -> CostService:
    service = stack.services["cost"]
    assert isinstance(service, CostService)
    return service


async def _settled(nc: Client) -> None:
    """Wait until the cost consumer has nothing pending or unacknowledged."""
    js = nc.jetstream()
    for _ in range(200):
        info = await js.consumer_info(USAGE_STREAM, "sb-cost-meter")
        if info.num_pending == 0 and info.num_ack_pending == 0:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"cost consumer never settled: {info}")


async def test_reported_usage_becomes_a_usage_audit_event(
    metered: tuple[Stack, Agent], audit_trail: AuditTrail
) -> None:
    stack, agent = metered
    report_id = await agent.report_usage(
        model="gpt-x", provider="acme", input_tokens=1200, output_tokens=300, project="loans"
    )
    [event] = await audit_trail.wait_for(lambda r: r.kind == "usage")
    assert event.id == f"usage-{report_id}"
    assert event.actor == "loan"
    assert event.subject == "sb.usage.loan"
    assert event.data["model"] == "gpt-x"
    assert event.data["input_tokens"] == 1200
    assert event.data["output_tokens"] == 300
    assert event.data["project"] == "loans"
    assert _cost(stack).tokens[("loan", "gpt-x")] == 1500


async def test_a_report_naming_another_agent_is_rejected_and_terminated(
    metered: tuple[Stack, Agent], audit_trail: AuditTrail, nc: Client
) -> None:
    stack, agent = metered
    spoof = UsageReport(id="spoof-1", agent="someone-else", time=time.time(), input_tokens=10**6)
    await agent.report_usage(spoof)
    [rejected] = await audit_trail.wait_for(lambda r: r.kind == "rejected")
    assert rejected.actor == "loan"
    assert rejected.subject == "sb.usage.loan"
    assert rejected.data["code"] == "invalid_input"
    assert rejected.data["details"]["agent"] == "someone-else"
    await _settled(nc)
    info = await nc.jetstream().consumer_info(USAGE_STREAM, "sb-cost-meter")
    assert info.num_redelivered == 0  # terminated, not left to redeliver
    assert _cost(stack).tokens == {}
    assert _cost(stack).rejected["invalid_input"] == 1
    # The agent's honest reports still count.
    await agent.report_usage(model="m", input_tokens=5)
    await audit_trail.wait_for(lambda r: r.kind == "usage")
    assert _cost(stack).tokens[("loan", "m")] == 5


async def test_a_malformed_report_is_rejected_with_its_path(
    metered: tuple[Stack, Agent], audit_trail: AuditTrail, nc: Client
) -> None:
    stack, _ = metered
    js = nc.jetstream()
    await js.publish(
        "sb.usage.loan", b'{"id": "r", "agent": "loan", "time": 1, "input_tokens": -3}'
    )
    await js.publish("sb.usage.loan", b"\x00 not json")
    rejected = await audit_trail.wait_for(lambda r: r.kind == "rejected", count=2)
    assert [r.data["code"] for r in rejected] == ["schema_error", "schema_error"]
    assert rejected[0].data["details"]["path"] == "$.input_tokens"
    assert rejected[1].data["details"]["path"] == "$"
    await _settled(nc)
    assert _cost(stack).rejected["schema_error"] == 2


async def test_a_report_sent_twice_is_stored_and_counted_once(
    metered: tuple[Stack, Agent], audit_trail: AuditTrail, nc: Client
) -> None:
    stack, agent = metered
    report = UsageReport(id="report-7", agent="loan", time=time.time(), model="m",
                         input_tokens=40)  # fmt: skip
    assert await agent.report_usage(report) == "report-7"
    assert await agent.report_usage(report) == "report-7"  # a retry after a lost ack
    # A raw publish with the same Nats-Msg-Id is deduplicated as well.
    await nc.jetstream().publish("sb.usage.loan", encode(report), headers={H_MSG_ID: "report-7"})
    info = await nc.jetstream().stream_info(USAGE_STREAM)
    assert info.state.messages == 1
    await audit_trail.wait_for(lambda r: r.kind == "usage")
    await _settled(nc)
    records = await audit_trail.settle()
    assert [r.id for r in records if r.kind == "usage"] == ["usage-report-7"]
    assert _cost(stack).tokens[("loan", "m")] == 40


async def test_reports_survive_a_cost_service_restart(
    make_stack: StackFactory, make_agent: AgentFactory, audit_trail: AuditTrail
) -> None:
    first = await make_stack(services=["tracing", "registry"])
    agent = make_agent("loan")
    await agent.start()
    # No cost service running: reports wait in SB_USAGE.
    ids = [await agent.report_usage(model="m", input_tokens=i) for i in range(1, 6)]
    cost_stack = await make_stack(services=["cost"])
    events = await audit_trail.wait_for(lambda r: r.kind == "usage", count=5)
    assert sorted(e.id for e in events) == sorted(f"usage-{i}" for i in ids)
    assert _cost(cost_stack).tokens[("loan", "m")] == 15
    assert first.services  # the tracing/registry stack kept running throughout
