"""Cost service: usage reports are validated, stored and costed once, audited, never spoofed."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING, Any

import nats
import nats.errors
import pytest
from nats.aio.client import Client
from support import cost_of, eventually

from broker import Agent
from broker.codec import encode
from broker.replies import H_MSG_ID
from broker.runtime.identity import operator_connect_options, service_connect_options
from broker.runtime.jetstream import USAGE_STREAM
from broker.settings import Settings
from schemas import CostReport, UsageReport
from services.cost.prices import NANOS_PER_USD, load_prices
from services.cost.service import CONSUMER, CostService
from services.runner import Stack

if TYPE_CHECKING:
    from support import AgentFactory, AuditTrail, StackFactory


@pytest.fixture
async def nc(settings: Settings) -> AsyncIterator[Client]:
    conn = await nats.connect(settings.nats_url or "", **service_connect_options(settings))
    yield conn
    await conn.close()


@pytest.fixture
async def metered(make_stack: StackFactory, make_agent: AgentFactory) -> tuple[Stack, Agent]:
    stack = await make_stack(services=["tracing", "registry", "cost"])
    agent = make_agent("loan", team="lending", projects=("loans", "p1"))
    await agent.start()
    await _knows_team(cost_of(stack), "loan")
    return stack, agent


async def _knows_team(service: CostService, agent: str) -> None:
    """Wait until the cost service's ``sb_agents`` mirror has ``agent``."""
    await eventually(lambda: service._team(agent) != "", f"the team of {agent}")


async def _report(service: CostService, by: str = "agent", **kw: Any) -> CostReport:
    return await asyncio.to_thread(service.store.report, by, kw.get("since"), kw.get("until"))  # type: ignore[arg-type]


async def _stored(service: CostService, count: int) -> CostReport:
    """Wait until ``count`` reports are stored; returns the report by agent."""
    holder: list[CostReport] = []

    async def check() -> bool:
        holder[:] = [await _report(service)]
        return holder[0].total.reports >= count

    await eventually(check, f"{count} stored reports")
    return holder[0]


async def _settled(nc: Client) -> None:
    """Wait until the cost consumer has nothing pending or unacknowledged."""

    async def check() -> bool:
        info = await nc.jetstream().consumer_info(USAGE_STREAM, CONSUMER)
        return info.num_pending == 0 and info.num_ack_pending == 0

    await eventually(check, "the cost consumer to settle")


def _by_key(report: CostReport) -> dict[str, Any]:
    return {row.key: row for row in report.rows}


async def test_reported_usage_is_stored_costed_charged_to_the_team_and_audited(
    metered: tuple[Stack, Agent], audit_trail: AuditTrail
) -> None:
    stack, agent = metered
    report_id = await agent.report_usage(
        model="gpt-4o-2024-08-06",
        provider="openai",
        input_tokens=1_000_000,
        output_tokens=100_000,
        cached_tokens=200_000,
        tool_calls=3,
        latency_ms=812.5,
        project="loans",
        trace_id="t-1",
        on_behalf_of=("planner",),
    )
    [event] = await audit_trail.wait_for(lambda r: r.kind == "usage")
    assert event.id == f"usage-loan-{report_id}"
    assert event.actor == "loan" and event.subject == "sb.usage.loan"
    assert event.data["model"] == "gpt-4o-2024-08-06"
    assert event.data["team"] == "lending"
    # A bound project is charged; a delegation without a signed chain is not.
    assert event.data["charged_project"] == "loans"
    assert event.data["charged_on_behalf_of"] == []
    assert event.data["dropped_on_behalf_of"] == "planner"
    assert event.data["priced_by_fallback"] is False
    assert event.data["source"] == "agent"  # self-reported, labelled as such
    # 800k uncached at $2.50 + 200k cached at $1.25 + 100k out at $10 = $3.25
    assert event.data["cost_nanos"] == 3_250_000_000
    by_team = await _report(cost_of(stack), "team")
    [row] = by_team.rows
    assert row.key == "lending" and row.reports == 1
    assert row.cost_usd == pytest.approx(3.25)
    assert (row.input_tokens, row.output_tokens, row.cached_tokens, row.tool_calls) == (
        1_000_000,
        100_000,
        200_000,
        3,
    )
    assert by_team.total == row.__class__(**{**_fields(row), "key": ""})
    assert by_team.prices_as_of == load_prices().as_of


