"""broker.runtime.throttle with a fake clock: windowed summaries and per-key back-off."""

from __future__ import annotations

import pytest

from broker.runtime.throttle import OTHER_SOURCES, Backoff, Emit, Summarizer


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


def kinds(emits: list[Emit[str]]) -> list[tuple[str, str, int]]:
    return [(e.kind, e.key, e.count) for e in emits]


# -- Summarizer ---------------------------------------------------------------------------


def test_the_first_event_is_emitted_at_once_and_the_rest_once_when_the_window_closes(
    clock: Clock,
) -> None:
    s: Summarizer[str] = Summarizer(60.0, clock=clock)
    first = s.note("10.0.0.1", "payload-1", label="wrong_secret")
    assert kinds(first) == [("first", "10.0.0.1", 1)]
    assert first[0].payload == "payload-1" and first[0].label == "wrong_secret"
    assert first[0].started == 1000.0 and first[0].ends == 1060.0
    for i in range(99):
        clock.now += 0.5
        assert s.note("10.0.0.1", f"payload-{i + 2}", label="throttled" if i > 8 else "x") == []
    assert s.flush_due() == []  # the window is still open
    clock.now = 1060.0
    (summary,) = s.flush_due()
    assert (summary.kind, summary.count, summary.suppressed) == ("summary", 100, 99)
    assert summary.payload == "payload-1" and summary.label == "wrong_secret"
    assert summary.counts == {"wrong_secret": 1, "x": 9, "throttled": 90}
    assert len(s) == 0 and s.flush_due() == []


def test_a_window_with_only_its_first_event_has_no_summary(clock: Clock) -> None:
    s: Summarizer[str] = Summarizer(10.0, clock=clock)
    s.note("a", "p")
    clock.now += 10
    assert s.flush_due() == []
    assert len(s) == 0
    # The next event opens a new window and is emitted again.
    assert kinds(s.note("a", "p2")) == [("first", "a", 1)]


def test_an_event_after_the_window_closes_brings_the_unflushed_summary_along(
    clock: Clock,
) -> None:
    s: Summarizer[str] = Summarizer(10.0, clock=clock)
    s.note("a", "p1", "r")
    s.note("a", "p2", "r")
    s.note("a", "p3", "q")
    clock.now += 12  # nobody flushed
    out = s.note("a", "p4", "q")
    assert kinds(out) == [("summary", "a", 3), ("first", "a", 1)]
    assert out[0].counts == {"r": 2, "q": 1} and out[0].payload == "p1"
    assert out[1].payload == "p4" and out[1].started == clock.now


def test_keys_have_windows_of_their_own(clock: Clock) -> None:
    s: Summarizer[str] = Summarizer(10.0, clock=clock)
    assert kinds(s.note("a", "pa")) == [("first", "a", 1)]
    clock.now += 5
    assert kinds(s.note("b", "pb")) == [("first", "b", 1)]
    s.note("a", "pa2")
    s.note("b", "pb2")
    s.note("b", "pb3")
    clock.now += 5  # a's window closes, b's does not
    assert kinds(s.flush_due()) == [("summary", "a", 2)]
    clock.now += 5
    assert kinds(s.flush_due()) == [("summary", "b", 3)]
    assert s.next_due() is None


def test_flush_all_emits_open_windows_too_so_no_count_is_lost(clock: Clock) -> None:
    s: Summarizer[str] = Summarizer(60.0, clock=clock)
    for _ in range(5):
        s.note("a", "p", "r")
    s.note("b", "p")  # a single event: already recorded, no summary
    assert s.next_due() == 1060.0
    assert kinds(s.flush_all()) == [("summary", "a", 5)]
    assert len(s) == 0 and s.flush_all() == []


def test_keys_beyond_the_cap_are_aggregated_as_other_sources(clock: Clock) -> None:
    s: Summarizer[str] = Summarizer(10.0, max_keys=2, clock=clock)
    s.note("a", "pa")
    s.note("b", "pb")
    out = s.note("c", "pc", "r")
    assert kinds(out) == [("first", OTHER_SOURCES, 1)]
    assert out[0].overflow and out[0].payload == "pc"
    for key in ("d", "e", "c"):
        assert s.note(key, "p", "r") == []
    assert len(s) == 3  # a, b and the aggregate: memory stays bounded
    # Existing keys keep counting in their own windows.
    assert s.note("a", "pa2") == []
    clock.now += 10
    summaries = s.flush_due()
    assert kinds(summaries) == [("summary", "a", 2), ("summary", OTHER_SOURCES, 4)]
    assert summaries[1].overflow and summaries[1].counts == {"r": 4}


