"""Raw nats-py request-reply versus the mediated Signalbox call, in one run.

Usage::

    python bench/calls.py [--quick] [--payload 256] [--in-flight 64] [--in-process]
                          [--sync-always] [--no-write-ahead-cost] [--json]

One embedded ``nats-server`` (free port, temp store; ``sync_interval: always``
only with ``--sync-always``, as ``signalbox up`` runs it) serves these paths:

* ``raw``: a nats-py requester and a nats-py responder on ``bench.raw.echo``
  (two connections);
* ``mediated``: ``broker.Agent`` A calls agent B's ``echo`` capability through
  the policy service (registry, policy, tracing and cost all running, every
  call audited and chained);
* ``raw-relay``: the raw requester and responder with a do-nothing nats-py
  relay between them, in a process of its own like the policy service
  (forwarding each request as a request of its own, relaying the reply
  back): the same four network hops as a mediated call and none of its
  work, i.e. the floor of any design in which a mediator relays calls;
* ``raw-forward``: the same relay forwarding each request with the
  requester's own reply subject, so the responder answers the requester
  directly (three hops): the floor of a mediator that stays off the reply path;
* ``mediated-raw-client``: a plain nats-py client requests ``sb.out.A.B.echo``
  (no SDK on the caller side), which separates SDK cost from mediation cost;
* ``mediated-no-write-ahead``: ``mediated`` again, measured after the policy
  service was restarted with ``SIGNALBOX_WRITE_AHEAD=false``: the cost of
  storing each call's decision before forwarding it (group-committed, one
  JetStream write per batch), in the same run (skip: ``--no-write-ahead-cost``).

The services run in a child process (the deployment shape: ``signalbox up``
in one process, agents in another) unless ``--in-process``; both use uvloop.
Each round measures every path: warm-up, N sequential requests (latency
percentiles), then M requests with ``--in-flight`` outstanding (throughput),
then waits for the audit sequencer to catch up so that one path's backlog
does not slow the next. Latency percentiles pool the samples of all rounds;
throughput is the median round. Targets (issue 3): mediated p50 <= 2x raw
p50 and mediated throughput >= 40% of raw.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import uvloop
from _common import (
    CpuMeter,
    RelayProcess,
    Request,
    StackProcess,
    Summary,
    Throughput,
    as_dict,
    concurrent,
    embedded_server,
    machine_info,
    mark,
    relay,
    sequential,
    sigterm_unwinds,
    smoke_run,
    summarize,
    table,
)
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.errors import NotFoundError
from rich.console import Console

from broker import Agent, UnknownTarget, connect
from broker.replies import error_from_reply, is_error, request
from broker.runtime.identity import operator_connect_options, service_connect_options
from broker.runtime.jetstream import AUDIT_INTAKE_STREAM, AUDIT_STREAM
from broker.settings import Settings
from broker.subjects import Subjects, inbox_prefix
from schemas import AgentManifest, RolloutStatus, SetRollout
from services.policy.cedar.policy_set import SCHEMA_FILE, shipped_policy_dir

CALLER, TARGET, CAPABILITY = "A", "B", "echo"
#: Target of the routed path: two versions, a canary route splitting calls 50/50.
ROUTED, ROUTED_VERSIONS = "B2", ("1.0.0", "1.1.0")
RAW_SUBJECT = "bench.raw.echo"
RELAY_SUBJECT = "bench.relay.echo"  # relayed to RAW_SUBJECT by a do-nothing relay
SEQUENCER = "sb-sequencer"  # durable consumer of the tracing service on SB_AUDIT_IN
P50_TARGET = 2.0  # mediated p50 / raw p50 at most
TPUT_TARGET = 0.40  # mediated throughput / raw throughput at least
PATHS = (
    "raw", "raw-relay", "raw-forward", "mediated", "mediated-raw-client", "mediated-routed",
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class Plan:
    """How much to measure."""

    payload: int
    in_flight: int
    rounds: int
    warmup: int
    sequential: int
    throughput: int
    in_process: bool
    one_process: bool = False
    timeout: float = 10.0
    sync_always: bool = False
    write_ahead_cost: bool = True


@dataclass(slots=True)
class Round:
    """One path measured once."""

    latencies: list[float]
    throughput: Throughput
    audit_drain_s: float
    cpu_us_per_req: dict[str, float]  # throughput phase, by process
    cpu_us_per_seq_req: dict[str, float]  # sequential phase, by process


@dataclass(slots=True)
class PathResult:
    """Figures of one path over all rounds."""

    rounds: list[Round] = field(default_factory=list)

    @property
    def latency(self) -> Summary:
        """Percentiles of every sequential sample of every round."""
        return summarize([s for r in self.rounds for s in r.latencies])

    @property
    def median_round(self) -> Round:
        """The round with the median throughput."""
        ordered = sorted(self.rounds, key=lambda r: r.throughput.rate)
        return ordered[(len(ordered) - 1) // 2]

    @property
    def rate(self) -> float:
        """Median throughput, requests per second."""
        return statistics.median(r.throughput.rate for r in self.rounds)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench/calls.py",
        description="Raw nats-py request-reply vs the mediated Signalbox call, in one run.",
    )
    parser.add_argument("--quick", action="store_true", help="one short round (under 30 s)")
    parser.add_argument("--payload", type=int, default=256, help="payload bytes (default 256)")
    parser.add_argument(
        "--in-flight", type=int, default=64, help="requests outstanding for throughput (64)"
    )
    parser.add_argument(
        "--in-process", action="store_true", help="run the services in this process's event loop"
    )
    parser.add_argument(
        "--one-process",
        action="store_true",
        help="run all four services in one child process (default: one per service)",
    )
    parser.add_argument("--rounds", type=int, default=None, help="rounds (quick 1, default 3)")
    parser.add_argument("--sequential", type=int, default=None, help="N per round (latency)")
    parser.add_argument("--requests", type=int, default=None, help="M per round (throughput)")
    parser.add_argument(
        "--sync-always",
        action="store_true",
        help="the server fsyncs every JetStream write (signalbox up's default)",
    )
    parser.add_argument(
        "--no-write-ahead-cost",
        action="store_true",
        help="skip measuring the mediated path again with write-ahead decisions off",
    )
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args(argv)
    for name in ("rounds", "sequential", "requests"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name} must be at least 1")
    if args.payload < 0 or args.in_flight < 1:
        parser.error("--payload must be >= 0 and --in-flight >= 1")
    return args


def make_plan(args: argparse.Namespace) -> Plan:
    rounds, warmup, n_seq, n_tput = (
        (1, 20, 50, 200)
        if smoke_run()
        else (1, 300, 2_000, 8_000)
        if args.quick
        else (3, 500, 4_000, 15_000)
    )
    return Plan(
        payload=args.payload,
        in_flight=args.in_flight,
        rounds=args.rounds or rounds,
        warmup=warmup,
        sequential=args.sequential or n_seq,
        throughput=args.requests or n_tput,
        in_process=args.in_process,
        one_process=args.one_process,
        sync_always=args.sync_always,
        write_ahead_cost=not args.no_write_ahead_cost,
    )


# -- the three paths -------------------------------------------------------------


def _check(msg: Msg, payload: bytes) -> None:
    if is_error(msg.headers):
        raise error_from_reply(msg.data, msg.headers)
    if msg.data != payload:
        raise AssertionError(f"echo returned {len(msg.data)} bytes, not the {len(payload)} sent")


@asynccontextmanager
async def raw_path(
    url: str, payload: bytes, timeout: float, credentials: dict[str, Any]
) -> AsyncIterator[tuple[Request, Request, Request]]:
    """A nats-py responder and a requester, each on its own connection; yields a request
    straight to the responder, one through the relay and one forwarded by it
    (:class:`_common.RelayProcess`)."""
    responder = await connect(url, name="bench-raw-responder", **credentials)
    requester = await connect(url, name="bench-raw-requester", **credentials)
    try:

        async def echo(msg: Msg) -> None:
            await responder.publish(msg.reply, msg.data)

        await responder.subscribe(RAW_SUBJECT, cb=echo, pending_msgs_limit=1_000_000)
        await responder.flush()

        async def request() -> None:
            _check(await requester.request(RAW_SUBJECT, payload, timeout=timeout), payload)

        async def relayed() -> None:
            _check(await requester.request(RELAY_SUBJECT, payload, timeout=timeout), payload)

        async def forwarded() -> None:
            subject = f"{RELAY_SUBJECT}.direct"
            _check(await requester.request(subject, payload, timeout=timeout), payload)

        yield request, relayed, forwarded
    finally:
        await requester.close()
        await responder.close()


@asynccontextmanager
async def agents(url: str, tokens: dict[str, str]) -> AsyncIterator[Agent]:
    """Agent B serving ``echo`` (bytes in, bytes out) and agent A; yields A.

    Each connects with its own credential (identity on, as deployed).
    """
    b = Agent(
        AgentManifest(name=TARGET, version="1.0.0", owner="bench", team="bench"),
        nats_url=url,
        credential=tokens[TARGET],
    )

    @b.capability(CAPABILITY)
    async def echo(payload: bytes) -> bytes:
        return payload

    routed = [
        Agent(
            AgentManifest(name=ROUTED, version=v, owner="bench", team="bench"),
            nats_url=url,
            credential=tokens[ROUTED],
        )
        for v in ROUTED_VERSIONS
    ]
    for version in routed:
        version.capability(CAPABILITY)(echo)
    a = Agent(
        AgentManifest(name=CALLER, version="1.0.0", owner="bench", team="bench"),
        nats_url=url,
        credential=tokens[CALLER],
    )
    async with b, routed[0], routed[1], a:
        yield a


async def set_route(url: str, settings: Settings) -> None:
    """Route half of B2's calls to its canary version, as an operator would."""
    nc = await connect(url, name="bench-operator", **operator_connect_options(settings))
    try:
        await request(
            nc,
            Subjects(settings.subject_prefix).admin("rollout", "set"),
            SetRollout(target=ROUTED, weights={ROUTED_VERSIONS[1]: 50}, stable=ROUTED_VERSIONS[0]),
            RolloutStatus,
            timeout=10,
        )
    finally:
        await nc.close()


