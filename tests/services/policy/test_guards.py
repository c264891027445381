"""Breaker detectors as pure logic, on a fake clock: rate anomalies, target error rates, loops."""

from __future__ import annotations

import pytest

from broker.errors import ConfigError, InvalidInput
from broker.settings import Settings
from services.policy.guards import (
    MAX_CHAIN,
    ErrorRate,
    Guards,
    RateAnomaly,
    check_loop,
    format_chain,
    parse_chain,
)


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def steady(
    detector: RateAnomaly, clock: Clock, agent: str, per_second: int, seconds: int
) -> list[dict[str, float]]:
    """``per_second`` calls in each of ``seconds`` seconds; the anomalies reported."""
    fired = []
    for _ in range(seconds):
        clock.now += 1.0
        for _ in range(per_second):
            if (figures := detector.observe(agent)) is not None:
                fired.append(figures)
    return fired


def rate(clock: Clock, **overrides: float) -> RateAnomaly:
    options: dict[str, float] = {
        "factor": 10, "window": 10, "baseline": 300, "min_rate": 2, "min_history": 60,
    }  # fmt: skip
    options.update(overrides)
    return RateAnomaly(clock=clock, **options)  # type: ignore[arg-type]


# -- call-rate anomaly ---------------------------------------------------------------------


def test_a_10x_burst_over_the_baseline_trips() -> None:
    clock = Clock()
    detector = rate(clock)
    assert steady(detector, clock, "a", 3, 300) == []
    # Exactly 10x (30 calls/s) for the length of the short window.
    fired = steady(detector, clock, "a", 30, 10)
    assert fired, "a 10x burst must trip"
    first = fired[0]
    assert first["rate"] == 30 and first["baseline"] == 3 and first["ratio"] == 10
    assert first["factor"] == 10 and first["window_s"] == pytest.approx(10)


def test_steady_and_moderately_varying_traffic_never_trips() -> None:
    clock = Clock()
    detector = rate(clock)
    fired = []
    for minute in range(20):  # 20 minutes between 2 and 8 calls/s
        fired += steady(detector, clock, "a", (2, 5, 8, 3)[minute % 4], 60)
    # A 5x jump (3 -> 15 calls/s) is unusual but under the factor.
    fired += steady(detector, clock, "a", 15, 10)
    assert fired == []


def test_a_quiet_agents_first_burst_and_a_cold_start_do_not_trip() -> None:
    clock = Clock()
    detector = rate(clock)
    # Cold start: a burst straight away has no baseline to compare with.
    assert steady(detector, clock, "new", 50, 20) == []
    # A quiet agent (one call a minute) bursting: its baseline is too thin to judge.
    quiet = rate(clock)
    for _ in range(10):
        clock.now += 60
        assert quiet.observe("quiet") is None
    assert steady(quiet, clock, "quiet", 50, 10) == []


def test_bursts_under_the_minimum_rate_do_not_trip() -> None:
    clock = Clock()
    detector = rate(clock, min_rate=5)
    for _ in range(300):  # one call every 10 s
        clock.now += 10
        detector.observe("a")
    assert steady(detector, clock, "a", 4, 10) == []  # 40x the baseline, under 5 calls/s


def test_anomalous_reads_without_counting_and_forget_restarts_history() -> None:
    clock = Clock()
    detector = rate(clock)
    steady(detector, clock, "a", 3, 300)
    assert steady(detector, clock, "a", 40, 10)
    assert detector.anomalous("a") is not None
    clock.now += 20  # the burst leaves the short window
    assert detector.anomalous("a") is None
    detector.forget("a")
    assert detector.anomalous("a") is None
    assert steady(detector, clock, "a", 40, 10) == []  # fresh history: a cold start
    assert detector.anomalous("never-seen") is None


def test_a_long_idle_gap_resets_the_windows() -> None:
    clock = Clock()
    detector = rate(clock)
    steady(detector, clock, "a", 3, 300)
    clock.now += 10_000
    assert detector.observe("a") is None


def test_inconsistent_windows_are_refused() -> None:
    with pytest.raises(InvalidInput):
        RateAnomaly(window=10, baseline=5)
    with pytest.raises(ConfigError, match="SIGNALBOX_BREAKER_RATE_BASELINE"):
        Guards(Settings(breaker_rate_window=60, breaker_rate_baseline=30))


# -- target error rate ---------------------------------------------------------------------


