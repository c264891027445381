"""Canary routing logic: weighted and sticky picks, outcome windows, guards."""

from __future__ import annotations

import math
import random
from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

from schemas import Route, RouteGuard
from services.policy.rollout import (
    Merged,
    OutcomeWindow,
    breach,
    bucket_of,
    merge,
    percentile,
    pick,
    route_order,
)


def _route(canary: int = 5, **kw: object) -> Route:
    return Route(
        target="recommender", weights={"1.0.0": 100 - canary, "2.0.0": canary},
        stable="1.0.0", canary="2.0.0", **kw,  # type: ignore[arg-type]
    )  # fmt: skip


def test_weighted_split_is_within_statistical_tolerance() -> None:
    rng = random.Random(7)
    counts = Counter(pick(_route(20), rng=rng) for _ in range(5_000))
    # 20% of 5,000 = 1,000, sd ~28: 4 sd either side.
    assert 890 <= counts["2.0.0"] <= 1_110
    assert counts["1.0.0"] + counts["2.0.0"] == 5_000


def test_sticky_keys_stay_on_one_version() -> None:
    route = _route(30, sticky=True)
    first = {f"customer-{i}": pick(route, f"customer-{i}") for i in range(2_000)}
    again = {k: pick(route, k) for k in first}
    assert first == again
    share = sum(v == "2.0.0" for v in first.values()) / len(first)
    assert 0.25 <= share <= 0.35


def test_raising_the_canary_weight_only_moves_keys_to_the_canary() -> None:
    low, high = _route(5, sticky=True), _route(25, sticky=True)
    for i in range(3_000):
        key = f"k{i}"
        if pick(low, key) == "2.0.0":
            assert pick(high, key) == "2.0.0"


def test_deprecated_and_zero_weight_versions_get_no_traffic() -> None:
    route = Route(
        target="r", weights={"1.0.0": 50, "1.5.0": 50, "2.0.0": 0}, stable="1.0.0",
        deprecated=("1.5.0",),
    )  # fmt: skip
    assert route_order(route) == ["1.0.0"]
    assert {pick(route, rng=random.Random(i)) for i in range(200)} == {"1.0.0"}


@given(st.lists(st.floats(min_value=0.01, max_value=100_000), min_size=1, max_size=300))
def test_percentiles_are_within_9_percent_above(latencies: list[float]) -> None:
    histogram = Counter(bucket_of(x) for x in latencies)
    ordered = sorted(latencies)
    for q in (0.5, 0.99):
        exact = ordered[max(1, math.ceil(q * len(ordered))) - 1]  # nearest rank
        estimate = percentile(histogram, q)
        assert estimate >= min(exact, 1.0)
        assert estimate <= max(exact * 2 ** (1 / 8) * (1 + 1e-9), 1.0)  # one bucket: < 9.06%


def test_outcome_windows_merge_across_replicas_and_respect_the_window() -> None:
    a, b = OutcomeWindow("r", slot=1.0), OutcomeWindow("r", slot=1.0)
    for t in range(10):
        a.record("1.0.0", ok=True, latency_ms=10, now=1000 + t)
        b.record("2.0.0", ok=t % 2 == 0, latency_ms=100, now=1000 + t + 0.5)
    snaps = [a.snapshot("a", 1010), b.snapshot("b", 1010)]
    whole = merge(snaps, since=0)
    assert (whole["1.0.0"].calls, whole["1.0.0"].errors) == (10, 0)
    assert (whole["2.0.0"].calls, whole["2.0.0"].errors) == (10, 5)
    assert whole["2.0.0"].p(0.5) == pytest.approx(100, rel=0.1)
    recent = merge(snaps, since=1005)
    assert recent["1.0.0"].calls == 5 and recent["2.0.0"].calls == 5


def test_outcome_windows_date_calls_after_a_quiet_spell_correctly() -> None:
    """Calls before and after an idle gap: a window starting in the gap counts only the
    later ones (a guard's window starts at the route's change, often after a lull)."""
    window = OutcomeWindow("r", slot=0.5, slots=72)
    for t in (100.0, 100.2):
        window.record("1.0.0", ok=True, latency_ms=10, now=t)
    for t in (110.1, 110.3, 125.7):
        window.record("2.0.0", ok=True, latency_ms=10, now=t)
    snap = window.snapshot("a", 126)
    assert merge([snap], since=105)["2.0.0"].calls == 3
    assert merge([snap], since=105)["1.0.0"].calls == 0
    assert merge([snap], since=111)["2.0.0"].calls == 1
    assert merge([snap], since=0)["1.0.0"].calls == 2
    # A gap longer than the slots kept: only what fits the window is kept.
    window.record("2.0.0", ok=True, latency_ms=10, now=1000.0)
    late = window.snapshot("a", 1000.1)
    assert merge([late], since=999)["2.0.0"].calls == 1
    assert merge([late], since=0)["2.0.0"].calls == 1


def test_guards_fire_on_errors_latency_and_cost_but_not_on_few_calls() -> None:
    guard = RouteGuard(max_error_rate=0.05, min_calls=20)
    stable = Merged(calls=500, errors=5, latency=Counter({bucket_of(20): 500}))
    few = Merged(calls=10, errors=10)
    assert breach(guard, few, stable) is None
    failing = Merged(calls=40, errors=12, latency=Counter({bucket_of(20): 40}))
    hit = breach(guard, failing, stable)
    assert hit is not None and hit.guard == "error_rate"
    assert hit.figures["canary_error_rate"] == pytest.approx(0.3)
    slow = Merged(calls=40, errors=0, latency=Counter({bucket_of(200): 40}))
    assert (s := breach(guard, slow, stable)) is not None and s.guard == "p99_latency"
    healthy = Merged(calls=40, errors=0, latency=Counter({bucket_of(21): 40}))
    assert breach(guard, healthy, stable) is None
    dear = breach(guard, healthy, stable, canary_cost=0.02, stable_cost=0.01)
    assert dear is not None and dear.guard == "cost_per_call"
    assert breach(guard, healthy, stable, canary_cost=0.012, stable_cost=0.01) is None
