"""Demo steps of the audit trail: the desk's records and the chain checked, a replay
summary, one call's trace tree.

Called by :mod:`services.demo.scenario` with the records the run wrote; each
step returns whether what the demo claims actually happened.
"""

from __future__ import annotations

import time
from collections import Counter

from rich.console import Console
from rich.text import Text

from broker.runtime.jetstream import AUDIT_STREAM
from schemas import AuditEvent
from services.cli.render import KIND_STYLES, summarize
from services.cli.trace_cmds import build_tree, trace_tree
from services.tracing.chain import GENESIS, record_hash

__all__ = ["show_chain", "show_replay_and_trace", "show_trail"]


def show_trail(console: Console, events: list[AuditEvent], *, desk: int, allowed: int) -> None:
    """The lending desk's records (the first ``desk`` of ``events``): the ``allowed`` ones
    of steps 2-4 (enrollments, connections, registrations, allowed calls) counted by
    kind, the rest (steps 5-8: refusals, the approval, the rejection) one line each."""
    console.print(
        Text(
            f"{AUDIT_STREAM}: {desk} records of the lending desk's run (steps 2-8; "
            f"{len(events)} in all; `signalbox audit tail` lists them)",
            style="bold",
        )
    )
    earlier = events[:allowed]
    if earlier:
        kinds = Counter(e.kind for e in earlier)
        console.print(
            f"records {earlier[0].seq}-{earlier[-1].seq} (steps 2-4): "
            + ", ".join(f"{n} {kind}" for kind, n in kinds.most_common())
        )
    # One line per record, aligned; what was done is cut to the width there is.
    for e in events[allowed:desk]:
        line = Text.assemble(
            (f"{e.seq:>3} ", "dim"),
            (f"{e.kind:<8} ", KIND_STYLES.get(e.kind, "")),
            f"{e.actor:<16} ",
            summarize(e),
        )
        line.truncate(console.width, overflow="ellipsis")
        console.print(line, no_wrap=True)


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
    summary = Text(f"Audit replay of this run: {len(events)} records (", style="bold")
    for n, (kind, count) in enumerate(sorted(by_kind.items(), key=lambda kv: -kv[1])):
        summary.append(", " if n else "")
        summary.append(kind, style=KIND_STYLES.get(kind, ""))
        summary.append(f" {count}")
    summary.append(")")
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
