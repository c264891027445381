"""``signalbox cost report``: metered LLM spend for chargeback.

::

    signalbox cost report [--by team|agent|model|project|provider|hour|day|caller|caller-team]
                          [--since 7d|ISO] [--until T] [--format table|csv|json]

``--by caller`` charges usage back to who asked: the agent whose call it was
made while serving (from the delegation chain the policy service signed),
``--by caller-team`` to that agent's team; usage made for no caller is
``(direct)``.

Asks the cost service on the operator-only subject ``sb.admin.cost.report``
(see :mod:`services.cost.service`); totals are computed by the service from
its SQL store, every report counted once.

:mod:`services.cli.main` registers :data:`cost_app` as ``signalbox cost``.
"""

from __future__ import annotations

import csv
import datetime
import io
from typing import Annotated, Literal

import typer
from rich.console import Console

from broker.money import usd
from broker.subjects import Subjects
from schemas import CostGroup, CostReport, CostReportRequest, CostRow
from services.cli.audit_cmds import parse_since
from services.cli.client import admin_request
from services.cli.common import NatsUrlOption, client_url, connect_operator, fail, run
from services.cli.render import CliTable, Column, to_json

__all__ = ["cost_app", "cost_report", "cost_table"]

cost_app = typer.Typer(help="Metered LLM and tool spend (chargeback).", no_args_is_help=True)

_TIME_GROUPS = ("hour", "day")
_COLUMNS = (
    "reports",
    "input_tokens",
    "output_tokens",
    "cached_tokens",
    "tool_calls",
    "cost_usd",
    "fallback_priced",
    "unreserved",
    "attribution_dropped",
)


def _key(by: CostGroup, key: str) -> str:
    if by in _TIME_GROUPS and key:
        stamp = datetime.datetime.fromtimestamp(int(key), tz=datetime.UTC)
        return stamp.strftime("%Y-%m-%d %H:00Z" if by == "hour" else "%Y-%m-%d")
    return key or "(none)"


_usd = usd  # the one money format (broker.money)


def cost_table(report: CostReport) -> CliTable:
    """A table of ``report``: one row per group, then the totals (keys and figures never cut)."""
    total = report.total

    def figure(header: str, footer: str) -> Column:
        return Column(header, justify="right", footer=footer)

    table = CliTable(
        Column(report.by, footer="total"),
        figure("reports", f"{total.reports:,}"),
        figure("input tok", f"{total.input_tokens:,}"),
        figure("output tok", f"{total.output_tokens:,}"),
        figure("cached tok", f"{total.cached_tokens:,}"),
        figure("tool calls", f"{total.tool_calls:,}"),
        figure("cost (USD)", _usd(total.cost_usd)),
        figure("fallback-priced", f"{total.fallback_priced:,}"),
        # Budgeted usage no reservation covered; reports whose project or chain was not honoured.
        figure("unreserved", f"{total.unreserved:,}"),
        figure("unattributed", f"{total.attribution_dropped:,}"),
        title=f"Cost by {report.by}"
        + (f" (prices as of {report.prices_as_of})" if report.prices_as_of else ""),
        caption="usage as the agents reported it (self-reported: sb.usage.<agent>)",
    )
    for row in report.rows:
        table.add_row(
            _key(report.by, row.key),
            f"{row.reports:,}",
            f"{row.input_tokens:,}",
            f"{row.output_tokens:,}",
            f"{row.cached_tokens:,}",
            f"{row.tool_calls:,}",
            _usd(row.cost_usd),
            f"{row.fallback_priced:,}" if row.fallback_priced else "",
            f"{row.unreserved:,}" if row.unreserved else "",
            f"{row.attribution_dropped:,}" if row.attribution_dropped else "",
        )
    return table


def _csv(report: CostReport) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow([report.by, *_COLUMNS])

    def values(row: CostRow) -> list[str]:
        return [
            str(row.reports),
            str(row.input_tokens),
            str(row.output_tokens),
            str(row.cached_tokens),
            str(row.tool_calls),
            f"{row.cost_usd:.9f}",
            str(row.fallback_priced),
            str(row.unreserved),
            str(row.attribution_dropped),
        ]

    for row in report.rows:
        writer.writerow([_key(report.by, row.key), *values(row)])
    writer.writerow(["total", *values(report.total)])
    return out.getvalue()


@cost_app.command("report")
def cost_report(
    by: Annotated[
        Literal[
            "team",
            "agent",
            "model",
            "project",
            "provider",
            "hour",
            "day",
            "caller",
            "caller-team",
        ],
        typer.Option(
            "--by",
            help="Group by team, agent, model, project, provider, hour, day, or by who asked: "
            "the calling agent (caller) or its team (caller-team).",
        ),
    ] = "team",
    since: Annotated[
        str,
        typer.Option("--since", help="Start: a duration back from now (7d, 12h) or an ISO time."),
    ] = "7d",
    until: Annotated[
        str | None,
        typer.Option("--until", help="End (exclusive): duration back or ISO time; default: now."),
    ] = None,
    fmt: Annotated[
        Literal["table", "csv", "json"], typer.Option("--format", help="Output format.")
    ] = "table",
    nats_url: NatsUrlOption = None,
) -> None:
    """Metered cost per team, agent, model, project, provider, hour, day, caller or caller
    team, with totals."""
    try:
        start = parse_since(since)
        end = parse_since(until) if until is not None else None
    except typer.BadParameter as exc:
        fail(str(exc.message))
    if end is not None and end <= start:
        fail(f"--until ({until}) must be after --since ({since})")
    url, settings = client_url(nats_url)
    group: CostGroup = "caller_team" if by == "caller-team" else by
    request = CostReportRequest(by=group, since=start, until=end)

    async def main() -> CostReport:
        nc = await connect_operator(url, settings)
        try:
            return await admin_request(
                nc,
                Subjects(settings.subject_prefix),
                "report",
                request,
                CostReport,
                service="cost",
                timeout=30.0,
            )
        finally:
            await nc.close()

    report = run(main())
    if fmt == "json":
        typer.echo(to_json(report))
    elif fmt == "csv":
        typer.echo(_csv(report), nl=False)
    else:
        Console().print(cost_table(report))
