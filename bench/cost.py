"""Cost service: usage reports ingested durably per second, and authorize + reserve
latency, each against raw NATS in the same run.

Usage::

    python bench/cost.py [--quick] [--reports N] [--no-fsync] [--part all|ingest|authz]
                         [--in-flight 64] [--json]

Identity is on in both parts (the server enforces it as ``signalbox up``
does); publishers, raw baselines and the operator connect as the
``sb-service`` / operator users, agents with credentials of their own.

**Part 1, ingest.** The cost service runs alone in a child process (uvloop),
on SQLite under a temporary data dir (the default store), with the server
fsyncing every JetStream write unless ``--no-fsync``. Usage reports carry a
``Nats-Msg-Id`` and a W3C ``traceparent``, as the SDK sends them.

* **Raw JetStream** (baseline, same run, same messages): ``publish_async`` of
  ``N`` encoded usage reports into a plain file stream, and a durable pull
  consumer fetching batches of 512 and acking every message; timed from the
  first publish until the last ack is confirmed (consumer has nothing pending).
* **Cost service**: the same ``N`` reports published to ``sb.usage.<agent>``
  (8 agents), validated, costed, inserted into SQL in one transaction per
  batch, audited, then acked; timed from the first publish until the
  ``sb-cost-meter`` consumer has nothing pending or unacknowledged.
* **Backlog** rows: the same again with the reports published first, then
  only the consumer side timed (raw: the pull consumer acking; cost: from the
  moment its child process is ready, counting what it had not acked yet).
  These compare the consumers alone; in the first rows the raw publisher and
  consumer share one process (one core) while the cost service has its own.
  **Publish alone** is how fast this machine's server stores (and fsyncs)
  the reports with nobody consuming: an end-to-end row cannot beat it.
* **Backlog, budgets settled**: a day budget is set for each of the 8
  reporting agents, a third backlog is drained, and every batch is settled
  against the budgets in its metering transaction. Checked: the store holds
  exactly ``3N`` reports, and the budgets' spend equals the cost of the third
  backlog exactly (settled once).

Target (issue 6): >= 20,000 usage events/s ingested durably.

**Part 2, authorize + reserve.** Another server (``sync_interval`` not
``always``: no path here waits on a JetStream write except the usage report
of ``model_call``); tracing, policy and registry+cost each in a child process
as ``compose.yaml`` deploys them, the shipped policies plus
``_common.MODEL_USE_PERMIT`` (the shipped set denies model use unless a
permit names who may). Paths:

* ``raw``: a nats-py requester and responder echoing a Decision-sized payload;
* ``authorize``: ``Agent.authorize("use_model", "gpt-4o", estimated_tokens=...)``
  of an agent no budget applies to (policy only: Cedar, breakers, audit);
* ``authorize+reserve``: the same for an agent whose team has a budget: the
  policy service also asks ``sb.cost.reserve``, which reserves the worst case
  on the budget under the SQLite write lock (SQL commit per call);
* ``model_call``: ``async with agent.model_call(...)`` of the budgeted agent:
  authorize + reserve, then the settling usage report (JetStream publish,
  acknowledged).

Each path: warm-up, N sequential requests (latency percentiles and the
sequential rate), M requests with ``--in-flight`` outstanding (throughput),
then a wait until the audit sequencer caught up.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import uvloop
from _common import (
    MODEL_USE_FILE,
    MODEL_USE_PERMIT,
    CpuMeter,
    Request,
    StackProcess,
    Summary,
    Throughput,
    as_dict,
    concurrent,
    embedded_server,
    machine_info,
    mark,
    policy_folder,
    sequential,
    sigterm_unwinds,
    smoke_run,
    summarize,
    table,
)
from calls import audit_settled, enroll_agents, raw_path
from nats.aio.client import Client
from nats.js.api import AckPolicy, ConsumerConfig, StorageType, StreamConfig
from rich.console import Console

from broker import Agent, connect
from broker.codec import encode
from broker.replies import H_MSG_ID, request
from broker.runtime.identity import operator_connect_options, service_connect_options
from broker.runtime.jetstream import USAGE_STREAM
from broker.settings import Settings
from broker.subjects import Subjects
from schemas import (
    AgentManifest,
    BudgetList,
    BudgetStatus,
    CostReport,
    CostReportRequest,
    Decision,
    ListBudgets,
    SetBudget,
    UsageReport,
)
from services.cost.prices import NANOS_PER_USD
from services.cost.service import CONSUMER

TARGET = 20_000.0  # usage events/s
RAW_STREAM = "BENCH_USAGE"
AGENTS = 8
#: Part 2: an agent no budget applies to, and one whose team has a budget.
FREE, BUDGETED, BUDGET_TEAM = "bench-free", "bench-budgeted", "bench-budgeted-team"
MODEL = "gpt-4o"
ESTIMATED_TOKENS, MAX_OUTPUT_TOKENS = 1_000, 500
AUTHZ_PATHS = ("raw", "authorize", "authorize+reserve", "model_call")


@dataclass(frozen=True, slots=True)
class Plan:
    """How much to measure."""

    reports: int
    fsync: bool
    part: str = "all"
    in_flight: int = 64
    warmup: int = 300
    sequential: int = 2_000
    throughput: int = 6_000
    phase_seconds: float = 10.0
    timeout: float = 10.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench/cost.py",
        description="Usage reports ingested durably per second; authorize + reserve latency.",
    )
    parser.add_argument("--quick", action="store_true", help="small run (about a minute)")
    parser.add_argument("--reports", type=int, default=None, help="reports (10k / 200k)")
    parser.add_argument("--no-fsync", action="store_true", help="server without fsync")
    parser.add_argument(
        "--part", choices=("all", "ingest", "authz"), default="all", help="what to measure"
    )
    parser.add_argument(
        "--in-flight", type=int, default=64, help="requests outstanding for throughput (64)"
    )
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args(argv)
    if args.reports is not None and args.reports < 1:
        parser.error("--reports must be at least 1")
    if args.in_flight < 1:
        parser.error("--in-flight must be at least 1")
    return args


def make_plan(args: argparse.Namespace) -> Plan:
    if smoke_run():
        default, (warmup, n_seq, n_tput), phase_s = 2_000, (20, 50, 200), 1.0
    elif args.quick:
        default, (warmup, n_seq, n_tput), phase_s = 10_000, (100, 1_000, 4_000), 3.0
    else:
        default, (warmup, n_seq, n_tput), phase_s = 200_000, (500, 4_000, 15_000), 10.0
    return Plan(
        reports=args.reports or default,
        fsync=not args.no_fsync,
        part=args.part,
        in_flight=args.in_flight,
        warmup=warmup,
        sequential=n_seq,
        throughput=n_tput,
        phase_seconds=phase_s,
    )


# -- part 1: ingest ----------------------------------------------------------------


def usage_reports(n: int, prefix: str) -> list[UsageReport]:
    """``n`` realistic reports over 8 agents, 4 models, 3 projects."""
    models = ("gpt-4o", "gpt-4o-mini", "claude-sonnet-4", "gemini-2.5-flash")
    now = time.time()
    return [
        UsageReport(
            id=f"{prefix}-{i}",
            agent=f"bench-{i % AGENTS}",
            time=now,
            model=models[i % 4],
            provider="bench",
            input_tokens=1200 + i % 500,
            output_tokens=300 + i % 100,
            cached_tokens=i % 200,
            tool_calls=i % 3,
            latency_ms=850.0,
            trace_id=f"{i % 97 + 1:032x}",
            project=f"project-{i % 3}",
        )
        for i in range(n)
    ]


def headers_of(report: UsageReport, i: int) -> dict[str, str]:
    """What the SDK sends with a report: its id, and the trace context of its span."""
    return {H_MSG_ID: report.id, "traceparent": f"00-{report.trace_id}-{i + 1:016x}-01"}


async def _drained(js: Any, stream: str, durable: str, n: int, timeout: float) -> None:
    began = time.perf_counter()
    while True:
        info = await js.consumer_info(stream, durable)
        if info.ack_floor.stream_seq >= n and info.num_pending == 0 and not info.num_ack_pending:
            return
        if time.perf_counter() - began > timeout:
            raise TimeoutError(f"{durable} did not drain: {info}")
        await asyncio.sleep(0.01)


async def raw(settings: Settings, n: int) -> tuple[float, float]:
    """Raw JetStream: publish + pull-consume + ack of ``n`` reports concurrently, then
    the consume + ack alone of a backlog of ``n``; seconds each."""
    nc = await connect(settings.nats_url, name="bench-raw", **service_connect_options(settings))
    try:
        js = nc.jetstream(publish_async_max_pending=1024)
        await js.add_stream(
            StreamConfig(name=RAW_STREAM, subjects=["bench.usage.*"], storage=StorageType.FILE)
        )
        await js.add_consumer(
            RAW_STREAM,
            ConsumerConfig(durable_name="raw", ack_policy=AckPolicy.EXPLICIT, max_ack_pending=4096),
        )
        sub = await js.pull_subscribe_bind("raw", stream=RAW_STREAM)
        payloads = [
            (r.agent, headers_of(r, i), encode(r)) for i, r in enumerate(usage_reports(n, "raw"))
        ]
        acked = 0

        async def consume() -> None:
            nonlocal acked
            while acked < n:
                try:
                    msgs = await sub.fetch(512, timeout=1)
                except TimeoutError:
                    continue
                for msg in msgs:
                    await msg.ack()
                acked += len(msgs)

        began = time.perf_counter()
        consumer = asyncio.ensure_future(consume())
        for agent, headers, data in payloads:
            await js.publish_async(f"bench.usage.{agent}", data, headers=headers)
        await js.publish_async_completed()
        await consumer
        await _drained(js, RAW_STREAM, "raw", n, timeout=600)
        elapsed = time.perf_counter() - began
        # Backlog: publish first, then time the consumer alone.
        for agent, headers, data in payloads:
            again = {**headers, H_MSG_ID: headers[H_MSG_ID] + "-b"}
            await js.publish_async(f"bench.usage.{agent}", data, headers=again)
        await js.publish_async_completed()
        acked = 0
        began = time.perf_counter()
        await consume()
        await _drained(js, RAW_STREAM, "raw", 2 * n, timeout=600)
        drain = time.perf_counter() - began
        await sub.unsubscribe()
        await js.delete_stream(RAW_STREAM)
        return elapsed, drain
    finally:
        await nc.close()


async def publish(settings: Settings, n: int, prefix: str) -> float:
    """Publish ``n`` reports to ``SB_USAGE``; seconds until the stream acknowledged all."""
    nc = await connect(settings.nats_url, name="bench-usage", **service_connect_options(settings))
    try:
        js = nc.jetstream(publish_async_max_pending=1024)
        subjects = Subjects("sb")
        payloads = [
            (subjects.usage(r.agent), headers_of(r, i), encode(r))
            for i, r in enumerate(usage_reports(n, prefix))
        ]
        began = time.perf_counter()
        for subject, headers, data in payloads:
            await js.publish_async(subject, data, headers=headers)
        await js.publish_async_completed()
        return time.perf_counter() - began
    finally:
        await nc.close()


async def metered(settings: Settings, n: int) -> float:
    """Publish ``n`` reports while the cost service runs; seconds until all are
    stored and acked."""
    began = time.perf_counter()
    await publish(settings, n, "live")
    await drained(settings, n)
    return time.perf_counter() - began


async def drained(settings: Settings, total: int) -> None:
    """Wait until the cost consumer has acked ``total`` stream messages."""
    nc = await connect(settings.nats_url, name="bench-wait", **service_connect_options(settings))
    try:
        await _drained(nc.jetstream(), USAGE_STREAM, CONSUMER, total, timeout=900)
    finally:
        await nc.close()


async def acked(settings: Settings) -> int:
    """Stream messages the cost consumer has acked so far."""
    nc = await connect(settings.nats_url, name="bench-wait", **service_connect_options(settings))
    try:
        info = await nc.jetstream().consumer_info(USAGE_STREAM, CONSUMER)
        return int(info.ack_floor.stream_seq)
    finally:
        await nc.close()


async def totals(settings: Settings) -> CostReport:
    """The cost service's totals by agent (``sb.admin.cost.report``)."""
    # An admin endpoint: it answers only into an operator's inbox.
    nc = await connect(settings.nats_url, name="bench-report", **operator_connect_options(settings))
    try:
        return await request(
            nc,
            Subjects("sb").admin("cost", "report"),
            CostReportRequest(by="agent"),
            CostReport,
            timeout=60,
        )
    finally:
        await nc.close()


