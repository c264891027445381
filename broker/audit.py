"""Emit audit events into the intake stream without blocking the hot path.

Every service owns one :class:`AuditEmitter`. ``emit`` returns at once; the
JetStream ack arrives asynchronously. A rejected or unanswered publish is
kept and retried with backoff (the event id is the ``Nats-Msg-Id``, so a
retry of a write that did land is dropped by the server's dedupe window).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import msgspec
from nats.aio.client import Client
from nats.js import JetStreamContext

from broker.codec import encode
from broker.replies import H_MSG_ID
from broker.subjects import Subjects
from schemas import AuditEvent, AuditKind

__all__ = ["AuditEmitter", "AuditStats", "new_id"]

log = logging.getLogger(__name__)


def new_id() -> str:
    """A new unique id (UUIDv4 hex) for events and calls."""
    return uuid.uuid4().hex


@dataclass
class AuditStats:
    """Counters of one emitter."""

    emitted: int = 0
    acked: int = 0
    failed: int = 0
    retried: int = 0
    by_kind: collections.Counter[str] = field(default_factory=collections.Counter)


class AuditEmitter:
    """Publishes :class:`schemas.AuditEvent` records to ``sb.audit.in.<kind>.<actor>``.

    Args:
        nc: Connected client.
        subjects: Subject builder.
        actor: Default actor (``service:policy``...).
        max_pending: Unacknowledged publishes allowed in flight.
        ack_timeout: Seconds after which an unacknowledged publish is retried.
    """

    def __init__(
        self,
        nc: Client,
        subjects: Subjects,
        actor: str,
        *,
        max_pending: int = 4096,
        ack_timeout: float = 5.0,
    ) -> None:
        self._js: JetStreamContext = nc.jetstream(publish_async_max_pending=max_pending)
        self._subjects = subjects
        self.actor = actor
        self.ack_timeout = ack_timeout
        self.stats = AuditStats()
        self._inflight: dict[str, tuple[str, bytes, dict[str, str], float]] = {}
        self._idle = asyncio.Event()
        self._idle.set()
        self._retry_task: asyncio.Task[None] | None = None

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
    ) -> AuditEvent:
        """Build an event (``data`` may be a Struct or a dict)."""
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
            policy_version=policy_version,
            data=payload,
        )

    async def emit(self, kind: AuditKind, **kwargs: Any) -> AuditEvent:
        """Build and publish an event; returns it without waiting for the ack."""
        ev = self.event(kind, **kwargs)
        await self.publish(ev)
        return ev

    async def publish(self, ev: AuditEvent) -> None:
        """Publish a built event; returns once it is written to the socket buffer.

        The JetStream ack is awaited in the background; a failure or a
        missing ack re-sends the event (same id, so never twice in the stream).
        """
        self.stats.emitted += 1
        self.stats.by_kind[ev.kind] += 1
        subject = self._subjects.audit_intake(ev.kind, ev.actor)
        headers = {H_MSG_ID: ev.id}
        self._inflight[ev.id] = (subject, encode(ev), headers, time.monotonic())
        self._idle.clear()
        if self._retry_task is None or self._retry_task.done():
            self._retry_task = asyncio.ensure_future(self._retry_loop())
        await self._publish(ev.id, subject, self._inflight[ev.id][1], headers)

    async def _publish(
        self, ev_id: str, subject: str, data: bytes, headers: dict[str, str]
    ) -> None:
        try:
            fut = await self._js.publish_async(subject, data, headers=dict(headers))
        except Exception as exc:  # connection closed, stalled...
            self._failed(ev_id, exc)
            return

        def _done(f: asyncio.Future[Any]) -> None:
            exc = f.exception() if not f.cancelled() else asyncio.CancelledError()
            if exc is None:
                self.stats.acked += 1
                self._inflight.pop(ev_id, None)
                if not self._inflight:
                    self._idle.set()
            else:
                self._failed(ev_id, exc)

        fut.add_done_callback(_done)

    def _failed(self, ev_id: str, exc: BaseException) -> None:
        self.stats.failed += 1
        log.warning("audit publish of %s failed (%r); will retry", ev_id, exc)
        entry = self._inflight.get(ev_id)
        if entry is not None:
            # Make it due for retry now.
            self._inflight[ev_id] = (*entry[:3], 0.0)

    async def _retry_loop(self) -> None:
        while self._inflight:
            await asyncio.sleep(min(1.0, self.ack_timeout / 5))
            now = time.monotonic()
            due = [(k, v) for k, v in list(self._inflight.items()) if now - v[3] > self.ack_timeout]
            for ev_id, (subject, data, headers, _) in due:
                self.stats.retried += 1
                self._inflight[ev_id] = (subject, data, headers, time.monotonic())
                await self._publish(ev_id, subject, data, headers)

    @property
    def pending(self) -> int:
        """Events not yet acknowledged by JetStream."""
        return len(self._inflight)

    async def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every emitted event is acknowledged; False on timeout."""
        if self._idle.is_set():
            # wait_for(..., 0) times out even on a set event: answer without waiting.
            return True
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True

    async def close(self, timeout: float = 10.0) -> None:
        """Flush, then stop the retry loop. Unacknowledged events are logged."""
        if not await self.flush(timeout):
            log.error("%d audit events unacknowledged at shutdown", len(self._inflight))
        if self._retry_task is not None:
            self._retry_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._retry_task
