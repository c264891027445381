"""Cost service: takes in usage reports from ``SB_USAGE``.

Each report is validated (shape, and that its ``agent`` field matches the
subject it was published on, so one agent cannot report usage as another),
recorded in the audit trail, and acked only once that audit record is
acknowledged by JetStream. Invalid reports are audited as ``rejected`` and
terminated (never redelivered forever, never silently dropped).
"""

from __future__ import annotations

import collections
import logging

import msgspec
from nats.aio.msg import Msg

from broker.codec import decode
from broker.consumer import PullWorker
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
        self._worker: PullWorker | None = None

    async def on_start(self) -> None:
        self._worker = PullWorker(self.js, USAGE_STREAM, _CONSUMER, self.meter, batch=self.batch)
        await self._worker.start()

    async def on_stop(self) -> None:
        if self._worker is not None:
            await self._worker.stop()

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