async def wait_until_routable(a: Agent, payload: bytes, deadline_s: float = 15.0) -> None:
    """Retry until the policy service's registry cache knows A and B."""
    deadline = time.monotonic() + deadline_s
    while True:
        try:
            await a.call(TARGET, CAPABILITY, payload, returns=bytes, timeout=2.0)
            return
        except UnknownTarget:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)


def sdk_request(a: Agent, payload: bytes, timeout: float, target: str = TARGET) -> Request:
    async def request() -> None:
        out = await a.call(target, CAPABILITY, payload, returns=bytes, timeout=timeout)
        if out != payload:
            raise AssertionError(f"echo returned {len(out)} bytes, not the {len(payload)} sent")

    return request


def raw_client_request(nc: Client, payload: bytes, timeout: float) -> Request:
    subject = f"sb.out.{CALLER}.{TARGET}.{CAPABILITY}"

    async def request() -> None:
        _check(await nc.request(subject, payload, timeout=timeout), payload)

    return request


def enroll_agents(
    settings: Settings, names: tuple[str, ...], teams: dict[str, str] | None = None
) -> dict[str, str]:
    """A credential per agent, issued straight into the registry's store, each agent bound to
    owner ``bench`` and its team in ``teams`` (default ``bench``), as its manifest declares."""
    from schemas import AgentBinding
    from services.registry.credentials import CredentialStore

    store = CredentialStore(settings.resolved_database_url)
    try:
        return {
            name: store.issue(
                name, 3600.0, created_by="bench",
                binding=AgentBinding(
                    agent=name, owner="bench", team=(teams or {}).get(name, "bench")
                ),
            ).token
            for name in names
        }  # fmt: skip
    finally:
        store.close()


