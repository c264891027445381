"""The policy service's counters, one typed field each (``PolicyService.stats``)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

__all__ = ["PolicyStats"]


@dataclass(slots=True)
class PolicyStats:
    """What one policy replica counted since it started.

    Attributes:
        calls: ``sb.out`` requests received.
        allowed: Calls forwarded (approved ones included).
        denied: Calls refused by policy (or an approval denied or expired).
        rejected: Requests refused before any decision (input, reply subject).
        ok: Forwarded calls answered without an error.
        errors: Forwarded calls answered with an error (a time-out included).
        timeouts: Forwarded calls not answered in time (``outcome_unknown``).
        late_replies: Answers that came after their call timed out (dropped).
        authz: Model and tool use requests (``sb.authz``).
        authz_allowed: Of those, allowed.
        authz_denied: Of those, denied.
        parked: Calls parked for human approval.
        approved: Parked calls approved and forwarded.
        shadow_disagreements: Decisions the shadow set would have made otherwise.
        internal_errors: Requests this service failed on (a bug: see its log).
        budget_refused: Model uses refused because a budget could not cover them.
        budget_unavailable: Model uses refused because no cost service answered.
        budget_unreadable: Model uses refused because a budget record is unreadable.
        unsigned_chains: Delegation chains sent back without a valid signature.
        moved_traces: Trace contexts a sender named but did not own (moved).
        audit_unavailable: Calls and uses refused because their decision was not stored.
        breaker_refused: Calls and uses refused by an open circuit breaker.
        breaker_trips: Breakers this replica tripped.
        breaker_probes: Half-open probe calls this replica let through.
    """

    calls: int = 0
    allowed: int = 0
    denied: int = 0
    rejected: int = 0
    ok: int = 0
    errors: int = 0
    timeouts: int = 0
    late_replies: int = 0
    authz: int = 0
    authz_allowed: int = 0
    authz_denied: int = 0
    parked: int = 0
    approved: int = 0
    shadow_disagreements: int = 0
    internal_errors: int = 0
    budget_refused: int = 0
    budget_unavailable: int = 0
    budget_unreadable: int = 0
    unsigned_chains: int = 0
    moved_traces: int = 0
    audit_unavailable: int = 0
    breaker_refused: int = 0
    breaker_trips: int = 0
    breaker_probes: int = 0

    def as_dict(self) -> dict[str, int]:
        """The counters by name (for logs and JSON)."""
        return dataclasses.asdict(self)
