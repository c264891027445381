"""Calls refused unrun are complete in whichever order their two records were chained.

When JetStream does not acknowledge a write-ahead decision in time (a cluster node
or the server going away), the policy service refuses the call unrun
(``audit_unavailable``) and emits that outcome. The decision's batch is still
retried by the audit emitter and may be stored later, so the chain can hold the
``call`` record (``error_code: audit_unavailable``) *before* the allowed
``decision``. ``tests/chaos``' cluster scenario found ``CompletenessChecker``
dropping such an outcome (no decision yet, and not an orphan) and then counting
the decision as an allowed call whose outcome is unknown: ``audit verify
--complete`` told the operator hundreds of calls may have run, and exited 1,
although the trail said they were refused unrun.
"""

from __future__ import annotations

from broker.ids import new_id
from schemas import AuditEvent
from services.tracing.complete import CompletenessChecker

NOW = 1_000_000.0


def _decision(call_id: str, at: float) -> AuditEvent:
    return AuditEvent(
        id=new_id(), time=at, kind="decision", actor="a", subject="sb.out.a.b.echo",
        data={"call_id": call_id, "caller": "a", "target": "b", "capability": "echo",
              "decision": {"effect": "allow"}},
    )  # fmt: skip


def _refused(call_id: str, at: float) -> AuditEvent:
    return AuditEvent(
        id=new_id(), time=at, kind="call", actor="a", subject="sb.in.b.echo",
        data={"call_id": call_id, "caller": "a", "target": "b", "capability": "echo",
              "ok": False, "error_code": "audit_unavailable"},
    )  # fmt: skip


def test_a_refused_call_whose_decision_was_chained_first_is_complete() -> None:
    """The order the checker handles: decision, then the refusal."""
    checker = CompletenessChecker(grace=60.0)
    checker.feed(_decision("c1", NOW - 500), 1)
    checker.feed(_refused("c1", NOW - 498), 2)
    report = checker.finish(NOW)
    assert report.complete and (report.decided, report.completed) == (1, 1)


def test_a_refused_call_whose_decision_was_chained_after_its_outcome_is_complete() -> None:
    """The order a failover makes: the refusal first, the decision on the emitter's retry."""
    checker = CompletenessChecker(grace=60.0)
    checker.feed(_refused("c1", NOW - 498), 1)
    checker.feed(_decision("c1", NOW - 500), 2)
    report = checker.finish(NOW)
    assert [c.call_id for c in report.outcome_unknown] == []
    assert report.complete and (report.decided, report.completed) == (1, 1)
