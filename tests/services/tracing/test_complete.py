"""``audit verify`` finds calls whose outcome is unknown, and calls that ran undecided.

Unit tests of :class:`CompletenessChecker` over hand-made records, then the
CLI over a real chain: a decision with no outcome (what a policy replica
killed between forwarding and recording leaves) is listed, by caller, and
makes ``--complete`` exit 1; a complete trail passes.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import pytest
from support import ainvoke

from broker.ids import new_id
from broker.runtime.audit import AuditEmitter
from broker.settings import Settings
from broker.subjects import Subjects
from schemas import AuditEvent
from services.tracing.complete import CompletenessChecker

if TYPE_CHECKING:
    from support import AuditTrail, ServiceConnector, StackFactory

NOW = 1_000_000.0


def _decision(call_id: str, at: float, effect: str = "allow", caller: str = "a") -> AuditEvent:
    return AuditEvent(
        id=new_id(), time=at, kind="decision", actor=caller, subject=f"sb.out.{caller}.b.echo",
        trace_id="t" * 32,
        data={"call_id": call_id, "caller": caller, "target": "b", "capability": "echo",
              "decision": {"effect": effect}},
    )  # fmt: skip


def _outcome(call_id: str, at: float, error_code: str = "", caller: str = "a") -> AuditEvent:
    return AuditEvent(
        id=new_id(), time=at, kind="call", actor=caller, subject="sb.in.b.echo",
        data={"call_id": call_id, "caller": caller, "target": "b", "capability": "echo",
              "ok": not error_code, "error_code": error_code},
    )  # fmt: skip


def _check(records: Sequence[AuditEvent], grace: float = 60.0) -> Any:
    checker = CompletenessChecker(grace)
    for seq, record in enumerate(records, start=1):
        checker.feed(record, seq)
    return checker.finish(NOW)


def test_every_allowed_call_with_its_outcome_is_complete() -> None:
    report = _check([
        _decision("c1", NOW - 500), _outcome("c1", NOW - 499),
        _decision("c2", NOW - 400, effect="deny"),  # refused: no outcome expected
        _decision("c3", NOW - 300, effect="needs_approval"),
        _decision("c3", NOW - 200),  # approved later: same call id, allowed
        _outcome("c3", NOW - 199),
        _outcome("c4", NOW - 100), _decision("c4", NOW - 100),  # chained the other way round
    ])  # fmt: skip
    assert report.complete
    assert (report.decided, report.completed, report.in_flight) == (3, 3, 0)


def test_a_decision_without_outcome_is_unknown_once_past_the_grace() -> None:
    report = _check([
        _decision("old", NOW - 500, caller="a"),
        _decision("older", NOW - 900, caller="b"),
        _decision("old2", NOW - 300, caller="a"),
        _decision("recent", NOW - 10),  # within the grace: in flight
    ])  # fmt: skip
    assert not report.complete
    assert [c.call_id for c in report.outcome_unknown] == ["older", "old", "old2"]  # by time
    assert report.unknown_by_agent() == {"a": 2, "b": 1}
    assert report.in_flight == 1
    assert report.outcome_unknown[1].seq == 1 and report.outcome_unknown[1].trace_id


def test_an_outcome_without_decision_ran_undecided() -> None:
    report = _check([
        _outcome("before-window", NOW - 990),  # decided before the records checked began
        _decision("x", NOW - 900), _outcome("x", NOW - 899),
        _outcome("ghost", NOW - 500),
        # Refused because its decision could not be stored: it never ran.
        _outcome("unstored", NOW - 400, error_code="audit_unavailable"),
    ], grace=60)  # fmt: skip
    assert [c.call_id for c in report.undecided] == ["ghost"]
    assert not report.complete


# -- through the CLI, over a real chain ---------------------------------------------------------

pytestmark = pytest.mark.usefixtures("cli_operator")


async def test_audit_verify_lists_unknown_outcomes_and_complete_fails_on_them(
    make_stack: StackFactory, audit_trail: AuditTrail, service_nc: ServiceConnector,
    settings: Settings,
) -> None:  # fmt: skip
    await make_stack(services=["tracing"])
    nc = await service_nc()
    emitter = AuditEmitter(nc, Subjects("sb"), "service:policy")
    long_ago = time.time() - 3600
    for record in (
        _decision("done", long_ago),
        _outcome("done", long_ago + 1),
        _decision("lost-1", long_ago + 2, caller="loans"),
        _decision("lost-2", long_ago + 3, caller="loans"),
    ):
        emitter.add(record)
    assert await emitter.flush()
    await audit_trail.wait_for(lambda r: r.kind in ("decision", "call"), count=4)
    await emitter.close()
    assert settings.nats_url
    url = settings.nats_url

    text = await ainvoke(["audit", "verify", "--nats-url", url])
    assert text.exit_code == 0, text.output  # the chain is sound; reported, not failed
    assert "2 outcome unknown" in text.output
    assert "lost-1" in text.output and "loans 2" in text.output

    complete = await ainvoke(["audit", "verify", "--complete", "--nats-url", url])
    assert complete.exit_code == 1, complete.output

    as_json = await ainvoke(["audit", "verify", "--complete", "--json", "--nats-url", url])
    assert as_json.exit_code == 1
    calls = json.loads(as_json.output)["calls"]
    assert [c["call_id"] for c in calls["outcome_unknown"]] == ["lost-1", "lost-2"]
    assert calls["outcome_unknown_by_agent"] == {"loans": 2}
    assert (calls["decided"], calls["completed"]) == (3, 1)

    # A grace longer than their age: still in flight, nothing unknown.
    patient = await ainvoke(["audit", "verify", "--complete", "--grace", "7200", "--nats-url", url])
    assert patient.exit_code == 0, patient.output
