"""Capability discovery at fleet scale: registry queries versus raw NATS request-reply.

Registers N agents (default 10,000; each with 3 capabilities drawn from 200,
tags, one of 20 teams and 4 regions) through the registry's own endpoint
(``sb.registry.register.<agent>``, 64 registrations in flight), then measures
sequential latency of typical discovery queries against a raw nats-py echo in
the same run. Target: p99 <= 2 ms per query at 10,000 agents.

Then heartbeats (``sb.registry.heartbeat.<agent>``, one instance per agent,
cycling through the fleet): sequential latency, and throughput with 64 in
flight against a raw request-reply with 64 in flight. The registry answers
heartbeats from memory and writes them to SQL in batches
(``SIGNALBOX_HEARTBEAT_FLUSH_INTERVAL``), so the SQL store does not bound them.

    python bench/discovery.py [--quick] [--agents 10000] [--queries 2000] [--json]

The registry runs in a child process on SQLite (its default store) in a
temporary data dir; ``--database-url`` points it at PostgreSQL instead.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, NamedTuple

import nats
import uvloop
from _common import (
    StackProcess,
    Summary,
    Throughput,
    as_dict,
    concurrent,
    embedded_server,
    machine_info,
    mark,
    sequential,
    smoke_run,
    summarize,
    table,
)
from nats.aio.client import Client
from rich.console import Console

from broker.codec import decode, encode
from broker.replies import is_error
from broker.subjects import AGENT_INBOX_ROOT, SERVICE_INBOX, inbox_prefix
from schemas import (
    AgentManifest,
    AgentRecord,
    Capability,
    DiscoverAgents,
    DiscoverResult,
    Heartbeat,
    Registered,
)

TARGET_P99_US = 2_000.0
TEAMS = [f"team-{i:02d}" for i in range(20)]
REGIONS = ["eu-west", "eu-central", "us-east", "ap-south"]
TAGS = ["pii", "pci-dss", "phi", "public", "internal", "gdpr", "sox", "hipaa", "export", "beta"]
CAPS = [f"cap-{i:03d}" for i in range(200)]


def fleet(n: int, seed: int = 7) -> list[AgentManifest]:
    """``n`` deterministic, varied manifests."""
    rnd = random.Random(seed)
    out = []
    for i in range(n):
        caps = tuple(
            Capability(name=c, tags=tuple(rnd.sample(TAGS, rnd.randint(0, 2))))
            for c in rnd.sample(CAPS, 3)
        )
        out.append(
            AgentManifest(
                name=f"agent-{i:05d}",
                version=f"{rnd.randint(1, 3)}.{rnd.randint(0, 9)}.{rnd.randint(0, 20)}",
                owner=f"owner-{i % 50}",
                team=TEAMS[i % len(TEAMS)],
                region=REGIONS[i % len(REGIONS)],
                capabilities=caps,
            )
        )
    return out


def queries() -> dict[str, DiscoverAgents]:
    """The query shapes measured."""
    return {
        "by capability": DiscoverAgents(capability="cap-042"),
        "by tag + team": DiscoverAgents(tag="pii", team="team-07"),
        "by capability + range": DiscoverAgents(capability="cap-117", versions="^2"),
        "by region + healthy": DiscoverAgents(region="eu-west", health="healthy", limit=20),
        "by name": DiscoverAgents(name="agent-04242"),
        "page 3 by owner": DiscoverAgents(owner="owner-7", limit=50),
    }


async def _request(nc: Client, subject: str, body: bytes) -> bytes:
    msg = await nc.request(subject, body, timeout=10)
    if is_error(msg.headers):
        raise RuntimeError(f"{subject}: {msg.data!r}")
    return msg.data


class AgentReplies:
    """Requests as many agents over one connection (the bench's fleet).

    The registry answers an agent-scoped request only into that agent's own
    inbox (``_INBOX.agent.<name>.…``), so each request names its agent's
    inbox as reply; one subscription on ``_INBOX.agent.>`` takes them all.
    """

    def __init__(self, nc: Client) -> None:
        self._nc = nc
        self._waiting: dict[str, asyncio.Future[Any]] = {}
        self._next = 0

    async def start(self) -> None:
        """Subscribe the agents' inboxes."""
        await self._nc.subscribe(f"{AGENT_INBOX_ROOT}.>", cb=self._on_reply)
        await self._nc.flush()

    async def _on_reply(self, msg: Any) -> None:
        waiter = self._waiting.pop(msg.subject, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(msg)

    async def request(self, agent: str, subject: str, body: bytes) -> bytes:
        """``subject`` asked as ``agent``; the reply's body (raises on an error reply)."""
        self._next += 1
        reply = f"{inbox_prefix(agent)}.{self._next}"
        waiter: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiting[reply] = waiter
        try:
            await self._nc.publish(subject, body, reply=reply)
            msg = await asyncio.wait_for(waiter, 10)
        finally:
            self._waiting.pop(reply, None)
        if is_error(msg.headers):
            raise RuntimeError(f"{subject}: {msg.data!r}")
        data: bytes = msg.data
        return data


class Heartbeats(NamedTuple):
    """Heartbeat figures of one run, with the raw baseline measured alongside."""

    raw_latency: Summary
    latency: Summary
    raw: Throughput
    beats: Throughput


async def run(
    url: str, n_agents: int, n_queries: int, n_beats: int, log: Console
) -> tuple[dict[str, Summary], float, Heartbeats]:
    """Register the fleet, measure every query shape and the raw baseline, then heartbeats."""
    nc = await nats.connect(url, inbox_prefix=SERVICE_INBOX)  # reads as a service
    responder = await nats.connect(url)
    fleet_nc = AgentReplies(nc)
    await fleet_nc.start()

    async def echo(msg: Any) -> None:
        await responder.publish(msg.reply, msg.data)

    await responder.subscribe("bench.raw.echo", cb=echo)
    await responder.flush()
    agents = fleet(n_agents)
    manifests = iter(agents)
    log.log(f"registering {n_agents:,} agents (64 in flight)")
    start = time.perf_counter()

    async def register() -> None:
        manifest = next(manifests)
        data = await fleet_nc.request(
            manifest.name, f"sb.registry.register.{manifest.name}", encode(manifest)
        )
        decode(data, Registered)

    done = await concurrent(register, n_agents, 64)
    reg_rate = done.rate
    log.log(f"registered in {time.perf_counter() - start:.1f} s ({reg_rate:,.0f}/s)")

    results: dict[str, Summary] = {}
    payload = b"x" * 64

    async def raw() -> None:
        await _request(nc, "bench.raw.echo", payload)

    shapes: dict[str, Callable[[], Awaitable[None]]] = {"raw request-reply": raw}
    for label, q in queries().items():
        body = encode(q)
        if label.startswith("page 3"):
            # Walk to page 3 once, then time fetching that page.
            first = decode(await _request(nc, "sb.registry.discover", body), DiscoverResult)
            second = DiscoverAgents(owner="owner-7", limit=50, cursor=first.next_cursor)
            page2 = decode(
                await _request(nc, "sb.registry.discover", encode(second)), DiscoverResult
            )
            body = encode(DiscoverAgents(owner="owner-7", limit=50, cursor=page2.next_cursor))

        async def one(body: bytes = body) -> None:
            await _request(nc, "sb.registry.discover", body)

        decode(await _request(nc, "sb.registry.discover", body), DiscoverResult)
        shapes[label] = one
    for label, fn in shapes.items():
        await sequential(fn, max(50, n_queries // 10))  # warm-up
        results[label] = summarize(await sequential(fn, n_queries))
        log.log(f"{label}: p50 {results[label].p50_us:,.0f} µs, p99 {results[label].p99_us:,.0f}")

    # Heartbeats: one instance per agent, cycling through the fleet.
    beats = [
        (
            m.name,
            f"sb.registry.heartbeat.{m.name}",
            encode(Heartbeat(name=m.name, version=m.version, instance=f"bench-{i:05d}")),
        )
        for i, m in enumerate(agents)
    ]
    turn = 0

    async def heartbeat() -> None:
        nonlocal turn
        agent, subject, body = beats[turn % len(beats)]
        turn += 1
        decode(await fleet_nc.request(agent, subject, body), AgentRecord)

    log.log(f"heartbeats: {n_beats:,} with 64 in flight, {n_queries:,} sequential")
    await concurrent(heartbeat, max(500, n_beats // 10), 64)  # warm-up
    figures = Heartbeats(
        raw_latency=results["raw request-reply"],
        latency=summarize(await sequential(heartbeat, n_queries)),
        raw=await concurrent(raw, n_beats, 64),
        beats=await concurrent(heartbeat, n_beats, 64),
    )
    log.log(f"heartbeats: {figures.beats.rate:,.0f}/s (raw {figures.raw.rate:,.0f}/s)")
    await nc.close()
    await responder.close()
    return results, reg_rate, figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer queries (still 10k agents)")
    parser.add_argument("--agents", type=int, default=None, help="agents to register (10,000)")
    parser.add_argument("--queries", type=int, default=None, help="queries per shape")
    parser.add_argument("--beats", type=int, default=None, help="heartbeats in the throughput run")
    parser.add_argument("--database-url", default=None, help="registry store (default SQLite)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args(argv)
    smoke = smoke_run()
    args.agents = args.agents or (200 if smoke else 10_000)
    n_queries = args.queries or (20 if smoke else 300 if args.quick else 2_000)
    n_beats = args.beats or (500 if smoke else 10_000 if args.quick else 50_000)
    log = Console(stderr=True, log_path=False)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    with tempfile.TemporaryDirectory(prefix="sb-bench-discovery-") as tmp:
        root = Path(tmp)
        if args.database_url:
            os.environ["SIGNALBOX_DATABASE_URL"] = args.database_url
        with embedded_server(root / "nats") as server:
            child = StackProcess(server.url, root / "data", services=("registry",))
            child.start()
            try:
                results, reg_rate, beats = uvloop.run(
                    run(server.url, args.agents, n_queries, n_beats, log)
                )
            finally:
                child.stop()
    if args.json:
        print(
            json.dumps(
                {
                    "agents": args.agents,
                    "registrations_per_s": reg_rate,
                    "latency": {k: as_dict(v) for k, v in results.items()},
                    "heartbeats": {
                        "latency": as_dict(beats.latency),
                        "per_s": beats.beats.rate,
                        "raw_per_s": beats.raw.rate,
                        "in_flight": beats.beats.in_flight,
                    },
                    "machine": machine_info(),
                },
                indent=2,
            )
        )
        return 0
    console = Console(width=None if sys.stdout.isatty() else 120)
    console.print(table("Machine", ["", ""], [[k, v] for k, v in machine_info().items()]))
    rows = []
    for label, s in results.items():
        verdict = "" if label.startswith("raw") else mark(s.p99_us <= TARGET_P99_US)
        rows.append([label, f"{s.p50_us:,.0f}", f"{s.p90_us:,.0f}", f"{s.p99_us:,.0f}", verdict])
    store = "PostgreSQL" if args.database_url else "SQLite"
    console.print(
        table(
            f"Discovery at {args.agents:,} agents (registry on {store}, own process)",
            ["query", "p50 µs", "p90 µs", "p99 µs", "p99 <= 2 ms"],
            rows,
            caption=(
                f"{n_queries:,} sequential queries per shape after warm-up; "
                f"registration: {reg_rate:,.0f} agents/s with 64 in flight."
            ),
        )
    )
    beat_rows = [
        [
            "raw request-reply",
            f"{beats.raw_latency.p50_us:,.0f}",
            f"{beats.raw_latency.p99_us:,.0f}",
            f"{beats.raw.rate:,.0f}",
            "1.00",
        ],
        [
            "heartbeat",
            f"{beats.latency.p50_us:,.0f}",
            f"{beats.latency.p99_us:,.0f}",
            f"{beats.beats.rate:,.0f}",
            f"{beats.beats.rate / beats.raw.rate:.2f}" if beats.raw.rate else "-",
        ],
    ]
    console.print(
        table(
            f"Heartbeats at {args.agents:,} agents (registry on {store})",
            ["path", "p50 µs", "p99 µs", "per s (64 in flight)", "x raw"],
            beat_rows,
            caption=(
                f"{n_queries:,} sequential, {n_beats:,} with 64 in flight; answered from "
                "memory, written to SQL in one transaction per flush interval (1 s)."
            ),
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
