"""Chaos under load: kill -9 of services and servers, and what the audit trail and the budgets say.

Usage::

    python bench/chaos.py --quick              # one round of each fault, a few minutes
    python bench/chaos.py                      # every fault, more kills and load
    python bench/chaos.py --no-write-ahead     # also the policy kill with write-ahead off
    python bench/chaos.py --only policy,cost   # some faults only
    python bench/chaos.py --json

Every fault runs against real processes: a ``nats-server`` from the wheel
(identity on, as ``signalbox up`` runs it), each service as its own
``python -m services.<name>`` process (or ``signalbox up`` itself), and two
SDK agents in this process, a caller making calls at a steady rate (open
loop, each logical call with an idempotency key, retried with it after a
failure) to a target that records the call id of every call it executes.

Faults (each repeated ``--kills`` times under load, restarted after a
short pause, as a process supervisor would):

* ``policy``: kill -9 of one of two policy replicas;
* ``server``: ``nats-server`` stopped (SIGTERM) and started again on the
  same store and port, services and agents reconnecting;
* ``up``: kill -9 of the embedded ``nats-server`` of ``signalbox up`` (its
  supervisor restarts it; the server fsyncs every write, as ``up`` does);
* ``cluster``: kill -9 of the node leading the audit intake stream in a
  3-node JetStream cluster (streams and buckets with 3 replicas, two
  policy replicas);
* ``cost``: kill -9 of the cost service while one agent makes budgeted
  model calls (``Agent.model_call``: reserve, then settle by usage report)
  and another reports usage (``Agent.report_usage``).

Afterwards (everything quiet, the audit intake drained), for the calls:
the target's executed call ids against the chained ``decision`` records
(``lost``: executed with no durable decision), idempotency keys executed
twice (``duplicated``), and ``signalbox audit verify --complete --json``
run as a child process: its ``outcome_unknown`` (allowed decisions with no
outcome record) must be exactly the allowed decisions of the trail that
have no ``call`` record, nothing ``undecided``, and the chain intact. For
usage: every report the SDK acknowledged is stored (``lost``), the budget's
spent amount equals the sum of the stored reports charged to it (a report
charged twice would show: ``duplicated``) and stays within the limit.

``recovery`` is, per fault, the time from the fault until calls issued
after it all succeed again on their first attempt (the end of the first
success after the last first-attempt failure; a ``budget_exceeded``
refusal counts as served): it includes the supervisor's pause and the
restarted process's start-up when the fault takes the only instance down.

``--no-write-ahead`` adds the policy kill with ``SIGNALBOX_WRITE_AHEAD=false``
(decisions batched, not stored before the call is forwarded): the before,
where ``lost`` is not zero.

``tests/chaos/test_faults_under_load.py`` runs the same scenarios, CI-sized,
and asserts what the table shows.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shutil
import signal
import sqlite3
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from chaos_load import (
    BRISK,
    FAULT_NAMES,
    STEADY,
    CallRun,
    Fault,
    Op,
    OpenLoad,
    Pace,
    call_run,
    recoveries,
    run_faults,
)
from chaos_plane import (
    CALL_TIMEOUT,
    EST_INPUT,
    MAX_OUTPUT,
    MODEL,
    REPORTER,
    SERVED,
    SPENDER,
    Deployment,
    Log,
    Plane,
    UpProcess,
    quiet,
)

from broker import (
    Agent,
    CallDenied,
    UsageNotRecorded,
)
from broker.replies import request
from broker.runtime.jetstream import AUDIT_INTAKE_STREAM, USAGE_STREAM
from broker.subjects import Subjects
from schemas import BudgetStatus, SetBudget

__all__ = [
    "CallRun",
    "Deployment",
    "Fault",
    "Op",
    "Pace",
    "UpProcess",
    "UsageRun",
    "cluster_node_kill",
    "cost_kill",
    "policy_kill",
    "recoveries",
    "server_restart",
    "up_server_kill",
]


async def policy_kill(
    root: Path, *, kills: int = 3, rate: float = 100.0, write_ahead: bool = True,
    pause: float = 0.3, log: Log = quiet, pace: Pace = STEADY,
) -> CallRun:  # fmt: skip
    """kill -9 of one of two policy replicas (alternately), restarted after ``pause`` s."""
    plane = Deployment(root, env={"write_ahead": str(write_ahead).lower()})
    plane.start_server()
    try:
        await plane.start_services({"tracing": 1, "registry": 1, "policy": 2})

        async def inject(i: int) -> str:
            replica = plane.service("policy", 1 + i % 2)
            pid = replica.kill()
            await asyncio.sleep(pause)
            replica.spawn()
            await replica.ready()
            return f"killed {replica.label} (pid {pid}), restarted"

        return await call_run(
            "policy", plane, inject, kills=kills, rate=rate, write_ahead=write_ahead,
            gap=1.0, log=log, pace=pace,
        )  # fmt: skip
    finally:
        await plane.close()


async def server_restart(
    root: Path, *, kills: int = 2, rate: float = 100.0, write_ahead: bool = True,
    pause: float = 0.3, log: Log = quiet, pace: Pace = STEADY,
) -> CallRun:  # fmt: skip
    """The nats-server stopped (SIGTERM) and started again on the same store and port
    ``pause`` s later; services (one process each) and agents reconnect."""
    plane = Deployment(root, env={"write_ahead": str(write_ahead).lower()})
    plane.start_server()
    try:
        await plane.start_services({"tracing": 1, "registry": 1, "policy": 1})
        server = plane.servers[0]

        async def inject(i: int) -> str:
            pid = server.pid
            await asyncio.to_thread(server.stop)
            await asyncio.sleep(pause)
            # In this thread: the server is tied to the thread that starts it.
            server.restart()
            return f"stopped nats-server (pid {pid}), started pid {server.pid} on the same port"

        return await call_run(
            "server", plane, inject, kills=kills, rate=rate, write_ahead=write_ahead,
            gap=2.0, log=log, pace=pace,
        )  # fmt: skip
    finally:
        await plane.close()


async def up_server_kill(
    root: Path, *, kills: int = 2, rate: float = 100.0, write_ahead: bool = True,
    log: Log = quiet, pace: Pace = STEADY,
) -> CallRun:  # fmt: skip
    """kill -9 of ``signalbox up``'s embedded nats-server; its supervisor restarts it."""
    plane = UpProcess(
        root,
        env={"write_ahead": str(write_ahead).lower(), "server_restart_attempts": str(kills + 1)},
    )
    plane.spawn()
    try:
        await plane.ready()

        async def inject(i: int) -> str:
            pid = plane.server_pid()
            os.kill(pid, signal.SIGKILL)
            await plane.server_restarted(pid)
            return f"killed the embedded nats-server (pid {pid}); up restarted it"

        return await call_run(
            "up", plane, inject, kills=kills, rate=rate, write_ahead=write_ahead,
            gap=2.0, log=log, pace=pace,
        )  # fmt: skip
    finally:
        await plane.close()


