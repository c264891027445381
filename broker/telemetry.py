"""OpenTelemetry traces across NATS: providers from settings, W3C propagation, Signalbox spans.

Every hop of a mediated call is a span, and the W3C trace context travels in
NATS headers (``traceparent``, ``tracestate``) from hop to hop::

    agent A  sb.call (client)
    policy     └─ sb.decision (server)
                    └─ sb.delivery (client)   traceparent + tracestate sb=<delivery span>
    agent B            ├─ sb.serve (server)   nested sb.call, sb.authz, sb.usage inside
    policy             └─ sb.reply (producer: B's answer relayed to A)

Authorization (``sb.authz`` on both sides) and usage reports (``sb.usage``: the
SDK's producer span, the cost meter's consumer span) are spans of the same
trace when made inside a handler.

Providers. Each component (a :class:`~broker.runtime.service.Service`, an
:class:`~broker.agent.Agent`) takes an optional tracer provider, so several
services and agents in one process (tests, ``signalbox up``, the demo) can
share one or use several; by default they use the global provider when an
application has set one (``opentelemetry.trace.set_tracer_provider``), else
:data:`ID_ONLY`. :func:`tracer_provider` builds one from
:class:`~broker.settings.Settings` (exporter ``none``, ``console`` or
``otlp``). Recording providers sample every span they start (``ALWAYS_ON``):
each component records its own hops whether or not its caller records.

``none`` costs (almost) nothing and still traces: :class:`IdOnlyTracerProvider`
makes non-recording spans with fresh, valid W3C ids (a new trace id for a
root, the parent's trace id and trace state otherwise), so audit records
carry trace and span ids and the context still propagates, without the
SDK's span machinery (about half its cost per span, measured in
``tests/broker/test_telemetry.py``'s neighbour ``bench/calls.py``).

The audit link. A span is current while its hop runs (:meth:`Telemetry.hop`
attaches it to the OpenTelemetry context, a contextvar: a nested
``agent.call`` made inside a handler is its child). :func:`current_ids`
gives the audit emitter the current hop's trace id, span id, parent span id
and *via* span: the policy delivery that the hop happened under, which the
policy service writes into the ``sb`` entry of ``tracestate`` when it
forwards a call, and which rides along every span the target then starts.
The audit trail alone can so rebuild the causal tree, although the agents'
own spans (only in their exporters) are not in it.

Example::

    provider = otel.tracer_provider(settings)             # broker.runtime.otel: SIGNALBOX_OTEL_*
    tel = Telemetry("signalbox.policy", provider)
    with tel.hop("sb.decision", msg.headers) as span:         # extract, start, make current
        ...
    headers = inject({}, span)                                # traceparent for the next hop
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import logging
import os
import random
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import (
    NonRecordingSpan,
    Span,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
    TraceState,
)
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.util import types

from broker.errors import SignalboxError
from broker.replies import H_TRACE_ORIGIN
from schemas import AgentRecord, Decision

__all__ = [
    "ATTR",
    "ID_ONLY",
    "STATE_KEY",
    "AuditIds",
    "IdOnlyTracerProvider",
    "Telemetry",
    "agent_attributes",
    "annotate",
    "current_ids",
    "current_trace_id",
    "decision_attributes",
    "extract",
    "fail",
    "hex_ids",
    "inject",
    "is_recording",
    "owned_trace_id",
    "parent_ids",
    "requested_root_trace",
    "resolve_provider",
    "trusted_parent",
]

log = logging.getLogger(__name__)

#: The ``tracestate`` entry carrying the span id of the policy delivery a hop runs under.
STATE_KEY = "sb"

#: Attribute names Signalbox puts on its spans (``gen_ai.*`` follow OpenTelemetry's
#: GenAI conventions, ``messaging.*`` its messaging conventions).
ATTR = {
    "agent": "signalbox.agent.name",
    "version": "signalbox.agent.version",
    "team": "signalbox.agent.team",
    "caller": "signalbox.caller",
    "target": "signalbox.target",
    "capability": "signalbox.capability",
    "call_id": "signalbox.call_id",
    "effect": "signalbox.decision.effect",
    "reason": "signalbox.decision.reason",
    "policy_ids": "signalbox.policy.ids",
    "policy_version": "signalbox.policy.version",
    "error": "signalbox.error.code",
    "action": "signalbox.authz.action",
    "resource": "signalbox.authz.resource",
    "model": "gen_ai.request.model",
    "provider": "gen_ai.system",
    "input_tokens": "gen_ai.usage.input_tokens",
    "output_tokens": "gen_ai.usage.output_tokens",
    "cost": "signalbox.cost.usd",
    "system": "messaging.system",
    "destination": "messaging.destination.name",
}

_PROPAGATOR = TraceContextTextMapPropagator()
#: Span id of the current hop's parent (a plain contextvar: cheaper than a context value).
_PARENT: contextvars.ContextVar[str] = contextvars.ContextVar("sb_parent_span_id", default="")
_SPAN_HEX = re.compile(r"[0-9a-f]{16}")
_TRACEPARENT_V00 = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
_TRACE_HEX = re.compile(r"[0-9a-f]{32}")
#: The trace id the next root span gets (0: a random one); see :func:`owned_trace_id`.
_ROOT_TRACE: contextvars.ContextVar[int] = contextvars.ContextVar("sb_root_trace", default=0)


# -- trace ownership ------------------------------------------------------------------------
#
# A trace id is not a secret: every agent a call reaches sees it. Continuing
# whatever ``traceparent`` a sender names would let any agent put records into
# any trace (an investigator's view of another agent's calls). So the control
# plane continues a sender's trace only if the sender owns it (its id is
# ``owned_trace_id(sender, origin)`` for the ``Sb-Trace-Origin`` it sent: a
# hash, so no agent can produce an id another agent owns) or the policy
# service vouched for it (a delegation chain it signed, bound to that trace,
# for the call the sender is serving). Any other claim is moved into the
# sender's own trace ``owned_trace_id(sender, claimed trace id)``: the same
# claim always lands in the same trace, never in someone else's.


def owned_trace_id(agent: str, origin: str) -> str:
    """The trace id (32 hex) ``agent`` owns for ``origin`` (32 hex: the application trace
    it continues, or random). A keyless hash: the SDK and the services agree on it."""
    digest = hashlib.sha256(f"signalbox trace v1\0{agent}\0{origin}".encode()).digest()
    return digest[:16].hex() if any(digest[:16]) else "0" * 31 + "1"


def trusted_parent(
    headers: Mapping[str, str] | None,
    sender: str,
    vouched: Callable[[str], bool] | None = None,
) -> tuple[otel_context.Context, str]:
    """The remote context a hop for ``sender`` may continue, and the trace id it claimed in
    vain (``""`` when the claim was kept).

    Kept when ``sender`` owns the claimed trace (``Sb-Trace-Origin``) or
    ``vouched(trace id)`` is true; otherwise the context is moved into
    ``owned_trace_id(sender, claimed)`` (same span id, no trace state: the
    ``sb`` via entry of another trace means nothing here).
    """
    parent = extract(headers)
    sc = trace.get_current_span(parent).get_span_context()
    if not sc.is_valid or headers is None:
        return parent, ""
    claimed = f"{sc.trace_id:032x}"
    origin = headers.get(H_TRACE_ORIGIN, "")
    if origin and _TRACE_HEX.fullmatch(origin) and owned_trace_id(sender, origin) == claimed:
        return parent, ""
    if vouched is not None and vouched(claimed):
        return parent, ""
    moved = SpanContext(int(owned_trace_id(sender, claimed), 16), sc.span_id, True, sc.trace_flags)
    return trace.set_span_in_context(NonRecordingSpan(moved), otel_context.Context()), claimed


def requested_root_trace() -> int:
    """The trace id the root span being started right now should get (0: any random id).

    :meth:`Telemetry.owned_hop` sets it for the instant its span starts; an id
    generator that honours it (``broker.runtime.otel.OwnedTraceIds``, or any
    with a true ``signalbox_owned_ids`` attribute) lets the agent own its traces.
    """
    return _ROOT_TRACE.get()


# -- providers ------------------------------------------------------------------------------


class _IdOnlyTracer(trace.Tracer):
    """Non-recording spans with valid ids: what ``none`` needs, at a fraction of the SDK's cost."""

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng

    def start_span(
        self,
        name: str,
        context: otel_context.Context | None = None,
        kind: SpanKind = SpanKind.INTERNAL,
        attributes: types.Attributes = None,
        links: Sequence[trace.Link] | None = None,
        start_time: int | None = None,
        record_exception: bool = True,
        set_status_on_exception: bool = True,
    ) -> Span:
        parent = trace.get_current_span(context).get_span_context()
        rng = self._rng
        if parent.is_valid:
            trace_id, flags, state = parent.trace_id, parent.trace_flags, parent.trace_state
        else:
            trace_id = _ROOT_TRACE.get() or rng.getrandbits(128) or 1
            flags, state = TraceFlags(0), None
        span_id = rng.getrandbits(64) or 1
        return NonRecordingSpan(SpanContext(trace_id, span_id, False, flags, state))

    @contextlib.contextmanager
    def start_as_current_span(  # type: ignore[override]
        self,
        name: str,
        context: otel_context.Context | None = None,
        kind: SpanKind = SpanKind.INTERNAL,
        attributes: types.Attributes = None,
        links: Sequence[trace.Link] | None = None,
        start_time: int | None = None,
        record_exception: bool = True,
        set_status_on_exception: bool = True,
        end_on_exit: bool = True,
    ) -> Iterator[Span]:
        with trace.use_span(self.start_span(name, context), end_on_exit=end_on_exit) as span:
            yield span


