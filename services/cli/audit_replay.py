"""``signalbox audit replay``: the audit trail from a time, in chain order, with filters.

::

    signalbox audit replay --since 2h [--until T] [--agent A] [--kind K] [--trace T]
                           [--format table|json|ndjson]

Reads ``SB_AUDIT`` in stream order through an ordered consumer
(:func:`services.tracing.reader.scan_raw`), as the operator (whose
permissions allow read-only JetStream access to the audit stream).

:mod:`services.cli.main` registers :func:`audit_replay` as ``signalbox audit replay``.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Annotated, Literal

import msgspec
import typer
from rich.console import Console
from rich.markup import escape

from broker.codec import encode
from broker.errors import SignalboxError
from broker.subjects import Subjects
from schemas import AuditEvent
from services.cli.audit_cmds import (
    PROGRESS_TICK,
    UNTIL_SLACK,
    local_time,
    parse_since,
    progress_bar,
)
from services.cli.common import NatsUrlOption, client_url, connect_operator, fail, run
from services.cli.render import audit_table
from services.tracing.reader import audit_filter, scan_raw, stream_bounds

__all__ = ["audit_replay"]

#: Bytes of replay output gathered before one write to stdout.
_WRITE_CHUNK = 1 << 20
#: Rows per table of ``audit replay --format table`` (a long replay streams table by table).
_TABLE_ROWS = 1_000

_decode_event = msgspec.json.Decoder(AuditEvent).decode

Format = Literal["table", "json", "ndjson"]


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
        fail(f"--until ({local_time(end)}) is before --since ({local_time(start)})")
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
            with progress_bar(total, "replaying") as bar:
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
                        if bar is not None and task is not None and n >= PROGRESS_TICK:
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
    window = f"from {local_time(start)}" + (f" to {local_time(end)}" if end is not None else "")
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
