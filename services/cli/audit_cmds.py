"""``signalbox audit``: the group, ``audit verify``, and what its commands share.

::

    signalbox audit verify [--since 2h|ISO] [--complete] [--json]

``verify`` reads ``SB_AUDIT`` in stream order through an ordered consumer
(:func:`services.tracing.reader.scan`), as the operator (whose permissions
allow read-only JetStream access to the audit stream), and exits 1 at the
first problem, naming its sequence (:mod:`services.tracing.verify`).

The other commands of the group have a module each: ``audit tail``
(:mod:`services.cli.audit_tail`), ``audit replay``
(:mod:`services.cli.audit_replay`), ``audit report``
(:mod:`services.cli.audit_report`). :mod:`services.cli.main` registers
:data:`audit_app` as ``signalbox audit`` and adds them to it.
"""

from __future__ import annotations

import contextlib
import datetime
import time
from collections.abc import Iterator, Sequence
from typing import Annotated, Any

import msgspec
import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from broker.runtime.jetstream import AUDIT_STREAM
from broker.subjects import Subjects
from schemas import AuditEvent
from services.cli.common import (
    JsonOption,
    NatsUrlOption,
    client_url,
    connect_operator,
    fail,
    parse_duration,
    run,
)
from services.cli.render import CliTable, Column, Fields, Fit
from services.tracing.chain import GENESIS
from services.tracing.complete import CompletenessChecker, CompletenessReport, OpenCall
from services.tracing.reader import scan, stream_bounds
from services.tracing.verify import ChainVerifier, VerifyReport

__all__ = [
    "PROGRESS_MIN",
    "PROGRESS_TICK",
    "UNTIL_SLACK",
    "audit_app",
    "audit_verify",
    "local_time",
    "open_calls_table",
    "parse_since",
    "progress_bar",
    "verify_fields",
]

audit_app = typer.Typer(help="Read the hash-chained audit trail.", no_args_is_help=True)

#: Runs over fewer records than this show no progress bar.
PROGRESS_MIN = 20_000
#: ``--until`` stops reading once records are this many seconds past it
#: (records reach the chain within seconds of the action; a little slack
#: keeps a late one).
UNTIL_SLACK = 60.0
#: Progress is redrawn every this many records.
PROGRESS_TICK = 2_000


def parse_since(text: str, *, now: float | None = None) -> float:
    """Unix time of ``--since``/``--until``: a duration back from now (``2h``, ``90m``,
    ``7d``) or an ISO 8601 time (``2026-11-24T09:00``, local time unless it has an offset).

    Raises:
        typer.BadParameter: neither.
    """
    try:
        return (time.time() if now is None else now) - parse_duration(text)
    except typer.BadParameter:
        pass
    try:
        stamp = datetime.datetime.fromisoformat(text.strip())
    except ValueError:
        raise typer.BadParameter(
            f"{text!r} is neither a duration (2h, 30m, 7d) nor an ISO time (2026-11-24T09:00)"
        ) from None
    return stamp.timestamp()  # naive: local time


def local_time(t: float) -> str:
    """Unix time ``t`` as an ISO time in the local zone, to the millisecond."""
    return datetime.datetime.fromtimestamp(t).astimezone().isoformat(timespec="milliseconds")


@contextlib.contextmanager
def progress_bar(total: int, what: str) -> Iterator[Progress | None]:
    """A Rich progress bar on stderr for long runs on a terminal; ``None`` otherwise."""
    console = Console(stderr=True)
    if total < PROGRESS_MIN or not console.is_terminal:
        yield None
        return
    with Progress(
        TextColumn(what),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
    ) as progress:
        yield progress


SinceOption = Annotated[
    str | None,
    typer.Option(
        "--since",
        help="Start at the first record at or after this time: 2h, 30m, 7d or an ISO time.",
        show_default=False,
    ),
]


# -- verify -------------------------------------------------------------------------------


def _report_dict(report: VerifyReport, *, stream: str, since: float | None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "ok": report.ok,
        "stream": stream,
        "checked": report.checked,
        "first_seq": report.first_seq,
        "last_seq": report.last_seq,
        "first_time": report.first_time,
        "last_time": report.last_time,
        "anchor": report.anchor,
        "anchored_on_genesis": since is None,
        "head_hash": report.head_hash,
        "since": since,
        "problem": None,
    }
    if report.problem is not None:
        p = report.problem
        out["problem"] = {"kind": p.kind, "seq": p.seq, "message": p.message, "details": p.details}
    return out


