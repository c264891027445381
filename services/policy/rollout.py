"""Canary routing on the call path: pick a version per route, record outcomes, guard canaries.

Pure logic, no I/O (the policy service wires it to KV and NATS):

* :func:`pick` chooses the version of a call from a :class:`~schemas.Route`:
  a weighted draw, or with ``sticky`` a hash of the call's route key, so one
  customer's conversation stays on one version while the weights stay. The
  canary comes first on the hash line, so raising its weight from 5 to 10
  moves keys only from the stable version to the canary, never back.
* :class:`OutcomeWindow` keeps one replica's recent outcomes per version in
  slots (calls, target-side errors, a log-bucketed latency histogram) and
  snapshots them as :class:`~schemas.VersionStats`.
* :func:`merge` adds up the snapshots of every replica over a window and
  :func:`breach` checks a canary's merged figures against its route's guard.

Each policy replica routes a share of the calls (queue group), so every
replica publishes its own snapshot and every replica merges all of them:
guards see the whole fleet's traffic.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections import Counter, deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Final

from broker.money import usd
from schemas import Route, RouteGuard, VersionStats

__all__ = [
    "Breach",
    "Merged",
    "OutcomeWindow",
    "breach",
    "bucket_of",
    "merge",
    "percentile",
    "pick",
    "route_order",
]

#: Histogram buckets per doubling of latency (bound ratio 2 ** (1/8) ~ 1.09).
_PER_OCTAVE: Final = 8
_MAX_BUCKET: Final = 8 * 22  # 2 ** 22 ms ~ 70 minutes: anything slower lands here


def bucket_of(latency_ms: float) -> int:
    """Histogram bucket of a latency: the smallest ``b`` with ``latency <= 2 ** (b / 8)`` ms."""
    if latency_ms <= 1.0:
        return 0
    return min(_MAX_BUCKET, math.ceil(_PER_OCTAVE * math.log2(latency_ms)))


def _bound(bucket: int) -> float:
    return float(2 ** (bucket / _PER_OCTAVE))


def percentile(histogram: Mapping[int, int], q: float) -> float:
    """The ``q`` quantile (0-1) of a histogram, as its bucket's upper bound in ms (0 if empty)."""
    total = sum(histogram.values())
    if total == 0:
        return 0.0
    rank = max(1, math.ceil(q * total))
    seen = 0
    for bucket in sorted(histogram):
        seen += histogram[bucket]
        if seen >= rank:
            return _bound(bucket)
    return _bound(max(histogram))


def route_order(route: Route) -> list[str]:
    """Versions in hash-line order: the canary, the others by name, the stable one last."""
    rest = sorted(v for v in route.weights if v not in (route.canary, route.stable))
    order = ([route.canary] if route.canary in route.weights else []) + rest
    if route.stable in route.weights:
        order.append(route.stable)
    return [v for v in order if route.weights.get(v, 0) > 0 and v not in route.deprecated]


def pick(route: Route, key: str = "", rng: random.Random | None = None) -> str:
    """The version a call goes to (the stable one if no weight is left)."""
    order = route_order(route)
    total = sum(route.weights[v] for v in order)
    if total <= 0:
        return route.stable
    if route.sticky and key:
        digest = hashlib.blake2b(f"{route.target}\0{key}".encode(), digest_size=8).digest()
        point = int.from_bytes(digest, "big") / 2**64 * total
    else:
        point = (rng or random).random() * total
    for version in order:
        point -= route.weights[version]
        if point < 0:
            return version
    return order[-1]


@dataclass(slots=True)
class _Slot:
    start: float
    calls: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    latency: dict[str, Counter[int]] = field(default_factory=dict)