# -- measuring -------------------------------------------------------------------


async def audit_settled(nc: Client, timeout: float = 180.0) -> float:
    """Wait until the sequencer has chained every intake event; seconds waited."""
    js = nc.jetstream()
    start = time.perf_counter()
    last = -1
    while time.perf_counter() - start < timeout:
        try:
            info = await js.consumer_info(AUDIT_INTAKE_STREAM, SEQUENCER)
        except NotFoundError:
            return 0.0  # no sequencer: nothing to wait for
        intake = (await js.stream_info(AUDIT_INTAKE_STREAM)).state.last_seq
        # Fully delivered and acked, and nothing new arrived since the last look
        # (an emitter's last publishes may still be on their way).
        if info.num_pending == 0 and info.num_ack_pending == 0 and intake == last:
            return time.perf_counter() - start
        last = intake
        await asyncio.sleep(0.05)
    raise TimeoutError(f"the audit sequencer did not catch up within {timeout:.0f}s")


async def measure_round(
    name: str, request: Request, plan: Plan, nc: Client, cpu: CpuMeter, log: Console
) -> Round:
    await sequential(request, plan.warmup)
    await concurrent(request, plan.warmup, plan.in_flight)
    await audit_settled(nc)
    cpu.start()
    latencies = await sequential(request, plan.sequential)
    used_seq = cpu.stop()
    await audit_settled(nc)
    cpu.start()
    tput = await concurrent(request, plan.throughput, plan.in_flight)
    used = cpu.stop()
    drain = await audit_settled(nc)
    p50 = statistics.median(latencies) * 1e6
    log.log(
        f"{name}: p50 {p50:,.0f} µs, {tput.rate:,.0f} req/s"
        + (f"; audit caught up {drain:.1f} s after the burst" if name != "raw" else "")
    )
    return Round(
        latencies=latencies,
        throughput=tput,
        audit_drain_s=drain,
        cpu_us_per_req={k: v / tput.requests * 1e6 for k, v in used.items()},
        cpu_us_per_seq_req={k: v / len(latencies) * 1e6 for k, v in used_seq.items()},
    )


