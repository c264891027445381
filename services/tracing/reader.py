"""Reading the chained audit trail (``SB_AUDIT``): pure functions over a JetStream context.

Used by the operator side (``signalbox audit tail``, ``audit replay``,
``audit verify``, ``signalbox demo``). Every record in ``SB_AUDIT`` is a
:class:`schemas.AuditEvent` on ``<prefix>.audit.log.<kind>.<actor>``; the
stream sequence equals the record's ``seq`` in the hash chain.

Example::

    js = nc.jetstream()
    subject = audit_filter(Subjects("sb"), kind="decision")
    start = await start_of_last(js, subject, 10)
    async for event in follow(js, subject, start_seq=start):
        print(event.seq, event.kind, event.actor)
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import typing
from collections.abc import AsyncGenerator, Callable

import nats.errors
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError as JsNotFoundError

from broker.codec import decode
from broker.errors import InvalidInput, NotFound, SchemaError
from broker.jetstream import AUDIT_STREAM
from broker.subjects import Subjects, validate_token
from schemas import AuditEvent, AuditKind

__all__ = [
    "AUDIT_KINDS",
    "audit_filter",
    "count_from",
    "follow",
    "read",
    "scan",
    "start_of_last",
    "stream_bounds",
]

#: Records :func:`scan` holds undecoded before it pauses delivery.
_SCAN_BUFFER = 4096

#: Every audit kind, in the order of :data:`schemas.AuditKind`.
AUDIT_KINDS: tuple[str, ...] = typing.get_args(AuditKind)


def audit_filter(subjects: Subjects, *, kind: str | None = None, actor: str | None = None) -> str:
    """Subject filter over ``SB_AUDIT`` for one kind and/or one actor (``*`` when unset).

    Raises:
        InvalidInput: ``kind`` is not an audit kind, or ``actor`` is not a
            valid subject token.
    """
    if kind is not None and kind not in AUDIT_KINDS:
        raise InvalidInput(
            f"unknown audit kind {kind!r}; choose from {', '.join(AUDIT_KINDS)}",
            details={"kind": kind, "kinds": list(AUDIT_KINDS)},
        )
    if kind is not None and actor is not None:
        return subjects.audit_log(kind, validate_token(actor, what="agent name"))
    actor_token = validate_token(actor, what="agent name") if actor is not None else "*"
    # Subjects builds concrete subjects only; the wildcard filter shares its prefix.
    return f"{subjects.prefix}.audit.log.{kind or '*'}.{actor_token}"


async def stream_bounds(js: JetStreamContext) -> tuple[int, int]:
    """First and last sequence of ``SB_AUDIT`` (``(0, 0)``-ish when empty).

    Raises:
        NotFound: the stream does not exist (no Signalbox service ever ran there).
    """
    try:
        info = await js.stream_info(AUDIT_STREAM)
    except JsNotFoundError as exc:
        raise NotFound(
            f"there is no {AUDIT_STREAM} stream on this server; is Signalbox running there? "
            "Start it with `signalbox up`",
            details={"stream": AUDIT_STREAM},
        ) from exc
    return info.state.first_seq, info.state.last_seq


async def count_from(js: JetStreamContext, filter_subject: str, start_seq: int) -> int:
    """How many records matching ``filter_subject`` have a sequence >= ``start_seq``.

    Asks the server (an ephemeral consumer's pending count), so nothing is
    transferred whatever the stream's size.
    """
    info = await js.add_consumer(
        AUDIT_STREAM,
        ConsumerConfig(
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
            opt_start_seq=max(1, start_seq),
            filter_subject=filter_subject,
            ack_policy=AckPolicy.NONE,
            inactive_threshold=10.0,
        ),
    )
    # The consumer only existed to be counted; the inactivity threshold cleans
    # up after us if this delete is lost.
    with contextlib.suppress(Exception):
        await js.delete_consumer(AUDIT_STREAM, info.name)
    return int(info.num_pending or 0)


async def start_of_last(js: JetStreamContext, filter_subject: str, last: int) -> int:
    """Sequence to start reading at so that the first records read are the last ``last`` ones.

    ``last <= 0`` means "only records written from now on". Filtered views
    are found by binary search on the server's pending counts (a few round
    trips, whatever the stream's size).

    Raises:
        NotFound: no ``SB_AUDIT`` stream.
    """
    first, last_seq = await stream_bounds(js)
    if last <= 0 or last_seq == 0:
        return last_seq + 1
    first = max(first, 1)
    guess = max(first, last_seq - last + 1)
    # Unfiltered, or the newest records all match: one probe settles it.
    if guess == first or await count_from(js, filter_subject, guess) >= last:
        return guess
    if await count_from(js, filter_subject, first) <= last:
        return first
    # count_from is non-increasing in the sequence and drops by at most one per
    # step: find the largest start whose count still reaches ``last``.
    lo, hi = first, guess
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if await count_from(js, filter_subject, mid) >= last:
            lo = mid
        else:
            hi = mid - 1
    return lo


async def follow(
    js: JetStreamContext,
    filter_subject: str,
    *,
    start_seq: int = 1,
    idle_timeout: float | None = None,
    on_error: Callable[[int, SchemaError], None] | None = None,
) -> AsyncGenerator[AuditEvent, None]:
    """Yield records matching ``filter_subject`` from ``start_seq`` on, in order, as they come.

    Uses an ordered push consumer (ephemeral, no acks, self-healing on gaps),
    so it never disturbs the services' durable consumers.

    Args:
        js: JetStream context.
        filter_subject: See :func:`audit_filter`.
        start_seq: First stream sequence to read.
        idle_timeout: Stop after this many seconds without a new record
            (``None``: follow until the caller stops iterating).
        on_error: Called with ``(stream sequence, error)`` for a record that
            does not decode; when unset such a record raises.

    Raises:
        SchemaError: an undecodable record and no ``on_error``
            (``details['seq']`` is its sequence).
        NotFound: no ``SB_AUDIT`` stream.
    """
    try:
        sub = await js.subscribe(
            filter_subject,
            stream=AUDIT_STREAM,
            ordered_consumer=True,
            config=ConsumerConfig(
                deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
                opt_start_seq=max(1, start_seq),
            ),
        )
    except JsNotFoundError as exc:
        raise NotFound(
            f"there is no {AUDIT_STREAM} stream on this server; start Signalbox with "
            "`signalbox up`",
            details={"stream": AUDIT_STREAM},
        ) from exc
    try:
        while True:
            try:
                msg = await sub.next_msg(timeout=idle_timeout)
            except nats.errors.TimeoutError:
                return
            seq = msg.metadata.sequence.stream
            try:
                event = decode(msg.data, AuditEvent)
            except SchemaError as err:
                err.details["seq"] = seq
                if on_error is None:
                    raise
                on_error(seq, err)
                continue
            yield event
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()


async def read(
    js: JetStreamContext,
    filter_subject: str,
    *,
    start_seq: int = 1,
    count: int,
    timeout: float,
) -> list[AuditEvent]:
    """Read up to ``count`` records from ``start_seq``, waiting at most ``timeout`` seconds.

    Records still being chained are waited for, so this is how a caller
    waits for the tracing service to catch up: it returns early once
    ``count`` records are in, else whatever arrived before the deadline.
    """
    out: list[AuditEvent] = []
    if count <= 0:
        return out
    stream = follow(js, filter_subject, start_seq=start_seq)
    try:
        async with asyncio.timeout(timeout):
            async for event in stream:
                out.append(event)
                if len(out) >= count:
                    break
    except TimeoutError:
        pass
    finally:
        await stream.aclose()
    return out


async def scan(
    js: JetStreamContext,
    filter_subject: str,
    *,
    start_seq: int = 1,
    start_time: float | None = None,
    stream: str = AUDIT_STREAM,
    buffer: int = _SCAN_BUFFER,
) -> AsyncGenerator[tuple[int, AuditEvent | SchemaError, bytes], None]:
    """Yield ``(stream sequence, record, stored bytes)`` for what ``stream`` holds now, in order.

    An ordered consumer (ephemeral, no acks, flow-controlled) from
    ``start_seq``, or from the first record stored at or after ``start_time``
    (Unix seconds) when given; it stops at the record that was last when it
    started, so a busy trail still ends. Messages are taken by a subscription
    callback and handed over in batches (several times faster than one
    ``next_msg`` per record); at most ``buffer`` wait undecoded, beyond which
    delivery pauses (flow control). A record that does not decode is yielded
    as its :class:`SchemaError` (``details['seq']`` set) rather than raised:
    the verifier reports it, replay warns about it.

    Raises:
        NotFound: no such stream.
    """
    if start_time is not None:
        config = ConsumerConfig(
            deliver_policy=DeliverPolicy.BY_START_TIME,
            opt_start_time=datetime.datetime.fromtimestamp(start_time, datetime.UTC),
        )
    else:
        config = ConsumerConfig(
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=max(1, start_seq)
        )
    pending: list[Msg] = []
    arrived = asyncio.Event()
    drained = asyncio.Event()

    async def take(msg: Msg) -> None:
        pending.append(msg)
        arrived.set()
        if len(pending) >= buffer:
            drained.clear()
            await drained.wait()

    try:
        sub = await js.subscribe(
            filter_subject,
            stream=stream,
            ordered_consumer=True,
            config=config,
            cb=take,
            pending_msgs_limit=-1,
            pending_bytes_limit=-1,
        )
    except JsNotFoundError as exc:
        raise NotFound(
            f"there is no {stream} stream on this server; start Signalbox with `signalbox up`",
            details={"stream": stream},
        ) from exc
    try:
        info = await sub.consumer_info()
        # (delivery may already have begun: pending then counts only the rest)
        delivered = info.delivered.consumer_seq if info.delivered is not None else 0
        if not info.num_pending and not delivered:
            return
        while True:
            await arrived.wait()
            batch = pending[:]
            pending.clear()
            arrived.clear()
            drained.set()
            for msg in batch:
                seq, left = _position(msg)
                record: AuditEvent | SchemaError
                try:
                    record = decode(msg.data, AuditEvent)
                except SchemaError as err:
                    err.details["seq"] = seq
                    record = err
                yield seq, record, msg.data
                if not left:
                    return
    finally:
        drained.set()
        with contextlib.suppress(Exception):
            await sub.unsubscribe()


def _position(msg: Msg) -> tuple[int, int]:
    """Stream sequence and records pending after ``msg``, from its reply subject.

    ``$JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<time>.<pending>``
    (and the longer form with domain and account hash): parsed directly,
    being several times cheaper than ``msg.metadata``.
    """
    tokens = (msg.reply or "").split(".")
    if len(tokens) == 9:
        return int(tokens[5]), int(tokens[8])
    meta = msg.metadata
    return meta.sequence.stream, meta.num_pending
