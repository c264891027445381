"""LLM and tool usage reports."""

from __future__ import annotations

from typing import Annotated

import msgspec

from schemas._base import Wire

__all__ = ["UsageReport"]

Count = Annotated[int, msgspec.Meta(ge=0)]


class UsageReport(Wire, frozen=True, tag="usage_report.v1"):
    """What an agent used for one model or tool call.

    Published to ``sb.usage.<agent>`` (stream ``SB_USAGE``) with a
    ``Nats-Msg-Id`` equal to ``id``, so a retried report is stored once.
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
