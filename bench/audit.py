"""The audit chain: events chained and stored per second; replay and verify throughput.

Usage::

    python bench/audit.py [--quick] [--chain N] [--records N] [--json]

Identity is on (the servers enforce it as ``signalbox up`` does): emitters
and the raw baselines connect as the ``sb-service`` user, replay and verify
as the operator (the CLI's read-only JetStream permissions on ``SB_AUDIT``).
The tracing service (the sequencer) runs alone in a child process.

(a) **Chained and stored**: ``--chain`` events from an ``AuditEmitter``
(emitters -> ``SB_AUDIT_IN`` -> sequencer -> ``SB_AUDIT``), timed from the
first emit until the last one is chained, on a server that fsyncs every
write (``sync_interval: always``, the generated configs' default) and on one
that does not. Baseline in the same run: raw JetStream ``publish_async`` of
the same encoded records into a plain stream (stored, no chain, no intake).

(b) **Replay and verify** over ``--records`` chained records (filled through
the same pipeline on the server without fsync): nats-py's own ordered
consumer counting messages (the baseline), the replay read (``reader.scan``:
our ordered read, a push consumer on a plain subscription, + decode), the
verifier (decode + re-hash + links), and the CLI itself (``signalbox audit
replay --format ndjson`` and ``audit verify --json`` as child processes, wall
time including start-up). Each row also shows CPU per record of the reader
and of nats-server (steadier than rates on a shared machine). Target
(issue 7): replay >= 50,000 events/s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import uvloop
from _common import (
    CpuMeter,
    StackProcess,
    embedded_server,
    machine_info,
    mark,
    sigterm_unwinds,
    smoke_run,
    table,
)
from nats.aio.msg import Msg
from nats.js.api import StorageType, StreamConfig
from rich.console import Console

from broker import connect
from broker.codec import encode
from broker.runtime.audit import AuditEmitter
from broker.runtime.identity import operator_connect_options, service_connect_options
from broker.runtime.jetstream import AUDIT_STREAM
from broker.settings import Settings
from broker.subjects import Subjects
from services.tracing.chain import GENESIS, chain
from services.tracing.reader import scan
from services.tracing.verify import ChainVerifier

REPLAY_TARGET = 50_000.0  # events/s
RAW_STREAM = "BENCH_RAW"
RAW_ROW = "raw ordered consumer (nats-py, count only)"
REPLAY_ROW = "replay read (scan: ordered read + decode)"


@dataclass(frozen=True, slots=True)
class Plan:
    """How much to measure."""

    chain: int
    records: int
    cli: bool
    rounds: int = 1


@dataclass(slots=True)
class Figures:
    """Everything measured, JSON-ready."""

    chain: dict[str, dict[str, float]] = field(default_factory=dict)
    replay: dict[str, dict[str, float]] = field(default_factory=dict)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench/audit.py",
        description="Audit chain: events chained per second; replay and verify throughput.",
    )
    parser.add_argument("--quick", action="store_true", help="small run (about a minute)")
    parser.add_argument("--chain", type=int, default=None, help="events for (a) (20k / 100k)")
    parser.add_argument(
        "--records", type=int, default=None, help="records for (b) (quick 100k, else 1M)"
    )
    parser.add_argument("--no-cli", action="store_true", help="skip the CLI child-process rows")
    parser.add_argument(
        "--rounds", type=int, default=None, help="rounds of the in-process (b) rows, best kept (2)"
    )
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args(argv)
    for name in ("chain", "records", "rounds"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name} must be at least 1")
    return args


def make_plan(args: argparse.Namespace) -> Plan:
    smoke = smoke_run()
    chain_n, records = (
        (500, 1_000) if smoke else (20_000, 100_000) if args.quick else (100_000, 1_000_000)
    )
    return Plan(
        chain=args.chain or chain_n,
        records=args.records or records,
        cli=not args.no_cli,
        rounds=args.rounds or (1 if smoke else 2),
    )


def sample_data(i: int) -> dict[str, Any]:
    """A payload shaped like a call outcome (about 400 bytes once chained)."""
    return {
        "target": "credit-check",
        "capability": "score",
        "ok": True,
        "latency_ms": 1.25,
        "n": i,
        "caller_version": "1.2.0",
    }


# -- (a) chained and stored -------------------------------------------------------


async def chained_count(js: Any) -> int:
    return int((await js.stream_info(AUDIT_STREAM)).state.last_seq)


async def emit_and_chain(settings: Settings, n: int, start: int, timeout: float = 900.0) -> float:
    """Emit ``n`` events and wait until ``SB_AUDIT`` holds ``start + n``; seconds taken."""
    nc = await connect(settings.nats_url, name="bench-emitter", **service_connect_options(settings))
    try:
        js = nc.jetstream()
        emitter = AuditEmitter(nc, Subjects("sb"), "bench-emitter")
        began = time.perf_counter()
        for i in range(n):
            await emitter.emit("call", actor="bench-a", trace_id=f"{i % 97:032x}",
                               data=sample_data(i))  # fmt: skip
            if i % 256 == 255:
                await asyncio.sleep(0)  # let batches ship while emitting
        if not await emitter.flush(timeout=timeout):
            raise RuntimeError("the intake did not acknowledge every batch")
        while await chained_count(js) < start + n:
            if time.perf_counter() - began > timeout:
                raise TimeoutError("the sequencer did not catch up")
            await asyncio.sleep(0.02)
        elapsed = time.perf_counter() - began
        await emitter.close()
        return elapsed
    finally:
        await nc.close()


async def raw_store(settings: Settings, n: int) -> float:
    """Raw JetStream: ``publish_async`` of ``n`` chained-size records; seconds to store all."""
    nc = await connect(settings.nats_url, name="bench-raw", **service_connect_options(settings))
    try:
        js = nc.jetstream(publish_async_max_pending=1024)
        await js.add_stream(
            StreamConfig(name=RAW_STREAM, subjects=["bench.raw.>"], storage=StorageType.FILE)
        )
        from schemas import AuditEvent

        payloads = []
        prev = GENESIS
        for i in range(n):
            ev = chain(
                AuditEvent(id=f"raw-{i}", time=time.time(), kind="call", actor="bench-a",
                           data=sample_data(i)),
                i + 1,
                prev,
            )  # fmt: skip
            prev = ev.hash
            payloads.append(encode(ev))
        began = time.perf_counter()
        for data in payloads:
            await js.publish_async("bench.raw.call", data)
        await js.publish_async_completed()
        elapsed = time.perf_counter() - began
        await js.delete_stream(RAW_STREAM)
        return elapsed
    finally:
        await nc.close()


def measure_chain(root: Path, plan: Plan, sync_always: bool, log: Console) -> dict[str, float]:
    label = "fsync" if sync_always else "no-fsync"
    data_dir = root / "data"
    with embedded_server(
        root / f"nats-{label}", sync_always=sync_always, secrets_dir=data_dir / "secrets"
    ) as server:
        settings = Settings(nats_url=server.url, data_dir=data_dir, log_level="WARNING")
        with StackProcess(server.url, data_dir, services=("tracing",)):
            raw_s = uvloop.run(raw_store(settings, plan.chain))
            log.log(f"{label}: raw JetStream stored {plan.chain:,} in {raw_s:.2f} s")
            chain_s = uvloop.run(emit_and_chain(settings, plan.chain, 0))
            log.log(f"{label}: chained {plan.chain:,} in {chain_s:.2f} s")
    return {
        "events": plan.chain,
        "raw_store_per_s": plan.chain / raw_s,
        "chained_per_s": plan.chain / chain_s,
    }


# -- (b) replay and verify --------------------------------------------------------------


async def raw_ordered(settings: Settings, n: int) -> float:
    """Baseline: nats-py's ordered consumer over ``SB_AUDIT`` counting messages (no decode)."""
    nc = await connect(
        settings.nats_url, name="bench-raw-read", **operator_connect_options(settings)
    )
    try:
        js = nc.jetstream()
        done = asyncio.Event()
        count = 0

        async def cb(msg: Msg) -> None:
            nonlocal count
            count += 1
            if count >= n:
                done.set()

        began = time.perf_counter()
        sub = await js.subscribe(
            "sb.audit.log.>", stream=AUDIT_STREAM, ordered_consumer=True, cb=cb,
            pending_msgs_limit=-1, pending_bytes_limit=-1,
        )  # fmt: skip
        await done.wait()
        elapsed = time.perf_counter() - began
        await sub.unsubscribe()
        return elapsed
    finally:
        await nc.close()