def test_at_the_cap_closed_windows_make_room_and_their_summaries_are_returned(
    clock: Clock,
) -> None:
    s: Summarizer[str] = Summarizer(10.0, max_keys=1, clock=clock)
    s.note("a", "pa")
    s.note("a", "pa2")
    clock.now += 10
    out = s.note("b", "pb")
    assert kinds(out) == [("summary", "a", 2), ("first", "b", 1)]
    assert not out[1].overflow


@pytest.mark.parametrize("window", [0.0, -1.0, float("inf"), float("nan")])
def test_summarizer_rejects_a_bad_window(window: float) -> None:
    with pytest.raises(ValueError, match="window"):
        Summarizer(window)
    with pytest.raises(ValueError, match="max_keys"):
        Summarizer(1.0, max_keys=0)


# -- Backoff ------------------------------------------------------------------------------


def test_a_burst_of_failures_blocks_the_key_for_a_window(clock: Clock) -> None:
    b = Backoff(3, 60.0, clock=clock)
    assert b.failed("k") == 0.0
    assert b.failed("k") == 0.0
    assert b.blocked("k") == 0.0
    assert b.failed("k") == 60.0
    assert b.blocked("k") == 60.0
    assert b.blocked("other") == 0.0
    clock.now += 59
    assert b.blocked("k") == pytest.approx(1.0)
    assert b.failed("k") == 0.0  # not counted while blocked
    clock.now += 1
    assert b.blocked("k") == 0.0


def test_failures_spread_over_windows_do_not_block(clock: Clock) -> None:
    b = Backoff(3, 10.0, clock=clock)
    for _ in range(10):
        assert b.failed("k") == 0.0
        assert b.failed("k") == 0.0
        clock.now += 10  # the window passes with two failures only
    assert b.blocked("k") == 0.0


def test_repeat_offenders_are_blocked_twice_as_long_up_to_the_cap(clock: Clock) -> None:
    b = Backoff(2, 10.0, max_block=35.0, clock=clock)
    blocks = []
    for _ in range(4):
        b.failed("k")
        blocks.append(b.failed("k"))
        clock.now += blocks[-1]  # straight back at it when the block ends
    assert blocks == [10.0, 20.0, 35.0, 35.0]


def test_a_key_quiet_for_as_long_as_its_last_block_is_forgiven(clock: Clock) -> None:
    b = Backoff(2, 10.0, clock=clock)
    b.failed("k")
    assert b.failed("k") == 10.0
    clock.now += 10
    b.failed("k")
    assert b.failed("k") == 20.0
    clock.now += 20 + 19.9  # unblocked, but not yet quiet for 20 s
    assert b.prune() == 0
    b.failed("k")
    assert b.failed("k") == 40.0
    clock.now += 40 + 40  # quiet for as long as the last block
    assert b.prune() == 1 and len(b) == 0
    b.failed("k")
    assert b.failed("k") == 10.0  # starts over


def test_success_clears_the_key_but_not_a_block(clock: Clock) -> None:
    b = Backoff(3, 60.0, clock=clock)
    b.failed("k")
    b.failed("k")
    b.succeeded("k")
    assert len(b) == 0
    b.failed("k")
    b.failed("k")
    assert b.failed("k") == 60.0
    b.succeeded("k")  # a success in flight when the block began does not lift it
    assert b.blocked("k") == 60.0


def test_keys_beyond_the_cap_are_not_tracked_until_room_is_made(clock: Clock) -> None:
    b = Backoff(1, 10.0, max_keys=2, clock=clock)
    assert b.failed("a") == 10.0
    assert b.failed("b") == 10.0
    assert b.failed("c") == 0.0  # full of blocked keys: fails open, counted
    assert b.untracked == 1 and b.blocked("c") == 0.0 and len(b) == 2
    clock.now += 20  # a and b are forgiven: pruned to make room
    assert b.failed("c") == 10.0
    assert len(b) == 1


def test_backoff_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="burst"):
        Backoff(0, 1.0)
    with pytest.raises(ValueError, match="window"):
        Backoff(1, 0.0)
    with pytest.raises(ValueError, match="max_block"):
        Backoff(1, 1.0, max_block=0.0)
    with pytest.raises(ValueError, match="max_keys"):
        Backoff(1, 1.0, max_keys=0)
