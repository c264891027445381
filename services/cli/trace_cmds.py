"""``signalbox trace <trace-id>``: one trace's causal tree, rebuilt from the audit trail alone.

::

    signalbox trace 4bf92f3577b34da6a3ce929d0e0e4736 [--since 24h|ISO] [--json]

Every audit record made on a hop of a trace carries the trace id, the span
id of that hop, its parent span id and, for work an agent did while serving
a mediated call, the *via* span: the policy delivery it happened under
(:mod:`broker.telemetry`). :func:`build_tree` links the records by those ids
into the tree ``caller → policy decision → delivery to the target (outcome,
latency) → what the target did meanwhile (nested calls, model authorizations,
usage)``; :func:`trace_tree` draws it (Rich ``Tree``), :func:`tree_dict` gives
it to machines. The demo reuses both.

:mod:`services.cli.main` registers :func:`trace_command` as ``signalbox trace``.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any

import msgspec
import typer
from rich.console import Console
from rich.markup import escape
from rich.text import Text
from rich.tree import Tree

from broker.errors import SchemaError
from broker.subjects import Subjects
from schemas import AuditEvent
from services.cli.audit_cmds import parse_since
from services.cli.common import (
    JsonOption,
    NatsUrlOption,
    client_url,
    clock,
    connect_operator,
    fail,
    run,
)
from services.cli.render import KIND_STYLES, summarize
from services.tracing.reader import scan

__all__ = ["TRACE_ID", "TraceNode", "build_tree", "trace_command", "trace_tree", "tree_dict"]

#: A W3C trace id: 32 lowercase hex digits, not all zero.
TRACE_ID = re.compile(r"(?!0{32})[0-9a-f]{32}")

#: Which record of a span names it (the decision before a shadow disagreement...).
_PRIMARY = {"decision": 0, "call": 1, "usage": 2, "rejected": 3}


@dataclass
class TraceNode:
    """One span of the trace as the audit trail saw it (one or more records).

    Attributes:
        span_id: The span (or ``record:<id>`` for a record without one).
        parent_span_id: Its parent span (may be an agent's own, not in the trail).
        via_span_id: The policy delivery it happened under, if any.
        records: Its audit records, primary one first.
        children: Spans under it, in time order.
        linked_via: Attached under its via span because its parent is not in the trail.
    """

    span_id: str
    parent_span_id: str = ""
    via_span_id: str = ""
    records: list[AuditEvent] = field(default_factory=list)
    children: list[TraceNode] = field(default_factory=list)
    linked_via: bool = False

    @property
    def record(self) -> AuditEvent:
        """The record that names this span."""
        return self.records[0]

    @property
    def time(self) -> float:
        """When the span's first record happened."""
        return min(r.time for r in self.records)

    @property
    def duration_ms(self) -> float | None:
        """The span's duration where the trail knows it (a call's latency, a usage's)."""
        latency = self.record.data.get("latency_ms")
        if self.record.kind in ("call", "usage") and isinstance(latency, int | float):
            return float(latency)
        return None

    @property
    def outcome(self) -> str:
        """``allow``/``deny``/``needs_approval``, ``ok``, an error code, or the kind."""
        data = self.record.data
        kind = self.record.kind
        if kind in ("decision", "shadow"):
            return str((data.get("decision") or {}).get("effect", kind))
        if kind == "call":
            return "ok" if data.get("ok") else str(data.get("error_code") or "error")
        if kind == "rejected":
            return str(data.get("code", "rejected"))
        return kind


def build_tree(records: Iterable[AuditEvent]) -> list[TraceNode]:
    """Link one trace's records into spans and spans into a tree; the roots, by time.

    A record without a span id joins the span whose records share its
    ``call_id``, else stands alone. A span whose parent is not in the trail
    hangs under its via span when that one is (``linked_via``), else it is a
    root (its parent is the caller's own span, which only the caller's
    exporter records).
    """
    nodes: dict[str, TraceNode] = {}
    loose: list[AuditEvent] = []
    for record in sorted(records, key=lambda r: (r.seq, r.time)):
        if not record.span_id:
            loose.append(record)
            continue
        node = nodes.setdefault(
            record.span_id,
            TraceNode(
                span_id=record.span_id,
                parent_span_id=record.parent_span_id or "",
                via_span_id=record.via_span_id or "",
            ),
        )
        node.records.append(record)
    by_call: dict[str, TraceNode] = {}
    for node in nodes.values():
        node.records.sort(key=lambda r: (_PRIMARY.get(r.kind, 9), r.seq))
        call_id = node.record.data.get("call_id")
        if isinstance(call_id, str) and call_id:
            by_call.setdefault(call_id, node)
    for record in loose:
        call_id = record.data.get("call_id")
        home = by_call.get(call_id) if isinstance(call_id, str) else None
        if home is not None:
            home.records.append(record)
        else:
            key = f"record:{record.id}"
            nodes[key] = TraceNode(span_id=key, records=[record])
    roots: list[TraceNode] = []
    for node in nodes.values():
        parent = nodes.get(node.parent_span_id) if node.parent_span_id else None
        if parent is None and node.via_span_id:
            parent = nodes.get(node.via_span_id)
            node.linked_via = parent is not None
        if parent is None or parent is node:
            roots.append(node)
        else:
            parent.children.append(node)
    for node in nodes.values():
        node.children.sort(key=lambda n: n.time)
    return sorted(roots, key=lambda n: n.time)


def _flatten(roots: Iterable[TraceNode]) -> Iterable[TraceNode]:
    for node in roots:
        yield node
        yield from _flatten(node.children)


def _label(node: TraceNode, start: float) -> Text:
    r = node.record
    data = r.data
    offset = f"+{(node.time - start) * 1000:.1f} ms"
    duration = node.duration_ms
    text = Text()
    if node.linked_via:
        text.append(f"{r.actor}, serving that call: ", style="dim")
    if r.kind == "decision":
        # A model or tool use (``sb.authz``) has no target: it is an authorization.
        use = "capability" not in data and "target" not in data
        text.append("authz " if use else "decision ", style=KIND_STYLES["decision"])
        text.append(f"{r.actor} ")
    elif r.kind == "call":
        text.append("delivery ", style=KIND_STYLES["call"])
    else:
        text.append(f"{r.kind} ", style=KIND_STYLES.get(r.kind, ""))
        text.append(f"{r.actor} ")
    text.append_text(summarize(r))
    extra = [_also(rec) for rec in node.records[1:]]
    text.append(f"  {offset}", style="dim")
    if duration is not None and r.kind != "call":
        text.append(f" ({duration:.1f} ms)", style="dim")
    if extra:
        text.append(f"  (+ {', '.join(extra)})", style="dim")
    return _wrapping(text)


def _wrapping(text: Text) -> Text:
    """``text`` wrapped between words, even on a soft-wrapping console: a tree crops
    each line of a label to its width (which cut ``gpt-4o-mini`` to ``gpt-4o``), so
    a label must wrap for a model name, an agent or an id to stay whole."""
    text.no_wrap = False
    text.overflow = "fold"
    return text


def _also(record: AuditEvent) -> str:
    """A further record of a span, in a few words (an operator's approval, a shadow...)."""
    data = record.data
    if data.get("approved_by") is not None:
        return f"approved by {data['approved_by'] or 'an operator'}"
    if record.kind == "shadow":
        return "shadow set disagrees"
    return record.kind


def trace_tree(trace_id: str, roots: Sequence[TraceNode]) -> Tree:
    """The causal tree of a trace, for the terminal.

    The top level groups root spans by the caller's own span (their common
    parent): one branch per call an agent made from outside any handler.
    """
    records = sum(len(n.records) for n in _flatten(roots))
    title = Text.assemble(("trace ", "bold"), trace_id, (f"  ({records} audit records)", "dim"))
    tree = Tree(_wrapping(title))
    if not roots:
        return tree
    start = min(n.time for n in roots)
    callers: dict[str, Tree] = {}

    def add(branch: Tree, node: TraceNode) -> None:
        child = branch.add(_label(node, start))
        for sub in node.children:
            add(child, sub)

    for root in roots:
        key = root.parent_span_id or root.span_id
        branch = callers.get(key)
        if branch is None:
            who = root.record.actor
            span = f"span {root.parent_span_id}" if root.parent_span_id else "no parent span"
            branch = tree.add(_wrapping(Text.assemble((who, "bold"), (f"  ({span})", "dim"))))
            callers[key] = branch
        add(branch, root)
    return tree


def _node_dict(node: TraceNode, start: float) -> dict[str, Any]:
    return {
        "span_id": node.span_id,
        "parent_span_id": node.parent_span_id,
        "via_span_id": node.via_span_id,
        "linked_via": node.linked_via,
        "kind": node.record.kind,
        "actor": node.record.actor,
        "time": node.time,
        "offset_ms": round((node.time - start) * 1000, 3),
        "duration_ms": node.duration_ms,
        "outcome": node.outcome,
        "summary": summarize(node.record).plain,
        "records": [msgspec.to_builtins(r) for r in node.records],
        "children": [_node_dict(c, start) for c in node.children],
    }


def tree_dict(trace_id: str, roots: Sequence[TraceNode]) -> dict[str, Any]:
    """The tree as JSON-ready builtins (each span with its one-line summary, as the tree
    shows it, its records and children)."""
    start = min((n.time for n in roots), default=0.0)
    return {
        "trace_id": trace_id,
        "records": sum(len(n.records) for n in _flatten(roots)),
        "spans": [_node_dict(n, start) for n in roots],
    }


def trace_command(
    trace_id: Annotated[
        str, typer.Argument(help="W3C trace id (32 hex digits), as audit records carry it.")
    ],
    since: Annotated[
        str,
        typer.Option("--since", help="Scan the audit trail from this time: 24h, 7d or ISO."),
    ] = "24h",
    nats_url: NatsUrlOption = None,
    json_out: JsonOption = False,
) -> None:
    """Print a trace's causal tree: caller, policy decision, delivery and reply, nested calls,
    model authorizations and usage, with outcomes and durations (from SB_AUDIT)."""
    wanted = trace_id.strip().lower()
    if TRACE_ID.fullmatch(wanted) is None:
        fail(
            f"{trace_id!r} is not a W3C trace id (32 hex digits, not all zero); copy one "
            "from the trace_id of a record in `signalbox audit replay --since 1h --format json`"
        )
    url, settings = client_url(nats_url)
    start = parse_since(since)
    subject = Subjects(settings.subject_prefix).audit_log_all

    async def main() -> tuple[list[AuditEvent], int]:
        nc = await connect_operator(url, settings)
        try:
            found: list[AuditEvent] = []
            unreadable = 0
            js = nc.jetstream()
            async with contextlib.aclosing(scan(js, subject, start_time=start)) as records:
                async for _pos, record, _raw in records:
                    if isinstance(record, SchemaError):
                        unreadable += 1
                    elif record.trace_id == wanted:
                        found.append(record)
            return found, unreadable
        finally:
            await nc.close()

    found, unreadable = run(main())
    if not found:
        fail(
            f"no audit record of trace {wanted} since {clock(start)}; widen the window "
            "(--since 7d) or check the id (`signalbox audit replay --since 24h --format json` "
            "shows each record's trace_id)"
        )
    roots = build_tree(found)
    if json_out:
        typer.echo(msgspec.json.encode(tree_dict(wanted, roots)).decode())
        return
    console = Console(soft_wrap=True)
    console.print(trace_tree(wanted, roots))
    if unreadable:
        Console(stderr=True).print(
            f"[yellow]warning:[/] {unreadable} unreadable audit record(s) skipped "
            f"(run `signalbox audit verify`); {escape(wanted)} may be incomplete"
        )
