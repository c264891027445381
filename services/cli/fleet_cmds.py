"""``signalbox apply`` and ``signalbox export``: the fleet's configuration as a file.

::

    signalbox apply -f fleet.toml [--dry-run] [--prune] [--json] [--nats-url URL]
    signalbox export [-o fleet.toml] [--nats-url URL]

``apply`` validates the whole file first (nothing changes if any of it is
wrong), reads the control plane's budgets, routes, bindings and manual
breakers through the operators' endpoints, plans what to create, update and
(``--prune``) delete, prints the plan, and unless ``--dry-run`` sends each
change to the admin endpoint an operator's command uses (which checks it and
audits it). Applying the same file again changes nothing. ``export`` writes
the current state in the same format; ``apply --dry-run`` of its output
plans no change. The file's format: :mod:`services.cli.fleet_file`.

:mod:`services.cli.main` registers :func:`apply_command` as ``signalbox apply``
and :func:`export_command` as ``signalbox export``.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.text import Text

from broker.subjects import Subjects
from services.cli.common import (
    JsonOption,
    NatsUrlOption,
    client_url,
    connect_operator,
    fail,
    run,
    who,
)
from services.cli.fleet import Change, FleetState, apply_changes, plan, read_state
from services.cli.fleet_file import (
    FleetFile,
    FleetFileError,
    fleet_toml,
    parse_fleet,
    read_fleet_file,
)
from services.cli.render import CliTable, Column, Fit

__all__ = ["apply_command", "export_command", "plan_table"]

#: How each action is marked in the plan, and its colour.
_MARKS = {
    "create": ("+ create", "green"),
    "update": ("~ update", "yellow"),
    "delete": ("- delete", "red"),
    "keep": ("= keep", "dim"),
    "blocked": ("! blocked", "bold red"),
    "unchanged": ("  unchanged", "dim"),
}
_RESULTS = {"applied": ("applied", "green"), "failed": ("FAILED", "bold red")}


def _what(change: Change) -> str:
    """The change column: one line per field (``field: before → after``), then the note."""
    lines = []
    for f in change.fields:
        if change.action == "update" and f.before:
            lines.append(f"{f.field}: {f.before} → {f.after or '(none)'}")
        elif change.action == "update":
            lines.append(f"{f.field}: (none) → {f.after}")
        else:
            lines.append(f"{f.field} = {f.after or f.before}")
    if change.note:
        lines.append(change.note)
    return "\n".join(lines)


def plan_table(changes: list[Change], title: str, *, applied: bool) -> CliTable:
    """The plan (and, once ``applied``, each change's result): kinds and names never cut,
    the fields wrap. Unchanged entries are only counted (see :func:`_summary`)."""
    columns = [Column("action"), Column("kind"), Column("name"),
               Column("change", Fit.WRAP, min_width=24)]  # fmt: skip
    if applied:
        columns.append(Column("result"))
    table = CliTable(*columns, title=title)
    for change in changes:
        if change.action == "unchanged":
            continue
        mark, style = _MARKS[change.action]
        cells: list[str | Text] = [Text(mark, style), change.kind, change.name, _what(change)]
        if applied:
            result, colour = _RESULTS.get(change.status, ("", ""))
            cells.append(Text(result, colour))
        table.add_row(*cells)
    return table


def _summary(changes: list[Change]) -> Counter[str]:
    return Counter(c.action for c in changes)


def _summary_line(counts: Counter[str]) -> str:
    parts = [f"{counts[a]} to {a}" for a in ("create", "update", "delete") if counts[a]]
    parts.append(f"{counts['unchanged']} unchanged")
    if counts["keep"]:
        parts.append(f"{counts['keep']} kept (no endpoint removes them)")
    if counts["blocked"]:
        parts.append(f"{counts['blocked']} blocked")
    return "Plan: " + ", ".join(parts) + "."


def _read(file: str) -> FleetFile:
    """The fleet file (``-``: standard input), validated, or exit 1 naming what is wrong."""
    try:
        if file == "-":
            return parse_fleet(sys.stdin.read(), "<stdin>")
        return read_fleet_file(Path(file))
    except FleetFileError as exc:
        fail(f"{exc}; nothing was changed")


def apply_command(
    file: Annotated[
        str,
        typer.Option(
            "-f",
            "--file",
            help="The fleet file (TOML; - reads standard input).",
            show_default=False,
        ),
    ],
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print the plan; change nothing.")
    ] = False,
    prune: Annotated[
        bool,
        typer.Option(
            "--prune", help="Also remove the budgets and manual breakers the file does not list."
        ),
    ] = False,
    as_json: JsonOption = False,
    nats_url: NatsUrlOption = None,
) -> None:
    """Make the control plane's budgets, routes, bindings and manual breakers match FILE.

    The whole file is checked before anything changes; each change goes through
    its operators' endpoint and is audited there. Applying the same file again
    changes nothing. Exits 1 if a change failed (the others are applied: the
    output says which) or the plan is blocked (nothing is applied).
    """
    desired = _read(file)
    url, settings = client_url(nats_url)
    subjects = Subjects(settings.subject_prefix)

    async def main() -> list[Change]:
        nc = await connect_operator(url, settings)
        try:
            state = await read_state(nc, subjects, desired, complete=prune)
            changes = plan(desired, state, prune=prune, by=who())
            if not dry_run and not any(c.action == "blocked" for c in changes):
                await apply_changes(nc, subjects, changes)
            return changes
        finally:
            await nc.close()

    changes = run(main())
    counts = _summary(changes)
    blocked = counts["blocked"]
    applied = [c for c in changes if c.status == "applied"]
    failed = [c for c in changes if c.status == "failed"]
    if as_json:
        typer.echo(json.dumps({
            "file": file, "dry_run": dry_run, "prune": prune, "plan": dict(counts),
            "applied": len(applied), "failed": len(failed), "blocked": blocked,
            "changes": [c.to_builtins() for c in changes],
        }, indent=2))  # fmt: skip
    else:
        _print(changes, counts, f"Plan for {file}", applied=not (dry_run or blocked))
        if dry_run:
            typer.echo("Dry run: nothing was changed.")
    if blocked and not dry_run:
        fail(f"{blocked} change(s) blocked (see the plan): nothing was changed")
    if blocked:
        fail(f"{blocked} change(s) blocked: applying this file would change nothing")
    if failed:
        errors = Console(stderr=True, soft_wrap=True, highlight=False)
        for c in failed:
            errors.print(Text(f"failed: {c.kind} {c.name}: {c.error}", "red"))
        fail(
            f"{len(failed)} of {len(applied) + len(failed)} change(s) failed (listed above), "
            f"{len(applied)} applied; fix the cause and apply again (applied ones now plan "
            "as unchanged)"
        )


def _print(changes: list[Change], counts: Counter[str], title: str, *, applied: bool) -> None:
    console = Console()
    pending = sum(counts[a] for a in ("create", "update", "delete", "keep", "blocked"))
    if not pending:
        console.print(
            f"No changes: the control plane matches the file ({counts['unchanged']} entries).",
            highlight=False, markup=False,
        )  # fmt: skip
        return
    console.print(plan_table(changes, title, applied=applied))
    console.print(_summary_line(counts), highlight=False, markup=False)
    if applied:
        done = sum(c.status == "applied" for c in changes)
        console.print(f"Applied {done} change(s).", highlight=False)


def export_command(
    output: Annotated[
        Path | None,
        typer.Option(
            "-o", "--output", help="Write here (default: standard output).", show_default=False
        ),
    ] = None,
    nats_url: NatsUrlOption = None,
) -> None:
    """Write the control plane's budgets, routes, bindings and manual breakers as a fleet
    file (`signalbox apply -f FILE --dry-run` of it plans no change)."""
    url, settings = client_url(nats_url)
    subjects = Subjects(settings.subject_prefix)

    async def main() -> FleetState:
        nc = await connect_operator(url, settings)
        try:
            return await read_state(nc, subjects, FleetFile(), complete=True)
        finally:
            await nc.close()

    state = run(main())
    if state.unreadable_budgets:
        keys = ", ".join(sorted(state.unreadable_budgets))
        fail(
            f"budget record(s) {keys} cannot be read, so the export would leave them out; "
            "rewrite them with `signalbox budgets set` (see `signalbox budgets list`) and "
            "export again"
        )
    header = (
        "Signalbox fleet configuration (signalbox export).",
        "Apply with: signalbox apply -f FILE [--dry-run] [--prune]",
    )
    text = fleet_toml(state.fleet, header)
    if output is None:
        typer.echo(text, nl=False)
        return
    try:
        output.write_text(text, encoding="utf-8")
    except OSError as exc:
        fail(f"cannot write {output}: {exc}")
    fleet = state.fleet
    typer.echo(
        f"Wrote {output}: {len(fleet.bindings)} binding(s), {len(fleet.budgets)} budget(s), "
        f"{len(fleet.routes)} route(s), {len(fleet.breakers)} breaker(s).",
        err=True,
    )