async def cluster_node_kill(
    root: Path, *, kills: int = 1, rate: float = 100.0, write_ahead: bool = True,
    pause: float = 1.0, log: Log = quiet, pace: Pace = STEADY,
) -> CallRun:  # fmt: skip
    """kill -9 of one node of a 3-node cluster (R3 streams), restarted after ``pause`` s."""
    plane = Deployment(root, env={"write_ahead": str(write_ahead).lower()}, cluster=True)
    plane.start_server()
    try:
        await plane.start_services({"tracing": 1, "registry": 1, "policy": 2})

        async def inject(i: int) -> str:
            # The node leading the audit intake: every write-ahead waits for it.
            nc = await plane.connect()
            try:
                info = await nc.jetstream().stream_info(AUDIT_INTAKE_STREAM)
            finally:
                await nc.close()
            leader = info.cluster.leader if info.cluster is not None else None
            node = int(leader.rsplit("-", 1)[1]) - 1 if leader else i % 3
            server = plane.servers[node]
            pid = server.pid
            assert pid is not None
            os.kill(pid, signal.SIGKILL)
            await asyncio.to_thread(server.stop)  # reaps it
            await asyncio.sleep(pause)
            server.restart()
            await asyncio.to_thread(plane.wait_cluster_healthy)
            return f"killed node {node + 1} (pid {pid}, leader of {AUDIT_INTAKE_STREAM}), restarted"

        return await call_run(
            "cluster", plane, inject, kills=kills, rate=rate, write_ahead=write_ahead,
            gap=3.0, log=log, pace=pace,
        )  # fmt: skip
    finally:
        await plane.close()


