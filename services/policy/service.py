"""Policy service: decides every mediated call and relays allowed ones; answers ``sb.authz``.

Flow of one call (all on the service's raw nats-py connection, which is the
hot path)::

    A --request sb.out.A.B.cap--> policy --(decide, audit)--> sb.in.B.cap --> B
    A <-------- reply (relayed) -- policy <------------ reply ------------- B

Decisions come from the Cedar engine (:mod:`services.policy.cedar`) over the
active policy set of the KV bucket ``sb_policies``
(:mod:`services.policy.store`). The folder ``settings.policy_dir``
(default: the shipped ``policies/``) is loaded at start (an invalid set stops
the service with Cedar's messages) and seeds the bucket when it is empty;
after that the bucket decides. Every replica watches the bucket's ``active``
pointer and swaps the new set in when it moves (no redeploy, no restart).
Operators manage sets on ``sb.admin.policy.<op>``::

    validate  ValidatePolicies      -> PolicyValidation
    apply     ApplyPolicies         -> PolicyApplied     (audited, kind admin)
    rollback  RollbackPolicies      -> PolicyApplied     (audited, kind admin)
    show      ShowPolicies          -> PolicyShown
    history   PolicyHistoryRequest  -> PolicyHistory
    diff      DiffPolicies          -> PolicyDiff

A call the policy set answers ``needs_approval`` is parked until an operator
decides on ``sb.admin.approvals.<op>`` (see :mod:`services.policy.approvals`)::

    list      ListApprovals         -> ApprovalList
    approve   DecideApproval        -> ApprovalRequest   (audited, kind admin)
    deny      DecideApproval        -> ApprovalRequest   (audited, kind admin)

Fleet-wide circuit breakers (:mod:`broker.runtime.breakers`; the detectors that trip
them: :mod:`services.policy.guards`) are checked before Cedar on every call
(the caller's, its team's and the target's) and every ``sb.authz`` request
(the agent's and its team's); a refusal is ``breaker_open``, audited like a
denial. Operators manage them on ``sb.admin.breakers.<op>``::

    list      ListBreakers          -> BreakerList
    trip      TripBreaker           -> Breaker           (audited, kind breaker)
    reset     ResetBreaker          -> Breaker           (audited, kind breaker)

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
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import msgspec
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.errors import InvalidKeyError, KeyNotFoundError
from nats.js.kv import KeyValue
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind

from broker.codec import decode
from broker.connection import sync_connection
from broker.dedup import validate_idempotency_key
from broker.diagnostics import cancel_and_wait
from broker.errors import (
    AuditUnavailable,
    CallDenied,
    ConfigError,
    Conflict,
    DeadlineExceeded,
    InvalidInput,
    NotFound,
    OutcomeUnknown,
    PayloadTooLarge,
    SchemaError,
    SignalboxError,
    TargetUnavailable,
    UnknownTarget,
)
from broker.ids import new_id
from broker.money import usd
from broker.replies import (
    H_CALL_ID,
    H_CALLER,
    H_CAPABILITY,
    H_CHAIN,
    H_CHAIN_SIG,
    H_DEADLINE,
    H_ERROR,
    H_IDEMPOTENCY_KEY,
    H_TIMEOUT_MS,
    error_reply,
)
from broker.replies import request as request_reply
from broker.runtime.breakers import BreakerBoard, breaker_key, breaker_open
from broker.runtime.budgets import applicable_keys, unreadable_budget, unreadable_keys
from broker.runtime.identity import CHAIN_GRACE, chain_key, sign_chain, verify_chain
from broker.runtime.jetstream import (
    KV_AGENTS,
    KV_APPROVALS,
    KV_BREAKERS,
    KV_BUDGETS,
    KV_POLICIES,
    KV_ROLLOUT_STATS,
    KV_ROUTES,
)
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
    extract,
    fail,
    hex_ids,
    inject,
    trusted_parent,
)
from schemas import (
    ActivePolicy,
    AgentRecord,
    ApplyPolicies,
    ApprovalList,
    ApprovalRequest,
    AuthzRequest,
    Breaker,
    BreakerList,
    Budget,
    CallOutcome,
    DecideApproval,
    Decision,
    DeprecateVersion,
    DiffPolicies,
    ListApprovals,
    ListBreakers,
    PolicyApplied,
    PolicyDiff,
    PolicyHistory,
    PolicyHistoryRequest,
    PolicySetRecord,
    PolicyShown,
    PolicyValidation,
    PromoteRollout,
    Reservation,
    ReserveBudget,
    ResetBreaker,
    RollbackPolicies,
    RollbackRollout,
    RolloutStatusRequest,
    SetRollout,
    ShadowPolicies,
    ShadowStatus,
    ShowPolicies,
    TripBreaker,
    ValidatePolicies,
)
from services.policy.approvals import ApprovalDesk, Parked, binding_hash, expiry_margin
from services.policy.cedar import CedarDecider, shipped_policy_dir
from services.policy.decider import (
    AccessRequest,
    CallRequest,
    Decider,
    RequestContext,
    UseRequest,
    unknown_estimate,
)
from services.policy.guards import Guards, format_chain, parse_chain
from services.policy.routes import RouteDesk
from services.policy.shadow import Shadow, disagreement
from services.policy.stats import PolicyStats
from services.policy.store import (
    ACTIVE_KEY,
    SHADOW_KEY,
    PolicyStore,
    diff_sets,
    parse_candidate,
    policies_of,
    set_key,
    unreadable_pointer,
)

__all__ = ["PolicyService"]

log = logging.getLogger(__name__)

_NO_CONTEXT = RequestContext()


@dataclass(frozen=True, slots=True)
class _Gate:
    """A call the breakers let pass: the ``Sb-Chain`` to forward, the probes it makes."""

    chain: str = ""
    probes: tuple[tuple[str, str], ...] = ()


_NO_GATE = _Gate()


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
    #: The delivery span (sb.delivery) and its parent's id (the decision span).
    span: Span | None = None
    parent_span_id: str = ""
    #: Half-open breakers this call probes, as (key, call id); and its timeout.
    probes: tuple[tuple[str, str], ...] = ()
    timeout: float = 0.0
    #: The target version a route or a pin chose ("" for any).
    version: str = ""
    #: The caller's idempotency key ("" for none).
    idempotency_key: str = ""


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
        self.agents: KVCache[AgentRecord] | None = None
        #: Budget definitions (``sb_budgets``): does a model call need a reservation?
        self.budgets: KVCache[Budget] | None = None
        #: Version routes and canary rollouts (after start; services.policy.routes).
        self._routes: RouteDesk | None = None
        #: Signs the delegation chains this service forwards (broker.runtime.identity).
        self._chain_key = chain_key(settings)
        # sb.admin.rollout.<op>: the route desk's, once started (services.policy.routes).
        rollout = functools.partial(self.subjects.admin, "rollout")
        self.endpoint(rollout("set"), SetRollout)(lambda r: self.routes.set(r))
        self.endpoint(rollout("promote"), PromoteRollout)(lambda r: self.routes.promote(r))
        self.endpoint(rollout("rollback"), RollbackRollout)(
            lambda r: self.routes.rollback(r)
        )
        self.endpoint(rollout("deprecate"), DeprecateVersion)(
            lambda r: self.routes.deprecate(r)
        )
        self.endpoint(rollout("status"), RolloutStatusRequest)(
            lambda r: self.routes.status(r)
        )
        self._pending: dict[str, _Pending] = {}
        self._capabilities: dict[str, frozenset[str]] = {}
        self._kv: KeyValue
        self._next = 0
        self._inbox = ""
        self._call_sub: Subscription | None = None
        self._reply_sub: Subscription | None = None
        self._authz_sub: Subscription | None = None
        self._drained = asyncio.Event()  # set when the last pending call settles
        #: The versioned sets in KV (after start).
        self._policy_store: PolicyStore | None = None
        #: Stored version this replica evaluates (0: its folder's set, not from KV).
        self.active_version = 0
        self._policy_watch: asyncio.Task[None] | None = None
        self._shadow_watch: asyncio.Task[None] | None = None
        #: The shadow set evaluated beside the active one (services.policy.shadow).
        self.shadow: Shadow | None = None
        self._activation = asyncio.Lock()
        #: Why this replica does not evaluate the active set ("" when it does): the
        #: pointer or the set it names cannot be read or loaded. `policy show` shows it.
        self.policy_alarm = ""
        s = self.subjects
        self.endpoint(s.admin("policy", "validate"), ValidatePolicies)(self.validate_set)
        self.endpoint(s.admin("policy", "apply"), ApplyPolicies)(self.apply_set)
        self.endpoint(s.admin("policy", "rollback"), RollbackPolicies)(self.rollback_set)
        self.endpoint(s.admin("policy", "show"), ShowPolicies)(self.show_set)
        self.endpoint(s.admin("policy", "history"), PolicyHistoryRequest)(self.set_history)
        self.endpoint(s.admin("policy", "diff"), DiffPolicies)(self.diff_sets)
        self.endpoint(s.admin("policy", "shadow"), ShadowPolicies)(self.shadow_set)
        #: Parked calls and operators' decisions (after start).
        self._approvals: ApprovalDesk | None = None
        self.endpoint(s.admin("approvals", "list"), ListApprovals)(self.list_approvals)
        self.endpoint(s.admin("approvals", "approve"), DecideApproval)(self.approve)
        self.endpoint(s.admin("approvals", "deny"), DecideApproval)(self.deny)
        #: Fleet-wide circuit breakers (after start) and the detectors that trip them.
        self._breakers: BreakerBoard | None = None
        self.guards = Guards(settings)
        self._tripping: set[str] = set()
        self._breaker_tasks: set[asyncio.Task[None]] = set()
        #: Calls and authorizations waiting for their decision's write (write-ahead).
        self._call_tasks: set[asyncio.Task[None]] = set()
        self.endpoint(s.admin("breakers", "list"), ListBreakers)(self.list_breakers)
        self.endpoint(s.admin("breakers", "trip"), TripBreaker)(self.trip_breaker)
        self.endpoint(s.admin("breakers", "reset"), ResetBreaker)(self.reset_breaker)
        self.stats = PolicyStats()

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
        await self._start_lifecycle()
        self.budgets = KVCache(await self.js.key_value(KV_BUDGETS), Budget)
        await self.budgets.start()
        self._routes = RouteDesk(
            self, await self.js.key_value(KV_ROUTES), await self.js.key_value(KV_ROLLOUT_STATS),
            counts=self.guards.errors.counts,
        )  # fmt: skip
        await self._routes.start()
        self._approvals = ApprovalDesk(
            self, await self.js.key_value(KV_APPROVALS),
            forward=self.forward_approved, stats=self.stats,
        )  # fmt: skip
        await self._approvals.start()
        self._breakers = BreakerBoard(
            await self.js.key_value(KV_BREAKERS), self.audit, self.actor,
            probe_timeout=self.settings.call_timeout + 5.0,
            max_cooldown=self.settings.breaker_cooldown_max, on_change=self._breaker_changed,
        )  # fmt: skip
        await self._breakers.start()
        self._inbox = self.nc.new_inbox()
        self._reply_sub = await self.nc.subscribe(
            f"{self._inbox}.*", cb=self._on_reply, pending_msgs_limit=1_000_000
        )
        self._call_sub = await self.nc.subscribe(
            self.subjects.out_wildcard,
            queue="sb-policy",
            cb=self.traced(
                "sb.decision", self._guarded(self._on_call), parent=self._caller_trace
            ),
            pending_msgs_limit=1_000_000,
        )
        self._authz_sub = await self.nc.subscribe(
            self.subjects.authz_wildcard,
            queue="sb-policy",
            cb=self._concurrently(
                self.traced("sb.authz", self._guarded(self._on_authz), parent=self._caller_trace)
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
        if self._approvals is not None:
            await self._approvals.stop()  # parked callers are told now, not left waiting
        if self._call_tasks:  # decisions being stored: forwarded or refused, then drained
            await asyncio.wait(set(self._call_tasks), timeout=self.settings.write_ahead_timeout + 1)
        if self._pending:
            self._drained.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._drained.wait(), self.settings.call_timeout)
        if self._reply_sub is not None:
            with contextlib.suppress(Exception):
                await self._reply_sub.unsubscribe()
        if self.agents is not None:
            await self.agents.stop()
        if self.budgets is not None:
            await self.budgets.stop()
        if self._routes is not None:
            await self._routes.stop()
        if self._breaker_tasks:
            await asyncio.wait(set(self._breaker_tasks), timeout=5)
        if self._breakers is not None:
            await self._breakers.stop()
        await cancel_and_wait(self._shadow_watch, "the shadow policy watch")
        self._shadow_watch = None
        await cancel_and_wait(self._policy_watch, "the policy watch")
        self._policy_watch = None

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

    # -- policy lifecycle ------------------------------------------------------

    async def _start_lifecycle(self) -> None:
        """Seed the bucket if empty, load its active set, then watch the pointer.

        Nothing stored stops the start: an unreadable pointer or a set that
        does not load leaves this replica on its folder's set, with an alarm
        (:meth:`_raise_policy_alarm`).
        """
        store = self._policy_store = PolicyStore(await self.js.key_value(KV_POLICIES), self.js)
        pointer, _, problem = await store.pointer()
        if problem and isinstance(self.decider, CedarDecider):
            # Stored as version 1 if that is free, so `policy rollback --to 1` can repair
            # the pointer; the pointer itself is left for the operator.
            await store.add(self.decider.policies, self.actor, version=1)
        elif pointer is None and isinstance(self.decider, CedarDecider):
            # Exactly version 1 and only if absent: racing replicas agree on one seed.
            seed = self.decider.policies
            await store.add(seed, self.actor, version=1)
            try:
                await store.move(
                    ActivePolicy(
                        version=1,
                        digest=(await store.get(1)).digest,
                        changed_by=self.actor,
                        changed_at=time.time(),
                        reason="seed",
                    ),
                    0,
                )
            except Conflict:
                pass  # another replica seeded first
            except SignalboxError as err:  # version 1 is there but unreadable
                problem = (
                    "policy set version 1 cannot be read, so it was not made active: "
                    f"{err.message}"
                )
            if not problem:
                pointer, _, problem = await store.pointer()
        if problem:
            await self._raise_policy_alarm(problem)
        elif pointer is not None:
            await self._activate(pointer)
        watcher = await store.kv.watch(ACTIVE_KEY)
        self._policy_watch = asyncio.ensure_future(self._watch_policies(watcher))
        try:
            await self._load_shadow(await store.shadow())
        except SignalboxError as err:  # outcomes never depend on the shadow: start anyway
            log.error("policy: shadow policy set not loaded: %s", err.message)
            self.audit.alert_unreadable(
                KV_POLICIES, SHADOW_KEY, err.message, event="unusable_record",
                effect="no shadow evaluation", fix="signalbox policy shadow DIR | --off",
            )  # fmt: skip
        shadow_watcher = await store.kv.watch(SHADOW_KEY)
        self._shadow_watch = asyncio.ensure_future(self._watch_shadow(shadow_watcher))

    async def _watch_shadow(self, watcher: Any) -> None:
        try:
            async for entry in watcher:
                if entry is None:
                    continue
                try:
                    pointer = decode(entry.value, ActivePolicy) if entry.value else None
                    await self._load_shadow(pointer)
                except Exception:  # keep watching; outcomes never depend on the shadow
                    log.exception("policy: failed to load the shadow policy set")
        finally:
            with contextlib.suppress(Exception):
                await watcher.stop()

    async def _load_shadow(self, pointer: ActivePolicy | None) -> None:
        """Evaluate the set ``pointer`` names beside the active one (None: stop)."""
        if pointer is None:
            if self.shadow is not None:
                log.info("policy: shadow mode off")
            self.shadow = None
            return
        if self.shadow is not None and self.shadow.version == pointer.version:
            return
        assert self._policy_store is not None
        record = await self._policy_store.get(pointer.version)
        self.shadow = Shadow.of(pointer.version, policies_of(record))
        log.info("policy: shadow mode on with policy set version %d", pointer.version)

    async def _compare_shadow(
        self,
        request: AccessRequest,
        decision: Decision,
        *,
        actor: str,
        subject: str,
        trace_id: str,
    ) -> None:
        """Audit a disagreement of the shadow set with ``decision`` (outcome unchanged)."""
        shadow = self.shadow
        if shadow is None:
            return
        data = disagreement(shadow, request, decision)
        if data is None:
            return
        self.stats.shadow_disagreements += 1
        await self.audit.emit(
            "shadow", actor=actor, subject=subject, trace_id=trace_id,
            policy_version=decision.policy_version, data=data,
        )  # fmt: skip

    async def shadow_set(self, request: ShadowPolicies) -> ShadowStatus:
        """``shadow``: store a candidate and evaluate it beside the active set, or stop."""
        store = self.policy_store
        pointer, _ = await store.active()
        active = pointer.version if pointer else 0
        who = self.operator(request.requested_by)
        if request.candidate is None:
            await store.set_shadow(None)
            await self._load_shadow(None)
            await self.audit.emit(
                "admin", actor=who, subject=self.subjects.admin("policy", "shadow"),
                data={"op": "shadow_off"},
            )  # fmt: skip
            return ShadowStatus(enabled=False, active_version=active)
        policies = parse_candidate(request.candidate)
        record = await store.add(policies, who)
        assert record is not None
        await store.set_shadow(
            ActivePolicy(
                version=record.version, digest=record.digest, changed_by=who,
                changed_at=time.time(), reason="shadow",
            )
        )  # fmt: skip
        await self.audit.emit(
            "admin", actor=who, subject=self.subjects.admin("policy", "shadow"),
            data={"op": "shadow_on", "version": record.version, "digest": record.digest,
                  "label": record.label},
        )  # fmt: skip
        return ShadowStatus(
            enabled=True, version=record.version, digest=record.digest, label=record.label,
            active_version=active,
        )  # fmt: skip

    async def _watch_policies(self, watcher: Any) -> None:
        try:
            async for entry in watcher:
                if entry is None or not entry.value:
                    continue
                try:
                    pointer = decode(entry.value, ActivePolicy)
                except SchemaError as err:
                    await self.reject(err, subject=f"$KV.{KV_POLICIES}.{ACTIVE_KEY}")
                    await self._raise_policy_alarm(unreadable_pointer(err.message))
                    continue
                try:
                    await self._activate(pointer)
                except Exception:  # keep watching: the next change may load
                    log.exception("policy: failed to activate policy set %d", pointer.version)
        finally:
            with contextlib.suppress(Exception):
                await watcher.stop()

    async def _activate(self, pointer: ActivePolicy) -> None:
        """Load, re-validate and swap in the set ``pointer`` names; keep the old one on error."""
        assert self._policy_store is not None
        if not isinstance(self.decider, CedarDecider):
            return  # a custom decider manages its own rules
        async with self._activation:
            if pointer.version == self.active_version and (
                pointer.digest == self.decider.policies.digest
            ):
                self._clear_policy_alarm()
                return
            try:
                record = await self._policy_store.get(pointer.version)
                policies = policies_of(record)
                if policies.digest != pointer.digest:
                    raise ConfigError(
                        f"sb_policies: the active pointer names version {pointer.version} "
                        f"with digest {pointer.digest[:12]}, but that version's digest is "
                        f"{policies.digest[:12]}",
                        details={"version": pointer.version},
                    )
            except SignalboxError as err:
                log.error(
                    "policy: cannot load policy set version %d, keeping %s: %s",
                    pointer.version,
                    self.decider.version,
                    err.message,
                )
                await self.reject(
                    ConfigError(
                        f"policy set version {pointer.version} could not be loaded; this "
                        f"replica keeps {self.decider.version}: {err.message}",
                        details={"version": pointer.version, "kept": self.decider.version},
                    ),
                    subject=f"$KV.{KV_POLICIES}.{ACTIVE_KEY}",
                )
                await self._raise_policy_alarm(
                    f"policy set version {pointer.version} (named by the active-policy "
                    f"pointer) could not be loaded: {err.message}; fix it with `signalbox "
                    "policy rollback --to N` or `signalbox policy apply DIR`",
                    key=set_key(pointer.version),
                )
                return
            self.decider.swap(policies)
            self.active_version = pointer.version
            self._clear_policy_alarm()
            log.info(
                "policy: now evaluating policy set version %d (%s)",
                pointer.version,
                policies.version,
            )

    async def _raise_policy_alarm(self, problem: str, *, key: str = ACTIVE_KEY) -> None:
        """The stored active set cannot be used: keep evaluating the current one, and say so.

        ERROR log and an audit event (kind ``alert``) once per problem; the
        problem stays in :attr:`policy_alarm` (``signalbox policy show``)
        until a readable pointer to a loadable set is seen.
        """
        if problem == self.policy_alarm:
            return
        self.policy_alarm = problem
        kept = self.decider.version
        log.error("policy: %s; this replica keeps evaluating %s", problem, kept)
        self.audit.alert_unreadable(
            KV_POLICIES, key, problem,
            event="unreadable_record" if key == ACTIVE_KEY else "unusable_record",
            effect=f"this replica keeps evaluating {kept}",
            fix="signalbox policy rollback --to N | signalbox policy apply DIR",
        )  # fmt: skip

    def _clear_policy_alarm(self) -> None:
        if self.policy_alarm:
            log.info("policy: alarm cleared, evaluating %s", self.decider.version)
            self.policy_alarm = ""

    async def validate_set(self, request: ValidatePolicies) -> PolicyValidation:
        """``validate``: Cedar's verdict on a candidate set (nothing is stored)."""
        try:
            policies = parse_candidate(request.candidate)
        except InvalidInput as err:
            return PolicyValidation(ok=False, errors=tuple(err.details["errors"]))
        return PolicyValidation(
            ok=True, digest=policies.digest, policy_ids=tuple(policies.policies)
        )

    async def apply_set(self, request: ApplyPolicies) -> PolicyApplied:
        """``apply``: validate, store as the next version, move the pointer (compare-and-set)."""
        store = self.policy_store
        policies = parse_candidate(request.candidate)
        pointer, revision = await store.active()
        current = pointer.version if pointer else 0
        if request.expected_active and request.expected_active != current:
            raise Conflict(
                f"version {request.expected_active} is no longer active (version {current} "
                "is); nothing was applied. Check `signalbox policy diff` and retry",
                details={"expected": request.expected_active, "active": current},
            )
        if pointer is not None and pointer.digest == policies.digest:
            return PolicyApplied(
                version=current, previous=current, digest=policies.digest,
                label=policies.label, unchanged=True,
            )  # fmt: skip
        who = self.operator(request.requested_by)
        record = await store.add(policies, who)
        assert record is not None
        try:
            await self._move(store, record, who, "apply", current, revision)
        except Conflict:
            await store.withdraw(record.version)
            raise
        return PolicyApplied(
            version=record.version, previous=current, digest=record.digest, label=record.label
        )

    async def rollback_set(self, request: RollbackPolicies) -> PolicyApplied:
        """``rollback``: re-validate an earlier version and make it active again."""
        store = self.policy_store
        pointer, revision = await store.active()
        current = pointer.version if pointer else 0
        target = request.to or (pointer.previous if pointer else 0)
        if not target:
            raise NotFound(
                "there is no earlier policy set version to roll back to; "
                "pass --to N (see `signalbox policy history`)",
                details={"active": current},
            )
        record = await store.get(target)
        if target == current:
            return PolicyApplied(
                version=current, previous=current, digest=record.digest,
                label=record.label, unchanged=True,
            )  # fmt: skip
        try:
            policies_of(record)
        except ConfigError as err:
            raise InvalidInput(
                f"version {target} cannot be activated (the active set stays): {err.message}",
                details={"version": target, "errors": list(err.details.get("errors", []))},
            ) from err
        who = self.operator(request.requested_by)
        await self._move(store, record, who, "rollback", current, revision)
        return PolicyApplied(
            version=target, previous=current, digest=record.digest, label=record.label
        )

    async def _move(
        self,
        store: PolicyStore,
        record: PolicySetRecord,
        who: str,
        reason: str,
        current: int,
        revision: int,
    ) -> None:
        pointer = ActivePolicy(
            version=record.version, digest=record.digest, changed_by=who,
            changed_at=time.time(), reason=reason, previous=current,
        )  # fmt: skip
        await store.move(pointer, revision)
        await self.audit.emit(
            "admin",
            actor=who,
            subject=self.subjects.admin("policy", reason),
            policy_version=f"{record.label}@{record.digest[:12]}" if record.label
            else record.digest[:12],
            data={
                "op": f"policy.{reason}", "version": record.version, "previous": current,
                "digest": record.digest, "label": record.label,
                "policy_ids": list(record.policy_ids),
            },
        )  # fmt: skip

    async def show_set(self, request: ShowPolicies) -> PolicyShown:
        """``show``: one stored version (default: the active one) with its texts.

        With an alarm (the pointer, or the set it names, cannot be used) the
        default is the set this replica evaluates instead, and ``alarm`` says why.
        """
        store = self.policy_store
        pointer, _, problem = await store.pointer()
        active = pointer.version if pointer else 0
        alarm = problem or self.policy_alarm
        if alarm and not request.version:
            record = await self._evaluated_record(store, alarm)
        else:
            record = await store.get(request.version or active or 1)
        return PolicyShown(
            record=record, active=record.version == active and not alarm, active_version=active,
            alarm=alarm, evaluating=self.decider.version,
        )  # fmt: skip

    async def _evaluated_record(self, store: PolicyStore, alarm: str) -> PolicySetRecord:
        """The stored version whose texts this replica evaluates (newest first)."""
        digest = self.decider.policies.digest if isinstance(self.decider, CedarDecider) else ""
        for version in [self.active_version, *(await store.versions())[::-1]]:
            if not version:
                continue
            with contextlib.suppress(SignalboxError):
                record = await store.get(version)
                if record.digest == digest:
                    return record
        raise ConfigError(
            f"{alarm}; this replica evaluates {self.decider.version}, its folder's set, "
            "which is not stored in sb_policies",
            details={"alarm": alarm, "evaluating": self.decider.version},
        )

    async def set_history(self, request: PolicyHistoryRequest) -> PolicyHistory:
        """``history``: stored versions, newest first, the active one marked."""
        store = self.policy_store
        pointer, _ = await store.active()
        active = pointer.version if pointer else 0
        versions = (await store.versions())[::-1][: request.limit]
        infos = [await store.info(v, active) for v in versions]
        return PolicyHistory(
            versions=tuple(i for i in infos if i is not None), active_version=active
        )

    async def diff_sets(self, request: DiffPolicies) -> PolicyDiff:
        """``diff``: two stored versions, or a candidate against one (default: the active)."""
        store = self.policy_store
        pointer, _ = await store.active()
        active = pointer.version if pointer else 0
        old = await store.get(request.from_version or active or 1)
        if request.to_version or request.candidate is None:
            new = await store.get(request.to_version or active or 1)
            name = f"v{new.version}"
            return diff_sets(old, new.files, new.schema, new.policy_ids, to_name=name)
        candidate = parse_candidate(request.candidate)
        return diff_sets(
            old, candidate.files, candidate.schema_text, tuple(candidate.policies),
            to_name="candidate",
        )  # fmt: skip

    @property
    def policy_store(self) -> PolicyStore:
        """The versioned policy sets in ``sb_policies`` (after start)."""
        assert self._policy_store is not None, "policy service not started"
        return self._policy_store

    # -- human approvals -------------------------------------------------------

    @property
    def approvals(self) -> ApprovalDesk:
        """Parked calls and operators' decisions (services.policy.approvals) (after start)."""
        assert self._approvals is not None, "policy service not started"
        return self._approvals

    async def list_approvals(self, request: ListApprovals) -> ApprovalList:
        """``approvals.list``: pending approval requests (``all``: every stored one)."""
        return await self.approvals.list(request)

    async def approve(self, request: DecideApproval) -> ApprovalRequest:
        """``approvals.approve``: let the parked call through (once; audited)."""
        return await self.approvals.approve(request)

    async def deny(self, request: DecideApproval) -> ApprovalRequest:
        """``approvals.deny``: refuse the parked call (audited)."""
        return await self.approvals.deny(request)

    async def _park(
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
        headers = msg.headers or {}
        now = time.time()
        waits = self._requested_timeout(headers)
        expires_in = min(waits - expiry_margin(waits), self.settings.approval_timeout)
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
        await self.approvals.park(parked, expires_in)

    async def forward_approved(self, parked: Parked, record: ApprovalRequest) -> None:
        """Forward a parked call an operator approved, as an allowed call; audit the use
        (written ahead, as every allowed call's decision)."""
        self.stats.allowed += 1
        self.stats.approved += 1
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
        remaining = min(parked.deadline - time.time(), self.settings.call_timeout)
        if self.settings.write_ahead:
            started = time.monotonic()
            if not await self._write_ahead(
                decided, parked.reply, record.call_id, max(remaining, 0.001), _NO_GATE
            ):
                return
            remaining -= time.monotonic() - started
        else:
            await self.audit.emit("decision", **decided)
        await self._forward(
            parked.reply, parked.data, parked.headers, record.call_id, record.caller,
            record.target, record.capability, parked.trace_id, max(remaining, 0.001),
        )  # fmt: skip

    # -- hot path --------------------------------------------------------------

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
            timeout = self._timeout(headers)
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
        gate = await self._gate_call(msg, call_id, caller, caller_record, target, trace_id)
        if gate is None:
            return  # a breaker refused it (answered, audited, counted)
        context = RequestContext.from_headers(
            headers,
            unknown_tokens=unknown_estimate(self.settings.default_token_estimate, len(msg.data)),
        )
        call = CallRequest(caller, target, capability, caller_record, target_record, context)
        decision = self.decider.decide(call)
        annotate(trace.get_current_span(), lambda: _call_attributes(call, decision, call_id))
        if self.shadow is not None:
            await self._compare_shadow(
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
            self._spawn(
                self._forward_when_stored(
                    record, msg.reply, msg.data, headers, call_id, caller, target,
                    capability, trace_id, timeout, gate,
                ),
                msg,
            )  # fmt: skip
            return
        await self.audit.emit("decision", **record)
        if decision.effect != "allow" and gate.probes:
            # Not forwarded: the probe tested nothing; the next call may probe.
            self._settle_probes([(key, cid, None) for key, cid in gate.probes])
        if decision.effect == "needs_approval":
            await self._park(
                msg, call_id, data["approval_id"], caller, target, capability, trace_id, decision
            )
            return
        if decision.effect != "allow":
            self.stats.denied += 1
            body, hdrs = error_reply(_denied(decision, caller, target, capability))
            await self.nc.publish(msg.reply, body, headers=hdrs)
            return
        self.stats.allowed += 1
        await self._forward(
            msg.reply, msg.data, headers, call_id, caller, target, capability, trace_id, timeout,
            gate=gate,
        )  # fmt: skip

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

    async def _forward_when_stored(
        self,
        record: dict[str, Any],
        reply: str,
        payload: bytes,
        headers: dict[str, str],
        call_id: str,
        caller: str,
        target: str,
        capability: str,
        trace_id: str,
        timeout: float,
        gate: _Gate,
    ) -> None:
        """Forward an allowed call once its decision record is stored (write-ahead)."""
        started = time.monotonic()
        if not await self._write_ahead(record, reply, call_id, timeout, gate):
            return
        self.stats.allowed += 1
        await self._forward(
            reply, payload, headers, call_id, caller, target, capability, trace_id,
            timeout - (time.monotonic() - started), gate=gate,
        )  # fmt: skip

    async def _write_ahead(
        self, record: dict[str, Any], reply: str, call_id: str, timeout: float, gate: _Gate
    ) -> bool:
        """Store an allowed call's decision record before it is forwarded; False: it could
        not be stored in time, so the call was refused unrun (answered ``audit_unavailable``,
        the refusal recorded as the call's outcome)."""
        wait = min(timeout, self.settings.write_ahead_timeout)
        try:
            await self.audit.write_ahead("decision", timeout=wait, **record)
            return True
        except TimeoutError:
            pass
        self.stats.audit_unavailable += 1
        data = record["data"]
        err = AuditUnavailable(
            f"the decision on this call to {data['target']}.{data['capability']} could not be "
            f"stored within {wait:g}s (is JetStream up?); not forwarded, safe to retry",
            details={"target": data["target"], "capability": data["capability"]},
        )
        body, headers = error_reply(err)
        await self.nc.publish(reply, body, headers=headers)
        if gate.probes:
            self._settle_probes([(key, cid, None) for key, cid in gate.probes])
        outcome = CallOutcome(
            call_id=call_id, caller=data["caller"], target=data["target"],
            capability=data["capability"], ok=False, latency_ms=wait * 1000,
            error_code=err.code,
        )  # fmt: skip
        await self.audit.emit(
            "call", actor=data["caller"], subject=record["subject"],
            trace_id=record["trace_id"], data=outcome,
        )  # fmt: skip
        return False

    async def _forward(
        self,
        reply: str,
        payload: bytes,
        headers: dict[str, str],
        call_id: str,
        caller: str,
        target: str,
        capability: str,
        trace_id: str,
        timeout: float,
        *,
        gate: _Gate = _NO_GATE,
    ) -> None:
        """Send an allowed call to ``sb.in.<target>.<capability>[.<version>]``; relay its reply.

        The version comes from the target's route or the caller's pin
        (:meth:`RouteDesk.resolve`); without either, any version's instance takes it.
        """
        try:
            version = self.routes.resolve(target, headers)
        except SignalboxError as err:
            body, refused = error_reply(err)
            await self.nc.publish(reply, body, headers=refused)
            await self.reject(err, subject=self.subjects.inbound(target, capability), actor=caller)
            return
        self._next += 1
        token = str(self._next)
        loop = asyncio.get_running_loop()
        span, parent_span_id = self._delivery_span(headers, call_id, target, capability)
        self._pending[token] = _Pending(
            reply=reply,
            call_id=call_id,
            caller=caller,
            target=target,
            capability=capability,
            trace_id=trace_id,
            started=time.perf_counter(),
            request_bytes=len(payload),
            timer=loop.call_later(timeout, self._expire, token),
            span=span,
            parent_span_id=parent_span_id,
            probes=gate.probes,
            # What the caller allowed, for the breaker's fairness rule (guards): the
            # timer runs on what is left of its deadline, a little less after transit.
            timeout=self._allowed(headers, timeout),
            version=version,
            idempotency_key=headers.get(H_IDEMPOTENCY_KEY, ""),
        )
        forward = {
            H_CALL_ID: call_id,
            H_CALLER: caller,
            H_CAPABILITY: capability,
            # Microseconds: rounding to ms could put the deadline past the timeout.
            H_DEADLINE: f"{time.time() + timeout:.6f}",
        }
        if self._pending[token].idempotency_key:  # checked at intake (_on_call)
            forward[H_IDEMPOTENCY_KEY] = self._pending[token].idempotency_key
        # W3C trace context of the delivery span (the caller's own is not passed on).
        inject(forward, span, via=True)
        if gate.chain:
            forward[H_CHAIN] = gate.chain
            if self._chain_key is not None:
                # Bound to the delivery's trace: it vouches for the trace too (what the
                # target does while serving this call may continue it).
                forward[H_CHAIN_SIG] = sign_chain(
                    self._chain_key, target, gate.chain, time.time() + timeout + CHAIN_GRACE,
                    hex_ids(span)[0] or trace_id,
                )
        await self.nc.publish(
            self.subjects.inbound_version(target, capability, version)
            if version
            else self.subjects.inbound(target, capability),
            payload,
            reply=f"{self._inbox}.{token}",
            headers=forward,
        )

    async def _on_authz(self, msg: Msg) -> None:
        """``sb.authz.<agent>``: decide a model or tool use, audit it, answer a Decision."""
        agent = msg.subject.rsplit(".", 1)[1]
        fault = self.reply_fault(msg, Audience.AGENT, agent)
        if fault is not None:
            self.stats.rejected += 1
            await self.refuse_reply(msg, fault, actor=agent)
            return
        try:
            parents = parse_chain(
                self._verified_chain(agent, msg.headers, current_trace_id())
            )
        except InvalidInput:
            parents = ()
        decide = functools.partial(
            self._authorize, agent, msg.subject, current_trace_id(), parents=parents
        )
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
        probes = await self._gate_use(agent, use.agent_record, subject, trace_id)
        if isinstance(probes, Decision):
            return probes  # a breaker refused it (audited, counted)
        decision = self.decider.decide(use)
        annotate(trace.get_current_span(), lambda: _use_attributes(use, decision))
        if self.shadow is not None:
            await self._compare_shadow(
                use, decision, actor=agent, subject=subject, trace_id=trace_id
            )
        if decision.effect == "allow" and request.action == "use_model":
            decision = await self._reserve_budget(
                agent, use.agent_record, request, decision, trace_id, parents
            )
        if probes:  # an allowed request closes the breaker; a denied one tested nothing
            ok = True if decision.effect == "allow" else None
            self._settle_probes([(key, cid, ok) for key, cid in probes])
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
                "decision": _builtins(decision),
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

    def _verified_chain(
        self, receiver: str, headers: dict[str, str] | None, trace_id: str
    ) -> str:
        """The ``Sb-Chain`` in ``headers`` if this service signed it for ``receiver`` in trace
        ``trace_id``, else "".

        An agent sends back the chain it was given with what it does while
        serving a call; one it made up (or kept past its expiry, or carried
        into another trace) counts as none: it can neither charge another
        agent's budget nor trip another agent's loop breaker by naming it.
        """
        if not headers:
            return ""
        chain = headers.get(H_CHAIN, "")
        if chain and verify_chain(
            self._chain_key, receiver, chain, headers.get(H_CHAIN_SIG, ""), time.time(), trace_id
        ):
            return chain
        if chain:
            self.stats.unsigned_chains += 1
        return ""

    def _caller_trace(self, msg: Msg) -> otel_context.Context:
        """The trace context an agent's call or authorization may continue: its own trace,
        or one this service vouched for (a chain signed for it in that trace); any other
        ``traceparent`` it names is moved into a trace it owns (``broker.telemetry``)."""
        sender = self.subjects.sender_of(msg.subject) or ""  # sb.out.<caller>.…, sb.authz.<agent>
        headers = msg.headers
        chain = headers.get(H_CHAIN, "") if headers else ""
        now = time.time()

        def vouched(trace_id: str) -> bool:
            assert headers is not None
            signature = headers.get(H_CHAIN_SIG, "")
            return verify_chain(self._chain_key, sender, chain, signature, now, trace_id)

        context, claimed = trusted_parent(headers, sender, vouched if chain else None)
        if claimed:
            self.stats.moved_traces += 1
        return context

    @property
    def routes(self) -> RouteDesk:
        """Version routes and canary rollouts (services.policy.routes) (after start)."""
        assert self._routes is not None, "policy service not started"
        return self._routes

    async def _reserve_budget(
        self,
        agent: str,
        record: AgentRecord | None,
        request: AuthzRequest,
        decision: Decision,
        trace_id: str,
        parents: tuple[str, ...] = (),
    ) -> Decision:
        """Reserve an allowed model call's worst-case cost if any budget applies to it.

        ``parents`` are the agents the call is made for, from the signed
        delegation chain of the call the agent is serving (never from the
        request's own ``on_behalf_of``, which any agent could fill with any
        name): their budgets are charged too.

        The cost service holds the counters (``sb.cost.reserve``); this
        replica only asks when a budget applies (its watched ``sb_budgets``
        copy says so), so unbudgeted agents pay nothing. Fails closed: no
        estimate, a refusal, or no answer turns the allow into a deny that
        says why. So does an unreadable budget record among the ones the call
        would be charged to (``budget_unreadable``): never skipped as absent.
        """
        assert self.budgets is not None
        team = record.manifest.team if record is not None else ""
        if self.budgets.unreadable:
            bad = unreadable_keys(
                self.budgets.unreadable, agent=agent, team=team, project=request.project,
                on_behalf_of=parents,
            )  # fmt: skip
            if bad:
                self.stats.budget_unreadable += 1
                err = unreadable_budget(*bad[0])
                return _budget_denial(decision, "budget_unreadable", err.message)
        if not len(self.budgets) or not applicable_keys(
            self.budgets, agent=agent, team=team, project=request.project, on_behalf_of=parents
        ):
            return decision
        if not request.estimated_tokens:
            return _budget_denial(
                decision, "estimate_required",
                f"{agent} has a budget: authorize model calls with estimated_tokens (and "
                "max_output_tokens) so their worst-case cost can be reserved before the call",
            )  # fmt: skip
        ask = ReserveBudget(
            agent=agent, model=request.resource, input_tokens=request.estimated_tokens,
            output_tokens=request.max_output_tokens, project=request.project,
            on_behalf_of=parents, trace_id=trace_id,
        )  # fmt: skip
        try:
            reservation = await request_reply(
                self.nc, self.subjects.cost_reserve, ask, Reservation,
                timeout=self.settings.budget_reserve_timeout,
                hint="no cost service is answering budget reservations",
            )  # fmt: skip
        except SignalboxError as err:
            self.stats.budget_unavailable += 1
            return _budget_denial(
                decision, "budget_unavailable",
                f"the budget of {agent} could not be checked ({err.message}); model calls "
                "of budgeted agents are refused until the cost service answers",
            )  # fmt: skip
        if not reservation.granted:
            self.stats.budget_refused += 1
            b = reservation.refused
            assert b is not None
            return msgspec.structs.replace(
                _budget_denial(
                    decision, "budget_exceeded",
                    f"budget {b.key} would be exceeded: limit {usd(b.limit_usd)}, spent "
                    f"{usd(b.spent_usd)}, reserved {usd(b.reserved_usd)}, this call needs up "
                    f"to {usd(reservation.amount_usd)}; raise it with `signalbox budgets set` "
                    "or wait for the window to end",
                ),
                budget=b,
            )  # fmt: skip
        return msgspec.structs.replace(
            decision, reservation_id=reservation.id, reserved_usd=reservation.amount_usd
        )

    async def _on_reply(self, msg: Msg) -> None:
        token = msg.subject[len(self._inbox) + 1 :]
        pending = self._pending.pop(token, None)
        if pending is None:
            self.stats.late_replies += 1  # the caller was already told it timed out
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
        await self.nc.publish(pending.reply, body, headers=relay_headers)
        if relay is not None:
            relay.end()
        await self._outcome(pending, relay_headers, len(body))

    def _expire(self, token: str) -> None:
        pending = self._pending.pop(token, None)
        if pending is None:
            return
        if not self._pending:
            self._drained.set()
        self.stats.timeouts += 1
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

    async def _send_expiry(self, pending: _Pending, body: bytes, headers: dict[str, str]) -> None:
        await self.nc.publish(pending.reply, body, headers=headers)
        await self._outcome(pending, headers, 0)

    async def _outcome(self, p: _Pending, headers: dict[str, str] | None, reply_bytes: int) -> None:
        error_code = headers.get(H_ERROR, "") if headers else ""
        if error_code:
            self.stats.errors += 1
        else:
            self.stats.ok += 1
        self._breaker_outcome(p, error_code)
        latency_ms = (time.perf_counter() - p.started) * 1000
        if p.version:
            self.routes.record(p.target, p.version, error_code, latency_ms, p.timeout)
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
        await self.audit.emit(
            "call",
            actor=p.caller,
            subject=self.subjects.inbound(p.target, p.capability),
            trace_id=p.trace_id,
            span_id=span_id,
            parent_span_id=p.parent_span_id,
            data=outcome,
        )

    # -- circuit breakers (broker.runtime.breakers; detectors: services.policy.guards) ----------

    @property
    def breakers(self) -> BreakerBoard:
        """The fleet's circuit breakers (broker.runtime.breakers) (after start)."""
        assert self._breakers is not None, "policy service not started"
        return self._breakers

    async def _gate_call(
        self,
        msg: Msg,
        call_id: str,
        caller: str,
        caller_record: AgentRecord | None,
        target: str,
        trace_id: str,
    ) -> _Gate | None:
        """Before Cedar: feed the detectors, refuse loops, check the caller's, its team's
        and the target's breakers. None: refused (answered, audited, counted)."""
        self._observe_rate(caller)
        raw = self._verified_chain(caller, msg.headers, trace_id)
        chain: tuple[str, ...] = ()
        if raw:
            try:
                chain = parse_chain(raw)
            except InvalidInput as err:
                await self._reject(err, msg, caller)
                return None
            loop = self.guards.loop(chain, caller, target)
            if loop is not None:
                tripped = await self.breakers.trip(
                    breaker_key("agent", loop.agent), "call_loop",
                    f"call chain {' -> '.join(loop.path)} revisits {loop.agent} {loop.visits} "
                    f"times over {loop.depth} hops (limits: {self.guards.max_visits} visits, "
                    f"{self.guards.max_depth} hops)",
                    loop.figures(self.guards.max_depth, self.guards.max_visits),
                    cooldown=self.guards.cooldown,
                )  # fmt: skip
                self.stats.breaker_trips += 1
                await self._refuse_call(msg, call_id, caller, target, trace_id, tripped)
                return None
        forward = format_chain(chain, caller)
        board = self.breakers
        if not board.any_open():
            return _Gate(chain=forward)
        team = caller_record.manifest.team if caller_record is not None else ""
        blocked = board.check(f"agent.{caller}", f"team.{team}", f"agent.{target}")
        if not blocked:
            return _Gate(chain=forward)
        admitted = await self._admit(blocked, call_id)
        if isinstance(admitted, Breaker):
            await self._refuse_call(msg, call_id, caller, target, trace_id, admitted)
            return None
        return _Gate(chain=forward, probes=admitted)

    async def _gate_use(
        self, agent: str, record: AgentRecord | None, subject: str, trace_id: str
    ) -> Decision | tuple[tuple[str, str], ...]:
        """Before Cedar, for ``sb.authz``: the agent's and its team's breakers.

        Returns the probes this request makes, or the refusal (audited, counted).
        """
        self._observe_rate(agent)
        board = self.breakers
        if not board.any_open():
            return ()
        team = record.manifest.team if record is not None else ""
        blocked = board.check(f"agent.{agent}", f"team.{team}")
        if not blocked:
            return ()
        request_id = new_id()
        admitted = await self._admit(blocked, request_id)
        if not isinstance(admitted, Breaker):
            return admitted
        self.stats.breaker_refused += 1
        self.stats.authz_denied += 1
        err = breaker_open(admitted)
        fail(trace.get_current_span(), err.code, err.message)
        decision = Decision(
            effect="deny", reasons=(err.message,), reason_code="breaker_open",
            policy_version=self.decider.version, breaker=admitted,
        )  # fmt: skip
        await self.audit.emit(
            "decision", actor=agent, subject=subject, trace_id=trace_id,
            policy_version=decision.policy_version,
            data={"request_id": request_id, "agent": agent, "decision": _builtins(decision),
                  "breaker": msgspec.to_builtins(admitted)},
        )  # fmt: skip
        return decision

    async def _admit(
        self, blocked: tuple[Breaker, ...], call_id: str
    ) -> Breaker | tuple[tuple[str, str], ...]:
        """Whether a call held up by ``blocked`` may pass as their probe.

        Returns the probes claimed (compare-and-set: one call fleet-wide per
        breaker), or the breaker that refuses the call (claims already made
        are released). A rate-anomaly probe is judged at once: the breaker
        closes if the agent's rate is back to normal, else re-opens.
        """
        board = self.breakers
        probes: list[tuple[str, str]] = []
        refusal: Breaker | None = None
        for breaker in blocked:
            if not board.probe_due(breaker):
                refusal = breaker
                break
            claimed = await board.claim(breaker.key, call_id)
            if claimed is None:  # another call (here or on another replica) probes it
                refusal = board.get(breaker.key) or breaker
                break
            self.stats.breaker_probes += 1
            if claimed.reason == "rate_anomaly" and claimed.scope == "agent":
                figures = self.guards.rate.anomalous(claimed.name)
                settled = await board.settle(claimed.key, call_id, figures is None, figures=figures)
                if figures is not None:
                    refusal = settled or claimed
                    break
                continue
            probes.append((breaker.key, call_id))
        if refusal is None:
            return tuple(probes)
        if probes:
            self._settle_probes([(key, cid, None) for key, cid in probes])
        return refusal

    async def _refuse_call(
        self, msg: Msg, call_id: str, caller: str, target: str, trace_id: str, breaker: Breaker
    ) -> None:
        """Answer ``BreakerOpen``; audit it like a denial (reason ``breaker_open``)."""
        self.stats.breaker_refused += 1
        err = breaker_open(breaker)
        fail(trace.get_current_span(), err.code, err.message)
        capability = msg.subject.rsplit(".", 1)[1]
        await self.audit.emit(
            "decision", actor=caller, subject=msg.subject, trace_id=trace_id,
            policy_version=self.decider.version,
            data={
                "call_id": call_id, "caller": caller, "target": target,
                "capability": capability,
                "decision": {"effect": "deny", "reason_code": "breaker_open",
                             "reasons": [err.message], "policy_ids": [],
                             "policy_version": self.decider.version},
                "breaker": msgspec.to_builtins(breaker),
            },
        )  # fmt: skip
        body, headers = error_reply(err)
        await self.nc.publish(msg.reply, body, headers=headers)

    def _observe_rate(self, agent: str) -> None:
        """Count one call or authorization of ``agent``; trip its breaker on an anomaly."""
        figures = self.guards.rate.observe(agent)
        if figures is not None:
            self._auto_trip(
                f"agent.{agent}", "rate_anomaly",
                f"{agent} made {figures['rate']:g} calls/s over {figures['window_s']:g}s, "
                f"{figures['ratio']:g}x its baseline of {figures['baseline']:g} calls/s "
                f"(trips at {figures['factor']:g}x)",
                figures,
            )  # fmt: skip

    def _breaker_outcome(self, p: _Pending, error_code: str) -> None:
        """Feed a relayed outcome to the error-rate detector; settle the probes it made."""
        figures = self.guards.errors.observe(p.target, error_code, p.timeout)
        if figures is not None:
            self.guards.errors.forget(p.target)
            self._auto_trip(
                f"agent.{p.target}", "error_rate",
                f"{figures['errors']:g} of {figures['calls']:g} calls to {p.target} failed on "
                f"its side in {figures['window_s']:g}s ({figures['error_rate']:.0%}, trips "
                f"above {figures['threshold']:.0%})",
                figures,
            )  # fmt: skip
        if p.probes:
            failed = self.guards.errors.verdict(error_code, p.timeout)
            target_ok = None if failed is None else not failed
            target_key = f"agent.{p.target}"
            # The target's breaker is judged by the reply (a timeout under the caller's own
            # short deadline tested nothing: released); the caller's (manual, loop, budget)
            # by the call having gone through at all.
            self._settle_probes(
                [(k, cid, target_ok if k == target_key else True) for k, cid in p.probes]
            )

    def _auto_trip(self, key: str, reason: Any, text: str, figures: dict[str, float]) -> None:
        """Trip ``key`` in the background (once, if it is not already open)."""
        if key in self._tripping or self.breakers.check(key):
            return
        self._tripping.add(key)
        self._breaker_task(self._trip(key, reason, text, figures))

    async def _trip(self, key: str, reason: Any, text: str, figures: dict[str, float]) -> None:
        try:
            await self.breakers.trip(key, reason, text, figures, cooldown=self.guards.cooldown)
            self.stats.breaker_trips += 1
        finally:
            self._tripping.discard(key)

    def _settle_probes(self, items: list[tuple[str, str, bool | None]]) -> None:
        """Settle probes ``(key, call id, ok)`` in the background."""

        async def run() -> None:
            for key, call_id, ok in items:
                await self.breakers.settle(key, call_id, ok)

        self._breaker_task(run())

    def _breaker_task(self, coro: Awaitable[None]) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._breaker_tasks.add(task)
        task.add_done_callback(self._breaker_done)

    def _breaker_done(self, task: asyncio.Task[None]) -> None:
        self._breaker_tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("policy: breaker transition failed: %r", task.exception())

    def _breaker_changed(self, old: Breaker | None, new: Breaker | None) -> None:
        """A breaker closed (on any replica): its detectors start afresh."""
        closed = new is not None and new.state == "closed" and new.scope == "agent"
        if closed and new is not None and (old is None or old.state != "closed"):
            self.guards.rate.forget(new.name)
            self.guards.errors.forget(new.name)

    async def list_breakers(self, request: ListBreakers) -> BreakerList:
        """``breakers.list``: the breakers that are not closed (``all``: every one)."""
        return BreakerList(breakers=tuple(self.breakers.breakers(include_closed=request.all)))

    async def trip_breaker(self, request: TripBreaker) -> Breaker:
        """``breakers.trip``: open a breaker by hand (reason ``manual``; audited)."""
        return await self.breakers.trip(
            request.key, "manual", request.text, cooldown=request.cooldown,
            by=self.operator(request.requested_by),
        )  # fmt: skip

    async def reset_breaker(self, request: ResetBreaker) -> Breaker:
        """``breakers.reset``: close a breaker, whatever tripped it (audited)."""
        return await self.breakers.reset(
            request.key, by=self.operator(request.requested_by), text=request.text
        )

    # -- traces (broker.telemetry) -------------------------------------------------------

    def _delivery_span(
        self, headers: dict[str, str], call_id: str, target: str, capability: str
    ) -> tuple[Span, str]:
        """Start ``sb.delivery``: child of the decision span, else (an approved call,
        forwarded later) of the caller's span in ``headers``; returns it and its parent's id."""
        current = trace.get_current_span()
        parent = None if current.get_span_context().is_valid else extract(headers)
        parent_span = current if parent is None else trace.get_current_span(parent)
        span = self.telemetry.start("sb.delivery", parent=parent, kind=SpanKind.CLIENT)
        annotate(span, lambda: {
            ATTR["call_id"]: call_id, ATTR["target"]: target, ATTR["capability"]: capability,
            **agent_attributes(self.agents.get(target) if self.agents else None, "target"),
            ATTR["system"]: "nats",
            ATTR["destination"]: self.subjects.inbound(target, capability),
        })  # fmt: skip
        return span, hex_ids(parent_span)[1]

    def _reply_span(self, p: _Pending) -> Span | None:
        """Start ``sb.reply`` (the target's answer relayed to the caller), child of the
        delivery; only when spans record (its id is neither audited nor propagated)."""
        if p.span is None or not p.span.is_recording():
            return None
        parent = trace.set_span_in_context(p.span)
        return self.telemetry.start("sb.reply", parent=parent, kind=SpanKind.PRODUCER)

    def _end_delivery(self, p: _Pending, error_code: str) -> str:
        """End the delivery span of ``p`` (failed on an error reply); returns its span id."""
        if p.span is None:
            return ""
        if error_code:
            fail(p.span, error_code)
        p.span.end()
        return hex_ids(p.span)[1]

    def _allowed(self, headers: dict[str, str], fallback: float) -> float:
        """Seconds the caller allowed the call (``Sb-Timeout-Ms``, capped by ``call_timeout``)."""
        try:
            return min(self._requested_timeout(headers), self.settings.call_timeout)
        except InvalidInput:
            return fallback

    def _timeout(self, headers: dict[str, str]) -> float:
        """Seconds the call may take from now: the caller's timeout, capped by
        ``call_timeout`` and by what is left of the caller's absolute deadline.

        Raises:
            DeadlineExceeded: the caller's deadline (``Sb-Deadline``) has passed: a
                request its client held back and sent late. Refused, never forwarded.
            InvalidInput: a malformed ``Sb-Timeout-Ms`` or ``Sb-Deadline``.
        """
        timeout = min(self._requested_timeout(headers), self.settings.call_timeout)
        raw = headers.get(H_DEADLINE)
        if raw is None:
            return timeout
        try:
            left = float(raw) - time.time()
        except ValueError:
            raise InvalidInput(
                f"header {H_DEADLINE} must be Unix seconds, got {raw[:64]!r}",
                details={"header": H_DEADLINE, "value": raw[:64]},
            ) from None
        if not left > 0:  # (NaN included)
            raise DeadlineExceeded(
                f"the call reached the policy service {-left:.3f}s after its deadline "
                "(held back by the caller's connection?); refused, not forwarded",
                details={"deadline": raw[:64], "late_s": round(-left, 3)},
            )
        return min(timeout, left)

    def _requested_timeout(self, headers: dict[str, str]) -> float:
        """Seconds the caller waits (header ``Sb-Timeout-Ms``; default: ``call_timeout``)."""
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
        return value

    async def _reject(self, err: SignalboxError, msg: Msg, caller: str) -> None:
        self.stats.rejected += 1
        fail(trace.get_current_span(), err.code, err.message)
        if msg.reply:
            body, headers = error_reply(err)
            await self.nc.publish(msg.reply, body, headers=headers)
        await self.reject(err, subject=msg.subject, actor=caller)


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


def _budget_denial(decision: Decision, code: str, reason: str) -> Decision:
    """``decision`` (an allow) turned into a deny by a budget guard."""
    return msgspec.structs.replace(
        decision, effect="deny", reason_code=code, reasons=(*decision.reasons, reason)
    )


def _builtins(decision: Decision) -> dict[str, Any]:
    import msgspec

    out: dict[str, Any] = msgspec.to_builtins(decision)
    return out


def _log_failure(task: asyncio.Future[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("policy: failed to send a timeout reply: %r", task.exception())
