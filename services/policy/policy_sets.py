"""The policy service's policy sets: seeded, watched, activated, shadowed, managed by operators.

Decisions come from the Cedar engine (:mod:`services.policy.cedar`) over the
active policy set of the KV bucket ``sb_policies``
(:mod:`services.policy.store`). The folder ``settings.policy_dir``
(default: the shipped ``policies/``) is loaded at start (an invalid set stops
the service with Cedar's messages) and seeds the bucket when it is empty;
after that the bucket decides. Every replica watches the bucket's ``active``
pointer and swaps the new set in when it moves (no redeploy, no restart), and
its ``shadow`` key (:mod:`services.policy.shadow`). Operators manage sets on
``sb.admin.policy.<op>``::

    validate  ValidatePolicies      -> PolicyValidation
    apply     ApplyPolicies         -> PolicyApplied     (audited, kind admin)
    rollback  RollbackPolicies      -> PolicyApplied     (audited, kind admin)
    show      ShowPolicies          -> PolicyShown
    history   PolicyHistoryRequest  -> PolicyHistory
    diff      DiffPolicies          -> PolicyDiff
    shadow    ShadowPolicies        -> ShadowStatus      (audited, kind admin)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from typing import Any

from broker.codec import decode
from broker.diagnostics import cancel_and_wait
from broker.errors import ConfigError, Conflict, InvalidInput, NotFound, SchemaError, SignalboxError
from broker.runtime.desk import EndpointSpec, ServiceHost, declare_endpoint
from broker.runtime.jetstream import KV_POLICIES
from schemas import (
    ActivePolicy,
    ApplyPolicies,
    Decision,
    DiffPolicies,
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
from services.policy.cedar.decider import CedarDecider
from services.policy.decider import AccessRequest, Decider
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

__all__ = ["PolicySetDesk"]

log = logging.getLogger(__name__)


class PolicySetDesk:
    """Keeps this replica's decider on the active stored set; serves ``sb.admin.policy.<op>``.

    Args:
        host: The service it lives in (JetStream, audit, operators, rejections).
        decider: The decision engine whose set it swaps (a custom decider, not
            Cedar, manages its own rules: it is left alone).
        stats: The service's counters (``shadow_disagreements``).
    """

    def __init__(self, host: ServiceHost, decider: Decider, stats: PolicyStats) -> None:
        self._host = host
        self._decider = decider
        self._stats = stats
        #: The versioned sets in KV (after start).
        self._store: PolicyStore | None = None
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

    @property
    def store(self) -> PolicyStore:
        """The versioned policy sets in ``sb_policies`` (after start)."""
        assert self._store is not None, "policy service not started"
        return self._store

    def endpoints(self) -> Sequence[EndpointSpec[Any]]:
        """``sb.admin.policy.<op>``."""
        admin = self._host.subjects.admin
        return (
            declare_endpoint(admin("policy", "validate"), ValidatePolicies, self.validate_set),
            declare_endpoint(admin("policy", "apply"), ApplyPolicies, self.apply_set),
            declare_endpoint(admin("policy", "rollback"), RollbackPolicies, self.rollback_set),
            declare_endpoint(admin("policy", "show"), ShowPolicies, self.show_set),
            declare_endpoint(admin("policy", "history"), PolicyHistoryRequest, self.set_history),
            declare_endpoint(admin("policy", "diff"), DiffPolicies, self.diff_sets),
            declare_endpoint(admin("policy", "shadow"), ShadowPolicies, self.shadow_set),
        )

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Seed the bucket if empty, load its active set, then watch the pointer.

        Nothing stored stops the start: an unreadable pointer or a set that
        does not load leaves this replica on its folder's set, with an alarm
        (:meth:`_raise_alarm`).
        """
        host = self._host
        store = self._store = PolicyStore(await host.js.key_value(KV_POLICIES), host.js)
        pointer, _, problem = await store.pointer()
        if problem and isinstance(self._decider, CedarDecider):
            # Stored as version 1 if that is free, so `policy rollback --to 1` can repair
            # the pointer; the pointer itself is left for the operator.
            await store.add(self._decider.policies, host.actor, version=1)
        elif pointer is None and isinstance(self._decider, CedarDecider):
            # Exactly version 1 and only if absent: racing replicas agree on one seed.
            seed = self._decider.policies
            await store.add(seed, host.actor, version=1)
            try:
                await store.move(
                    ActivePolicy(
                        version=1,
                        digest=(await store.get(1)).digest,
                        changed_by=host.actor,
                        changed_at=time.time(),
                        reason="seed",
                    ),
                    0,
                )
            except Conflict:
                pass  # another replica seeded first
            except SignalboxError as err:  # version 1 is there but unreadable
                problem = (
                    f"policy set version 1 cannot be read, so it was not made active: {err.message}"
                )
            if not problem:
                pointer, _, problem = await store.pointer()
        if problem:
            await self._raise_alarm(problem)
        elif pointer is not None:
            await self._activate(pointer)
        watcher = await store.kv.watch(ACTIVE_KEY)
        self._policy_watch = asyncio.ensure_future(self._watch_policies(watcher))
        try:
            await self._load_shadow(await store.shadow())
        except SignalboxError as err:  # outcomes never depend on the shadow: start anyway
            log.error("policy: shadow policy set not loaded: %s", err.message)
            host.audit.alert_unreadable(
                KV_POLICIES, SHADOW_KEY, err.message, event="unusable_record",
                effect="no shadow evaluation", fix="signalbox policy shadow DIR | --off",
            )  # fmt: skip
        shadow_watcher = await store.kv.watch(SHADOW_KEY)
        self._shadow_watch = asyncio.ensure_future(self._watch_shadow(shadow_watcher))

    async def stop(self) -> None:
        """Stop watching the shadow and active pointers."""
        await cancel_and_wait(self._shadow_watch, "the shadow policy watch")
        self._shadow_watch = None
        await cancel_and_wait(self._policy_watch, "the policy watch")
        self._policy_watch = None

    # -- shadow mode ---------------------------------------------------------------------

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
        record = await self.store.get(pointer.version)
        self.shadow = Shadow.of(pointer.version, policies_of(record))
        log.info("policy: shadow mode on with policy set version %d", pointer.version)

    async def compare_shadow(
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
        self._stats.shadow_disagreements += 1
        await self._host.audit.emit(
            "shadow", actor=actor, subject=subject, trace_id=trace_id,
            policy_version=decision.policy_version, data=data,
        )  # fmt: skip

    async def shadow_set(self, request: ShadowPolicies) -> ShadowStatus:
        """``shadow``: store a candidate and evaluate it beside the active set, or stop."""
        host = self._host
        store = self.store
        pointer, _ = await store.active()
        active = pointer.version if pointer else 0
        who = host.operator(request.requested_by)
        if request.candidate is None:
            await store.set_shadow(None)
            await self._load_shadow(None)
            await host.audit.emit(
                "admin", actor=who, subject=host.subjects.admin("policy", "shadow"),
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
        await host.audit.emit(
            "admin", actor=who, subject=host.subjects.admin("policy", "shadow"),
            data={"op": "shadow_on", "version": record.version, "digest": record.digest,
                  "label": record.label},
        )  # fmt: skip
        return ShadowStatus(
            enabled=True, version=record.version, digest=record.digest, label=record.label,
            active_version=active,
        )  # fmt: skip

    # -- the active set --------------------------------------------------------------------

    async def _watch_policies(self, watcher: Any) -> None:
        try:
            async for entry in watcher:
                if entry is None or not entry.value:
                    continue
                try:
                    pointer = decode(entry.value, ActivePolicy)
                except SchemaError as err:
                    await self._host.reject(err, subject=f"$KV.{KV_POLICIES}.{ACTIVE_KEY}")
                    await self._raise_alarm(unreadable_pointer(err.message))
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
        decider = self._decider
        if not isinstance(decider, CedarDecider):
            return  # a custom decider manages its own rules
        async with self._activation:
            if pointer.version == self.active_version and (
                pointer.digest == decider.policies.digest
            ):
                self._clear_alarm()
                return
            try:
                record = await self.store.get(pointer.version)
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
                    decider.version,
                    err.message,
                )
                await self._host.reject(
                    ConfigError(
                        f"policy set version {pointer.version} could not be loaded; this "
                        f"replica keeps {decider.version}: {err.message}",
                        details={"version": pointer.version, "kept": decider.version},
                    ),
                    subject=f"$KV.{KV_POLICIES}.{ACTIVE_KEY}",
                )
                await self._raise_alarm(
                    f"policy set version {pointer.version} (named by the active-policy "
                    f"pointer) could not be loaded: {err.message}; fix it with `signalbox "
                    "policy rollback --to N` or `signalbox policy apply DIR`",
                    key=set_key(pointer.version),
                )
                return
            decider.swap(policies)
            self.active_version = pointer.version
            self._clear_alarm()
            log.info(
                "policy: now evaluating policy set version %d (%s)",
                pointer.version,
                policies.version,
            )

    async def _raise_alarm(self, problem: str, *, key: str = ACTIVE_KEY) -> None:
        """The stored active set cannot be used: keep evaluating the current one, and say so.

        ERROR log and an audit event (kind ``alert``) once per problem; the
        problem stays in :attr:`policy_alarm` (``signalbox policy show``)
        until a readable pointer to a loadable set is seen.
        """
        if problem == self.policy_alarm:
            return
        self.policy_alarm = problem
        kept = self._decider.version
        log.error("policy: %s; this replica keeps evaluating %s", problem, kept)
        self._host.audit.alert_unreadable(
            KV_POLICIES, key, problem,
            event="unreadable_record" if key == ACTIVE_KEY else "unusable_record",
            effect=f"this replica keeps evaluating {kept}",
            fix="signalbox policy rollback --to N | signalbox policy apply DIR",
        )  # fmt: skip

    def _clear_alarm(self) -> None:
        if self.policy_alarm:
            log.info("policy: alarm cleared, evaluating %s", self._decider.version)
            self.policy_alarm = ""

    # -- operators -----------------------------------------------------------------------

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
        store = self.store
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
        who = self._host.operator(request.requested_by)
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
        store = self.store
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
        who = self._host.operator(request.requested_by)
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
        await self._host.audit.emit(
            "admin",
            actor=who,
            subject=self._host.subjects.admin("policy", reason),
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
        store = self.store
        pointer, _, problem = await store.pointer()
        active = pointer.version if pointer else 0
        alarm = problem or self.policy_alarm
        if alarm and not request.version:
            record = await self._evaluated_record(store, alarm)
        else:
            record = await store.get(request.version or active or 1)
        return PolicyShown(
            record=record, active=record.version == active and not alarm, active_version=active,
            alarm=alarm, evaluating=self._decider.version,
        )  # fmt: skip

    async def _evaluated_record(self, store: PolicyStore, alarm: str) -> PolicySetRecord:
        """The stored version whose texts this replica evaluates (newest first)."""
        decider = self._decider
        digest = decider.policies.digest if isinstance(decider, CedarDecider) else ""
        for version in [self.active_version, *(await store.versions())[::-1]]:
            if not version:
                continue
            with contextlib.suppress(SignalboxError):
                record = await store.get(version)
                if record.digest == digest:
                    return record
        raise ConfigError(
            f"{alarm}; this replica evaluates {decider.version}, its folder's set, "
            "which is not stored in sb_policies",
            details={"alarm": alarm, "evaluating": decider.version},
        )

    async def set_history(self, request: PolicyHistoryRequest) -> PolicyHistory:
        """``history``: stored versions, newest first, the active one marked."""
        store = self.store
        pointer, _ = await store.active()
        active = pointer.version if pointer else 0
        versions = (await store.versions())[::-1][: request.limit]
        infos = [await store.info(v, active) for v in versions]
        return PolicyHistory(
            versions=tuple(i for i in infos if i is not None), active_version=active
        )

    async def diff_sets(self, request: DiffPolicies) -> PolicyDiff:
        """``diff``: two stored versions, or a candidate against one (default: the active)."""
        store = self.store
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
