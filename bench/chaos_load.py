"""The chaos bench's load, faults and findings: open-loop calls with idempotency keys,
faults injected on a schedule, and what the audit trail says (``bench/chaos.py``)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chaos_plane import (
    CALL_RETRIES,
    CALL_TIMEOUT,
    CALLER,
    CAPABILITY,
    ROOT,
    SERVED,
    TARGET,
    Log,
    Plane,
    child_env,
)

from broker import (
    CallContext,
    CallDenied,
    SignalboxError,
)
from broker.replies import H_IDEMPOTENCY_KEY
from broker.runtime.jetstream import AUDIT_INTAKE_STREAM, AUDIT_STREAM
from broker.subjects import Subjects
from schemas import AuditEvent

__all__ = [
    "BRISK",
    "FAULT_NAMES",
    "STEADY",
    "AuditFindings",
    "CallRun",
    "Fault",
    "Op",
    "OpenLoad",
    "Pace",
    "Workload",
    "audit_findings",
    "call_run",
    "outcome_code",
    "read_trail",
    "recoveries",
    "run_faults",
    "settle_audit",
    "until_steady",
    "verify_cli",
]

# -- load ----------------------------------------------------------------------------------


@dataclass
class Op:
    """One logical operation of the load (a call, a model call, a usage report).

    Attributes:
        key: Its idempotency key (calls) or usage report id (usage, once known).
        issued: When it started (monotonic).
        first: Outcome of its first attempt (``ok`` or an error code).
        first_done: When the first attempt ended (monotonic).
        final: Outcome of its last attempt.
        attempts: Attempts made.
        codes: Every attempt's outcome.
    """

    key: str
    issued: float
    first: str = ""
    first_done: float = 0.0
    final: str = ""
    attempts: int = 0
    codes: list[str] = field(default_factory=list)


def outcome_code(exc: BaseException) -> str:
    """``ok``-style code of a failure: the reason code of a denial, the Signalbox error
    code, else the exception's type."""
    if isinstance(exc, CallDenied):
        reason = exc.details.get("reason_code") if isinstance(exc.details, dict) else None
        return str(reason or exc.code)
    if isinstance(exc, SignalboxError):
        return exc.code
    return type(exc).__name__