class IdOnlyTracerProvider(trace.TracerProvider):
    """A provider whose spans record nothing but carry fresh, valid W3C ids.

    What exporter ``none`` uses: trace and span ids exist (audit records
    need them; the context propagates to the next hop, flags and trace
    state kept), nothing is collected or exported. Ids come from a
    :class:`random.Random` seeded from the OS, as the SDK's own
    ``RandomIdGenerator`` does (``random.getrandbits``).
    """

    def __init__(self) -> None:
        self._tracer = _IdOnlyTracer(random.Random())

    def get_tracer(
        self,
        instrumenting_module_name: str,
        instrumenting_library_version: str | None = None,
        schema_url: str | None = None,
        attributes: types.Attributes = None,
    ) -> trace.Tracer:
        """The (one, stateless) id-only tracer."""
        return self._tracer


#: The shared id-only provider (exporter ``none``; default when no global provider is set).
ID_ONLY = IdOnlyTracerProvider()


def resolve_provider(provider: trace.TracerProvider | None) -> trace.TracerProvider:
    """``provider``, else the global one if an application set it, else :data:`ID_ONLY`."""
    if provider is not None:
        return provider
    current = trace.get_tracer_provider()
    if isinstance(current, trace.ProxyTracerProvider | trace.NoOpTracerProvider):
        return ID_ONLY
    return current


