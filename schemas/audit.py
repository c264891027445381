"""The audit envelope written to the ``SB_AUDIT`` stream."""

from __future__ import annotations

from typing import Any, Literal

import msgspec
from msgspec import UNSET, UnsetType

from schemas._base import Wire

__all__ = ["AuditBatch", "AuditEvent", "AuditKind"]

#: ``alert``: something an operator must fix that the system works around meanwhile
#: (a stored KV record that cannot be read: a budget, a breaker, the policy pointer).
AuditKind = Literal[
    "call",
    "decision",
    "rejected",
    "registry",
    "usage",
    "admin",
    "auth",
    "shadow",
    "budget",
    "breaker",
    "alert",
]


class AuditEvent(Wire, frozen=True, tag="audit_event.v1"):
    """One audited action.

    Emitters fill everything up to ``data``; the tracing service, the single
    sequencer of the audit chain, fills ``seq``, ``prev_hash`` and ``hash``
    (``hash`` covers the canonical encoding of the event with ``hash`` empty).

    Attributes:
        id: Unique event id (also the JetStream ``Nats-Msg-Id``, for dedupe).
        time: Unix time of the action.
        kind: What happened (call, decision, rejected input, ...).
        actor: Who did it (agent name or ``service:<name>``).
        subject: The NATS subject the action concerned.
        trace_id: W3C trace id, when known.
        span_id: W3C span id of the hop that did it (the policy's decision or
            delivery span, the cost meter's usage span...), when known.
        parent_span_id: That span's parent (often an agent's own span, which
            only the agent's exporter records).
        via_span_id: The policy delivery span this hop happened under, when an
            agent did it while serving a mediated call (the ``sb`` entry of
            W3C ``tracestate``): with ``span_id`` and ``parent_span_id`` it lets
            the audit trail alone rebuild a trace's causal tree.
        policy_version: Active policy-set version, for decisions.
        data: Kind-specific payload (a ``Decision``, a ``CallOutcome``...).
        seq: Position in the chain (1-based), set by the sequencer.
        prev_hash: Hash of the previous chained record, set by the sequencer.
        hash: Hash of this record, set by the sequencer.
    """

    id: str
    time: float
    kind: AuditKind
    actor: str
    subject: str = ""
    trace_id: str = ""
    # Absent (UNSET), not "", when unknown: records chained before these fields
    # existed re-encode byte for byte, so their hashes still verify.
    span_id: str | UnsetType = UNSET
    parent_span_id: str | UnsetType = UNSET
    via_span_id: str | UnsetType = UNSET
    policy_version: str = ""
    data: dict[str, Any] = msgspec.field(default_factory=dict)
    seq: int = 0
    prev_hash: str = ""
    hash: str = ""


class AuditBatch(Wire, frozen=True, tag="audit_batch.v1"):
    """Several audit events shipped as one intake message.

    Attributes:
        id: Batch id (the intake ``Nats-Msg-Id``, so a re-sent batch is stored once).
        events: The events, in emission order.
    """

    id: str
    events: tuple[AuditEvent, ...]