async def set_budgets(settings: Settings, scope: str, names: list[str]) -> None:
    """A day budget no bench can exhaust for each of ``names`` (as an operator)."""
    nc = await connect(settings.nats_url, name="bench-ops", **operator_connect_options(settings))
    try:
        for name in names:
            await request(
                nc,
                Subjects("sb").admin("budgets", "set"),
                SetBudget(
                    scope=scope,  # type: ignore[arg-type]
                    name=name,
                    window="day",
                    limit_usd=1e9,
                    soft_ratio=1.0,
                    requested_by="bench",
                ),
                BudgetStatus,
                timeout=30,
            )
    finally:
        await nc.close()


async def budget_spend(settings: Settings) -> dict[str, int]:
    """Spend in the current window of every agent budget, nano-dollars by agent."""
    nc = await connect(settings.nats_url, name="bench-ops", **operator_connect_options(settings))
    try:
        listed = await request(
            nc,
            Subjects("sb").admin("budgets", "list"),
            ListBudgets(scope="agent"),
            BudgetList,
            timeout=60,
        )
    finally:
        await nc.close()
    return {b.budget.name: round(b.spent_usd * NANOS_PER_USD) for b in listed.budgets}


def _nanos_by_agent(report: CostReport) -> dict[str, int]:
    return {row.key: round(row.cost_usd * NANOS_PER_USD) for row in report.rows}