# -- propagation ----------------------------------------------------------------------------


def extract(headers: Mapping[str, str] | None) -> otel_context.Context:
    """The remote context in NATS ``headers`` (``traceparent``, ``tracestate``); empty if none.

    The common case (a version-00 ``traceparent``, which is what every
    Signalbox hop sends) is parsed here directly: it is on every hop of the
    call path, and OpenTelemetry's propagator spends 4x as long on the same
    work (``bench/calls.py``); anything else goes to that propagator.
    ``tracestate`` is always parsed by OpenTelemetry's ``TraceState``.
    """
    if not headers:
        return otel_context.Context()
    parent = headers.get("traceparent")
    if not parent:
        return otel_context.Context()
    found = _TRACEPARENT_V00.fullmatch(parent)
    if found is None:
        return _PROPAGATOR.extract(headers, context=otel_context.Context())
    trace_id, span_id = int(found[1], 16), int(found[2], 16)
    if not trace_id or not span_id:
        return otel_context.Context()  # all-zero ids are invalid: no parent
    state_header = headers.get("tracestate")
    state = TraceState.from_header([state_header]) if state_header else None
    sc = SpanContext(trace_id, span_id, True, TraceFlags(int(found[3], 16)), state)
    return trace.set_span_in_context(NonRecordingSpan(sc), otel_context.Context())


def inject(
    headers: dict[str, str], span: Span | None = None, *, via: bool = False
) -> dict[str, str]:
    """Write ``span``'s context (default: the current span's) into ``headers``; returns them.

    Written directly in the W3C format (version 00), as :func:`extract` reads it.

    Args:
        headers: NATS headers to add ``traceparent`` (and ``tracestate``) to.
        span: The span the next hop is a child of.
        via: Also record ``span`` in the ``sb`` entry of ``tracestate``: the
            policy delivery that what the receiver does happens under.
    """
    span = span if span is not None else trace.get_current_span()
    sc = span.get_span_context()
    if not sc.is_valid:
        return headers
    headers["traceparent"] = f"00-{sc.trace_id:032x}-{sc.span_id:016x}-{sc.trace_flags:02x}"
    state = sc.trace_state
    if via:
        # Ours first (W3C: an updated entry moves to the front), the others kept.
        own = f"{STATE_KEY}={sc.span_id:016x}"
        rest = state.to_header() if state else ""
        if rest and STATE_KEY in state:
            rest = ",".join(f"{k}={v}" for k, v in state.items() if k != STATE_KEY)
        headers["tracestate"] = f"{own},{rest}" if rest else own
    elif state:
        headers["tracestate"] = state.to_header()
    return headers