# -- the cost service under budgets and usage ----------------------------------------------


@dataclass
class UsageRun:
    """One cost-service fault run.

    Attributes:
        rate: Offered model calls + usage reports per second.
        model_calls: Every budgeted model call (``key``: its report id once acknowledged).
        reports: Every plain usage report (``key``: its report id).
        faults: Every kill, with its recovery (from the model calls).
        acked: Report ids the SDK acknowledged (model calls' and plain reports').
        stored: Report ids in the cost store, with their cost in nano-dollars.
        limit_nanos: The model calls' budget (agent scope, daily).
        spent_nanos: Its spent amount, over every window.
        windows_over: Windows whose spent amount exceeds the limit.
        charged_nanos: Sum of the stored costs of the budgeted agent's reports.
        open_reserved_nanos: Still reserved (unsettled reservations).
    """

    rate: float
    model_calls: list[Op]
    reports: list[Op]
    faults: list[Fault]
    acked: set[str]
    stored: dict[str, int]
    limit_nanos: int
    spent_nanos: int
    windows_over: int
    charged_nanos: int
    open_reserved_nanos: int

    @property
    def lost(self) -> set[str]:
        """Acknowledged reports not stored."""
        return self.acked - set(self.stored)

    @property
    def double_charged_nanos(self) -> int:
        """Spent beyond the sum of the stored reports (a report charged twice)."""
        return self.spent_nanos - self.charged_nanos

    def outcomes(self) -> Counter[str]:
        """Final outcomes of the model calls."""
        return Counter(o.final for o in self.model_calls)

    def row(self) -> dict[str, Any]:
        """The figures of the table."""
        values = [f.recovery for f in self.faults]
        known = [v for v in values if v is not None]
        return {
            "fault": FAULT_NAMES["cost"], "write_ahead": True, "rate": round(self.rate, 1),
            "ops": len(self.model_calls) + len(self.reports),
            "failed": sum(o.final not in SERVED for o in self.model_calls + self.reports),
            "executed": len(self.acked), "decided": len(self.stored), "lost": len(self.lost),
            "duplicated": self.double_charged_nanos, "outcome_unknown": None,
            "cli_outcome_unknown": None, "cli_misreported": None, "undecided": None,
            "caller_unknown": None,
            "chain_ok": None, "kills": len(self.faults),
            "recovery_median_s": statistics.median(known) if known else None,
            "recovery_worst_s": max(known) if len(known) == len(values) and known else None,
            "limit_usd": self.limit_nanos / 1e9, "spent_usd": self.spent_nanos / 1e9,
            "model_calls": dict(self.outcomes()),
        }  # fmt: skip


async def _metered(nc: Any, timeout: float = 60.0) -> None:
    """Until the cost meter has consumed and acked everything in the usage stream."""
    from services.cost.service import CONSUMER

    js = nc.jetstream()
    deadline = time.monotonic() + timeout
    quiet = 0
    while quiet < 3:
        info = await js.consumer_info(USAGE_STREAM, CONSUMER)
        quiet = quiet + 1 if info.num_pending == 0 and info.num_ack_pending == 0 else 0
        if time.monotonic() > deadline:
            raise RuntimeError(f"usage not metered: {info.num_pending} pending")
        await asyncio.sleep(0.2)


