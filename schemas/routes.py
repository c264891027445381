"""Version routes (KV ``sb_routes``), canary rollouts and their per-version figures.

A route splits the calls to one agent name across its registered versions
(``v1=95, v2=5``). The registry owns the operators' side
(``sb.admin.rollout.<op>``: set, promote, rollback, status, deprecate) and
validates every route against what is registered and healthy; the policy
service resolves the route on every call (``sb.out.A.B.<cap>`` is forwarded
to ``sb.in.B.<cap>.<version token>``) and rolls a canary back on its own when
a guard is breached.

Operators' endpoints (registry)::

    set        SetRollout        -> RolloutStatus   (audited, kind admin)
    promote    PromoteRollout    -> RolloutStatus   (audited, kind admin)
    rollback   RollbackRollout   -> RolloutStatus   (audited, kind admin)
    deprecate  DeprecateVersion  -> RolloutStatus   (audited, kind admin)
    status     RolloutStatusRequest -> RolloutStatus
"""

from __future__ import annotations

from typing import Annotated

import msgspec

from schemas._base import Wire

__all__ = [
    "DeprecateVersion",
    "PromoteRollout",
    "RollbackRollout",
    "RolloutStatus",
    "RolloutStatusRequest",
    "Route",
    "RouteGuard",
    "SetRollout",
    "VersionFigures",
    "VersionStats",
]

_Name = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_-]{1,64}$(?!\n)")]
_Version = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
_Weight = Annotated[int, msgspec.Meta(ge=0, le=100)]
_Who = Annotated[str, msgspec.Meta(max_length=128)]
_Text = Annotated[str, msgspec.Meta(max_length=1024)]
_Ratio = Annotated[float, msgspec.Meta(gt=0)]


class RouteGuard(Wire, frozen=True, tag="route_guard.v1"):
    """When a canary is rolled back automatically (any threshold breached).

    Attributes:
        max_error_rate: Canary error rate above which it is rolled back
            (absolute share of its calls that failed on the target's side).
        max_error_ratio: ... or above this many times the stable version's
            error rate (whichever is higher counts as the limit).
        max_p99_ratio: Canary p99 latency above this many times the stable's.
        max_cost_ratio: Canary cost per call above this many times the stable's.
        min_calls: Canary calls in the window before any guard may fire.
        window: Seconds of figures the guards weigh.
    """

    max_error_rate: Annotated[float, msgspec.Meta(ge=0, le=1)] = 0.05
    max_error_ratio: _Ratio = 2.0
    max_p99_ratio: _Ratio = 2.0
    max_cost_ratio: _Ratio = 1.5
    min_calls: Annotated[int, msgspec.Meta(ge=1, le=1_000_000)] = 50
    window: Annotated[float, msgspec.Meta(gt=0, le=86_400)] = 300.0


class Route(Wire, frozen=True, tag="route.v1"):
    """How calls to ``target`` are split across its versions (the value in ``sb_routes``).

    Attributes:
        target: Agent name (also the KV key).
        weights: Version -> weight (0-100, summing to 100).
        stable: The version the rest of the traffic (and a rollback) goes to.
        canary: The version being rolled out ("" when none).
        sticky: Calls carrying a route key (``Sb-Route-Key``) always land on the
            same version for the same key while the weights stay.
        guard: Automatic rollback thresholds of the canary (None: manual only).
        deprecated: Versions that get no new traffic (they still answer calls
            in flight, and pinned calls are refused).
        previous: The route this one replaced (for ``signalbox rollback``),
            without its own ``previous``.
        changed_by: Who made this route (``operator:<name>``, ``service:policy``).
        changed_at: Unix time of the change.
        reason: Why (``set``, ``promote``, ``rollback``, ``auto-rollback: ...``).
        figures: The figures that triggered an automatic rollback.
    """

    target: _Name
    weights: dict[_Version, _Weight]
    stable: _Version
    canary: str = ""
    sticky: bool = False
    guard: RouteGuard | None = None
    deprecated: tuple[_Version, ...] = ()
    previous: Route | None = None
    changed_by: _Who = ""
    changed_at: float = 0.0
    reason: _Text = ""
    figures: dict[str, float] = msgspec.field(default_factory=dict)


