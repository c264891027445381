"""Emit audit events into the intake stream without blocking the hot path.

Every service owns one :class:`AuditEmitter`. ``emit`` only builds the
event and appends it to a buffer; the buffer is shipped as one
:class:`~schemas.AuditBatch` when it holds ``max_batch`` events or
``linger`` seconds after its first event, whichever comes first. One
JetStream write and one ack per batch instead of per event is what keeps
auditing every call affordable (see ``bench/calls.py``).

A batch that is refused or not acknowledged within ``ack_timeout`` is sent
again with the same batch id (``Nats-Msg-Id``), so the intake stream stores
it once; the sequencer also deduplicates each event by its id when it
chains it. :meth:`AuditEmitter.flush` returns once everything emitted so far
is acknowledged: callers that must not ack their own input before its audit
record is durable (the cost meter) wait on it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import msgspec
from msgspec import UNSET
from nats.aio.client import Client

from broker.codec import encode
from broker.diagnostics import cancel_and_wait
from broker.ids import new_id
from broker.replies import H_MSG_ID
from broker.runtime.jspub import JetStreamPublisher, PubAck
from broker.subjects import Subjects
from broker.telemetry import current_ids
from schemas import AuditBatch, AuditEvent, AuditKind

__all__ = ["AuditEmitter", "AuditStats"]

log = logging.getLogger(__name__)


@dataclass
class AuditStats:
    """Counters of one emitter (events, except ``batches``)."""

    emitted: int = 0
    acked: int = 0
    failed: int = 0
    retried: int = 0
    batches: int = 0
    by_kind: collections.Counter[str] = field(default_factory=collections.Counter)


@dataclass(slots=True)
class _Batch:
    subject: str
    data: bytes
    events: int
    sent_at: float
    ack: asyncio.Future[PubAck] | None = None
    #: Resent when not acknowledged within this many seconds.
    ack_timeout: float = 5.0
    #: Write-ahead callers waiting for this batch (:meth:`AuditEmitter.write_ahead`).
    waiters: list[asyncio.Future[None]] | None = None


class AuditEmitter:
    """Publishes :class:`schemas.AuditEvent` records, batched, to ``sb.audit.in.batch.<actor>``.

    Args:
        nc: Connected client.
        subjects: Subject builder.
        actor: Default actor (``service:policy``...).
        max_batch: Events per batch at most.
        linger: Seconds a buffered event may wait for company before shipping.
        ack_timeout: Seconds after which an unacknowledged batch is sent again.
    """

    def __init__(
        self,
        nc: Client,
        subjects: Subjects,
        actor: str,
        *,
        max_batch: int = 256,
        linger: float = 0.02,
        ack_timeout: float = 5.0,
        write_ahead_ack_timeout: float = 1.0,
    ) -> None:
        self._publisher = JetStreamPublisher(nc)
        self._subjects = subjects
        self.actor = actor
        self.max_batch = max_batch
        self.linger = linger
        self.ack_timeout = ack_timeout
        self.stats = AuditStats()
        self._subject = subjects.audit_intake("batch", actor)
        self._buffer: list[AuditEvent] = []
        self._timer: asyncio.TimerHandle | None = None
        self._inflight: dict[str, _Batch] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._retry_task: asyncio.Task[None] | None = None
        #: Callers of :meth:`flush_emitted`: batch ids each still waits for.
        self._waiters: list[tuple[set[str], asyncio.Future[None]]] = []
        #: Write-ahead events waiting for the lane, and whether a batch of them is in flight.
        self.write_ahead_ack_timeout = write_ahead_ack_timeout
        self._wal: list[tuple[AuditEvent, asyncio.Future[None]]] = []
        self._wal_busy = False
        #: Unix time JetStream last acknowledged a batch (0: never), for health reports.
        self.last_ack = 0.0

    def event(
        self,
        kind: AuditKind,
        *,
        subject: str = "",
        data: Any = None,
        actor: str | None = None,
        trace_id: str = "",
        policy_version: str = "",
        event_id: str | None = None,
        span_id: str | None = None,
        parent_span_id: str = "",
        via_span_id: str = "",
    ) -> AuditEvent:
        """Build an event (``data`` may be a Struct or a dict).

        Without ``span_id``, the trace and span ids come from the current hop
        (:func:`broker.telemetry.current_ids`), unless ``trace_id`` names
        another trace; ``span_id=""`` says the event belongs to no span.
        """
        if span_id is None:
            span_id = ""
            ids = current_ids()
            if ids is not None and (not trace_id or trace_id == ids.trace_id):
                trace_id, span_id = ids.trace_id, ids.span_id
                parent_span_id, via_span_id = ids.parent_span_id, ids.via_span_id
        payload: dict[str, Any]
        if data is None:
            payload = {}
        elif isinstance(data, dict):
            payload = data
        else:
            payload = msgspec.to_builtins(data)
        return AuditEvent(
            id=event_id or new_id(),
            time=time.time(),
            kind=kind,
            actor=actor or self.actor,
            subject=subject,
            trace_id=trace_id,
            span_id=span_id or UNSET,
            parent_span_id=parent_span_id or UNSET,
            via_span_id=via_span_id or UNSET,
            policy_version=policy_version,
            data=payload,
        )

    async def write_ahead(self, kind: AuditKind, *, timeout: float, **kwargs: Any) -> AuditEvent:
        """Build an event and return once JetStream has stored it (group commit).

        What must be durable before its effect (a call's decision before the
        call is forwarded). Events go out in their own lane, never behind the
        ``linger`` of :meth:`emit`: while one write-ahead batch is in flight,
        the events that arrive meanwhile wait and then go out together as the
        next, so the cost is one JetStream write (one fsync with
        ``sync_interval: always``) per batch, not per event, and an idle
        service pays one round trip. A batch not acknowledged in
        ``write_ahead_ack_timeout`` is resent (same batch id: stored once).

        Raises:
            TimeoutError: not stored within ``timeout`` seconds. The event stays
                queued and may still be stored: the caller records what it did
                instead (it did not go ahead).
        """
        ev = self.event(kind, **kwargs)
        self.stats.emitted += 1
        self.stats.by_kind[ev.kind] += 1
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._wal.append((ev, done))
        self._idle.clear()
        if not self._wal_busy:
            self._ship_wal()
        await asyncio.wait_for(asyncio.shield(done), timeout)
        return ev

    def _ship_wal(self) -> None:
        if not self._wal:
            return
        taken, self._wal = self._wal[: self.max_batch], self._wal[self.max_batch :]
        # What :meth:`emit` buffered before goes first, in the same batch: a write-ahead
        # event never overtakes an earlier one (a call's approval before its decision).
        earlier = self._buffer
        self._buffer = []
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        batch = AuditBatch(id=new_id(), events=(*earlier, *(ev for ev, _ in taken)))
        entry = _Batch(
            self._subject, encode(batch), len(batch.events), time.monotonic(),
            ack_timeout=self.write_ahead_ack_timeout, waiters=[done for _, done in taken],
        )  # fmt: skip
        self._wal_busy = True
        self._inflight[batch.id] = entry
        self.stats.batches += 1
        self._spawn(self._send(batch.id, entry))
        if self._retry_task is None or self._retry_task.done():
            self._retry_task = asyncio.ensure_future(self._retry_loop())

    async def emit(self, kind: AuditKind, **kwargs: Any) -> AuditEvent:
        """Build and buffer an event; returns it at once (no I/O on this path)."""
        ev = self.event(kind, **kwargs)
        self.add(ev)
        return ev

    def alert_unreadable(
        self,
        bucket: str,
        key: str,
        reason: str,
        *,
        effect: str,
        fix: str,
        event: str = "unreadable_record",
    ) -> AuditEvent:
        """Audit (kind ``alert``) a stored KV record nobody can use, and what is done about it.

        Synchronous (no I/O), so KV watch callbacks can call it.

        Args:
            bucket: The KV bucket (``sb_budgets``...).
            key: The record's key.
            reason: Why it cannot be used (the decode or validation error).
            effect: What the system does meanwhile (fails closed, keeps the last set...).
            fix: The operator's command that rewrites it.
            event: ``unreadable_record`` (it does not decode) or ``unusable_record``
                (it decodes but cannot be used, e.g. a policy set that does not validate).
        """
        ev = self.event(
            "alert",
            subject=f"$KV.{bucket}.{key}",
            span_id="",
            data={"event": event, "bucket": bucket, "key": key,
                  "reason": reason, "effect": effect, "fix": fix},
        )  # fmt: skip
        self.add(ev)
        return ev

    async def publish(self, ev: AuditEvent) -> None:
        """Buffer an already built event (kept for symmetry with :meth:`emit`)."""
        self.add(ev)

    def add(self, ev: AuditEvent) -> None:
        """Buffer ``ev`` for the next batch."""
        self.stats.emitted += 1
        self.stats.by_kind[ev.kind] += 1
        self._buffer.append(ev)
        self._idle.clear()
        if len(self._buffer) >= self.max_batch:
            self._ship()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.linger, self._ship)

    def _ship(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._buffer:
            return
        batch = AuditBatch(id=new_id(), events=tuple(self._buffer))
        self._buffer = []
        entry = _Batch(
            self._subject, encode(batch), len(batch.events), time.monotonic(),
            ack_timeout=self.ack_timeout,
        )  # fmt: skip
        self._inflight[batch.id] = entry
        self.stats.batches += 1
        self._spawn(self._send(batch.id, entry))
        if self._retry_task is None or self._retry_task.done():
            self._retry_task = asyncio.ensure_future(self._retry_loop())

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send(self, batch_id: str, entry: _Batch) -> None:
        entry.sent_at = time.monotonic()
        try:
            entry.ack = await self._publisher.publish(
                entry.subject, entry.data, headers={H_MSG_ID: batch_id}
            )
        except Exception as exc:  # connection closed or reconnecting
            self._failed(batch_id, entry, exc)
            return
        entry.ack.add_done_callback(lambda fut: self._acked(batch_id, entry, fut))

    def _acked(self, batch_id: str, entry: _Batch, fut: asyncio.Future[PubAck]) -> None:
        if fut.cancelled():
            return
        exc = fut.exception()
        if exc is not None:
            self._failed(batch_id, entry, exc)
            return
        if self._inflight.pop(batch_id, None) is not None:
            self.stats.acked += entry.events
            self.last_ack = time.time()
            if self._waiters:
                self._wake_waiters(batch_id)
            if entry.waiters is not None:
                for done in entry.waiters:
                    if not done.done():
                        done.set_result(None)
                self._wal_busy = False
                self._ship_wal()
        if not self._inflight and not self._buffer and not self._wal:
            self._idle.set()

    def _failed(self, batch_id: str, entry: _Batch, exc: BaseException) -> None:
        self.stats.failed += entry.events
        log.warning(
            "audit batch %s (%d events) failed (%r); will retry", batch_id, entry.events, exc
        )
        entry.sent_at = 0.0  # due for retry at the next tick

    async def _retry_loop(self) -> None:
        tick = min(0.5, self.ack_timeout / 5, self.write_ahead_ack_timeout / 5)
        while self._inflight:
            await asyncio.sleep(tick)
            now = time.monotonic()
            for batch_id, entry in list(self._inflight.items()):
                if now - entry.sent_at > entry.ack_timeout:
                    if entry.ack is not None and not entry.ack.done():
                        self._publisher.forget(entry.ack)
                    self.stats.retried += entry.events
                    await self._send(batch_id, entry)

    @property
    def pending(self) -> int:
        """Events emitted and not yet acknowledged by JetStream."""
        return len(self._buffer) + len(self._wal) + sum(b.events for b in self._inflight.values())

    async def flush(self, timeout: float = 10.0) -> bool:
        """Ship the buffer now and wait until everything is acknowledged; False on timeout."""
        self._ship()
        if self._idle.is_set():
            return True
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True

    # -- per-caller barrier (the cost meter's overlapping batches) -----------------

    async def flush_emitted(self, timeout: float = 10.0) -> bool:
        """Ship the buffer now and wait until every event emitted *before this call* is
        acknowledged; False on timeout.

        Unlike :meth:`flush`, events emitted meanwhile by other tasks are not
        waited for, so callers that emit and flush concurrently (batches
        handled in parallel) never wait on each other's later events.
        """
        self._ship()
        waiting = set(self._inflight)
        if not waiting:
            return True
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (waiting, done)
        self._waiters.append(entry)
        try:
            await asyncio.wait_for(asyncio.shield(done), timeout)
        except TimeoutError:
            return False
        finally:
            with contextlib.suppress(ValueError):
                self._waiters.remove(entry)
        return True

    def _wake_waiters(self, batch_id: str) -> None:
        for waiting, done in self._waiters:
            waiting.discard(batch_id)
            if not waiting and not done.done():
                done.set_result(None)

    async def close(self, timeout: float = 10.0) -> None:
        """Flush, then stop. Events still unacknowledged are logged."""
        if not await self.flush(timeout):
            log.error("%d audit events unacknowledged at shutdown", self.pending)
        await cancel_and_wait(self._retry_task, "the audit retry loop")
        await self._publisher.stop()
