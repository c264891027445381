"""``reader.OrderedRead`` / ``scan_raw`` / ``scan``: ordered, complete, self-healing reads.

Against a real server: a plain stream filled by the test, read through the
push consumer on a core subscription. Lost messages (dropped before the
reader sees them), a consumer deleted under the reader, flow control and
filters must all end in every record exactly once, in stream order.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import nats
import pytest
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import DeliverPolicy, StreamConfig

from broker.codec import encode
from broker.connection import SessionClient, Status
from broker.errors import NotFound, SchemaError
from broker.runtime.identity import service_connect_options
from broker.settings import Settings
from schemas import AuditEvent
from services.tracing.reader import OrderedRead, follow, scan, scan_raw

if TYPE_CHECKING:
    from support import ServiceConnector

STREAM = "T_ORDERED"
#: Short heartbeats: a lost consumer is noticed after two (well under a second).
HEARTBEAT = 0.2


@pytest.fixture(params=["session-client", "plain-nats-py"])
async def js(
    request: pytest.FixtureRequest, service_nc: ServiceConnector, settings: Settings
) -> AsyncIterator[JetStreamContext]:
    """On Signalbox's client (raw subscriptions) and on a plain nats-py client (the
    reader's fallback: nats-py's messages), the same behaviour."""
    if request.param == "session-client":
        nc: Client = await service_nc()
    else:
        nc = await nats.connect(settings.nats_url or "", **service_connect_options(settings))
        assert not isinstance(nc, SessionClient)
    js = nc.jetstream(publish_async_max_pending=512)
    await js.add_stream(StreamConfig(name=STREAM, subjects=["t.ordered.>"]))
    yield js
    with contextlib.suppress(Exception):
        await js.delete_stream(STREAM)
    if request.param != "session-client":
        await nc.close()


async def fill(js: JetStreamContext, n: int, *, size: int = 64, start: int = 0) -> None:
    """``n`` messages ``m<i>`` (padded to ``size`` bytes), alternately on ``.a`` and ``.b``,
    each with headers like the sequencer's."""
    for i in range(start, start + n):
        body = f"m{i}".encode().ljust(size, b".")
        await js.publish_async(f"t.ordered.{'ab'[i % 2]}", body, headers={"Nats-Msg-Id": f"id-{i}"})
    await js.publish_async_completed()


async def read_raw(
    js: JetStreamContext, subject: str = "t.ordered.>", *, stream: str = STREAM, **kw: float
) -> list[int]:
    seqs: list[int] = []
    async with contextlib.aclosing(
        scan_raw(js, subject, stream=stream, heartbeat=HEARTBEAT, **kw)  # type: ignore[arg-type]
    ) as batches:
        async for batch in batches:
            for seq, data in batch:
                assert data.startswith(f"m{seq - 1}.".encode())
                seqs.append(seq)
    return seqs


async def drain(reader: OrderedRead, count: int) -> list[int]:
    """Stream sequences of the next ``count`` messages ``reader`` delivers."""
    seqs: list[int] = []
    while len(seqs) < count:
        batch = await reader.next_batch()
        assert batch, "the reader ended early"
        seqs += [seq for seq, _left, _data in batch]
    return seqs


async def test_reads_everything_in_order_then_stops(js: JetStreamContext) -> None:
    await fill(js, 300)
    assert await read_raw(js) == list(range(1, 301))
    assert await read_raw(js, start_seq=250) == list(range(250, 301))
    # Server-side filter: only the .b messages (odd sequences... of i, even seqs).
    assert await read_raw(js, "t.ordered.b") == list(range(2, 301, 2))
    assert await read_raw(js, start_seq=301) == []
    assert await read_raw(js, start_time=4102444800.0) == []  # 2100: nothing yet


async def test_an_empty_or_missing_stream(js: JetStreamContext) -> None:
    assert await read_raw(js) == []
    with pytest.raises(NotFound):
        await read_raw(js, stream="T_NOPE")


async def test_stops_at_what_was_last_when_it_started(js: JetStreamContext) -> None:
    await fill(js, 20)
    seqs: list[int] = []
    async with contextlib.aclosing(
        scan_raw(js, "t.ordered.>", stream=STREAM, heartbeat=HEARTBEAT)
    ) as batches:
        async for batch in batches:
            if not seqs:
                await fill(js, 20, start=20)  # written while reading: not part of this read
            seqs += [seq for seq, _ in batch]
    assert seqs == list(range(1, 21))


def _lose(monkeypatch: pytest.MonkeyPatch, seq: int) -> list[str]:
    """Make the reader never see stream sequence ``seq`` (once), as if dropped on the way;
    returns the list its reply subject is put in when that happens."""
    lost: list[str] = []
    original = OrderedRead._deliver

    def lossy(self: OrderedRead, reply: str, data: bytes, status: Status | None) -> None:
        if not lost and status is None and reply.split(".")[5] == str(seq):
            lost.append(reply)
            return
        original(self, reply, data, status)

    monkeypatch.setattr(OrderedRead, "_deliver", lossy)
    return lost