class OutcomeWindow:
    """One replica's outcomes of calls to one target, per version, in time slots.

    Args:
        target: The agent name.
        slot: Seconds per slot.
        slots: Slots kept (``slot * slots`` is the longest window answered).
    """

    def __init__(self, target: str, *, slot: float = 5.0, slots: int = 72) -> None:
        self.target = target
        self.slot = slot
        self._slots: deque[_Slot] = deque(maxlen=slots)
        self.changed = False

    def _current(self, now: float) -> _Slot:
        start = now - now % self.slot
        if self._slots and self._slots[-1].start >= start:
            return self._slots[-1]
        if self._slots:
            # Slots stay contiguous: a snapshot dates them by position from the first, so
            # a quiet spell is kept as empty slots (else later calls would be dated into
            # it, and fall before a guard's window). At most the slots kept.
            maxlen = self._slots.maxlen or 0
            gap = min(maxlen, round((start - self._slots[-1].start) / self.slot) - 1)
            for k in range(gap, 0, -1):
                self._slots.append(_Slot(start - k * self.slot))
        self._slots.append(_Slot(start))
        return self._slots[-1]

    def record(self, version: str, *, ok: bool, latency_ms: float, now: float) -> None:
        """Count one call's outcome (``ok`` False: it failed on the target's side)."""
        slot = self._current(now)
        slot.calls[version] += 1
        if not ok:
            slot.errors[version] += 1
        slot.latency.setdefault(version, Counter())[bucket_of(latency_ms)] += 1
        self.changed = True

    def snapshot(self, replica: str, now: float) -> VersionStats:
        """Every kept slot, for ``sb_rollout_stats`` (resets :attr:`changed`)."""
        self.changed = False
        slots = list(self._slots)
        versions = sorted({v for s in slots for v in s.calls})
        return VersionStats(
            target=self.target,
            replica=replica,
            at=now,
            slot=self.slot,
            start=slots[0].start if slots else now,
            calls={v: tuple(s.calls.get(v, 0) for s in slots) for v in versions},
            errors={v: tuple(s.errors.get(v, 0) for s in slots) for v in versions},
            latency={v: tuple(dict(s.latency.get(v, {})) for s in slots) for v in versions},
        )


@dataclass(slots=True)
class Merged:
    """One version's figures over a window, added up across replicas."""

    calls: int = 0
    errors: int = 0
    latency: Counter[int] = field(default_factory=Counter)

    @property
    def error_rate(self) -> float:
        """Share of calls that failed on the target's side."""
        return self.errors / self.calls if self.calls else 0.0

    def p(self, q: float) -> float:
        """Latency quantile in ms."""
        return percentile(self.latency, q)


def merge(snapshots: Iterable[VersionStats], since: float) -> dict[str, Merged]:
    """Figures per version from every replica's snapshot, counting slots starting at ``since``."""
    out: dict[str, Merged] = {}
    for snap in snapshots:
        for version, calls in snap.calls.items():
            merged = out.setdefault(version, Merged())
            errors = snap.errors.get(version, ())
            latency = snap.latency.get(version, ())
            for i, count in enumerate(calls):
                # A slot overlapping `since` counts whole: the window is slot-aligned.
                if snap.start + (i + 1) * snap.slot <= since:
                    continue
                merged.calls += count
                merged.errors += errors[i] if i < len(errors) else 0
                if i < len(latency):
                    merged.latency.update({int(b): n for b, n in latency[i].items()})
    return out


@dataclass(frozen=True, slots=True)
class Breach:
    """A guard a canary breached: what, and the figures that show it."""

    guard: str
    text: str
    figures: dict[str, float]


def breach(
    guard: RouteGuard,
    canary: Merged,
    stable: Merged,
    *,
    canary_cost: float | None = None,
    stable_cost: float | None = None,
) -> Breach | None:
    """The first guard ``canary`` breaches against ``stable`` (None: healthy or too few calls).

    Costs are per call in USD (None: unknown, that guard is skipped).
    """
    if canary.calls < guard.min_calls:
        return None
    figures = {
        "canary_calls": float(canary.calls), "stable_calls": float(stable.calls),
        "canary_error_rate": canary.error_rate, "stable_error_rate": stable.error_rate,
    }  # fmt: skip
    limit = max(guard.max_error_rate, guard.max_error_ratio * stable.error_rate)
    if canary.error_rate > limit:
        return Breach(
            "error_rate",
            f"error rate {canary.error_rate:.1%} over {canary.calls} calls > limit {limit:.1%} "
            f"(stable {stable.error_rate:.1%})",
            figures | {"limit": limit},
        )
    if stable.calls >= guard.min_calls:
        c99, s99 = canary.p(0.99), stable.p(0.99)
        if s99 > 0 and c99 > guard.max_p99_ratio * s99:
            return Breach(
                "p99_latency",
                f"p99 latency {c99:.1f} ms > {guard.max_p99_ratio:g}x stable's {s99:.1f} ms",
                figures | {"canary_p99_ms": c99, "stable_p99_ms": s99},
            )
    if (
        canary_cost is not None
        and stable_cost is not None
        and stable_cost > 0
        and canary_cost > guard.max_cost_ratio * stable_cost
    ):
        return Breach(
            "cost_per_call",
            f"cost per call {usd(canary_cost)} > {guard.max_cost_ratio:g}x stable's "
            f"{usd(stable_cost)}",
            figures | {"canary_cost_per_call": canary_cost, "stable_cost_per_call": stable_cost},
        )
    return None