def test_target_errors_over_the_threshold_trip_with_enough_calls() -> None:
    clock = Clock()
    errors = ErrorRate(threshold=0.5, window=60, min_calls=10, clock=clock)
    for _ in range(4):
        clock.now += 1
        assert errors.observe("b", "") is None
    results = []
    for _ in range(6):
        clock.now += 1
        results.append(errors.observe("b", "remote_error"))
    # 6 errors of 10 calls (60% > 50%): the tenth call trips, with the figures.
    assert results[:-1] == [None] * 5
    assert results[-1] == {
        "error_rate": 0.6, "errors": 6.0, "calls": 10.0, "threshold": 0.5, "window_s": 60,
    }  # fmt: skip


def test_only_failures_on_the_targets_side_count() -> None:
    clock = Clock()
    errors = ErrorRate(threshold=0.1, window=60, min_calls=5, min_timeout=1.0, clock=clock)
    # The caller's bad input, the target's typed answers, policy refusals: never counted.
    for code in ("bad_request", "denied", "conflict", "not_found", "breaker_open", "") * 5:
        assert errors.observe("b", code) is None
    # Timeouts count only when the caller gave the target a fair chance.
    assert not errors.counts("outcome_unknown", waited=0.05)
    assert errors.counts("outcome_unknown", waited=2.0)
    assert all(errors.counts(c, 0) for c in ("remote_error", "target_unavailable", "internal"))
    assert errors.observe("b", "outcome_unknown", waited=0.05) is None
    assert errors.observe("b", "target_unavailable") is None  # 1 of 32 (3%)
    for _ in range(3):
        errors.observe("b", "remote_error")
    figures = errors.observe("b", "outcome_unknown", waited=5.0)
    assert figures is not None and figures["errors"] == 5


def test_errors_age_out_of_the_window() -> None:
    clock = Clock()
    errors = ErrorRate(threshold=0.5, window=10, min_calls=4, clock=clock)
    for _ in range(3):
        errors.observe("b", "remote_error")
    clock.now += 30
    assert errors.observe("b", "remote_error") is None  # 1 call in the window
    errors.forget("b")
    assert errors.observe("b", "") is None


# -- call loops ----------------------------------------------------------------------------


def test_chains_round_trip_and_malformed_ones_are_refused() -> None:
    assert parse_chain(None) == () and parse_chain("") == ()
    assert parse_chain("a,b") == ("a", "b")
    assert format_chain((), "a") == "a"
    assert format_chain(("a", "b"), "c") == "a,b,c"
    for bad in ("a,,b", "a b", "a,*", "a,b.c", "x" * 65):
        with pytest.raises(InvalidInput, match="Sb-Chain"):
            parse_chain(bad)
    assert len(parse_chain(",".join(["a"] * 1000))) == MAX_CHAIN


def test_a_chain_revisiting_an_agent_too_often_is_a_loop() -> None:
    limits = {"max_depth": 16, "max_visits": 2}
    assert check_loop((), "a", "b", **limits) is None
    assert check_loop(("a",), "b", "a", **limits) is None  # a -> b -> a: a callback
    assert check_loop(("a", "b"), "a", "b", **limits) is None
    loop = check_loop(("a", "b", "a"), "b", "a", **limits)
    assert loop is not None
    assert (loop.agent, loop.visits, loop.depth) == ("a", 3, 4)
    assert loop.path == ("a", "b", "a", "b", "a")
    assert loop.figures(16, 2) == {"depth": 4, "max_depth": 16, "visits": 3, "max_visits": 2}


def test_a_chain_deeper_than_the_limit_is_a_loop() -> None:
    chain = tuple(f"agent-{i}" for i in range(5))
    assert check_loop(chain, "x", "y", max_depth=6, max_visits=3) is None
    loop = check_loop(chain, "x", "y", max_depth=5, max_visits=3)
    assert loop is not None and loop.depth == 6
    assert check_loop(("a",) * MAX_CHAIN, "b", "c", max_depth=10**6, max_visits=10**6)


def test_guards_follow_settings_and_an_injected_clock() -> None:
    guards = Guards(
        Settings(breaker_loop_max_visits=1, breaker_error_min_calls=1, breaker_cooldown=7)
    )
    assert guards.cooldown == 7
    assert guards.loop((), "a", "b") is None
    assert guards.loop(("a",), "b", "a") is not None
    clock = Clock()
    guards.use_clock(clock)
    assert guards.rate.clock is clock and guards.errors.clock is clock
    assert guards.errors.observe("b", "remote_error") is not None