@dataclass(frozen=True, slots=True)
class Drain:
    """A backlog drained by a freshly started cost service."""

    reports: int  # drained after its start-up
    seconds: float
    cpu_us_per_report: dict[str, float]  # by process
    publish_seconds: float  # publishing the backlog, nobody consuming


def _backlog(settings: Settings, data_dir: Path, server_pid: int, n: int, prefix: str) -> Drain:
    """Publish ``n`` reports with no cost service running, then start one and time its
    drain."""
    published = uvloop.run(publish(settings, n, prefix))
    before = uvloop.run(acked(settings))
    with StackProcess(settings.nats_url or "", data_dir, services=("cost",)) as child:
        assert child.proc is not None
        cpu = CpuMeter({"cost": child.proc.pid, "nats-server": server_pid})
        cpu.start()
        ready = time.perf_counter()
        done_at_ready = uvloop.run(acked(settings))
        uvloop.run(drained(settings, before + n))
        seconds = time.perf_counter() - ready
        used = cpu.stop()
    drained_n = before + n - done_at_ready
    return Drain(drained_n, seconds, {k: v / drained_n * 1e6 for k, v in used.items()}, published)


def measure_ingest(root: Path, plan: Plan, log: Console) -> dict[str, Any]:
    data_dir = root / "data"
    with embedded_server(
        root / "nats", sync_always=plan.fsync, secrets_dir=data_dir / "secrets"
    ) as server:
        settings = Settings(nats_url=server.url, data_dir=data_dir, log_level="WARNING")
        n = plan.reports
        raw_s, raw_drain_s = uvloop.run(raw(settings, n))
        log.log(
            f"raw JetStream: {n:,} published+consumed in {raw_s:.2f} s, backlog {raw_drain_s:.2f} s"
        )
        with StackProcess(server.url, data_dir, services=("cost",)):
            cost_s = uvloop.run(metered(settings, n))
        log.log(f"cost service: {n:,} published, stored and acked in {cost_s:.2f} s")
        # Backlog: reports pile up while no cost service runs, then one drains them.
        assert server.pid is not None
        plain = _backlog(settings, data_dir, server.pid, n, "backlog")
        log.log(
            f"cost service: backlog of {plain.reports:,} (after start-up) drained in "
            f"{plain.seconds:.2f} s"
        )
        # The same with budgets on every reporting agent: settlement in each batch.
        with StackProcess(server.url, data_dir, services=("cost",)):
            uvloop.run(set_budgets(settings, "agent", [f"bench-{i}" for i in range(AGENTS)]))
            before = _nanos_by_agent(uvloop.run(totals(settings)))
        budgeted = _backlog(settings, data_dir, server.pid, n, "budgeted")
        with StackProcess(server.url, data_dir, services=("cost",)):
            report = uvloop.run(totals(settings))
            spend = uvloop.run(budget_spend(settings))
        after = _nanos_by_agent(report)
        expected_spend = {a: after.get(a, 0) - before.get(a, 0) for a in after}
        log.log(
            f"cost service, budgets settled: backlog of {budgeted.reports:,} drained in "
            f"{budgeted.seconds:.2f} s"
        )
    return {
        "reports": n,
        "raw_per_s": n / raw_s,
        "raw_backlog_per_s": n / raw_drain_s,
        "publish_alone_per_s": n / budgeted.publish_seconds,
        "metered_per_s": n / cost_s,
        "backlog_per_s": plain.reports / plain.seconds,
        "budget_backlog_per_s": budgeted.reports / budgeted.seconds,
        "backlog_cpu_us_per_report": plain.cpu_us_per_report,
        "budget_backlog_cpu_us_per_report": budgeted.cpu_us_per_report,
        "stored": report.total.reports,
        "expected": 3 * n,
        "budget_spend_nanos": spend,
        "budget_expected_nanos": expected_spend,
        "budgets_exact": spend == expected_spend,
        "cost_usd": report.total.cost_usd,
    }


