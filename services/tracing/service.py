"""Tracing service: the single sequencer of the audit chain.

Emitters publish events to ``SB_AUDIT_IN``. This service pulls them in
batches, gives each the next position in the chain (``seq``, the hash of the
previous record, its own hash), writes it to ``SB_AUDIT`` and only then acks
the intake copy. Each write carries ``Nats-Expected-Last-Sequence`` (and,
after the first write of a batch, ``Nats-Expected-Last-Msg-Id`` naming its
predecessor), so the stream itself refuses a write that would fork the chain
(a second replica, a stale view after a restart); the sequencer then reloads
the head from the stream and retries. ``Nats-Msg-Id`` (the event id) makes a redelivered
event a no-op instead of a duplicate record.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import time
from typing import Any

import nats.errors
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.api import AckPolicy, ConsumerConfig, PubAck
from nats.js.errors import APIError, NoStreamResponseError, NotFoundError

from broker.audit import new_id
from broker.codec import decode, encode
from broker.errors import SchemaError
from broker.jetstream import AUDIT_INTAKE_STREAM, AUDIT_STREAM
from broker.replies import H_MSG_ID
from broker.service import Service
from broker.settings import Settings
from schemas import AuditEvent
from services.tracing.chain import GENESIS, chain

__all__ = ["TracingService"]

log = logging.getLogger(__name__)

_CONSUMER = "sb-sequencer"


class TracingService(Service):
    """Chains audit events from ``SB_AUDIT_IN`` into ``SB_AUDIT``.

    Args:
        settings: Settings.
        batch: Events fetched and chained per round trip.
    """

    name = "tracing"

    def __init__(self, settings: Settings, *, batch: int = 512) -> None:
        super().__init__(settings)
        self.batch = batch
        self.head_seq = 0
        self.head_hash = GENESIS
        self.chained = 0
        self.resyncs = 0
        self.malformed = 0
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self._acks: dict[str, asyncio.Future[PubAck]] = {}
        self._ack_inbox = ""
        self._ack_sub: Subscription | None = None
        self._next_ack = 0

    async def on_start(self) -> None:
        self._ack_inbox = self.nc.new_inbox()
        self._ack_sub = await self.nc.subscribe(f"{self._ack_inbox}.*", cb=self._on_ack)
        await self.js.add_consumer(
            AUDIT_INTAKE_STREAM,
            ConsumerConfig(
                durable_name=_CONSUMER,
                ack_policy=AckPolicy.EXPLICIT,
                ack_wait=30,
                max_ack_pending=self.batch * 8,
                max_deliver=-1,
            ),
        )
        self._sub = await self.js.pull_subscribe_bind(_CONSUMER, stream=AUDIT_INTAKE_STREAM)
        await self._load_head()
        self._stopping.clear()
        self._task = asyncio.ensure_future(self._run())

    async def on_stop(self) -> None:
        self._stopping.set()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait_for(self._task, timeout=5)
        # A pull subscription has no callback draining it: unsubscribe so the
        # connection's drain does not wait on it.
        with contextlib.suppress(Exception):
            await self._sub.unsubscribe()
        if self._ack_sub is not None:
            with contextlib.suppress(Exception):
                await self._ack_sub.unsubscribe()

    async def _write(
        self, subject: str, data: bytes, headers: dict[str, str]
    ) -> asyncio.Future[PubAck]:
        """Publish to JetStream; the future gets the ack, or the server's refusal.

        Not ``js.publish_async``: nats-py 2.16 never resolves that future when
        the server refuses a write (nats-io/nats.py#985), so every chain
        conflict (two sequencers, a stale head) stalled the sequencer until a
        timeout. Writes go out in order on the one connection.
        """
        self._next_ack += 1
        token = str(self._next_ack)
        fut: asyncio.Future[PubAck] = asyncio.get_running_loop().create_future()
        self._acks[token] = fut
        fut.add_done_callback(lambda _: self._acks.pop(token, None))
        await self.nc.publish(subject, data, reply=f"{self._ack_inbox}.{token}", headers=headers)
        return fut

    async def _on_ack(self, msg: Msg) -> None:
        fut = self._acks.get(msg.subject.rsplit(".", 1)[-1])
        if fut is None or fut.done():
            return
        if (msg.headers or {}).get("Status") == "503":
            fut.set_exception(NoStreamResponseError())
            return
        try:
            resp = json.loads(msg.data)
            if "error" in resp:
                fut.set_exception(APIError(**resp["error"]))
            else:
                fut.set_result(PubAck.from_response(resp))
        except (ValueError, TypeError) as exc:
            fut.set_exception(APIError(description=f"unreadable publish ack: {exc!r}"))

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

    async def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                msgs = await self._sub.fetch(self.batch, timeout=0.5)
            except TimeoutError:  # nats-py raises its own or asyncio's, by timing
                continue
            except (nats.errors.ConnectionClosedError, asyncio.CancelledError):
                return
            except Exception as exc:
                log.warning("tracing: fetch failed: %r", exc)
                await asyncio.sleep(0.5)
                continue
            try:
                await self.chain_batch(msgs)
            except Exception:
                log.exception("tracing: chaining a batch failed; it will be redelivered")
                await asyncio.sleep(0.5)

    def _event_of(self, msg: Msg) -> AuditEvent:
        try:
            return decode(msg.data, AuditEvent)
        except SchemaError as err:
            # Never drop what reached the audit intake: chain a record of it.
            self.malformed += 1
            return AuditEvent(
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
            )

    async def chain_batch(self, msgs: list[Msg]) -> None:
        """Chain and store ``msgs`` in order, then ack them."""
        futures: list[tuple[Msg, asyncio.Future[Any], AuditEvent]] = []
        seq, prev = self.head_seq, self.head_hash
        prev_id = ""
        for msg in msgs:
            event = chain(self._event_of(msg), seq + 1, prev)
            headers = {H_MSG_ID: event.id, "Nats-Expected-Last-Sequence": str(seq)}
            if prev_id:
                # Writes are pipelined: the sequence check alone would let this
                # write land after a refused predecessor whenever another
                # sequencer's records happen to fill the gap, forking the
                # chain. Requiring our predecessor's id as the stream's last
                # message closes that; the batch's first write follows a head
                # read from (or acked by) the stream, so the sequence suffices.
                headers["Nats-Expected-Last-Msg-Id"] = prev_id
            fut = await self._write(
                self.subjects.audit_log(event.kind, event.actor), encode(event), headers
            )
            futures.append((msg, fut, event))
            seq, prev, prev_id = seq + 1, event.hash, event.id
        resync = False
        for msg, fut, event in futures:
            try:
                ack = await asyncio.wait_for(fut, timeout=10)
            except (TimeoutError, APIError, nats.errors.Error) as exc:
                # Wrong last sequence (someone else wrote) or a server problem:
                # redeliver this one; everything after it failed the same check.
                log.debug("tracing: chain write of %s refused: %r", event.id, exc)
                resync = True
                with contextlib.suppress(Exception):
                    await msg.nak(delay=0.05)
                continue
            if ack.duplicate:
                # Already chained before a restart: the intake copy is done.
                resync = True
                await msg.ack()
                continue
            if resync:
                # Stored after an earlier refusal cannot happen with expected-seq
                # checks, but never ack what we did not see stored in order.
                await msg.nak()
                continue
            self.head_seq, self.head_hash = ack.seq, event.hash
            self.chained += 1
            await msg.ack()
        if resync:
            self.resyncs += 1
            await self._load_head()
