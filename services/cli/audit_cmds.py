"""``signalbox audit verify``, ``audit replay`` and ``audit report``: reading the whole trail.

::

    signalbox audit verify [--since 2h|ISO] [--json]
    signalbox audit replay --since 2h [--until T] [--agent A] [--kind K] [--trace T]
                           [--format table|json|ndjson]
    signalbox audit report --tag pii --since 24h [--until T] [--json]

Both read ``SB_AUDIT`` in stream order through an ordered consumer
(:func:`services.tracing.reader.scan`), as the operator (whose permissions
allow read-only JetStream access to the audit stream). ``verify`` exits 1 at
the first problem, naming its sequence (:mod:`services.tracing.verify`).

:mod:`services.cli.main` registers :data:`audit_app` as ``signalbox audit``
(and adds ``audit tail`` to it).
"""

from __future__ import annotations

import contextlib
import datetime
import sys
import time
from collections.abc import Iterator
from typing import Annotated, Any, Literal

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
from rich.table import Table

from broker.codec import encode
from broker.errors import SchemaError, SignalboxError
from broker.runtime.jetstream import AUDIT_STREAM
from broker.subjects import Subjects
from schemas import AuditEvent, DiscoverAgents, DiscoverResult
from services.cli.client import registry_request
from services.cli.common import (
    JsonOption,
    NatsUrlOption,
    client_url,
    connect_operator,
    fail,
    parse_duration,
    run,
)
from services.cli.render import audit_table
from services.tracing.chain import GENESIS
from services.tracing.complete import CompletenessChecker, CompletenessReport
from services.tracing.reader import audit_filter, scan, scan_raw, stream_bounds
from services.tracing.report import TagUsage, tag_report, tagged_capabilities
from services.tracing.verify import ChainVerifier, VerifyReport

__all__ = [
    "PROGRESS_MIN",
    "audit_app",
    "audit_replay",
    "audit_report",
    "audit_verify",
    "parse_since",
]

audit_app = typer.Typer(help="Read the hash-chained audit trail.", no_args_is_help=True)

#: Runs over fewer records than this show no progress bar.
PROGRESS_MIN = 20_000
#: ``--until`` stops reading once records are this many seconds past it
#: (records reach the chain within seconds of the action; a little slack
#: keeps a late one).
UNTIL_SLACK = 60.0
#: Progress is redrawn every this many records.
_TICK = 2_000
#: Bytes of replay output gathered before one write to stdout.
_WRITE_CHUNK = 1 << 20
#: Rows per table of ``audit replay --format table`` (a long replay streams table by table).
_TABLE_ROWS = 1_000

_decode_event = msgspec.json.Decoder(AuditEvent).decode

Format = Literal["table", "json", "ndjson"]


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


def _when(t: float) -> str:
    return datetime.datetime.fromtimestamp(t).astimezone().isoformat(timespec="milliseconds")


