"""Cost service: meters usage from ``SB_USAGE`` into SQL, keeps budgets, answers reports.

Metering (:mod:`services.cost.metering`). A durable pull consumer
(:class:`~broker.runtime.consumer.PullWorker`, shared by every replica) fetches
batches of usage reports; each is validated, attributed from what operators
decided (never from what the report says), costed from the prices file and
stored in one SQL transaction per batch, exactly once (:mod:`services.cost.store`).

Budgets (:mod:`services.cost.budget_desk`, the ledger :mod:`services.cost.budgets`).
Definitions live in the KV bucket ``sb_budgets``; operators set them on
``sb.admin.budgets.<op>``. The policy service asks ``sb.cost.reserve``
(services only) to reserve a model call's worst case on every budget that
applies; the SDK renews it on ``sb.cost.renew.<agent>`` while the call runs;
usage reports settle it in the metering transaction. An exhausted budget, or
usage that takes one past its limit uncovered (an overspend), is audited and
trips the breaker of the agent or team.

Reports. ``sb.admin.cost.report`` (operators only: the server lets only
operators and services publish under ``sb.admin.>``) answers a
:class:`~schemas.CostReportRequest` with totals grouped by team, agent,
model, project, provider, hour or day, or by who asked: the calling agent
whose call the usage was made while serving, or its team (``caller``,
``caller_team``: verified from the signed delegation chain, see
:mod:`services.cost.metering`) (``signalbox cost report``).
"""

from __future__ import annotations

import asyncio

from broker.errors import InvalidInput
from broker.runtime.breakers import BreakerBoard
from broker.runtime.consumer import PullWorker
from broker.runtime.identity import chain_key
from broker.runtime.jetstream import KV_AGENTS, USAGE_STREAM
from broker.runtime.kvcache import KVCache
from broker.runtime.service import Service
from broker.settings import Settings
from broker.subjects import Audience
from schemas import (
    AgentManifest,
    AgentRecord,
    CostByVersion,
    CostByVersionRequest,
    CostReport,
    CostReportRequest,
)
from services.cost.budget_desk import BudgetDesk, new_budget_stats
from services.cost.metering import MeteringStats, UsageMeter
from services.cost.prices import Prices, load_prices
from services.cost.store import UsageStore

__all__ = ["CONSUMER", "CostService", "bound_projects"]

#: Durable consumer of every cost replica on ``SB_USAGE``.
CONSUMER = "sb-cost-meter"


def bound_projects(manifest: AgentManifest) -> frozenset[str]:
    """Projects a registered agent's usage may be charged to, per its stored manifest.

    The registry stores the projects an operator bound to the agent in the
    metadata entry ``projects`` (comma-joined) and one of them as ``project``
    (for an agent never enrolled, registered while identity is off, the
    declared ``project``); see :mod:`services.registry.binding`.
    """
    projects = {p.strip() for p in manifest.metadata.get("projects", "").split(",")}
    projects.add(manifest.project)
    projects.discard("")
    return frozenset(projects)