# -- part 2: authorize + reserve ------------------------------------------------------


@dataclass(slots=True)
class PathResult:
    """Figures of one authorize path."""

    latencies: list[float] = field(default_factory=list)
    throughput: Throughput | None = None
    cpu_us_per_req: float = 0.0

    @property
    def latency(self) -> Summary:
        """Percentiles of the sequential samples."""
        return summarize(self.latencies)

    @property
    def sequential_rate(self) -> float:
        """Requests per second, one at a time."""
        return len(self.latencies) / sum(self.latencies)


def authorize_request(agent: Agent, timeout: float, *, reserved: bool) -> Request:
    async def go() -> None:
        decision = await agent.authorize(
            "use_model", MODEL, provider="openai", region="us-east-1",
            estimated_tokens=ESTIMATED_TOKENS, max_output_tokens=MAX_OUTPUT_TOKENS,
            timeout=timeout,
        )  # fmt: skip
        _check(decision, reserved=reserved)

    return go


def model_call_request(agent: Agent, timeout: float) -> Request:
    async def go() -> None:
        async with agent.model_call(
            MODEL, provider="openai", region="us-east-1", estimated_tokens=ESTIMATED_TOKENS,
            max_output_tokens=MAX_OUTPUT_TOKENS, timeout=timeout,
        ) as call:  # fmt: skip
            call.record(input_tokens=900, output_tokens=300)
        assert call.decision is not None
        _check(call.decision, reserved=True)

    return go