@audit_app.command("verify")
def audit_verify(
    since: SinceOption = None,
    complete: Annotated[
        bool,
        typer.Option(
            "--complete",
            help="Also exit 1 if a call's outcome is unknown (an allowed decision with no "
            "outcome record: the call may have run) or a call ran with no decision",
        ),
    ] = False,
    grace: Annotated[
        float | None,
        typer.Option(
            "--grace",
            help="Seconds a decision may wait for its outcome before it counts as unknown "
            "(default: SIGNALBOX_CALL_TIMEOUT + 30)",
            show_default=False,
        ),
    ] = None,
    nats_url: NatsUrlOption = None,
    json_out: JsonOption = False,
) -> None:
    """Check the hash chain (every record's hash, every link, no gap, no reorder, no
    duplicate) and that every allowed call has its outcome.

    Exits 1 at the first chain problem, naming the stream sequence where it is.
    Without --since the chain must start at record 1 after the genesis hash;
    with it, it is checked from the first record at or after that time,
    anchored on that record's prev_hash (taken on trust). Calls whose outcome
    is unknown (a policy replica died after forwarding them) are listed by
    agent and time; with --complete they make it exit 1 too.
    """
    url, settings = client_url(nats_url)
    start_time = parse_since(since) if since else None
    subjects = Subjects(settings.subject_prefix)
    checker = CompletenessChecker(grace if grace is not None else settings.call_timeout + 30)

    async def main() -> tuple[VerifyReport, int]:
        nc = await connect_operator(url, settings)
        try:
            js = nc.jetstream()
            first, last = await stream_bounds(js)
            verifier = ChainVerifier(anchor=None if start_time is not None else GENESIS)
            if last == 0 or first > last:
                return verifier.finish(), last
            total = last - first + 1
            with progress_bar(total, "verifying") as bar:
                task = bar.add_task("verify", total=total) if bar else None
                n = 0
                async with contextlib.aclosing(
                    scan(js, subjects.audit_log_all, start_seq=first, start_time=start_time)
                ) as records:
                    async for pos, record, raw in records:
                        if verifier.feed(pos, record, raw) is not None:
                            break
                        if isinstance(record, AuditEvent):
                            checker.feed(record, pos)
                        n += 1
                        if bar is not None and task is not None and n % PROGRESS_TICK == 0:
                            bar.update(task, completed=pos - first + 1)
            return verifier.finish(last), last
        finally:
            await nc.close()

    report, last = run(main())
    calls = checker.finish(time.time())
    summary = _report_dict(report, stream=AUDIT_STREAM, since=start_time)
    summary["calls"] = calls.to_dict()
    if json_out:
        typer.echo(msgspec.json.encode(summary).decode())
        if not report.ok or (complete and not calls.complete):
            raise typer.Exit(1)
        return
    if report.problem is not None:
        fail(f"audit chain broken at seq {report.problem.seq}: {report.problem.message}")
    console = Console(soft_wrap=True)
    if report.checked == 0:
        where = f" at or after {local_time(start_time)}" if start_time is not None else ""
        console.print(
            f"No audit records{where} in {AUDIT_STREAM} (last seq {last}): nothing to check."
        )
        return
    console.print(f"[bold green]Audit chain OK[/] ({AUDIT_STREAM})")
    console.print(verify_fields(report, calls, since=start_time))
    if not calls.complete:
        _print_open_calls(calls)
        if complete:
            raise typer.Exit(1)


def verify_fields(
    report: VerifyReport, calls: CompletenessReport, *, since: float | None
) -> Fields:
    """What a sound verification checked (hashes whole; ``since``: its --since, if any)."""
    fields = Fields()
    fields.add("records", f"{report.checked:,} checked")
    fields.add("first", f"seq {report.first_seq} at {local_time(report.first_time)}", Fit.WRAP)
    fields.add("last", f"seq {report.last_seq} at {local_time(report.last_time)}", Fit.WRAP)
    if since is None:
        fields.add("anchor", "genesis (the chain is complete from record 1)", Fit.WRAP)
    else:
        fields.add(
            "anchor",
            f"{report.anchor}  (prev_hash of seq {report.first_seq}, the first record at or "
            f"after {local_time(since)}; taken on trust: earlier records were not checked)",
            Fit.WRAP,
        )
    fields.add("head hash", f"{report.head_hash}  (keep it to detect a rewritten tail)", Fit.WRAP)
    fields.add("calls", Text.from_markup(_calls_line(calls)), Fit.WRAP)
    return fields


def _calls_line(calls: CompletenessReport) -> str:
    line = f"{calls.decided:,} allowed, {calls.completed:,} with their outcome"
    if calls.in_flight:
        line += f", {calls.in_flight:,} in flight"
    if calls.outcome_unknown:
        line += f", [bold red]{len(calls.outcome_unknown):,} outcome unknown[/]"
    if calls.undecided:
        line += f", [bold red]{len(calls.undecided):,} with no decision[/]"
    return line


#: Open calls listed in full; beyond this, counts by agent (``--json`` has all).
_OPEN_ROWS = 20


def _print_open_calls(calls: CompletenessReport) -> None:
    console = Console(soft_wrap=True)
    for title, rows, meaning in (
        ("Outcome unknown", calls.outcome_unknown,
         "forwarded after a durable decision, then no outcome was recorded (a policy "
         "replica died): the call may have run"),
        ("No decision", calls.undecided,
         "an outcome with no decision record: the call ran without a durable decision"),
    ):  # fmt: skip
        if not rows:
            continue
        console.print(f"\n[bold red]{title}[/]: {len(rows):,} call(s) {meaning}.")
        console.print(open_calls_table(rows[:_OPEN_ROWS]))
        if len(rows) > _OPEN_ROWS:
            console.print(f"[dim]… and {len(rows) - _OPEN_ROWS:,} more (--json lists all)[/]")
    by_agent = calls.unknown_by_agent()
    if by_agent:
        counts = ", ".join(f"{escape(a)} {n:,}" for a, n in by_agent.items())
        console.print(f"Outcome unknown by caller: {counts}")
    console.print(
        "[dim]`signalbox trace <trace id>` (ids in --json) shows what is known of each call.[/]"
    )


def open_calls_table(calls: Sequence[OpenCall]) -> CliTable:
    """Calls whose outcome or decision is missing: when, who, what, call id (never cut)."""
    table = CliTable(
        Column("time"), Column("caller"), Column("target.capability"), Column("call id")
    )
    for call in calls:
        table.add_row(
            local_time(call.time), call.caller, f"{call.target}.{call.capability}", call.call_id
        )
    return table
