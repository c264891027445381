"""The policy service's relay: allowed calls forwarded to their target, replies relayed back.

An allowed call is forwarded only once its decision is stored
(write-ahead, docs/decisions.md 29): :meth:`CallRelay.forward_when_stored`
runs in a task per call (nats-py runs a subscription's callbacks one after
the other, and calls waiting together share one JetStream write). The
relay sends it to ``sb.in.<target>.<capability>[.<version>]`` with a reply
subject of its own, keeps it pending until the target answers or its
timeout expires, relays the answer (or a structured error: "nobody
listening", ``outcome_unknown``) to the caller's inbox, and audits the
outcome (kind ``call``) with its delivery span (``sb.delivery``, and
``sb.reply`` for the relayed answer).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind

from broker.errors import AuditUnavailable, OutcomeUnknown, SignalboxError, TargetUnavailable
from broker.replies import (
    H_CALL_ID,
    H_CALLER,
    H_CAPABILITY,
    H_CHAIN,
    H_CHAIN_SIG,
    H_DEADLINE,
    H_ERROR,
    H_IDEMPOTENCY_KEY,
    error_reply,
)
from broker.runtime.desk import ServiceHost
from broker.telemetry import ATTR, agent_attributes, annotate, extract, fail, hex_ids, inject
from schemas import AgentRecord, ApprovalRequest, CallOutcome
from services.policy.approvals import Parked
from services.policy.breaker_gate import NO_GATE, CallGate, Probes
from services.policy.deadlines import allowed_timeout
from services.policy.stats import PolicyStats

__all__ = ["CallRelay", "PendingCall"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class AllowedCall:
    """An allowed call on its way to its target: what to send, and where to answer.

    Attributes:
        reply: The caller's reply subject (checked to be in its reply space at intake).
        payload: The request body, as the caller sent it.
        headers: The caller's headers (read for its version pin, deadline, trace
            context and idempotency key; not passed on as they are).
        call_id: The id the decision was recorded under.
        caller: The calling agent (from its subject, never a header).
        target: The agent called.
        capability: The capability called.
        trace_id: The trace the decision and the outcome are recorded in.
    """

    reply: str
    payload: bytes
    headers: dict[str, str]
    call_id: str
    caller: str
    target: str
    capability: str
    trace_id: str


@dataclass(slots=True)
class PendingCall:
    """A forwarded call waiting for its target's answer."""

    reply: str
    call_id: str
    caller: str
    target: str
    capability: str
    trace_id: str
    started: float
    request_bytes: int
    timer: asyncio.TimerHandle
    #: The delivery span (sb.delivery) and its parent's id (the decision span).
    span: Span | None = None
    parent_span_id: str = ""
    #: Half-open breakers this call probes, as (key, call id); and its timeout.
    probes: Probes = ()
    timeout: float = 0.0
    #: The target version a route or a pin chose ("" for any).
    version: str = ""
    #: The caller's idempotency key ("" for none).
    idempotency_key: str = ""


