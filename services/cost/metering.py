"""Usage metering: reports from ``SB_USAGE``, validated, attributed, priced and stored.

The cost service's durable pull consumer (:class:`~broker.runtime.consumer.PullWorker`,
shared by every replica) fetches batches and hands each to
:meth:`UsageMeter.meter_batch`. Each report is validated (shape, and that
its ``agent`` field matches the subject it was published on, so one agent
cannot report usage as another) and attributed from what operators decided,
never from what the report says (an agent could write anything): the team
is the one the ``sb_agents`` registry mirror gives for the agent *when it is
metered* (its bound team); the report's ``project`` only if it is one of the
projects bound to the agent; the delegating agents only from the
``Sb-Chain`` the policy service signed for it (sent back by the SDK with the
report, verified with the services' key as of the report's time in the
stream), never from the report's ``on_behalf_of``; and likewise the caller
(the last agent of that signed chain: the one whose call the usage was made
while serving) and the caller's bound team, for chargeback by who asked. What is not honoured is
kept in the row (``ignored_project``, ``dropped_on_behalf_of``) and counted
(:attr:`MeteringStats.attribution`). Each report is then costed from the
prices file, and the batch is inserted in one SQL transaction that skips
reports already stored (primary key ``(agent, report id)``; see
:mod:`services.cost.store`). Only after the commit, and after the batch's
audit events (``usage``, ``rejected``) are acknowledged by JetStream, are the
messages acked. A crash anywhere before that leaves them unacked: JetStream
redelivers, the insert skips what was committed, so every report is counted
exactly once.

Invalid reports are audited as ``rejected``, counted, and terminated (never
redelivered forever, never silently dropped).

Usage that a budget applies to but that settles no reservation (the model
call skipped ``authorize``, or its reservation had expired) is charged all the
same, stored ``unreserved`` and audited (kind ``budget``, event ``unreserved``).
Thresholds the batch crossed and overspends go to the budget desk
(:meth:`services.cost.budget_desk.BudgetDesk.settled`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec
from nats.aio.msg import Msg
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import SpanKind

from broker.codec import decode
from broker.errors import InvalidInput, SchemaError, SignalboxError
from broker.replies import H_CHAIN, H_CHAIN_SIG
from broker.runtime.identity import verify_chain
from broker.runtime.service import ServiceHost
from broker.subjects import is_valid_token
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
from schemas import UsageReport
from services.cost.budget_desk import BudgetDesk
from services.cost.prices import NANOS_PER_USD
from services.cost.store import UsageStore

__all__ = ["MeteringStats", "UsageMeter"]

log = logging.getLogger(__name__)

#: Most agents read from a usage report's ``Sb-Chain`` (the policy service signs shorter ones).
_MAX_CHAIN = 256

#: A report being metered: its message, the report (trace checked), its stored row and
#: the trace context its span continues.
_Metered = tuple[Msg, UsageReport, dict[str, Any], otel_context.Context]


#: A report's signed delegating agents, the agents of a chain nobody signed, and the
#: signed chain's immediate caller (None: no signed chain).
_Chain = tuple[tuple[str, ...], tuple[str, ...], str | None]


def _attribution_counters() -> dict[str, int]:
    return {"ignored_projects": 0, "unsigned_chains": 0, "unreserved": 0}


@dataclass(slots=True)
class MeteringStats:
    """What one cost replica metered.

    Attributes:
        metered: Reports committed to SQL by this replica (duplicates included:
            the store, not this counter, is exactly-once).
        store_failures: Batches whose SQL write failed (left to redeliver).
        attribution: Reports whose ``project`` was not bound to their agent
            (``ignored_projects``), whose ``on_behalf_of`` or chain was not
            signed by the policy service (``unsigned_chains``), and budgeted
            usage that settled no reservation (``unreserved``).
    """

    metered: int = 0
    store_failures: int = 0
    attribution: dict[str, int] = field(default_factory=_attribution_counters)


class UsageMeter:
    """Validates, attributes, prices, stores and audits batches of usage reports.

    Args:
        service: The cost service it lives in (subjects, audit, spans, rejections).
        store: The cost store (rows, one transaction per batch).
        budgets: The budget desk: the definitions usage is settled against, and
            what to do about the thresholds and overspends of a committed batch.
        chain_key: The services' key for delegation chains
            (:func:`broker.runtime.identity.chain_key`; None on an open server).
        team: The team an agent is bound to now (``""``: unknown agent).
        project: A project named for an agent if it is bound to it, else ``""``.
        stats: The service's metering counters.
    """

    def __init__(
        self,
        service: ServiceHost,
        store: UsageStore,
        *,
        budgets: BudgetDesk,
        chain_key: bytes | None,
        team: Callable[[str], str],
        project: Callable[[str, str], str],
        stats: MeteringStats,
    ) -> None:
        self.service = service
        self.store = store
        self.budgets = budgets
        self._chain_key = chain_key
        self._team = team
        self._project = project
        self.stats = stats

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
        span = self.service.telemetry.start("sb.usage", parent=parent, kind=SpanKind.CONSUMER)
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

    def _checked_trace(self, msg: Msg, report: UsageReport) -> tuple[str, otel_context.Context]:
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

    # -- attribution -------------------------------------------------------------------

    def _signed_parents(self, msg: Msg, agent: str) -> _Chain:
        """The delegating agents of the chain the policy service signed for ``agent``, as the
        report's headers carry it; those of a chain it did not sign (or that expired); and
        the signed chain's immediate caller.

        Verified as of the report's time in the stream, so a report metered
        late (the cost service was down) keeps its chain.
        """
        headers = msg.headers or {}
        chain = headers.get(H_CHAIN, "")
        if not chain:
            return (), (), None
        names = tuple(dict.fromkeys(p for p in chain.split(",")[:_MAX_CHAIN] if is_valid_token(p)))
        at = self._report_time(msg)
        claimed = trace.get_current_span(extract(headers)).get_span_context()
        trace_id = f"{claimed.trace_id:032x}" if claimed.is_valid else ""
        signature = headers.get(H_CHAIN_SIG, "")
        if not verify_chain(self._chain_key, agent, chain, signature, at, trace_id):
            return (), names or ("(unreadable chain)",), None
        # The policy service appends the caller of each call it forwards: the last name
        # is the agent whose call this usage was made while serving.
        last = chain.rsplit(",", 1)[-1]
        return tuple(p for p in names if p != agent), (), last if is_valid_token(last) else None

    def _attributed_row(self, msg: Msg, report: UsageReport, now: float) -> dict[str, Any]:
        """The stored row of ``report``: team, project, delegating agents and the caller (with
        its team, from the registry like the report's own) as operators and the policy
        service decided them, with what the report named in vain (counted)."""
        project = self._project(report.agent, report.project)
        parents, unsigned, caller = self._signed_parents(msg, report.agent)
        dropped = tuple(
            dict.fromkeys(p for p in (*unsigned, *report.on_behalf_of) if p not in parents)
        )
        if report.project and not project:
            self.stats.attribution["ignored_projects"] += 1
        if dropped:
            self.stats.attribution["unsigned_chains"] += 1
        return self.store.row(
            report, team=self._team(report.agent), now=now, project=project,
            on_behalf_of=parents, ignored_project=report.project if not project else "",
            dropped_on_behalf_of=dropped, caller=caller,
            caller_team=self._team(caller) if caller is not None else None,
        )  # fmt: skip

    async def _audit_unreserved(self, report: UsageReport, row: dict[str, Any]) -> None:
        """Budgeted usage that settled no reservation: charged, and audited as such."""
        self.stats.attribution["unreserved"] += 1
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
        await self.service.audit.emit(
            "budget",
            actor=report.agent,
            subject=self.service.subjects.usage(report.agent),
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

    # -- metering ----------------------------------------------------------------------

    async def meter_batch(self, msgs: list[Msg]) -> None:
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
                actor = msg.subject.rsplit(".", 1)[-1]
                await self.service.reject(err, subject=msg.subject, actor=actor)
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
        budgets = self.budgets.lookup()
        try:
            alerts = await asyncio.to_thread(self.store.record, rows, budgets)
        except Exception:
            # Not committed: nothing is acked; JetStream redelivers the reports.
            self.stats.store_failures += 1
            log.exception(
                "cost: storing %d usage reports failed; they will be redelivered", len(rows)
            )
            for msg, *_ in reports:
                await msg.nak(delay=1)
            reports = []
        else:
            self.stats.metered += len(rows)
            overspends = [(r[1], over) for r in reports for over in r[2].get("overspends", ())]
            await self.budgets.settled(alerts, overspends)
        for msg, report, row, parent in reports:
            data = msgspec.to_builtins(report)
            data["team"] = row["team"]
            # What was charged (the report's own words stay under their keys).
            data["charged_project"] = row["project"]
            data["charged_on_behalf_of"] = [p for p in row["on_behalf_of"].split(",") if p]
            if row["caller"] is not None:  # chargeback by who asked (verified)
                data["caller"], data["caller_team"] = row["caller"], row["caller_team"]
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
            await self.service.audit.emit(
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
        if not await self.service.audit.flush_emitted(timeout=10):
            # Stored, but the audit events are not durable yet: redeliver (the
            # store skips the reports, the audit event ids dedupe).
            for msg in good + bad:
                await msg.nak(delay=1)
            return
        for msg in good:
            await msg.ack()
        for msg in bad:
            await msg.term()