async def run(
    plan: Plan,
    settings: Settings,
    pids: dict[str, int],
    log: Console,
    paths: tuple[str, ...] = PATHS,
) -> tuple[dict[str, PathResult], int]:
    """Measure ``paths`` ``plan.rounds`` times; returns the figures and the chain length."""
    assert settings.nats_url is not None
    url = settings.nats_url
    payload = bytes(i % 251 for i in range(plan.payload))
    cpu = CpuMeter({**pids, "bench" if not plan.in_process else "bench+services": os.getpid()})
    results = {name: PathResult() for name in paths}
    async with AsyncExitStack() as stack:
        if plan.in_process:
            from services.runner import Stack

            await stack.enter_async_context(Stack(settings))
        service = service_connect_options(settings)
        tokens = enroll_agents(settings, (CALLER, TARGET, ROUTED))
        nc = await connect(url, name="bench-observer", **service)
        stack.push_async_callback(nc.close)
        raw, relayed, forwarded = await stack.enter_async_context(
            raw_path(url, payload, plan.timeout, service)
        )
        if plan.in_process:  # else the relay runs in a child process (see main)
            relay_nc = await connect(url, name="bench-relay", **service)
            stack.push_async_callback(relay_nc.close)
            await relay(relay_nc, RELAY_SUBJECT, RAW_SUBJECT)
            await relay(relay_nc, f"{RELAY_SUBJECT}.direct", RAW_SUBJECT, direct=True)
        a = await stack.enter_async_context(agents(url, tokens))
        await wait_until_routable(a, payload)
        await set_route(url, settings)
        # A plain nats-py client holding A's credential (its private inbox prefix).
        client = await connect(
            url, name="bench-raw-client", token=tokens[CALLER], inbox_prefix=inbox_prefix(CALLER)
        )
        stack.push_async_callback(client.close)
        requests = {
            "raw": raw,
            "raw-relay": relayed,
            "raw-forward": forwarded,
            "mediated": sdk_request(a, payload, plan.timeout),
            "mediated-raw-client": raw_client_request(client, payload, plan.timeout),
            "mediated-routed": sdk_request(a, payload, plan.timeout, ROUTED),
        }
        for i in range(plan.rounds):
            log.log(f"round {i + 1} of {plan.rounds}")
            for name in paths:
                results[name].rounds.append(
                    await measure_round(name, requests[name], plan, nc, cpu, log)
                )
        chained = (await nc.jetstream().stream_info(AUDIT_STREAM)).state.messages
    return results, chained


