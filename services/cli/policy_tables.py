"""How ``signalbox policy`` shows a stored version, the history, a diff's policy ids and a
what-if report (:mod:`services.cli.policy_cmds` prints them).

Built on :mod:`services.cli.render`: digests, versions, agents, actions, resources
and times are never cut; labels, policy-id lists and reasons wrap between words.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.text import Text

from schemas import PolicyDiff, PolicyHistory, PolicyShown
from services.cli.common import clock
from services.cli.render import CliTable, Column, Fields, Fit

if TYPE_CHECKING:
    from services.policy.whatif import WhatIfReport

__all__ = [
    "changes_by_agent_table",
    "changes_table",
    "effect_text",
    "history_table",
    "policy_fields",
    "policy_ids_table",
]


def effect_text(effect: str) -> Text:
    """A decision's effect, coloured (allow green, deny red, anything else yellow)."""
    return Text(effect, style={"allow": "green", "deny": "red"}.get(effect, "yellow"))


def policy_fields(shown: PolicyShown) -> Fields:
    """A stored version's metadata (``policy show``, above its files)."""
    r = shown.record
    meta = Fields(f"Policy set version {r.version}")
    if shown.alarm:
        meta.add("ALARM", Text(shown.alarm, "bold red"), Fit.WRAP)
        meta.add("evaluating", Text(f"{shown.evaluating} (shown below)", "yellow"), Fit.WRAP)
    meta.add("status", Text("active", "green") if shown.active else
             Text(f"stored (active: {shown.active_version})", "dim"), Fit.WRAP)  # fmt: skip
    meta.add("label", r.label, Fit.WRAP)
    meta.add("digest", r.digest)
    meta.add("created", clock(r.created_at))
    meta.add("created by", r.created_by)
    meta.add("policies", ", ".join(r.policy_ids), Fit.WRAP)
    return meta


def history_table(result: PolicyHistory) -> CliTable:
    """Stored versions, newest first; the active one marked (``policy history``)."""
    table = CliTable(
        Column("version", justify="right"), Column("active"),
        Column("label", Fit.WRAP, min_width=12), Column("digest"),
        Column("policies", justify="right"), Column("created"), Column("by"),
        title="Policy set versions",
    )  # fmt: skip
    for v in result.versions:
        table.add_row(
            str(v.version),
            Text("active", "green") if v.active else "",
            v.label,
            v.digest[:12],
            str(len(v.policy_ids)),
            clock(v.created_at),
            v.created_by,
        )
    return table


def policy_ids_table(result: PolicyDiff) -> CliTable:
    """The policy ids a diff adds and removes (``policy diff``, under the file diffs)."""
    ids = CliTable(
        Column("change"),
        Column("policy ids", Fit.WRAP, min_width=20),
        title=f"Policy ids, {result.from_name} -> {result.to_name}",
    )
    ids.add_row(Text("added", "green"), ", ".join(result.added_ids) or "-")
    ids.add_row(Text("removed", "red"), ", ".join(result.removed_ids) or "-")
    return ids


def changes_by_agent_table(report: WhatIfReport) -> CliTable:
    """How many recorded decisions of each agent the candidate would change, and how."""
    summary = CliTable(
        Column("agent"), Column("before"), Column("after"), Column("count", justify="right"),
        title="Decisions that would change, by agent",
    )  # fmt: skip
    for (agent, before, after), count in sorted(report.by_agent.items()):
        summary.add_row(agent, effect_text(before), effect_text(after), f"{count:,}")
    return summary


def changes_table(report: WhatIfReport, show: int) -> CliTable:
    """The first ``show`` recorded decisions the candidate would change, with why."""
    rows = CliTable(
        Column("seq", justify="right"), Column("time"), Column("agent"), Column("action"),
        Column("resource"), Column("before → after"), Column("why", Fit.WRAP, min_width=20),
        title=f"First {min(show, len(report.changes))} of {len(report.changes):,}",
    )  # fmt: skip
    for change in report.changes[:show]:
        rows.add_row(
            str(change.seq),
            clock(change.time),
            change.agent,
            change.action,
            change.resource,
            Text.assemble(effect_text(change.before), " → ", effect_text(change.after)),
            change.reason,
        )
    return rows
