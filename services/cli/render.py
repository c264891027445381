"""How the CLI and the demo show Signalbox objects: Rich tables and lines, and JSON."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

import msgspec
from rich import box
from rich.table import Table
from rich.text import Text

from schemas import BINDING_FIELDS, AgentBinding, AgentRecord, AuditEvent, CredentialInfo

__all__ = [
    "KIND_STYLES",
    "agents_table",
    "audit_header",
    "audit_line",
    "audit_table",
    "binding_grid",
    "credentials_table",
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
}


def to_json(obj: Any) -> str:
    """One-line JSON of a wire Struct (or any msgspec-encodable value)."""
    return msgspec.json.encode(obj).decode()


def _clock(t: float, *, with_date: bool) -> str:
    stamp = datetime.fromtimestamp(t)
    text = stamp.strftime("%Y-%m-%d %H:%M:%S.%f" if with_date else "%H:%M:%S.%f")
    return text[:-3]


def _compact(value: Any, limit: int = 80) -> str:
    text = json.dumps(value, separators=(",", ":"), default=str)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def summarize(event: AuditEvent) -> Text:
    """The one thing worth reading about ``event``, styled (effect, outcome, error...).

    Kept short: the actor and subject are shown next to it, so they are not repeated.
    """
    data = event.data
    if event.kind == "decision":
        decision = data.get("decision") or {}
        effect = str(decision.get("effect", "?"))
        ids = ", ".join(decision.get("policy_ids") or ())
        target = f"{data.get('target', '?')}.{data.get('capability', '?')}"
        style = "bold green" if effect == "allow" else "bold red"
        return Text.assemble((effect, style), f" → {target}", (f" [{ids}]" if ids else "", "dim"))
    if event.kind == "call":
        target = f"{data.get('target', '?')}.{data.get('capability', '?')}"
        latency = f"{float(data.get('latency_ms', 0.0)):.1f} ms"
        if data.get("ok"):
            return Text.assemble(("ok", "bold green"), f" {target} {latency}")
        return Text.assemble(
            ("error", "bold red"), f" {data.get('error_code', '?')} {target} {latency}"
        )
    if event.kind == "rejected":
        details = data.get("details") or {}
        about = ""
        if "target" in details:
            about = f" {details['target']}.{details.get('capability', '?')}"
        elif "path" in details:
            about = f" at {details['path']}"
        message = "" if about else f" {data.get('message', '')}"
        return Text.assemble((str(data.get("code", "?")), "bold yellow"), about + message)
    if event.kind == "registry":
        caps = ", ".join(data.get("capabilities") or ())
        name = data.get("name", "?")
        who = "" if name == event.actor else f" {name}"
        text = f"{data.get('op', '?')}{who} {data.get('version', '')}".rstrip()
        return Text(text + (f" [{caps}]" if caps else ""))
    if event.kind == "usage":
        tokens = int(data.get("input_tokens", 0)) + int(data.get("output_tokens", 0))
        return Text(f"{data.get('model') or data.get('provider') or 'usage'} {tokens} tokens")
    return Text(_compact(data))


def audit_table(
    events: Sequence[AuditEvent], *, title: str = "Audit trail", subject: bool = True
) -> Table:
    """A table of chained audit records (seq, time, kind, actor, [subject,] what, hash).

    Args:
        events: Records in chain order.
        title: Table title.
        subject: Include the NATS subject column (wide terminals).
    """
    table = Table(
        title=title, title_justify="left", header_style="bold", box=box.SIMPLE_HEAD, pad_edge=False
    )
    table.add_column("seq", justify="right", style="dim", no_wrap=True)
    table.add_column("time", no_wrap=True)
    table.add_column("kind", no_wrap=True)
    table.add_column("actor", no_wrap=True)
    if subject:
        table.add_column("subject", no_wrap=True, style="dim")
    table.add_column("what", overflow="fold")
    table.add_column("hash", style="dim", no_wrap=True)
    for ev in events:
        cells: list[str | Text] = [
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


def agents_table(records: Iterable[AgentRecord], *, title: str = "Registered agents") -> Table:
    """A table of registered agents (name, version, team, owner, capabilities, tags)."""
    table = Table(title=title, title_justify="left", header_style="bold")
    table.add_column("name", style="bold", no_wrap=True)
    table.add_column("version", no_wrap=True)
    table.add_column("team")
    table.add_column("owner")
    table.add_column("region")
    table.add_column("health")
    table.add_column("capabilities")
    table.add_column("tags")
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


def agent_panel(record: AgentRecord) -> Table:
    """Everything about one agent version, as a two-column table."""
    m = record.manifest
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    when = _clock(record.last_heartbeat, with_date=True) if record.last_heartbeat else "never"
    rows: list[tuple[str, str | Text]] = [
        ("name", m.name),
        ("version", m.version),
        ("owner / team", f"{m.owner} / {m.team}"),
        ("project", m.project or "—"),
        ("region", m.region or "—"),
        ("health", Text(record.health, style=_HEALTH_STYLE.get(record.health, ""))),
        ("instances", str(record.instances)),
        ("last heartbeat", when),
        ("registered", _clock(record.registered_at, with_date=True)),
        ("models", ", ".join(m.models) or "—"),
        ("tools", ", ".join(m.tools) or "—"),
        ("description", m.description or "—"),
    ]
    rows += [(f"metadata.{k}", v) for k, v in sorted(m.metadata.items())]
    for key, value in rows:
        grid.add_row(key, value)
    for cap in m.capabilities:
        # Data tags, declared by the agent (policies read them as resource.tags).
        tags = f"  tags: {', '.join(cap.tags)}" if cap.tags else "  tags: —"
        grid.add_row("capability", Text(f"{cap.name}{tags}  {cap.description}".rstrip()))
    return grid


def _attribute(value: str | tuple[str, ...]) -> str:
    if isinstance(value, tuple):
        return ", ".join(value) or "—"
    return value or "—"


def binding_grid(binding: AgentBinding, *, previous: AgentBinding | None = None) -> Table:
    """An agent's bound attributes (with the values before, when ``previous`` is given)."""
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    for field in BINDING_FIELDS:
        value = _attribute(getattr(binding, field))
        if previous is not None and getattr(previous, field) != getattr(binding, field):
            value = f"{_attribute(getattr(previous, field))} → {value}"
        grid.add_row(field, value)
    if binding.bound_at:
        by = f" by {binding.bound_by}" if binding.bound_by else ""
        grid.add_row("bound", f"{_clock(binding.bound_at, with_date=True)}{by}")
    return grid


def credentials_table(items: Sequence[CredentialInfo], *, now: float) -> Table:
    """Agent credentials (ids, status, lifetimes; never secrets)."""
    table = Table(title="Agent credentials", box=box.SIMPLE_HEAD)
    for column in ("agent", "credential", "status"):
        table.add_column(column, no_wrap=True)
    for column in ("created", "expires", "note"):
        table.add_column(column, overflow="fold")
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
