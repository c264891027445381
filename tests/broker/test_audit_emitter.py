"""AuditEmitter: events reach the intake stream, acknowledged, once each."""

from __future__ import annotations

from collections.abc import AsyncIterator

import msgspec
import pytest
from nats.aio.client import Client

from broker.audit import AuditEmitter, new_id
from broker.codec import decode
from broker.connection import connect
from broker.jetstream import AUDIT_INTAKE_STREAM, ensure_streams
from broker.settings import Settings
from broker.subjects import Subjects
from schemas import AuditEvent, CallOutcome


@pytest.fixture
async def nc(settings: Settings) -> AsyncIterator[Client]:
    conn = await connect(settings.nats_url, name="test-audit")
    await ensure_streams(conn.jetstream(), settings)
    yield conn
    await conn.close()


async def _intake(nc: Client) -> list[tuple[str, AuditEvent]]:
    js = nc.jetstream()
    info = await js.stream_info(AUDIT_INTAKE_STREAM)
    out = []
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        raw = await js.get_msg(AUDIT_INTAKE_STREAM, seq=seq)
        out.append((raw.subject or "", decode(raw.data or b"", AuditEvent)))
    return out


async def test_emitted_events_are_acknowledged_and_stored(nc: Client) -> None:
    emitter = AuditEmitter(nc, Subjects("sb"), "service:test")
    sent = [await emitter.emit("decision", subject=f"s.{i}", data={"i": i}) for i in range(25)]
    assert await emitter.flush()
    assert emitter.pending == 0
    assert emitter.stats.emitted == 25
    assert emitter.stats.acked == 25
    assert emitter.stats.failed == 0
    assert emitter.stats.by_kind["decision"] == 25
    stored = await _intake(nc)
    assert [ev for _, ev in stored] == sent
    assert {subject for subject, _ in stored} == {"sb.audit.in.decision.service_test"}
    await emitter.close()


async def test_a_republished_event_is_stored_once(nc: Client) -> None:
    emitter = AuditEmitter(nc, Subjects("sb"), "agent-a")
    event = emitter.event("call", data={"n": 1})
    await emitter.publish(event)
    await emitter.publish(event)  # e.g. a retry after a lost ack
    assert await emitter.flush()
    assert [ev.id for _, ev in await _intake(nc)] == [event.id]
    await emitter.close()


async def test_events_carry_structs_as_builtins_and_a_chosen_actor(nc: Client) -> None:
    emitter = AuditEmitter(nc, Subjects("sb"), "service:policy")
    outcome = CallOutcome(call_id="c", caller="a", target="b", capability="x", ok=True,
                          latency_ms=1.5)  # fmt: skip
    event = await emitter.emit(
        "call", data=outcome, actor="alice", trace_id="t" * 32, event_id="fixed-id"
    )
    assert event.id == "fixed-id"
    assert event.actor == "alice"
    assert event.data == msgspec.to_builtins(outcome)
    assert event.seq == 0 and event.hash == ""  # chaining is the sequencer's job
    assert await emitter.flush()
    [(subject, stored)] = await _intake(nc)
    assert subject == "sb.audit.in.call.alice"
    assert stored == event
    await emitter.close()


async def test_flush_with_nothing_emitted_is_immediately_true(nc: Client) -> None:
    emitter = AuditEmitter(nc, Subjects("sb"), "x")
    assert await emitter.flush(timeout=0)
    await emitter.close()


def test_new_ids_are_unique_hex() -> None:
    ids = {new_id() for _ in range(1000)}
    assert len(ids) == 1000
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in ids)
