"""``audit verify`` finds the first tampered record; ``audit replay`` reads the trail back.

A real chain is built by the running tracing service; tampered copies of it
(in memory, and in a second JetStream stream) must fail at the right
sequence, the untampered live stream must pass, also through the CLI.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec
import nats.js.errors
import pytest
from nats.aio.client import Client
from nats.js.api import StreamConfig
from support import ainvoke
from typer.testing import CliRunner

from broker.codec import encode
from broker.connection import connect
from broker.errors import SchemaError
from broker.runtime.audit import AuditEmitter
from broker.runtime.jetstream import AUDIT_STREAM
from broker.settings import Settings
from broker.subjects import Subjects
from schemas import AuditEvent
from services.cli.audit_cmds import parse_since
from services.cli.main import app
from services.tracing.chain import GENESIS, record_hash
from services.tracing.chain import chain as chain_record
from services.tracing.reader import scan
from services.tracing.service import TracingService
from services.tracing.verify import ChainVerifier, Problem, verify

if TYPE_CHECKING:
    from support import AuditTrail, ServiceConnector, StackFactory

Record = tuple[int, AuditEvent | SchemaError, bytes]

runner = CliRunner()


pytestmark = pytest.mark.usefixtures("cli_operator")


async def read_all(
    nc: Client, stream: str = AUDIT_STREAM, subject: str = "sb.audit.log.>"
) -> list[Record]:
    return [item async for item in scan(nc.jetstream(), subject, stream=stream)]


async def build_chain(
    make_stack: StackFactory, audit_trail: AuditTrail, nc: Client, n: int = 20
) -> list[Record]:
    """``n`` admin events chained by a running tracing service; the stored records."""
    await make_stack(services=["tracing"])
    emitter = AuditEmitter(nc, Subjects("sb"), "service:test")
    for i in range(n):
        await emitter.emit("admin", trace_id=f"trace-{i % 3}", data={"i": i})
    assert await emitter.flush()
    await audit_trail.wait_for(lambda r: r.kind == "admin", count=n)
    await emitter.close()
    records = await read_all(nc)
    assert len(records) == n
    return records


@pytest.fixture
async def nc(service_nc: ServiceConnector) -> Client:
    return await service_nc()


@pytest.fixture
async def chain(make_stack: StackFactory, audit_trail: AuditTrail, nc: Client) -> list[Record]:
    return await build_chain(make_stack, audit_trail, nc)


def event_of(item: Record) -> AuditEvent:
    assert isinstance(item[1], AuditEvent)
    return item[1]


def edited(item: Record, *, rehash: bool = False, **changes: object) -> Record:
    """``item`` with fields changed (and its stored bytes re-encoded to match)."""
    event = msgspec.structs.replace(event_of(item), **changes)
    if rehash:
        event = msgspec.structs.replace(event, hash=record_hash(event))
    return item[0], event, encode(event)


def renumbered(items: list[Record]) -> list[Record]:
    """The same records at consecutive stream positions from 1 (a copy into a new stream)."""
    return [(pos, rec, raw) for pos, (_, rec, raw) in enumerate(items, start=1)]


def problem_of(items: list[Record], *, last_pos: int | None = None) -> Problem:
    report = verify(items, last_pos=last_pos)
    assert report.problem is not None, "the tampering went unnoticed"
    return report.problem


# -- the verifier over tampered copies ------------------------------------------------------


async def test_an_untampered_chain_verifies(chain: list[Record]) -> None:
    report = verify(chain, last_pos=len(chain))
    assert report.ok, report.problem
    assert report.checked == 20
    assert (report.first_seq, report.last_seq) == (1, 20)
    assert report.anchor == GENESIS
    assert report.head_hash == event_of(chain[-1]).hash
    assert report.first_time == event_of(chain[0]).time
    # Without the stored bytes (the re-encoding path) too.
    assert verify([(pos, rec) for pos, rec, _ in chain]).ok


async def test_an_edited_record_is_named(chain: list[Record]) -> None:
    tampered = list(chain)
    tampered[6] = edited(chain[6], data={"i": 999})
    problem = problem_of(tampered)
    assert (problem.kind, problem.seq) == ("modified", 7)
    assert "record at seq 7 was modified" in problem.message
    # Edited in its stored bytes only (the decoded form is what a reader sees).
    raw = chain[6][2].replace(b'"i":6', b'"i":7')
    assert raw != chain[6][2]
    tampered[6] = (7, msgspec.json.decode(raw, type=AuditEvent), raw)
    assert (problem_of(tampered).kind, problem_of(tampered).seq) == ("modified", 7)


async def test_an_edited_and_rehashed_record_breaks_the_next_link(chain: list[Record]) -> None:
    tampered = list(chain)
    tampered[6] = edited(chain[6], rehash=True, actor="someone-else")
    problem = problem_of(tampered)
    assert (problem.kind, problem.seq) == ("missing", 8)
    assert "record 7 (seq 7" in problem.message and "was replaced" in problem.message


async def test_an_undecodable_record_is_modified(chain: list[Record]) -> None:
    tampered = list(chain)
    tampered[3] = (4, SchemaError("bad", details={"path": "$"}), b"garbage")
    problem = problem_of(tampered)
    assert (problem.kind, problem.seq) == ("modified", 4)
    assert "no longer decodes" in problem.message


async def test_a_deleted_record_leaves_a_gap_in_the_stream(chain: list[Record]) -> None:
    problem = problem_of(chain[:9] + chain[10:])
    assert (problem.kind, problem.seq) == ("missing", 11)
    assert "records at seq 10 are missing" in problem.message


async def test_a_deleted_record_in_a_renumbered_copy_is_missing(chain: list[Record]) -> None:
    problem = problem_of(renumbered(chain[:9] + chain[12:]))
    assert (problem.kind, problem.seq) == ("missing", 10)
    assert "chain records 10-12 are missing" in problem.message


async def test_a_deleted_first_or_last_record_is_noticed(chain: list[Record]) -> None:
    first = problem_of(chain[1:])
    assert (first.kind, first.seq) == ("anchor", 2)
    last = problem_of(chain[:-1], last_pos=20)
    assert (last.kind, last.seq) == ("missing", 20)


async def test_swapped_records_are_reordered(chain: list[Record]) -> None:
    swapped = renumbered([*chain[:4], chain[5], chain[4], *chain[6:]])
    problem = problem_of(swapped)
    assert (problem.kind, problem.seq) == ("reordered", 5)
    assert "record 6 is stored before record 5 (found at seq 6)" in problem.message
    # A record moved back past several others.
    moved = renumbered(chain[:4] + chain[5:9] + [chain[4]] + chain[9:])
    problem = problem_of(moved)
    assert (problem.kind, problem.seq, problem.details["found_at"]) == ("reordered", 5, 9)


async def test_a_record_moved_earlier_is_reordered(chain: list[Record]) -> None:
    # Positions kept: record 3 stored again after 8 would be a duplicate, so
    # move it: 1 2 4 5 6 7 8 3 9... -> at position 3 the jump is resolved at 8.
    items = renumbered(chain[:2] + chain[3:8] + [chain[2]] + chain[8:])
    problem = problem_of(items)
    assert (problem.kind, problem.seq, problem.details["found_at"]) == ("reordered", 3, 8)


async def test_a_duplicated_record_is_named(chain: list[Record]) -> None:
    problem = problem_of(renumbered([*chain[:8], chain[7], *chain[8:]]))
    assert (problem.kind, problem.seq) == ("duplicate", 9)
    assert f"duplicates event {event_of(chain[7]).id}, already stored at seq 8" in problem.message


async def test_verifying_from_the_middle_anchors_on_the_first_prev_hash(
    chain: list[Record],
) -> None:
    report = verify(chain[10:], anchor=None)
    assert report.ok and report.checked == 10
    assert report.anchor == event_of(chain[9]).hash
    # ... and still catches what follows.
    tampered = [*chain[10:14], edited(chain[14], data={}), *chain[15:]]
    problem = verify(tampered, anchor=None).problem
    assert problem is not None and (problem.kind, problem.seq) == ("modified", 15)


def test_the_verifier_stops_at_the_first_problem() -> None:
    verifier = ChainVerifier()
    bad = AuditEvent(id="x", time=1.0, kind="admin", actor="a", seq=1, prev_hash=GENESIS, hash="0")
    first = verifier.feed(1, bad)
    assert first is not None and first.kind == "modified"
    assert verifier.feed(2, bad) is first
    assert verifier.finish().problem is first and verifier.report.checked == 0


# -- a tampered copy in a second stream -------------------------------------------------------


async def test_a_tampered_copy_in_another_stream_fails_at_the_right_record(
    chain: list[Record], nats_url: str
) -> None:
    copy_nc = await connect(nats_url, name="test-copy")  # the open session server
    js = copy_nc.jetstream()
    name = f"COPY_{uuid.uuid4().hex[:8]}"
    subject = f"copy.{name}"
    await js.add_stream(StreamConfig(name=name, subjects=[f"{subject}.>"]))
    try:
        for pos, _, raw in chain:
            if pos == 12:
                raw = raw.replace(b'"i":11', b'"i":1100')  # edit the stored bytes
            await js.publish(f"{subject}.{pos}", raw)
        copied = await read_all(copy_nc, name, f"{subject}.>")
        problem = verify(copied).problem
        assert problem is not None and (problem.kind, problem.seq) == ("modified", 12)
        # Delete a record from the copy (before the edit): a gap in the stream.
        await js.delete_msg(name, 5)
        copied = await read_all(copy_nc, name, f"{subject}.>")
        problem = verify(copied).problem
        assert problem is not None and (problem.kind, problem.seq) == ("missing", 6)
        assert "records at seq 5 are missing" in problem.message
    finally:
        await js.delete_stream(name)
        await copy_nc.close()


# -- the CLI against the live stream -----------------------------------------------------------


async def test_cli_verify_passes_on_the_live_stream(
    chain: list[Record], settings: Settings
) -> None:
    url = settings.nats_url or ""
    result = await ainvoke(["audit", "verify", "--nats-url", url])
    assert result.exit_code == 0, result.output
    assert "Audit chain OK" in result.stdout
    assert "20 checked" in result.stdout and "genesis" in result.stdout
    assert event_of(chain[-1]).hash in result.stdout

    as_json = await ainvoke(["audit", "verify", "--json", "--nats-url", url])
    assert as_json.exit_code == 0, as_json.output
    summary = json.loads(as_json.stdout)
    assert summary["ok"] is True and summary["problem"] is None
    assert (summary["checked"], summary["first_seq"], summary["last_seq"]) == (1 * 20, 1, 20)
    assert summary["head_hash"] == event_of(chain[-1]).hash

    since = await ainvoke(["audit", "verify", "--since", "1h", "--nats-url", url])
    assert since.exit_code == 0, since.output
    assert "taken on trust" in since.stdout
    later = await ainvoke(["audit", "verify", "--since", "-1", "--nats-url", url])
    assert later.exit_code == 1  # not a duration, not a time


async def test_cli_verify_names_a_record_forged_into_the_live_stream(
    chain: list[Record], settings: Settings, nc: Client
) -> None:
    js = nc.jetstream()
    # SB_AUDIT refuses deletes (deny_delete)...
    with pytest.raises(nats.js.errors.ServerError, match="message delete not permitted"):
        await js.delete_msg(AUDIT_STREAM, 7)
    # ... but a forged record appended by another writer is caught.
    forged = chain_record(
        AuditEvent(id="forged", time=time.time(), kind="admin", actor="mallory"), 21, "f" * 64
    )
    await js.publish("sb.audit.log.admin.mallory", encode(forged))
    url = settings.nats_url or ""
    result = await ainvoke(["audit", "verify", "--nats-url", url])
    assert result.exit_code == 1
    assert "audit chain broken at seq 21" in result.output
    assert "record 20 (seq 20" in result.output
    assert "Traceback" not in result.output
    as_json = await ainvoke(["audit", "verify", "--json", "--nats-url", url])
    assert as_json.exit_code == 1
    summary = json.loads(as_json.stdout)
    assert summary["ok"] is False and summary["checked"] == 20
    assert (summary["problem"]["kind"], summary["problem"]["seq"]) == ("missing", 21)


async def test_cli_replay_filters_and_formats(chain: list[Record], settings: Settings) -> None:
    url = settings.nats_url or ""
    ndjson = await ainvoke(["audit", "replay", "--since", "1h", "--format", "ndjson",
                            "--nats-url", url])  # fmt: skip
    assert ndjson.exit_code == 0, ndjson.output
    lines = [msgspec.json.decode(line, type=AuditEvent) for line in ndjson.stdout.splitlines()]
    assert [e.seq for e in lines] == list(range(1, 21))

    traced = await ainvoke(["audit", "replay", "--since", "1h", "--trace", "trace-1",
                            "--kind", "admin", "--format", "json", "--nats-url", url])  # fmt: skip
    assert traced.exit_code == 0, traced.output
    events = msgspec.json.decode(traced.stdout, type=list[AuditEvent])
    assert [e.data["i"] for e in events] == [i for i in range(20) if i % 3 == 1]

    none = await ainvoke(["audit", "replay", "--since", "1h", "--kind", "decision",
                          "--format", "json", "--nats-url", url])  # fmt: skip
    assert none.exit_code == 0 and json.loads(none.stdout) == []

    # Nothing was recorded after "in 1 minute" -> empty; --until an hour ago -> empty.
    future = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(time.time() + 60))
    later = await ainvoke(["audit", "replay", "--since", future, "--format", "ndjson",
                           "--nats-url", url])  # fmt: skip
    assert later.exit_code == 0 and later.stdout == ""
    early = await ainvoke(["audit", "replay", "--since", "2h", "--until", "1h",
                           "--format", "ndjson", "--nats-url", url])  # fmt: skip
    assert early.exit_code == 0 and early.stdout == ""

    table = await ainvoke(["audit", "replay", "--since", "1h", "--kind", "admin",
                           "--nats-url", url])  # fmt: skip
    assert table.exit_code == 0, table.output
    assert "Audit replay" in table.stdout
    assert sum("admin" in line for line in table.stdout.splitlines()) == 20
    assert "20 record(s)" in table.output

    nobody = await ainvoke(["audit", "replay", "--since", "1h", "--agent", "nobody",
                            "--format", "ndjson", "--nats-url", url])  # fmt: skip
    assert nobody.exit_code == 0 and nobody.stdout == ""


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--since", "1h", "--format", "xml"], "unknown --format 'xml'"),
        (["--since", "1h", "--until", "2h"], "is before --since"),
        (["--since", "yesterday-ish"], "neither a duration"),
        (["--since", "1h", "--kind", "bogus"], "unknown audit kind 'bogus'"),
        ([], "--since"),
    ],
)
def test_cli_replay_rejects_bad_arguments(args: list[str], needle: str) -> None:
    result = runner.invoke(app, ["audit", "replay", *args])
    assert result.exit_code == 1, result.output
    assert needle in result.output and "Traceback" not in result.output


def test_parse_since_takes_durations_and_iso_times() -> None:
    assert parse_since("2h", now=10_000.0) == 10_000.0 - 7200
    assert parse_since("2026-01-02T03:04:05+00:00") == 1767323045.0


# -- durability: a sequencer killed mid-load -----------------------------------------------------


ROOT = Path(__file__).resolve().parents[3]


@contextlib.contextmanager
def tracing_process(settings: Settings) -> Iterator[subprocess.Popen[bytes]]:
    """The tracing service alone, in a child process (so that it can be SIGKILLed)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIGNALBOX_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.tracing", "--nats-url", settings.nats_url or "",
         "--data-dir", str(settings.data_dir)],
        env={**env, "SIGNALBOX_LOG_LEVEL": "WARNING"},
        cwd=ROOT,
    )  # fmt: skip
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


