"""Signalbox wire types: frozen, tagged msgspec Structs, one module per context.

No I/O lives here, and nothing here imports ``broker`` or ``services``.
"""

from __future__ import annotations

from schemas._base import SCHEMA_VERSION, Wire
from schemas.audit import AuditBatch, AuditEvent, AuditKind
from schemas.calls import CallMeta, CallOutcome
from schemas.cost import UsageReport
from schemas.errors import ErrorReply
from schemas.policy import Decision, Effect
from schemas.registry import (
    AgentInstance,
    AgentList,
    AgentManifest,
    AgentRecord,
    Capability,
    DeregisterAgent,
    DiscoverAgents,
    DiscoverResult,
    GetAgent,
    Health,
    Heartbeat,
    InstanceStats,
    ListAgents,
    Registered,
)

__all__ = [
    "SCHEMA_VERSION",
    "AgentInstance",
    "AgentList",
    "AgentManifest",
    "AgentRecord",
    "AuditBatch",
    "AuditEvent",
    "AuditKind",
    "CallMeta",
    "CallOutcome",
    "Capability",
    "Decision",
    "DeregisterAgent",
    "DiscoverAgents",
    "DiscoverResult",
    "Effect",
    "ErrorReply",
    "GetAgent",
    "Health",
    "Heartbeat",
    "InstanceStats",
    "ListAgents",
    "Registered",
    "UsageReport",
    "Wire",
]