# -- output ----------------------------------------------------------------------


def ratios(results: dict[str, PathResult]) -> dict[str, dict[str, float]]:
    raw = results["raw"]
    return {
        path: {
            "p50": results[path].latency.p50_us / raw.latency.p50_us,
            "throughput": results[path].rate / raw.rate,
        }
        for path in PATHS[1:]
    }


def verdict(r: dict[str, dict[str, float]]) -> dict[str, bool]:
    return {
        "p50": r["mediated"]["p50"] <= P50_TARGET,
        "throughput": r["mediated"]["throughput"] >= TPUT_TARGET,
    }


def report_json(
    plan: Plan, info: dict[str, str], results: dict[str, PathResult], chained: int
) -> str:
    r = ratios(results)
    return json.dumps(
        {
            "machine": info,
            "plan": as_dict(plan),
            "server": {"sync_interval_always": plan.sync_always},
            "results": {
                name: {
                    "latency_us": as_dict(res.latency),
                    "req_per_s": res.rate,
                    "req_per_s_by_round": [x.throughput.rate for x in res.rounds],
                    "cpu_us_per_req": {
                        "sequential": res.median_round.cpu_us_per_seq_req,
                        "in_flight": res.median_round.cpu_us_per_req,
                    },
                    "audit_drain_s": max(x.audit_drain_s for x in res.rounds),
                }
                for name, res in results.items()
            },
            "ratios": r,
            "targets": {"p50_ratio_max": P50_TARGET, "throughput_ratio_min": TPUT_TARGET},
            "pass": verdict(r),
            "audit_records_chained": chained,
        },
        indent=2,
    )