class VersionStats(Wire, frozen=True, tag="version_stats.v1"):
    """One policy replica's recent outcomes of calls to one agent's versions.

    Published by each replica to ``sb_rollout_stats`` (key
    ``<target>.<replica>``) about once a second while it routes calls to
    ``target``; every replica merges all of them to evaluate guards.

    Attributes:
        target: Agent name.
        replica: Publishing policy replica.
        at: Unix time of the snapshot.
        slot: Seconds per slot.
        start: Unix time of the first slot.
        calls: Version -> calls per slot (oldest first).
        errors: Version -> calls per slot that failed on the target's side.
        latency: Version -> per slot, a sparse latency histogram: bucket ``b``
            counts calls that took at most ``2 ** (b / 8)`` ms and more than
            bucket ``b - 1``'s bound (so percentiles are within 9%).
    """

    target: str
    replica: str
    at: float
    slot: float
    start: float
    calls: dict[str, tuple[int, ...]] = msgspec.field(default_factory=dict)
    errors: dict[str, tuple[int, ...]] = msgspec.field(default_factory=dict)
    latency: dict[str, tuple[dict[int, int], ...]] = msgspec.field(default_factory=dict)


class VersionFigures(Wire, frozen=True, tag="version_figures.v1"):
    """Merged figures of one version over a window.

    Attributes:
        version: The version.
        weight: Its weight in the current route (None: no route).
        health: Its registry health.
        deprecated: It gets no new traffic.
        calls: Calls routed to it in the window (every policy replica).
        errors: Those that failed on the target's side (remote errors,
            time-outs, nobody serving).
        error_rate: ``errors / calls`` (0 without calls).
        p50_ms: Median latency (from log-bucketed histograms, within 9%).
        p99_ms: 99th percentile latency.
        cost_usd: Model spend reported by this version in the window.
        cost_per_call_usd: ``cost_usd / calls`` (0 without calls).
    """

    version: str
    weight: int | None = None
    health: str = ""
    deprecated: bool = False
    calls: int = 0
    errors: int = 0
    error_rate: float = 0.0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    cost_usd: float = 0.0
    cost_per_call_usd: float = 0.0


class RolloutStatus(Wire, frozen=True, tag="rollout_status.v1"):
    """A target's route and per-version figures (what ``signalbox rollout status`` shows)."""

    target: str
    route: Route | None = None
    window: float = 300.0
    versions: tuple[VersionFigures, ...] = ()


class SetRollout(Wire, frozen=True, tag="set_rollout.v1"):
    """Operator sets a route: ``weights`` of named versions, the rest to ``stable``.

    Attributes:
        target: Agent name.
        weights: Canary version -> percent (the stable version gets the rest).
        stable: The stable version (default: the current route's stable, else
            the highest registered version not in ``weights``).
        sticky: Pin a route key's calls to one version.
        guard: Automatic rollback thresholds (None: none).
        requested_by: Operator.
    """

    target: _Name
    weights: dict[_Version, _Weight]
    stable: str = ""
    sticky: bool = False
    guard: RouteGuard | None = None
    requested_by: _Who = ""


class PromoteRollout(Wire, frozen=True, tag="promote_rollout.v1"):
    """Operator sends all traffic to ``version`` (it becomes the stable version)."""

    target: _Name
    version: _Version
    requested_by: _Who = ""


class RollbackRollout(Wire, frozen=True, tag="rollback_rollout.v1"):
    """Operator goes back to the last stable route (all traffic to its stable version)."""

    target: _Name
    requested_by: _Who = ""
    reason: _Text = ""


class DeprecateVersion(Wire, frozen=True, tag="deprecate_version.v1"):
    """Operator stops new traffic to ``version`` (in-flight calls still finish).

    Attributes:
        archive: Also deregister the version from the registry (its audit
            history stays in ``SB_AUDIT``, replayable).
    """

    target: _Name
    version: _Version
    archive: bool = False
    requested_by: _Who = ""


class RolloutStatusRequest(Wire, frozen=True, tag="rollout_status_request.v1"):
    """Operator asks for a target's route and per-version figures over ``window`` seconds."""

    target: _Name
    window: Annotated[float, msgspec.Meta(gt=0, le=86_400)] = 300.0
