"""LLM and tool usage reports, and the operator's cost report."""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from schemas._base import Wire

__all__ = [
    "DIRECT_CALLER",
    "CostByVersion",
    "CostByVersionRequest",
    "CostGroup",
    "CostReport",
    "CostReportRequest",
    "CostRow",
    "UsageReport",
]

Count = Annotated[int, msgspec.Meta(ge=0)]

#: What a cost report groups by: an attribution column, or a time bucket. ``caller`` is
#: the agent whose call the usage was made while serving (from the delegation chain the
#: policy service signed, never the report's word) and ``caller_team`` its bound team.
CostGroup = Literal[
    "team", "agent", "model", "project", "provider", "hour", "day", "caller", "caller_team"
]

#: :attr:`CostRow.key` of usage made on behalf of no caller (``caller``/``caller_team``
#: reports): not while serving a call, with a chain nobody signed, or metered before
#: callers were recorded. Not a valid agent or team name, so it names no one.
DIRECT_CALLER = "(direct)"


class UsageReport(Wire, frozen=True, tag="usage_report.v1"):
    """What an agent used for one model or tool call.

    Published to ``sb.usage.<agent>`` (stream ``SB_USAGE``) with a
    ``Nats-Msg-Id`` equal to ``id``, so a retried report is stored once.

    Attributes:
        id: Report id (unique per agent); also its ``Nats-Msg-Id``.
        agent: The reporting agent (must be the agent of the subject).
        time: Unix time of the call.
        model: Model name as the provider spells it (priced from the prices file).
        provider: ``openai``, ``anthropic``... (informational).
        input_tokens: Prompt tokens, *including* ``cached_tokens``.
        output_tokens: Completion tokens (reasoning tokens included).
        cached_tokens: Prompt tokens served from the provider's cache (a part
            of ``input_tokens``, priced at the cached-input price).
        tool_calls: Tool calls made by the model in this call.
        latency_ms: Wall-clock latency of the call.
        trace_id: Trace the call belongs to.
        project: Project charged (chargeback key): honoured only if it is one
            of the projects an operator bound to the agent.
        on_behalf_of: Chain of agents the call was made for, outermost first
            (informational: the cost service charges the delegating agents
            of the signed ``Sb-Chain`` the report's headers carry, never
            these names).
        reservation_id: The budget reservation this call settles (from the
            authorizing :class:`~schemas.Decision`); its worst-case amount is
            replaced by this report's actual cost.
        agent_version: Version of the reporting agent (the SDK fills it in),
            so canary rollouts can compare cost per call across versions.
    """

    id: str
    agent: str
    time: float
    model: str = ""
    provider: str = ""
    input_tokens: Count = 0
    output_tokens: Count = 0
    cached_tokens: Count = 0
    tool_calls: Count = 0
    latency_ms: Annotated[float, msgspec.Meta(ge=0)] = 0.0
    trace_id: str = ""
    project: str = ""
    on_behalf_of: tuple[str, ...] = ()
    reservation_id: Annotated[str, msgspec.Meta(max_length=64)] = ""
    agent_version: Annotated[str, msgspec.Meta(max_length=64)] = ""


class CostReportRequest(Wire, frozen=True, tag="cost_report_request.v1"):
    """Operator asks the cost service (``sb.admin.cost.report``) for metered totals.

    Attributes:
        by: Grouping key.
        since: Unix time, inclusive (None: from the first report).
        until: Unix time, exclusive (None: up to now).
    """

    by: CostGroup = "team"
    since: float | None = None
    until: float | None = None


class CostRow(Wire, frozen=True, tag="cost_row.v1"):
    """Totals of one group (or of everything, in :attr:`CostReport.total`).

    Attributes:
        key: The group's value (team, agent...; for ``hour``/``day`` the
            bucket's start as Unix seconds, in text); empty if unattributed;
            :data:`DIRECT_CALLER` for usage made on behalf of no caller.
        reports: Usage reports counted (each once, whatever redelivery).
        cost_usd: Computed cost in US dollars.
        fallback_priced: Reports of models missing from the prices file,
            priced by its ``fallback`` entry.
        unreserved: Reports a budget applied to that settled no reservation
            (the model call skipped ``authorize``/``model_call``): charged,
            but nothing checked the budget before the money was spent.
        attribution_dropped: Reports that named a project not bound to their
            agent, or delegating agents without a chain signed by the policy
            service: charged to their agent and team only.
    """

    key: str
    reports: Count = 0
    input_tokens: Count = 0
    output_tokens: Count = 0
    cached_tokens: Count = 0
    tool_calls: Count = 0
    cost_usd: float = 0.0
    fallback_priced: Count = 0
    unreserved: Count = 0
    attribution_dropped: Count = 0


class CostReport(Wire, frozen=True, tag="cost_report.v1"):
    """The cost service's answer: one row per group, most expensive first, and the total."""

    by: CostGroup
    since: float | None
    until: float | None
    rows: tuple[CostRow, ...] = ()
    total: CostRow = msgspec.field(default_factory=lambda: CostRow(key=""))
    prices_as_of: str = ""


class CostByVersionRequest(Wire, frozen=True, tag="cost_by_version_request.v1"):
    """The policy service asks (``sb.cost.versions``) what each version of an agent spent.

    Attributes:
        agent: Agent name.
        since: Unix time, inclusive.
    """

    agent: str
    since: float


class CostByVersion(Wire, frozen=True, tag="cost_by_version.v1"):
    """Spend per version of one agent since a time (``key`` of each row: the version)."""

    agent: str
    since: float
    versions: tuple[CostRow, ...] = ()