def _fields(row: Any) -> dict[str, Any]:
    return {f: getattr(row, f) for f in row.__struct_fields__}


async def test_an_unknown_model_is_priced_by_the_fallback_and_flagged(
    metered: tuple[Stack, Agent],
) -> None:
    stack, agent = metered
    await agent.report_usage(model="my-own-llm", input_tokens=1_000_000)
    await agent.report_usage(model="gpt-4o", input_tokens=1_000_000)
    report = await _stored(cost_of(stack), 2)
    by_model = _by_key(await _report(cost_of(stack), "model"))
    fallback = load_prices().fallback
    assert by_model["my-own-llm"].fallback_priced == 1
    assert by_model["my-own-llm"].cost_usd == pytest.approx(fallback.input / 10**6)
    assert by_model["gpt-4o"].fallback_priced == 0
    assert report.total.fallback_priced == 1


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
    info = await nc.jetstream().consumer_info(USAGE_STREAM, CONSUMER)
    assert info.num_redelivered == 0  # terminated, not left to redeliver
    assert (await _report(cost_of(stack))).total.reports == 0
    assert cost_of(stack).rejected["invalid_input"] == 1
    # The agent's honest reports still count.
    await agent.report_usage(model="m", input_tokens=5)
    report = await _stored(cost_of(stack), 1)
    assert [(r.key, r.input_tokens) for r in report.rows] == [("loan", 5)]


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
    assert cost_of(stack).rejected["schema_error"] == 2
    assert (await _report(cost_of(stack))).total.reports == 0


async def test_a_report_sent_twice_is_stored_and_counted_once(
    metered: tuple[Stack, Agent], audit_trail: AuditTrail, nc: Client
) -> None:
    stack, agent = metered
    report = UsageReport(id="report-7", agent="loan", time=time.time(), model="m", input_tokens=40)
    assert await agent.report_usage(report) == "report-7"
    assert await agent.report_usage(report) == "report-7"  # a retry after a lost ack
    # A raw publish with the same Nats-Msg-Id is deduplicated by the stream.
    js = nc.jetstream()
    await js.publish("sb.usage.loan", encode(report), headers={H_MSG_ID: "report-7"})
    assert (await js.stream_info(USAGE_STREAM)).state.messages == 1
    # A copy the stream does not catch (another message id, as after its
    # duplicate window) is caught by the store's key (agent, report id).
    await js.publish("sb.usage.loan", encode(report), headers={H_MSG_ID: "report-7-late"})
    assert (await js.stream_info(USAGE_STREAM)).state.messages == 2
    await _settled(nc)
    report_now = await _report(cost_of(stack))
    assert [(r.key, r.reports, r.input_tokens) for r in report_now.rows] == [("loan", 1, 40)]
    records = await audit_trail.settle()
    assert [r.id for r in records if r.kind == "usage"] == ["usage-loan-report-7"]


