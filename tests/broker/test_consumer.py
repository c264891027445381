"""PullWorker: pipelined pull delivery, every message handled and acked, failures redelivered."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.api import StorageType, StreamConfig
from support import eventually

from broker.runtime.consumer import PullWorker

if TYPE_CHECKING:
    from support import ServiceConnector

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
        # The second slot keeps going while the first batch is stuck (full batches
        # only: a partial one waits for the running batch)...
        await eventually(lambda: stuck and len(acked) >= 10, "other batches")
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


async def test_a_slow_batch_is_kept_in_progress_not_redelivered(nc: Client) -> None:
    seen: list[int] = []

    async def slow(msgs: list[Msg]) -> None:
        seen.extend(int(m.data) for m in msgs)
        await asyncio.sleep(3.0)  # three times ack_wait: progress acks keep it ours
        for m in msgs:
            await m.ack()

    worker = PullWorker(nc.jetstream(), STREAM, "p", slow, batch=10, ack_wait=1.0)
    await worker.start()
    try:
        await _publish(nc, 10)
        await eventually(lambda: _settled(nc, "p"), "the slow batch to be acked")
    finally:
        await worker.stop()
    assert sorted(seen) == list(range(10))  # once each: never redelivered meanwhile
    assert worker.progress_acks >= 10
    info = await nc.jetstream().consumer_info(STREAM, "p")
    assert info.num_redelivered == 0


async def test_a_dead_workers_batch_comes_back_after_the_short_ack_wait(nc: Client) -> None:
    hung = asyncio.Event()

    async def dies(msgs: list[Msg]) -> None:
        hung.set()
        await asyncio.Event().wait()  # never acks: the process "died" in the handler

    first = PullWorker(nc.jetstream(), STREAM, "d", dies, batch=10, ack_wait=1.0, prefetch=10)
    await first.start()
    await _publish(nc, 10)
    await hung.wait()
    # Kill it: no nak, no acks, no progress acks, no more pulls (as kill -9 would).
    for task in (first._task, first._alive, *first._handling):
        if task is not None:
            task.cancel()
    if first._sub is not None:
        await first._sub.unsubscribe()
    handled: list[int] = []

    async def fast(msgs: list[Msg]) -> None:
        for m in msgs:
            await m.ack()
        handled.extend(int(m.data) for m in msgs)

    second = PullWorker(nc.jetstream(), STREAM, "d", fast, batch=10, ack_wait=1.0)
    await second.start()
    try:  # within seconds (ack_wait, the dead pull request's expiry), not 30 s
        await eventually(lambda: set(handled) == set(range(10)), "redelivery", timeout=15)
    finally:
        await second.stop()


async def test_an_existing_consumer_takes_the_new_ack_wait(nc: Client) -> None:
    async def ack(msgs: list[Msg]) -> None:
        for m in msgs:
            await m.ack()

    old = PullWorker(nc.jetstream(), STREAM, "u", ack, ack_wait=30.0)
    await old.start()
    await old.stop()
    new = PullWorker(nc.jetstream(), STREAM, "u", ack, ack_wait=5.0)
    await new.start()
    await new.stop()
    info = await nc.jetstream().consumer_info(STREAM, "u")
    assert info.config.ack_wait == 5.0


async def test_an_outage_is_one_warning_not_a_traceback_per_batch(
    nc: Client, caplog: pytest.LogCaptureFixture
) -> None:
    import nats.errors

    failing = 3

    async def handler(msgs: list[Msg]) -> None:
        nonlocal failing
        if failing:
            failing -= 1
            raise nats.errors.TimeoutError  # the store or JetStream is away
        for m in msgs:
            await m.ack()

    worker = PullWorker(nc.jetstream(), STREAM, "o", handler, batch=5, ack_wait=1.0)
    with caplog.at_level("WARNING", logger="broker.runtime.consumer"):
        await worker.start()
        try:
            await _publish(nc, 5)
            await eventually(lambda: _settled(nc, "o"), "the batch after the outage")
        finally:
            await worker.stop()
    records = [r for r in caplog.records if r.name == "broker.runtime.consumer"]
    assert [r.levelname for r in records] == ["WARNING", "WARNING"]  # failed; recovered
    assert all(r.exc_info is None for r in records)
    assert "after 3 failed" in records[1].getMessage()
