"""``signalbox audit report``: which agents called capabilities carrying a tag.

::

    signalbox audit report --tag pii --since 24h [--until T] [--json]

The tagged capabilities are the registry's; the calls are the decision
records of ``SB_AUDIT`` in the window, read in stream order through an
ordered consumer (:func:`services.tracing.reader.scan`), as the operator.

:mod:`services.cli.main` registers :func:`audit_report` as ``signalbox audit report``.
"""

from __future__ import annotations

import contextlib
import datetime
from collections.abc import Sequence
from typing import Annotated, Any

import msgspec
import typer
from rich.console import Console
from rich.markup import escape

from broker.errors import SchemaError, SignalboxError
from broker.subjects import Subjects
from schemas import AuditEvent, DiscoverAgents, DiscoverResult
from services.cli.audit_cmds import UNTIL_SLACK, local_time, parse_since
from services.cli.client import registry_request
from services.cli.common import (
    JsonOption,
    NatsUrlOption,
    client_url,
    connect_operator,
    fail,
    run,
)
from services.cli.render import CliTable, Column, Fit
from services.tracing.reader import audit_filter, scan
from services.tracing.report import TagUsage, tag_report, tagged_capabilities

__all__ = ["audit_report", "tag_table"]


def _usage_dict(row: TagUsage) -> dict[str, Any]:
    return {
        "caller": row.caller,
        "target": row.target,
        "capability": row.capability,
        "attempts": row.attempts,
        "effects": row.effects,
        "first_time": row.first_time,
        "last_time": row.last_time,
    }


def tag_table(rows: Sequence[TagUsage], *, title: str) -> CliTable:
    """Who called the tagged capabilities: attempts, decisions, last time (names never cut)."""
    table = CliTable(
        Column("caller"), Column("capability"), Column("attempts", justify="right"),
        Column("decisions", Fit.WRAP, min_width=12), Column("last"),
        title=title,
    )  # fmt: skip
    for row in rows:
        effects = ", ".join(f"{k} {v}" for k, v in sorted(row.effects.items()))
        last = datetime.datetime.fromtimestamp(row.last_time).strftime("%Y-%m-%d %H:%M:%S")
        table.add_row(
            row.caller, f"{row.target}.{row.capability}", str(row.attempts), effects, last
        )
    return table


def audit_report(
    tag: Annotated[
        str, typer.Option("--tag", help="Capability tag: pii, pci-dss...", show_default=False)
    ],
    since: Annotated[
        str,
        typer.Option("--since", help="Window start: 24h, 7d or an ISO time.", show_default=False),
    ],
    until: Annotated[
        str | None, typer.Option("--until", help="Window end (duration ago or ISO time).")
    ] = None,
    nats_url: NatsUrlOption = None,
    json_out: JsonOption = False,
) -> None:
    """Which agents called capabilities carrying a tag, how often, with which decisions.

    The tagged capabilities are the registry's (every registered version);
    the calls are the decision records of the window (one per call attempt).
    """
    url, settings = client_url(nats_url)
    start = parse_since(since)
    end = parse_since(until) if until else None
    if end is not None and end < start:
        fail(f"--until ({local_time(end)}) is before --since ({local_time(start)})")
    subjects = Subjects(settings.subject_prefix)
    decisions = audit_filter(subjects, kind="decision")

    async def main() -> tuple[set[tuple[str, str]], list[TagUsage], int]:
        nc = await connect_operator(url, settings)
        try:
            tagged: set[tuple[str, str]] = set()
            cursor = ""
            while True:
                try:
                    query = DiscoverAgents(tag=tag, all_versions=True, limit=1000, cursor=cursor)
                except msgspec.ValidationError as exc:
                    raise SignalboxError(f"invalid --tag: {exc}") from exc
                page = await registry_request(nc, subjects, "discover", query, DiscoverResult)
                tagged |= tagged_capabilities(page.agents, tag)
                cursor = page.next_cursor
                if not cursor:
                    break
            matching: list[AuditEvent] = []
            unreadable = 0
            if tagged:
                js = nc.jetstream()
                async with contextlib.aclosing(scan(js, decisions, start_time=start)) as records:
                    async for _pos, record, _raw in records:
                        if isinstance(record, SchemaError):
                            unreadable += 1
                            continue
                        if end is not None and record.time > end:
                            if record.time > end + UNTIL_SLACK:
                                break
                            continue
                        data = record.data
                        if (data.get("target"), data.get("capability")) in tagged:
                            matching.append(record)
            return tagged, tag_report(matching, tagged), unreadable
        finally:
            await nc.close()

    tagged, rows, unreadable = run(main())
    window = f"from {local_time(start)}" + (f" to {local_time(end)}" if end is not None else "")
    if json_out:
        typer.echo(
            msgspec.json.encode(
                {
                    "tag": tag,
                    "since": start,
                    "until": end,
                    "capabilities": sorted(f"{a}.{c}" for a, c in tagged),
                    "rows": [_usage_dict(r) for r in rows],
                    "unreadable": unreadable,
                }
            ).decode()
        )
        return
    console = Console(soft_wrap=True)
    status = Console(stderr=True, soft_wrap=True)
    if unreadable:
        status.print(f"[yellow]warning:[/] {unreadable} unreadable record(s) (run `audit verify`)")
    if not tagged:
        console.print(f"No registered capability carries the tag {escape(tag)!r}.")
        return
    names = ", ".join(sorted(f"{a}.{c}" for a, c in tagged))
    if not rows:
        console.print(f"No calls to capabilities tagged {escape(tag)!r} ({names}) {window}.")
        return
    console.print(tag_table(rows, title=f"Calls to capabilities tagged {tag!r} {window}"))
    status.print(f"[dim]tagged {escape(tag)!r}: {escape(names)}[/]", highlight=False)
