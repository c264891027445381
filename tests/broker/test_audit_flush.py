"""AuditEmitter.flush_emitted: a caller waits for its own events, not for later ones."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from nats.aio.client import Client

from broker.codec import decode
from broker.connection import connect
from broker.runtime.audit import AuditEmitter
from broker.runtime.identity import service_connect_options
from broker.runtime.jetstream import AUDIT_INTAKE_STREAM, ensure_streams
from broker.runtime.jspub import PubAck
from broker.settings import Settings
from broker.subjects import Subjects
from schemas import AuditBatch


@pytest.fixture
async def nc(settings: Settings) -> AsyncIterator[Client]:
    conn = await connect(settings.nats_url, name="test-audit", **service_connect_options(settings))
    await ensure_streams(conn.jetstream(), settings)
    yield conn
    await conn.close()


async def test_flush_emitted_waits_for_earlier_events_only(nc: Client) -> None:
    emitter = AuditEmitter(nc, Subjects("sb"), "service:test", ack_timeout=30.0)
    real_publish = emitter._publisher.publish
    sent = asyncio.Event()
    lost: list[asyncio.Future[PubAck]] = []

    async def publish(subject: str, data: bytes, headers: Any = None) -> Any:
        if sent.is_set():  # from the second write on, no ack ever comes back
            lost.append(asyncio.get_running_loop().create_future())
            return lost[-1]
        fut = await real_publish(subject, data, headers)
        sent.set()
        return fut

    emitter._publisher.publish = publish  # type: ignore[method-assign]
    mine = await emitter.emit("usage", subject="s.1", data={"i": 1})
    waiter = asyncio.ensure_future(emitter.flush_emitted(timeout=10))
    await sent.wait()  # the waiter's batch is on the wire
    await emitter.emit("usage", subject="s.2", data={"i": 2})

    assert await waiter  # its own event is stored; the later one does not hold it up
    assert not await emitter.flush_emitted(timeout=0.2)  # the later one is not acked
    assert not await emitter.flush(timeout=0.2)  # flush waits for everything
    assert lost and emitter.pending == 1
    info = await nc.jetstream().stream_info(AUDIT_INTAKE_STREAM)
    raw = await nc.jetstream().get_msg(AUDIT_INTAKE_STREAM, seq=info.state.last_seq)
    assert decode(raw.data or b"", AuditBatch).events == (mine,)

    emitter._publisher.publish = real_publish  # type: ignore[method-assign]
    await emitter.close(timeout=0.2)


async def test_flush_emitted_with_nothing_pending_returns_at_once(nc: Client) -> None:
    emitter = AuditEmitter(nc, Subjects("sb"), "service:test")
    assert await emitter.flush_emitted(timeout=0.01)
    await emitter.emit("usage", data={"i": 1})
    assert await emitter.flush_emitted(timeout=10)
    assert emitter.pending == 0 and emitter.stats.acked == 1
    await emitter.close()
