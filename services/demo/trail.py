"""Demo steps of the audit trail: the chain checked, a replay summary, one call's trace tree.

Called by :mod:`services.demo.scenario` with the records the run wrote; each
step returns whether what the demo claims actually happened.
"""

from __future__ import annotations

import time

from rich.console import Console
from rich.table import Table
from rich.text import Text

from schemas import AuditEvent
from services.cli.render import KIND_STYLES
from services.cli.trace_cmds import build_tree, trace_tree
from services.tracing.chain import GENESIS, record_hash

__all__ = ["show_chain", "show_replay_and_trace"]


def show_chain(console: Console, events: list[AuditEvent], expected: int) -> bool:
    """Check the records link up (each hash recomputes and names its predecessor)."""
    ok = len(events) == expected
    prev = None
    for event in events:
        if record_hash(event) != event.hash:
            ok = False
            console.print(f"[bold red]record {event.seq}: hash does not match its content")
        if prev is not None and event.prev_hash != prev.hash:
            ok = False
            console.print(f"[bold red]record {event.seq}: not linked to record {prev.seq}")
        prev = event
    if len(events) < expected:
        console.print(
            f"[bold red]only {len(events)} of {expected} audit events were chained in time"
        )
    elif ok and events:
        first = events[0]
        origin = "genesis" if first.prev_hash == GENESIS else f"record {first.seq - 1}"
        console.print(
            f"[green]✔[/] {len(events)} records, each hash recomputed and linked to the one "
            f"before it (from {origin}); head {events[-1].hash[:16]}…"
        )
    return ok


def show_replay_and_trace(console: Console, events: list[AuditEvent]) -> bool:
    """A replay summary of the run's records, then the trace tree of the approved call."""
    by_kind: dict[str, int] = {}
    effects: dict[str, int] = {}
    for event in events:
        by_kind[event.kind] = by_kind.get(event.kind, 0) + 1
        decided = event.data.get("decision") if event.kind == "decision" else None
        effect = decided.get("effect") if isinstance(decided, dict) else None
        if isinstance(effect, str):
            effects[effect] = effects.get(effect, 0) + 1
    traces = {e.trace_id for e in events if e.trace_id}
    summary = Table(title=f"Audit replay of this run: {len(events)} records", title_justify="left")
    summary.add_column("kind")
    summary.add_column("records", justify="right")
    for kind, count in sorted(by_kind.items(), key=lambda kv: -kv[1]):
        summary.add_row(Text(kind, style=KIND_STYLES.get(kind, "")), str(count))
    console.print(summary)
    console.print(
        f"{len(traces)} traces; decisions: "
        + ", ".join(f"{k} {v}" for k, v in sorted(effects.items()))
        + (f"; {_hms(events[0].time)} to {_hms(events[-1].time)}" if events else "")
    )
    parked = [
        e for e in events
        if e.kind == "decision" and (e.data.get("decision") or {}).get("effect") == "needs_approval"
    ]  # fmt: skip
    if not parked or not parked[0].trace_id:
        console.print("[bold red]no traced call needing approval in the trail")
        return False
    trace_id = parked[0].trace_id
    roots = build_tree(e for e in events if e.trace_id == trace_id)
    console.print(trace_tree(trace_id, roots))
    console.print(f"[dim]signalbox trace {trace_id} prints the same from a running system[/]")
    return len(roots) == 1 and bool(roots[0].children)


def _hms(t: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(t)) + f".{int(t * 1000) % 1000:03d}"