async def replay_read(settings: Settings, n: int, *, verify: bool) -> float:
    """``reader.scan`` over the whole stream (and the verifier when ``verify``)."""
    nc = await connect(settings.nats_url, name="bench-replay", **operator_connect_options(settings))
    try:
        js = nc.jetstream()
        verifier = ChainVerifier()
        seen = 0
        began = time.perf_counter()
        async for pos, record, raw in scan(js, "sb.audit.log.>"):
            seen += 1
            if verify and verifier.feed(pos, record, raw) is not None:
                raise RuntimeError(f"the chain does not verify: {verifier.problem}")
        elapsed = time.perf_counter() - began
        if seen != n:
            raise RuntimeError(f"read {seen:,} records, expected {n:,}")
        return elapsed
    finally:
        await nc.close()


def cli(settings: Settings, args: list[str], *, stdout: Any) -> float:
    """Run ``signalbox <args>`` as a child process; wall seconds (start-up included)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIGNALBOX_")}
    env["SIGNALBOX_SECRETS_DIR"] = str(settings.data_dir / "secrets")
    code = "from services.cli.main import app; app()"
    began = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", code, *args, "--nats-url", settings.nats_url or ""],
        env=env, stdout=stdout, stderr=subprocess.PIPE, check=False,
    )  # fmt: skip
    elapsed = time.perf_counter() - began
    if proc.returncode != 0:
        raise RuntimeError(f"signalbox {' '.join(args)} failed: {proc.stderr.decode()[-500:]}")
    return elapsed


def measure_replay(root: Path, plan: Plan, log: Console) -> dict[str, dict[str, float]]:
    data_dir = root / "data"
    n = plan.records
    out: dict[str, dict[str, float]] = {}
    with embedded_server(
        root / "nats-replay", sync_always=False, secrets_dir=data_dir / "secrets"
    ) as server:
        settings = Settings(nats_url=server.url, data_dir=data_dir, log_level="WARNING")
        with StackProcess(server.url, data_dir, services=("tracing",)):
            log.log(f"filling {AUDIT_STREAM} with {n:,} chained records")
            fill_s = uvloop.run(emit_and_chain(settings, n, 0))
            log.log(f"chained {n:,} in {fill_s:.1f} s")
        server_pid = server.pid or 0

        def measured(name: str, run: Callable[[], float], *, child: bool = False) -> None:
            """Time ``run``; CPU of the reader (this process, or the CLI child) and the server.
            Of several rounds of one row, the fastest is kept."""
            meter = CpuMeter({"nats-server": server_pid})
            meter.start()
            before = _cpu_of(child)
            seconds = run()
            reader_cpu = _cpu_of(child) - before
            server_cpu = meter.stop().get("nats-server", float("nan"))
            log.log(f"{name}: {n / seconds:,.0f} records/s, "
                    f"{reader_cpu / n * 1e6:.1f} us CPU per record")  # fmt: skip
            if name in out and out[name]["seconds"] <= seconds:
                return
            out[name] = {
                "records": n, "seconds": seconds, "per_s": n / seconds,
                "reader_us": reader_cpu / n * 1e6, "server_us": server_cpu / n * 1e6,
            }  # fmt: skip

        # Rows interleaved round by round: a burst of load elsewhere hits all alike.
        for _ in range(plan.rounds):
            measured(RAW_ROW, lambda: uvloop.run(raw_ordered(settings, n)))
            measured(REPLAY_ROW, lambda: uvloop.run(replay_read(settings, n, verify=False)))
            measured("verify (scan + re-hash + links)",
                     lambda: uvloop.run(replay_read(settings, n, verify=True)))  # fmt: skip
        if plan.cli:
            with open(os.devnull, "wb") as sink:
                measured(
                    "CLI: audit replay --format ndjson",
                    lambda: cli(settings, ["audit", "replay", "--since", "1d", "--format",
                                           "ndjson"], stdout=sink),
                    child=True,
                )  # fmt: skip
            summary_file = root / "verify.json"

            def cli_verify() -> float:
                with summary_file.open("wb") as out_file:
                    seconds = cli(settings, ["audit", "verify", "--json"], stdout=out_file)
                summary = json.loads(summary_file.read_text())
                if not summary["ok"] or summary["checked"] != n:
                    raise RuntimeError(f"audit verify did not pass: {summary}")
                return seconds

            measured("CLI: audit verify --json", cli_verify, child=True)
    out["_fill"] = {"records": n, "seconds": fill_s, "per_s": n / fill_s}
    return out


def _cpu_of(children: bool) -> float:
    """CPU seconds used so far by this process, or by its finished children."""
    if not children:
        return time.process_time()
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


# -- report ----------------------------------------------------------------------------------


def report_tables(console: Console, plan: Plan, info: dict[str, str], figures: Figures) -> None:
    console.print(table("Machine", ["", ""], [[k, v] for k, v in info.items()], left=2))
    rows = []
    for label, fig in figures.chain.items():
        ratio = fig["chained_per_s"] / fig["raw_store_per_s"]
        rows.append(
            [label, f"{fig['events']:,}", f"{fig['raw_store_per_s']:,.0f}",
             f"{fig['chained_per_s']:,.0f}", f"{ratio:.0%}"]
        )  # fmt: skip
    console.print(
        table(
            "(a) Audit events chained and stored (events/s)",
            ["server", "events", "raw JetStream store", "chained end to end", "chained / raw"],
            rows,
            caption="Chained: AuditEmitter -> SB_AUDIT_IN -> sequencer (child process) -> "
            "SB_AUDIT, first emit to last record chained. Raw: publish_async of the same "
            "records into a plain file stream, same server. Identity on.",
        )
    )
    raw = figures.replay[RAW_ROW]["per_s"]
    rows = []
    for name, fig in figures.replay.items():
        if name.startswith("_"):
            continue
        replay_like = "replay" in name
        target = mark(fig["per_s"] >= REPLAY_TARGET) if replay_like else ""
        rows.append(
            [name, f"{fig['records']:,}", f"{fig['seconds']:.2f}", f"{fig['per_s']:,.0f}",
             f"{fig['per_s'] / raw:.0%}", f"{fig['reader_us']:.1f}", f"{fig['server_us']:.1f}",
             target]
        )  # fmt: skip
    fill = figures.replay["_fill"]
    console.print(
        table(
            "(b) Replay and verify over SB_AUDIT",
            ["path", "records", "seconds", "records/s", "vs raw", "reader CPU µs/rec",
             "server CPU µs/rec", "replay >= 50k/s"],
            rows,
            sections_before=[1],
            caption=f"Operator credentials (read-only JetStream). Stream filled through the "
            f"pipeline at {fill['per_s']:,.0f} events/s (no fsync). Reader CPU: this process "
            "(connection included) or the CLI child (start-up included); server: nats-server "
            f"over the same run. In-process rows: the fastest of {plan.rounds} interleaved "
            "round(s); CLI rows: one run each, child processes, start-up included.",
        )
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sigterm_unwinds()
    plan = make_plan(args)
    log = Console(stderr=True, log_path=False)
    info = machine_info()
    info["identity"] = "on (service and operator users, auth callout)"
    figures = Figures()
    with tempfile.TemporaryDirectory(prefix="sb-bench-audit-") as tmp:
        root = Path(tmp)
        for sync_always in (True, False):
            label = "fsync every write" if sync_always else "no fsync"
            figures.chain[label] = measure_chain(root, plan, sync_always, log)
        figures.replay = measure_replay(root, plan, log)
    if args.json:
        print(json.dumps({"plan": asdict(plan), "machine": info, **asdict(figures)}, indent=2))
    else:
        report_tables(Console(width=None if sys.stdout.isatty() else 140), plan, info, figures)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
