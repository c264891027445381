"""Is the audit trail complete? Every allowed call's outcome known, every outcome decided.

The policy service stores an allowed call's decision before it forwards the
call (write-ahead, ``SIGNALBOX_WRITE_AHEAD``) and its outcome (the ``call``
record: answered, failed, timed out) after. A replica that dies in between
leaves a decision with no outcome: the call may have run, nobody recorded
what came of it. This module finds those (**outcome unknown**), and the
converse that write-ahead rules out and older trails may hold: an outcome
with no decision (**undecided**: a call that ran with no durable decision).

Pure functions over records, fed in stream order, as
:class:`~services.tracing.verify.ChainVerifier` is (``signalbox audit verify``
feeds both from one scan). Records younger than ``grace`` seconds at the
end of the trail are still in flight, not missing.

Example::

    checker = CompletenessChecker(grace=60.0)
    for record in records:
        checker.feed(record)
    report = checker.finish(now=time.time())
    report.outcome_unknown  # decisions with no outcome
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Any

from schemas import AuditEvent

__all__ = ["CompletenessChecker", "CompletenessReport", "OpenCall"]

#: Outcomes of calls refused before they were forwarded: no decision needed one.
_NOT_FORWARDED = frozenset({"audit_unavailable"})


@dataclass(frozen=True, slots=True)
class OpenCall:
    """One call whose record pair is incomplete.

    Attributes:
        call_id: The policy service's call id (in both records).
        caller: The calling agent.
        target: The called agent.
        capability: The capability called.
        time: When the record there is was written (Unix seconds).
        trace_id: Its trace (``signalbox trace <id>``).
        seq: Its stream sequence, if known.
    """

    call_id: str
    caller: str
    target: str
    capability: str
    time: float
    trace_id: str
    seq: int = 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields."""
        return {
            "call_id": self.call_id, "caller": self.caller, "target": self.target,
            "capability": self.capability, "time": self.time, "trace_id": self.trace_id,
            "seq": self.seq,
        }  # fmt: skip


@dataclass(slots=True)
class CompletenessReport:
    """What :meth:`CompletenessChecker.finish` found.

    Attributes:
        decided: Allowed call decisions seen.
        completed: Of those, with their outcome.
        outcome_unknown: Allowed decisions older than the grace with no outcome.
        undecided: Outcomes with no decision (older than the grace after the
            first record: a call decided before the window started is not one).
        in_flight: Allowed decisions within the grace, not yet answered.
    """

    decided: int = 0
    completed: int = 0
    outcome_unknown: list[OpenCall] = field(default_factory=list)
    undecided: list[OpenCall] = field(default_factory=list)
    in_flight: int = 0

    @property
    def complete(self) -> bool:
        """No outcome unknown and nothing undecided."""
        return not self.outcome_unknown and not self.undecided

    def unknown_by_agent(self) -> dict[str, int]:
        """Outcome-unknown calls per caller, most first."""
        counts = collections.Counter(c.caller for c in self.outcome_unknown)
        return dict(counts.most_common())

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields."""
        return {
            "complete": self.complete,
            "decided": self.decided,
            "completed": self.completed,
            "in_flight": self.in_flight,
            "outcome_unknown": [c.to_dict() for c in self.outcome_unknown],
            "outcome_unknown_by_agent": self.unknown_by_agent(),
            "undecided": [c.to_dict() for c in self.undecided],
        }


def _open_call(record: AuditEvent, seq: int) -> OpenCall | None:
    data = record.data
    call_id = data.get("call_id")
    if not isinstance(call_id, str) or not call_id:
        return None
    return OpenCall(
        call_id=call_id,
        caller=str(data.get("caller", record.actor)),
        target=str(data.get("target", "")),
        capability=str(data.get("capability", "")),
        time=record.time,
        trace_id=record.trace_id,
        seq=seq,
    )


class CompletenessChecker:
    """Pairs allowed call decisions with call outcomes, fed one record at a time.

    Args:
        grace: Seconds a decision may wait for its outcome before it is
            reported (the longest call timeout plus margin), and after the
            first record within which an outcome may lack its decision.
    """

    def __init__(self, grace: float) -> None:
        self.grace = grace
        self._decided: dict[str, OpenCall] = {}
        self._orphans: dict[str, OpenCall] = {}
        #: Calls refused unrun after their decision (audit_unavailable) whose decision
        #: may be chained after that outcome (its batch was retried and stored late).
        self._refused: set[str] = set()
        self._first_time: float | None = None
        self._decisions = 0
        self._completed = 0

    def feed(self, record: AuditEvent, seq: int = 0) -> None:
        """Take the next record (any kind; only decisions and call outcomes count)."""
        if self._first_time is None:
            self._first_time = record.time
        if record.kind == "decision":
            decision = record.data.get("decision")
            effect = decision.get("effect") if isinstance(decision, dict) else None
            call = _open_call(record, seq) if effect == "allow" else None
            if call is None:
                return
            if call.call_id in self._decided:
                return  # the same decision again (a redelivered batch chained twice)
            self._decisions += 1
            if call.call_id in self._refused:
                self._refused.discard(call.call_id)
                self._completed += 1  # refused unrun, recorded before its decision
            elif self._orphans.pop(call.call_id, None) is not None:
                self._completed += 1  # its outcome was chained first (no write-ahead)
            else:
                self._decided[call.call_id] = call
        elif record.kind == "call":
            call = _open_call(record, seq)
            if call is None:
                return
            if self._decided.pop(call.call_id, None) is not None:
                self._completed += 1
            elif record.data.get("error_code") in _NOT_FORWARDED:
                self._refused.add(call.call_id)  # needs no decision; may get one later
            else:
                self._orphans.setdefault(call.call_id, call)

    def finish(self, now: float) -> CompletenessReport:
        """The report, as of ``now`` (Unix seconds)."""
        report = CompletenessReport(decided=self._decisions, completed=self._completed)
        for call in self._decided.values():
            if now - call.time > self.grace:
                report.outcome_unknown.append(call)
            else:
                report.in_flight += 1
        start = self._first_time if self._first_time is not None else now
        report.undecided = [c for c in self._orphans.values() if c.time - start > self.grace]
        report.outcome_unknown.sort(key=lambda c: c.time)
        report.undecided.sort(key=lambda c: c.time)
        return report