@contextlib.contextmanager
def _progress(total: int, what: str) -> Iterator[Progress | None]:
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
            with _progress(total, "verifying") as bar:
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
                        if bar is not None and task is not None and n % _TICK == 0:
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
        where = f" at or after {_when(start_time)}" if start_time is not None else ""
        console.print(
            f"No audit records{where} in {AUDIT_STREAM} (last seq {last}): nothing to check."
        )
        return
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    grid.add_row("records", f"{report.checked:,} checked")
    grid.add_row("first", f"seq {report.first_seq} at {_when(report.first_time)}")
    grid.add_row("last", f"seq {report.last_seq} at {_when(report.last_time)}")
    if start_time is None:
        grid.add_row("anchor", "genesis (the chain is complete from record 1)")
    else:
        grid.add_row(
            "anchor",
            f"{report.anchor}  (prev_hash of seq {report.first_seq}, the first record at or "
            f"after {_when(start_time)}; taken on trust: earlier records were not checked)",
        )
    grid.add_row("head hash", f"{report.head_hash}  (keep it to detect a rewritten tail)")
    grid.add_row("calls", _calls_line(calls))
    console.print(f"[bold green]Audit chain OK[/] ({AUDIT_STREAM})")
    console.print(grid)
    if not calls.complete:
        _print_open_calls(calls)
        if complete:
            raise typer.Exit(1)


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
        table = Table(box=None, pad_edge=False)
        table.add_column("time", no_wrap=True)
        table.add_column("caller", overflow="fold")
        table.add_column("target.capability", overflow="fold")
        table.add_column("call id", no_wrap=True)
        for call in rows[:_OPEN_ROWS]:
            table.add_row(
                _when(call.time), escape(call.caller),
                escape(f"{call.target}.{call.capability}"), call.call_id,
            )  # fmt: skip
        console.print(table)
        if len(rows) > _OPEN_ROWS:
            console.print(f"[dim]… and {len(rows) - _OPEN_ROWS:,} more (--json lists all)[/]")
    by_agent = calls.unknown_by_agent()
    if by_agent:
        counts = ", ".join(f"{escape(a)} {n:,}" for a, n in by_agent.items())
        console.print(f"Outcome unknown by caller: {counts}")
    console.print(
        "[dim]`signalbox trace <trace id>` (ids in --json) shows what is known of each call.[/]"
    )


# -- replay -------------------------------------------------------------------------------


@audit_app.command("replay")
def audit_replay(
    since: Annotated[
        str,
        typer.Option(
            "--since",
            help="Start at the first record at or after this time: 2h, 30m, 7d or an ISO time.",
            show_default=False,
        ),
    ],
    until: Annotated[
        str | None,
        typer.Option("--until", help="Only records up to this time (duration ago or ISO time)."),
    ] = None,
    agent: Annotated[
        str | None, typer.Option("--agent", help="Only records whose actor is this agent.")
    ] = None,
    kind: Annotated[
        str | None,
        typer.Option("--kind", help="Only this kind: call, decision, registry, usage, admin..."),
    ] = None,
    trace: Annotated[
        str | None, typer.Option("--trace", help="Only records of this trace id.")
    ] = None,
    fmt: Annotated[
        str, typer.Option("--format", help="table, json (one array) or ndjson (one per line).")
    ] = "table",
    nats_url: NatsUrlOption = None,
) -> None:
    """Replay the audit trail from a time, in chain order, with filters.

    Kind and agent are filtered by the server (they are subject tokens);
    trace id and --until by the client.
    """
    if fmt not in ("table", "json", "ndjson"):
        fail(f"unknown --format {fmt!r}; choose table, json or ndjson")
    url, settings = client_url(nats_url)
    start = parse_since(since)
    end = parse_since(until) if until else None
    if end is not None and end < start:
        fail(f"--until ({_when(end)}) is before --since ({_when(start)})")
    try:
        subject = audit_filter(Subjects(settings.subject_prefix), kind=kind, actor=agent)
    except SignalboxError as err:
        fail(err.message)
    status = Console(stderr=True, soft_wrap=True)
    unreadable: list[int] = []
    sink = _ReplaySink(fmt)

    async def main() -> int:
        nc = await connect_operator(url, settings)
        try:
            js = nc.jetstream()
            first, last = await stream_bounds(js)
            total = max(0, last - first + 1)
            n = 0
            with _progress(total, "replaying") as bar:
                task = bar.add_task("replay", total=total) if bar else None
                async with contextlib.aclosing(scan_raw(js, subject, start_time=start)) as batches:
                    async for batch in batches:
                        for pos, raw in batch:
                            try:
                                record = _decode_event(raw)
                            except msgspec.MsgspecError:
                                unreadable.append(pos)
                                continue
                            if end is not None and record.time > end:
                                if record.time > end + UNTIL_SLACK:
                                    return sink.shown
                                continue
                            if trace is not None and record.trace_id != trace:
                                continue
                            sink.add(record, raw)
                        n += len(batch)
                        if bar is not None and task is not None and n >= _TICK:
                            n = 0
                            bar.update(task, completed=batch[-1][0] - first + 1)
            return sink.shown
        finally:
            sink.flush()
            await nc.close()

    shown = run(main())
    sink.close()
    for pos in unreadable:
        status.print(f"[yellow]warning:[/] audit record {pos} is unreadable (run `audit verify`)")
    window = f"from {_when(start)}" + (f" to {_when(end)}" if end is not None else "")
    filters = ", ".join(
        f"{k} {escape(v)}" for k, v in (("kind", kind), ("agent", agent), ("trace", trace)) if v
    )
    status.print(
        f"[dim]{shown} record(s) {window}" + (f" ({filters})" if filters else "") + "[/]",
        highlight=False,
    )


