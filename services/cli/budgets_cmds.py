"""``signalbox budgets set | list | show | remove``: hard spend limits reserved before spend.

::

    signalbox budgets set team:risk [--limit 250] [--window day|month] [--soft 80%]
    signalbox budgets list [--scope agent|team|project] [--json]
    signalbox budgets show agent:fraud-detection [--windows 7] [--json]
    signalbox budgets remove project:alpha --window month

A budget belongs to an agent, a team or a project (``SCOPE:NAME``) and caps
its model spend per UTC day or month. Authorizing a model call reserves its
worst-case cost on every budget that applies (the agent's, its team's, the
project's, and those of agents it acts for); a call the budget cannot cover
is refused before it is made. ``set`` changes only what it is given (the
rest of an existing budget stays; a new one needs ``--limit``). Served by the
cost service on ``sb.admin.budgets.<op>`` (operators only).

:mod:`services.cli.main` registers :data:`budgets_app` as ``signalbox budgets``.
"""

from __future__ import annotations

import datetime
import re
from typing import Annotated, Literal, cast

import typer
from msgspec import UNSET
from rich.console import Console

from broker.money import usd
from schemas import (
    BudgetList,
    BudgetScope,
    BudgetStatus,
    ListBudgets,
    RemoveBudget,
    SetBudget,
    ShowBudget,
)
from services.cli.common import JsonOption, NatsUrlOption, admin_call, fail, who
from services.cli.render import CliTable, Column, to_json

__all__ = ["budget_table", "budgets_app"]

budgets_app = typer.Typer(
    help="Budgets per agent, team or project, enforced before spend.", no_args_is_help=True
)

_SCOPES = ("agent", "team", "project")
_OWNER = re.compile(r"^(agent|team|project):([A-Za-z0-9_-]{1,64})$")

OwnerArg = Annotated[
    str, typer.Argument(help="Who the budget caps: agent:NAME, team:NAME or project:NAME.")
]
WindowOption = Annotated[
    Literal["day", "month"], typer.Option("--window", help="UTC calendar window.")
]


def _owner(text: str) -> tuple[BudgetScope, str]:
    match = _OWNER.match(text)
    if match is None:
        fail(
            f"{text!r} is not a budget owner: use agent:NAME, team:NAME or project:NAME "
            "(names: letters, digits, '-' and '_')"
        )
    return cast(BudgetScope, match.group(1)), match.group(2)


def _ratio(text: str) -> float:
    raw = text.strip()
    try:
        value = float(raw[:-1]) / 100 if raw.endswith("%") else float(raw)
    except ValueError:
        fail(f"--soft {text!r} is not a share of the limit: use e.g. 80% or 0.8")
    if not 0 < value <= 1:
        fail(f"--soft {text!r} must be above 0 and at most 100%")
    return value


_usd = usd  # the one money format (broker.money)


def _window(window: str, start: float) -> str:
    """``2026-11-25`` for a day, ``2026-11`` for a month (UTC)."""
    stamp = datetime.datetime.fromtimestamp(start, tz=datetime.UTC)
    return stamp.strftime("%Y-%m-%d" if window == "day" else "%Y-%m")


def budget_table(statuses: tuple[BudgetStatus, ...], title: str = "Budgets") -> CliTable:
    """A table of budgets and their windows (owners, windows and amounts never cut)."""
    table = CliTable(
        Column("budget"), Column("window (UTC)"), Column("limit", justify="right"),
        Column("spent", justify="right"), Column("reserved", justify="right"),
        Column("left", justify="right"), Column("used", justify="right"), Column("alert"),
        title=title, caption="`budgets show OWNER --json` has every field",
    )  # fmt: skip
    for s in statuses:
        b = s.budget
        used = (s.spent_usd + s.reserved_usd) / b.limit_usd if b.limit_usd else 0.0
        alert = "exhausted" if s.spent_usd >= b.limit_usd else (
            f"over {b.soft_ratio:.0%}" if s.soft_alerted else ""
        )  # fmt: skip
        style = "red" if alert == "exhausted" else ("yellow" if alert else "")
        table.add_row(
            f"{b.scope}:{b.name}",
            _window(b.window, s.window_start),
            _usd(b.limit_usd),
            _usd(s.spent_usd),
            _usd(s.reserved_usd),
            _usd(s.remaining_usd),
            f"{used:.0%}",
            alert,
            style=style,
        )
    return table


