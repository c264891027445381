"""Human approvals: calls whose decision is ``needs_approval`` wait for an operator.

A call the policy set answers ``needs_approval`` (an ``@effect("needs_approval")``
forbid stands alone in its way) is *parked* by the policy replica that
received it, not refused::

    A --sb.out.A.B.cap--> policy: needs_approval
                           |- KV sb_approvals <id> = ApprovalRequest (pending)
                           |- publish sb.approvals.requested, audit decision
                           '- wait (watching the bucket)
    operator --sb.admin.approvals.approve {id}--> any policy replica
                           '- compare-and-set pending -> approved (audited)
    parking replica sees "approved": compare-and-set approved -> used,
    forwards the call to sb.in.B.cap as an allowed one and relays B's reply.

Denied (``deny``) or no decision before ``expires_at``: the caller gets
:class:`~broker.errors.CallDenied` with ``details['reason_code']``
``approval_denied`` / ``approval_expired`` and the ``approval_id``.

Guarantees:

* **Bound to the call.** The request carries :func:`binding_hash` of caller,
  target, capability and the payload bytes; the parking replica forwards only
  the call it parked, and only if the stored binding is still its own. A
  second call, identical or not, is parked under a new id: an approval is
  never reused.
* **Exactly once.** Every status change is a compare-and-set on the KV
  entry's revision: of two operators deciding at once one wins, the other
  gets ``conflict``; ``approved -> used`` happens once.
* **Deny by default.** ``expires_at`` is the caller's deadline (less a
  margin so that the refusal reaches it before its own timeout), capped by
  ``SIGNALBOX_APPROVAL_TIMEOUT``. If the KV bucket cannot be written, the call
  is refused at once.
* **Durable.** Requests live in the KV bucket (they outlive a replica restart
  and are listed with their final status). A parked call itself lives in the
  memory of its replica: if that replica dies, the caller's SDK times out
  (``CallTimeout``) and the request can no longer be used; once past its
  expiry it is listed as ``expired``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec
from nats.aio.msg import Msg
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from broker.codec import decode, encode
from broker.diagnostics import cancel_and_wait
from broker.errors import CallDenied, Conflict, NotFound, SchemaError
from broker.replies import error_reply
from broker.runtime.desk import EndpointSpec, ServiceHost, declare_endpoint
from broker.runtime.jetstream import KV_APPROVALS, bucket_keys
from broker.telemetry import inject
from schemas import (
    ApprovalList,
    ApprovalRequest,
    ApprovalStatus,
    DecideApproval,
    Decision,
    ListApprovals,
)
from services.policy.deadlines import requested_timeout
from services.policy.stats import PolicyStats

#: Forwards a parked call an operator approved (the policy service's relay).
Forward = Callable[["Parked", ApprovalRequest], Awaitable[None]]

__all__ = [
    "MAX_PARKED",
    "ApprovalDesk",
    "Parked",
    "binding_hash",
    "expiry_margin",
    "requested_subject",
]

log = logging.getLogger(__name__)

#: Calls one replica holds parked at most (each keeps its payload in memory);
#: beyond, a call needing approval is refused at once (``approval_unavailable``).
MAX_PARKED = 1_000


def binding_hash(caller: str, target: str, capability: str, payload: bytes) -> str:
    """SHA-256 hex binding an approval to one call.

    Each part is length-prefixed, so no two different calls share a hash by
    shifting bytes between fields.
    """
    digest = hashlib.sha256(b"signalbox-approval-v1")
    for part in (caller.encode(), target.encode(), capability.encode(), payload):
        digest.update(len(part).to_bytes(8, "big"))
        digest.update(part)
    return digest.hexdigest()


def expiry_margin(timeout: float) -> float:
    """How long before the caller's own deadline a parked call is refused.

    The refusal (``approval_expired``) must reach the caller before its SDK
    gives up: a tenth of its timeout, at most one second.
    """
    return min(1.0, timeout / 10)


def requested_subject(prefix: str) -> str:
    """Where new approval requests are published (``sb.approvals.requested``)."""
    return f"{prefix}.approvals.requested"


@dataclass(slots=True)
class Parked:
    """A call waiting for an operator on this replica."""

    record: ApprovalRequest
    reply: str
    data: bytes
    headers: dict[str, str]
    subject: str
    trace_id: str
    decision: Decision
    #: Caller's deadline less the reply margin (Unix time): bounds the forwarded call.
    deadline: float
    timer: asyncio.TimerHandle | None = None
    settled: bool = field(default=False)


class ApprovalDesk:
    """Parks calls, watches ``sb_approvals`` and answers ``sb.admin.approvals.<op>``.

    Args:
        service: The service it lives in (connection, audit, subjects, settings).
        forward: Sends an approved call on, as an allowed call.
        stats: The service's counters (``parked``, ``denied``).
    """

    def __init__(
        self,
        service: ServiceHost,
        *,
        forward: Forward,
        stats: PolicyStats,
    ) -> None:
        self.service = service
        #: The ``sb_approvals`` bucket (after start).
        self.kv: KeyValue
        self._forward = forward
        self._stats = stats
        self.parked: dict[str, Parked] = {}
        self.max_parked = MAX_PARKED
        self._watch: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def endpoints(self) -> Sequence[EndpointSpec[Any]]:
        """``sb.admin.approvals.<op>``."""
        admin = self.service.subjects.admin
        return (
            declare_endpoint(admin("approvals", "list"), ListApprovals, self.list),
            declare_endpoint(admin("approvals", "approve"), DecideApproval, self.approve),
            declare_endpoint(admin("approvals", "deny"), DecideApproval, self.deny),
        )

    async def start(self) -> None:
        """Open the bucket and start watching it (updates only matter for calls parked here)."""
        self.kv = await self.service.js.key_value(KV_APPROVALS)
        watcher = await self.kv.watch(">", include_history=False, ignore_deletes=True)
        self._watch = asyncio.ensure_future(self._watching(watcher))

    async def stop(self) -> None:
        """Refuse every call still parked here (its caller would otherwise wait), stop watching."""
        for parked in list(self.parked.values()):
            await self._expire(parked, why="the policy replica holding it stopped")
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=5)
        await cancel_and_wait(self._watch, "the approvals watch")
        self._watch = None

    # -- parking -------------------------------------------------------------------------

    async def park_call(
        self,
        msg: Msg,
        call_id: str,
        approval_id: str,
        caller: str,
        target: str,
        capability: str,
        trace_id: str,
        decision: Decision,
    ) -> None:
        """Park the call ``msg`` (answered ``needs_approval`` by ``decision``) until an
        operator decides, at most until just before the caller's deadline."""
        headers = msg.headers or {}
        now = time.time()
        settings = self.service.settings
        waits = requested_timeout(headers, settings.call_timeout)
        expires_in = min(waits - expiry_margin(waits), settings.approval_timeout)
        record = ApprovalRequest(
            id=approval_id, call_id=call_id, caller=caller, target=target,
            capability=capability,
            binding=binding_hash(caller, target, capability, msg.data),
            requested_at=now, expires_at=now + expires_in,
            policy_ids=decision.policy_ids, policy_version=decision.policy_version,
            reasons=decision.reasons,
        )  # fmt: skip
        parked = Parked(
            # (traceparent: the decision span, parent of the delivery once approved)
            record=record, reply=msg.reply, data=msg.data, headers=inject(dict(headers)),
            subject=msg.subject, trace_id=trace_id, decision=decision,
            deadline=now + waits - expiry_margin(waits),
        )  # fmt: skip
        await self.park(parked, expires_in)

    async def park(self, parked: Parked, expires_in: float) -> None:
        """Store, publish and wait for a decision on ``parked`` (answers the caller later).

        Fails closed: if the request cannot be stored, the caller is refused now.
        """
        record = parked.record
        if len(self.parked) >= self.max_parked:
            await self._refuse(
                parked,
                "approval_unavailable",
                f"{len(self.parked)} calls already wait for approval on this policy replica "
                "(the limit), so it is refused; decide or let expire the pending ones "
                "(`signalbox approvals list`) and retry",
            )
            return
        self.parked[record.id] = parked
        try:
            await self.kv.create(record.id, encode(record))
        except Exception as exc:  # any storage failure refuses the call
            log.error("policy: cannot store approval request %s: %r", record.id, exc)
            self.parked.pop(record.id, None)
            await self._refuse(
                parked,
                "approval_unavailable",
                "its approval request could not be stored, so it is refused",
            )
            return
        self._stats.parked += 1
        loop = asyncio.get_running_loop()
        # The coroutine is made when the timer fires: one made now and never
        # run (the timer cancelled on a decision) would leak a warning.
        parked.timer = loop.call_later(expires_in, lambda: self._spawn(self._expire(parked)))
        await self.service.nc.publish(
            requested_subject(self.service.subjects.prefix), encode(record)
        )

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("policy: approval handling failed: %r", task.exception())

    async def _watching(self, watcher: Any) -> None:
        try:
            async for entry in watcher:
                if entry is None or not entry.value or entry.key not in self.parked:
                    continue
                try:
                    record = decode(entry.value, ApprovalRequest)
                except SchemaError as err:
                    await self.service.reject(err, subject=f"$KV.{KV_APPROVALS}.{entry.key}")
                    continue
                await self._changed(record, entry.revision)
        finally:
            with contextlib.suppress(Exception):
                await watcher.stop()

    async def _changed(self, record: ApprovalRequest, revision: int) -> None:
        parked = self.parked.get(record.id)
        if parked is None or parked.settled:
            return
        if record.status == "approved":
            if record.binding != parked.record.binding or record.caller != parked.record.caller:
                # Someone rewrote the entry: never let another call through.
                await self._refuse(parked, "approval_denied", "its approval does not match it")
                return
            used = msgspec.structs.replace(record, status="used", used_at=time.time())
            try:
                await self.kv.update(record.id, encode(used), last=revision)
            except KeyWrongLastSequenceError:
                return  # changed again meanwhile: the watch brings the newer state
            self._settle(parked)
            await self._forward(parked, used)
        elif record.status == "denied":
            self._settle(parked)
            by = f" by {record.decided_by}" if record.decided_by else ""
            why = f": {record.reason}" if record.reason else ""
            await self._refuse(parked, "approval_denied", f"approval was denied{by}{why}")
        elif record.status == "expired":
            self._settle(parked)
            await self._refuse(parked, "approval_expired", record.reason or _expired_text(record))

    async def _expire(self, parked: Parked, why: str = "") -> None:
        """Deadline reached: compare-and-set pending -> expired, then refuse the call."""
        if parked.settled:
            return
        record_id = parked.record.id
        try:
            entry = await self.kv.get(record_id)
            current = decode(entry.value or b"", ApprovalRequest)
            if current.status != "pending":
                # Decided meanwhile (the watch may not have brought it yet).
                await self._changed(current, entry.revision or 0)
                return
            expired = msgspec.structs.replace(
                current, status="expired", decided_at=time.time(), reason=why
            )
            await self.kv.update(record_id, encode(expired), last=entry.revision)
        except KeyWrongLastSequenceError:
            return  # decided at the last moment: the watch brings it
        except Exception as exc:  # the caller is refused whatever the KV says
            log.warning("policy: could not mark approval %s expired: %r", record_id, exc)
        if not parked.settled:
            self._settle(parked)
            await self._refuse(parked, "approval_expired", why or _expired_text(parked.record))

    def _settle(self, parked: Parked) -> None:
        parked.settled = True
        if parked.timer is not None:
            parked.timer.cancel()
        self.parked.pop(parked.record.id, None)

    async def _refuse(self, parked: Parked, reason_code: str, why: str) -> None:
        record = parked.record
        self._stats.denied += 1
        err = CallDenied(
            f"call {record.caller} -> {record.target}.{record.capability} needs human "
            f"approval (request {record.id}): {why}",
            details={
                "effect": "needs_approval",
                "reason_code": reason_code,
                "approval_id": record.id,
                "reasons": list(parked.decision.reasons),
                "policy_ids": list(parked.decision.policy_ids),
                "policy_version": parked.decision.policy_version,
            },
        )
        body, headers = error_reply(err)
        await self.service.nc.publish(parked.reply, body, headers=headers)
        await self.service.audit.emit(
            "decision",
            actor=record.caller,
            subject=parked.subject,
            trace_id=parked.trace_id,
            policy_version=parked.decision.policy_version,
            data={
                "call_id": record.call_id, "caller": record.caller, "target": record.target,
                "capability": record.capability, "approval_id": record.id,
                "decision": {
                    "effect": "deny", "reason_code": reason_code, "reasons": [why],
                    "policy_ids": list(parked.decision.policy_ids),
                    "policy_version": parked.decision.policy_version,
                },
            },
        )  # fmt: skip

    # -- operators ------------------------------------------------------------------------

    async def list(self, request: ListApprovals) -> ApprovalList:
        """``list``: pending requests (``all``: every stored one), newest first."""
        keys = await bucket_keys(self.service.js, KV_APPROVALS)
        now = time.time()
        found: list[ApprovalRequest] = []
        for key in keys:
            try:
                entry = await self.kv.get(key)
                record = decode(entry.value or b"", ApprovalRequest)
            except (KeyNotFoundError, SchemaError):
                continue
            if record.status == "pending" and record.expires_at <= now:
                record = msgspec.structs.replace(record, status="expired")
            if request.all or record.status == "pending":
                found.append(record)
        found.sort(key=lambda r: r.requested_at, reverse=True)
        return ApprovalList(approvals=tuple(found[: request.limit]))

    async def approve(self, request: DecideApproval) -> ApprovalRequest:
        """``approve``: pending -> approved (compare-and-set; audited)."""
        return await self._decide(request, "approved")

    async def deny(self, request: DecideApproval) -> ApprovalRequest:
        """``deny``: pending -> denied (compare-and-set; audited)."""
        return await self._decide(request, "denied")

    async def _decide(self, request: DecideApproval, status: ApprovalStatus) -> ApprovalRequest:
        try:
            entry = await self.kv.get(request.id)
        except KeyNotFoundError:
            raise NotFound(
                f"no approval request {request.id}; `signalbox approvals list --all` shows them",
                details={"id": request.id},
            ) from None
        record = decode(entry.value or b"", ApprovalRequest)
        details: dict[str, Any] = {"id": record.id, "status": record.status}
        if record.status != "pending":
            by = f" by {record.decided_by}" if record.decided_by else ""
            raise Conflict(f"approval request {record.id} is already {record.status}{by}",
                           details={**details, "decided_by": record.decided_by})  # fmt: skip
        now = time.time()
        if record.expires_at <= now:
            raise Conflict(
                f"approval request {record.id} expired; the call was refused",
                details={**details, "status": "expired"},
            )
        if request.binding and request.binding != record.binding:
            raise Conflict(
                f"approval request {record.id} is for another call than the one given "
                "(binding hash differs); nothing was decided",
                details={**details, "binding": record.binding},
            )
        who = self.service.operator(request.requested_by)
        decided = msgspec.structs.replace(
            record, status=status, decided_by=who, decided_at=now, reason=request.reason
        )
        try:
            await self.kv.update(record.id, encode(decided), last=entry.revision)
        except KeyWrongLastSequenceError:
            raise Conflict(
                f"approval request {record.id} was decided by someone else at the same time; "
                "`signalbox approvals list --all` shows the outcome",
                details=details,
            ) from None
        op = "approve" if status == "approved" else "deny"
        await self.service.audit.emit(
            "admin",
            actor=who,
            subject=self.service.subjects.admin("approvals", op),
            policy_version=record.policy_version,
            data={
                "op": f"approvals.{op}", "approval_id": record.id, "call_id": record.call_id,
                "caller": record.caller, "target": record.target,
                "capability": record.capability, "binding": record.binding,
                "reason": request.reason,
            },
        )  # fmt: skip
        return decided


def _expired_text(record: ApprovalRequest) -> str:
    return (
        "no operator decided before it expired "
        f"({max(0.0, record.expires_at - record.requested_at):.1f}s)"
    )