def _cost_rows(data_dir: Path, budget_key: str) -> tuple[dict[str, tuple[str, int]], Any]:
    db = sqlite3.connect(f"file:{data_dir / 'signalbox.db'}?mode=ro", uri=True, timeout=30)
    try:
        rows = {
            rid: (agent, int(cost))
            for agent, rid, cost in db.execute("SELECT agent, id, cost_nanos FROM cost_usage")
        }
        windows = db.execute(
            "SELECT spent_nanos, reserved_nanos FROM cost_budget_window WHERE key = ?",
            (budget_key,),
        ).fetchall()
    finally:
        db.close()
    return rows, windows


async def cost_kill(
    root: Path, *, kills: int = 3, rate: float = 20.0, report_rate: float = 50.0,
    limit_usd: float = 1.5, pause: float = 0.5, log: Log = quiet, pace: Pace = STEADY,
) -> UsageRun:  # fmt: skip
    """kill -9 of the cost service while ``SPENDER`` makes model calls under a daily agent
    budget of ``limit_usd`` (less than the load asks for) and ``REPORTER`` reports usage;
    restarted after ``pause`` s each time."""
    plane = Deployment(root)
    plane.start_server()
    try:
        await plane.start_services({"tracing": 1, "registry": 1, "policy": 1, "cost": 1})
        spender = plane.agent(SPENDER, "chaos-spend")
        reporter = plane.agent(REPORTER, "chaos-report")
        try:
            await spender.start()
            await reporter.start()
            await _set_budget(plane, spender, limit_usd)
            calls, reports, faults = await _spend(
                plane, spender, reporter, kills=kills, rate=rate, report_rate=report_rate,
                pause=pause, log=log, pace=pace,
            )  # fmt: skip
        finally:
            await spender.stop()
            await reporter.stop()
        nc = await plane.connect()
        try:
            await _metered(nc)
        finally:
            await nc.close()
        rows, windows = await asyncio.to_thread(_cost_rows, plane.data_dir, f"agent.{SPENDER}.day")
    finally:
        await plane.close()
    limit = round(limit_usd * 1e9)
    return UsageRun(
        rate=calls.offered_rate + reports.offered_rate,
        model_calls=calls.ops,
        reports=reports.ops,
        faults=faults,
        acked={o.key for o in calls.ops + reports.ops if o.final == "ok"},
        stored={rid: cost for rid, (_, cost) in rows.items()},
        limit_nanos=limit,
        spent_nanos=sum(int(w[0]) for w in windows),
        windows_over=sum(int(w[0]) > limit for w in windows),
        charged_nanos=sum(cost for agent, cost in rows.values() if agent == SPENDER),
        open_reserved_nanos=sum(int(w[1]) for w in windows),
    )


async def _set_budget(plane: Plane, spender: Agent, limit_usd: float) -> None:
    """Set the spender's daily budget; return once the policy service reserves it."""
    operator = await plane.connect("chaos-operator", operator=True)
    try:
        budget = SetBudget(
            scope="agent", name=spender.name, window="day", limit_usd=limit_usd,
            requested_by="chaos",
        )  # fmt: skip
        await request(operator, Subjects("sb").admin("budgets", "set"), budget, BudgetStatus)
    finally:
        await operator.close()
    deadline = time.monotonic() + 30
    while True:
        warm = spender.model_call(MODEL, estimated_tokens=EST_INPUT, max_output_tokens=MAX_OUTPUT)
        with contextlib.suppress(CallDenied):
            async with warm:
                pass  # nothing used: settles at $0
        if warm.decision is not None and warm.decision.reservation_id:
            return
        if time.monotonic() > deadline:
            raise RuntimeError("the policy service never reserved the budget")
        await asyncio.sleep(0.2)