def hex_ids(span: Span) -> tuple[str, str]:
    """``(trace id, span id)`` of ``span`` in W3C hex (``("", "")`` for an invalid span)."""
    sc = span.get_span_context()
    if not sc.is_valid:
        return "", ""
    return f"{sc.trace_id:032x}", f"{sc.span_id:016x}"


def _via_of(sc: SpanContext) -> str:
    state = sc.trace_state
    value = state.get(STATE_KEY, "") if state else ""
    return value if _SPAN_HEX.fullmatch(value) else ""


def parent_ids(parent: otel_context.Context) -> tuple[str, str]:
    """``(span id, via span id)`` of the span in ``parent`` (``""`` when absent): what a
    span started from that context records as its parent and via (see :class:`AuditIds`)."""
    sc = trace.get_current_span(parent).get_span_context()
    if not sc.is_valid:
        return "", ""
    return f"{sc.span_id:016x}", _via_of(sc)


@dataclass(frozen=True, slots=True)
class AuditIds:
    """Where an audit record sits in its trace (W3C hex; ``""`` when unknown).

    Attributes:
        trace_id: The trace.
        span_id: The span of the hop that emitted the record.
        parent_span_id: That span's parent (often another process's span).
        via_span_id: The policy delivery span the hop happened under, if any.
    """

    trace_id: str
    span_id: str
    parent_span_id: str = ""
    via_span_id: str = ""


def current_ids() -> AuditIds | None:
    """The ids of the current hop (see :meth:`Telemetry.hop`), or None outside any span."""
    span = trace.get_current_span()
    sc = span.get_span_context()
    if not sc.is_valid:
        return None
    return AuditIds(
        f"{sc.trace_id:032x}",
        f"{sc.span_id:016x}",
        _PARENT.get(),
        _via_of(sc),  # the trace state rides along from the parent
    )


def current_trace_id() -> str:
    """The current span's trace id in hex, ``""`` outside any span."""
    sc = trace.get_current_span().get_span_context()
    return f"{sc.trace_id:032x}" if sc.is_valid else ""


# -- spans ----------------------------------------------------------------------------------


def is_recording(span: Span) -> bool:
    """True when attributes set on ``span`` go anywhere (skip building them otherwise)."""
    return span.is_recording()


def annotate(span: Span, attributes: Mapping[str, Any] | Callable[[], Mapping[str, Any]]) -> None:
    """Set ``attributes`` on ``span`` if it records (a callable is only called then).

    ``None`` and empty values are left out; sequences become tuples of strings.
    """
    if not span.is_recording():
        return
    values = attributes() if callable(attributes) else attributes
    for key, value in values.items():
        if value is None or value == "" or value == ():
            continue
        if isinstance(value, list | tuple):
            span.set_attribute(key, tuple(str(v) for v in value))
        else:
            span.set_attribute(key, value)


def fail(span: Span, code: str, message: str = "") -> None:
    """Mark ``span`` as failed with a Signalbox error ``code`` (if it records)."""
    if span.is_recording():
        span.set_attribute(ATTR["error"], code)
        span.set_status(Status(StatusCode.ERROR, message or code))


def agent_attributes(record: AgentRecord | None, role: str = "") -> dict[str, Any]:
    """Name, version and team of an agent's registry record as span attributes.

    ``role`` (``caller``, ``target``) prefixes the keys, for spans that
    concern two agents: ``signalbox.caller.version``...
    """
    if record is None:
        return {}
    m = record.manifest
    if not role:
        return {ATTR["agent"]: m.name, ATTR["version"]: m.version, ATTR["team"]: m.team}
    base = f"signalbox.{role}"
    return {base: m.name, f"{base}.version": m.version, f"{base}.team": m.team}


