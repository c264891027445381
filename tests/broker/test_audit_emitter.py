"""AuditEmitter: events reach the intake stream in batches, acknowledged, once each."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import msgspec
import pytest
from nats.aio.client import Client

from broker.codec import decode
from broker.connection import connect
from broker.ids import new_id
from broker.runtime.audit import AuditEmitter
from broker.runtime.identity import service_connect_options
from broker.runtime.jetstream import AUDIT_INTAKE_STREAM, ensure_streams
from broker.settings import Settings
from broker.subjects import Subjects
from schemas import AuditBatch, AuditEvent, CallOutcome


@pytest.fixture
async def nc(settings: Settings) -> AsyncIterator[Client]:
    conn = await connect(settings.nats_url, name="test-audit", **service_connect_options(settings))
    await ensure_streams(conn.jetstream(), settings)
    yield conn
    await conn.close()


async def _batches(nc: Client) -> list[tuple[str, AuditBatch]]:
    js = nc.jetstream()
    info = await js.stream_info(AUDIT_INTAKE_STREAM)
    out = []
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        raw = await js.get_msg(AUDIT_INTAKE_STREAM, seq=seq)
        out.append((raw.subject or "", decode(raw.data or b"", AuditBatch)))
    return out


async def _intake(nc: Client) -> list[tuple[str, AuditEvent]]:
    return [(subject, ev) for subject, batch in await _batches(nc) for ev in batch.events]


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
    assert {subject for subject, _ in stored} == {"sb.audit.in.batch.service_test"}
    await emitter.close()


async def test_events_emitted_together_share_one_batch(nc: Client) -> None:
    emitter = AuditEmitter(nc, Subjects("sb"), "service:test", max_batch=10, linger=60)
    for i in range(25):
        await emitter.emit("call", data={"i": i})
    # Two full batches shipped at once; the last 5 wait for flush (linger is long).
    assert emitter.stats.batches == 2
    assert await emitter.flush()
    batches = await _batches(nc)
    assert [len(batch.events) for _, batch in batches] == [10, 10, 5]
    assert len({batch.id for _, batch in batches}) == 3
    await emitter.close()


async def test_a_resent_batch_is_stored_once(nc: Client) -> None:
    emitter = AuditEmitter(nc, Subjects("sb"), "agent-a", linger=60)
    await emitter.emit("call", data={"n": 1})
    emitter._ship()
    [(batch_id, entry)] = emitter._inflight.items()
    # What the retry loop does when an ack is lost: send the same batch again.
    await emitter._send(batch_id, entry)
    assert await emitter.flush()
    assert len(await _batches(nc)) == 1
    assert emitter.stats.acked == 1
    await emitter.close()


async def test_a_refused_batch_is_retried_until_it_is_stored(nc: Client) -> None:
    # No stream captures "zz.audit.in.>" yet: the server answers 503.
    emitter = AuditEmitter(nc, Subjects("zz"), "agent-a", ack_timeout=0.1)
    await emitter.emit("call", data={"n": 1})
    assert not await emitter.flush(timeout=0.5)
    assert emitter.stats.failed >= 1
    assert emitter.pending == 1
    await nc.jetstream().add_stream(name="ZZ_AUDIT_IN", subjects=["zz.audit.in.>"])
    assert await emitter.flush(timeout=5)
    assert emitter.stats.retried >= 1
    info = await nc.jetstream().stream_info("ZZ_AUDIT_IN")
    assert info.state.messages == 1
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
    assert subject == "sb.audit.in.batch.service_policy"  # the emitter ships batches
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


# -- write-ahead (the decisions of calls about to be forwarded) --------------------------


async def test_a_written_ahead_event_is_stored_when_the_call_returns(nc: Client) -> None:
    emitter = AuditEmitter(nc, Subjects("sb"), "service:test", linger=60)
    ev = await emitter.write_ahead("decision", timeout=5, data={"call_id": "c1"})
    # Stored already: no flush, no linger (60 s) waited for.
    assert [e for _, e in await _intake(nc)] == [ev]
    assert emitter.pending == 0
    await emitter.close()


async def test_concurrent_write_aheads_are_group_committed(nc: Client) -> None:
    emitter = AuditEmitter(nc, Subjects("sb"), "service:test", linger=60)
    events = await asyncio.gather(
        *(emitter.write_ahead("decision", timeout=5, data={"i": i}) for i in range(200))
    )
    stored = [e for _, e in await _intake(nc)]
    assert sorted(e.id for e in stored) == sorted(e.id for e in events)
    # One in flight at a time: those that arrive meanwhile share the next batch.
    batches = await _batches(nc)
    assert len(batches) < 20, [len(b.events) for _, b in batches]
    assert emitter.stats.acked == 200
    await emitter.close()


async def test_a_write_ahead_never_overtakes_an_earlier_event(nc: Client) -> None:
    emitter = AuditEmitter(nc, Subjects("sb"), "service:test", linger=60)
    first = await emitter.emit("decision", data={"effect": "needs_approval"})
    second = await emitter.write_ahead("decision", timeout=5, data={"effect": "allow"})
    assert [e for _, e in await _intake(nc)] == [first, second]
    await emitter.close()


async def test_a_write_ahead_that_cannot_be_stored_times_out(
    nc: Client, settings: Settings
) -> None:
    # No stream listens on this prefix: JetStream never acknowledges.
    emitter = AuditEmitter(nc, Subjects("nostream"), "service:test", ack_timeout=0.2)
    with pytest.raises(TimeoutError):
        await emitter.write_ahead("decision", timeout=0.5, data={"call_id": "lost"})
    assert emitter.pending == 1  # still queued: stored if the server comes back
    emitter._inflight.clear()  # nothing will ever take it; let close() finish at once
    emitter._wal.clear()
    await emitter.close(timeout=0.1)
