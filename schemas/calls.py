"""Metadata of mediated agent-to-agent calls.

A call's payload is the capability's own input type; Signalbox's metadata
travels in NATS headers (names in ``HEADERS``) so raw nats-py agents can read
it without decoding a wrapper. :class:`CallMeta` is the decoded form.
"""

from __future__ import annotations

from schemas._base import Wire

__all__ = ["CallMeta", "CallOutcome"]


class CallMeta(Wire, frozen=True, tag="call_meta.v1"):
    """Who called whom, as the policy service forwarded it to the target.

    Attributes:
        call_id: Unique id of this call (also the audit correlation id).
        caller: Calling agent's name.
        target: Target agent's name.
        capability: Capability invoked.
        trace_id: W3C trace id, when the caller sent ``traceparent``.
        deadline: Unix time after which the caller no longer waits.
    """

    call_id: str
    caller: str
    target: str
    capability: str
    trace_id: str = ""
    deadline: float = 0.0


class CallOutcome(Wire, frozen=True, tag="call_outcome.v1"):
    """Result of a mediated call, as audited by the policy service.

    ``version`` is the target version a route (or a pin) sent it to; empty
    when the call went to whichever version's instance took it.
    """

    call_id: str
    caller: str
    target: str
    capability: str
    ok: bool
    latency_ms: float
    error_code: str = ""
    request_bytes: int = 0
    reply_bytes: int = 0
    version: str = ""
