"""``signalbox approvals``: decide calls parked for human approval.

::

    signalbox approvals list [--all] [--json]        pending requests (--all: every stored one)
    signalbox approvals approve ID [--reason R]      let that one call through, once
    signalbox approvals deny ID [--reason R]         refuse it

The commands ask the policy service on the operator-only subjects
``sb.admin.approvals.<op>`` (see :mod:`services.policy.approvals`); every
decision is recorded with who and why and audited (kind ``admin``). Of two
operators deciding the same request at once, one wins; the other gets a
``conflict`` error.

:mod:`services.cli.main` registers :data:`approvals_app` as ``signalbox approvals``.
"""

from __future__ import annotations

import time
from typing import Annotated, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.text import Text

from schemas import ApprovalList, ApprovalRequest, DecideApproval, ListApprovals
from services.cli.common import JsonOption, NatsUrlOption, admin_call, clock, who
from services.cli.render import CliTable, Column, Fit, to_json

__all__ = ["approvals_app"]

T = TypeVar("T")

approvals_app = typer.Typer(
    help="List, approve and deny calls waiting for human approval.", no_args_is_help=True
)

IdArgument = Annotated[
    str, typer.Argument(help="Approval id (from `signalbox approvals list`).", show_default=False)
]
ReasonOption = Annotated[
    str, typer.Option("--reason", help="Why (recorded and audited).", show_default=False)
]

_STATUS_STYLE = {
    "pending": "yellow",
    "approved": "green",
    "used": "green",
    "denied": "red",
    "expired": "dim",
}


def _when(record: ApprovalRequest, now: float) -> str:
    if record.status == "pending":
        return f"expires in {max(0.0, record.expires_at - now):.0f}s"
    return clock(record.decided_at or record.expires_at)


def approvals_table(approvals: tuple[ApprovalRequest, ...], now: float) -> CliTable:
    """Approval requests as a table (newest first; ids never cut)."""
    table = CliTable(
        Column("id"),
        Column("call", Fit.WRAP, min_width=20),
        Column("status"),
        Column("when"),
        Column("policies", Fit.WRAP, min_width=12),
        Column("decided by", Fit.WRAP, min_width=16),
        title="Approval requests",
    )
    for r in approvals:
        decided = f"{r.decided_by}: {r.reason}" if r.reason else r.decided_by
        table.add_row(
            r.id,
            f"{r.caller} -> {r.target}.{r.capability}",
            Text(r.status, _STATUS_STYLE.get(r.status, "")),
            _when(r, now),
            ", ".join(r.policy_ids),
            decided,
        )
    return table


@approvals_app.command("list")
def list_(
    all_: Annotated[
        bool, typer.Option("--all", help="Every stored request, decided and expired included.")
    ] = False,
    limit: Annotated[int, typer.Option("--limit", min=1, max=10_000, help="At most N.")] = 100,
    nats_url: NatsUrlOption = None,
    json_out: JsonOption = False,
) -> None:
    """Calls waiting for a human decision (newest first)."""
    result = admin_call(
        nats_url, "approvals", "list", ListApprovals(all=all_, limit=limit), ApprovalList
    )
    if json_out:
        typer.echo(to_json(result))
        return
    if not result.approvals:
        Console().print("no pending approval requests" if not all_ else "no approval requests")
        return
    Console().print(approvals_table(result.approvals, time.time()))


def _decide(op: str, approval_id: str, reason: str, nats_url: str | None, json_out: bool) -> None:
    request = DecideApproval(id=approval_id, reason=reason, requested_by=who())
    result = admin_call(nats_url, "approvals", op, request, ApprovalRequest)
    if json_out:
        typer.echo(to_json(result))
        return
    verb = "[green]approved[/]" if result.status == "approved" else "[red]denied[/]"
    Console().print(
        f"{verb} {result.id}: {escape(result.caller)} -> "
        f"{escape(result.target)}.{escape(result.capability)}"
        + (" goes through now" if result.status == "approved" else " is refused"),
        highlight=False,
    )


@approvals_app.command("approve")
def approve(
    approval_id: IdArgument,
    reason: ReasonOption = "",
    nats_url: NatsUrlOption = None,
    json_out: JsonOption = False,
) -> None:
    """Let the parked call through (exactly once, that call only)."""
    _decide("approve", approval_id, reason, nats_url, json_out)


@approvals_app.command("deny")
def deny(
    approval_id: IdArgument,
    reason: ReasonOption = "",
    nats_url: NatsUrlOption = None,
    json_out: JsonOption = False,
) -> None:
    """Refuse the parked call (the caller gets `denied`, reason approval_denied)."""
    _decide("deny", approval_id, reason, nats_url, json_out)