async def _spend(
    plane: Deployment, spender: Agent, reporter: Agent, *, kills: int, rate: float,
    report_rate: float, pause: float, log: Log, pace: Pace,
) -> tuple[OpenLoad, OpenLoad, list[Fault]]:  # fmt: skip
    """Model calls and usage reports under cost-service kills."""
    rng = random.Random(11)
    cost = plane.service("cost")

    async def model_call(op: Op) -> None:
        try:
            async with spender.model_call(
                MODEL, estimated_tokens=EST_INPUT, max_output_tokens=MAX_OUTPUT,
                timeout=CALL_TIMEOUT,
            ) as call:  # fmt: skip
                call.record(input_tokens=EST_INPUT, output_tokens=rng.randint(100, MAX_OUTPUT))
        except UsageNotRecorded as exc:
            op.key = exc.report.id if exc.report is not None else op.key
            raise
        op.key = call.report_id  # acknowledged

    async def report(op: Op) -> None:
        op.key = await reporter.report_usage(
            model=MODEL, input_tokens=rng.randint(10, 500), output_tokens=rng.randint(10, 200)
        )

    async def inject(i: int) -> str:
        pid = cost.kill()
        await asyncio.sleep(pause)
        cost.spawn()
        await cost.ready()
        return f"killed the cost service (pid {pid}), restarted"

    calls = OpenLoad(model_call, rate, name="model")
    reports = OpenLoad(report, report_rate, name="usage")
    faults = await run_faults(
        [calls, reports], inject, kills=kills, warmup=pace.warmup, gap=1.5, tail=pace.tail,
        log=log,
    )  # fmt: skip
    return calls, reports, faults


# -- the bench -----------------------------------------------------------------------------

Scenario = Literal["policy", "server", "up", "cluster", "cost"]
ORDER: tuple[Scenario, ...] = ("policy", "server", "up", "cluster", "cost")


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _rows(results: Sequence[dict[str, Any]]) -> list[list[str]]:
    rows = []
    for r in results:
        dup = r["duplicated"]
        spent = "-"
        if "spent_usd" in r:  # usage: nano-dollars spent beyond the stored reports
            dup = "0" if dup == 0 else f"${dup / 1e9:.6f}"
            spent = f"${r['spent_usd']:.3f} / ${r['limit_usd']:.2f}"
            unknown = "-"
        else:
            unknown = str(r["outcome_unknown"])
            if r["cli_misreported"] or r["cli_outcome_unknown"] != r["outcome_unknown"]:
                unknown += f" (CLI {r['cli_outcome_unknown']}: {r['cli_misreported']} misreported)"
        lost = f"[bold red]{r['lost']}[/]" if r["lost"] else "0"
        recovery = f"{_fmt(r['recovery_median_s'])} / {_fmt(r['recovery_worst_s'])}"
        rows.append([
            r["fault"], "on" if r["write_ahead"] else "[bold]off[/]", _fmt(r["rate"], 0),
            str(r["kills"]), str(r["ops"]), str(r["failed"]), str(r["executed"]),
            str(r["decided"]), lost, str(dup), unknown, spent, recovery,
        ])  # fmt: skip
    return rows


