"""Version routes and canary rollouts in the policy service (KV ``sb_routes``).

The route of an agent name splits its calls across registered versions
(:mod:`services.policy.rollout` picks one per call). Every replica watches
``sb_routes``, so a change applies to the next call everywhere (well within
a second). A routed call is forwarded to ``sb.in.<target>.<capability>.<version
token>``, which only that version's instances subscribe to. Without a route it
goes to the established version's subject while several versions are
registered (decision 38), and to ``sb.in.<target>.<capability>`` (any
instance) while there is one.

Operators manage routes on ``sb.admin.rollout.<op>`` (:class:`RouteDesk`):
every change is validated against the registry (versions must be registered,
and healthy to get traffic), written with a compare-and-set on the key's KV
revision (two operators cannot silently overwrite each other), and audited
with who made it. The route keeps the one it replaced (``previous``), which is
what ``rollback`` returns to.

Automatic rollback. Each replica counts the outcomes of the calls it routes
per version (:class:`~services.policy.rollout.OutcomeWindow`) and publishes
them to ``sb_rollout_stats`` about once a second; each replica merges every
replica's figures and checks the canary of every guarded route against its
stable version (error rate, p99 latency, and cost per call from the cost
service). A breach sets the canary's weight to zero with a compare-and-set
(the first replica wins, the others see the new route), and is audited with
the figures. Callers see nothing but the failed calls already made.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import msgspec
import semantic_version  # type: ignore[import-untyped]  # ships no type hints
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from broker.codec import decode, encode
from broker.diagnostics import cancel_and_wait
from broker.errors import Conflict, InvalidInput, NotFound, SignalboxError, TargetUnavailable
from broker.ids import new_id
from broker.replies import H_ROUTE_KEY, H_TARGET_VERSION, request
from broker.runtime.desk import EndpointSpec, ServiceHost, declare_endpoint
from broker.runtime.jetstream import KV_ROLLOUT_STATS, KV_ROUTES
from broker.runtime.kvcache import KVCache
from schemas import (
    AgentRecord,
    CostByVersion,
    CostByVersionRequest,
    DeprecateVersion,
    DeregisterAgent,
    DiscoverAgents,
    DiscoverResult,
    PromoteRollout,
    RollbackRollout,
    RolloutStatus,
    RolloutStatusRequest,
    Route,
    SetRollout,
    VersionFigures,
    VersionStats,
)
from services.policy.rollout import Breach, Merged, OutcomeWindow, breach, merge, pick

__all__ = ["RouteDesk"]

log = logging.getLogger(__name__)

_NO_FIGURES = Merged()


class RouteDesk:
    """Resolves routes on the call path, records outcomes, guards canaries, serves operators.

    Args:
        service: The service it lives in (connection, JetStream, audit, settings).
        counts: Whether an outcome (error code, seconds the caller allowed) counts
            as the version's failure: the breaker's fairness rule
            (``Guards.errors.counts``), so a guard and a breaker judge alike.
    """

    def __init__(
        self,
        service: ServiceHost,
        *,
        counts: Callable[[str, float], bool],
        established: Callable[[str], str] = lambda _target: "",
    ) -> None:
        self.service = service
        self._counts = counts
        self._established = established
        #: The ``sb_routes`` and ``sb_rollout_stats`` buckets and their watched
        #: copies (after start).
        self.kv: KeyValue
        self.stats_kv: KeyValue
        self.routes: KVCache[Route]
        self.figures: KVCache[VersionStats]
        self.replica = new_id()[:12]
        self.windows: dict[str, OutcomeWindow] = {}
        self.interval = service.settings.rollout_guard_interval
        #: Automatic rollbacks made by this replica.
        self.rollbacks = 0
        self._costs: dict[str, tuple[float, float, dict[str, float]]] = {}
        self._task: asyncio.Task[None] | None = None

    def endpoints(self) -> Sequence[EndpointSpec[Any]]:
        """``sb.admin.rollout.<op>``."""
        admin = self.service.subjects.admin
        return (
            declare_endpoint(admin("rollout", "set"), SetRollout, self.set),
            declare_endpoint(admin("rollout", "promote"), PromoteRollout, self.promote),
            declare_endpoint(admin("rollout", "rollback"), RollbackRollout, self.rollback),
            declare_endpoint(admin("rollout", "deprecate"), DeprecateVersion, self.deprecate),
            declare_endpoint(admin("rollout", "status"), RolloutStatusRequest, self.status),
        )

    async def start(self) -> None:
        """Open, load and watch routes and figures; start publishing and guarding."""
        js = self.service.js
        self.kv = await js.key_value(KV_ROUTES)
        self.stats_kv = await js.key_value(KV_ROLLOUT_STATS)
        self.routes = KVCache(self.kv, Route)
        self.figures = KVCache(self.stats_kv, VersionStats)
        await self.routes.start()
        await self.figures.start()
        self._task = asyncio.ensure_future(self._loop())

    async def stop(self) -> None:
        """Stop guarding (publishing a last snapshot), stop watching."""
        await cancel_and_wait(self._task, "the route guard")
        self._task = None
        with contextlib.suppress(Exception):
            await self._publish(time.time())
        await self.figures.stop()
        await self.routes.stop()

    # -- call path -------------------------------------------------------------

    def resolve(self, target: str, headers: dict[str, str]) -> str:
        """The version a call to ``target`` goes to: the caller's pin, else the route's pick,
        else (several versions registered) the established one; "" for any instance.

        Raises:
            TargetUnavailable: the call pins a deprecated version.
        """
        route = self.routes.get(target)
        pinned = headers.get(H_TARGET_VERSION)
        if pinned:
            if route is not None and pinned in route.deprecated:
                raise TargetUnavailable(
                    f"{target} {pinned} is deprecated and takes no new calls; call "
                    f"without {H_TARGET_VERSION} or pin another version",
                    details={"target": target, "version": pinned},
                )
            return pinned
        if route is None:
            # Several versions and no route: the established one, unless the
            # deployment opted into "any version" (SIGNALBOX_UNROUTED_VERSIONS=any).
            if self.service.settings.unrouted_versions == "any":
                return ""
            return self._established(target)
        return pick(route, headers.get(H_ROUTE_KEY, ""))

    def record(
        self,
        target: str,
        version: str,
        error_code: str,
        latency_ms: float,
        waited: float = math.inf,
    ) -> None:
        """Count the outcome of a routed call (only target-side failures are errors).

        ``waited`` is the call's timeout: a timeout under a caller's own short
        deadline is not the version's failure
        (:meth:`services.policy.guards.ErrorRate.counts`).
        """
        window = self.windows.get(target)
        if window is None:
            window = self.windows[target] = OutcomeWindow(
                target, slot=self.service.settings.rollout_stats_slot
            )
        failed = self._counts(error_code, waited)
        window.record(version, ok=not failed, latency_ms=latency_ms, now=time.time())

    # -- publishing and guarding -------------------------------------------------

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            now = time.time()
            try:
                await self._publish(now)
                await self._guard(now)
            except Exception:  # keep guarding; the next round may work
                log.exception("policy: rollout guard round failed")

    async def _publish(self, now: float) -> None:
        for target, window in list(self.windows.items()):
            if window.changed:
                snapshot = window.snapshot(self.replica, now)
                await self.stats_kv.put(f"{target}.{self.replica}", encode(snapshot))

    def merged(self, target: str, since: float) -> dict[str, Merged]:
        """Every replica's figures of ``target`` per version since ``since``."""
        prefix = f"{target}."
        snaps = [s for k in self.figures if k.startswith(prefix) and (s := self.figures.get(k))]
        return merge(snaps, since)

    async def _guard(self, now: float) -> None:
        for target in list(self.routes):
            route = self.routes.get(target)
            span = _guard_span(route, now)
            if route is None or route.guard is None or span is None:
                continue
            since = span[1]
            figures = self.merged(target, since)
            canary = figures.get(route.canary, _NO_FIGURES)
            if canary.calls < route.guard.min_calls:
                continue
            stable = figures.get(route.stable, _NO_FIGURES)
            costs = await self._cost_per_call(target, since, figures, now)
            found = breach(
                route.guard, canary, stable,
                canary_cost=costs.get(route.canary), stable_cost=costs.get(route.stable),
            )  # fmt: skip
            if found is not None:
                await self._auto_rollback(route, found)

    async def _cost_per_call(
        self, target: str, since: float, figures: dict[str, Merged], now: float
    ) -> dict[str, float]:
        """Cost per call per version (asked of the cost service at most every 5 s)."""
        cached = self._costs.get(target)
        if cached is not None and cached[0] == since and now - cached[1] < 5.0:
            return cached[2]
        try:
            reply = await request(
                self.service.nc, self.service.subjects.cost_versions,
                CostByVersionRequest(agent=target, since=since), CostByVersion, timeout=2.0,
            )  # fmt: skip
        except SignalboxError:
            return {}  # no cost service: the cost guard waits, the others still apply
        per_call = {
            row.key: row.cost_usd / figures[row.key].calls
            for row in reply.versions
            if row.key in figures and figures[row.key].calls
        }
        self._costs[target] = (since, now, per_call)
        return per_call

    async def _auto_rollback(self, route: Route, found: Breach) -> None:
        who = self.service.actor
        new = Route(
            target=route.target, weights={route.stable: 100}, stable=route.stable,
            sticky=route.sticky, deprecated=route.deprecated,
            previous=msgspec.structs.replace(route, previous=None), changed_by=who,
            changed_at=time.time(), reason=f"auto-rollback of {route.canary}: {found.text}",
            figures=found.figures,
        )  # fmt: skip
        try:
            await self._write(route.target, new, expected=route)
        except Conflict:
            return  # another replica (or an operator) changed it first
        self.rollbacks += 1
        log.warning("policy: rolled %s %s back: %s", route.target, route.canary, found.text)
        await self.service.audit.emit(
            "admin",
            actor=who,
            subject=self.service.subjects.admin("rollout", "rollback"),
            data={
                "op": "auto_rollback", "target": route.target, "canary": route.canary,
                "stable": route.stable, "guard": found.guard, "text": found.text,
                "figures": found.figures, "weights_before": dict(route.weights),
            },
        )  # fmt: skip

    # -- storage ---------------------------------------------------------------

    async def _current(self, target: str) -> tuple[Route | None, int]:
        try:
            entry = await self.kv.get(target)
        except KeyNotFoundError:
            return None, 0
        if not entry.value:
            return None, int(entry.revision or 0)
        return decode(entry.value, Route), int(entry.revision or 0)

    async def _write(self, target: str, route: Route, *, expected: Route | None) -> None:
        """Store ``route`` if ``target``'s route is still ``expected`` (compare-and-set)."""
        current, revision = await self._current(target)
        if current != expected:
            raise Conflict(
                f"the route of {target} changed meanwhile; check `signalbox rollout status "
                f"{target}` and retry",
                details={"target": target},
            )
        try:
            if revision:
                await self.kv.update(target, encode(route), last=revision)
            else:
                await self.kv.create(target, encode(route))
        except KeyWrongLastSequenceError as exc:
            raise Conflict(
                f"the route of {target} changed meanwhile; check `signalbox rollout status "
                f"{target}` and retry",
                details={"target": target},
            ) from exc
        # Every replica (this one too) applies it from its watch of the bucket.

    # -- registry ----------------------------------------------------------------

    async def _versions(self, target: str) -> dict[str, AgentRecord]:
        """Registered versions of ``target`` with their health (asked of the registry)."""
        result = await request(
            self.service.nc, self.service.subjects.registry("discover"),
            DiscoverAgents(name=target, all_versions=True, limit=1000), DiscoverResult,
            timeout=5.0, hint="no registry answers; start one with `signalbox up`",
        )  # fmt: skip
        return {r.manifest.version: r for r in result.agents if r.manifest.name == target}

    @staticmethod
    def _check(target: str, route: Route, known: dict[str, AgentRecord]) -> None:
        """Refuse a route naming unknown versions, or giving traffic to unhealthy ones.

        ``known``: the registered versions (:meth:`_versions`), read once per change.
        """
        if not known:
            raise _unknown(target)
        for version, weight in route.weights.items():
            record = known.get(version)
            if record is None:
                raise NotFound(
                    f"{target} has no registered version {version}; registered: "
                    f"{', '.join(sorted(known))}",
                    details={"target": target, "version": version, "known": sorted(known)},
                )
            if weight > 0 and record.health != "healthy":
                raise InvalidInput(
                    f"{target} {version} is {record.health}, not healthy: it cannot take "
                    "traffic; start its instances first",
                    details={"target": target, "version": version, "health": record.health},
                )
            if weight > 0 and version in route.deprecated:
                raise InvalidInput(
                    f"{target} {version} is deprecated and cannot take traffic",
                    details={"target": target, "version": version},
                )

    # -- operators -------------------------------------------------------------

    async def _change(
        self,
        op: str,
        who: str,
        current: Route | None,
        new: Route,
        known: dict[str, AgentRecord] | None = None,
    ) -> RolloutStatus:
        if known is None:
            known = await self._versions(new.target)
        self._check(new.target, new, known)
        await self._write(new.target, new, expected=current)
        await self.service.audit.emit(
            "admin",
            actor=who,
            subject=self.service.subjects.admin("rollout", op),
            data={
                "op": f"rollout_{op}", "target": new.target, "weights": dict(new.weights),
                "stable": new.stable, "canary": new.canary, "sticky": new.sticky,
                "deprecated": list(new.deprecated),
                "guard": msgspec.to_builtins(new.guard) if new.guard else None,
                "weights_before": dict(current.weights) if current else None,
            },
        )  # fmt: skip
        return await self.status(RolloutStatusRequest(target=new.target))

    async def set(self, req: SetRollout) -> RolloutStatus:
        """``set``: send ``weights`` to a canary and the rest to the stable version."""
        current, _ = await self._current(req.target)
        canaries = [v for v in req.weights if v != (req.stable or None)]
        if len(canaries) != 1:
            raise InvalidInput(
                "name exactly one canary version with its weight (e.g. 2.0.0=5); the rest "
                "goes to the stable version",
                details={"weights": dict(req.weights), "path": "$.weights"},
            )
        canary = canaries[0]
        known = await self._versions(req.target)
        if not known:
            raise _unknown(req.target)
        stable = req.stable or (current.stable if current else "")
        if not stable:
            stable = _highest(v for v in known if v != canary)
        if not stable or stable == canary:
            raise InvalidInput(
                f"{req.target} has no stable version besides {canary}; name one with "
                "--stable VERSION",
                details={"target": req.target, "canary": canary},
            )
        weight = req.weights[canary]
        new = Route(
            target=req.target, weights={stable: 100 - weight, canary: weight}, stable=stable,
            canary=canary, sticky=req.sticky, guard=req.guard,
            deprecated=current.deprecated if current else (),
            previous=_without_history(current), changed_by=self.service.operator(req.requested_by),
            changed_at=time.time(), reason="set",
        )  # fmt: skip
        return await self._change("set", new.changed_by, current, new, known)

    async def promote(self, req: PromoteRollout) -> RolloutStatus:
        """``promote``: all traffic to ``version``, which becomes the stable version."""
        current, _ = await self._current(req.target)
        new = Route(
            target=req.target, weights={req.version: 100}, stable=req.version,
            sticky=current.sticky if current else False,
            deprecated=tuple(v for v in current.deprecated if v != req.version) if current else (),
            previous=_without_history(current), changed_by=self.service.operator(req.requested_by),
            changed_at=time.time(), reason="promote",
        )  # fmt: skip
        return await self._change("promote", new.changed_by, current, new)

    async def rollback(self, req: RollbackRollout) -> RolloutStatus:
        """``rollback``: all traffic to the stable version (after a promote: the one before)."""
        current, _ = await self._current(req.target)
        if current is None:
            raise NotFound(
                f"{req.target} has no route to roll back; `signalbox rollout set` makes one",
                details={"target": req.target},
            )
        stable = current.stable
        if not (current.canary and current.weights.get(current.canary, 0) > 0):
            previous = current.previous
            if previous is None or previous.stable == current.stable:
                raise InvalidInput(
                    f"{req.target} already sends all traffic to its stable version "
                    f"{current.stable} and has no earlier stable version to go back to",
                    details={"target": req.target, "stable": current.stable},
                )
            stable = previous.stable
        who = self.service.operator(req.requested_by)
        new = Route(
            target=req.target, weights={stable: 100}, stable=stable, sticky=current.sticky,
            deprecated=tuple(v for v in current.deprecated if v != stable),
            previous=_without_history(current), changed_by=who, changed_at=time.time(),
            reason=f"rollback: {req.reason}" if req.reason else "rollback",
        )  # fmt: skip
        return await self._change("rollback", who, current, new)

    async def deprecate(self, req: DeprecateVersion) -> RolloutStatus:
        """``deprecate``: no new traffic to ``version``; ``archive`` also deregisters it."""
        current, _ = await self._current(req.target)
        known = await self._versions(req.target)
        if req.version not in known:
            raise NotFound(
                f"{req.target} has no registered version {req.version}",
                details={"target": req.target, "version": req.version, "known": sorted(known)},
            )
        deprecated = tuple(sorted({*(current.deprecated if current else ()), req.version}))
        weights = dict(current.weights) if current else {}
        stable = current.stable if current else ""
        if req.version in weights or not weights:
            # Its share (or, without a route, all traffic) goes to the stable version.
            if not stable or stable == req.version:
                stable = _highest(v for v in known if v not in deprecated)
            if not stable:
                raise InvalidInput(
                    f"{req.target} {req.version} is its only active version; deprecating it "
                    "would leave no version to take calls",
                    details={"target": req.target, "version": req.version},
                )
            share = weights.pop(req.version, 0)
            weights[stable] = weights.get(stable, 0) + (share if current else 100)
        who = self.service.operator(req.requested_by)
        new = Route(
            target=req.target, weights=weights, stable=stable,
            canary="" if current is None or current.canary == req.version else current.canary,
            sticky=current.sticky if current else False,
            guard=current.guard if current else None, deprecated=deprecated,
            previous=_without_history(current), changed_by=who, changed_at=time.time(),
            reason=f"deprecate {req.version}",
        )  # fmt: skip
        status = await self._change("deprecate", who, current, new, known)
        if not req.archive:
            return status
        await request(
            self.service.nc, self.service.subjects.admin("registry", "deregister"),
            DeregisterAgent(name=req.target, version=req.version), AgentRecord, timeout=5.0,
            hint="no registry answers; start one with `signalbox up`",
        )  # fmt: skip
        await self.service.audit.emit(
            "admin",
            actor=who,
            subject=self.service.subjects.admin("rollout", "deprecate"),
            data={"op": "rollout_archive", "target": req.target, "version": req.version},
        )
        return await self.status(RolloutStatusRequest(target=req.target))

    async def status(self, req: RolloutStatusRequest) -> RolloutStatus:
        """``status``: the route and, per version, calls, p50/p99, error rate, cost per call.

        While a guard watches a canary, the figures are the ones it weighs
        (:func:`_guard_span`: its window, from the route's last change at the
        earliest; cost per call from the cost service over the same span), not
        ``req.window``'s, so status and guard never disagree.
        """
        route, _ = await self._current(req.target)
        now = time.time()
        window, since = _guard_span(route, now) or (req.window, now - req.window)
        figures = self.merged(req.target, since)
        try:
            known = await self._versions(req.target)
        except SignalboxError:
            known = {}
        costs: dict[str, float] = {}
        with contextlib.suppress(SignalboxError):
            reply = await request(
                self.service.nc, self.service.subjects.cost_versions,
                CostByVersionRequest(agent=req.target, since=since), CostByVersion, timeout=2.0,
            )  # fmt: skip
            costs = {row.key: row.cost_usd for row in reply.versions}
        versions = sorted(set(known) | set(figures) | set(route.weights if route else ()),
                          key=_version_key, reverse=True)  # fmt: skip
        rows = []
        for version in versions:
            merged = figures.get(version, _NO_FIGURES)
            cost = costs.get(version, 0.0)
            record = known.get(version)
            rows.append(
                VersionFigures(
                    version=version,
                    weight=route.weights.get(version, 0) if route else None,
                    health=record.health if record else "deregistered",
                    deprecated=bool(route and version in route.deprecated),
                    calls=merged.calls, errors=merged.errors, error_rate=merged.error_rate,
                    p50_ms=merged.p(0.5), p99_ms=merged.p(0.99), cost_usd=cost,
                    cost_per_call_usd=cost / merged.calls if merged.calls else 0.0,
                )
            )  # fmt: skip
        return RolloutStatus(target=req.target, route=route, window=window, versions=tuple(rows))


def _guard_span(route: Route | None, now: float) -> tuple[float, float] | None:
    """The window a route's guard weighs and the time its figures start (None: no guard
    is watching a canary): the guard's window back from ``now``, never before the
    route's last change (the split before it is not this canary's)."""
    if (
        route is None
        or route.guard is None
        or not route.canary
        or route.weights.get(route.canary, 0) <= 0
    ):
        return None
    return route.guard.window, max(now - route.guard.window, route.changed_at)


def _unknown(target: str) -> NotFound:
    return NotFound(
        f"{target} is not a registered agent; `signalbox agents list` shows who is",
        details={"target": target},
    )


def _without_history(route: Route | None) -> Route | None:
    return msgspec.structs.replace(route, previous=None) if route is not None else None


def _version_key(version: str) -> tuple[Any, ...]:
    """Semantic-version order (the registry only accepts semantic versions)."""
    try:
        return (1, semantic_version.Version(version), "")
    except ValueError:
        return (0, semantic_version.Version("0.0.0"), version)


def _highest(versions: Any) -> str:
    ordered = sorted(versions, key=_version_key)
    return ordered[-1] if ordered else ""
