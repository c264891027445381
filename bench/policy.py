"""Policy decisions: the Cedar decider on one core, and ``sb.authz`` versus raw NATS, in one run.

Usage::

    python bench/policy.py [--quick] [--agents 100] [--in-flight 64] [--in-process] [--json]

Part 1, the decider alone (this process, one core, no I/O): a
:class:`services.policy.cedar.decider.CedarDecider` over the shipped ``policies/``
(plus a permit per caller, and ``_common.MODEL_USE_PERMIT``) and ``--agents``
registered agents (records as the registry mirrors them), entities built
once. Decisions per second:

* ``evaluated``: the memo is off, so Cedar evaluates every request (calls
  rotate over every caller; a ``needs_approval`` answer costs two Cedar
  evaluations, see ``services/policy/cedar/decider.py``);
* ``fleet traffic (memo on)``: every request with a different token
  estimate and the clock advancing one second per 1,000 decisions; the
  memo keys on what the slice's policies can observe of the context
  (``ContextProjection``: the shipped set compares the estimate with 10,000
  and never reads the time), so Cedar runs only for the first request of
  each kind per caller: the policy service's steady state;
* ``memoized``: the same request repeated, answered from the memo.

Cedar itself (cedarpy 4.12, called through its extension with cached
entity and policy handles) costs about 40 µs per evaluation on this class
of machine: that is the floor of the ``evaluated`` rows.

Target (issue 5): >= 20,000 decisions per second on one core, judged on
decisions per CPU-second of this (single-threaded) process; the wall-clock
rate is shown too (lower when other processes compete for the cores).

Part 2, end to end on one embedded ``nats-server`` (``sync_interval`` not
``always``: no decision waits on a JetStream write):

* ``raw``: a nats-py requester and a nats-py responder replying a fixed
  Decision on ``bench.raw.authz`` (two connections);
* ``authz``: ``Agent.authorize("use_model", ...)`` answered by the policy
  service on ``sb.authz.<agent>`` (decided, audited, chained; the shipped
  policies plus ``_common.MODEL_USE_PERMIT``);
* ``authz-raw-client``: a plain nats-py request on ``sb.authz.<agent>``
  (no SDK encode/decode on the caller side).

The services run in one child process (``signalbox up`` shape) unless
``--in-process``. Each round: warm-up, N sequential requests (latency),
M requests with ``--in-flight`` outstanding (throughput), then a wait until
the audit sequencer caught up.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

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
from calls import audit_settled
from nats.aio.client import Client
from nats.aio.msg import Msg
from rich.console import Console

from broker import Agent, connect, encode
from broker.replies import error_from_reply, is_error
from broker.settings import Settings
from schemas import AgentManifest, AgentRecord, AuthzRequest, Capability, Decision
from services.policy.cedar.decider import CedarDecider
from services.policy.cedar.policy_set import CedarPolicies, shipped_policy_dir
from services.policy.decider import AccessRequest, CallRequest, RequestContext, UseRequest

TARGET_DECISIONS = 20_000.0  # per second, one core
P50_REFERENCE = 2.0  # the call path's target (mediated p50 <= 2x raw), shown for reference
AGENT = "bench-agent"
RAW_SUBJECT = "bench.raw.authz"
PATHS = ("raw", "authz", "authz-raw-client")
ASK = AuthzRequest(
    action="use_model",
    resource="gpt-4o",
    provider="openai",
    region="eu-west-1",
    price_per_1k_tokens=0.0025,
    estimated_tokens=1_200,
    data_tags=("pii",),
)


@dataclass(frozen=True, slots=True)
class Plan:
    """How much to measure."""

    agents: int
    decisions: int
    in_flight: int
    rounds: int
    warmup: int
    sequential: int
    throughput: int
    in_process: bool
    timeout: float = 10.0


@dataclass(frozen=True, slots=True)
class DeciderRow:
    """Decisions of one kind, measured on one core."""

    name: str
    decisions: int
    seconds: float
    cpu_seconds: float
    cedar_evaluations: int
    effect: str

    @property
    def rate(self) -> float:
        """Decisions per second (wall clock)."""
        return self.decisions / self.seconds

    @property
    def cpu_rate(self) -> float:
        """Decisions per CPU-second: what one core does."""
        return self.decisions / self.cpu_seconds if self.cpu_seconds > 0 else 0.0

    @property
    def us_per_decision(self) -> float:
        """CPU microseconds per decision."""
        return self.cpu_seconds / self.decisions * 1e6


@dataclass(slots=True)
class PathResult:
    """Latencies and throughputs of one end-to-end path over all rounds."""

    latencies: list[float] = field(default_factory=list)
    throughputs: list[Throughput] = field(default_factory=list)
    cpu_us_per_req: list[float] = field(default_factory=list)

    @property
    def latency(self) -> Summary:
        """Percentiles of every sequential sample."""
        return summarize(self.latencies)

    @property
    def rate(self) -> float:
        """Median throughput, requests per second."""
        return statistics.median(t.rate for t in self.throughputs)

    @property
    def cpu(self) -> float:
        """Median CPU microseconds per request (every process), throughput phase."""
        return statistics.median(self.cpu_us_per_req)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench/policy.py",
        description="Cedar decisions per second on one core; sb.authz vs raw NATS request-reply.",
    )
    parser.add_argument("--quick", action="store_true", help="one short round (under 40 s)")
    parser.add_argument("--agents", type=int, default=100, help="registered agents (100)")
    parser.add_argument(
        "--in-flight", type=int, default=64, help="requests outstanding for throughput (64)"
    )
    parser.add_argument(
        "--in-process", action="store_true", help="run the services in this process's event loop"
    )
    parser.add_argument("--rounds", type=int, default=None, help="rounds (quick 1, default 3)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args(argv)
    if args.agents < 2 or args.in_flight < 1 or (args.rounds is not None and args.rounds < 1):
        parser.error("--agents must be at least 2, --in-flight and --rounds at least 1")
    return args


def make_plan(args: argparse.Namespace) -> Plan:
    rounds, decisions, warmup, n_seq, n_tput = (
        (1, 500, 20, 50, 200)
        if smoke_run()
        else (1, 20_000, 300, 2_000, 6_000)
        if args.quick
        else (3, 100_000, 500, 4_000, 15_000)
    )
    return Plan(
        agents=args.agents,
        decisions=decisions,
        in_flight=args.in_flight,
        rounds=args.rounds or rounds,
        warmup=warmup,
        sequential=n_seq,
        throughput=n_tput,
        in_process=args.in_process,
    )


# -- part 1: the decider -----------------------------------------------------------


def fleet(n: int) -> tuple[list[AgentRecord], AgentRecord]:
    """``n - 1`` callers and one target serving ``score`` (all registered)."""
    callers = [
        AgentRecord(
            manifest=AgentManifest(
                name=f"caller-{i:04d}",
                version="1.0.0",
                owner="bench",
                team=f"team-{i % 10}",
                metadata={"tags": "data-residency:eu"} if i % 2 else {},
            ),
            registered_at=1.0,
        )
        for i in range(n - 1)
    ]
    target = AgentRecord(
        manifest=AgentManifest(
            name="credit-check", version="1.0.0", owner="bench", team="risk",
            capabilities=(Capability(name="score", tags=("pii",)),),
        ),
        registered_at=1.0,
    )  # fmt: skip
    return callers, target


def bench_permits(callers: list[AgentRecord]) -> str:
    """One permit per caller (like a fleet's per-team rules), ids ``caller-NNNN-may-score``."""
    return "".join(
        f'@id("{c.manifest.name}-may-score")\n'
        f'permit (principal == Signalbox::Agent::"{c.manifest.name}", '
        'action == Signalbox::Action::"call", '
        'resource == Signalbox::Capability::"credit-check/score");\n'
        for c in callers
    )


def measure_decider(plan: Plan, log: Console) -> tuple[list[DeciderRow], CedarPolicies]:
    shipped = CedarPolicies.from_dir(shipped_policy_dir())
    callers, target = fleet(plan.agents)
    files = {
        **shipped.files,
        "bench.cedar": bench_permits(callers),
        MODEL_USE_FILE: MODEL_USE_PERMIT,
    }
    policies = CedarPolicies.from_texts(files, shipped.schema_text, label="bench")
    log.log(f"decider: {len(policies.policies)} policies, {plan.agents} agents")
    n = plan.decisions
    now = time.time()

    def calls(tokens: Callable[[int], int], tick: float = 0.0) -> list[AccessRequest]:
        out: list[AccessRequest] = []
        for i in range(n):
            c = callers[i % len(callers)]
            out.append(
                CallRequest(
                    c.manifest.name, "credit-check", "score", c, target,
                    RequestContext(estimated_tokens=tokens(i), time=now + i * tick),
                )
            )  # fmt: skip
        return out

    def uses(tokens: Callable[[int], int]) -> list[AccessRequest]:
        out: list[AccessRequest] = []
        for i in range(n):
            c = callers[i % len(callers)]
            out.append(
                UseRequest(
                    c.manifest.name, c, "use_model", "gpt-4o", provider="openai",
                    region="eu-west-1", price_per_1k_tokens=0.0025,
                    context=RequestContext(estimated_tokens=tokens(i), time=now),
                )
            )  # fmt: skip
        return out

    distinct = lambda i: i % 10_000  # noqa: E731
    cases: list[tuple[str, int, list[AccessRequest]]] = [
        ("call, evaluated", 0, calls(distinct)),
        ("call needing approval, evaluated", 0, calls(lambda i: 10_001 + i)),
        ("use_model, evaluated", 0, uses(distinct)),
        # Fleet traffic: every estimate different, the clock advancing 1 s per 1,000
        # decisions; answers are memoized by what the policies can see of the context.
        ("call, fleet traffic (memo on)", 16_384, calls(lambda i: (i * 7919) % 20_000, 1e-3)),
        ("call, memoized", 16_384, calls(lambda i: 1_200)),
        ("use_model, memoized", 16_384, uses(lambda i: 1_200)),
    ]
    rows = []
    for name, memo, requests in cases:
        decider = CedarDecider(policies, memo_size=memo)
        for r in requests[: len(callers)]:  # entities built once, before timing
            decider.decide(r)
        evaluations = decider.evaluations
        wall, cpu = time.perf_counter(), time.process_time()
        decide = decider.decide
        for r in requests:
            last = decide(r)
        rows.append(
            DeciderRow(
                name=name,
                decisions=len(requests),
                seconds=time.perf_counter() - wall,
                cpu_seconds=time.process_time() - cpu,
                cedar_evaluations=decider.evaluations - evaluations,
                effect=last.effect,
            )
        )
        log.log(f"{name}: {rows[-1].cpu_rate:,.0f} decisions per CPU-second ({last.effect})")
    return rows, policies


# -- part 2: sb.authz end to end ------------------------------------------------------


@asynccontextmanager
async def raw_path(url: str, timeout: float) -> AsyncIterator[Request]:
    """A nats-py responder replying a fixed Decision, and a requester."""
    responder = await connect(url, name="bench-raw-responder")
    requester = await connect(url, name="bench-raw-requester")
    reply = encode(Decision(effect="allow", policy_ids=("x",), reason_code="allowed"))
    body = encode(ASK)
    try:

        async def answer(msg: Msg) -> None:
            await responder.publish(msg.reply, reply)

        await responder.subscribe(RAW_SUBJECT, cb=answer, pending_msgs_limit=1_000_000)
        await responder.flush()

        async def request() -> None:
            await requester.request(RAW_SUBJECT, body, timeout=timeout)

        yield request
    finally:
        await requester.close()
        await responder.close()


def sdk_request(agent: Agent, timeout: float) -> Request:
    async def request() -> None:
        decision = await agent.authorize(
            ASK.action, ASK.resource, provider=ASK.provider, region=ASK.region,
            price_per_1k_tokens=ASK.price_per_1k_tokens,
            estimated_tokens=ASK.estimated_tokens, data_tags=ASK.data_tags, timeout=timeout,
        )  # fmt: skip
        if decision.effect != "allow":
            raise AssertionError(f"expected allow, got {decision}")

    return request


def raw_client_request(nc: Client, subject: str, timeout: float) -> Request:
    body = encode(ASK)

    async def request() -> None:
        msg = await nc.request(subject, body, timeout=timeout)
        if is_error(msg.headers):
            raise error_from_reply(msg.data, msg.headers)

    return request


async def measure_path(
    name: str, request: Request, plan: Plan, nc: Client, cpu: CpuMeter, result: PathResult,
    log: Console,
) -> None:  # fmt: skip
    await sequential(request, plan.warmup)
    await concurrent(request, plan.warmup, plan.in_flight)
    await audit_settled(nc)
    result.latencies += await sequential(request, plan.sequential)
    await audit_settled(nc)
    cpu.start()
    tput = await concurrent(request, plan.throughput, plan.in_flight)
    used = cpu.stop()
    await audit_settled(nc)
    result.throughputs.append(tput)
    result.cpu_us_per_req.append(sum(used.values()) / tput.requests * 1e6)
    p50 = statistics.median(result.latencies) * 1e6
    log.log(f"{name}: p50 {p50:,.0f} µs, {tput.rate:,.0f} req/s")


async def measure_endpoint(
    plan: Plan, settings: Settings, pids: dict[str, int], log: Console
) -> dict[str, PathResult]:
    assert settings.nats_url is not None
    url = settings.nats_url
    cpu = CpuMeter({**pids, "bench": os.getpid()})
    results = {name: PathResult() for name in PATHS}
    async with AsyncExitStack() as stack:
        if plan.in_process:
            from services.runner import Stack

            await stack.enter_async_context(Stack(settings))
        nc = await connect(url, name="bench-observer")
        stack.push_async_callback(nc.close)
        raw = await stack.enter_async_context(raw_path(url, plan.timeout))
        agent = Agent(
            AgentManifest(name=AGENT, version="1.0.0", owner="bench", team="bench"),
            nats_url=url,
            heartbeat_interval=0,
        )
        await stack.enter_async_context(agent)
        requests = {
            "raw": raw,
            "authz": sdk_request(agent, plan.timeout),
            "authz-raw-client": raw_client_request(
                agent.nc, agent.subjects.authz(AGENT), plan.timeout
            ),
        }
        await requests["authz"]()  # registered and known to policy
        for i in range(plan.rounds):
            log.log(f"round {i + 1} of {plan.rounds}")
            for name in PATHS:
                await measure_path(name, requests[name], plan, nc, cpu, results[name], log)
    return results


# -- output ----------------------------------------------------------------------


def report_json(
    plan: Plan,
    info: dict[str, str],
    rows: list[DeciderRow],
    results: dict[str, PathResult],
    policies: CedarPolicies,
) -> str:
    raw = results["raw"]
    return json.dumps(
        {
            "machine": info,
            "plan": as_dict(plan),
            "policy_set": {"version": policies.version, "policies": len(policies.policies)},
            "decider": [
                {
                    **as_dict(r),
                    "per_second": r.rate,
                    "per_cpu_second": r.cpu_rate,
                    "cpu_us_per_decision": r.us_per_decision,
                }
                for r in rows
            ],
            "endpoint": {
                name: {
                    "latency_us": as_dict(res.latency),
                    "req_per_s": res.rate,
                    "cpu_us_per_req": res.cpu,
                    "p50_ratio_to_raw": res.latency.p50_us / raw.latency.p50_us,
                    "throughput_ratio_to_raw": res.rate / raw.rate,
                }
                for name, res in results.items()
            },
            "targets": {"decisions_per_s_min": TARGET_DECISIONS},
        },
        indent=2,
    )


def report_tables(
    console: Console,
    plan: Plan,
    info: dict[str, str],
    rows: list[DeciderRow],
    results: dict[str, PathResult],
    policies: CedarPolicies,
) -> None:
    console.print(table("Machine", ["", ""], [[k, v] for k, v in info.items()]))
    console.print(
        table(
            "Decisions through the Cedar decider, one core",
            [
                "decisions",
                "effect",
                "per CPU-second",
                "per second (wall)",
                "CPU µs each",
                "Cedar runs",
                "target",
                "",
            ],
            [
                [
                    r.name,
                    r.effect,
                    f"{r.cpu_rate:,.0f}",
                    f"{r.rate:,.0f}",
                    f"{r.us_per_decision:,.1f}",
                    f"{r.cedar_evaluations:,}",
                    f">= {TARGET_DECISIONS:,.0f}",
                    mark(r.cpu_rate >= TARGET_DECISIONS),
                ]
                for r in rows
            ],
            left=2,
            caption=(
                f"Policy set {policies.version}: {len(policies.policies)} policies (the shipped "
                f"set, one permit per caller and one for model use), {plan.agents} agents, "
                f"{plan.decisions:,} decisions per row, entities built before timing. "
                "'evaluated': memo off, Cedar "
                "runs for every decision; 'fleet traffic': distinct estimates and times, memo on; "
                "'memoized': the same request again."
            ),
        )
    )
    raw = results["raw"]
    console.print(
        table(
            "sb.authz vs raw NATS request-reply",
            [
                "path",
                "p50 µs",
                "p90 µs",
                "p99 µs",
                "mean µs",
                "req/s",
                "CPU µs/req",
                "p50 / raw",
                "req/s / raw",
            ],
            [
                [
                    name,
                    f"{res.latency.p50_us:,.0f}",
                    f"{res.latency.p90_us:,.0f}",
                    f"{res.latency.p99_us:,.0f}",
                    f"{res.latency.mean_us:,.0f}",
                    f"{res.rate:,.0f}",
                    f"{res.cpu:,.0f}",
                    f"{res.latency.p50_us / raw.latency.p50_us:.2f}x",
                    f"{res.rate / raw.rate:.2f}x",
                ]
                for name, res in results.items()
            ],
            caption=(
                f"{plan.rounds} round(s): {plan.sequential:,} sequential requests (latency), "
                f"{plan.throughput:,} with {plan.in_flight} in flight (throughput). Services "
                f"{'in this process' if plan.in_process else 'in one child process'}, uvloop. "
                "Every authz decision is audited and chained. CPU: every process (nats-server, "
                f"services, bench). Reference: the call path's target is p50 <= "
                f"{P50_REFERENCE:.0f}x raw."
            ),
        )
    )


# -- entry point -----------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sigterm_unwinds()
    plan = make_plan(args)
    log = Console(stderr=True, log_path=False)
    info = machine_info()
    rows, policies = measure_decider(plan, log)
    with tempfile.TemporaryDirectory(prefix="sb-bench-policy-") as tmp:
        root = Path(tmp)
        with embedded_server(root / "nats", sync_always=False) as server:
            policy_dir = policy_folder(root / "policies", {MODEL_USE_FILE: MODEL_USE_PERMIT})
            settings = Settings(
                nats_url=server.url, data_dir=root / "data", policy_dir=policy_dir,
                log_level="WARNING",
            )  # fmt: skip
            assert server.pid is not None
            pids = {"nats-server": server.pid}
            child: StackProcess | None = None
            try:
                if not plan.in_process:
                    log.log("starting the services in a child process")
                    child = StackProcess(server.url, settings.data_dir, policy_dir=policy_dir)
                    child.start()
                    assert child.proc is not None
                    pids["services"] = child.proc.pid
                results = uvloop.run(measure_endpoint(plan, settings, pids, log))
            finally:
                if child is not None:
                    child.stop()
    if args.json:
        print(report_json(plan, info, rows, results, policies))
    else:
        report_tables(
            Console(width=None if sys.stdout.isatty() else 150), plan, info, rows, results,
            policies,
        )  # fmt: skip
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