class OpenLoad:
    """Starts one operation every ``1/rate`` seconds until stopped (open loop: a slow
    or failing plane does not slow the offered load), at most ``max_outstanding`` at once.

    Args:
        attempt: Runs one attempt of operation ``op`` (raises on failure).
        rate: Operations per second.
        retries: Further attempts after a failure whose code ``retry`` accepts.
        retry: Which failure codes are retried (default: all but refusals).
    """

    def __init__(
        self,
        attempt: Callable[[Op], Awaitable[None]],
        rate: float,
        *,
        retries: int = 0,
        retry: Callable[[str], bool] = lambda code: code not in ("denied", "budget_exceeded"),
        max_outstanding: int = 2_000,
        name: str = "op",
    ) -> None:
        self.attempt = attempt
        self.rate = rate
        self.retries = retries
        self.retry = retry
        self.name = name
        self.ops: list[Op] = []
        self.started = 0.0
        self.ended = 0.0
        self._slots = asyncio.Semaphore(max_outstanding)
        self._stop = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._runner: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start issuing."""
        self._runner = asyncio.ensure_future(self._issue())

    async def _issue(self) -> None:
        loop = asyncio.get_running_loop()
        self.started = next_at = time.monotonic()
        n = 0
        while not self._stop.is_set():
            await self._slots.acquire()
            n += 1
            op = Op(key=f"{self.name}-{n}-{os.urandom(4).hex()}", issued=time.monotonic())
            self.ops.append(op)
            task = loop.create_task(self._run(op))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            next_at += 1.0 / self.rate
            delay = next_at - time.monotonic()
            if delay > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), delay)
        self.ended = time.monotonic()

    async def _run(self, op: Op) -> None:
        try:
            while True:
                op.attempts += 1
                try:
                    await self.attempt(op)
                    code = "ok"
                except Exception as exc:
                    code = outcome_code(exc)
                op.codes.append(code)
                if op.attempts == 1:
                    op.first, op.first_done = code, time.monotonic()
                op.final = code
                if code == "ok" or op.attempts > self.retries or not self.retry(code):
                    return
                await asyncio.sleep(0.25)
        finally:
            self._slots.release()

    async def stop(self) -> None:
        """Stop issuing and wait for every operation (its retries included) to end."""
        self._stop.set()
        if self._runner is not None:
            await self._runner
        while self._tasks:
            await asyncio.gather(*list(self._tasks))

    @property
    def offered_rate(self) -> float:
        """Operations started per second."""
        span = self.ended - self.started
        return len(self.ops) / span if span > 0 else 0.0


@dataclass
class Fault:
    """One injected fault: what, and when (monotonic)."""

    what: str
    at: float
    recovery: float | None = None


def recoveries(
    faults: Sequence[Fault], ops: Sequence[Op], end: float, served: frozenset[str] = SERVED
) -> list[float | None]:
    """Per fault: seconds until operations issued after it all succeed again on their first
    attempt (None: not within the fault's window, which ends at the next fault or ``end``)."""
    out: list[float | None] = []
    for i, fault in enumerate(faults):
        until = faults[i + 1].at if i + 1 < len(faults) else end
        # Operations still running when the next fault struck are that fault's.
        done_by = faults[i + 1].at if i + 1 < len(faults) else float("inf")
        window = sorted(
            (o for o in ops if fault.at <= o.issued < until and o.first_done < done_by),
            key=lambda o: o.issued,
        )
        bad = [j for j, o in enumerate(window) if o.first not in served]
        after = window[bad[-1] + 1 :] if bad else window
        out.append(max(0.0, after[0].first_done - fault.at) if after else None)
    return out


async def until_steady(
    load: OpenLoad, since: float, *, quiet: float = 1.0, cap: float = 30.0
) -> None:
    """Until operations issued after ``since`` have been served on their first attempt
    for ``quiet`` seconds of issue time since the last failure (at most ``cap`` s)."""
    deadline = time.monotonic() + cap
    while time.monotonic() < deadline:
        done = [o for o in load.ops if o.issued >= since and o.first]
        last_bad = max((o.issued for o in done if o.first not in SERVED), default=since)
        served = [o.issued for o in done if o.issued > last_bad]
        if served and max(served) - last_bad >= quiet:
            return
        await asyncio.sleep(0.1)


@dataclass(frozen=True, slots=True)
class Pace:
    """How long the load runs around its faults.

    Attributes:
        warmup: Seconds of load before the first fault.
        tail: Seconds of load after the last fault, once served again.
    """

    warmup: float = 1.5
    tail: float = 3.0


#: The bench's pace (and the chaos tests').
STEADY = Pace()
#: A smoke run's (``SIGNALBOX_BENCH_SMOKE``): the least that still puts a fault under load.
BRISK = Pace(warmup=0.5, tail=0.5)


async def run_faults(
    loads: Sequence[OpenLoad],
    inject: Callable[[int], Awaitable[str]],
    *,
    kills: int,
    warmup: float,
    gap: float,
    tail: float,
    log: Log,
) -> list[Fault]:
    """Start the loads; after ``warmup`` seconds inject ``kills`` faults (``inject(i)``
    does one, restarts what it broke and returns what it did), each ``gap`` seconds
    after the first load is served again (:func:`until_steady`); stop the loads
    ``tail`` seconds after the last is. The faults, with their recovery (from the
    first load)."""
    for load in loads:
        load.start()
    faults: list[Fault] = []
    try:
        await asyncio.sleep(warmup)
        for i in range(kills):
            fault = Fault("", time.monotonic())
            faults.append(fault)
            fault.what = await inject(i)
            log(f"  fault {i + 1}/{kills}: {fault.what}")
            await until_steady(loads[0], fault.at)
            await asyncio.sleep(gap if i + 1 < kills else tail)
    finally:
        for load in loads:
            await load.stop()
    end = max(load.ended for load in loads)
    for fault, value in zip(faults, recoveries(faults, loads[0].ops, end), strict=True):
        fault.recovery = value
    return faults


# -- the audit trail -----------------------------------------------------------------------


@dataclass
class AuditFindings:
    """What the chained trail and ``signalbox audit verify --complete --json`` said.

    Attributes:
        allowed: Call ids of allowed call decisions in the trail.
        outcomes: Call ids with a ``call`` (outcome) record.
        keys: Idempotency key of each allowed decision's call id.
        cli_unknown: ``outcome_unknown`` call ids the CLI reported.
        cli_undecided: ``undecided`` call ids the CLI reported.
        cli_exit: The CLI's exit status.
        chain_ok: The CLI found the hash chain intact.
        records: Records in the trail.
        refused_first: Call ids refused unrun (``audit_unavailable``: the decision was not
            stored in time) whose outcome was chained *before* their decision (the
            emitter stored the decision later, on a retry).
    """

    allowed: set[str]
    outcomes: set[str]
    keys: dict[str, str]
    cli_unknown: set[str]
    cli_undecided: set[str]
    cli_exit: int
    chain_ok: bool
    records: int
    refused_first: set[str] = field(default_factory=set)

    @property
    def unknown(self) -> set[str]:
        """Allowed decisions with no outcome record, from the trail."""
        return self.allowed - self.outcomes

    @property
    def misreported(self) -> set[str]:
        """Calls the CLI reports as outcome unknown although the trail has their outcome."""
        return self.cli_unknown - self.unknown


async def _stream_state(js: Any, stream: str) -> Any:
    return (await js.stream_info(stream)).state


async def settle_audit(nc: Any, *, quiet: float = 1.0, timeout: float = 60.0) -> int:
    """Until the audit intake is empty and the chain has not grown for ``quiet`` seconds;
    the chain's last sequence."""
    js = nc.jetstream()
    deadline = time.monotonic() + timeout
    head, since = -1, time.monotonic()
    while True:
        intake = (await _stream_state(js, AUDIT_INTAKE_STREAM)).messages
        now_head = (await _stream_state(js, AUDIT_STREAM)).last_seq
        now = time.monotonic()
        if intake or now_head != head:
            head, since = now_head, now
        elif now - since >= quiet:
            return int(head)
        if now > deadline:
            raise RuntimeError(f"the audit trail did not settle ({intake} events waiting)")
        await asyncio.sleep(0.1)


async def read_trail(nc: Any) -> list[AuditEvent]:
    """Every record of ``SB_AUDIT`` (an ordered read through the product's reader)."""
    from services.tracing.reader import scan, stream_bounds

    js = nc.jetstream()
    first, last = await stream_bounds(js)
    records: list[AuditEvent] = []
    if last == 0:
        return records
    async with contextlib.aclosing(scan(js, Subjects("sb").audit_log_all, start_seq=first)) as it:
        async for _pos, record, _raw in it:
            if isinstance(record, AuditEvent):
                records.append(record)
    return records


def verify_cli(url: str, data_dir: Path) -> tuple[int, dict[str, Any]]:
    """``signalbox audit verify --complete --json --grace 0`` as a child process."""
    env = child_env(secrets_dir=str(data_dir / "secrets"))
    done = subprocess.run(
        [sys.executable, "-c", "from services.cli.main import app; app()",
         "audit", "verify", "--complete", "--json", "--grace", "0", "--nats-url", url],
        capture_output=True, env=env, cwd=ROOT, timeout=120, check=False,
    )  # fmt: skip
    try:
        report: dict[str, Any] = json.loads(done.stdout)
    except ValueError as exc:
        raise RuntimeError(
            f"audit verify printed no JSON (exit {done.returncode}): "
            f"{done.stdout[-2000:]!r} {done.stderr[-2000:]!r}"
        ) from exc
    return done.returncode, report


async def audit_findings(plane: Plane) -> AuditFindings:
    """Read the settled trail and run the CLI over the same trail (again if it grew)."""
    nc = await plane.connect()
    try:
        for _ in range(5):
            head = await settle_audit(nc)
            records = await read_trail(nc)
            code, report = await asyncio.to_thread(verify_cli, plane.url, plane.data_dir)
            if await settle_audit(nc) == head:
                break
    finally:
        await nc.close()
    allowed: set[str] = set()
    outcomes: set[str] = set()
    keys: dict[str, str] = {}
    refused_first: set[str] = set()
    for r in records:
        call_id = r.data.get("call_id")
        if not isinstance(call_id, str) or not call_id:
            continue
        if r.kind == "decision":
            decision = r.data.get("decision")
            if isinstance(decision, dict) and decision.get("effect") == "allow":
                allowed.add(call_id)
                keys[call_id] = str(r.data.get("idempotency_key", ""))
        elif r.kind == "call":  # its outcome (audit_unavailable: refused unrun)
            outcomes.add(call_id)
            if r.data.get("error_code") == "audit_unavailable" and call_id not in allowed:
                refused_first.add(call_id)
    calls = report.get("calls", {})
    return AuditFindings(
        allowed=allowed,
        outcomes=outcomes,
        keys=keys,
        cli_unknown={c["call_id"] for c in calls.get("outcome_unknown", [])},
        cli_undecided={c["call_id"] for c in calls.get("undecided", [])},
        cli_exit=code,
        chain_ok=bool(report.get("ok")),
        records=len(records),
        refused_first=refused_first & allowed,
    )


# -- call faults ---------------------------------------------------------------------------


@dataclass
class CallRun:
    """One call-load fault run: the load, the faults, what the target executed, the trail.

    Attributes:
        fault: Which fault (``policy``, ``server``, ``up``, ``cluster``).
        write_ahead: SIGNALBOX_WRITE_AHEAD of the policy service.
        rate: Offered calls per second.
        ops: Every logical call.
        faults: Every fault, with its recovery.
        executed: (call id, idempotency key) of every run of the target's handler.
        audit: The trail and the CLI's report.
    """

    fault: str
    write_ahead: bool
    rate: float
    ops: list[Op]
    faults: list[Fault]
    executed: list[tuple[str, str]]
    audit: AuditFindings

    @property
    def executed_ids(self) -> set[str]:
        """Call ids the target executed."""
        return {call_id for call_id, _ in self.executed}

    @property
    def decided(self) -> set[str]:
        """Executed call ids with an allowed decision in the trail."""
        return self.executed_ids & self.audit.allowed

    @property
    def lost(self) -> set[str]:
        """Executed call ids with no allowed decision in the trail."""
        return self.executed_ids - self.audit.allowed

    @property
    def duplicated(self) -> dict[str, int]:
        """Idempotency keys the target executed more than once, with their count."""
        counts = Counter(key for _, key in self.executed)
        return {key: n for key, n in counts.items() if n > 1}

    @property
    def caller_unknown(self) -> int:
        """Attempts that ended in OutcomeUnknown (or CallInProgress) for the caller."""
        return sum(c in ("outcome_unknown", "call_in_progress") for o in self.ops for c in o.codes)

    @property
    def failed(self) -> int:
        """Logical calls that never succeeded (all attempts failed)."""
        return sum(o.final != "ok" for o in self.ops)

    def row(self) -> dict[str, Any]:
        """The figures of the table."""
        values = [f.recovery for f in self.faults]
        known = [v for v in values if v is not None]
        return {
            "fault": FAULT_NAMES[self.fault], "write_ahead": self.write_ahead,
            "rate": round(self.rate, 1), "ops": len(self.ops), "failed": self.failed,
            "executed": len(self.executed_ids), "decided": len(self.decided),
            "lost": len(self.lost), "duplicated": len(self.duplicated),
            "outcome_unknown": len(self.audit.unknown),
            "cli_outcome_unknown": len(self.audit.cli_unknown),
            "cli_misreported": len(self.audit.misreported),
            "undecided": len(self.audit.cli_undecided), "caller_unknown": self.caller_unknown,
            "refused_before_decision": len(self.audit.refused_first),
            "chain_ok": self.audit.chain_ok, "kills": len(self.faults),
            "recovery_median_s": statistics.median(known) if known else None,
            "recovery_worst_s": max(known) if len(known) == len(values) and known else None,
        }  # fmt: skip


FAULT_NAMES = {
    "policy": "policy replica -9 (1 of 2)",
    "server": "nats-server restart",
    "up": "up's server -9",
    "cluster": "cluster node -9 (of 3)",
    "cost": "cost service -9",
}


class Workload:
    """The caller and the target agents, and the target's record of what it executed."""

    def __init__(self, plane: Plane, *, work_ms: tuple[int, int] = (20, 200)) -> None:
        self.executed: list[tuple[str, str]] = []
        self.target = plane.agent(TARGET, "chaos-b", max_concurrency=1024)
        self.caller = plane.agent(CALLER, "chaos-a")
        self.work_ms = work_ms
        self.rng = random.Random(7)

        @self.target.capability(CAPABILITY)
        async def work(req: dict[str, Any], ctx: CallContext) -> dict[str, Any]:
            # Executed: the call id the policy service forwarded (its decision's call id).
            self.executed.append((ctx.meta.call_id, ctx.headers.get(H_IDEMPOTENCY_KEY, "")))
            await asyncio.sleep(float(req.get("ms", 0)) / 1000)
            return {"key": req.get("key")}

    async def start(self, timeout: float = 30.0) -> None:
        """Start both agents; wait until calls go through (every policy replica knows them)."""
        await self.target.start()
        await self.caller.start()
        deadline = time.monotonic() + timeout
        streak = 0
        while streak < 10:
            try:
                await self.caller.call(TARGET, CAPABILITY, {"key": "warm-up"}, timeout=2.0)
                streak += 1
            except SignalboxError:
                streak = 0
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.1)
        self.executed.clear()

    def load(self, rate: float) -> OpenLoad:
        """Open-loop calls, each keyed and retried with its key."""

        async def attempt(op: Op) -> None:
            ms = self.rng.randint(*self.work_ms)
            await self.caller.call(
                TARGET, CAPABILITY, {"key": op.key, "ms": ms},
                timeout=CALL_TIMEOUT, idempotency_key=op.key,
            )  # fmt: skip

        return OpenLoad(attempt, rate, retries=CALL_RETRIES, name="call")

    async def stop(self) -> None:
        """Stop both agents."""
        await self.caller.stop()
        await self.target.stop()


async def call_run(
    fault: str,
    plane: Plane,
    inject: Callable[[int], Awaitable[str]],
    *,
    kills: int,
    rate: float,
    write_ahead: bool,
    gap: float,
    log: Log,
    pace: Pace = STEADY,
) -> CallRun:
    work = Workload(plane)
    try:
        await work.start()
        load = work.load(rate)
        faults = await run_faults(
            [load], inject, kills=kills, warmup=pace.warmup, gap=gap, tail=pace.tail, log=log
        )
    finally:
        await work.stop()
    audit = await audit_findings(plane)
    return CallRun(fault, write_ahead, load.offered_rate, load.ops, faults, work.executed, audit)
