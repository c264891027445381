"""Cost service: meters usage reports from ``SB_USAGE`` into SQL, answers cost reports.

Metering. A durable pull consumer (:class:`~broker.runtime.consumer.PullWorker`,
shared by every replica) fetches batches. Each report is validated (shape,
and that its ``agent`` field matches the subject it was published on, so one
agent cannot report usage as another) and attributed from what operators
decided, never from what the report says (an agent could write anything):
the team is the one the ``sb_agents`` registry mirror gives for the agent
*when it is metered* (its bound team); the report's ``project`` only if it
is one of the projects bound to the agent; the delegating agents only from
the ``Sb-Chain`` the policy service signed for it (sent back by the SDK
with the report, verified with the services' key as of the report's time in
the stream), never from the report's ``on_behalf_of``. What is not honoured
is kept in the row (``ignored_project``, ``dropped_on_behalf_of``) and
counted (:attr:`CostService.attribution_stats`). Each report is then costed
from the prices file, and the batch is
inserted in one SQL transaction that skips reports already stored (primary
key ``(agent, report id)``; see :mod:`services.cost.store`). Only after the
commit, and after the batch's audit events (``usage``, ``rejected``) are
acknowledged by JetStream, are the messages acked. A crash anywhere before
that leaves them unacked: JetStream redelivers, the insert skips what was
committed, so every report is counted exactly once.

Invalid reports are audited as ``rejected``, counted, and terminated (never
redelivered forever, never silently dropped).

Usage that a budget applies to but that settles no reservation (the model
call skipped ``authorize``, or its reservation had expired) is charged all the
same, stored ``unreserved`` and audited (kind ``budget``, event ``unreserved``).
Usage that no live reservation covers and that takes a budget past its limit
is an overspend: charged (the money was spent), audited as an ``alert``
(event ``overspend``: the budget, its limit, spent and reserved amounts, the
report and the agent), counted, and the agent's breaker is tripped until an
operator resets it, so no configuration lets spend pass a limit silently.

Budgets (:mod:`services.cost.budgets`). Definitions live in the KV bucket
``sb_budgets``; operators set them on ``sb.admin.budgets.<op>``. The policy
service asks ``sb.cost.reserve`` (services only) when it allows a model
call some budget applies to: the call's worst-case cost is reserved on every
applicable budget under a row lock, or refused naming the budget, its limit,
spent and reserved amounts. Usage reports settle their reservation in the
metering transaction; reservations left unsettled are released at expiry
(``SIGNALBOX_BUDGET_RESERVATION_TTL``). While a model call runs, the SDK
renews its reservation on ``sb.cost.renew.<agent>`` (the agent the subject
names, and only its own open reservation: each renewal moves the expiry to at
most the TTL from now, never past ``SIGNALBOX_BUDGET_RESERVATION_MAX_LIFETIME``
after it was made). Crossing a soft threshold or exhausting a budget is
audited (kind ``budget``).

Reports. ``sb.admin.cost.report`` (operators only: the server lets only
operators and services publish under ``sb.admin.>``) answers a
:class:`~schemas.CostReportRequest` with totals grouped by team, agent,
model, project, provider, hour or day (``signalbox cost report``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import msgspec
from nats.aio.msg import Msg
from nats.js.errors import KeyNotFoundError
from nats.js.kv import KeyValue
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import SpanKind

from broker.codec import decode, encode
from broker.diagnostics import cancel_and_wait
from broker.errors import InvalidInput, NotFound, SchemaError, SignalboxError
from broker.ids import new_id
from broker.money import usd
from broker.replies import H_CHAIN, H_CHAIN_SIG
from broker.runtime.breakers import BreakerBoard, breaker_key
from broker.runtime.budgets import applicable_keys, unreadable_budget, unreadable_keys
from broker.runtime.consumer import PullWorker
from broker.runtime.identity import chain_key, verify_chain
from broker.runtime.jetstream import KV_AGENTS, KV_BREAKERS, KV_BUDGETS, USAGE_STREAM
from broker.runtime.kvcache import KVCache
from broker.runtime.service import Service
from broker.settings import Settings
from broker.subjects import Audience, is_valid_token
from broker.telemetry import (
    ATTR,
    AuditIds,
    annotate,
    extract,
    hex_ids,
    owned_trace_id,
    parent_ids,
    trusted_parent,
)
from schemas import (
    AgentManifest,
    AgentRecord,
    Budget,
    BudgetList,
    BudgetStatus,
    CostByVersion,
    CostByVersionRequest,
    CostReport,
    CostReportRequest,
    ListBudgets,
    RemoveBudget,
    RenewReservation,
    Reservation,
    ReservationRenewed,
    ReserveBudget,
    SetBudget,
    ShowBudget,
    UsageReport,
    Wire,
)
from services.cost.budgets import BudgetAlert, Overspend
from services.cost.prices import NANOS_PER_USD, Prices, load_prices
from services.cost.store import UsageStore

__all__ = ["CONSUMER", "CostService", "bound_projects"]

log = logging.getLogger(__name__)

_PERIODIC = {"day": "daily", "month": "monthly"}

#: Durable consumer of every cost replica on ``SB_USAGE``.
CONSUMER = "sb-cost-meter"
#: Most agents read from a usage report's ``Sb-Chain`` (the policy service signs shorter ones).
_MAX_CHAIN = 256
#: The SDK renews a reservation when a third of the TTL has passed since it last did.
_RENEW_AT = 1 / 3

Req = TypeVar("Req")


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


_CAUSES = {
    "expired_reservation": "its reservation had expired before the report was metered (the "
    "model call outlived SIGNALBOX_BUDGET_RESERVATION_TTL without renewing it)",
    "unreserved": "it settled no reservation of its own",
    "over_reservation": "it cost more than its reservation held",
}


def _overspend_text(over: Overspend) -> str:
    """Why ``over`` is an overspend, in words an operator can act on."""
    c = over.charge
    state = "exhausted and overspent" if c.spent_usd >= c.limit_usd else "overspent"
    return (
        f"budget {over.budget.key} {state} by {over.agent}: usage report {over.report_id} "
        f"cost {usd(over.cost_nanos / NANOS_PER_USD)}, {usd(over.uncovered_nanos / NANOS_PER_USD)} "
        f"of it held by no live reservation ({_CAUSES[over.cause]}), leaving "
        f"{usd(c.spent_usd)} spent + {usd(c.reserved_usd)} reserved of {usd(c.limit_usd)}"
    )



#: A report being metered: its message, the report (trace checked), its stored row and
#: the trace context its span continues.
_Metered = tuple[Msg, UsageReport, dict[str, Any], otel_context.Context]

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
        attribution_stats: Reports whose ``project`` was not bound to their
            agent (``ignored_projects``), whose ``on_behalf_of`` or chain was
            not signed by the policy service (``unsigned_chains``), and budgeted
            usage that settled no reservation (``unreserved``), by this replica.
    """

    name = "cost"

    def __init__(self, settings: Settings, *, batch: int = 512, ack_wait: float = 5.0) -> None:
        super().__init__(settings)
        self.batch = batch
        self.ack_wait = ack_wait
        self.metered = 0
        self.store_failures = 0
        self.attribution_stats: dict[str, int] = {
            "ignored_projects": 0, "unsigned_chains": 0, "unreserved": 0,
        }  # fmt: skip
        #: The services' key for delegation chains (broker.runtime.identity; None when open).
        self._chain_key = chain_key(settings)
        self._prices: Prices | None = None
        self._store: UsageStore | None = None
        self._agents: KVCache[AgentRecord] | None = None
        self._worker: PullWorker | None = None
        self._budgets: KVCache[Budget] | None = None
        self.breakers: BreakerBoard | None = None
        self._budget_kv: KeyValue | None = None
        self._expiry: asyncio.Task[None] | None = None
        #: Reservations granted / refused / renewed (renewals refused), budget alerts
        #: audited and overspends alerted, by this replica.
        self.budget_stats: dict[str, int] = {
            "reserved": 0, "refused": 0, "expired": 0, "soft_alerts": 0, "exhausted": 0,
            "unreadable": 0, "renewed": 0, "renewals_refused": 0, "overspent": 0,
        }  # fmt: skip
        s = self.subjects
        self.endpoint(s.admin("cost", "report"), CostReportRequest)(self.cost_report)
        self.endpoint(s.cost_reserve, ReserveBudget, audience=Audience.SERVICE)(self.reserve)
        # Agent-scoped: the subject's last token is the agent (see handle()).
        self.endpoint(s.cost_renew_wildcard, RenewReservation, audience=Audience.AGENT)(
            self.renew_reservation
        )
        self.endpoint(s.cost_versions, CostByVersionRequest, audience=Audience.SERVICE)(
            self.cost_by_version
        )
        self.endpoint(s.admin("budgets", "set"), SetBudget)(self.set_budget)
        self.endpoint(s.admin("budgets", "remove"), RemoveBudget)(self.remove_budget)
        self.endpoint(s.admin("budgets", "list"), ListBudgets)(self.list_budgets)
        self.endpoint(s.admin("budgets", "show"), ShowBudget)(self.show_budget)

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
        self._budget_kv = await self.js.key_value(KV_BUDGETS)
        self._budgets = KVCache(self._budget_kv, Budget, on_unreadable=self._budget_unreadable)
        await self._budgets.start()
        #: Breakers this service trips when an agent's or a team's budget is exhausted.
        self.breakers = BreakerBoard(await self.js.key_value(KV_BREAKERS), self.audit, self.actor)
        await self.breakers.start()
        self._expiry = asyncio.ensure_future(self._expire_reservations())
        # Two batches in flight: one's SQL write (in a thread) and audit round
        # trip overlap the next one's decoding and costing (bench/cost.py).
        self._worker = PullWorker(
            self.js, USAGE_STREAM, CONSUMER, self.meter, batch=self.batch,
            ack_wait=self.ack_wait, concurrency=2,
        )  # fmt: skip
        await self._worker.start()

    async def on_stop(self) -> None:
        await cancel_and_wait(self._expiry, "the reservation expiry loop")
        self._expiry = None
        if self._budgets is not None:
            await self._budgets.stop()
            self._budgets = None
        if self.breakers is not None:
            await self.breakers.stop()
            self.breakers = None
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

    # -- traces (broker.telemetry) -------------------------------------------------------

    def _usage_span(
        self, msg: Msg, report: UsageReport, row: dict[str, Any], parent: otel_context.Context
    ) -> AuditIds:
        """One ``sb.usage`` span for a metered report, child of ``parent`` (the trace context
        :meth:`_checked_trace` kept); its ids, for the audit record (no span ids when the
        report names another trace than its headers)."""
        span = self.telemetry.start("sb.usage", parent=parent, kind=SpanKind.CONSUMER)
        annotate(span, lambda: {
            ATTR["agent"]: report.agent, ATTR["team"]: row.get("team", ""),
            ATTR["model"]: report.model, ATTR["provider"]: report.provider,
            ATTR["input_tokens"]: report.input_tokens,
            ATTR["output_tokens"]: report.output_tokens,
            ATTR["cost"]: int(row.get("cost_nanos") or 0) / 1e9,
            ATTR["system"]: "nats", ATTR["destination"]: msg.subject,
        })  # fmt: skip
        span.end()
        trace_id, span_id = hex_ids(span)
        if report.trace_id and report.trace_id != trace_id:
            return AuditIds(report.trace_id, "")
        return AuditIds(trace_id, span_id, *parent_ids(parent))

    def _trusted_trace(self, msg: Msg, agent: str) -> tuple[otel_context.Context, str]:
        """The trace context a report of ``agent`` may continue (``broker.telemetry``:
        its own trace, or one the policy service vouched for with the chain it signed),
        and the trace id its headers claimed (kept or not)."""
        headers = msg.headers or {}
        chain = headers.get(H_CHAIN, "")
        at = self._report_time(msg)

        def vouched(trace_id: str) -> bool:
            signature = headers.get(H_CHAIN_SIG, "")
            return verify_chain(self._chain_key, agent, chain, signature, at, trace_id)

        parent, moved_from = trusted_parent(headers, agent, vouched if chain else None)
        sc = trace.get_current_span(parent).get_span_context()
        return parent, moved_from or (f"{sc.trace_id:032x}" if sc.is_valid else "")

    def _checked_trace(
        self, msg: Msg, report: UsageReport
    ) -> tuple[str, otel_context.Context]:
        """The trace the report is stored and audited under, and the context its span
        continues (worked out once per report): its headers' trace as
        :meth:`_trusted_trace` keeps or moves it; a trace id the body names beyond that is
        moved into one the agent owns (``owned_trace_id``), never taken as is."""
        parent, claimed = self._trusted_trace(msg, report.agent)
        sc = trace.get_current_span(parent).get_span_context()
        kept = f"{sc.trace_id:032x}" if sc.is_valid else ""
        if not report.trace_id or report.trace_id == claimed:
            return kept, parent
        return owned_trace_id(report.agent, report.trace_id), parent

    @staticmethod
    def _report_time(msg: Msg) -> float:
        try:
            return msg.metadata.timestamp.timestamp()
        except Exception:  # not a JetStream delivery (tests feeding messages by hand)
            return time.time()

    def _team(self, agent: str) -> str:
        record = self._agents.get(agent) if self._agents is not None else None
        return record.manifest.team if record is not None else ""

    def _project(self, agent: str, project: str) -> str:
        """``project`` if it is bound to ``agent`` (per the registry mirror), else ""."""
        if not project:
            return ""
        record = self._agents.get(agent) if self._agents is not None else None
        return project if record is not None and project in bound_projects(record.manifest) else ""

    def _signed_parents(self, msg: Msg, agent: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """The delegating agents of the chain the policy service signed for ``agent``, as the
        report's headers carry it; and those of a chain it did not sign (or that expired).

        Verified as of the report's time in the stream, so a report metered
        late (the cost service was down) keeps its chain.
        """
        headers = msg.headers or {}
        chain = headers.get(H_CHAIN, "")
        if not chain:
            return (), ()
        names = tuple(dict.fromkeys(p for p in chain.split(",")[:_MAX_CHAIN] if is_valid_token(p)))
        at = self._report_time(msg)
        claimed = trace.get_current_span(extract(headers)).get_span_context()
        trace_id = f"{claimed.trace_id:032x}" if claimed.is_valid else ""
        signature = headers.get(H_CHAIN_SIG, "")
        if not verify_chain(self._chain_key, agent, chain, signature, at, trace_id):
            return (), names or ("(unreadable chain)",)
        return tuple(p for p in names if p != agent), ()

    def _attributed_row(self, msg: Msg, report: UsageReport, now: float) -> dict[str, Any]:
        """The stored row of ``report``: team, project and delegating agents as operators and
        the policy service decided them, with what the report named in vain (counted)."""
        project = self._project(report.agent, report.project)
        parents, unsigned = self._signed_parents(msg, report.agent)
        dropped = tuple(
            dict.fromkeys(p for p in (*unsigned, *report.on_behalf_of) if p not in parents)
        )
        if report.project and not project:
            self.attribution_stats["ignored_projects"] += 1
        if dropped:
            self.attribution_stats["unsigned_chains"] += 1
        return self.store.row(
            report, team=self._team(report.agent), now=now, project=project,
            on_behalf_of=parents, ignored_project=report.project if not project else "",
            dropped_on_behalf_of=dropped,
        )  # fmt: skip

    async def _audit_unreserved(self, report: UsageReport, row: dict[str, Any]) -> None:
        """Budgeted usage that settled no reservation: charged, and audited as such."""
        self.attribution_stats["unreserved"] += 1
        expired = bool(row.get("reservation_expired"))
        if expired:
            text = (
                f"{report.agent} reported usage of reservation {report.reservation_id}, which "
                "had expired before the report was metered (the model call outlived "
                "SIGNALBOX_BUDGET_RESERVATION_TTL without renewing it): charged to the budgets "
                "that apply now, outside any reservation"
            )
        else:
            text = (
                f"{report.agent} reported usage a budget applies to without a reservation (its "
                "model call was not authorized with Agent.model_call or "
                "Agent.authorize(estimated_tokens=...)): charged, but no budget was checked "
                "before the money was spent"
            )
        await self.audit.emit(
            "budget",
            actor=report.agent,
            subject=self.subjects.usage(report.agent),
            trace_id=report.trace_id,
            event_id=f"unreserved-{report.agent}-{report.id}",
            data={
                "event": "unreserved", "alert": "unreserved", "agent": report.agent,
                "report": report.id, "model": report.model, "team": row["team"],
                "project": row["project"], "on_behalf_of": row["on_behalf_of"],
                "cost_usd": int(row["cost_nanos"]) / NANOS_PER_USD,
                "reservation_id": report.reservation_id, "reservation_expired": expired,
                "text": text,
            },
        )  # fmt: skip

    async def _overspent(self, reports: list[_Metered]) -> None:
        """Usage that took a budget past its limit with no live reservation covering it:
        trip each such agent's breaker (until an operator resets it), then audit every
        overspend as an ``alert`` and count it. The usage itself stays charged."""
        found = [(r[1], over) for r in reports for over in r[2].get("overspends", ())]
        if not found:
            return
        last: dict[str, Overspend] = {}
        for _, over in found:
            last[over.agent] = over  # charged in order: the last is the furthest over
        for agent, over in last.items():
            await self._trip_overspender(agent, over)
        for report, over in found:
            self.budget_stats["overspent"] += 1
            c = over.charge
            log.warning(
                "cost: overspend: %s's usage report %s took budget %s to $%.4f spent + $%.4f "
                "reserved of $%.2f (%s); its breaker is tripped until reset",
                over.agent, over.report_id, over.budget.key, c.spent_usd, c.reserved_usd,
                c.limit_usd, over.cause,
            )  # fmt: skip
            await self.audit.emit(
                "alert",
                actor=over.agent,
                subject=f"$KV.{KV_BUDGETS}.{over.budget.key}",
                trace_id=report.trace_id,
                event_id=f"overspend-{over.agent}-{over.report_id}-{over.budget.key}",
                data={
                    "event": "overspend", "budget": over.budget.key, "scope": over.budget.scope,
                    "name": over.budget.name, "window": over.budget.window,
                    "limit_usd": c.limit_usd, "spent_usd": c.spent_usd,
                    "reserved_usd": c.reserved_usd,
                    "over_usd": max(0.0, c.spent_usd + c.reserved_usd - c.limit_usd),
                    "window_start": c.window_start, "window_end": c.window_end,
                    "agent": over.agent, "report": over.report_id,
                    "reservation_id": over.reservation_id, "cause": over.cause,
                    "model": report.model, "cost_usd": over.cost_nanos / NANOS_PER_USD,
                    "uncovered_usd": over.uncovered_nanos / NANOS_PER_USD,
                    "text": _overspend_text(over),
                    "effect": "charged (the money was spent); the breaker agent."
                    f"{over.agent} is tripped: its model use and calls are refused until an "
                    "operator resets it",
                    "fix": f"signalbox breakers reset agent:{over.agent}",
                },
            )  # fmt: skip

    async def _trip_overspender(self, agent: str, over: Overspend) -> None:
        """Open ``agent``'s breaker until an operator resets it (reason ``budget``)."""
        if self.breakers is None:
            return
        c = over.charge
        try:
            await self.breakers.trip(
                breaker_key("agent", agent),
                "budget",
                f"{_overspend_text(over)}; its model use is refused until an operator resets "
                f"this breaker (`signalbox breakers reset agent:{agent}`)",
                figures={"limit_usd": c.limit_usd, "spent_usd": c.spent_usd,
                         "reserved_usd": c.reserved_usd,
                         "uncovered_usd": over.uncovered_nanos / NANOS_PER_USD},
                cooldown=None,
            )  # fmt: skip
        except SignalboxError as err:  # the alert is audited all the same
            log.error("cost: could not trip the breaker of overspending %s: %s", agent, err.message)

    async def meter(self, msgs: list[Msg]) -> None:
        """Validate, store (one transaction), audit, then ack one batch."""
        good: list[Msg] = []
        bad: list[Msg] = []
        rows: list[dict[str, Any]] = []
        reports: list[_Metered] = []
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
            trace_id, parent = self._checked_trace(msg, report)
            if trace_id != report.trace_id:
                report = msgspec.structs.replace(report, trace_id=trace_id)
            row = self._attributed_row(msg, report, now)
            rows.append(row)
            reports.append((msg, report, row, parent))
        budgets = self._budgets if self._budgets is not None and len(self._budgets) else None
        try:
            alerts = await asyncio.to_thread(self.store.record, rows, budgets)
        except Exception:
            # Not committed: nothing is acked; JetStream redelivers the reports.
            self.store_failures += 1
            log.exception(
                "cost: storing %d usage reports failed; they will be redelivered", len(rows)
            )
            for msg, *_ in reports:
                await msg.nak(delay=1)
            reports = []
        else:
            self.metered += len(rows)
            # Breakers before records: an exhausted budget's, then those of the agents
            # whose usage overran a limit (held until reset: the last word on them).
            for alert in alerts:
                if alert.hard:
                    await self._trip_exhausted(alert)
            await self._overspent(reports)
            for alert in alerts:
                await self._alert(alert, actor=self.actor, trip=False)
        for msg, report, row, parent in reports:
            data = msgspec.to_builtins(report)
            data["team"] = row["team"]
            # What was charged (the report's own words stay under their keys).
            data["charged_project"] = row["project"]
            data["charged_on_behalf_of"] = [p for p in row["on_behalf_of"].split(",") if p]
            if row["ignored_project"] or row["dropped_on_behalf_of"]:
                data["ignored_project"] = row["ignored_project"]
                data["dropped_on_behalf_of"] = row["dropped_on_behalf_of"]
            data["unreserved"] = row["unreserved"]
            # Self-reported: what the agent's SDK said it used. Provider-metered usage
            # (the model gateway, next) will say "gateway"; nothing settles below it then.
            data["source"] = "agent"
            if row.get("overspends"):
                data["overspent"] = sorted({o.budget.key for o in row["overspends"]})
            data["cost_nanos"] = row["cost_nanos"]
            data["priced_by_fallback"] = row["priced_by_fallback"]
            ids = self._usage_span(msg, report, row, parent)
            await self.audit.emit(
                "usage",
                actor=report.agent,
                subject=msg.subject,
                trace_id=ids.trace_id,
                span_id=ids.span_id,
                parent_span_id=ids.parent_span_id,
                via_span_id=ids.via_span_id,
                event_id=f"usage-{report.agent}-{report.id}",
                data=data,
            )
            if row["unreserved"]:
                await self._audit_unreserved(report, row)
            good.append(msg)
        # This batch's events only: another batch's, emitted meanwhile, are its own to wait for.
        if not await self.audit.flush_emitted(timeout=10):
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

    async def cost_by_version(self, request: CostByVersionRequest) -> CostByVersion:
        """``sb.cost.versions``: an agent's spend per version (canary guards, rollout status)."""
        rows = await asyncio.to_thread(self.store.by_version, request.agent, request.since)
        return CostByVersion(agent=request.agent, since=request.since, versions=tuple(rows))

    # -- budgets ---------------------------------------------------------------

    def _budget_cache(self) -> KVCache[Budget]:
        assert self._budgets is not None, "service not started"
        return self._budgets

    async def reserve(self, request: ReserveBudget) -> Reservation:
        """``sb.cost.reserve``: reserve a model call's worst-case cost on every applicable budget.

        Nothing applies: granted with no id (nothing to settle). Refused: no
        amount is held anywhere, the refusal names the budget, and it is
        audited (kind ``budget``). The request's ``project`` counts only if
        it is bound to the agent (its usage report could not charge it either).
        """
        cache = self._budget_cache()
        team = self._team(request.agent)
        project = self._project(request.agent, request.project)
        bad = unreadable_keys(
            cache.unreadable, agent=request.agent, team=team, project=project,
            on_behalf_of=request.on_behalf_of,
        )  # fmt: skip
        if bad:  # fail closed: the policy service turns this into a deny
            raise unreadable_budget(*bad[0])
        budgets = applicable_keys(
            cache,
            agent=request.agent,
            team=team,
            project=project,
            on_behalf_of=request.on_behalf_of,
        )
        # Worst case: without a cap on the completion, every token is priced as output.
        if request.output_tokens:
            priced = self.prices.cost(request.model, request.input_tokens, request.output_tokens)
        else:
            priced = self.prices.cost(request.model, 0, request.input_tokens)
        amount = priced.nanos / NANOS_PER_USD
        if not budgets:
            return Reservation(granted=True, amount_usd=amount, priced_by_fallback=priced.fallback)
        now = time.time()
        reservation_id = new_id()
        expires_at = now + self.settings.budget_reservation_ttl
        grant = await asyncio.to_thread(
            self.store.ledger.reserve,
            budgets,
            reservation_id=reservation_id,
            agent=request.agent,
            amount_nanos=priced.nanos,
            now=now,
            expires_at=expires_at,
            trace_id=request.trace_id,
        )
        for alert in grant.alerts:
            await self._alert(alert, actor=request.agent, trace_id=request.trace_id)
        if not grant.granted:
            self.budget_stats["refused"] += 1
            assert grant.refused is not None
            await self.audit.emit(
                "budget",
                actor=request.agent,
                subject=self.subjects.cost_reserve,
                trace_id=request.trace_id,
                data={
                    "event": "refused", "agent": request.agent, "model": request.model,
                    "amount_usd": amount, "budget": msgspec.to_builtins(grant.refused),
                    "exhausted": grant.exhausted,
                },
            )  # fmt: skip
            return Reservation(
                granted=False, amount_usd=amount, refused=grant.refused,
                priced_by_fallback=priced.fallback,
            )  # fmt: skip
        self.budget_stats["reserved"] += 1
        return Reservation(
            granted=True, id=reservation_id, amount_usd=amount, expires_at=expires_at,
            charges=tuple(grant.charges), priced_by_fallback=priced.fallback,
        )  # fmt: skip

    async def handle(
        self,
        data: bytes,
        subject: str,
        request_type: type[Req],
        fn: Callable[[Req], Awaitable[Wire]],
    ) -> tuple[bytes, dict[str, str]]:
        """The endpoint contract; a renewal is asked by the agent its subject names
        (``sb.cost.renew.<agent>``, which only that agent may publish), never a body field."""
        if request_type is RenewReservation:
            agent = self.subjects.sender_of(subject) or ""
            fn = functools.partial(self.renew_reservation, agent=agent)
        return await super().handle(data, subject, request_type, fn)

    async def renew_reservation(
        self, request: RenewReservation, agent: str = ""
    ) -> ReservationRenewed:
        """``sb.cost.renew.<agent>``: keep the reservation of ``agent``'s model call in progress.

        Only ``agent``'s own open reservation is renewed, to at most
        ``SIGNALBOX_BUDGET_RESERVATION_TTL`` from now and never past
        ``SIGNALBOX_BUDGET_RESERVATION_MAX_LIFETIME`` after it was made; a
        settled or expired one is answered as it is (nothing renewed).

        Raises:
            NotFound: ``agent`` has no reservation with that id (another
                agent's is not touched, nor said to exist).
        """
        ttl = self.settings.budget_reservation_ttl
        now = time.time()
        outcome = None
        if agent:
            outcome = await asyncio.to_thread(
                self.store.ledger.renew, request.reservation_id, agent=agent, now=now, ttl=ttl,
                max_lifetime=self.settings.budget_reservation_max_lifetime,
            )  # fmt: skip
        if outcome is None:
            self.budget_stats["renewals_refused"] += 1
            raise NotFound(
                f"{agent or 'this sender'} has no budget reservation {request.reservation_id}; "
                "an agent renews only the reservation of its own model call in progress",
                details={"reservation_id": request.reservation_id, "agent": agent},
            )
        if outcome.renewed:
            self.budget_stats["renewed"] += 1
        open_ = outcome.state == "open"
        renew_in = 0.0
        if open_ and not outcome.capped:
            # When a third of the TTL has passed since the expiry was last moved.
            renew_in = max(0.0, outcome.expires_at - now - ttl * (1 - _RENEW_AT))
        return ReservationRenewed(
            reservation_id=request.reservation_id, state=outcome.state,
            renewed=outcome.renewed, expires_at=outcome.expires_at, renew_in=renew_in,
            capped=open_ and outcome.capped,
        )  # fmt: skip

    def _budget_unreadable(self, key: str, reason: str) -> None:
        """A stored budget cannot be read: audit it (kind ``alert``); calls it governs fail."""
        self.budget_stats["unreadable"] += 1
        err = unreadable_budget(key, reason)
        self.audit.alert_unreadable(
            KV_BUDGETS, key, reason,
            effect="model calls this budget governs are refused (budget_unreadable)",
            fix=err.details["fix"],
        )  # fmt: skip

    async def _alert(
        self, alert: BudgetAlert, *, actor: str, trace_id: str = "", trip: bool = True
    ) -> None:
        """Audit a crossed threshold (soft: an alert; hard: the budget is exhausted).

        An exhausted agent or team budget also trips that agent's or team's
        breaker until the window ends (every policy replica then refuses its
        calls at once, not only its model calls); at the end one probe call
        passes and closes it. A project has no breaker: its calls are refused
        at reservation. ``trip=False``: the caller tripped it already
        (:meth:`_trip_exhausted`).
        """
        self.budget_stats["exhausted" if alert.hard else "soft_alerts"] += 1
        event = "exhausted" if alert.hard else "soft_threshold"
        log.warning(
            "cost: budget %s %s: spent $%.4f + reserved $%.4f of $%.2f",
            alert.budget.key, event.replace("_", " "), alert.charge.spent_usd,
            alert.charge.reserved_usd, alert.charge.limit_usd,
        )  # fmt: skip
        if alert.hard and trip:
            await self._trip_exhausted(alert)
        await self.audit.emit(
            "budget",
            actor=actor,
            subject=f"$KV.{KV_BUDGETS}.{alert.budget.key}",
            trace_id=trace_id,
            data={
                "event": event, "budget": msgspec.to_builtins(alert.budget),
                "charge": msgspec.to_builtins(alert.charge),
                "soft_ratio": alert.budget.soft_ratio,
            },
        )  # fmt: skip

    async def _trip_exhausted(self, alert: BudgetAlert) -> None:
        """Trip the breaker of an exhausted agent or team budget until its window ends."""
        budget = alert.budget
        if alert.hard and budget.scope != "project" and self.breakers is not None:
            charge = alert.charge
            try:
                await self.breakers.trip(
                    breaker_key(budget.scope, budget.name),
                    "budget",
                    f"{_PERIODIC[budget.window]} budget {budget.key} exhausted: "
                    f"{usd(charge.spent_usd)} spent of {usd(charge.limit_usd)}; it resets at "
                    "the end of the window, or raise it with "
                    f"`signalbox budgets set {budget.scope}:{budget.name}`",
                    figures={"limit_usd": charge.limit_usd, "spent_usd": charge.spent_usd,
                             "reserved_usd": charge.reserved_usd},
                    cooldown=max(1.0, charge.window_end - time.time()),
                )  # fmt: skip
            except SignalboxError as err:  # audited either way; refusals still hold
                log.error("cost: could not trip the breaker of %s: %s", budget.key, err.message)

    async def _expire_reservations(self) -> None:
        """Release reservations nobody settled, every few seconds (every replica; row-locked)."""
        interval = min(5.0, max(0.05, self.settings.budget_reservation_ttl / 4))
        while True:
            await asyncio.sleep(interval)
            try:
                released = await asyncio.to_thread(self.store.ledger.expire, time.time())
            except Exception:
                log.exception("cost: releasing expired reservations failed; will retry")
                continue
            if released:
                self.budget_stats["expired"] += released
                log.info("cost: released %d expired budget reservations", released)

    async def set_budget(self, request: SetBudget) -> BudgetStatus:
        """``set``: create or change a budget (audited with the previous definition)."""
        budget = Budget(
            scope=request.scope, name=request.name, window=request.window,
            limit_usd=request.limit_usd, soft_ratio=request.soft_ratio,
            set_by=self.operator(request.requested_by), set_at=time.time(),
        )  # fmt: skip
        assert self._budget_kv is not None
        previous = self._budget_cache().get(budget.key)
        await self._budget_kv.put(budget.key, encode(budget))
        await self.audit.emit(
            "admin",
            actor=budget.set_by,
            subject=self.subjects.admin("budgets", "set"),
            data={
                "op": "budget_set", "budget": msgspec.to_builtins(budget),
                "previous": msgspec.to_builtins(previous) if previous else None,
            },
        )  # fmt: skip
        status = (await asyncio.to_thread(self.store.ledger.status, budget, time.time()))[0]
        if status.spent_usd < budget.limit_usd:
            await self._release_breaker(budget, f"budget {budget.key} set to "
                                        f"{usd(budget.limit_usd)} by {budget.set_by}")  # fmt: skip
        return status

    async def _release_breaker(self, budget: Budget, text: str) -> None:
        """Close the scope's breaker if an exhausted budget tripped it and no longer holds."""
        if budget.scope == "project" or self.breakers is None:
            return
        key = breaker_key(budget.scope, budget.name)
        breaker = self.breakers.get(key)
        if breaker is None or breaker.state == "closed" or breaker.reason != "budget":
            return
        with contextlib.suppress(SignalboxError):  # lost a race: someone else reset it
            await self.breakers.reset(key, by=budget.set_by or self.actor, text=text)

    async def remove_budget(self, request: RemoveBudget) -> BudgetStatus:
        """``remove``: delete a budget's definition (its windows stay in the store)."""
        key = f"{request.scope}.{request.name}.{request.window}"
        budget = self._budget_cache().get(key)
        if budget is None:
            raise NotFound(
                f"no {request.window} budget for {request.scope} {request.name}; "
                "`signalbox budgets list` shows the budgets",
                details={"key": key},
            )
        assert self._budget_kv is not None
        with contextlib.suppress(KeyNotFoundError):
            await self._budget_kv.delete(key)
        who = self.operator(request.requested_by)
        await self._release_breaker(budget, f"budget {key} removed by {who}")
        await self.audit.emit(
            "admin",
            actor=who,
            subject=self.subjects.admin("budgets", "remove"),
            data={"op": "budget_removed", "budget": msgspec.to_builtins(budget)},
        )
        return (await asyncio.to_thread(self.store.ledger.status, budget, time.time()))[0]

    async def list_budgets(self, request: ListBudgets) -> BudgetList:
        """``list``: every budget (or one scope's) in its current window."""
        now = time.time()
        budgets = sorted(
            (b for b in self._budget_cache().values()
             if request.scope is None or b.scope == request.scope),
            key=lambda b: b.key,
        )  # fmt: skip
        rows = [(await asyncio.to_thread(self.store.ledger.status, b, now))[0] for b in budgets]
        unreadable = {
            k: why for k, why in sorted(self._budget_cache().unreadable.items())
            if request.scope is None or k.startswith(f"{request.scope}.")
        }  # fmt: skip
        return BudgetList(budgets=tuple(rows), unreadable=unreadable)

    async def show_budget(self, request: ShowBudget) -> BudgetList:
        """``show``: one scope/name's budgets, current and past windows."""
        now = time.time()
        rows: list[BudgetStatus] = []
        for window in ("day", "month"):
            budget = self._budget_cache().get(f"{request.scope}.{request.name}.{window}")
            if budget is not None:
                rows.extend(
                    await asyncio.to_thread(self.store.ledger.status, budget, now, request.windows)
                )
        if not rows:
            raise NotFound(
                f"no budget for {request.scope} {request.name}; set one with "
                f"`signalbox budgets set {request.scope}:{request.name} --limit USD`",
                details={"scope": request.scope, "name": request.name},
            )
        return BudgetList(budgets=tuple(rows))
