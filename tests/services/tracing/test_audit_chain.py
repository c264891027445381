"""The tracing service chains every audit event: consecutive, hash-linked, restart-safe."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import nats
import pytest
from nats.aio.client import Client

from broker.runtime.audit import AuditEmitter
from broker.runtime.identity import service_connect_options
from broker.runtime.jetstream import AUDIT_INTAKE_STREAM, AUDIT_STREAM
from broker.settings import Settings
from broker.subjects import Subjects
from schemas import AuditEvent
from services.tracing.chain import GENESIS, chain, record_hash
from services.tracing.service import TracingService

if TYPE_CHECKING:
    from support import AgentFactory, AuditTrail, StackFactory


@pytest.fixture
async def nc(settings: Settings) -> AsyncIterator[Client]:
    conn = await nats.connect(settings.nats_url or "", **service_connect_options(settings))
    yield conn
    await conn.close()


def assert_chained(records: list[AuditEvent]) -> None:
    """Consecutive seq from 1, each linked to the previous hash, each hash recomputable."""
    assert records, "empty chain"
    prev = GENESIS
    for expected_seq, record in enumerate(records, start=1):
        assert record.seq == expected_seq
        assert record.prev_hash == prev
        assert record.hash == record_hash(record)
        prev = record.hash
    ids = [r.id for r in records]
    assert len(ids) == len(set(ids)), "an event was chained twice"


async def _stream_seqs(nc: Client, count: int) -> list[int]:
    js = nc.jetstream()
    out = []
    for seq in range(1, count + 1):
        raw = await js.get_msg(AUDIT_STREAM, seq=seq)
        out.append(raw.seq or 0)
    return out


def test_chain_hashes_cover_every_field() -> None:
    event = AuditEvent(id="e", time=1.0, kind="call", actor="a", data={"x": 1})
    placed = chain(event, 1, GENESIS)
    assert placed.seq == 1 and placed.prev_hash == GENESIS
    assert placed.hash == record_hash(placed)
    import msgspec

    for change in ({"actor": "b"}, {"data": {"x": 2}}, {"seq": 2}, {"prev_hash": "1" * 64}):
        tampered = msgspec.structs.replace(placed, **change)
        assert record_hash(tampered) != placed.hash


async def test_calls_produce_a_consecutive_hash_linked_chain(
    make_stack: StackFactory, make_agent: AgentFactory, audit_trail: AuditTrail, nc: Client
) -> None:
    await make_stack(allow=[("a", "b", ["*"])])
    b = make_agent("b")

    @b.capability()
    async def echo(req: Any) -> Any:
        return req

    a = make_agent("a")
    await b.start()
    await a.start()
    for i in range(10):
        assert await a.call("b", "echo", {"i": i}) == {"i": i}
    await audit_trail.wait_for(lambda r: r.kind == "call", count=10)
    records = await audit_trail.settle()
    assert_chained(records)
    kinds = [r.kind for r in records]
    assert kinds.count("decision") == 10
    assert kinds.count("registry") == 2
    # The record's seq is its stream sequence: a gap or reorder would show.
    assert await _stream_seqs(nc, len(records)) == [r.seq for r in records]
    # Chained records are filed by kind and actor.
    js = nc.jetstream()
    raw = await js.get_msg(AUDIT_STREAM, seq=records[-1].seq)
    assert (raw.subject or "").startswith("sb.audit.log.")


async def test_a_malformed_intake_message_is_chained_as_rejected_not_dropped(
    make_stack: StackFactory, audit_trail: AuditTrail, nc: Client
) -> None:
    stack = await make_stack(services=["tracing"])
    js = nc.jetstream()
    await js.publish("sb.audit.in.x.y", b"\x00 definitely not an audit event",
                     headers={"Nats-Msg-Id": "junk-1"})  # fmt: skip
    await js.publish("sb.audit.in.call.z", b'{"id": "no-time", "kind": "call"}')
    rejected = await audit_trail.wait_for(lambda r: r.kind == "rejected", count=2)
    assert rejected[0].id == "junk-1"
    assert rejected[0].subject == "sb.audit.in.x.y"
    assert rejected[0].actor == "service:tracing"
    assert rejected[0].data["code"] == "schema_error"
    assert rejected[0].data["raw_b64"]
    assert rejected[1].data["details"]["path"] == "$"
    assert_chained(await audit_trail.settle())
    tracing = stack.services["tracing"]
    assert isinstance(tracing, TracingService)
    assert tracing.malformed == 2
    # The intake copy is consumed (work queue): nothing left to redeliver.
    info = await js.stream_info(AUDIT_INTAKE_STREAM)
    assert info.state.messages == 0


async def test_a_restarted_sequencer_continues_the_chain(
    make_stack: StackFactory, settings: Settings, audit_trail: AuditTrail, nc: Client
) -> None:
    first = await make_stack(services=["tracing"])
    emitter = AuditEmitter(nc, Subjects("sb"), "service:test")
    for i in range(5):
        await emitter.emit("admin", data={"round": 1, "i": i})
    assert await emitter.flush()
    await audit_trail.wait_for(lambda r: r.data.get("round") == 1, count=5)
    await first.stop()

    # While no sequencer runs, events wait in the intake stream.
    for i in range(7):
        await emitter.emit("admin", data={"round": 2, "i": i})
    assert await emitter.flush()
    # (emitted without yielding to the loop, so they travel as one batch)
    assert (await nc.jetstream().stream_info(AUDIT_INTAKE_STREAM)).state.messages == 1

    second = await make_stack(services=["tracing"])
    await audit_trail.wait_for(lambda r: r.data.get("round") == 2, count=7)
    for i in range(3):
        await emitter.emit("admin", data={"round": 3, "i": i})
    await audit_trail.wait_for(lambda r: r.data.get("round") == 3, count=3)
    records = await audit_trail.settle()
    assert_chained(records)
    assert [r.data["round"] for r in records] == [1] * 5 + [2] * 7 + [3] * 3
    assert [r.data["i"] for r in records if r.data["round"] == 2] == list(range(7))
    tracing = second.services["tracing"]
    assert isinstance(tracing, TracingService)
    assert tracing.head_seq == 15
    await emitter.close()


async def test_two_sequencers_at_once_never_fork_the_chain(
    make_stack: StackFactory, audit_trail: AuditTrail, nc: Client
) -> None:
    await make_stack(services=["tracing"])
    await make_stack(services=["tracing"])  # a second replica, racing for the head
    emitter = AuditEmitter(nc, Subjects("sb"), "service:test")
    for i in range(200):
        await emitter.emit("admin", data={"i": i})
    assert await emitter.flush()
    await audit_trail.wait_for(lambda r: r.kind == "admin", count=200, timeout=40)
    records = await audit_trail.settle()
    assert_chained(records)
    assert sorted(r.data["i"] for r in records) == list(range(200))
    await emitter.close()


async def test_a_redelivered_event_already_chained_is_not_chained_twice(
    make_stack: StackFactory, audit_trail: AuditTrail, nc: Client
) -> None:
    await make_stack(services=["tracing"])
    emitter = AuditEmitter(nc, Subjects("sb"), "service:test")
    first = await emitter.emit("admin", data={"n": "first"})
    assert await emitter.flush()
    await audit_trail.wait_for(lambda r: r.id == first.id, count=1)
    # A new intake batch that repeats the chained event (what a crash between
    # the chain write and the intake ack leads to) next to a new one. The
    # atomic write is refused for the duplicate id; the sequencer falls back
    # to single writes and skips what is already chained.
    await emitter.publish(first)
    second = await emitter.emit("admin", data={"n": "second"})
    assert await emitter.flush()
    await audit_trail.wait_for(lambda r: r.id == second.id, count=1)
    records = await audit_trail.settle()
    assert_chained(records)
    assert [r.id for r in records if r.kind == "admin"] == [first.id, second.id]
    await emitter.close()
