"""How the CLI and the demo show Signalbox objects: Rich tables and lines, and JSON.

Every table the CLI prints is a :class:`CliTable` and every key/value block a
:class:`Fields`: their columns and fields declare how a value may be fitted
into the width there is (:class:`Fit`), so an id, a name, a model or a date is
never cut or split, whatever the width, on a terminal or in a pipe. A secret
shown once goes on a line of its own (:func:`print_secret`), outside any table.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

import msgspec
from rich import box
from rich.cells import cell_len
from rich.console import Console, ConsoleOptions, RenderResult
from rich.table import Table
from rich.text import Text

from schemas import BINDING_FIELDS, AgentBinding, AgentRecord, AuditEvent, CredentialInfo
from services.cli.audit_summaries import summarize

__all__ = [
    "KIND_STYLES",
    "CliTable",
    "Column",
    "Fields",
    "Fit",
    "agent_fields",
    "agents_table",
    "audit_header",
    "audit_line",
    "audit_table",
    "binding_fields",
    "credentials_table",
    "print_secret",
    "summarize",
    "to_json",
]

#: Colour of each audit kind, so a denied decision stands out in a long trail.
KIND_STYLES: dict[str, str] = {
    "call": "cyan",
    "decision": "magenta",
    "rejected": "yellow",
    "registry": "blue",
    "usage": "green",
    "admin": "bright_white",
    "auth": "bright_red",
    "shadow": "bright_magenta",
    "budget": "yellow",
    "breaker": "red",
    "alert": "bold red",
}

#: A table cell or a field value: plain text (never Rich markup) or styled text.
Cell = str | Text


class Fit(enum.Enum):
    """How the values of a column (or a field) may be fitted into the width there is."""

    #: Never cut, never wrapped: ids, tokens, names, model names, seq numbers,
    #: dates and times, amounts. A table that cannot give such a column the
    #: width of its widest value shows its rows as blocks of fields instead.
    WHOLE = "whole"
    #: Wraps between words, never inside one, and is never narrower than its
    #: ``min_width``: reasons, descriptions, messages, lists of names.
    WRAP = "wrap"
    #: One line, cut with an ellipsis when room runs out: free text only, never
    #: an identifier.
    SHORTEN = "shorten"


@dataclass(frozen=True, slots=True)
class Column:
    """One column of a :class:`CliTable`.

    Attributes:
        header: Its title (wraps between words if it must).
        fit: How its values fit the width there is.
        min_width: ``WRAP`` and ``SHORTEN`` columns are never narrower than this
            (a ``WRAP`` column nor than its longest word), unless all their values are.
        justify: ``right`` for numbers.
        style: Rich style of its values.
        footer: Shown under the column (a totals row), never cut.
        optional: May be left out, saying so under the table, when the table
            would not fit otherwise (a detail another output format has).
    """

    header: str
    fit: Fit = Fit.WHOLE
    min_width: int = 16
    justify: Literal["left", "right"] = "left"
    style: str = ""
    footer: str = ""
    optional: bool = False


#: Between two columns: the box's divider (a space) and one space of padding.
_GAP = 2
#: Between a field's key and its value.
_KEY_GAP = 2
#: Lines of their own (a value too wide to sit beside its key) are indented this much
#: when they still fit.
_OWN_INDENT = 2


def _text(cell: Cell) -> Text:
    return Text(cell) if isinstance(cell, str) else cell


def _width(text: Text) -> int:
    """Columns the widest line of ``text`` takes."""
    return max((cell_len(line) for line in text.plain.split("\n")), default=0)


def _longest_word(text: Text) -> int:
    return max((cell_len(word) for word in text.plain.split()), default=0)


def _one_line(text: Text) -> Text:
    """``text``, a line laid out already, as a line printed as it is (never re-wrapped)."""
    text.rstrip()
    text.no_wrap = True
    text.overflow = "ignore"
    text.end = "\n"
    return text


def _prose(text: str | Text, style: str) -> Text:
    """A title or a note: wraps between words, on a soft-wrapping console too."""
    prose = Text(text, style=style) if isinstance(text, str) else text.copy()
    prose.no_wrap = False
    prose.overflow = "fold"  # "ignore", a soft-wrapping console's, would mean no wrapping
    return prose


class CliTable:
    """A table for terminals and pipes that never cuts an identifier, at any width.

    At render time, with the width there is, each ``WHOLE`` column gets the width
    of its widest value, each ``WRAP`` and ``SHORTEN`` column at least its
    minimum; what is left goes to those up to their widest value, and a Rich
    table is drawn with exactly these widths (Rich's own squeezing, which cut
    ids and narrowed a reason to one character, never runs). When even the
    minimums do not fit, the optional columns are left out (the table says
    so); failing that, each row is shown as a block of ``header  value`` lines
    (:class:`Fields`), where nothing is cut either.

    Args:
        *columns: The columns, in order.
        title: Printed above, in bold.
        caption: Printed below, dimmed.
    """

    def __init__(self, *columns: Column, title: str = "", caption: str = "") -> None:
        self.columns = columns
        self.title = title
        self.caption = caption
        self._rows: list[tuple[list[Text], str]] = []

    def add_row(self, *cells: Cell, style: str = "") -> None:
        """Add a row: one cell per column (a ``str`` is plain text, not markup)."""
        if len(cells) != len(self.columns):
            raise ValueError(f"{len(cells)} cells for {len(self.columns)} columns")
        self._rows.append(([_text(c) for c in cells], style))

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        width = options.max_width
        if self.title:
            yield _prose(self.title, "bold")
        shown = list(range(len(self.columns)))
        widths = self._widths(shown, width)
        left_out: list[str] = []
        if widths is None:
            required = [i for i, c in enumerate(self.columns) if not c.optional]
            if required and len(required) < len(shown):
                widths = self._widths(required, width)
                if widths is not None:
                    shown = required
                    left_out = [c.header for c in self.columns if c.optional]
        if widths is None:
            yield from self._blocks()
        else:
            yield self._table(shown, widths)
        if left_out:
            yield _prose(f"not shown at this width: {', '.join(left_out)}", "dim")
        if self.caption:
            yield _prose(self.caption, "dim")

    def _widths(self, shown: Sequence[int], width: int) -> list[int] | None:
        """Each shown column's width in ``width`` columns, or None if they cannot fit."""
        natural: list[int] = []
        need: list[int] = []
        headers: list[int] = []
        for i in shown:
            column = self.columns[i]
            values = [row[i] for row, _ in self._rows]
            header, footer = Text(column.header), Text(column.footer)
            widest = max((_width(v) for v in values), default=0)
            natural.append(max(widest, _width(header), _width(footer)))
            headers.append(_width(header))
            floor = max(_longest_word(header), _width(footer))
            if column.fit is Fit.WHOLE:
                need.append(max(widest, floor))
            elif column.fit is Fit.WRAP:
                words = max((_longest_word(v) for v in values), default=0)
                need.append(max(floor, min(widest, max(column.min_width, words))))
            else:
                need.append(max(floor, min(widest, column.min_width)))
        spare = width - _GAP * (len(shown) - 1) - sum(need)
        if spare < 0:
            return None
        # What is left goes first to headers that would wrap, then to values that would.
        spare = _grow(need, headers, spare)
        _grow(need, natural, spare)
        return need

    def _table(self, shown: Sequence[int], widths: Sequence[int]) -> Table:
        columns = [self.columns[i] for i in shown]
        table = Table(
            box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, padding=(0, 1, 0, 0),
            header_style="bold", show_footer=any(c.footer for c in columns),
        )  # fmt: skip
        for column, width in zip(columns, widths, strict=True):
            table.add_column(
                Text(column.header, no_wrap=False, overflow="fold"),
                footer=column.footer,
                width=width,
                justify=column.justify,
                style=column.style,
                no_wrap=column.fit is not Fit.WRAP,
                overflow="ellipsis" if column.fit is Fit.SHORTEN else "fold",
            )
        for cells, style in self._rows:
            table.add_row(*(cells[i] for i in shown), style=style or None)
        return table

    def _blocks(self) -> Iterator[Text | Fields]:
        """Each row as a block of fields (the table does not fit), then the footers."""
        footers = [c.footer for c in self.columns]
        rows: list[tuple[list[Text], str]] = list(self._rows)
        if any(footers):
            rows.append(([Text(f, style="bold") for f in footers], ""))
        for n, (cells, style) in enumerate(rows):
            if n:
                yield Text("")
            block = Fields()
            for column, cell in zip(self.columns, cells, strict=True):
                value = cell.copy()
                for base in (column.style, style):
                    if base:
                        value.stylize_before(base)
                block.add(column.header, value, column.fit, min_width=column.min_width)
            yield block


