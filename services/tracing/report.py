"""Compliance reports over the audit trail: who called capabilities carrying a tag.

``signalbox audit report --tag pii --since 24h`` asks the registry which
capabilities carry the tag (:func:`tagged_capabilities`), replays the
``decision`` records of the window and counts them per caller and
capability, by effect (:func:`tag_report`). Every mediated call attempt has
exactly one decision record, so allowed decisions are the calls that went
through and the others the attempts that were refused.

Example::

    tagged = tagged_capabilities(records, "pii")
    rows = tag_report(decisions, tagged)
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from schemas import AgentRecord, AuditEvent

__all__ = ["TagUsage", "tag_report", "tagged_capabilities"]


@dataclass(slots=True)
class TagUsage:
    """How often one caller asked for one tagged capability, and what was decided.

    Attributes:
        caller: The calling agent.
        target: The agent offering the capability.
        capability: The capability's name.
        attempts: Decision records (call attempts).
        effects: Count per decision effect (``allow``, ``deny``, ``needs_approval``...).
        first_time: Unix time of the first attempt in the window.
        last_time: Unix time of the last attempt in the window.
    """

    caller: str
    target: str
    capability: str
    attempts: int = 0
    effects: dict[str, int] = field(default_factory=dict)
    first_time: float = 0.0
    last_time: float = 0.0


def tagged_capabilities(records: Iterable[AgentRecord], tag: str) -> set[tuple[str, str]]:
    """``(agent, capability)`` pairs whose capability carries ``tag`` in any of ``records``.

    Every version counts: a capability tagged in one version of an agent is
    reported for calls to any of its versions (the audit record does not say
    which version served it).
    """
    return {
        (record.manifest.name, cap.name)
        for record in records
        for cap in record.manifest.capabilities
        if tag in cap.tags
    }


def tag_report(events: Iterable[AuditEvent], tagged: set[tuple[str, str]]) -> list[TagUsage]:
    """Count the ``decision`` records about ``tagged`` capabilities per caller and capability.

    Other kinds, and decisions about other capabilities, are skipped.
    Rows come sorted by attempts (most first), then caller and capability.
    """
    rows: dict[tuple[str, str, str], TagUsage] = {}
    for event in events:
        if event.kind != "decision":
            continue
        data = event.data
        key = (str(data.get("target", "")), str(data.get("capability", "")))
        if key not in tagged:
            continue
        caller = str(data.get("caller") or event.actor)
        row = rows.get((caller, *key))
        if row is None:
            row = rows[(caller, *key)] = TagUsage(caller, *key, first_time=event.time)
        effect = str((data.get("decision") or {}).get("effect", "unknown"))
        row.attempts += 1
        row.effects[effect] = row.effects.get(effect, 0) + 1
        row.first_time = min(row.first_time, event.time)
        row.last_time = max(row.last_time, event.time)
    return sorted(rows.values(), key=lambda r: (-r.attempts, r.caller, r.target, r.capability))