class CallRelay:
    """Forwards allowed calls (once their decision is stored), relays the answers.

    Args:
        host: The service it lives in (connection, audit, settings, spans).
        stats: The service's counters (``allowed``, ``ok``, ``errors``, ``timeouts``...).
        resolve_version: The version of a target a call goes to, from its route or the
            caller's pin ("" for any; :meth:`RouteDesk.resolve`).
        record_version: Counts a routed call's outcome for its canary guard
            (target, version, error code, latency ms, seconds the caller allowed).
        record_breaker_outcome: Feeds an outcome to the breakers' detectors and settles
            the probes the call made (target, error code, seconds allowed, probes).
        release_probes: Releases probes unjudged (the call was not forwarded).
        sign_chain: ``Sb-Chain-Sig`` of a forwarded chain (target, chain, timeout,
            delivery span, trace id; "" without a key).
        target_record: The registry's record of an agent, if cached (span attributes).
    """

    def __init__(
        self,
        host: ServiceHost,
        stats: PolicyStats,
        *,
        resolve_version: Callable[[str, dict[str, str]], str],
        record_version: Callable[[str, str, str, float, float], None],
        record_breaker_outcome: Callable[[str, str, float, Probes], None],
        release_probes: Callable[[Probes], None],
        sign_chain: Callable[[str, str, float, Span, str], str],
        target_record: Callable[[str], AgentRecord | None],
    ) -> None:
        self._host = host
        self._stats = stats
        self._resolve_version = resolve_version
        self._record_version = record_version
        self._record_breaker_outcome = record_breaker_outcome
        self._release_probes = release_probes
        self._sign_chain = sign_chain
        self._target_record = target_record
        self._pending: dict[str, PendingCall] = {}
        self._next = 0
        self._inbox = ""
        self._reply_sub: Subscription | None = None
        self._drained = asyncio.Event()  # set when the last pending call settles

    async def start(self) -> None:
        """Subscribe the relay's reply inbox."""
        nc = self._host.nc
        self._inbox = nc.new_inbox()
        self._reply_sub = await nc.subscribe(
            f"{self._inbox}.*", cb=self._on_reply, pending_msgs_limit=1_000_000
        )

    async def drain(self, timeout: float) -> None:
        """Wait (at most ``timeout`` seconds) for every pending call to be answered or expire."""
        if self._pending:
            self._drained.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._drained.wait(), timeout)

    async def stop(self) -> None:
        """Stop relaying (answers arriving later are dropped)."""
        if self._reply_sub is not None:
            with contextlib.suppress(Exception):
                await self._reply_sub.unsubscribe()

    # -- write-ahead -------------------------------------------------------------------

    async def forward_when_stored(
        self, record: dict[str, Any], call: AllowedCall, timeout: float, gate: CallGate
    ) -> None:
        """Forward an allowed call once its decision record is stored (write-ahead)."""
        started = time.monotonic()
        if not await self.write_ahead(record, call, timeout, gate):
            return
        self._stats.allowed += 1
        await self.forward(call, timeout - (time.monotonic() - started), gate=gate)

    async def write_ahead(
        self, record: dict[str, Any], call: AllowedCall, timeout: float, gate: CallGate
    ) -> bool:
        """Store an allowed call's decision record before it is forwarded; False: it could
        not be stored in time, so the call was refused unrun (answered ``audit_unavailable``,
        the refusal recorded as the call's outcome)."""
        host = self._host
        wait = min(timeout, host.settings.write_ahead_timeout)
        try:
            await host.audit.write_ahead("decision", timeout=wait, **record)
            return True
        except TimeoutError:
            pass
        self._stats.audit_unavailable += 1
        data = record["data"]
        err = AuditUnavailable(
            f"the decision on this call to {data['target']}.{data['capability']} could not be "
            f"stored within {wait:g}s (is JetStream up?); not forwarded, safe to retry",
            details={"target": data["target"], "capability": data["capability"]},
        )
        body, headers = error_reply(err)
        await host.nc.publish(call.reply, body, headers=headers)
        if gate.probes:
            self._release_probes(gate.probes)
        outcome = CallOutcome(
            call_id=call.call_id, caller=data["caller"], target=data["target"],
            capability=data["capability"], ok=False, latency_ms=wait * 1000,
            error_code=err.code,
        )  # fmt: skip
        await host.audit.emit(
            "call", actor=data["caller"], subject=record["subject"],
            trace_id=record["trace_id"], data=outcome,
        )  # fmt: skip
        return False

    async def forward_approved(self, parked: Parked, record: ApprovalRequest) -> None:
        """Forward a parked call an operator approved, as an allowed call; audit the use
        (written ahead, as every allowed call's decision)."""
        self._stats.allowed += 1
        self._stats.approved += 1
        decided = {
            "actor": record.caller,
            "subject": parked.subject,
            "trace_id": parked.trace_id,
            "policy_version": record.policy_version,
            "data": {
                "call_id": record.call_id, "caller": record.caller, "target": record.target,
                "capability": record.capability, "approval_id": record.id,
                "approved_by": record.decided_by, "binding": record.binding,
                "decision": {
                    "effect": "allow", "reason_code": "approved",
                    "reasons": [f"approved by {record.decided_by or 'an operator'}"
                                + (f": {record.reason}" if record.reason else "")],
                    "policy_ids": list(record.policy_ids),
                    "policy_version": record.policy_version,
                },
            },
        }  # fmt: skip
        call = AllowedCall(
            parked.reply, parked.data, parked.headers, record.call_id, record.caller,
            record.target, record.capability, parked.trace_id,
        )  # fmt: skip
        settings = self._host.settings
        remaining = min(parked.deadline - time.time(), settings.call_timeout)
        if settings.write_ahead:
            started = time.monotonic()
            if not await self.write_ahead(decided, call, max(remaining, 0.001), NO_GATE):
                return
            remaining -= time.monotonic() - started
        else:
            await self._host.audit.emit("decision", **decided)
        await self.forward(call, max(remaining, 0.001))

    # -- forwarding and relaying ---------------------------------------------------------

    async def forward(self, call: AllowedCall, timeout: float, *, gate: CallGate = NO_GATE) -> None:
        """Send an allowed call to ``sb.in.<target>.<capability>[.<version>]``; relay its reply.

        The version comes from the target's route or the caller's pin
        (:meth:`RouteDesk.resolve`), else the established one of several versions; with
        a single version, any instance takes it.
        """
        host = self._host
        headers, target, capability = call.headers, call.target, call.capability
        try:
            version = self._resolve_version(target, headers)
        except SignalboxError as err:
            body, refused = error_reply(err)
            await host.nc.publish(call.reply, body, headers=refused)
            await host.reject(
                err, subject=host.subjects.inbound(target, capability), actor=call.caller
            )
            return
        self._next += 1
        token = str(self._next)
        loop = asyncio.get_running_loop()
        span, parent_span_id = self._delivery_span(headers, call.call_id, target, capability)
        self._pending[token] = PendingCall(
            reply=call.reply,
            call_id=call.call_id,
            caller=call.caller,
            target=target,
            capability=capability,
            trace_id=call.trace_id,
            started=time.perf_counter(),
            request_bytes=len(call.payload),
            timer=loop.call_later(timeout, self._expire, token),
            span=span,
            parent_span_id=parent_span_id,
            probes=gate.probes,
            # What the caller allowed, for the breaker's fairness rule (guards): the
            # timer runs on what is left of its deadline, a little less after transit.
            timeout=allowed_timeout(headers, host.settings.call_timeout, timeout),
            version=version,
            idempotency_key=headers.get(H_IDEMPOTENCY_KEY, ""),
        )
        forward = {
            H_CALL_ID: call.call_id,
            H_CALLER: call.caller,
            H_CAPABILITY: capability,
            # Microseconds: rounding to ms could put the deadline past the timeout.
            H_DEADLINE: f"{time.time() + timeout:.6f}",
        }
        if self._pending[token].idempotency_key:  # checked at intake (PolicyService._on_call)
            forward[H_IDEMPOTENCY_KEY] = self._pending[token].idempotency_key
        # W3C trace context of the delivery span (the caller's own is not passed on).
        inject(forward, span, via=True)
        if gate.chain:
            forward[H_CHAIN] = gate.chain
            signature = self._sign_chain(target, gate.chain, timeout, span, call.trace_id)
            if signature:
                forward[H_CHAIN_SIG] = signature
        await host.nc.publish(
            host.subjects.inbound_version(target, capability, version)
            if version
            else host.subjects.inbound(target, capability),
            call.payload,
            reply=f"{self._inbox}.{token}",
            headers=forward,
        )

    async def _on_reply(self, msg: Msg) -> None:
        token = msg.subject[len(self._inbox) + 1 :]
        pending = self._pending.pop(token, None)
        if pending is None:
            self._stats.late_replies += 1  # the caller was already told it timed out
            return
        if not self._pending:
            self._drained.set()
        pending.timer.cancel()
        headers = msg.headers
        relay_headers: dict[str, str] | None
        if headers and headers.get("Status") == "503":
            body, relay_headers = error_reply(
                TargetUnavailable(
                    f"{pending.target} is registered but no instance serves "
                    f"{pending.capability!r} right now; start the agent and retry",
                    details={"target": pending.target, "capability": pending.capability},
                )
            )
        else:
            # No headers stays None: an empty dict still sends a header block.
            body, relay_headers = msg.data, headers or None
        relay = self._reply_span(pending)
        await self._host.nc.publish(pending.reply, body, headers=relay_headers)
        if relay is not None:
            relay.end()
        await self._outcome(pending, relay_headers, len(body))

    def _expire(self, token: str) -> None:
        pending = self._pending.pop(token, None)
        if pending is None:
            return
        if not self._pending:
            self._drained.set()
        self._stats.timeouts += 1
        details: dict[str, Any] = {"target": pending.target, "capability": pending.capability}
        retry = "do not retry blindly: it may run twice"
        if pending.idempotency_key:
            details["idempotency_key"] = pending.idempotency_key
            retry = f"retrying with idempotency key {pending.idempotency_key!r} is safe"
        err = OutcomeUnknown(
            f"{pending.target}.{pending.capability} was forwarded and did not answer in "
            f"time: it may have run; {retry}",
            details=details,
        )
        body, headers = error_reply(err)
        task = asyncio.ensure_future(self._send_expiry(pending, body, headers))
        task.add_done_callback(_log_failure)

    async def _send_expiry(
        self, pending: PendingCall, body: bytes, headers: dict[str, str]
    ) -> None:
        await self._host.nc.publish(pending.reply, body, headers=headers)
        await self._outcome(pending, headers, 0)

    async def _outcome(
        self, p: PendingCall, headers: dict[str, str] | None, reply_bytes: int
    ) -> None:
        error_code = headers.get(H_ERROR, "") if headers else ""
        if error_code:
            self._stats.errors += 1
        else:
            self._stats.ok += 1
        self._record_breaker_outcome(p.target, error_code, p.timeout, p.probes)
        latency_ms = (time.perf_counter() - p.started) * 1000
        if p.version:
            self._record_version(p.target, p.version, error_code, latency_ms, p.timeout)
        outcome = CallOutcome(
            call_id=p.call_id,
            caller=p.caller,
            target=p.target,
            capability=p.capability,
            ok=not error_code,
            latency_ms=latency_ms,
            error_code=error_code,
            request_bytes=p.request_bytes,
            reply_bytes=reply_bytes,
            version=p.version,
        )
        span_id = self._end_delivery(p, error_code)
        await self._host.audit.emit(
            "call",
            actor=p.caller,
            subject=self._host.subjects.inbound(p.target, p.capability),
            trace_id=p.trace_id,
            span_id=span_id,
            parent_span_id=p.parent_span_id,
            data=outcome,
        )

    # -- spans (broker.telemetry) ---------------------------------------------------------

    def _delivery_span(
        self, headers: dict[str, str], call_id: str, target: str, capability: str
    ) -> tuple[Span, str]:
        """Start ``sb.delivery``: child of the decision span, else (an approved call,
        forwarded later) of the caller's span in ``headers``; returns it and its parent's id."""
        current = trace.get_current_span()
        parent = None if current.get_span_context().is_valid else extract(headers)
        parent_span = current if parent is None else trace.get_current_span(parent)
        span = self._host.telemetry.start("sb.delivery", parent=parent, kind=SpanKind.CLIENT)
        annotate(span, lambda: {
            ATTR["call_id"]: call_id, ATTR["target"]: target, ATTR["capability"]: capability,
            **agent_attributes(self._target_record(target), "target"),
            ATTR["system"]: "nats",
            ATTR["destination"]: self._host.subjects.inbound(target, capability),
        })  # fmt: skip
        return span, hex_ids(parent_span)[1]

    def _reply_span(self, p: PendingCall) -> Span | None:
        """Start ``sb.reply`` (the target's answer relayed to the caller), child of the
        delivery; only when spans record (its id is neither audited nor propagated)."""
        if p.span is None or not p.span.is_recording():
            return None
        parent = trace.set_span_in_context(p.span)
        return self._host.telemetry.start("sb.reply", parent=parent, kind=SpanKind.PRODUCER)

    def _end_delivery(self, p: PendingCall, error_code: str) -> str:
        """End the delivery span of ``p`` (failed on an error reply); returns its span id."""
        if p.span is None:
            return ""
        if error_code:
            fail(p.span, error_code)
        p.span.end()
        return hex_ids(p.span)[1]


def _log_failure(task: asyncio.Future[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("policy: failed to send a timeout reply: %r", task.exception())
