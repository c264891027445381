"""Cost service: meters usage reports from ``SB_USAGE`` into SQL, answers cost reports.

Metering. A durable pull consumer (:class:`~broker.consumer.PullWorker`,
shared by every replica) fetches batches. Each report is validated (shape,
and that its ``agent`` field matches the subject it was published on, so one
agent cannot report usage as another), charged to the team the ``sb_agents``
registry mirror gives for that agent *when it is metered* (reports carry no
team: an agent could name any), costed from the prices file, and the batch is
inserted in one SQL transaction that skips reports already stored (primary
key ``(agent, report id)``; see :mod:`services.cost.store`). Only after the
commit, and after the batch's audit events (``usage``, ``rejected``) are
acknowledged by JetStream, are the messages acked. A crash anywhere before
that leaves them unacked: JetStream redelivers, the insert skips what was
committed, so every report is counted exactly once.

Invalid reports are audited as ``rejected``, counted, and terminated (never
redelivered forever, never silently dropped).

Reports. ``sb.admin.cost.report`` (operators only: the server lets only
operators and services publish under ``sb.admin.>``) answers a
:class:`~schemas.CostReportRequest` with totals grouped by team, agent,
model, project, provider, hour or day (``signalbox cost report``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import msgspec
from nats.aio.msg import Msg

from broker.codec import decode
from broker.consumer import PullWorker
from broker.errors import InvalidInput, SchemaError, SignalboxError
from broker.jetstream import KV_AGENTS, USAGE_STREAM
from broker.kvcache import KVCache
from broker.service import Service
from broker.settings import Settings
from schemas import AgentRecord, CostReport, CostReportRequest, UsageReport
from services.cost.prices import Prices, load_prices
from services.cost.store import UsageStore

__all__ = ["CONSUMER", "CostService"]

log = logging.getLogger(__name__)

#: Durable consumer of every cost replica on ``SB_USAGE``.
CONSUMER = "sb-cost-meter"


class CostService(Service):
    """Meters ``sb.usage.<agent>`` reports into SQL and answers ``sb.admin.cost.report``.

    Args:
        settings: Resolved settings (``database_url``, ``prices_path``).
        batch: Reports fetched, stored and acked together.
        ack_wait: Seconds before JetStream redelivers an unacked report.

    Attributes:
        metered: Reports committed to SQL by this replica (duplicates included:
            the store, not this counter, is exactly-once).
        store_failures: Batches whose SQL write failed (left to redeliver).
    """

    name = "cost"

    def __init__(self, settings: Settings, *, batch: int = 512, ack_wait: float = 30.0) -> None:
        super().__init__(settings)
        self.batch = batch
        self.ack_wait = ack_wait
        self.metered = 0
        self.store_failures = 0
        self._prices: Prices | None = None
        self._store: UsageStore | None = None
        self._agents: KVCache[AgentRecord] | None = None
        self._worker: PullWorker | None = None
        self.endpoint(self.subjects.admin("cost", "report"), CostReportRequest)(self.cost_report)

    @property
    def store(self) -> UsageStore:
        """The SQL store (after start)."""
        assert self._store is not None, "service not started"
        return self._store

    @property
    def prices(self) -> Prices:
        """The prices in use (after start)."""
        assert self._prices is not None, "service not started"
        return self._prices

    async def on_start(self) -> None:
        self._prices = load_prices(self.settings.prices_path)
        self._store = UsageStore(self.settings.resolved_database_url, self._prices)
        await asyncio.to_thread(self._store.create_schema)
        self._agents = KVCache(await self.js.key_value(KV_AGENTS), AgentRecord)
        await self._agents.start()
        self._worker = PullWorker(
            self.js, USAGE_STREAM, CONSUMER, self.meter, batch=self.batch, ack_wait=self.ack_wait
        )
        await self._worker.start()

    async def on_stop(self) -> None:
        if self._worker is not None:
            await self._worker.stop()
            self._worker = None
        if self._agents is not None:
            await self._agents.stop()
            self._agents = None
        if self._store is not None:
            self._store.close()
            self._store = None

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

    def _team(self, agent: str) -> str:
        record = self._agents.get(agent) if self._agents is not None else None
        return record.manifest.team if record is not None else ""

    async def meter(self, msgs: list[Msg]) -> None:
        """Validate, store (one transaction), audit, then ack one batch."""
        good: list[Msg] = []
        bad: list[Msg] = []
        rows: list[dict[str, Any]] = []
        reports: list[tuple[Msg, UsageReport, dict[str, Any]]] = []
        now = time.time()
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
            row = self.store.row(report, team=self._team(report.agent), now=now)
            rows.append(row)
            reports.append((msg, report, row))
        try:
            await asyncio.to_thread(self.store.record, rows)
        except Exception:
            # Not committed: nothing is acked; JetStream redelivers the reports.
            self.store_failures += 1
            log.exception(
                "cost: storing %d usage reports failed; they will be redelivered", len(rows)
            )
            for msg, _, _ in reports:
                await msg.nak(delay=1)
            reports = []
        else:
            self.metered += len(rows)
        for msg, report, row in reports:
            data = msgspec.to_builtins(report)
            data["team"] = row["team"]
            data["cost_nanos"] = row["cost_nanos"]
            data["priced_by_fallback"] = row["priced_by_fallback"]
            await self.audit.emit(
                "usage",
                actor=report.agent,
                subject=msg.subject,
                trace_id=report.trace_id,
                event_id=f"usage-{report.agent}-{report.id}",
                data=data,
            )
            good.append(msg)
        if not await self.audit.flush(timeout=10):
            # Stored, but the audit events are not durable yet: redeliver (the
            # store skips the reports, the audit event ids dedupe).
            for msg in good + bad:
                await msg.nak(delay=1)
            return
        for msg in good:
            await msg.ack()
        for msg in bad:
            await msg.term()

    async def cost_report(self, request: CostReportRequest) -> CostReport:
        """Totals grouped by ``request.by`` over ``[since, until)``."""
        if (
            request.since is not None
            and request.until is not None
            and request.until <= request.since
        ):
            raise InvalidInput(
                "the report's `until` must be after its `since`",
                details={"since": request.since, "until": request.until, "path": "$.until"},
            )
        return await asyncio.to_thread(self.store.report, request.by, request.since, request.until)