def _check(decision: Decision, *, reserved: bool) -> None:
    if decision.effect != "allow":
        raise AssertionError(f"expected allow, got {decision}")
    if bool(decision.reservation_id) != reserved:
        raise AssertionError(f"reservation expected: {reserved}; got {decision}")


@asynccontextmanager
async def authz_agents(url: str, tokens: dict[str, str]) -> AsyncIterator[tuple[Agent, Agent]]:
    """The unbudgeted and the budgeted agent, connected and registered."""
    free = Agent(
        AgentManifest(name=FREE, version="1.0.0", owner="bench", team="bench-free-team"),
        nats_url=url,
        credential=tokens[FREE],
    )
    budgeted = Agent(
        AgentManifest(name=BUDGETED, version="1.0.0", owner="bench", team=BUDGET_TEAM),
        nats_url=url,
        credential=tokens[BUDGETED],
    )
    async with free, budgeted:
        yield free, budgeted


async def until_reserving(agent: Agent, deadline_s: float = 20.0) -> None:
    """Wait until the policy and cost services know the agent, its team and its budget."""
    deadline = time.monotonic() + deadline_s
    while True:
        try:
            decision = await agent.authorize(
                "use_model", MODEL, estimated_tokens=ESTIMATED_TOKENS,
                max_output_tokens=MAX_OUTPUT_TOKENS, timeout=2.0,
            )  # fmt: skip
            if decision.reservation_id:
                return
        except Exception:
            if time.monotonic() > deadline:
                raise
        if time.monotonic() > deadline:
            raise TimeoutError(f"{agent.name}'s budget never applied")
        await asyncio.sleep(0.05)


