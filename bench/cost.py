"""Cost metering: usage reports ingested durably per second, against raw JetStream.

Usage::

    python bench/cost.py [--quick] [--reports N] [--no-fsync] [--json]

Identity is on (the server enforces it as ``signalbox up`` does); the
publisher and the raw baseline connect as the ``sb-service`` user. The cost
service runs alone in a child process (uvloop), on SQLite under a temporary
data dir (the default store), with the server fsyncing every JetStream write
unless ``--no-fsync``.

* **Raw JetStream** (baseline, same run, same messages): ``publish_async`` of
  ``N`` encoded usage reports into a plain file stream, and a durable pull
  consumer fetching batches of 512 and acking every message; timed from the
  first publish until the last ack is confirmed (consumer has nothing pending).
* **Cost service**: the same ``N`` reports published to ``sb.usage.<agent>``
  (8 agents, each with its ``Nats-Msg-Id``), validated, costed, inserted into
  SQL in one transaction per batch, audited, then acked; timed from the first
  publish until the ``sb-cost-meter`` consumer has nothing pending or
  unacknowledged. The store's total is then checked to be exactly ``N``.

* **Backlog** rows: the same again with the reports published first, then
  only the consumer side timed (raw: the pull consumer acking; cost: from the
  moment its child process is ready, counting what it had not acked yet).
  These compare the consumers alone; in the first rows the raw publisher and
  consumer share one process (one core) while the cost service has its own.

Target (issue 6): >= 20,000 usage events/s ingested durably.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import uvloop
from _common import (
    StackProcess,
    embedded_server,
    machine_info,
    mark,
    sigterm_unwinds,
    table,
)
from nats.js.api import AckPolicy, ConsumerConfig, StorageType, StreamConfig
from rich.console import Console

from broker import connect
from broker.codec import encode
from broker.identity import service_connect_options
from broker.jetstream import USAGE_STREAM
from broker.replies import H_MSG_ID, request
from broker.settings import Settings
from broker.subjects import Subjects
from schemas import CostReport, CostReportRequest, UsageReport
from services.cost.service import CONSUMER

TARGET = 20_000.0  # usage events/s
RAW_STREAM = "BENCH_USAGE"
AGENTS = 8


@dataclass(frozen=True, slots=True)
class Plan:
    """How much to measure."""

    reports: int
    fsync: bool


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench/cost.py", description="Usage reports ingested durably per second."
    )
    parser.add_argument("--quick", action="store_true", help="small run (20k reports)")
    parser.add_argument("--reports", type=int, default=None, help="reports (20k / 200k)")
    parser.add_argument("--no-fsync", action="store_true", help="server without fsync")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args(argv)
    if args.reports is not None and args.reports < 1:
        parser.error("--reports must be at least 1")
    return args


def make_plan(args: argparse.Namespace) -> Plan:
    default = 20_000 if args.quick else 200_000
    return Plan(reports=args.reports or default, fsync=not args.no_fsync)


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
            trace_id=f"{i % 97:032x}",
            project=f"project-{i % 3}",
        )
        for i in range(n)
    ]


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
        payloads = [(r.agent, r.id, encode(r)) for r in usage_reports(n, "raw")]
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
        for agent, msg_id, data in payloads:
            await js.publish_async(f"bench.usage.{agent}", data, headers={H_MSG_ID: msg_id})
        await js.publish_async_completed()
        await consumer
        await _drained(js, RAW_STREAM, "raw", n, timeout=600)
        elapsed = time.perf_counter() - began
        # Backlog: publish first, then time the consumer alone.
        backlog = [(a, f"{i}-b", d) for a, i, d in payloads]
        for agent, msg_id, data in backlog:
            await js.publish_async(f"bench.usage.{agent}", data, headers={H_MSG_ID: msg_id})
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
        payloads = [(subjects.usage(r.agent), r.id, encode(r)) for r in usage_reports(n, prefix)]
        began = time.perf_counter()
        for subject, msg_id, data in payloads:
            await js.publish_async(subject, data, headers={H_MSG_ID: msg_id})
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
    """The cost service's totals (``sb.admin.cost.report``)."""
    nc = await connect(settings.nats_url, name="bench-report", **service_connect_options(settings))
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


def measure(root: Path, plan: Plan, log: Console) -> dict[str, Any]:
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
        uvloop.run(publish(settings, n, "backlog"))
        with StackProcess(server.url, data_dir, services=("cost",)):
            ready = time.perf_counter()
            done_at_ready = uvloop.run(acked(settings))
            uvloop.run(drained(settings, 2 * n))
            drain_s = time.perf_counter() - ready
            report = uvloop.run(totals(settings))
        drained_n = 2 * n - done_at_ready
        log.log(
            f"cost service: backlog of {drained_n:,} (after start-up) drained in {drain_s:.2f} s"
        )
    return {
        "reports": n,
        "raw_per_s": n / raw_s,
        "raw_backlog_per_s": n / raw_drain_s,
        "metered_per_s": n / cost_s,
        "backlog_per_s": drained_n / drain_s,
        "stored": report.total.reports,
        "expected": 2 * n,
        "cost_usd": report.total.cost_usd,
    }


def report_tables(console: Console, plan: Plan, info: dict[str, str], f: dict[str, Any]) -> None:
    console.print(table("Machine", ["", ""], [[k, v] for k, v in info.items()], left=2))
    exact = f["stored"] == f["expected"]
    rows = [
        ["raw JetStream: publish_async + pull consume + ack", f"{f['raw_per_s']:,.0f}", "", ""],
        [
            "cost service: publish + validate, cost, SQL commit, audit, ack",
            f"{f['metered_per_s']:,.0f}",
            f"{f['metered_per_s'] / f['raw_per_s']:.0%}",
            mark(f["metered_per_s"] >= TARGET),
        ],
        ["raw JetStream: backlog pull consume + ack", f"{f['raw_backlog_per_s']:,.0f}", "", ""],
        [
            "cost service: backlog validate, cost, SQL commit, audit, ack",
            f"{f['backlog_per_s']:,.0f}",
            f"{f['backlog_per_s'] / f['raw_backlog_per_s']:.0%}",
            mark(f["backlog_per_s"] >= TARGET),
        ],
        [
            "reports in the store (exactly once)",
            f"{f['stored']:,} / {f['expected']:,}",
            "",
            mark(exact),
        ],
    ]
    console.print(
        table(
            f"Usage ingestion, {plan.reports:,} reports "
            f"({'fsync every write' if plan.fsync else 'no fsync'}; SQLite store)",
            ["path", "events/s", "vs raw", f">= {TARGET:,.0f}/s"],
            rows,
            sections_before=(2, 4),
            caption=f"total metered cost of the run: ${f['cost_usd']:,.2f}",
        )
    )



def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sigterm_unwinds()
    plan = make_plan(args)
    log = Console(stderr=True, log_path=False)
    info = machine_info()
    info["identity"] = "on (service user, auth callout)"
    with tempfile.TemporaryDirectory(prefix="sb-bench-cost-") as tmp:
        figures = measure(Path(tmp), plan, log)
    if args.json:
        print(json.dumps({"plan": asdict(plan), "machine": info, **figures}, indent=2))
    else:
        report_tables(Console(width=None if sys.stdout.isatty() else 140), plan, info, figures)
    return 0 if figures["stored"] == figures["expected"] else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
