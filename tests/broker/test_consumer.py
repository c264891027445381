"""PullWorker: pipelined pull delivery, every message handled and acked, failures redelivered."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import pytest
from conftest import eventually
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.api import StorageType, StreamConfig

from broker.consumer import PullWorker

if TYPE_CHECKING:
    from conftest import ServiceConnector

STREAM = "TEST_WORK"


@pytest.fixture
async def nc(service_nc: ServiceConnector) -> Client:
    conn: Client = await service_nc("test-consumer")
    await conn.jetstream().add_stream(
        StreamConfig(name=STREAM, subjects=["test.work.*"], storage=StorageType.MEMORY)
    )
    return conn


async def _publish(nc: Client, n: int) -> None:
    js = nc.jetstream()
    for i in range(n):
        await js.publish(f"test.work.{i % 3}", str(i).encode())


async def _settled(nc: Client, durable: str) -> bool:
    info = await nc.jetstream().consumer_info(STREAM, durable)
    return bool(info.num_pending == 0 and info.num_ack_pending == 0)


async def test_every_message_is_handled_in_batches_and_acked(nc: Client) -> None:
    handled: list[int] = []
    sizes: list[int] = []

    async def handler(msgs: list[Msg]) -> None:
        sizes.append(len(msgs))
        handled.extend(int(m.data) for m in msgs)
        for m in msgs:
            await m.ack()

    worker = PullWorker(nc.jetstream(), STREAM, "w", handler, batch=32, concurrency=2)
    await worker.start()
    try:
        await _publish(nc, 500)
        await eventually(lambda: len(handled) >= 500, "500 handled")
        await eventually(lambda: _settled(nc, "w"), "the consumer to settle")
    finally:
        await worker.stop()
    assert sorted(handled) == list(range(500))  # each once: nothing failed
    assert max(sizes) <= 32
    assert worker.delivered == 500 and worker.failures == 0


async def test_a_batch_that_raises_is_redelivered_while_others_complete(nc: Client) -> None:
    release = asyncio.Event()
    stuck: list[int] = []
    acked: list[int] = []

    async def handler(msgs: list[Msg]) -> None:
        if not stuck:
            stuck.extend(int(m.data) for m in msgs)
            await release.wait()  # still "in the handler" while the next batches run
            raise RuntimeError("store failed")
        for m in msgs:
            await m.ack()
        acked.extend(int(m.data) for m in msgs)

    worker = PullWorker(nc.jetstream(), STREAM, "r", handler, batch=10, concurrency=2, ack_wait=2.0)
    await worker.start()
    try:
        await _publish(nc, 40)
        # The second slot keeps going while the first batch is stuck...
        await eventually(
            lambda: stuck and set(acked) >= set(range(40)) - set(stuck), "the other batches"
        )
        # ...and once the stuck one fails, it comes back and is acked too.
        release.set()
        await eventually(lambda: set(acked) == set(range(40)), "the failed batch redelivered")
        await eventually(lambda: _settled(nc, "r"), "the consumer to settle")
    finally:
        await worker.stop()
    assert worker.failures == 1
    info = await nc.jetstream().consumer_info(STREAM, "r")
    assert info.delivered.consumer_seq >= 40 + len(stuck)  # the failed batch twice


async def test_stop_hands_buffered_messages_back_at_once(nc: Client) -> None:
    gate = asyncio.Event()
    handled: list[int] = []

    async def slow(msgs: list[Msg]) -> None:
        await gate.wait()
        for m in msgs:
            await m.ack()
        handled.extend(int(m.data) for m in msgs)

    # One batch at a time and a long ack_wait: whatever is buffered when the
    # worker stops must be handed back (nak), not left for 30 s.
    first = PullWorker(nc.jetstream(), STREAM, "s", slow, batch=10, ack_wait=30.0, prefetch=40)
    await first.start()
    await _publish(nc, 40)
    await eventually(lambda: first.delivered >= 40, "40 delivered to the first worker")
    stopping = asyncio.ensure_future(first.stop())
    await asyncio.sleep(0)
    gate.set()  # its batch in the handler finishes and is acked
    await stopping
    assert 1 <= len(handled) <= 10  # the one batch in its handler

    async def fast(msgs: list[Msg]) -> None:
        for m in msgs:
            await m.ack()
        handled.extend(int(m.data) for m in msgs)

    second = PullWorker(nc.jetstream(), STREAM, "s", fast, batch=10, ack_wait=30.0)
    await second.start()
    try:
        await eventually(lambda: len(handled) >= 40, "the rest, redelivered", timeout=10)
    finally:
        await second.stop()
    assert sorted(handled) == list(range(40))