async def measure_path(
    name: str, go: Request, plan: Plan, nc: Client, cpu: CpuMeter, log: Console
) -> PathResult:
    """Warm-up, then latency (sequential) and throughput (in flight) of one path.

    Slow paths get fewer requests: each phase is capped at about
    ``plan.phase_seconds`` at the rate the warm-up showed (at least 100 requests).
    """
    result = PathResult()
    began = time.perf_counter()
    await sequential(go, plan.warmup)
    rate = plan.warmup / (time.perf_counter() - began)
    cap = max(100, int(rate * plan.phase_seconds))
    await concurrent(go, min(plan.warmup, cap), plan.in_flight)
    await audit_settled(nc)
    result.latencies = await sequential(go, min(plan.sequential, cap))
    await audit_settled(nc)
    n = min(plan.throughput, cap * 4)  # in flight runs faster than one at a time
    cpu.start()
    result.throughput = await concurrent(go, n, plan.in_flight)
    used = cpu.stop()
    await audit_settled(nc)
    result.cpu_us_per_req = sum(used.values()) / n * 1e6
    log.log(
        f"{name}: p50 {statistics.median(result.latencies) * 1e6:,.0f} µs, "
        f"{result.throughput.rate:,.0f} req/s with {plan.in_flight} in flight "
        f"({len(result.latencies):,} sequential, {n:,} in flight)"
    )
    return result


async def run_authz(
    plan: Plan, settings: Settings, pids: dict[str, int], log: Console
) -> dict[str, PathResult]:
    url = settings.nats_url or ""
    service = service_connect_options(settings)
    cpu = CpuMeter({**pids, "bench": os.getpid()})
    payload = encode(Decision(effect="allow", policy_ids=("registered-agents-may-use-models",),
                              reason_code="allowed", policy_version="1"))  # fmt: skip
    async with AsyncExitStack() as stack:
        nc = await connect(url, name="bench-observer", **service)
        stack.push_async_callback(nc.close)
        raw_go, _, _ = await stack.enter_async_context(
            raw_path(url, payload, plan.timeout, service)
        )
        tokens = enroll_agents(
            settings, (FREE, BUDGETED), {FREE: "bench-free-team", BUDGETED: BUDGET_TEAM}
        )
        free, budgeted = await stack.enter_async_context(authz_agents(url, tokens))
        await set_budgets(settings, "team", [BUDGET_TEAM])
        await until_reserving(budgeted)
        await authorize_request(free, plan.timeout, reserved=False)()
        paths = {
            "raw": raw_go,
            "authorize": authorize_request(free, plan.timeout, reserved=False),
            "authorize+reserve": authorize_request(budgeted, plan.timeout, reserved=True),
            "model_call": model_call_request(budgeted, plan.timeout),
        }
        return {
            name: await measure_path(name, paths[name], plan, nc, cpu, log) for name in AUTHZ_PATHS
        }