class _ReplaySink:
    """Where ``audit replay`` puts the records it shows, in the chosen format.

    ``ndjson`` and ``json`` write each record as stored (the bytes the hash
    covers, which is what re-encoding the decoded record gives for every
    record the sequencer wrote), gathered into large writes to stdout's
    binary buffer; a stored record spread over several lines is re-encoded on
    one. ``table`` prints a table every :data:`_TABLE_ROWS` records, so a long
    replay streams instead of piling up in memory.
    """

    def __init__(self, fmt: str) -> None:
        self.fmt = fmt
        self.shown = 0
        self._chunks: list[bytes] = []
        self._size = 0
        self._rows: list[AuditEvent] = []
        self._tables = 0
        sys.stdout.flush()
        self._out = sys.stdout.buffer

    def add(self, record: AuditEvent, raw: bytes) -> None:
        """Show ``record`` (stored as ``raw``)."""
        if self.fmt == "table":
            self._rows.append(record)
            self.shown += 1
            if len(self._rows) >= _TABLE_ROWS:
                self._print_table()
            return
        if b"\n" in raw or b"\r" in raw:
            raw = encode(record)
        if self.fmt == "ndjson":
            self._chunks.append(raw)
            self._chunks.append(b"\n")
        else:
            self._chunks.append(b",\n" if self.shown else b"[\n")
            self._chunks.append(raw)
        self.shown += 1
        self._size += len(raw) + 2
        if self._size >= _WRITE_CHUNK:
            self.flush()

    def flush(self) -> None:
        """Write what is gathered."""
        if self._chunks:
            self._out.write(b"".join(self._chunks))
            self._chunks.clear()
            self._size = 0

    def close(self) -> None:
        """Write the rest (and close the JSON array, print the last table)."""
        if self.fmt == "json":
            self._chunks.append(b"\n]\n" if self.shown else b"[]\n")
        elif self.fmt == "table" and self._rows:
            self._print_table()
        self.flush()
        self._out.flush()

    def _print_table(self) -> None:
        title = "Audit replay" if not self._tables else "Audit replay (continued)"
        Console(soft_wrap=True).print(audit_table(self._rows, title=title))
        self._rows = []
        self._tables += 1


# -- report -------------------------------------------------------------------------------


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


@audit_app.command("report")
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
        fail(f"--until ({_when(end)}) is before --since ({_when(start)})")
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
    window = f"from {_when(start)}" + (f" to {_when(end)}" if end is not None else "")
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
    out = Table(title=f"Calls to capabilities tagged {tag!r} {window}", title_justify="left")
    out.add_column("caller", overflow="fold")
    out.add_column("capability", overflow="fold")
    out.add_column("attempts", justify="right")
    out.add_column("decisions", overflow="fold")
    out.add_column("last", no_wrap=True)
    for row in rows:
        effects = ", ".join(f"{k} {v}" for k, v in sorted(row.effects.items()))
        last = datetime.datetime.fromtimestamp(row.last_time).strftime("%Y-%m-%d %H:%M:%S")
        out.add_row(row.caller, f"{row.target}.{row.capability}", str(row.attempts), effects, last)
    console.print(out)
    status.print(f"[dim]tagged {escape(tag)!r}: {escape(names)}[/]", highlight=False)