def report_tables(
    console: Console,
    plan: Plan,
    info: dict[str, str],
    results: dict[str, PathResult],
    chained: int,
) -> None:
    console.print(table("Machine", ["", ""], [[k, v] for k, v in info.items()]))
    where = (
        "in this process"
        if plan.in_process
        else "in one child process"
        if plan.one_process
        else "each in its own process, as compose.yaml deploys them"
    )
    rows = [
        [
            name,
            f"{res.latency.p50_us:,.0f}",
            f"{res.latency.p90_us:,.0f}",
            f"{res.latency.p99_us:,.0f}",
            f"{res.latency.mean_us:,.0f}",
            f"{res.rate:,.0f}",
        ]
        for name, res in results.items()
    ]
    console.print(
        table(
            "Calls: raw nats-py vs mediated",
            ["path", "p50 µs", "p90 µs", "p99 µs", "mean µs", "req/s"],
            rows,
            caption=(
                f"{plan.payload}-byte payloads, {plan.rounds} round(s); latency: "
                f"{plan.sequential:,} sequential requests per round; throughput: "
                f"{plan.throughput:,} requests per round, {plan.in_flight} in flight. "
                f"Services {where}, uvloop everywhere. nats-server sync_interval "
                + ("'always' (fsync every write)." if plan.sync_always else "NOT 'always'.")
                + " Mediated calls wait for their decision's JetStream write (one per "
                "batch) unless 'no-write-ahead'."
            ),
        )
    )
    if "mediated-no-write-ahead" in results:
        on, off = results["mediated"], results["mediated-no-write-ahead"]
        console.print(
            table(
                "Write-ahead decisions: cost (same run)",
                ["mediated", "p50 µs", "p99 µs", "req/s"],
                [
                    ["decisions written ahead", f"{on.latency.p50_us:,.0f}",
                     f"{on.latency.p99_us:,.0f}", f"{on.rate:,.0f}"],
                    ["decisions batched (off)", f"{off.latency.p50_us:,.0f}",
                     f"{off.latency.p99_us:,.0f}", f"{off.rate:,.0f}"],
                    ["cost of write-ahead", f"{on.latency.p50_us - off.latency.p50_us:+,.0f}",
                     f"{on.latency.p99_us - off.latency.p99_us:+,.0f}",
                     f"{on.rate / off.rate - 1:+.1%}"],
                ],
            )
        )  # fmt: skip
    r = ratios(results)
    ok = verdict(r)
    console.print(
        table(
            "Ratios to raw",
            ["", "p50", "target", "", "throughput", "target", ""],
            [
                [
                    "mediated",
                    f"{r['mediated']['p50']:.2f}x",
                    f"<= {P50_TARGET:.1f}x",
                    mark(ok["p50"]),
                    f"{r['mediated']['throughput']:.2f}x",
                    f">= {TPUT_TARGET:.2f}x",
                    mark(ok["throughput"]),
                ],
                [
                    "raw-relay (floor of any relaying mediator)",
                    f"{r['raw-relay']['p50']:.2f}x",
                    "",
                    "",
                    f"{r['raw-relay']['throughput']:.2f}x",
                    "",
                    "",
                ],
                [
                    "raw-forward (floor if replies went straight back)",
                    f"{r['raw-forward']['p50']:.2f}x",
                    "",
                    "",
                    f"{r['raw-forward']['throughput']:.2f}x",
                    "",
                    "",
                ],
                [
                    "mediated-raw-client",
                    f"{r['mediated-raw-client']['p50']:.2f}x",
                    "",
                    "",
                    f"{r['mediated-raw-client']['throughput']:.2f}x",
                    "",
                    "",
                ],
                [
                    "mediated-routed",
                    f"{r['mediated-routed']['p50']:.2f}x",
                    "",
                    "",
                    f"{r['mediated-routed']['throughput']:.2f}x",
                    "",
                    "",
                ],
            ],
        )
    )
    routed, plain = results["mediated-routed"], results["mediated"]
    console.print(
        table(
            "Routing on the call path (canary route 50/50 vs no route)",
            ["", "p50 µs", "p99 µs", "req/s"],
            [
                ["no route", f"{plain.latency.p50_us:,.0f}", f"{plain.latency.p99_us:,.0f}",
                 f"{plain.rate:,.0f}"],
                ["with a route", f"{routed.latency.p50_us:,.0f}",
                 f"{routed.latency.p99_us:,.0f}", f"{routed.rate:,.0f}"],
                ["difference", f"{routed.latency.p50_us - plain.latency.p50_us:+,.0f}",
                 f"{routed.latency.p99_us - plain.latency.p99_us:+,.0f}",
                 f"{routed.rate / plain.rate - 1:+.1%}"],
            ],
        )
    )  # fmt: skip
    procs = list(results["raw"].median_round.cpu_us_per_req)
    drains = {n: max(x.audit_drain_s for x in res.rounds) for n, res in results.items()}
    cpu_rows: list[list[str]] = []
    for phase in ("sequential", "in flight"):
        for name, res in results.items():
            rnd = res.median_round
            used = rnd.cpu_us_per_seq_req if phase == "sequential" else rnd.cpu_us_per_req
            cpu_rows.append(
                [
                    name,
                    phase,
                    *(f"{used.get(p, 0):,.0f}" for p in procs),
                    f"{sum(used.values()):,.0f}",
                ]
            )
    console.print(
        table(
            "CPU per request (µs, by process)",
            ["path", "phase", *procs, "total"],
            cpu_rows,
            sections_before=[len(results)],
            left=2,
            caption=(
                f"Audit records chained: {chained:,}. After each mediated burst the sequencer "
                f"needed up to {drains['mediated']:.1f} s (SDK) / "
                f"{drains['mediated-raw-client']:.1f} s (raw client) to catch up."
            ),
        )
    )