def measure_authz(root: Path, plan: Plan, log: Console) -> dict[str, PathResult]:
    data_dir = root / "authz"
    # The bench's bursts are not anomalies: no rate breaker may trip on them.
    os.environ["SIGNALBOX_BREAKER_RATE_FACTOR"] = "1000000"
    # Nor may a reservation's wait deny a call: with --in-flight reservations queued behind
    # the store's write lock, a loaded machine can take more than the default 2 s to
    # answer the last of them, and the policy service would deny it (budget_unavailable),
    # failing the run. The bench measures the wait instead, up to its own request timeout.
    os.environ["SIGNALBOX_BUDGET_RESERVE_TIMEOUT"] = str(plan.timeout)
    with embedded_server(
        root / "nats-authz", sync_always=False, secrets_dir=data_dir / "secrets"
    ) as server:
        settings = Settings(nats_url=server.url, data_dir=data_dir, log_level="WARNING")
        assert server.pid is not None
        pids = {"nats-server": server.pid}
        children: list[StackProcess] = []
        policy_dir = policy_folder(root / "policies", {MODEL_USE_FILE: MODEL_USE_PERMIT})
        try:
            for group in (("tracing",), ("policy",), ("registry", "cost")):
                child = StackProcess(server.url, data_dir, policy_dir=policy_dir, services=group)
                children.append(child)
                child.start()
                assert child.proc is not None
                pids["+".join(group)] = child.proc.pid
            return uvloop.run(run_authz(plan, settings, pids, log))
        finally:
            for child in reversed(children):
                child.stop()


# -- output ----------------------------------------------------------------------


def authz_json(results: dict[str, PathResult]) -> dict[str, Any]:
    raw_p50 = results["raw"].latency.p50_us
    return {
        name: {
            "latency_us": as_dict(r.latency),
            "sequential_per_s": r.sequential_rate,
            "in_flight_per_s": r.throughput.rate if r.throughput else 0.0,
            "cpu_us_per_req": r.cpu_us_per_req,
            "p50_vs_raw": r.latency.p50_us / raw_p50,
        }
        for name, r in results.items()
    }


def _cpu(used: dict[str, float]) -> str:
    return f"{used.get('cost', 0):,.0f} + {used.get('nats-server', 0):,.0f}"


def ingest_table(console: Console, plan: Plan, f: dict[str, Any]) -> None:
    exact = f["stored"] == f["expected"]
    rows = [
        ["raw JetStream: publish_async + pull consume + ack", f"{f['raw_per_s']:,.0f}", "", "", ""],
        [
            "cost service: publish + validate, cost, SQL commit, audit, ack",
            f"{f['metered_per_s']:,.0f}",
            f"{f['metered_per_s'] / f['raw_per_s']:.0%}",
            "",
            mark(f["metered_per_s"] >= TARGET),
        ],
        [
            "publish alone (server stores every report, nobody consumes)",
            f"{f['publish_alone_per_s']:,.0f}",
            "",
            "",
            "",
        ],
        [
            "raw JetStream: backlog pull consume + ack",
            f"{f['raw_backlog_per_s']:,.0f}",
            "",
            "",
            "",
        ],
        [
            "cost service: backlog validate, cost, SQL commit, audit, ack",
            f"{f['backlog_per_s']:,.0f}",
            f"{f['backlog_per_s'] / f['raw_backlog_per_s']:.0%}",
            _cpu(f["backlog_cpu_us_per_report"]),
            mark(f["backlog_per_s"] >= TARGET),
        ],
        [
            "cost service: backlog, budgets settled in every batch",
            f"{f['budget_backlog_per_s']:,.0f}",
            f"{f['budget_backlog_per_s'] / f['raw_backlog_per_s']:.0%}",
            _cpu(f["budget_backlog_cpu_us_per_report"]),
            mark(f["budget_backlog_per_s"] >= TARGET),
        ],
        [
            "reports in the store (exactly once)",
            f"{f['stored']:,} / {f['expected']:,}",
            "",
            "",
            mark(exact),
        ],
        [
            "budget spend = cost of the reports metered since (settled once)",
            "exact" if f["budgets_exact"] else "differs",
            "",
            "",
            mark(f["budgets_exact"]),
        ],
    ]
    console.print(
        table(
            f"Usage ingestion, {plan.reports:,} reports per row "
            f"({'fsync every write' if plan.fsync else 'no fsync'}; SQLite store)",
            ["path", "events/s", "vs raw", "CPU µs/event cost + server", f">= {TARGET:,.0f}/s"],
            rows,
            sections_before=(3, 6),
            caption=(
                f"total metered cost of the run: ${f['cost_usd']:,.2f}. CPU: of the cost "
                "service's process (main thread and SQL threads) and of nats-server, per "
                "report drained; 2 cores bound the rate at 2,000,000 / (their sum) at best."
            ),
        )
    )


