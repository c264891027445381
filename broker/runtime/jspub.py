"""Pipelined JetStream publishing with acknowledgements resolved by us.

``JetStreamContext.publish_async`` in nats-py 2.16 never resolves its future
when the server *refuses* a write (nats-io/nats.py#985), and parses every ack
with ``json.loads`` plus a dataclass. :class:`JetStreamPublisher` publishes
with a reply subject under one private inbox, decodes acks with msgspec, and
resolves each future with the ack or a :class:`~broker.errors.PublishRefused`.
"""

from __future__ import annotations

import asyncio
import contextlib

import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from broker.errors import PublishRefused

__all__ = ["JetStreamPublisher", "PubAck"]


class PubAck(msgspec.Struct, frozen=True):
    """JetStream's acknowledgement of a stored message."""

    stream: str = ""
    seq: int = 0
    duplicate: bool = False


class _ApiError(msgspec.Struct, frozen=True):
    code: int = 0
    err_code: int = 0
    description: str = ""


class _AckReply(msgspec.Struct, frozen=True):
    stream: str = ""
    seq: int = 0
    duplicate: bool = False
    error: _ApiError | None = None


_decode_ack = msgspec.json.Decoder(_AckReply).decode


class JetStreamPublisher:
    """Publishes to JetStream on ``nc``; each publish returns a future of its :class:`PubAck`.

    Writes are sent in call order on one connection, so the server stores
    them in that order (what the audit chain's expected-sequence checks rely on).
    """

    def __init__(self, nc: Client) -> None:
        self._nc = nc
        self._inbox = ""
        self._sub: Subscription | None = None
        self._futures: dict[str, asyncio.Future[PubAck]] = {}
        self._next = 0

    async def start(self) -> None:
        """Subscribe the ack inbox (idempotent)."""
        if self._sub is None:
            self._inbox = self._nc.new_inbox()
            self._sub = await self._nc.subscribe(
                f"{self._inbox}.*", cb=self._on_ack, pending_msgs_limit=1_000_000
            )

    async def stop(self) -> None:
        """Unsubscribe; pending futures fail with :class:`PublishRefused`."""
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
            self._sub = None
        for fut in self._futures.values():
            if not fut.done():
                fut.set_exception(PublishRefused("publisher stopped before the ack arrived"))
        self._futures.clear()

    @property
    def pending(self) -> int:
        """Writes sent and not yet acknowledged or refused."""
        return len(self._futures)

    async def publish(
        self, subject: str, data: bytes, headers: dict[str, str] | None = None
    ) -> asyncio.Future[PubAck]:
        """Send one write; the returned future resolves with its ack.

        Raises (through the future):
            PublishRefused: the server refused the write (no stream, wrong
                expected sequence...), with its error code in ``details``.
        """
        if self._sub is None:
            await self.start()
        self._next += 1
        token = str(self._next)
        fut: asyncio.Future[PubAck] = asyncio.get_running_loop().create_future()
        self._futures[token] = fut
        try:
            await self._nc.publish(subject, data, reply=f"{self._inbox}.{token}", headers=headers)
        except BaseException:
            self._futures.pop(token, None)
            raise
        return fut

    def forget(self, fut: asyncio.Future[PubAck]) -> None:
        """Stop waiting for ``fut`` (after a caller-side timeout)."""
        for token, pending in list(self._futures.items()):
            if pending is fut:
                del self._futures[token]
                break

    async def _on_ack(self, msg: Msg) -> None:
        fut = self._futures.pop(msg.subject[len(self._inbox) + 1 :], None)
        if fut is None or fut.done():
            return
        if msg.headers and msg.headers.get("Status") == "503":
            fut.set_exception(
                PublishRefused(
                    "no JetStream stream accepts this subject (is the stream created?)",
                    details={"status": 503},
                )
            )
            return
        try:
            reply = _decode_ack(msg.data)
        except msgspec.DecodeError as exc:
            fut.set_exception(PublishRefused(f"unreadable JetStream ack: {exc}"))
            return
        if reply.error is not None:
            fut.set_exception(
                PublishRefused(
                    f"JetStream refused the write: {reply.error.description}",
                    details={
                        "code": reply.error.code,
                        "err_code": reply.error.err_code,
                        "description": reply.error.description,
                    },
                )
            )
            return
        fut.set_result(PubAck(stream=reply.stream, seq=reply.seq, duplicate=reply.duplicate))