async def test_the_report_endpoint_is_for_operators_and_validates_its_range(
    metered: tuple[Stack, Agent], nc: Client
) -> None:
    from broker.errors import InvalidInput, SchemaError
    from broker.replies import request
    from schemas import CostReportRequest

    stack, agent = metered
    await agent.report_usage(model="gpt-4o", input_tokens=10, project="p1")
    await _stored(cost_of(stack), 1)
    subject = "sb.admin.cost.report"
    # Answered only into an operator's reply space: a service's inbox is refused.
    await nc.publish(subject, encode(CostReportRequest(by="project")), reply=nc.new_inbox())
    await eventually(lambda: cost_of(stack).rejected["invalid_reply_subject"] == 1, "the refusal")
    await nc.close()
    options = operator_connect_options(stack.settings)
    nc = await nats.connect(stack.settings.nats_url or "", **options)
    got = await request(nc, subject, CostReportRequest(by="project"), CostReport, timeout=5)
    assert [r.key for r in got.rows] == ["p1"]
    with pytest.raises(InvalidInput, match="until"):
        await request(nc, subject, CostReportRequest(since=10.0, until=5.0), CostReport, timeout=5)
    with pytest.raises(SchemaError):
        await request(
            nc, subject, b'{"type": "cost_report_request.v1", "by": "x"}', CostReport, timeout=5
        )
    # An agent may not ask: the server refuses it the admin subject.
    with pytest.raises(Exception):  # noqa: B017 - the permission error's type is nats-py's
        await agent.nc.request(subject, encode(CostReportRequest()), timeout=1)


def _usage(agent: str, i: int, **kw: Any) -> UsageReport:
    return UsageReport(id=f"{agent}-{i}", agent=agent, time=kw.pop("at", time.time()), **kw)


async def _publish(js: Any, reports: Sequence[UsageReport]) -> None:
    for r in reports:
        await js.publish(f"sb.usage.{r.agent}", encode(r), headers={H_MSG_ID: r.id})


async def test_metering_end_to_end_on_sqlite_and_postgresql(
    database_url: str,
    settings: Settings,
    make_stack: StackFactory,
    make_agent: AgentFactory,
    nc: Client,
) -> None:
    await make_stack(services=["tracing", "registry"])
    bound = (("loan", "lending", ("alpha",)), ("fraud", "risk", ("alpha", "beta")))
    for name, team, projects in bound:
        await make_agent(name, team=team, projects=projects).start()
    cost = await make_stack(services=["cost"], database_url=database_url)
    service = cost_of(cost)
    assert service.store._postgres == database_url.startswith("postgresql")
    await _knows_team(service, "fraud")
    day = 86_400 * 20_000  # a fixed day, so hour/day buckets are known
    reports = [
        _usage(
            "loan",
            i,
            model="gpt-4o",
            input_tokens=1000,
            output_tokens=100,
            project="alpha",
            at=day + 3600 * (i % 2),
        )
        for i in range(30)
    ] + [
        _usage(
            "fraud",
            i,
            model="claude-3-5-haiku",
            input_tokens=500,
            output_tokens=50,
            tool_calls=1,
            project="beta" if i % 3 else "alpha",
            at=day + 86_400,
        )
        for i in range(21)
    ]
    await _publish(nc.jetstream(), reports)
    await _stored(service, len(reports))
    gpt = (1000 * 2.5 + 100 * 10) / 1e6
    haiku = (500 * 0.8 + 50 * 4) / 1e6
    by_team = _by_key(await _report(service, "team"))
    assert by_team["lending"].reports == 30 and by_team["risk"].reports == 21
    assert by_team["lending"].cost_usd == pytest.approx(30 * gpt)
    assert by_team["risk"].cost_usd == pytest.approx(21 * haiku)
    by_project = _by_key(await _report(service, "project"))
    assert by_project["alpha"].reports == 30 + 7 and by_project["beta"].reports == 14
    by_model = _by_key(await _report(service, "model"))
    assert by_model["claude-3-5-haiku"].tool_calls == 21
    by_hour = _by_key(await _report(service, "hour"))
    assert {k: r.reports for k, r in by_hour.items()} == {
        str(day): 15,
        str(day + 3600): 15,
        str(day + 86_400): 21,
    }
    by_day = _by_key(await _report(service, "day"))
    assert {k: r.reports for k, r in by_day.items()} == {str(day): 30, str(day + 86_400): 21}
    # A time window: the second day only.
    window = await _report(service, "agent", since=day + 86_400, until=day + 2 * 86_400)
    assert [(r.key, r.reports) for r in window.rows] == [("fraud", 21)]
    assert window.total.cost_usd == pytest.approx(21 * haiku)
    # Every report stored once, whatever the batch boundaries were.
    total = await _report(service, "agent")
    assert total.total.reports == 51
    expected_nanos = 30 * round(gpt * NANOS_PER_USD) + 21 * round(haiku * NANOS_PER_USD)
    assert round(total.total.cost_usd * NANOS_PER_USD) == expected_nanos


