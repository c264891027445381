"""``signalbox operators``: named operators with a role, instead of one shared login.

::

    signalbox operators add NAME [--role admin|viewer] [--ttl 90d] [--note TEXT]
    signalbox operators list [--all] [--json]
    signalbox operators revoke NAME [--credential ID] [--reason TEXT]

``add`` prints a credential ``sbo1.<name>.<id>.<secret>`` once; the person
sets it as ``SIGNALBOX_OPERATOR_CREDENTIAL`` and every command they run is
then recorded as ``operator:<name>`` (the NATS server authenticated them;
nothing a request body says changes that). ``viewer`` may only read (lists,
shows, reports, history); ``admin`` may change everything, including adding
and revoking operators. The shared bootstrap operator (the secrets folder's
``operator.password``) remains for the first start: its actions are
recorded as ``bootstrap:<login>``, the login being only what the CLI says.

:mod:`services.cli.main` registers :data:`operators_app` as ``signalbox operators``.
"""

from __future__ import annotations

import time
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from schemas import (
    AddOperator,
    ListOperators,
    OperatorAdded,
    OperatorList,
    OperatorRevoked,
    RevokeOperator,
)
from services.cli.common import JsonOption, NatsUrlOption, admin_call, clock, parse_duration
from services.cli.render import CliTable, Column, print_secret, to_json

__all__ = ["operators_app", "operators_table", "print_operator_added"]

operators_app = typer.Typer(
    help="Named operators: add (admin or viewer), list and revoke their credentials.",
    no_args_is_help=True,
)

NameArgument = Annotated[str, typer.Argument(help="The operator's name.", show_default=False)]


def operators_table(result: OperatorList, now: float) -> CliTable:
    """Operator credentials as a table (names, ids, dates never cut)."""
    table = CliTable(
        Column("name"),
        Column("role"),
        Column("credential"),
        Column("status"),
        Column("expires"),
        Column("by"),
        title="Operators",
    )
    for op in result.operators:
        table.add_row(op.name, op.role, op.id, op.status(now), clock(op.expires_at), op.created_by)
    return table


@operators_app.command("add")
def add(
    name: NameArgument,
    role: Annotated[
        str, typer.Option("--role", help="admin (everything) or viewer (read only).")
    ] = "viewer",
    ttl: Annotated[
        str | None,
        typer.Option("--ttl", help="Lifetime (30d, 12h...); default 90 days.", show_default=False),
    ] = None,
    note: Annotated[str, typer.Option("--note", help="Kept with the credential.")] = "",
    nats_url: NatsUrlOption = None,
    json_out: JsonOption = False,
) -> None:
    """Issue a credential for a named operator (shown once)."""
    if role not in ("admin", "viewer"):
        raise typer.BadParameter(f"--role must be admin or viewer, not {role!r}")
    request = AddOperator(
        name=name,
        role=role,  # type: ignore[arg-type]  # checked above
        ttl=parse_duration(ttl) if ttl else 0.0,
        note=note,
    )
    result = admin_call(nats_url, "operators", "add", request, OperatorAdded)
    if json_out:
        typer.echo(to_json(result))
        return
    print_operator_added(Console(soft_wrap=True), result)


def print_operator_added(console: Console, result: OperatorAdded) -> None:
    """What ``operators add`` prints: who, then the credential alone on the next line.

    ``console`` soft-wraps (``soft_wrap=True``): no name, id or date is cut or split.
    """
    console.print(
        f"operator [bold]{escape(result.operator.name)}[/] ({result.operator.role}), "
        f"credential {result.operator.id}, expires {clock(result.operator.expires_at)}.\n"
        "Credential (shown once; give it to them as SIGNALBOX_OPERATOR_CREDENTIAL), "
        "on the next line:",
        highlight=False,
    )
    print_secret(console, result.token)


@operators_app.command("list")
def list_(
    all_: Annotated[
        bool, typer.Option("--all", help="Revoked and expired credentials too.")
    ] = False,
    nats_url: NatsUrlOption = None,
    json_out: JsonOption = False,
) -> None:
    """Operator credentials (never their secrets)."""
    result = admin_call(
        nats_url, "operators", "list", ListOperators(include_inactive=all_), OperatorList
    )
    if json_out:
        typer.echo(to_json(result))
        return
    if not result.operators:
        Console().print("no named operators (the bootstrap operator only)")
        return
    Console().print(operators_table(result, time.time()))


@operators_app.command("revoke")
def revoke(
    name: NameArgument,
    credential: Annotated[
        str | None,
        typer.Option("--credential", help="Only this credential id.", show_default=False),
    ] = None,
    reason: Annotated[str, typer.Option("--reason", help="Why (audited).")] = "",
    nats_url: NatsUrlOption = None,
    json_out: JsonOption = False,
) -> None:
    """Revoke an operator's credentials and close its live connections."""
    request = RevokeOperator(name=name, credential=credential, reason=reason)
    result = admin_call(nats_url, "operators", "revoke", request, OperatorRevoked)
    if json_out:
        typer.echo(to_json(result))
        return
    if not result.credentials:
        Console().print(f"{escape(name)} has no active credential: nothing revoked")
        return
    Console().print(
        f"revoked {len(result.credentials)} credential(s) of {escape(result.name)}; "
        f"{result.disconnected} connection(s) closed",
        highlight=False,
    )