def _grow(widths: list[int], targets: Sequence[int], spare: int) -> int:
    """Share ``spare`` columns among ``widths`` below their ``targets``, evenly; what is left."""
    growing = [k for k, width in enumerate(widths) if width < targets[k]]
    while spare > 0 and growing:
        share = max(1, spare // len(growing))
        for k in list(growing):
            grow = min(share, targets[k] - widths[k], spare)
            widths[k] += grow
            spare -= grow
            if widths[k] >= targets[k]:
                growing.remove(k)
    return spare


class Fields:
    """``key  value`` lines (one agent, one credential...) that never cut a ``WHOLE`` value.

    A value sits beside its key when it fits there, otherwise on lines of its
    own under the key, as wide as the screen. Only a ``WHOLE`` value wider than
    the whole screen is folded, the last resort that still shows every
    character (Rich would crop a longer line). A secret is not a field: see
    :func:`print_secret`.

    Args:
        title: Printed above, in bold.
    """

    def __init__(self, title: str | Text = "") -> None:
        self.title = title
        self._rows: list[tuple[str, Text, Fit, int]] = []

    def add(self, key: str, value: Cell, fit: Fit = Fit.WHOLE, *, min_width: int = 16) -> None:
        """Add a field (``min_width``: as for a :class:`Column`)."""
        self._rows.append((key, _text(value), fit, min_width))

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        width = options.max_width
        if self.title:
            yield _prose(self.title, "bold")
        indent = max((cell_len(key) for key, *_ in self._rows), default=0) + _KEY_GAP
        for key, value, fit, min_width in self._rows:
            label = Text(key, style="bold")
            beside = _beside(console, value, fit, width - indent, min_width)
            if beside is not None:
                label.append(" " * (indent - cell_len(key)))
                for n, line in enumerate(beside):
                    yield _one_line(Text.assemble(label if not n else " " * indent, line))
                continue
            yield _one_line(label)
            yield from _own_lines(console, value, fit, width)


def _beside(
    console: Console, value: Text, fit: Fit, room: int, min_width: int
) -> list[Text] | None:
    """``value`` laid out in the ``room`` columns beside its key, or None if it does not fit."""
    lines = list(value.split("\n", allow_blank=True)) or [Text("")]
    widest = _width(value)
    if fit is Fit.WHOLE:
        return lines if widest <= room else None
    if fit is Fit.SHORTEN:
        if room < min(widest, min_width):
            return None
        for line in lines:
            line.truncate(room, overflow="ellipsis")
        return lines
    if room < min(widest, max(min_width, _longest_word(value))):
        return None
    return [wrapped for line in lines for wrapped in _wrap(console, line, room)]


def _own_lines(console: Console, value: Text, fit: Fit, width: int) -> Iterator[Text]:
    """``value`` on lines of its own, indented if it fits so.

    A ``WHOLE`` line wider than the screen is folded, the last resort that still
    shows every character (a cropped one would hide some).
    """
    indent = _OWN_INDENT if _width(value) <= width - _OWN_INDENT else 0
    room = max(width - indent, 1)
    for line in value.split("\n", allow_blank=True):
        if fit is Fit.SHORTEN:
            line.truncate(room, overflow="ellipsis")
            parts = [line]
        elif fit is Fit.WHOLE and _width(line) <= room:
            parts = [line]
        else:
            parts = _wrap(console, line, room)
        for part in parts:
            yield _one_line(Text.assemble(" " * indent, part))


def _wrap(console: Console, line: Text, width: int) -> list[Text]:
    """``line`` wrapped between words into ``width`` columns (a longer word folded)."""
    parts = list(line.wrap(console, width, overflow="fold", no_wrap=False))
    for part in parts:
        part.rstrip()
    return parts


def print_secret(console: Console, secret: str) -> None:
    """Print a secret shown once on a line of its own, never wrapped, folded or cut.

    ``soft_wrap``: no width applies; a narrow terminal wraps it for the eye, a
    copy or a pipe gets it whole.
    """
    console.print(secret, soft_wrap=True, markup=False, highlight=False, emoji=False)


def to_json(obj: Any) -> str:
    """One-line JSON of a wire Struct (or any msgspec-encodable value)."""
    return msgspec.json.encode(obj).decode()


def _clock(t: float, *, with_date: bool) -> str:
    stamp = datetime.fromtimestamp(t)
    text = stamp.strftime("%Y-%m-%d %H:%M:%S.%f" if with_date else "%H:%M:%S.%f")
    return text[:-3]


def audit_table(
    events: Sequence[AuditEvent], *, title: str = "Audit trail", subject: bool = True
) -> CliTable:
    """A table of chained audit records (seq, time, kind, actor, [subject,] what, hash).

    Args:
        events: Records in chain order.
        title: Table title.
        subject: Include the NATS subject column (left out, saying so, where it
            does not fit).
    """
    columns = [
        Column("seq", justify="right", style="dim"),
        Column("time"),
        Column("kind"),
        Column("actor"),
        *([Column("subject", style="dim", optional=True)] if subject else []),
        Column("what", Fit.WRAP, min_width=20),
        Column("hash", style="dim"),
    ]
    table = CliTable(*columns, title=title)
    for ev in events:
        cells: list[Cell] = [
            str(ev.seq),
            _clock(ev.time, with_date=False),
            Text(ev.kind, style=KIND_STYLES.get(ev.kind, "")),
            ev.actor,
        ]
        if subject:
            cells.append(ev.subject)
        cells += [summarize(ev), ev.hash[:8]]
        table.add_row(*cells)
    return table


def audit_header() -> Text:
    """Column titles printed once above :func:`audit_line` rows."""
    return Text(
        f"{'seq':>6}  {'time':<23}  {'kind':<8}  {'actor':<20}  {'hash':<8}  what  (subject)",
        style="bold",
    )


def audit_line(event: AuditEvent) -> Text:
    """One audit record as one aligned line (for ``audit tail``)."""
    return Text.assemble(
        (f"{event.seq:>6}", "dim"),
        "  ",
        _clock(event.time, with_date=True),
        "  ",
        (f"{event.kind:<8}", KIND_STYLES.get(event.kind, "")),
        "  ",
        f"{event.actor:<20}",
        "  ",
        (f"{event.hash[:8]:<8}", "dim"),
        "  ",
        summarize(event),
        (f"  ({event.subject})" if event.subject else "", "dim"),
    )


def agents_table(records: Iterable[AgentRecord], *, title: str = "Registered agents") -> CliTable:
    """A table of registered agents (name, version, team, owner, capabilities, tags)."""
    table = CliTable(
        Column("name", style="bold"),
        Column("version"),
        Column("team"),
        Column("owner"),
        Column("region"),
        Column("health", Fit.WRAP, min_width=7),
        Column("capabilities", Fit.WRAP, min_width=12),
        Column("tags", Fit.WRAP, min_width=8),
        title=title,
    )
    for record in records:
        m = record.manifest
        caps = ", ".join(c.name for c in m.capabilities) or "—"
        tags = sorted({t for c in m.capabilities for t in c.tags})
        name = m.name if record.status == "active" else f"{m.name} ({record.status})"
        health = Text(record.health, style=_HEALTH_STYLE.get(record.health, ""))
        if record.instances:
            health.append(f" ({record.instances} up)", style="dim")
        table.add_row(
            name, m.version, m.team, m.owner, m.region or "—", health, caps, ", ".join(tags) or "—"
        )
    return table


_HEALTH_STYLE = {"healthy": "green", "stale": "yellow", "down": "red"}


def agent_fields(record: AgentRecord) -> Fields:
    """Everything about one agent version, as fields under its name and version."""
    m = record.manifest
    fields = Fields(f"{m.name} {m.version}")
    when = _clock(record.last_heartbeat, with_date=True) if record.last_heartbeat else "never"
    for key, value in (
        ("name", m.name), ("version", m.version), ("owner", m.owner), ("team", m.team),
        ("project", m.project or "—"), ("region", m.region or "—"),
        ("health", Text(record.health, style=_HEALTH_STYLE.get(record.health, ""))),
        ("instances", str(record.instances)), ("last heartbeat", when),
        ("registered", _clock(record.registered_at, with_date=True)),
    ):  # fmt: skip
        fields.add(key, value)
    fields.add("models", ", ".join(m.models) or "—", Fit.WRAP)
    fields.add("tools", ", ".join(m.tools) or "—", Fit.WRAP)
    fields.add("description", m.description or "—", Fit.WRAP)
    for k, v in sorted(m.metadata.items()):
        fields.add(f"metadata.{k}", v, Fit.WRAP)
    for cap in m.capabilities:
        # Data tags, declared by the agent (policies read them as resource.tags).
        tags = f"  tags: {', '.join(cap.tags)}" if cap.tags else "  tags: —"
        fields.add("capability", f"{cap.name}{tags}  {cap.description}".rstrip(), Fit.WRAP)
    return fields


def _attribute(value: str | tuple[str, ...]) -> str:
    if isinstance(value, tuple):
        return ", ".join(value) or "—"
    return value or "—"


def binding_fields(
    binding: AgentBinding, *, previous: AgentBinding | None = None, title: str = ""
) -> Fields:
    """An agent's bound attributes (with the values before, when ``previous`` is given)."""
    fields = Fields(title)
    for field in BINDING_FIELDS:
        value = _attribute(getattr(binding, field))
        if previous is not None and getattr(previous, field) != getattr(binding, field):
            value = f"{_attribute(getattr(previous, field))} → {value}"
        fields.add(field, value, Fit.WRAP)
    if binding.bound_at:
        fields.add("bound", _clock(binding.bound_at, with_date=True))
        if binding.bound_by:
            fields.add("bound by", binding.bound_by)
    return fields


def credentials_table(items: Sequence[CredentialInfo], *, now: float) -> CliTable:
    """Agent credentials (ids, status, lifetimes; never secrets)."""
    table = CliTable(
        Column("agent"),
        Column("credential"),
        Column("status"),
        Column("created"),
        Column("expires"),
        Column("note", Fit.WRAP, min_width=12),
        title="Agent credentials",
    )
    styles = {"active": "green", "expired": "yellow", "revoked": "red"}
    for item in items:
        status = item.status(now)
        table.add_row(
            item.agent,
            item.id,
            Text(status, style=styles[status]),
            _clock(item.created_at, with_date=True),
            _clock(item.expires_at, with_date=True),
            item.note,
        )
    return table