# -- entry point -----------------------------------------------------------------


def write_policies(folder: Path) -> Path:
    """A Cedar policy folder permitting A -> B echo (and nothing else)."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(shipped_policy_dir() / SCHEMA_FILE, folder / SCHEMA_FILE)
    (folder / "bench.cedar").write_text(
        "".join(
            f'@id("bench-echo-{target}")\n'
            f'permit (principal == Signalbox::Agent::"{CALLER}", '
            'action == Signalbox::Action::"call", '
            f'resource == Signalbox::Capability::"{target}/{CAPABILITY}");\n'
            for target in (TARGET, ROUTED)
        )
    )
    return folder


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sigterm_unwinds()
    plan = make_plan(args)
    log = Console(stderr=True, log_path=False)
    info = machine_info()
    results: dict[str, PathResult]
    with tempfile.TemporaryDirectory(prefix="sb-bench-calls-") as tmp:
        root = Path(tmp)
        with embedded_server(
            root / "nats", sync_always=plan.sync_always, secrets_dir=root / "data" / "secrets"
        ) as server:
            policy_dir = write_policies(root / "policies")
            settings = Settings(
                nats_url=server.url,
                data_dir=root / "data",
                policy_dir=policy_dir,
                log_level="WARNING",
            )
            assert server.pid is not None
            pids = {"nats-server": server.pid}
            children: list[StackProcess] = []
            try:
                if not plan.in_process:
                    # Per service, as compose.yaml deploys them (the idle registry
                    # and cost share one); --one-process puts all four together.
                    groups = (
                        [()]
                        if plan.one_process
                        else [("tracing",), ("policy",), ("registry", "cost")]
                    )
                    for group in groups:
                        label = "+".join(group) or "services"
                        log.log(f"starting {label} in a child process")
                        child = StackProcess(
                            server.url, settings.data_dir, policy_dir=policy_dir, services=group
                        )
                        children.append(child)
                        child.start()
                        assert child.proc is not None
                        pids[label] = child.proc.pid
                    relay_child = RelayProcess(
                        server.url, settings.data_dir, RELAY_SUBJECT, RAW_SUBJECT
                    )
                    children.append(relay_child)
                    relay_child.start()
                    assert relay_child.proc is not None
                    pids["relay"] = relay_child.proc.pid
                results, chained = uvloop.run(run(plan, settings, pids, log))
                if plan.write_ahead_cost:
                    # The same path once more, decisions batched instead of written ahead.
                    log.log("restarting the policy service with SIGNALBOX_WRITE_AHEAD=false")
                    off = {"SIGNALBOX_WRITE_AHEAD": "false"}
                    if plan.in_process:
                        settings = settings.model_copy(update={"write_ahead": False})
                    else:
                        old = next(c for c in children if "policy" in c.services or not c.services)
                        old.stop()
                        children.remove(old)
                        child = StackProcess(
                            server.url, settings.data_dir, policy_dir=policy_dir,
                            services=old.services, env=off,
                        )  # fmt: skip
                        children.append(child)
                        child.start()
                        assert child.proc is not None
                        pids["+".join(old.services) or "services"] = child.proc.pid
                    extra, chained = uvloop.run(run(plan, settings, pids, log, paths=("mediated",)))
                    results["mediated-no-write-ahead"] = extra["mediated"]
            finally:
                for child in reversed(children):
                    child.stop()
    if args.json:
        print(report_json(plan, info, results, chained))
    else:
        # Wide enough for the per-process CPU table when piped to a file.
        report_tables(
            Console(width=None if sys.stdout.isatty() else 140), plan, info, results, chained
        )
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