async def test_a_sequencer_killed_mid_load_leaves_no_gap_and_no_duplicate(
    make_stack: StackFactory, settings: Settings, audit_trail: AuditTrail, nc: Client
) -> None:
    js = nc.jetstream()
    emitter = AuditEmitter(nc, Subjects("sb"), "service:test", max_batch=50)
    first, during, after = 300, 2000, 700
    killed = asyncio.Event()

    async def chained() -> int:
        return int((await js.stream_info(AUDIT_STREAM)).state.last_seq)

    async def load() -> None:
        # Paced so that the sequencer is busy when it is killed; the last
        # part only once it is dead (chained later, by its successor).
        for i in range(first, first + during):
            await emitter.emit("admin", data={"i": i})
            if i % 50 == 0:
                await asyncio.sleep(0.002)
        await killed.wait()
        for i in range(first + during, first + during + after):
            await emitter.emit("admin", data={"i": i})
        assert await emitter.flush()

    with tracing_process(settings) as proc:
        for i in range(first):
            await emitter.emit("admin", data={"i": i})
        assert await emitter.flush()
        await audit_trail.wait_for(lambda r: r.kind == "admin", count=first, timeout=30)
        loader = asyncio.ensure_future(load())
        # Kill once the child is chaining the second part (polling the stream's
        # state: nothing to await for "n records stored").
        while await chained() < first + 100:  # noqa: ASYNC110
            await asyncio.sleep(0.001)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        killed.set()
    at_kill = await chained()
    await loader
    total = first + during + after
    assert at_kill < total
    # The successor: intake messages the dead one fetched but never acked come
    # back after ack_wait (shortened here; 30 s by default).
    successor = TracingService(settings, ack_wait=1.0)
    await successor.start()
    try:
        await audit_trail.wait_for(lambda r: r.kind == "admin", count=total, timeout=40)
        records = await audit_trail.settle()
    finally:
        await successor.stop()
        await emitter.close()
    assert sorted(r.data["i"] for r in records) == list(range(total))
    report = verify(await read_all(nc), last_pos=len(records))
    assert report.ok, report.problem
    assert report.checked == len(records) == total
