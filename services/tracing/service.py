"""Tracing service: the single sequencer of the audit chain.

Emitters publish events to ``SB_AUDIT_IN``. This service pulls them in
batches, gives each the next position in the chain (``seq``, the hash of the
previous record, its own hash), writes it to ``SB_AUDIT`` and only then acks
the intake copy. Writes go out as atomic batches whose first message carries
``Nats-Expected-Last-Sequence``, so the stream itself refuses a batch that
would fork the chain (a second replica, a stale view after a restart); the
sequencer then reloads the head from the stream and the intake messages are
redelivered. ``Nats-Msg-Id`` (the event id) keeps a redelivered event from
being chained twice.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import time

from nats.aio.msg import Msg
from nats.js.errors import NotFoundError

from broker.codec import decode, encode
from broker.errors import PublishRefused, SchemaError
from broker.ids import new_id
from broker.replies import H_MSG_ID
from broker.runtime.consumer import PullWorker
from broker.runtime.jetstream import (
    AUDIT_INTAKE_STREAM,
    AUDIT_STREAM,
    while_jetstream_settles,
)
from broker.runtime.jspub import JetStreamPublisher, PubAck
from broker.runtime.service import Service
from broker.settings import Settings
from schemas import AuditBatch, AuditEvent
from services.tracing.chain import GENESIS, chain

__all__ = ["TracingService"]

log = logging.getLogger(__name__)

_CONSUMER = "sb-sequencer"
#: Events per atomic batch (the server's limit is 1,000).
_ATOMIC_MAX = 500
#: "atomic publish batch contains duplicate message id"
_ERR_DUPLICATE_IN_BATCH = 10201


class TracingService(Service):
    """Chains audit events from ``SB_AUDIT_IN`` into ``SB_AUDIT``.

    Args:
        settings: Settings.
        batch: Events fetched and chained per round trip.
        ack_wait: Seconds before intake messages fetched but never acked (a
            sequencer killed mid-batch) are redelivered to the next one.
    """

    name = "tracing"

    def __init__(self, settings: Settings, *, batch: int = 512, ack_wait: float = 5.0) -> None:
        super().__init__(settings)
        self.batch = batch
        self.ack_wait = ack_wait
        self.head_seq = 0
        self.head_hash = GENESIS
        self.chained = 0
        self.resyncs = 0
        self.malformed = 0
        self._worker: PullWorker | None = None
        self._publisher: JetStreamPublisher | None = None

    async def on_start(self) -> None:
        # Not js.publish_async: see broker.runtime.jspub (refusals must resolve).
        self._publisher = JetStreamPublisher(self.nc)
        await self._publisher.start()
        # A freshly created replicated stream elects its own leader after the
        # meta group answered: reading the head may have to wait for it.
        await while_jetstream_settles(
            f"for the head of {AUDIT_STREAM}", self._load_head,
            within=self.settings.connect_timeout,
        )  # fmt: skip
        self._worker = PullWorker(
            self.js,
            AUDIT_INTAKE_STREAM,
            _CONSUMER,
            self.chain_batch,
            batch=self.batch,
            ack_wait=self.ack_wait,
            settle_within=self.settings.connect_timeout,
        )
        await self._worker.start()

    async def on_stop(self) -> None:
        if self._worker is not None:
            await self._worker.stop()
        if self._publisher is not None:
            await self._publisher.stop()

    async def _load_head(self) -> None:
        info = await self.js.stream_info(AUDIT_STREAM)
        last = info.state.last_seq
        if last == 0:
            self.head_seq, self.head_hash = 0, GENESIS
            return
        try:
            raw = await self.js.get_msg(AUDIT_STREAM, seq=last)
        except NotFoundError:
            # The last record was removed (limits); trust the stream's counter.
            self.head_seq, self.head_hash = last, GENESIS
            log.error("tracing: chain head %d missing; continuing the chain from it", last)
            return
        head = decode(raw.data or b"", AuditEvent)
        self.head_seq, self.head_hash = last, head.hash

    def _events_of(self, msg: Msg) -> tuple[AuditEvent, ...]:
        try:
            item = decode(msg.data, AuditEvent | AuditBatch)  # type: ignore[arg-type]
        except SchemaError as err:
            # Never drop what reached the audit intake: chain a record of it.
            self.malformed += 1
            return (
                AuditEvent(
                    id=(msg.headers or {}).get(H_MSG_ID) or new_id(),
                    time=time.time(),
                    kind="rejected",
                    actor=self.actor,
                    subject=msg.subject,
                    data={
                        "code": err.code,
                        "message": err.message,
                        "details": err.details,
                        "raw_b64": base64.b64encode(msg.data[:4096]).decode(),
                    },
                ),
            )
        if isinstance(item, AuditBatch):
            return item.events
        assert isinstance(item, AuditEvent)
        return (item,)

    async def chain_batch(self, msgs: list[Msg]) -> None:
        """Chain and store the events of ``msgs`` in order, then ack each intake message.

        Fast path: the events go to ``SB_AUDIT`` as atomic batches (ADR-50):
        all stored or none, one ack per batch, the first write carrying
        ``Nats-Expected-Last-Sequence`` so a batch built on a stale head is
        refused whole instead of forking the chain. If a batch is refused
        because it repeats an event already chained (a redelivery after a
        crash between write and ack), the events are written one at a time
        instead, skipping those the server reports as duplicates. Intake
        messages are acked only once all their events are in the chain.
        """
        events = [event for msg in msgs for event in self._events_of(msg)]
        try:
            for start in range(0, len(events), _ATOMIC_MAX):
                chunk = events[start : start + _ATOMIC_MAX]
                try:
                    await self._write_atomic(chunk)
                except PublishRefused as err:
                    if err.details.get("err_code") != _ERR_DUPLICATE_IN_BATCH:
                        raise
                    await self._write_one_by_one(chunk)
        except (PublishRefused, TimeoutError) as exc:
            # Another sequencer moved the head, or the server is unavailable:
            # reload the head and let JetStream redeliver the whole fetch.
            log.debug("tracing: chain write refused (%r); resyncing", exc)
            self.resyncs += 1
            await self._load_head()
            for msg in msgs:
                with contextlib.suppress(Exception):
                    await msg.nak(delay=0.05)
            return
        for msg in msgs:
            with contextlib.suppress(Exception):
                await msg.ack()

    async def _write_atomic(self, events: list[AuditEvent]) -> None:
        assert self._publisher is not None
        batch_id = new_id()
        seq, prev = self.head_seq, self.head_hash
        chained: list[AuditEvent] = []
        ack_fut: asyncio.Future[PubAck] | None = None
        last = len(events) - 1
        for i, raw_event in enumerate(events):
            event = chain(raw_event, seq + 1, prev)
            headers = {
                "Nats-Batch-Id": batch_id,
                "Nats-Batch-Sequence": str(i + 1),
                H_MSG_ID: event.id,
            }
            if i == 0:
                headers["Nats-Expected-Last-Sequence"] = str(self.head_seq)
            subject = self.subjects.audit_log(event.kind, event.actor)
            if i == last:
                headers["Nats-Batch-Commit"] = "1"
                ack_fut = await self._publisher.publish(subject, encode(event), headers)
            else:
                await self.nc.publish(subject, encode(event), headers=headers)
            chained.append(event)
            seq, prev = seq + 1, event.hash
        assert ack_fut is not None
        try:
            ack = await asyncio.wait_for(ack_fut, timeout=10)
        except TimeoutError:
            self._publisher.forget(ack_fut)
            raise
        self.head_seq, self.head_hash = ack.seq, chained[-1].hash
        self.chained += len(chained)

    async def _write_one_by_one(self, events: list[AuditEvent]) -> None:
        assert self._publisher is not None
        await self._load_head()
        for raw_event in events:
            event = chain(raw_event, self.head_seq + 1, self.head_hash)
            headers = {H_MSG_ID: event.id, "Nats-Expected-Last-Sequence": str(self.head_seq)}
            fut = await self._publisher.publish(
                self.subjects.audit_log(event.kind, event.actor), encode(event), headers
            )
            ack = await asyncio.wait_for(fut, timeout=10)
            if ack.duplicate:
                continue  # already in the chain
            self.head_seq, self.head_hash = ack.seq, event.hash
            self.chained += 1
