"""Policy service: decides every mediated call and relays allowed ones; answers ``sb.authz``.

Flow of one call (all on the service's raw nats-py connection, which is the
hot path)::

    A --request sb.out.A.B.cap--> policy --(decide, audit)--> sb.in.B.cap --> B
    A <-------- reply (relayed) -- policy <------------ reply ------------- B

Decisions come from the Cedar engine (:mod:`services.policy.cedar`) over the
active policy set of the KV bucket ``sb_policies``. This module holds the
decision path and composes the desks that do the rest, each in its own module
and each depending only on :class:`broker.runtime.desk.ServiceHost` and
explicit callbacks (their admin endpoints are declared by the desk and
included here, :meth:`broker.runtime.service.Service.include`):

* :mod:`services.policy.policy_sets`: seeds, watches, activates and shadows
  the stored sets; ``sb.admin.policy.<op>``;
* :mod:`services.policy.breaker_gate`: fleet-wide circuit breakers checked
  before Cedar on every call and ``sb.authz`` request; ``sb.admin.breakers.<op>``;
* :mod:`services.policy.relay`: forwards allowed calls once their decision is
  stored, relays the replies, audits the outcomes;
* :mod:`services.policy.approvals`: parks calls the set answers
  ``needs_approval`` until an operator decides; ``sb.admin.approvals.<op>``;
* :mod:`services.policy.routes`: version routes and canary rollouts;
  ``sb.admin.rollout.<op>``.

Before an LLM or tool call, an agent asks ``sb.authz.<agent>``
(:class:`schemas.AuthzRequest`) and gets a :class:`schemas.Decision`; those
decisions are audited like call decisions.

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
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.errors import InvalidKeyError, KeyNotFoundError
from nats.js.kv import KeyValue
from opentelemetry import trace

from broker.codec import decode
from broker.connection import sync_connection
from broker.dedup import validate_idempotency_key
from broker.errors import (
    AuditUnavailable,
    CallDenied,
    InvalidInput,
    PayloadTooLarge,
    SchemaError,
    SignalboxError,
    UnknownTarget,
)
from broker.ids import new_id
from broker.replies import H_IDEMPOTENCY_KEY, error_reply
from broker.runtime.breakers import BreakerBoard
from broker.runtime.jetstream import KV_AGENTS
from broker.runtime.kvcache import KVCache
from broker.runtime.service import Service
from broker.settings import Settings
from broker.subjects import Audience
from broker.telemetry import (
    ATTR,
    agent_attributes,
    annotate,
    current_trace_id,
    decision_attributes,
    fail,
)
from schemas import AgentRecord, AuthzRequest, Budget, Decision
from services.policy.approvals import ApprovalDesk
from services.policy.breaker_gate import BreakerGate
from services.policy.budget_check import BudgetCheck
from services.policy.cedar.decider import CedarDecider
from services.policy.cedar.policy_set import shipped_policy_dir
from services.policy.chains import DelegationChains
from services.policy.deadlines import remaining_timeout
from services.policy.decider import (
    CallRequest,
    Decider,
    RequestContext,
    UseRequest,
    unknown_estimate,
)
from services.policy.guards import Guards, parse_chain
from services.policy.policy_sets import PolicySetDesk
from services.policy.relay import AllowedCall, CallRelay
from services.policy.routes import RouteDesk
from services.policy.shadow import Shadow
from services.policy.stats import PolicyStats
from services.policy.store import PolicyStore

__all__ = ["PolicyService"]

log = logging.getLogger(__name__)

_NO_CONTEXT = RequestContext()


class PolicyService(Service):
    """Mediates ``sb.out.*.*.*`` and answers ``sb.authz.*``.

    Args:
        settings: Settings.
        decider: Decision engine; default: Cedar over ``settings.policy_dir``
            (unset: the shipped policies).

    Raises:
        ConfigError: the policy folder is missing or its set is invalid.
    """

    name = "policy"

    def __init__(self, settings: Settings, decider: Decider | None = None) -> None:
        super().__init__(settings)
        self.decider: Decider = decider or CedarDecider.from_dir(
            settings.policy_dir or shipped_policy_dir()
        )
        self.stats = PolicyStats()
        self.agents: KVCache[AgentRecord] | None = None
        #: Reserves allowed model uses' cost when a budget applies (budget_check).
        self.budget_check = BudgetCheck(self, self.stats)
        self._capabilities: dict[str, frozenset[str]] = {}
        self._kv: KeyValue
        #: The detectors that trip circuit breakers (services.policy.guards).
        self.guards = Guards(settings)
        #: Signs the delegation chains this service forwards, verifies those sent back.
        self.chains = DelegationChains(settings, self.subjects, self.stats)
        # The desks (each started in on_start); their endpoints are included in this order.
        #: Version routes and canary rollouts (services.policy.routes).
        self.routes = RouteDesk(
            self, counts=self.guards.errors.counts, established=self._established_version
        )
        #: The stored policy sets this replica evaluates (services.policy.policy_sets).
        self.policy_sets = PolicySetDesk(self, self.decider, self.stats)
        #: Fleet-wide circuit breakers checked before Cedar (services.policy.breaker_gate).
        self.breaker_gate = BreakerGate(
            self, self.guards, self.stats, policy_version=lambda: self.decider.version,
            verified_chain=self.chains.verified, refuse_call=self._reject,
        )  # fmt: skip
        #: Forwards allowed calls and relays their replies (services.policy.relay).
        self.relay = CallRelay(
            self, self.stats, resolve_version=self.routes.resolve,
            record_version=self.routes.record,
            record_breaker_outcome=self.breaker_gate.record_outcome,
            release_probes=self.breaker_gate.release_probes,
            sign_chain=self.chains.signature, target_record=self._cached_agent,
        )  # fmt: skip
        #: Parked calls and operators' decisions (services.policy.approvals).
        self.approvals = ApprovalDesk(self, forward=self.relay.forward_approved, stats=self.stats)
        for desk in (self.routes, self.policy_sets, self.approvals, self.breaker_gate):
            self.include(desk)
        self._call_sub: Subscription | None = None
        self._authz_sub: Subscription | None = None
        #: Calls and authorizations waiting for their decision's write (write-ahead).
        self._call_tasks: set[asyncio.Task[None]] = set()

    # -- the desks' state, as the service shows it ---------------------------------------

    @property
    def policy_store(self) -> PolicyStore:
        """The versioned policy sets in ``sb_policies`` (after start)."""
        return self.policy_sets.store

    @property
    def active_version(self) -> int:
        """Stored version this replica evaluates (0: its folder's set, not from KV)."""
        return self.policy_sets.active_version

    @property
    def policy_alarm(self) -> str:
        """Why this replica does not evaluate the active set ("" when it does)."""
        return self.policy_sets.policy_alarm

    @property
    def shadow(self) -> Shadow | None:
        """The shadow set evaluated beside the active one (None: shadow mode off)."""
        return self.policy_sets.shadow

    @property
    def budgets(self) -> KVCache[Budget] | None:
        """Budget definitions (``sb_budgets``), watched (after start)."""
        return self.budget_check.budgets

    @property
    def breakers(self) -> BreakerBoard:
        """The fleet's circuit breakers (broker.runtime.breakers) (after start)."""
        return self.breaker_gate.board

    # -- composition -----------------------------------------------------------------------

    def _guarded(
        self, handler: Callable[[Msg], Awaitable[None]]
    ) -> Callable[[Msg], Awaitable[None]]:
        """``handler``, but a bug in it becomes an ``internal`` error reply, never a hang.

        nats-py hands a callback's exception to the connection's error
        callback and moves on: the caller would wait for its timeout with no
        clue. Here it is logged, counted, audited and answered.
        """

        async def run(msg: Msg) -> None:
            try:
                await handler(msg)
            except Exception as exc:
                log.exception("policy: handling %s failed", msg.subject)
                self.stats.internal_errors += 1
                err = SignalboxError(
                    f"the policy service failed on this request ({type(exc).__name__}); "
                    "see its log",
                    details={"subject": msg.subject},
                )
                with contextlib.suppress(Exception):
                    await self.reject(err, subject=msg.subject)
                    # sb.out.<caller>.… and sb.authz.<agent>: only into the sender's inbox.
                    sender = msg.subject.split(".")[2]
                    if self.reply_fault(msg, Audience.AGENT, sender) is None:
                        body, headers = error_reply(err)
                        await self.nc.publish(msg.reply, body, headers=headers)

        return run

    async def on_start(self) -> None:
        self._kv = await self.js.key_value(KV_AGENTS)
        self.agents = KVCache(self._kv, AgentRecord, on_change=self._agent_changed)
        await self.agents.start()
        await self.policy_sets.start()
        await self.budget_check.start()
        await self.routes.start()
        await self.approvals.start()
        await self.breaker_gate.start()
        await self.relay.start()
        caller_trace = self.chains.caller_trace
        self._call_sub = await self.nc.subscribe(
            self.subjects.out_wildcard,
            queue="sb-policy",
            cb=self.traced("sb.decision", self._guarded(self._on_call), parent=caller_trace),
            pending_msgs_limit=1_000_000,
        )
        self._authz_sub = await self.nc.subscribe(
            self.subjects.authz_wildcard,
            queue="sb-policy",
            cb=self._concurrently(
                self.traced("sb.authz", self._guarded(self._on_authz), parent=caller_trace)
            ),
            pending_msgs_limit=100_000,
        )
        # Not nc.flush(): see sync_connection (nats-py can PONG before our SUB).
        await sync_connection(self.nc)
        log.info(
            "policy: mediating %s and answering %s with policy set %s",
            self.subjects.out_wildcard,
            self.subjects.authz_wildcard,
            self.decider.version,
        )

    async def on_stop(self) -> None:
        # Stop taking calls, let in-flight ones finish (bounded), then stop relaying.
        for sub in (self._call_sub, self._authz_sub):
            if sub is not None:
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()
        await self.approvals.stop()  # parked callers are told now, not left waiting
        if self._call_tasks:  # decisions being stored: forwarded or refused, then drained
            await asyncio.wait(set(self._call_tasks), timeout=self.settings.write_ahead_timeout + 1)
        await self.relay.drain(self.settings.call_timeout)
        await self.relay.stop()
        if self.agents is not None:
            await self.agents.stop()
        await self.budget_check.stop()
        await self.routes.stop()
        await self.breaker_gate.stop()
        await self.policy_sets.stop()

    # -- the registry's agents -------------------------------------------------------------

    def _agent_changed(self, name: str, record: AgentRecord | None) -> None:
        # Precompute what the hot path needs, once per registry change.
        if record is None:
            self._capabilities.pop(name, None)
        else:
            self._capabilities[name] = frozenset(c.name for c in record.manifest.capabilities)

    def _cached_agent(self, name: str) -> AgentRecord | None:
        """``name``'s record in the watched copy of the registry (None: not there, or
        before start)."""
        return self.agents.get(name) if self.agents else None

    def _established_version(self, name: str) -> str:
        """The version of ``name`` unrouted calls go to ("" with one version: any instance)."""
        record = self._cached_agent(name)
        return record.established_version if record is not None else ""

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

    # -- the decision path: calls ----------------------------------------------------------

    async def _on_call(self, msg: Msg) -> None:
        self.stats.calls += 1
        _, _, caller, target, capability = msg.subject.rsplit(".", 4)
        headers = msg.headers or {}
        # Before any work: the answer (or the target's, relayed) may go only to
        # the caller's own inbox, never where the caller points it ($KV.…, an
        # admin subject, another agent's inbox). Refused unanswered, audited.
        fault = self.reply_fault(msg, Audience.AGENT, caller)
        if fault is not None:
            self.stats.rejected += 1
            await self.refuse_reply(msg, fault, actor=caller)
            return
        try:
            if len(msg.data) > self.settings.max_call_bytes:
                raise PayloadTooLarge(
                    f"call payload is {len(msg.data)} bytes, over the "
                    f"{self.settings.max_call_bytes}-byte limit (SIGNALBOX_MAX_CALL_BYTES); "
                    "send a reference instead of the content",
                    details={"size": len(msg.data), "limit": self.settings.max_call_bytes},
                )
            timeout = remaining_timeout(headers, self.settings.call_timeout)
            key = headers.get(H_IDEMPOTENCY_KEY, "")
            if key:
                validate_idempotency_key(key)
        except SignalboxError as err:
            await self._reject(err, msg, caller)
            return
        assert self.agents is not None
        target_record = self.agents.get(target) or await self._lookup(target)
        call_id = new_id()
        trace_id = current_trace_id()
        if target_record is None or capability not in self._capabilities.get(target, ()):
            unknown = UnknownTarget(
                f"{target} is not a registered agent; `signalbox agents list` shows who is"
                if target_record is None
                else f"{target} has no capability {capability!r}",
                details={"target": target, "capability": capability},
            )
            await self._reject(unknown, msg, caller)
            return
        caller_record = self.agents.get(caller) or await self._lookup(caller)
        gate = await self.breaker_gate.check_call(
            msg, call_id, caller, caller_record, target, trace_id
        )
        if gate is None:
            return  # a breaker refused it (answered, audited, counted)
        context = RequestContext.from_headers(
            headers,
            unknown_tokens=unknown_estimate(self.settings.default_token_estimate, len(msg.data)),
        )
        call = CallRequest(caller, target, capability, caller_record, target_record, context)
        decision = self.decider.decide(call)
        annotate(trace.get_current_span(), lambda: _call_attributes(call, decision, call_id))
        if self.policy_sets.shadow is not None:
            await self.policy_sets.compare_shadow(
                call, decision, actor=caller, subject=msg.subject, trace_id=trace_id
            )
        data: dict[str, Any] = {
            "call_id": call_id, "caller": caller, "target": target,
            "capability": capability, "decision": _builtins(decision),
        }  # fmt: skip
        if decision.effect == "needs_approval":
            data["approval_id"] = new_id()
        if key:  # what a retry of this call will carry too
            data["idempotency_key"] = key
        if context != _NO_CONTEXT:  # the inputs a what-if replay needs
            data["context"] = context.audit_fields()
        record = {
            "actor": caller, "subject": msg.subject, "trace_id": trace_id,
            "policy_version": decision.policy_version, "data": data,
        }  # fmt: skip
        if decision.effect == "allow" and self.settings.write_ahead:
            # Write-ahead: nothing runs without a durable decision (docs/decisions.md 29).
            # In a task of its own: nats-py runs a subscription's callbacks one after
            # the other, and calls waiting here together share one JetStream write.
            allowed = AllowedCall(
                msg.reply, msg.data, headers, call_id, caller, target, capability, trace_id
            )
            self._spawn(self.relay.forward_when_stored(record, allowed, timeout, gate), msg)
            return
        await self.audit.emit("decision", **record)
        if decision.effect != "allow" and gate.probes:
            # Not forwarded: the probe tested nothing; the next call may probe.
            self.breaker_gate.release_probes(gate.probes)
        if decision.effect == "needs_approval":
            await self.approvals.park_call(
                msg, call_id, data["approval_id"], caller, target, capability, trace_id, decision
            )
            return
        if decision.effect != "allow":
            self.stats.denied += 1
            body, hdrs = error_reply(_denied(decision, caller, target, capability))
            await self.nc.publish(msg.reply, body, headers=hdrs)
            return
        self.stats.allowed += 1
        allowed = AllowedCall(
            msg.reply, msg.data, headers, call_id, caller, target, capability, trace_id
        )
        await self.relay.forward(allowed, timeout, gate=gate)

    def _concurrently(
        self, handler: Callable[[Msg], Awaitable[None]]
    ) -> Callable[[Msg], Awaitable[None]]:
        """``handler`` run in a task per message (an authorization waits for its
        decision's write; the next one need not wait for it)."""

        async def spawn(msg: Msg) -> None:
            task = asyncio.ensure_future(handler(msg))
            self._call_tasks.add(task)
            task.add_done_callback(self._call_tasks.discard)

        return spawn

    def _spawn(self, work: Awaitable[None], msg: Msg) -> None:
        """Run the rest of ``msg``'s handling in a task, guarded like :meth:`_guarded`."""
        task = asyncio.ensure_future(self._guarded(lambda _: work)(msg))
        self._call_tasks.add(task)
        task.add_done_callback(self._call_tasks.discard)

    async def _reject(self, err: SignalboxError, msg: Msg, caller: str) -> None:
        self.stats.rejected += 1
        fail(trace.get_current_span(), err.code, err.message)
        if msg.reply:
            body, headers = error_reply(err)
            await self.nc.publish(msg.reply, body, headers=headers)
        await self.reject(err, subject=msg.subject, actor=caller)

    # -- the decision path: model and tool uses (sb.authz) ---------------------------------

    async def _on_authz(self, msg: Msg) -> None:
        """``sb.authz.<agent>``: decide a model or tool use, audit it, answer a Decision."""
        agent = msg.subject.rsplit(".", 1)[1]
        fault = self.reply_fault(msg, Audience.AGENT, agent)
        if fault is not None:
            self.stats.rejected += 1
            await self.refuse_reply(msg, fault, actor=agent)
            return
        try:
            parents = parse_chain(self.chains.verified(agent, msg.headers, current_trace_id()))
        except InvalidInput:
            parents = ()
        trace_id = current_trace_id()

        async def decide(request: AuthzRequest) -> Decision:
            decision = await self._authorize(agent, msg.subject, trace_id, request, parents=parents)
            return msgspec.structs.replace(decision, trace_id=trace_id)

        body, headers = await self.handle(msg.data, msg.subject, AuthzRequest, decide)
        await self.nc.publish(msg.reply, body, headers=headers or None)

    async def _authorize(
        self,
        agent: str,
        subject: str,
        trace_id: str,
        request: AuthzRequest,
        *,
        parents: tuple[str, ...] = (),
    ) -> Decision:
        assert self.agents is not None
        self.stats.authz += 1
        use = UseRequest(
            agent=agent,
            agent_record=self.agents.get(agent) or await self._lookup(agent),
            action=request.action,
            resource=request.resource,
            provider=request.provider,
            region=request.region,
            price_per_1k_tokens=request.price_per_1k_tokens,
            context=RequestContext(
                # No estimate is not zero tokens: the stand-in, flagged unknown.
                estimated_tokens=unknown_estimate(self.settings.default_token_estimate)
                if request.estimated_tokens is None
                else request.estimated_tokens,
                estimated_tokens_known=request.estimated_tokens is not None,
                data_tags=request.data_tags,
                on_behalf_of=request.on_behalf_of,
            ),
        )
        probes = await self.breaker_gate.check_use(use, subject, trace_id)
        if isinstance(probes, Decision):
            return probes  # a breaker refused it (audited, counted)
        decision = self.decider.decide(use)
        annotate(trace.get_current_span(), lambda: _use_attributes(use, decision))
        if self.policy_sets.shadow is not None:
            await self.policy_sets.compare_shadow(
                use, decision, actor=agent, subject=subject, trace_id=trace_id
            )
        budget: dict[str, Any] = {}  # the budget's explanation, for the record
        if decision.effect == "allow" and request.action == "use_model":
            decision, budget = await self.budget_check.reserve(
                agent, use.agent_record, request, decision, trace_id, parents
            )
        if probes:  # an allowed request closes the breaker; a denied one tested nothing
            ok = True if decision.effect == "allow" else None
            self.breaker_gate.settle_probes([(key, cid, ok) for key, cid in probes])
        if decision.effect == "allow":
            self.stats.authz_allowed += 1
        else:
            self.stats.authz_denied += 1
        # An allowed use is answered only once its decision is stored (write-ahead).
        durable = decision.effect == "allow" and self.settings.write_ahead
        emitted = self.audit.write_ahead if durable else self.audit.emit
        extra: dict[str, Any] = {"timeout": self.settings.write_ahead_timeout} if durable else {}
        try:
            await emitted(
            "decision",
            actor=agent,
            subject=subject,
            trace_id=trace_id,
            policy_version=decision.policy_version,
            data={
                "request_id": new_id(), "agent": agent, "action": request.action,
                "resource": request.resource, "provider": request.provider,
                "region": request.region, "price_per_1k_tokens": request.price_per_1k_tokens,
                "estimated_tokens": use.context.estimated_tokens,
                "estimated_tokens_known": use.context.estimated_tokens_known,
                "data_tags": list(request.data_tags),
                "on_behalf_of": list(request.on_behalf_of),
                "decision": _builtins(decision), **budget,
            },
            **extra,
            )  # fmt: skip
        except TimeoutError:
            self.stats.audit_unavailable += 1
            raise AuditUnavailable(
                f"the decision on {request.action} {request.resource!r} could not be stored "
                f"within {self.settings.write_ahead_timeout:g}s (is JetStream up?); "
                "do not go ahead; safe to ask again",
                details={"action": request.action, "resource": request.resource},
            ) from None
        return decision


def _call_attributes(call: CallRequest, decision: Decision, call_id: str) -> dict[str, Any]:
    """Span attributes of a call decision (built only when the span records)."""
    return {
        ATTR["call_id"]: call_id, ATTR["capability"]: call.capability,
        **agent_attributes(call.caller_record, "caller"),
        **agent_attributes(call.target_record, "target"),
        ATTR["caller"]: call.caller, ATTR["target"]: call.target,
        **decision_attributes(decision),
    }  # fmt: skip


def _use_attributes(use: UseRequest, decision: Decision) -> dict[str, Any]:
    """Span attributes of a model or tool use decision (``sb.authz``)."""
    return {
        **agent_attributes(use.agent_record), ATTR["agent"]: use.agent,
        ATTR["action"]: use.action, ATTR["resource"]: use.resource,
        ATTR["provider"]: use.provider, **decision_attributes(decision),
    }  # fmt: skip


def _denied(decision: Decision, caller: str, target: str, capability: str) -> CallDenied:
    verb = "needs human approval" if decision.effect == "needs_approval" else "denied"
    return CallDenied(
        f"call {caller} -> {target}.{capability} {verb}: {'; '.join(decision.reasons)}",
        details={
            "effect": decision.effect,
            "reason_code": decision.reason_code,
            "reasons": list(decision.reasons),
            "policy_ids": list(decision.policy_ids),
            "policy_version": decision.policy_version,
        },
    )


def _builtins(decision: Decision) -> dict[str, Any]:
    out: dict[str, Any] = msgspec.to_builtins(decision)
    return out
