"""Durable JetStream pull consumers run as a background batch loop.

One way to consume a stream in every service: :class:`PullWorker` creates
(or binds to) a durable consumer with explicit acks, fetches batches and
hands each to a handler that acks, naks or terms its messages itself, after
its effect is durable. A handler that raises leaves the batch unacked, so
JetStream redelivers it after ``ack_wait``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

import nats.errors
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig

__all__ = ["PullWorker"]

log = logging.getLogger(__name__)


class PullWorker:
    """A durable pull consumer on ``stream`` feeding ``handler`` batches of up to ``batch``.

    Args:
        js: JetStream context.
        stream: Stream name.
        durable: Durable consumer name (shared by every replica of a service).
        handler: Coroutine that processes (and acks) one batch.
        batch: Messages per fetch; also bounds unacked messages (x8).
        ack_wait: Seconds before an unacked message is redelivered.
    """

    def __init__(
        self,
        js: JetStreamContext,
        stream: str,
        durable: str,
        handler: Callable[[list[Msg]], Awaitable[None]],
        *,
        batch: int = 256,
        ack_wait: float = 30,
    ) -> None:
        self.js = js
        self.stream = stream
        self.durable = durable
        self.handler = handler
        self.batch = batch
        self.ack_wait = ack_wait
        self.failures = 0
        self._sub: JetStreamContext.PullSubscription | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()

    async def start(self) -> None:
        """Create or bind the consumer and start the loop."""
        await self.js.add_consumer(
            self.stream,
            ConsumerConfig(
                durable_name=self.durable,
                ack_policy=AckPolicy.EXPLICIT,
                ack_wait=self.ack_wait,
                max_ack_pending=self.batch * 8,
                max_deliver=-1,
            ),
        )
        self._sub = await self.js.pull_subscribe_bind(self.durable, stream=self.stream)
        self._stopping.clear()
        self._task = asyncio.ensure_future(self._run())

    async def stop(self) -> None:
        """Finish the current batch, stop fetching, unsubscribe."""
        self._stopping.set()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                await asyncio.wait_for(self._task, timeout=5)
            self._task = None
        # A pull subscription has no callback draining it: unsubscribe so the
        # connection's drain does not wait on it.
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
            self._sub = None

    async def _run(self) -> None:
        assert self._sub is not None
        while not self._stopping.is_set():
            try:
                msgs = await self._sub.fetch(self.batch, timeout=0.5)
            except TimeoutError:  # nats-py raises its own or asyncio's, by timing
                continue
            except (nats.errors.ConnectionClosedError, asyncio.CancelledError):
                return
            except Exception as exc:
                log.warning("%s: fetch failed: %r", self.durable, exc)
                await asyncio.sleep(0.5)
                continue
            try:
                await self.handler(msgs)
            except Exception:
                self.failures += 1
                log.exception("%s: a batch failed; JetStream will redeliver it", self.durable)
                await asyncio.sleep(0.5)