async def test_a_lost_message_recreates_the_consumer(
    js: JetStreamContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    await fill(js, 200)
    lost = _lose(monkeypatch, 50)
    reader = OrderedRead(js, STREAM, "t.ordered.>", heartbeat=HEARTBEAT)
    try:
        assert await reader.start(deliver_policy=DeliverPolicy.ALL) == 200
        first = reader.consumer
        assert await drain(reader, 200) == list(range(1, 201))
        assert lost and reader.resets == 1
        assert reader.consumer != first
    finally:
        await reader.close()


async def test_a_lost_last_message_is_noticed_from_the_heartbeat(
    js: JetStreamContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Nothing follows the lost message: only the heartbeat's last-delivered count tells.
    await fill(js, 10)
    lost = _lose(monkeypatch, 10)
    reader = OrderedRead(js, STREAM, "t.ordered.>", heartbeat=HEARTBEAT)
    try:
        await reader.start(deliver_policy=DeliverPolicy.ALL)
        assert await drain(reader, 10) == list(range(1, 11))
        assert lost and reader.resets == 1
    finally:
        await reader.close()


async def test_a_deleted_consumer_is_recreated_after_the_last_message(
    js: JetStreamContext,
) -> None:
    await fill(js, 5)
    reader = OrderedRead(js, STREAM, "t.ordered.>", heartbeat=HEARTBEAT)
    try:
        await reader.start(deliver_policy=DeliverPolicy.ALL)
        assert await drain(reader, 5) == [1, 2, 3, 4, 5]
        assert reader.consumer is not None
        await js.delete_consumer(STREAM, reader.consumer)
        await fill(js, 5, start=5)  # the deleted consumer cannot deliver these
        assert await drain(reader, 5) == [6, 7, 8, 9, 10]  # no heartbeat -> recreated at 6
        assert reader.resets == 1
    finally:
        await reader.close()
    # Closing deletes the consumer it used.
    assert await js.consumers_info(STREAM) == []


async def test_flow_control_is_answered_and_holds_the_server_back(js: JetStreamContext) -> None:
    n = 3_000
    await fill(js, n, size=4_096)  # ~12 MB: several flow-control windows
    reader = OrderedRead(js, STREAM, "t.ordered.>", heartbeat=HEARTBEAT)
    try:
        await reader.start(deliver_policy=DeliverPolicy.ALL)
        seqs: list[int] = []
        largest = 0
        while len(seqs) < n:
            batch = await reader.next_batch()
            largest = max(largest, len(batch))
            seqs += [seq for seq, _left, _data in batch]
        assert seqs == list(range(1, n + 1))
        assert reader.flow_controls >= 1
        assert reader.resets == 0
        # The server waited for our answers: never everything at once.
        assert largest < n
    finally:
        await reader.close()


async def test_scan_decodes_and_reports_undecodable_records(js: JetStreamContext) -> None:
    event = AuditEvent(id="e1", time=1.0, kind="admin", actor="x", seq=1)
    await js.publish("t.ordered.a", encode(event))
    await js.publish("t.ordered.a", b'{"type":"audit_event.v1","id":7}')
    await js.publish("t.ordered.a", b"not json")
    items = [item async for item in scan(js, "t.ordered.>", stream=STREAM, heartbeat=HEARTBEAT)]
    assert [seq for seq, _, _ in items] == [1, 2, 3]
    assert items[0][1] == event and items[0][2] == encode(event)
    wrong, garbage = items[1][1], items[2][1]
    assert isinstance(wrong, SchemaError) and wrong.details["seq"] == 2
    assert wrong.details["path"] == "$.id"
    assert isinstance(garbage, SchemaError) and garbage.details["seq"] == 3


def _event(i: int) -> AuditEvent:
    return AuditEvent(id=f"e{i}", time=float(i), kind="admin", actor="x", seq=i)


async def test_follow_reads_the_backlog_then_waits_for_new_records(
    js: JetStreamContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``follow`` (``audit tail``, ``reader.read``): the same ordered read, in follow
    mode: an empty backlog does not end it, a lost message is read again, in order;
    it ends after ``idle_timeout`` without a record."""
    for i in range(1, 4):
        await js.publish("t.ordered.a", encode(_event(i)))
    lost = _lose(monkeypatch, 5)
    seen: list[str] = []
    errors: list[int] = []
    stream = follow(js, "t.ordered.>", stream=STREAM, heartbeat=HEARTBEAT, idle_timeout=1.0,
                    on_error=lambda seq, _err: errors.append(seq))  # fmt: skip
    async with contextlib.aclosing(stream) as events:
        async for event in events:
            seen.append(event.id)
            if event.id == "e3":  # the backlog is read: now new records, one lost on the way
                for i in range(4, 7):
                    await js.publish("t.ordered.b", encode(_event(i)))
                await js.publish("t.ordered.b", b"not json")
    assert seen == ["e1", "e2", "e3", "e4", "e5", "e6"]
    assert lost and errors == [7]


async def test_follow_on_a_missing_stream_says_so(js: JetStreamContext) -> None:
    with pytest.raises(NotFound):
        async for _ in follow(js, "x.>", stream="T_NOPE", heartbeat=HEARTBEAT):
            pass


async def test_messages_that_are_not_from_the_consumer_are_ignored(js: JetStreamContext) -> None:
    await fill(js, 20)
    reader = OrderedRead(js, STREAM, "t.ordered.>", heartbeat=HEARTBEAT)
    try:
        await reader.start(deliver_policy=DeliverPolicy.ALL)
        assert reader._sub is not None
        inbox = reader._sub.subject
        nc = js._nc
        await nc.publish(inbox, b"junk")  # no reply subject
        await nc.publish(inbox, b"junk", reply="a.b")
        await nc.publish(inbox, b"junk", reply="$JS.ACK.S.C.x.y.z.t.p")  # right shape, not numbers
        assert await drain(reader, 20) == list(range(1, 21))
        assert reader.resets == 0
    finally:
        await reader.close()