async def run_bench(
    chosen: Sequence[Scenario], *, kills: int, rate: float, before: bool, log: Log,
    pace: Pace = STEADY,
) -> list[dict[str, Any]]:  # fmt: skip
    """Every chosen scenario (and its write-ahead-off variant when ``before``)."""
    results: list[dict[str, Any]] = []
    base = Path(tempfile.mkdtemp(prefix="sb-bench-chaos-"))
    try:
        for name in chosen:
            # Write-ahead changes what a dying policy replica leaves behind; a dying server
            # loses no decision either way (the emitter resends what was not acknowledged).
            variants = [True, False] if before and name == "policy" else [True]
            for write_ahead in variants:
                root = base / f"{name}-{'wal' if write_ahead else 'nowal'}"
                log(f"{FAULT_NAMES[name]}, write-ahead {'on' if write_ahead else 'off'}")
                started = time.monotonic()
                row: dict[str, Any]
                if name == "cost":
                    usage = await cost_kill(
                        root, kills=kills, rate=rate / 5, report_rate=rate / 2,
                        limit_usd=0.2 * kills + 0.2, log=log, pace=pace,
                    )  # fmt: skip
                    row = usage.row()
                else:
                    scenario = {
                        "policy": policy_kill, "server": server_restart, "up": up_server_kill,
                        "cluster": cluster_node_kill,
                    }[name]  # fmt: skip
                    run = await scenario(root, kills=kills, rate=rate, write_ahead=write_ahead,
                                         log=log, pace=pace)  # fmt: skip
                    row = run.row()
                row["seconds"] = round(time.monotonic() - started, 1)
                log(
                    f"  {row['ops']} ops, {row['lost']} lost, {row['duplicated']} duplicated, "
                    f"recovery {_fmt(row['recovery_median_s'])} / "
                    f"{_fmt(row['recovery_worst_s'])} s ({row['seconds']} s)"
                )
                results.append(row)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return results


def main(argv: Sequence[str] | None = None) -> int:
    import uvloop
    from _common import machine_info, sigterm_unwinds, smoke_run, table
    from rich.console import Console

    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="two kills per fault, 100 calls/s")
    parser.add_argument("--kills", type=int, default=None, help="faults per scenario (5)")
    parser.add_argument("--rate", type=float, default=None, help="calls per second (200)")
    parser.add_argument("--only", default="", help=f"comma-separated, of {','.join(ORDER)}")
    parser.add_argument(
        "--no-write-ahead", action="store_true",
        help="also run the policy kill with SIGNALBOX_WRITE_AHEAD=false (the before)",
    )  # fmt: skip
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args(argv)
    # A smoke run: each fault once, under a light load, briefly before and after.
    smoke = smoke_run()
    kills = args.kills or (1 if smoke else 2 if args.quick else 5)
    rate = args.rate or (20.0 if smoke else 100.0 if args.quick else 200.0)
    chosen = [n for n in ORDER if not args.only or n in args.only.split(",")]
    unknown = set(args.only.split(",")) - set(ORDER) - {""}
    if unknown:
        parser.error(f"unknown scenarios {sorted(unknown)}; choose from {', '.join(ORDER)}")
    sigterm_unwinds()
    log = Console(stderr=True, log_path=False)
    bench = run_bench(
        chosen, kills=kills, rate=rate, before=args.no_write_ahead, log=log.log,
        pace=BRISK if smoke else STEADY,
    )  # fmt: skip
    results = uvloop.run(bench)
    if args.json:
        print(json.dumps({"machine": machine_info(), "results": results}, default=str))
        return 0
    columns = [
        "fault", "w-ahead", "load/s", "kills", "ops", "failed", "executed", "decided", "lost",
        "dup.", "outcome unknown", "spent / limit", "recovery s",
    ]  # fmt: skip
    console = Console(width=None if sys.stdout.isatty() else 180)
    console.print(table("Machine", ["", ""], [[k, v] for k, v in machine_info().items()], left=2))
    console.print(table(
        "Faults under load: what every executed call and acknowledged report left behind",
        columns, _rows(results), left=2,
        caption="calls: ops = logical calls (keyed, retried up to 3 times), failed = never "
        "succeeded, executed = call ids the target ran, decided = of those, with an allowed "
        "decision chained, lost = executed with no decision, dup. = keys run twice, "
        "outcome unknown = allowed decisions with no outcome record (the CLI's `audit verify "
        "--complete` count when it differs; misreported = it names calls whose outcome is in "
        "the trail). usage: executed = reports acknowledged, decided = stored, lost = "
        "acknowledged not stored, dup. = budget spend beyond the stored reports, spent = "
        "the model calls' daily budget. "
        "recovery (median / worst of the kills): fault to calls issued after it all served on "
        "their first attempt. load/s: calls (or model calls + usage reports) offered per "
        "second, open loop.",
    ))  # fmt: skip
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
