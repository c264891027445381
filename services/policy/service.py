"""Policy service: decides every mediated call and relays allowed ones.

Flow of one call (all on the service's raw nats-py connection, which is the
hot path)::

    A --request sb.out.A.B.cap--> policy --(decide, audit)--> sb.in.B.cap --> B
    A <-------- reply (relayed) -- policy <------------ reply ------------- B

The service is a queue group, so replicas share calls and no call is
delivered twice. It relays B's reply itself (rather than letting B answer A
directly) so that it sees every outcome: it audits latency and errors,
turns "nobody listening" and time-outs into structured errors, and never
lets a target write into a caller's inbox on its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Any

from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.errors import InvalidKeyError, KeyNotFoundError
from nats.js.kv import KeyValue

from broker.audit import new_id
from broker.codec import decode
from broker.connection import sync_connection
from broker.errors import (
    CallDenied,
    CallTimeout,
    InvalidInput,
    PayloadTooLarge,
    SchemaError,
    SignalboxError,
    TargetUnavailable,
    UnknownTarget,
)
from broker.jetstream import KV_AGENTS
from broker.kvcache import KVCache
from broker.replies import (
    H_CALL_ID,
    H_CALLER,
    H_CAPABILITY,
    H_DEADLINE,
    H_ERROR,
    H_TIMEOUT_MS,
    H_TRACEPARENT,
    error_reply,
)
from broker.service import Service
from broker.settings import Settings
from schemas import AgentRecord, CallOutcome, Decision
from services.policy.decider import AllowList, CallRequest, Decider

__all__ = ["PolicyService"]

log = logging.getLogger(__name__)

_PASSTHROUGH = (H_TRACEPARENT, "tracestate")


@dataclass(slots=True)
class _Pending:
    reply: str
    call_id: str
    caller: str
    target: str
    capability: str
    trace_id: str
    started: float
    request_bytes: int
    timer: asyncio.TimerHandle


def _trace_id(headers: dict[str, str]) -> str:
    parts = headers.get(H_TRACEPARENT, "").split("-")
    return parts[1] if len(parts) == 4 else ""


class PolicyService(Service):
    """Mediates ``sb.out.*.*.*``.

    Args:
        settings: Settings.
        decider: Decision engine; default: the allow-list at
            ``settings.resolved_allowlist_path``.
    """

    name = "policy"

    def __init__(self, settings: Settings, decider: Decider | None = None) -> None:
        super().__init__(settings)
        self.decider: Decider = decider or AllowList.from_file(settings.resolved_allowlist_path)
        self.agents: KVCache[AgentRecord] | None = None
        self._pending: dict[str, _Pending] = {}
        self._capabilities: dict[str, frozenset[str]] = {}
        self._kv: KeyValue
        self._next = 0
        self._inbox = ""
        self._call_sub: Subscription | None = None
        self._reply_sub: Subscription | None = None
        self._drained = asyncio.Event()  # set when the last pending call settles
        self.stats: dict[str, int] = {
            "calls": 0, "allowed": 0, "denied": 0, "rejected": 0,
            "ok": 0, "errors": 0, "timeouts": 0, "late_replies": 0,
        }  # fmt: skip

    async def on_start(self) -> None:
        self._kv = await self.js.key_value(KV_AGENTS)
        self.agents = KVCache(self._kv, AgentRecord, on_change=self._agent_changed)
        await self.agents.start()
        self._inbox = self.nc.new_inbox()
        self._reply_sub = await self.nc.subscribe(
            f"{self._inbox}.*", cb=self._on_reply, pending_msgs_limit=1_000_000
        )
        self._call_sub = await self.nc.subscribe(
            self.subjects.out_wildcard,
            queue="sb-policy",
            cb=self._on_call,
            pending_msgs_limit=1_000_000,
        )
        # Not nc.flush(): see sync_connection (nats-py can PONG before our SUB).
        await sync_connection(self.nc)
        log.info(
            "policy: mediating %s with rules %s", self.subjects.out_wildcard, self.decider.version
        )

    async def on_stop(self) -> None:
        # Stop taking calls, let in-flight ones finish (bounded), then stop relaying.
        if self._call_sub is not None:
            with contextlib.suppress(Exception):
                await self._call_sub.unsubscribe()
        if self._pending:
            self._drained.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._drained.wait(), self.settings.call_timeout)
        if self._reply_sub is not None:
            with contextlib.suppress(Exception):
                await self._reply_sub.unsubscribe()
        if self.agents is not None:
            await self.agents.stop()

    def _agent_changed(self, name: str, record: AgentRecord | None) -> None:
        # Precompute what the hot path needs, once per registry change.
        if record is None:
            self._capabilities.pop(name, None)
        else:
            self._capabilities[name] = frozenset(c.name for c in record.manifest.capabilities)

    async def _lookup(self, name: str) -> AgentRecord | None:
        """Read one agent straight from KV when the watched cache does not have it.

        Closes the window between a registration's reply and the watch update
        reaching this replica (a caller that registers and calls at once).
        Only cache misses pay for it.
        """
        assert self.agents is not None
        try:
            entry = await self._kv.get(name)
        except (KeyNotFoundError, InvalidKeyError):
            return None
        if not entry.value:
            return None
        try:
            record = decode(entry.value, AgentRecord)
        except SchemaError:
            return None
        self._agent_changed(name, record)
        return record

    # -- hot path --------------------------------------------------------------

    async def _on_call(self, msg: Msg) -> None:
        self.stats["calls"] += 1
        _, _, caller, target, capability = msg.subject.rsplit(".", 4)
        headers = msg.headers or {}
        if not msg.reply:
            # Nobody to answer: count and audit, never drop silently.
            await self._reject(
                InvalidInput(
                    "call without a reply subject; use request-reply (nc.request or Agent.call)",
                    details={"caller": caller, "target": target, "capability": capability},
                ),
                msg,
                caller,
            )
            return
        try:
            if len(msg.data) > self.settings.max_call_bytes:
                raise PayloadTooLarge(
                    f"call payload is {len(msg.data)} bytes, over the "
                    f"{self.settings.max_call_bytes}-byte limit (SIGNALBOX_MAX_CALL_BYTES); "
                    "send a reference instead of the content",
                    details={"size": len(msg.data), "limit": self.settings.max_call_bytes},
                )
            timeout = self._timeout(headers)
        except SignalboxError as err:
            await self._reject(err, msg, caller)
            return
        assert self.agents is not None
        target_record = self.agents.get(target) or await self._lookup(target)
        call_id = new_id()
        trace_id = _trace_id(headers)
        if target_record is None or capability not in self._capabilities.get(target, ()):
            unknown = UnknownTarget(
                f"{target} is not a registered agent; `signalbox agents list` shows who is"
                if target_record is None
                else f"{target} has no capability {capability!r}",
                details={"target": target, "capability": capability},
            )
            await self._reject(unknown, msg, caller)
            return
        decision = self.decider.decide(
            CallRequest(
                caller,
                target,
                capability,
                self.agents.get(caller) or await self._lookup(caller),
                target_record,
            )
        )
        await self.audit.emit(
            "decision",
            actor=caller,
            subject=msg.subject,
            trace_id=trace_id,
            policy_version=decision.policy_version,
            data={
                "call_id": call_id, "caller": caller, "target": target,
                "capability": capability, "decision": _builtins(decision),
            },
        )  # fmt: skip
        if decision.effect != "allow":
            self.stats["denied"] += 1
            body, hdrs = error_reply(_denied(decision, caller, target, capability))
            await self.nc.publish(msg.reply, body, headers=hdrs)
            return
        self.stats["allowed"] += 1
        self._next += 1
        token = str(self._next)
        loop = asyncio.get_running_loop()
        self._pending[token] = _Pending(
            reply=msg.reply,
            call_id=call_id,
            caller=caller,
            target=target,
            capability=capability,
            trace_id=trace_id,
            started=time.perf_counter(),
            request_bytes=len(msg.data),
            timer=loop.call_later(timeout, self._expire, token),
        )
        forward = {
            H_CALL_ID: call_id,
            H_CALLER: caller,
            H_CAPABILITY: capability,
            # Microseconds: rounding to ms could put the deadline past the timeout.
            H_DEADLINE: f"{time.time() + timeout:.6f}",
        }
        for name in _PASSTHROUGH:
            if name in headers:
                forward[name] = headers[name]
        await self.nc.publish(
            self.subjects.inbound(target, capability),
            msg.data,
            reply=f"{self._inbox}.{token}",
            headers=forward,
        )

    async def _on_reply(self, msg: Msg) -> None:
        token = msg.subject[len(self._inbox) + 1 :]
        pending = self._pending.pop(token, None)
        if pending is None:
            self.stats["late_replies"] += 1  # the caller was already told it timed out
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
        await self.nc.publish(pending.reply, body, headers=relay_headers)
        await self._outcome(pending, relay_headers, len(body))

    def _expire(self, token: str) -> None:
        pending = self._pending.pop(token, None)
        if pending is None:
            return
        if not self._pending:
            self._drained.set()
        self.stats["timeouts"] += 1
        err = CallTimeout(
            f"{pending.target}.{pending.capability} did not answer in time",
            details={"target": pending.target, "capability": pending.capability},
        )
        body, headers = error_reply(err)
        task = asyncio.ensure_future(self._send_expiry(pending, body, headers))
        task.add_done_callback(_log_failure)

    async def _send_expiry(self, pending: _Pending, body: bytes, headers: dict[str, str]) -> None:
        await self.nc.publish(pending.reply, body, headers=headers)
        await self._outcome(pending, headers, 0)

    async def _outcome(self, p: _Pending, headers: dict[str, str] | None, reply_bytes: int) -> None:
        error_code = headers.get(H_ERROR, "") if headers else ""
        self.stats["errors" if error_code else "ok"] += 1
        outcome = CallOutcome(
            call_id=p.call_id,
            caller=p.caller,
            target=p.target,
            capability=p.capability,
            ok=not error_code,
            latency_ms=(time.perf_counter() - p.started) * 1000,
            error_code=error_code,
            request_bytes=p.request_bytes,
            reply_bytes=reply_bytes,
        )
        await self.audit.emit(
            "call",
            actor=p.caller,
            subject=self.subjects.inbound(p.target, p.capability),
            trace_id=p.trace_id,
            data=outcome,
        )

    def _timeout(self, headers: dict[str, str]) -> float:
        raw = headers.get(H_TIMEOUT_MS)
        if raw is None:
            return self.settings.call_timeout
        try:
            value = int(raw) / 1000
        except ValueError:
            raise InvalidInput(
                f"header {H_TIMEOUT_MS} must be an integer number of milliseconds, got {raw!r}",
                details={"header": H_TIMEOUT_MS, "value": raw[:64]},
            ) from None
        if value <= 0:
            raise InvalidInput(
                f"header {H_TIMEOUT_MS} must be positive", details={"header": H_TIMEOUT_MS}
            )
        return min(value, self.settings.call_timeout)

    async def _reject(self, err: SignalboxError, msg: Msg, caller: str) -> None:
        self.stats["rejected"] += 1
        if msg.reply:
            body, headers = error_reply(err)
            await self.nc.publish(msg.reply, body, headers=headers)
        await self.reject(err, subject=msg.subject, actor=caller)


def _denied(decision: Decision, caller: str, target: str, capability: str) -> CallDenied:
    verb = "needs human approval" if decision.effect == "needs_approval" else "denied"
    return CallDenied(
        f"call {caller} -> {target}.{capability} {verb}: {'; '.join(decision.reasons)}",
        details={
            "effect": decision.effect,
            "reasons": list(decision.reasons),
            "policy_ids": list(decision.policy_ids),
            "policy_version": decision.policy_version,
        },
    )


def _builtins(decision: Decision) -> dict[str, Any]:
    import msgspec

    out: dict[str, Any] = msgspec.to_builtins(decision)
    return out


def _log_failure(task: asyncio.Future[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("policy: failed to send a timeout reply: %r", task.exception())
