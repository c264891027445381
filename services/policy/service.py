"""Policy service: decides every mediated call and relays allowed ones; answers ``sb.authz``.

Flow of one call (all on the service's raw nats-py connection, which is the
hot path)::

    A --request sb.out.A.B.cap--> policy --(decide, audit)--> sb.in.B.cap --> B
    A <-------- reply (relayed) -- policy <------------ reply ------------- B

Decisions come from the Cedar engine (:mod:`services.policy.cedar`) over the
active policy set of the KV bucket ``sb_policies``
(:mod:`services.policy.lifecycle`). The folder ``settings.policy_dir``
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
    ConfigError,
    Conflict,
    InvalidInput,
    NotFound,
    PayloadTooLarge,
    SchemaError,
    SignalboxError,
    TargetUnavailable,
    UnknownTarget,
)
from broker.jetstream import KV_AGENTS, KV_APPROVALS, KV_POLICIES
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
from schemas import (
    ActivePolicy,
    AgentRecord,
    ApplyPolicies,
    ApprovalList,
    ApprovalRequest,
    AuthzRequest,
    CallOutcome,
    DecideApproval,
    Decision,
    DiffPolicies,
    ListApprovals,
    PolicyApplied,
    PolicyDiff,
    PolicyHistory,
    PolicyHistoryRequest,
    PolicySetRecord,
    PolicyShown,
    PolicyValidation,
    RollbackPolicies,
    ShadowPolicies,
    ShadowStatus,
    ShowPolicies,
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
)
from services.policy.lifecycle import (
    ACTIVE_KEY,
    SHADOW_KEY,
    PolicyStore,
    diff_sets,
    parse_candidate,
    policies_of,
)
from services.policy.shadow import Shadow, disagreement

__all__ = ["PolicyService"]

log = logging.getLogger(__name__)

_PASSTHROUGH = (H_TRACEPARENT, "tracestate")
_NO_CONTEXT = RequestContext()


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
        self.policy_store: PolicyStore | None = None
        #: Stored version this replica evaluates (0: its folder's set, not from KV).
        self.active_version = 0
        self._policy_watch: asyncio.Task[None] | None = None
        self._shadow_watch: asyncio.Task[None] | None = None
        #: The shadow set evaluated beside the active one (services.policy.shadow).
        self.shadow: Shadow | None = None
        self._activation = asyncio.Lock()
        s = self.subjects
        self.endpoint(s.admin("policy", "validate"), ValidatePolicies)(self.validate_set)
        self.endpoint(s.admin("policy", "apply"), ApplyPolicies)(self.apply_set)
        self.endpoint(s.admin("policy", "rollback"), RollbackPolicies)(self.rollback_set)
        self.endpoint(s.admin("policy", "show"), ShowPolicies)(self.show_set)
        self.endpoint(s.admin("policy", "history"), PolicyHistoryRequest)(self.set_history)
        self.endpoint(s.admin("policy", "diff"), DiffPolicies)(self.diff_sets)
        self.endpoint(s.admin("policy", "shadow"), ShadowPolicies)(self.shadow_set)
        #: Parked calls and operators' decisions (after start).
        self.approvals: ApprovalDesk | None = None
        self.endpoint(s.admin("approvals", "list"), ListApprovals)(self.list_approvals)
        self.endpoint(s.admin("approvals", "approve"), DecideApproval)(self.approve)
        self.endpoint(s.admin("approvals", "deny"), DecideApproval)(self.deny)
        self.stats: dict[str, int] = {
            "calls": 0, "allowed": 0, "denied": 0, "rejected": 0,
            "ok": 0, "errors": 0, "timeouts": 0, "late_replies": 0,
            "authz": 0, "authz_allowed": 0, "authz_denied": 0,
            "parked": 0, "approved": 0, "shadow_disagreements": 0, "internal_errors": 0,
        }  # fmt: skip

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
                self.stats["internal_errors"] += 1
                err = SignalboxError(
                    f"the policy service failed on this request ({type(exc).__name__}); "
                    "see its log",
                    details={"subject": msg.subject},
                )
                with contextlib.suppress(Exception):
                    await self.reject(err, subject=msg.subject)
                    if msg.reply:
                        body, headers = error_reply(err)
                        await self.nc.publish(msg.reply, body, headers=headers)

        return run

    async def on_start(self) -> None:
        self._kv = await self.js.key_value(KV_AGENTS)
        self.agents = KVCache(self._kv, AgentRecord, on_change=self._agent_changed)
        await self.agents.start()
        await self._start_lifecycle()
        self.approvals = ApprovalDesk(self, await self.js.key_value(KV_APPROVALS))
        await self.approvals.start()
        self._inbox = self.nc.new_inbox()
        self._reply_sub = await self.nc.subscribe(
            f"{self._inbox}.*", cb=self._on_reply, pending_msgs_limit=1_000_000
        )
        self._call_sub = await self.nc.subscribe(
            self.subjects.out_wildcard,
            queue="sb-policy",
            cb=self._guarded(self._on_call),
            pending_msgs_limit=1_000_000,
        )
        self._authz_sub = await self.nc.subscribe(
            self.subjects.authz_wildcard,
            queue="sb-policy",
            cb=self._guarded(self._on_authz),
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
        if self.approvals is not None:
            await self.approvals.stop()  # parked callers are told now, not left waiting
        if self._pending:
            self._drained.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._drained.wait(), self.settings.call_timeout)
        if self._reply_sub is not None:
            with contextlib.suppress(Exception):
                await self._reply_sub.unsubscribe()
        if self.agents is not None:
            await self.agents.stop()
        if self._shadow_watch is not None:
            self._shadow_watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._shadow_watch
            self._shadow_watch = None
        if self._policy_watch is not None:
            self._policy_watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._policy_watch
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
        """Seed the bucket if empty, load its active set, then watch the pointer."""
        store = self.policy_store = PolicyStore(await self.js.key_value(KV_POLICIES))
        pointer, _ = await store.active()
        if pointer is None and isinstance(self.decider, CedarDecider):
            # Exactly version 1 and only if absent: racing replicas agree on one seed.
            seed = self.decider.policies
            await store.add(seed, self.actor, version=1)
            with contextlib.suppress(Conflict):
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
            pointer, _ = await store.active()
        if pointer is not None:
            await self._activate(pointer)
        watcher = await store.kv.watch(ACTIVE_KEY)
        self._policy_watch = asyncio.ensure_future(self._watch_policies(watcher))
        await self._load_shadow(await store.shadow())
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
        assert self.policy_store is not None
        record = await self.policy_store.get(pointer.version)
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
        self.stats["shadow_disagreements"] += 1
        await self.audit.emit(
            "shadow", actor=actor, subject=subject, trace_id=trace_id,
            policy_version=decision.policy_version, data=data,
        )  # fmt: skip

    async def shadow_set(self, request: ShadowPolicies) -> ShadowStatus:
        """``shadow``: store a candidate and evaluate it beside the active set, or stop."""
        store = self._store()
        pointer, _ = await store.active()
        active = pointer.version if pointer else 0
        who = self._who(request.requested_by)
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
        assert self.policy_store is not None
        if not isinstance(self.decider, CedarDecider):
            return  # a custom decider manages its own rules
        async with self._activation:
            if pointer.version == self.active_version and (
                pointer.digest == self.decider.policies.digest
            ):
                return
            try:
                record = await self.policy_store.get(pointer.version)
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
                return
            self.decider.swap(policies)
            self.active_version = pointer.version
            log.info(
                "policy: now evaluating policy set version %d (%s)",
                pointer.version,
                policies.version,
            )

    async def validate_set(self, request: ValidatePolicies) -> PolicyValidation:
        """``validate``: Cedar's verdict on a candidate set (nothing is stored)."""
        try:
            policies = parse_candidate(request.candidate)
        except InvalidInput as err:
            return PolicyValidation(ok=False, errors=tuple(err.details["errors"]))
        return PolicyValidation(
            ok=True, digest=policies.digest, policy_ids=tuple(policies.policies)
        )

    def _who(self, requested_by: str) -> str:
        return f"operator:{requested_by}" if requested_by else "operator"

    async def apply_set(self, request: ApplyPolicies) -> PolicyApplied:
        """``apply``: validate, store as the next version, move the pointer (compare-and-set)."""
        store = self._store()
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
        who = self._who(request.requested_by)
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
        store = self._store()
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
        who = self._who(request.requested_by)
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
        """``show``: one stored version (default: the active one) with its texts."""
        store = self._store()
        pointer, _ = await store.active()
        active = pointer.version if pointer else 0
        record = await store.get(request.version or active or 1)
        return PolicyShown(record=record, active=record.version == active, active_version=active)

    async def set_history(self, request: PolicyHistoryRequest) -> PolicyHistory:
        """``history``: stored versions, newest first, the active one marked."""
        store = self._store()
        pointer, _ = await store.active()
        active = pointer.version if pointer else 0
        versions = (await store.versions())[::-1][: request.limit]
        infos = [await store.info(v, active) for v in versions]
        return PolicyHistory(
            versions=tuple(i for i in infos if i is not None), active_version=active
        )

    async def diff_sets(self, request: DiffPolicies) -> PolicyDiff:
        """``diff``: two stored versions, or a candidate against one (default: the active)."""
        store = self._store()
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

    def _store(self) -> PolicyStore:
        assert self.policy_store is not None, "policy service not started"
        return self.policy_store

    # -- human approvals -------------------------------------------------------

    def _desk(self) -> ApprovalDesk:
        assert self.approvals is not None, "policy service not started"
        return self.approvals

    async def list_approvals(self, request: ListApprovals) -> ApprovalList:
        """``approvals.list``: pending approval requests (``all``: every stored one)."""
        return await self._desk().list(request)

    async def approve(self, request: DecideApproval) -> ApprovalRequest:
        """``approvals.approve``: let the parked call through (once; audited)."""
        return await self._desk().approve(request)

    async def deny(self, request: DecideApproval) -> ApprovalRequest:
        """``approvals.deny``: refuse the parked call (audited)."""
        return await self._desk().deny(request)

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
            record=record, reply=msg.reply, data=msg.data, headers=dict(headers),
            subject=msg.subject, trace_id=trace_id, decision=decision,
            deadline=now + waits - expiry_margin(waits),
        )  # fmt: skip
        await self._desk().park(parked, expires_in)

    async def forward_approved(self, parked: Parked, record: ApprovalRequest) -> None:
        """Forward a parked call an operator approved, as an allowed call; audit the use."""
        self.stats["allowed"] += 1
        self.stats["approved"] += 1
        await self.audit.emit(
            "decision",
            actor=record.caller,
            subject=parked.subject,
            trace_id=parked.trace_id,
            policy_version=record.policy_version,
            data={
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
        )  # fmt: skip
        remaining = min(parked.deadline - time.time(), self.settings.call_timeout)
        await self._forward(
            parked.reply, parked.data, parked.headers, record.call_id, record.caller,
            record.target, record.capability, parked.trace_id, max(remaining, 0.001),
        )  # fmt: skip

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
        context = RequestContext.from_headers(headers)
        call = CallRequest(
            caller,
            target,
            capability,
            self.agents.get(caller) or await self._lookup(caller),
            target_record,
            context,
        )
        decision = self.decider.decide(call)
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
        if context != _NO_CONTEXT:  # the inputs a what-if replay needs
            data["context"] = {
                "estimated_tokens": context.estimated_tokens,
                "data_tags": list(context.data_tags),
                "on_behalf_of": list(context.on_behalf_of),
                "error": context.error,
            }
        await self.audit.emit(
            "decision",
            actor=caller,
            subject=msg.subject,
            trace_id=trace_id,
            policy_version=decision.policy_version,
            data=data,
        )
        if decision.effect == "needs_approval":
            await self._park(
                msg, call_id, data["approval_id"], caller, target, capability, trace_id, decision
            )
            return
        if decision.effect != "allow":
            self.stats["denied"] += 1
            body, hdrs = error_reply(_denied(decision, caller, target, capability))
            await self.nc.publish(msg.reply, body, headers=hdrs)
            return
        self.stats["allowed"] += 1
        await self._forward(
            msg.reply, msg.data, headers, call_id, caller, target, capability, trace_id, timeout
        )

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
    ) -> None:
        """Send an allowed call to ``sb.in.<target>.<capability>``; its reply is relayed."""
        self._next += 1
        token = str(self._next)
        loop = asyncio.get_running_loop()
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
            payload,
            reply=f"{self._inbox}.{token}",
            headers=forward,
        )

    async def _on_authz(self, msg: Msg) -> None:
        """``sb.authz.<agent>``: decide a model or tool use, audit it, answer a Decision."""
        agent = msg.subject.rsplit(".", 1)[1]
        if not msg.reply:
            await self._reject(
                InvalidInput(
                    "authorization request without a reply subject; use request-reply "
                    "(Agent.authorize or nc.request)",
                    details={"agent": agent},
                ),
                msg,
                agent,
            )
            return
        decide = functools.partial(
            self._authorize, agent, msg.subject, _trace_id(msg.headers or {})
        )
        body, headers = await self.handle(msg.data, msg.subject, AuthzRequest, decide)
        await self.nc.publish(msg.reply, body, headers=headers or None)

    async def _authorize(
        self, agent: str, subject: str, trace_id: str, request: AuthzRequest
    ) -> Decision:
        assert self.agents is not None
        self.stats["authz"] += 1
        use = UseRequest(
            agent=agent,
            agent_record=self.agents.get(agent) or await self._lookup(agent),
            action=request.action,
            resource=request.resource,
            provider=request.provider,
            region=request.region,
            price_per_1k_tokens=request.price_per_1k_tokens,
            context=RequestContext(
                estimated_tokens=request.estimated_tokens,
                data_tags=request.data_tags,
                on_behalf_of=request.on_behalf_of,
            ),
        )
        decision = self.decider.decide(use)
        if self.shadow is not None:
            await self._compare_shadow(
                use, decision, actor=agent, subject=subject, trace_id=trace_id
            )
        self.stats["authz_allowed" if decision.effect == "allow" else "authz_denied"] += 1
        await self.audit.emit(
            "decision",
            actor=agent,
            subject=subject,
            trace_id=trace_id,
            policy_version=decision.policy_version,
            data={
                "request_id": new_id(), "agent": agent, "action": request.action,
                "resource": request.resource, "provider": request.provider,
                "region": request.region, "price_per_1k_tokens": request.price_per_1k_tokens,
                "estimated_tokens": request.estimated_tokens,
                "data_tags": list(request.data_tags),
                "on_behalf_of": list(request.on_behalf_of),
                "decision": _builtins(decision),
            },
        )  # fmt: skip
        return decision

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
        return min(self._requested_timeout(headers), self.settings.call_timeout)

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
            "reason_code": decision.reason_code,
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
