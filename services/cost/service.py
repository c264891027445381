"""Cost service: takes in usage reports from ``SB_USAGE``.

Each report is validated (shape, and that its ``agent`` field matches the
subject it was published on, so one agent cannot report usage as another),
recorded in the audit trail, and acked only once that audit record is
acknowledged by JetStream. Invalid reports are audited as ``rejected`` and
terminated (never redelivered forever, never silently dropped).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging

import msgspec
import nats.errors
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig

from broker.codec import decode
from broker.errors import InvalidInput, SchemaError, SignalboxError
from broker.jetstream import USAGE_STREAM
from broker.service import Service
from broker.settings import Settings
from schemas import UsageReport

__all__ = ["CostService"]

log = logging.getLogger(__name__)

_CONSUMER = "sb-cost-meter"


class CostService(Service):
    """Meters ``sb.usage.<agent>`` reports.

    Attributes:
        tokens: Input+output tokens seen per (agent, model) since start.
    """

    name = "cost"

    def __init__(self, settings: Settings, *, batch: int = 256) -> None:
        super().__init__(settings)
        self.batch = batch
        self.tokens: collections.Counter[tuple[str, str]] = collections.Counter()
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()

    async def on_start(self) -> None:
        await self.js.add_consumer(
            USAGE_STREAM,
            ConsumerConfig(
                durable_name=_CONSUMER,
                ack_policy=AckPolicy.EXPLICIT,
                ack_wait=30,
                max_ack_pending=self.batch * 8,
            ),
        )
        self._sub = await self.js.pull_subscribe_bind(_CONSUMER, stream=USAGE_STREAM)
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

    async def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                msgs = await self._sub.fetch(self.batch, timeout=0.5)
            except TimeoutError:  # nats-py raises its own or asyncio's, by timing
                continue
            except (nats.errors.ConnectionClosedError, asyncio.CancelledError):
                return
            except Exception as exc:
                log.warning("cost: fetch failed: %r", exc)
                await asyncio.sleep(0.5)
                continue
            await self.meter(msgs)

    def _report_of(self, msg: Msg) -> UsageReport:
        report = decode(msg.data, UsageReport)
        agent = msg.subject.rsplit(".", 1)[-1]
        if report.agent != agent:
            raise InvalidInput(
                f"usage report names agent {report.agent!r} but was published on {msg.subject}; "
                "agents report only their own usage",
                details={"agent": report.agent, "subject": msg.subject},
            )
        return report

    async def meter(self, msgs: list[Msg]) -> None:
        """Validate, audit and ack one batch (ack after the audit write is acknowledged)."""
        good: list[Msg] = []
        bad: list[Msg] = []
        for msg in msgs:
            try:
                report = self._report_of(msg)
            except (SchemaError, InvalidInput) as err:
                await self.reject(err, subject=msg.subject, actor=msg.subject.rsplit(".", 1)[-1])
                bad.append(msg)
                continue
            except SignalboxError as err:  # pragma: no cover - defensive
                log.error("cost: %s", err)
                bad.append(msg)
                continue
            self.tokens[(report.agent, report.model)] += report.input_tokens + report.output_tokens
            await self.audit.emit(
                "usage",
                actor=report.agent,
                subject=msg.subject,
                trace_id=report.trace_id,
                event_id=f"usage-{report.id}",
                data=msgspec.to_builtins(report),
            )
            good.append(msg)
        if not await self.audit.flush(timeout=10):
            # Not durable yet: let JetStream redeliver (the event ids dedupe).
            for msg in good + bad:
                await msg.nak(delay=1)
            return
        for msg in good:
            await msg.ack()
        for msg in bad:
            await msg.term()
