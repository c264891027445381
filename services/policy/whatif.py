"""What-if replay: which recorded decisions would a candidate policy set change?

The policy service audits every decision with its inputs (kind ``decision``:
caller, target and capability of a mediated call, or the agent, action and
resource of an ``sb.authz`` question, plus the context: estimated tokens,
data tags, on-behalf-of chain). :func:`what_if` rebuilds each request from
such a record, asks a :class:`~services.policy.cedar.decider.CedarDecider` over the
candidate set, and reports every decision whose effect would change
(allow→deny, deny→allow, anything↔needs_approval), with counts by agent.

Each request is evaluated at the time it was recorded (time-based policies
decide as they would have then). Agents and capabilities come from the
registry's records *now*, not as they were: a record whose agent is no
longer registered is evaluated as an unknown agent (denied), which the
report shows like any other change. Records that are not policy
evaluations (approvals being used, rejected input) are skipped and counted.

Pure functions over an iterable of records: the CLI feeds them from the
audit stream (``signalbox policy test DIR --replay-since 24h``).
"""

from __future__ import annotations

import collections
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from schemas import AgentRecord, AuditEvent
from services.policy.cedar.decider import CedarDecider
from services.policy.decider import AccessRequest, CallRequest, RequestContext, UseRequest

__all__ = ["Change", "WhatIfReport", "request_from_record", "what_if"]


@dataclass(frozen=True, slots=True)
class Change:
    """One recorded decision the candidate would decide differently."""

    seq: int
    time: float
    agent: str
    action: str
    resource: str
    before: str
    after: str
    policy_ids: tuple[str, ...]
    reason: str


@dataclass(slots=True)
class WhatIfReport:
    """What replaying a trail against a candidate set found."""

    candidate_version: str
    evaluated: int = 0
    unchanged: int = 0
    skipped: int = 0
    changes: list[Change] = field(default_factory=list)
    #: ``(before, after)`` → how many decisions would change that way.
    by_transition: collections.Counter[tuple[str, str]] = field(default_factory=collections.Counter)
    #: ``(agent, before, after)`` → count.
    by_agent: collections.Counter[tuple[str, str, str]] = field(default_factory=collections.Counter)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready summary (the CLI's ``--json``)."""
        return {
            "candidate_version": self.candidate_version,
            "evaluated": self.evaluated,
            "unchanged": self.unchanged,
            "skipped": self.skipped,
            "changed": len(self.changes),
            "by_transition": [
                {"before": b, "after": a, "count": n} for (b, a), n in self.by_transition.items()
            ],
            "by_agent": [
                {"agent": g, "before": b, "after": a, "count": n}
                for (g, b, a), n in sorted(self.by_agent.items())
            ],
            "changes": [
                {
                    "seq": c.seq, "time": c.time, "agent": c.agent, "action": c.action,
                    "resource": c.resource, "before": c.before, "after": c.after,
                    "policy_ids": list(c.policy_ids), "reason": c.reason,
                }
                for c in self.changes
            ],
        }  # fmt: skip


def _strings(value: Any) -> tuple[str, ...]:
    if isinstance(value, list | tuple):
        return tuple(str(v) for v in value)
    return ()


def _context(data: Mapping[str, Any], when: float) -> RequestContext:
    tokens = data.get("estimated_tokens", 0)
    # Records made before the flag existed were evaluated as known estimates.
    known = data.get("estimated_tokens_known", True)
    return RequestContext(
        estimated_tokens=tokens if type(tokens) is int else 0,
        estimated_tokens_known=known if type(known) is bool else True,
        data_tags=_strings(data.get("data_tags")),
        on_behalf_of=_strings(data.get("on_behalf_of")),
        time=when,
        error=str(data.get("error") or ""),
    )


# What became of a parked call (services.policy.approvals): approved and used, or refused.
_APPROVAL_OUTCOMES = frozenset(
    {"approved", "approval_denied", "approval_expired", "approval_unavailable"}
)
#: Refused before any policy ran (an open circuit breaker): nothing to compare.
_NOT_EVALUATED = frozenset({"breaker_open"})


def request_from_record(
    event: AuditEvent, agents: Mapping[str, AgentRecord]
) -> tuple[AccessRequest, str, str, str] | None:
    """``(request, agent, action, resource)`` rebuilt from a decision record, or None.

    None for records that are not a policy evaluation (another kind, an
    approval being used, an unreadable record).
    """
    data = event.data
    decision = data.get("decision")
    if event.kind != "decision" or not isinstance(decision, dict):
        return None
    if decision.get("reason_code") in _APPROVAL_OUTCOMES | _NOT_EVALUATED:  # not an evaluation
        return None
    if "capability" in data:
        caller, target, capability = (
            str(data.get(k, "")) for k in ("caller", "target", "capability")
        )
        if not (caller and target and capability):
            return None
        context = data.get("context")
        call = CallRequest(
            caller=caller,
            target=target,
            capability=capability,
            caller_record=agents.get(caller),
            target_record=agents.get(target),
            context=_context(context if isinstance(context, dict) else {}, event.time),
        )
        return call, caller, "call", f"{target}.{capability}"
    agent, action, resource = (str(data.get(k, "")) for k in ("agent", "action", "resource"))
    if not (agent and action and resource):
        return None
    price = data.get("price_per_1k_tokens", 0.0)
    use = UseRequest(
        agent=agent,
        agent_record=agents.get(agent),
        action=action,
        resource=resource,
        provider=str(data.get("provider", "")),
        region=str(data.get("region", "")),
        price_per_1k_tokens=float(price) if isinstance(price, int | float) else 0.0,
        context=_context(data, event.time),
    )
    return use, agent, action, resource


def what_if(
    events: Iterable[AuditEvent],
    candidate: CedarDecider,
    agents: Mapping[str, AgentRecord],
) -> WhatIfReport:
    """Replay decision records against ``candidate``; see the module docstring."""
    report = WhatIfReport(candidate_version=candidate.version)
    for event in events:
        rebuilt = request_from_record(event, agents)
        if rebuilt is None:
            report.skipped += 1
            continue
        request, agent, action, resource = rebuilt
        before = str(event.data["decision"].get("effect", ""))
        after = candidate.decide(request)
        report.evaluated += 1
        if after.effect == before:
            report.unchanged += 1
            continue
        report.changes.append(
            Change(
                seq=event.seq,
                time=event.time,
                agent=agent,
                action=action,
                resource=resource,
                before=before,
                after=after.effect,
                policy_ids=tuple(after.policy_ids),
                reason="; ".join(after.reasons),
            )
        )
        report.by_transition[(before, after.effect)] += 1
        report.by_agent[(agent, before, after.effect)] += 1
    return report
