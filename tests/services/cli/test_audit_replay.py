"""``signalbox audit replay`` output: stored bytes written as before, long tables streamed.

The records come from a running tracing service (a real chain in
``SB_AUDIT``); the expected output is what replay printed before it wrote
stored bytes directly: every decoded record re-encoded, one per line.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import TYPE_CHECKING

import msgspec
import pytest
from nats.aio.client import Client
from typer.testing import CliRunner, Result

from broker.codec import encode
from broker.runtime.audit import AuditEmitter
from broker.settings import Settings
from broker.subjects import Subjects
from schemas import AuditEvent
from services.cli import audit_replay
from services.cli.main import app
from services.cli.render import to_json
from services.tracing.reader import scan

if TYPE_CHECKING:
    from support import AuditTrail, ServiceConnector, StackFactory

runner = CliRunner()


async def replay(settings: Settings, *args: str) -> Result:
    """Run ``audit replay --since 1h ARGS`` in a worker thread (the CLI runs its own loop)."""
    argv = ["audit", "replay", "--since", "1h", *args, "--nats-url", settings.nats_url or ""]
    return await asyncio.to_thread(runner.invoke, app, argv)


@pytest.fixture
async def nc(service_nc: ServiceConnector) -> Client:
    return await service_nc()


@pytest.fixture
async def events(make_stack: StackFactory, audit_trail: AuditTrail, nc: Client) -> list[AuditEvent]:
    """20 admin records chained by the tracing service, as stored."""
    await make_stack(services=["tracing"])
    emitter = AuditEmitter(nc, Subjects("sb"), "service:test")
    for i in range(20):
        await emitter.emit("admin", trace_id=f"trace-{i % 3}", data={"i": i, "note": "ünï"})
    assert await emitter.flush()
    await audit_trail.wait_for(lambda r: r.kind == "admin", count=20)
    await emitter.close()
    out: list[AuditEvent] = []
    async for _seq, record, _raw in scan(nc.jetstream(), "sb.audit.log.>"):
        assert isinstance(record, AuditEvent)
        out.append(record)
    assert len(out) == 20
    return out


def lines_of(items: Sequence[AuditEvent]) -> list[str]:
    return [to_json(e) for e in items]


async def test_ndjson_and_json_are_what_replay_printed_before(
    events: list[AuditEvent], settings: Settings
) -> None:
    ndjson = await replay(settings, "--format", "ndjson")
    assert ndjson.exit_code == 0, ndjson.output
    assert ndjson.stdout == "".join(line + "\n" for line in lines_of(events))

    as_json = await replay(settings, "--format", "json")
    assert as_json.exit_code == 0, as_json.output
    assert as_json.stdout == "[\n" + ",\n".join(lines_of(events)) + "\n]\n"
    assert msgspec.json.decode(as_json.stdout, type=list[AuditEvent]) == events

    traced = await replay(settings, "--format", "ndjson", "--trace", "trace-2")
    wanted = [e for e in events if e.trace_id == "trace-2"]
    assert len(wanted) == 6
    assert traced.stdout.splitlines() == lines_of(wanted)
    assert "6 record(s)" in traced.output


async def test_ndjson_puts_a_multiline_record_on_one_line_and_skips_unreadable_ones(
    events: list[AuditEvent], settings: Settings, nc: Client
) -> None:
    # Written straight into the chain stream, past the sequencer (as an intruder could).
    js = nc.jetstream()
    extra = msgspec.structs.replace(events[-1], id="extra", seq=21)
    await js.publish("sb.audit.log.admin.intruder", encode(extra).replace(b',"kind"', b',\n"kind"'))
    await js.publish("sb.audit.log.admin.intruder", b"{not json")
    result = await replay(settings, "--format", "ndjson")
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == lines_of([*events, extra])
    assert "audit record 22 is unreadable" in result.output
    assert "21 record(s)" in result.output


async def test_a_long_table_is_printed_table_by_table(
    events: list[AuditEvent], settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(audit_replay, "_TABLE_ROWS", 8)
    result = await replay(settings, "--kind", "admin")
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert out.count("Audit replay (continued)") == 2 and out.count("Audit replay") == 3
    assert sum(" admin " in line for line in out.splitlines()) == 20, out
    # In chain order across the tables.
    seqs = [int(line.split()[0]) for line in out.splitlines() if " admin " in line]
    assert seqs == [e.seq for e in events]
    assert "20 record(s)" in result.output