def _print(result: BudgetList, as_json: bool, title: str) -> None:
    if as_json:
        typer.echo(to_json(result))
        return
    statuses = result.budgets
    for key, why in result.unreadable.items():
        scope, _, rest = key.partition(".")
        name, _, window = rest.rpartition(".")
        typer.echo(
            f"UNREADABLE budget record {key} ({why}): the model calls it governs are refused; "
            f"rewrite it with `signalbox budgets set {scope}:{name} --limit USD --window {window}`",
            err=True,
        )
    if not statuses:
        if not result.unreadable:
            typer.echo("No budgets. Set one with `signalbox budgets set team:NAME --limit USD`.")
        return
    Console().print(budget_table(statuses, title))


@budgets_app.command("set")
def budgets_set(
    owner: OwnerArg,
    limit: Annotated[
        float | None,
        typer.Option(
            "--limit",
            help="Hard limit in USD per window (required for a new budget).",
            min=0.000001,
        ),
    ] = None,
    window: Annotated[
        Literal["day", "month"] | None,
        typer.Option(
            "--window",
            help="UTC calendar window; default: the owner's only budget's, or day for a new one.",
        ),
    ] = None,
    soft: Annotated[
        str | None,
        typer.Option(
            "--soft",
            help="Soft threshold (alert event): share of the limit; default 80% for a new one.",
        ),
    ] = None,
    as_json: JsonOption = False,
    nats_url: NatsUrlOption = None,
) -> None:
    """Create or change a budget; it applies to the next model call on every replica.

    Only what is given changes: `--limit 5` on an existing budget keeps its
    soft threshold (and window).
    """
    scope, name = _owner(owner)
    if limit is None and soft is None:
        fail("nothing to set: give --limit USD and/or --soft SHARE")
    request = SetBudget(
        scope=scope, name=name, requested_by=who(),
        window=UNSET if window is None else window,
        limit_usd=UNSET if limit is None else limit,
        soft_ratio=UNSET if soft is None else _ratio(soft),
    )  # fmt: skip
    status = admin_call(nats_url, "budgets", "set", request, BudgetStatus)
    if as_json:
        typer.echo(to_json(status))
        return
    b = status.budget
    Console().print(
        f"Budget [bold]{b.scope}:{b.name}[/] set: {_usd(b.limit_usd)} per {b.window} "
        f"(alert at {b.soft_ratio:.0%}); spent {_usd(status.spent_usd)}, reserved "
        f"{_usd(status.reserved_usd)} in the current window."
    )


@budgets_app.command("list")
def budgets_list(
    scope: Annotated[
        str | None, typer.Option("--scope", help="Only agent, team or project budgets.")
    ] = None,
    as_json: JsonOption = False,
    nats_url: NatsUrlOption = None,
) -> None:
    """Every budget in its current window: limit, spent, reserved, remaining."""
    if scope is not None and scope not in _SCOPES:
        fail(f"--scope {scope!r} is not one of {', '.join(_SCOPES)}")
    request = ListBudgets(scope=cast(BudgetScope | None, scope))
    _print(admin_call(nats_url, "budgets", "list", request, BudgetList), as_json, "Budgets")


@budgets_app.command("show")
def budgets_show(
    owner: OwnerArg,
    windows: Annotated[
        int, typer.Option("--windows", help="Windows to show, newest first.", min=1, max=366)
    ] = 7,
    as_json: JsonOption = False,
    nats_url: NatsUrlOption = None,
) -> None:
    """One owner's budgets in the current and past windows."""
    scope, name = _owner(owner)
    request = ShowBudget(scope=scope, name=name, windows=windows)
    result = admin_call(nats_url, "budgets", "show", request, BudgetList)
    _print(result, as_json, f"Budgets of {scope} {name}")


@budgets_app.command("remove")
def budgets_remove(
    owner: OwnerArg,
    window: WindowOption = "day",
    as_json: JsonOption = False,
    nats_url: NatsUrlOption = None,
) -> None:
    """Remove a budget (its past windows stay on record)."""
    scope, name = _owner(owner)
    request = RemoveBudget(scope=scope, name=name, window=window, requested_by=who())
    status = admin_call(nats_url, "budgets", "remove", request, BudgetStatus)
    if as_json:
        typer.echo(to_json(status))
        return
    typer.echo(
        f"Budget {scope}:{name} ({window}) removed; it had spent {_usd(status.spent_usd)} "
        "in the current window."
    )