async def test_a_cost_service_killed_before_acking_restarts_with_exact_totals(
    database_url: str,
    settings: Settings,
    make_stack: StackFactory,
    make_agent: AgentFactory,
    nc: Client,
) -> None:
    """The first batch is committed to SQL, then the service dies before acking
    it; more reports arrive while it is down; a new one gets the batch again
    (redelivered) and the rest, and every report is counted exactly once."""
    await make_stack(services=["tracing", "registry"])
    await make_agent("loan", team="lending").start()
    current = settings.model_copy(update={"database_url": database_url})
    first = CostService(current, batch=16, ack_wait=1.0)
    committed = asyncio.Event()
    release = threading.Event()
    loop = asyncio.get_running_loop()
    await first.start()
    record = first.store.record

    def commit_then_hang(rows: Sequence[dict[str, Any]], budgets: Any = None) -> list[Any]:
        record(rows, budgets)
        loop.call_soon_threadsafe(committed.set)
        release.wait(10)  # "killed" here: committed, never acked
        raise RuntimeError("killed")

    first.store.record = commit_then_hang  # type: ignore[method-assign]
    js = nc.jetstream()
    await _publish(js, [_usage("loan", i, model="gpt-4o", input_tokens=100) for i in range(16)])
    await committed.wait()
    # Killed mid-stream: its connection is gone before it could ack.
    await first.nc.close()
    release.set()
    stored_before_kill = (await _report(first)).total.reports
    assert 1 <= stored_before_kill <= 16
    with contextlib.suppress(nats.errors.ConnectionClosedError):
        await first.stop()  # its connection is already gone
    # More usage while no cost service runs.
    await _publish(js, [_usage("loan", i, model="gpt-4o", input_tokens=100) for i in range(16, 40)])
    second = CostService(current, batch=16, ack_wait=1.0)
    await second.start()
    try:
        await _settled(nc)
        info = await js.consumer_info(USAGE_STREAM, CONSUMER)
        # The first batch was delivered twice: more deliveries than messages.
        assert info.delivered.consumer_seq >= 40 + stored_before_kill
        report = await _report(second)
        assert [(r.key, r.reports, r.input_tokens) for r in report.rows] == [("loan", 40, 4000)]
        assert report.total.cost_usd == pytest.approx(40 * 100 * 2.5 / 1e6)
    finally:
        await second.stop()


async def test_cost_replicas_share_the_stream_and_count_every_report_once(
    database_url: str,
    settings: Settings,
    make_stack: StackFactory,
    make_agent: AgentFactory,
    nc: Client,
) -> None:
    """Scaling out: replicas bind the same durable consumer and store into the same
    database; each report is metered by one of them, and counted once."""
    await make_stack(services=["tracing", "registry"])
    await make_agent("loan", team="lending").start()
    current = settings.model_copy(update={"database_url": database_url})
    replicas = [CostService(current, batch=8), CostService(current, batch=8)]
    try:
        for replica in replicas:
            await replica.start()
            await _knows_team(replica, "loan")
        reports = [
            _usage("loan", i, model="gpt-4o", input_tokens=100, output_tokens=10)
            for i in range(300)
        ]
        await _publish(nc.jetstream(), reports)
        await _settled(nc)
        assert all(r.metered > 0 for r in replicas), [r.metered for r in replicas]
        total = await _report(replicas[0], "team")
        assert total.total.reports == 300
        assert round(total.total.cost_usd * NANOS_PER_USD) == 300 * round(
            (100 * 2.5 + 10 * 10) / 1e6 * NANOS_PER_USD
        )
    finally:
        for replica in replicas:
            await replica.stop()