def decision_attributes(decision: Decision) -> dict[str, Any]:
    """Effect, reason code, policy ids and policy-set version of ``decision``."""
    return {
        ATTR["effect"]: decision.effect,
        ATTR["reason"]: decision.reason_code,
        ATTR["policy_ids"]: decision.policy_ids,
        ATTR["policy_version"]: decision.policy_version,
    }


class Telemetry:
    """The tracer of one component (a service, an agent) and its hops.

    Args:
        name: Instrumentation scope (``signalbox.policy``, ``signalbox.agent``).
        provider: Tracer provider (default: :func:`resolve_provider`).
    """

    def __init__(self, name: str, provider: trace.TracerProvider | None = None) -> None:
        self.name = name
        self.provider = resolve_provider(provider)
        self.tracer = self.provider.get_tracer(name)

    def start(
        self,
        name: str,
        *,
        parent: otel_context.Context | None = None,
        kind: SpanKind = SpanKind.INTERNAL,
    ) -> Span:
        """Start (and not make current) a span, child of ``parent`` (default: the current span).

        The caller ends it (``span.end()``).
        """
        return self.tracer.start_span(name, context=parent, kind=kind)

    @contextlib.contextmanager
    def hop(
        self,
        name: str,
        headers: Mapping[str, str] | None = None,
        *,
        kind: SpanKind = SpanKind.SERVER,
        parent: otel_context.Context | None = None,
        links: Sequence[trace.Link] | None = None,
    ) -> Iterator[Span]:
        """Run a hop in a span: child of the context in ``headers`` (or ``parent``), current
        while the block runs (so spans started inside are its children and
        :func:`current_ids` sees it), ended on exit (failed if the block raises).
        """
        if parent is None:
            parent = extract(headers) if headers is not None else otel_context.get_current()
        parent_sc = trace.get_current_span(parent).get_span_context()
        span = self.tracer.start_span(name, context=parent, kind=kind, links=links)
        token = otel_context.attach(trace.set_span_in_context(span, parent))
        parent_token = _PARENT.set(f"{parent_sc.span_id:016x}" if parent_sc.is_valid else "")
        try:
            yield span
        except BaseException as exc:
            if isinstance(exc, SignalboxError):
                fail(span, exc.code, exc.message)
            elif span.is_recording():
                span.record_exception(exc)
                span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
            raise
        finally:
            _PARENT.reset(parent_token)
            otel_context.detach(token)
            span.end()

    @property
    def owns_ids(self) -> bool:
        """Whether this provider starts a root span with the trace id asked for
        (:data:`ID_ONLY`, or an SDK provider with :class:`OwnedTraceIds`)."""
        if isinstance(self.provider, IdOnlyTracerProvider):
            return True
        generator = getattr(self.provider, "id_generator", None)
        return bool(getattr(generator, "signalbox_owned_ids", False))

    @contextlib.contextmanager
    def owned_hop(
        self,
        name: str,
        agent: str,
        *,
        kind: SpanKind = SpanKind.CLIENT,
        parent: otel_context.Context | None = None,
    ) -> Iterator[tuple[Span, str]]:
        """Run a hop that starts a trace ``agent`` owns; yields the span and the origin to send
        as ``Sb-Trace-Origin``.

        The origin is the application's trace (``parent``, default: the current
        span) when there is one, and the new span links to it; else random.
        With a provider that cannot be told the trace id (an application's own,
        without :class:`OwnedTraceIds`), the span is a child of a stand-in
        parent in the owned trace instead of a root.
        """
        context = parent if parent is not None else otel_context.get_current()
        app = trace.get_current_span(context).get_span_context()
        origin = f"{app.trace_id:032x}" if app.is_valid else os.urandom(16).hex()
        trace_id = int(owned_trace_id(agent, origin), 16)
        links = [trace.Link(app)] if app.is_valid else None
        if self.owns_ids:
            start_in = otel_context.Context()  # a root, with the owned trace id
        else:
            stand_in = SpanContext(
                trace_id, int.from_bytes(os.urandom(8)) or 1, True, TraceFlags(1)
            )
            start_in = trace.set_span_in_context(NonRecordingSpan(stand_in), otel_context.Context())
        # Only the span's start reads it: reset before the block runs.
        token = _ROOT_TRACE.set(trace_id)
        started = False
        try:
            with self.hop(name, kind=kind, parent=start_in, links=links) as span:
                _ROOT_TRACE.reset(token)
                started = True
                yield span, origin
        finally:
            if not started:
                _ROOT_TRACE.reset(token)