class CostService(Service):
    """Meters ``sb.usage.<agent>`` reports into SQL and answers ``sb.admin.cost.report``.

    Args:
        settings: Resolved settings (``database_url``, ``prices_path``).
        batch: Reports fetched, stored and acked together.
        ack_wait: Seconds before JetStream redelivers an unacked report.

    Attributes:
        metering_stats: What this replica metered (:class:`~services.cost.metering.MeteringStats`).
        budget_stats: Reservations granted / refused / renewed (renewals refused), budget
            alerts audited and overspends alerted, by this replica
            (:class:`~services.cost.budget_desk.BudgetDesk`).
    """

    name = "cost"

    def __init__(self, settings: Settings, *, batch: int = 512, ack_wait: float = 5.0) -> None:
        super().__init__(settings)
        self.batch = batch
        self.ack_wait = ack_wait
        self.metering_stats = MeteringStats()
        self.budget_stats = new_budget_stats()
        #: The services' key for delegation chains (broker.runtime.identity; None when open).
        self._chain_key = chain_key(settings)
        self._prices: Prices | None = None
        self._store: UsageStore | None = None
        self._agents: KVCache[AgentRecord] | None = None
        self._worker: PullWorker | None = None
        s = self.subjects
        self.endpoint(s.admin("cost", "report"), CostReportRequest)(self.cost_report)
        self.endpoint(s.cost_versions, CostByVersionRequest, audience=Audience.SERVICE)(
            self.cost_by_version
        )
        #: Reservations, renewals, definitions and budget alerts
        #: (:class:`~services.cost.budget_desk.BudgetDesk`; bound to the store at start).
        self.budgets = BudgetDesk(
            self, team=self._team, project=self._project, stats=self.budget_stats
        )
        self.include(self.budgets)

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

    @property
    def breakers(self) -> BreakerBoard | None:
        """Breakers this service trips when an agent's or a team's budget is exhausted
        or overspent (None unless started)."""
        return self.budgets.breakers

    @property
    def metered(self) -> int:
        """Reports committed to SQL by this replica (duplicates included: the store,
        not this counter, is exactly-once)."""
        return self.metering_stats.metered

    @property
    def store_failures(self) -> int:
        """Batches whose SQL write failed (left to redeliver)."""
        return self.metering_stats.store_failures

    @property
    def attribution_stats(self) -> dict[str, int]:
        """Reports whose ``project`` was not bound to their agent (``ignored_projects``),
        whose ``on_behalf_of`` or chain was not signed by the policy service
        (``unsigned_chains``), and budgeted usage that settled no reservation
        (``unreserved``), by this replica."""
        return self.metering_stats.attribution

    async def on_start(self) -> None:
        self._prices = load_prices(self.settings.prices_path)
        self._store = UsageStore(self.settings.resolved_database_url, self._prices)
        await asyncio.to_thread(self._store.create_schema)
        self._agents = KVCache(await self.js.key_value(KV_AGENTS), AgentRecord)
        await self._agents.start()
        await self.budgets.start(self._store, self._prices)
        meter = UsageMeter(
            self, self._store, budgets=self.budgets, chain_key=self._chain_key,
            team=self._team, project=self._project, stats=self.metering_stats,
        )  # fmt: skip
        # Two batches in flight: one's SQL write (in a thread) and audit round
        # trip overlap the next one's decoding and costing (bench/cost.py).
        self._worker = PullWorker(
            self.js, USAGE_STREAM, CONSUMER, meter.meter_batch, batch=self.batch,
            ack_wait=self.ack_wait, concurrency=2, settle_within=self.settings.connect_timeout,
        )  # fmt: skip
        await self._worker.start()

    async def on_stop(self) -> None:
        await self.budgets.stop()
        if self._worker is not None:
            await self._worker.stop()
            self._worker = None
        if self._agents is not None:
            await self._agents.stop()
            self._agents = None
        if self._store is not None:
            self._store.close()
            self._store = None

    def _team(self, agent: str) -> str:
        record = self._agents.get(agent) if self._agents is not None else None
        return record.manifest.team if record is not None else ""

    def _project(self, agent: str, project: str) -> str:
        """``project`` if it is bound to ``agent`` (per the registry mirror), else ""."""
        if not project:
            return ""
        record = self._agents.get(agent) if self._agents is not None else None
        return project if record is not None and project in bound_projects(record.manifest) else ""

    # -- reports -----------------------------------------------------------------------

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

    async def cost_by_version(self, request: CostByVersionRequest) -> CostByVersion:
        """``sb.cost.versions``: an agent's spend per version (canary guards, rollout status)."""
        rows = await asyncio.to_thread(self.store.by_version, request.agent, request.since)
        return CostByVersion(agent=request.agent, since=request.since, versions=tuple(rows))
