"""``signalbox breakers``: see, trip and reset the fleet's circuit breakers.

::

    signalbox breakers list [--all] [--json]                  open and half-open breakers
    signalbox breakers trip NAME|team:NAME --reason TEXT [--for 10m]
    signalbox breakers reset NAME|team:NAME [--reason TEXT]

A breaker stops an agent (``NAME`` or ``agent:NAME``) or a whole team
(``team:NAME``) on every policy replica within a second: its calls and
authorization requests are refused with ``breaker_open``, and so are calls
*to* an agent whose breaker is open. Breakers also trip on their own (an
exhausted budget, a call-rate anomaly, a failing target, a call loop);
``--for`` makes a manual trip end with a probe call after that long,
otherwise it holds until ``reset``. The commands ask the policy service on
the operator-only subjects ``sb.admin.breakers.<op>``; every change is
recorded with who and audited (kind ``breaker``).

:mod:`services.cli.main` registers :data:`breakers_app` as ``signalbox breakers``.
"""

from __future__ import annotations

import time
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.text import Text

from broker.subjects import is_valid_token
from schemas import Breaker, BreakerList, ListBreakers, ResetBreaker, TripBreaker
from services.cli.common import JsonOption, NatsUrlOption, admin_call, clock, parse_duration, who
from services.cli.render import CliTable, Column, Fit, to_json

__all__ = ["breaker_target", "breakers_app", "breakers_table"]

breakers_app = typer.Typer(
    help="List, trip and reset circuit breakers (per agent and per team).", no_args_is_help=True
)

TargetArgument = Annotated[
    str,
    typer.Argument(help="An agent (NAME or agent:NAME) or a team (team:NAME).", show_default=False),
]

_STATE_STYLE = {"open": "bold red", "half_open": "yellow", "closed": "green"}


def breaker_target(text: str) -> str:
    """The breaker key of ``NAME``, ``agent:NAME`` or ``team:NAME`` (``agent.NAME`` too).

    Raises:
        typer.BadParameter: anything else.
    """
    scope, sep, name = text.replace(".", ":", 1).partition(":")
    if not sep:
        scope, name = "agent", text
    if scope not in ("agent", "team") or not is_valid_token(name):
        raise typer.BadParameter(
            f"{text!r} names no breaker: use an agent name (or agent:NAME) or team:NAME"
        )
    return f"{scope}.{name}"


def _figures(figures: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:g}" for k, v in figures.items())


def _until(b: Breaker, now: float) -> str:
    if b.state == "closed":
        return ""
    if b.until is None:
        return "until reset"
    if b.state == "half_open":
        return "probing"
    left = b.until - now
    return f"{clock(b.until)} (in {left:.0f}s)" if left > 0 else "probe due"


def breakers_table(breakers: tuple[Breaker, ...], now: float) -> CliTable:
    """Breakers as a table (keys, times and who never cut; the reason wraps)."""
    table = CliTable(
        Column("breaker"),
        Column("state"),
        Column("reason", Fit.WRAP, min_width=20),
        Column("since"),
        Column("until"),
        Column("figures", Fit.WRAP, min_width=12),
        Column("trips", justify="right"),
        Column("by"),
        title="Circuit breakers",
    )
    for b in breakers:
        table.add_row(
            b.key,
            Text(b.state.replace("_", "-"), _STATE_STYLE.get(b.state, "")),
            f"{b.reason}: {b.text}" if b.text else b.reason,
            clock(b.since),
            _until(b, now),
            _figures(b.figures),
            str(b.trips),
            b.changed_by if b.state == "closed" else b.tripped_by,
        )
    return table


@breakers_app.command("list")
def list_(
    all_: Annotated[
        bool, typer.Option("--all", help="Closed breakers too (their last trip).")
    ] = False,
    nats_url: NatsUrlOption = None,
    json_out: JsonOption = False,
) -> None:
    """Breakers that are open or half-open (--all: every one)."""
    result = admin_call(nats_url, "breakers", "list", ListBreakers(all=all_), BreakerList)
    if json_out:
        typer.echo(to_json(result))
        return
    if not result.breakers:
        Console().print("no breakers" if all_ else "no open breakers: every call flows")
        return
    Console().print(breakers_table(result.breakers, time.time()))


@breakers_app.command("trip")
def trip(
    target: TargetArgument,
    reason: Annotated[
        str,
        typer.Option(
            "--reason", help="Why (shown to refused callers; audited).", show_default=False
        ),
    ],
    for_: Annotated[
        str | None,
        typer.Option(
            "--for",
            help="Cool-down (90s, 10m, 2h): then one probe call may pass and close it. "
            "Default: until `breakers reset`.",
            show_default=False,
        ),
    ] = None,
    nats_url: NatsUrlOption = None,
    json_out: JsonOption = False,
) -> None:
    """Open a breaker by hand: the agent's or team's calls are refused fleet-wide."""
    key = breaker_target(target)
    if not reason.strip():
        raise typer.BadParameter("say why with --reason (callers and the audit trail see it)")
    cooldown = parse_duration(for_) if for_ is not None else None
    request = TripBreaker(key=key, text=reason.strip(), cooldown=cooldown, requested_by=who())
    result = admin_call(nats_url, "breakers", "trip", request, Breaker)
    if json_out:
        typer.echo(to_json(result))
        return
    until = _until(result, time.time())
    Console().print(
        f"[bold red]tripped[/] {escape(result.key)}: calls are refused {escape(until)}",
        highlight=False,
    )


@breakers_app.command("reset")
def reset(
    target: TargetArgument,
    reason: Annotated[
        str, typer.Option("--reason", help="Why (recorded and audited).", show_default=False)
    ] = "",
    nats_url: NatsUrlOption = None,
    json_out: JsonOption = False,
) -> None:
    """Close a breaker, whatever tripped it: calls flow again."""
    request = ResetBreaker(key=breaker_target(target), text=reason.strip(), requested_by=who())
    result = admin_call(nats_url, "breakers", "reset", request, Breaker)
    if json_out:
        typer.echo(to_json(result))
        return
    Console().print(f"[green]reset[/] {escape(result.key)}: calls flow again", highlight=False)