def authz_table(console: Console, plan: Plan, results: dict[str, PathResult]) -> None:
    raw_p50 = results["raw"].latency.p50_us
    rows = []
    for name, r in results.items():
        lat = r.latency
        rows.append([
            name, f"{lat.p50_us:,.0f}", f"{lat.p99_us:,.0f}", f"{lat.mean_us:,.0f}",
            f"{lat.p50_us / raw_p50:.1f}x", f"{r.sequential_rate:,.0f}",
            f"{r.throughput.rate if r.throughput else 0:,.0f}", f"{r.cpu_us_per_req:,.0f}",
        ])  # fmt: skip
    console.print(
        table(
            "Authorize + reserve (sb.authz, sb.cost.reserve)",
            [
                "path",
                "p50 µs",
                "p99 µs",
                "mean µs",
                "p50 vs raw",
                "seq req/s",
                f"{plan.in_flight} in flight req/s",
                "CPU µs/req",
            ],
            rows,
            caption=(
                f"{MODEL}, {ESTIMATED_TOKENS:,} estimated tokens, {MAX_OUTPUT_TOKENS} max output. "
                f"Latency: up to {plan.sequential:,} sequential requests; throughput: up to "
                f"{plan.throughput:,} requests, {plan.in_flight} in flight (slow paths: about "
                f"{plan.phase_seconds:g} s of requests per phase). CPU: every process "
                "(server, services, bench) per request of the in-flight phase. Tracing, policy "
                "and registry+cost each in a child process; SQLite store; nats-server "
                "sync_interval not 'always'. authorize+reserve commits one SQL transaction "
                "per call (the reservation); model_call adds the settling usage report."
            ),
        )
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sigterm_unwinds()
    plan = make_plan(args)
    log = Console(stderr=True, log_path=False)
    info = machine_info()
    info["identity"] = "on (service user, auth callout)"
    ingest: dict[str, Any] | None = None
    authz: dict[str, PathResult] | None = None
    with tempfile.TemporaryDirectory(prefix="sb-bench-cost-") as tmp:
        if plan.part in ("all", "authz"):
            authz = measure_authz(Path(tmp), plan, log)
        if plan.part in ("all", "ingest"):
            ingest = measure_ingest(Path(tmp), plan, log)
    ok = ingest is None or (ingest["stored"] == ingest["expected"] and ingest["budgets_exact"])
    if args.json:
        out: dict[str, Any] = {"plan": asdict(plan), "machine": info}
        if ingest is not None:
            out["ingest"] = ingest
        if authz is not None:
            out["authorize"] = authz_json(authz)
        print(json.dumps(out, indent=2))
    else:
        console = Console(width=None if sys.stdout.isatty() else 160)
        console.print(table("Machine", ["", ""], [[k, v] for k, v in info.items()], left=2))
        if ingest is not None:
            ingest_table(console, plan, ingest)
        if authz is not None:
            authz_table(console, plan, authz)
    return 0 if ok else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
