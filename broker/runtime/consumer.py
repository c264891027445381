"""Durable JetStream pull consumers run as a background batch loop.

One way to consume a stream in every service: :class:`PullWorker` creates
(or binds to) a durable consumer with explicit acks and hands batches of
messages to a handler that acks, naks or terms them itself, after its effect
is durable. A handler that raises leaves its batch unacked, so JetStream
redelivers it after ``ack_wait``.

Delivery is pipelined (the "consume" pattern of the NATS clients, which
nats-py 2.16 lacks): the worker keeps standing pull requests
(``$JS.API.CONSUMER.MSG.NEXT``, ``batch`` messages each, expiring after
``expires``) for up to ``prefetch`` messages, so the server streams messages
into a private inbox while the handler works on the previous batch; there
is no round trip between batches and no task per message (nats-py's
``fetch`` creates one per message: measured ~15 µs of the ~90 µs the cost
meter spent per report, see ``bench/cost.py``).

Credit bookkeeping: every pull request asks for ``batch`` messages; each
message delivered uses one; a request that ends early (``408`` when it
expires, ``409`` when the server drops it) reports how many it did not use
in ``Nats-Pending-Messages``. A status without that header, or silence
longer than ``expires``, resets the credit to zero (new requests are sent);
an over-estimate only means a few more messages buffered, bounded by the
consumer's ``max_ack_pending``.

``concurrency`` batches may be in the handler at once (the tracing
sequencer keeps 1: its chain is ordered). A second batch starts only when a
full one is buffered, so a busy pipeline runs full batches and an idle one
handles each message at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

import msgspec
import nats.errors
import sqlalchemy.exc
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig

from broker.connection import SessionClient
from broker.diagnostics import cancel_and_wait
from broker.runtime.jetstream import while_jetstream_settles
from schemas import ConsumerHealth

__all__ = ["PullWorker"]

log = logging.getLogger(__name__)

# Failures of a batch that an outage explains (the connection, JetStream, the
# database): logged as one WARNING line per outage. Anything else is a bug and
# keeps its traceback.
_TRANSIENT: tuple[type[BaseException], ...] = (
    nats.errors.Error,
    OSError,
    TimeoutError,
    sqlalchemy.exc.OperationalError,
)

_PENDING_MSGS = "Nats-Pending-Messages"


class _Pull(msgspec.Struct, omit_defaults=True):
    """A pull request (JetStream's ``JSApiConsumerGetNextRequest``)."""

    batch: int
    expires: int = 0  # nanoseconds


_encode_pull = msgspec.json.Encoder().encode


class PullWorker:
    """A durable pull consumer on ``stream`` feeding ``handler`` batches of up to ``batch``.

    Args:
        js: JetStream context (its connection receives the messages).
        stream: Stream name.
        durable: Durable consumer name (shared by every replica of a service).
        handler: Coroutine that processes (and acks) one batch.
        batch: Messages per batch and per pull request; also bounds unacked
            messages (x8, the consumer's ``max_ack_pending``).
        ack_wait: Seconds before an unacked message is redelivered. While the
            handler works on a batch, its messages are marked in progress
            (``+WPI``) every third of it, so a slow batch is never redelivered
            while its worker lives, and a batch whose worker died is
            redelivered after ``ack_wait``: keep it short (seconds).
        concurrency: Batches in the handler at once (1 keeps them in order).
        prefetch: Messages requested ahead (buffered or on their way);
            default ``2 * batch``.
        expires: Seconds a pull request waits on the server for messages.
        settle_within: Seconds :meth:`start` retries creating the consumer while
            JetStream settles (no stream leader yet); services pass
            ``settings.connect_timeout``.

    Attributes:
        failures: Batches whose handler raised.
        batches: Batches handed to the handler.
        delivered: Messages received (redeliveries included).
    """

    def __init__(
        self,
        js: JetStreamContext,
        stream: str,
        durable: str,
        handler: Callable[[list[Msg]], Awaitable[None]],
        *,
        batch: int = 256,
        ack_wait: float = 5.0,
        concurrency: int = 1,
        prefetch: int | None = None,
        expires: float = 5.0,
        settle_within: float = 30.0,
    ) -> None:
        if batch < 1 or concurrency < 1:
            raise ValueError("batch and concurrency must be at least 1")
        self.js = js
        # nats-py gives no public accessor for a context's connection and API prefix.
        self._nc: Client = js._nc
        self._next_subject = f"{js._prefix}.CONSUMER.MSG.NEXT.{stream}.{durable}"
        self.stream = stream
        self.durable = durable
        self.handler = handler
        self.batch = batch
        self.ack_wait = ack_wait
        self.concurrency = concurrency
        self.prefetch = max(prefetch if prefetch is not None else 2 * batch, batch)
        self.expires = expires
        self.settle_within = settle_within
        self.failures = 0
        self.batches = 0
        self.delivered = 0
        #: Progress acks sent for batches that outlived a third of ``ack_wait``.
        self.progress_acks = 0
        self._failing = 0  # consecutive failed batches (an outage): logged once
        self._in_hand: list[list[Msg]] = []
        self._alive: asyncio.Task[None] | None = None
        self._inbox = ""
        self._sub: Subscription | None = None
        self._buffer: list[Msg] = []
        self._credit = 0
        self._heard = 0.0
        self._wake = asyncio.Event()
        self._handling: set[asyncio.Task[None]] = set()
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()

    async def start(self) -> None:
        """Create or bind the consumer (waiting up to ``settle_within`` seconds for a
        stream leader, as after a cluster formed), then start the loop."""
        config = ConsumerConfig(
            durable_name=self.durable,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=self.ack_wait,
            max_ack_pending=self.batch * 8,
            max_deliver=-1,
        )

        async def bind() -> None:  # the same config again is a no-op on the server
            await self.js.add_consumer(self.stream, config)

        await while_jetstream_settles(
            f"for consumer {self.stream}/{self.durable}", bind, within=self.settle_within
        )
        self._inbox = self._nc.new_inbox()
        self._sub = await self._nc.subscribe(self._inbox, cb=self._on_msg)
        if isinstance(self._nc, SessionClient):  # a message it cannot read: never redelivered
            self._nc.term_unreadable(self._sub)
        self._stopping.clear()
        self._credit = 0
        self._heard = time.monotonic()
        self._task = asyncio.ensure_future(self._run())
        self._alive = asyncio.ensure_future(self._keep_alive())

    async def health(self) -> ConsumerHealth:
        """The consumer's lag as the server counts it (for ``signalbox status``).

        Raises:
            nats.errors.Error: the server did not answer (the caller reports it).
        """
        info = await self.js.consumer_info(self.stream, self.durable, timeout=2.0)
        return ConsumerHealth(
            stream=self.stream,
            durable=self.durable,
            pending=info.num_pending or 0,
            ack_pending=info.num_ack_pending or 0,
            redelivered=info.num_redelivered or 0,
        )

    async def stop(self) -> None:
        """Finish the batches in the handler, stop pulling, hand buffered messages back."""
        self._stopping.set()
        self._wake.set()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                await asyncio.wait_for(self._task, timeout=5)
            self._task = None
        for task in list(self._handling):  # still running after the grace period
            task.cancel()
        await cancel_and_wait(self._alive, f"{self.durable}'s progress acks")
        self._alive = None
        # Nothing arrives once unsubscribed (the server drops pull requests
        # whose inbox lost interest); the connection's drain need not wait on it.
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
            self._sub = None
        # Buffered, never handled: redeliver now rather than after ack_wait.
        buffered, self._buffer = self._buffer, []
        for msg in buffered:
            with contextlib.suppress(Exception):
                await msg.nak()

    # -- delivery ----------------------------------------------------------------

    async def _on_msg(self, msg: Msg) -> None:
        self._heard = time.monotonic()
        headers = msg.headers
        if not msg.reply and headers and "Status" in headers:
            # A status from the server (JetStream messages carry an ack subject).
            self._on_status(headers)
            return
        self.delivered += 1
        self._credit = max(0, self._credit - 1)
        self._buffer.append(msg)
        self._wake.set()

    def _on_status(self, headers: dict[str, str]) -> None:
        status = headers.get("Status", "")
        if status == "100":  # idle heartbeat (not requested; harmless)
            return
        unused = headers.get(_PENDING_MSGS)
        if unused is not None and unused.isdigit():
            self._credit = max(0, self._credit - int(unused))
        else:
            if status not in ("404", "408"):
                log.warning(
                    "%s: pull request ended: %s %s",
                    self.durable,
                    status,
                    headers.get("Description", ""),
                )
            self._credit = 0
        self._wake.set()

    async def _refill(self) -> None:
        """Send pull requests until ``prefetch`` messages are buffered or requested."""
        if time.monotonic() - self._heard > self.expires + 1.0:
            # Nothing heard for longer than a request lives (a reconnect lost
            # them, or a status went missing): start over.
            self._credit = 0
            self._heard = time.monotonic()
        while self._credit + len(self._buffer) + self.batch <= self.prefetch:
            request = _Pull(batch=self.batch, expires=int(self.expires * 1e9))
            await self._nc.publish(self._next_subject, _encode_pull(request), reply=self._inbox)
            self._credit += self.batch

    # -- handling ----------------------------------------------------------------

    def _take(self) -> list[Msg] | None:
        """The next batch, if one should start now."""
        if not self._buffer or len(self._handling) >= self.concurrency:
            return None
        if self._handling and len(self._buffer) < self.batch:
            return None  # a batch is running: start another only when full
        msgs, self._buffer = self._buffer[: self.batch], self._buffer[self.batch :]
        return msgs

    async def _handle(self, msgs: list[Msg]) -> None:
        self._in_hand.append(msgs)
        try:
            await self.handler(msgs)
        except Exception as exc:
            self.failures += 1
            self._failing += 1
            if isinstance(exc, _TRANSIENT):
                # An outage (NATS or the database): one line when it starts, not a
                # traceback per batch; the recovery is logged too.
                if self._failing == 1:
                    log.warning(
                        "%s: a batch failed (%s: %s); JetStream will redeliver it, retrying",
                        self.durable, type(exc).__name__, exc,
                    )  # fmt: skip
            else:
                log.exception("%s: a batch failed; JetStream will redeliver it", self.durable)
            await asyncio.sleep(0.5)
        else:
            if self._failing:
                log.warning("%s: batches succeed again after %d failed", self.durable,
                            self._failing)  # fmt: skip
                self._failing = 0
        finally:
            self._in_hand.remove(msgs)

    async def _keep_alive(self) -> None:
        """Every third of ``ack_wait``, mark in progress (``+WPI``) the messages this
        worker has held since the last round (buffered or in the handler), so only a
        dead worker's messages are redelivered; quick batches never cost one."""
        previous: set[int] = set()
        while True:
            await asyncio.sleep(self.ack_wait / 3)
            held = [m for batch in self._in_hand for m in batch] + self._buffer
            for msg in held:
                if id(msg) in previous:
                    with contextlib.suppress(Exception):  # acked meanwhile, or disconnected
                        await msg.in_progress()
                        self.progress_acks += 1
            previous = {id(m) for m in held}

    def _done(self, task: asyncio.Task[None]) -> None:
        self._handling.discard(task)
        self._wake.set()

    async def _run(self) -> None:
        try:
            while not self._stopping.is_set():
                self._wake.clear()
                try:
                    await self._refill()
                except (nats.errors.ConnectionClosedError, nats.errors.ConnectionDrainingError):
                    return
                except Exception as exc:
                    log.warning("%s: pull request failed: %r", self.durable, exc)
                while (msgs := self._take()) is not None:
                    self.batches += 1
                    task = asyncio.ensure_future(self._handle(msgs))
                    self._handling.add(task)
                    task.add_done_callback(self._done)
                if self._wake.is_set():
                    continue
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout=0.5)
        except asyncio.CancelledError:
            pass
        finally:
            if self._handling:
                await asyncio.wait(set(self._handling))
