"""BreakerBoard on a real server: watched copies, compare-and-set transitions, one probe."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import pytest
from nats.aio.client import Client

from broker.codec import decode
from broker.connection import connect
from broker.errors import BreakerOpen, CallDenied, InvalidInput, NotFound
from broker.runtime.audit import AuditEmitter
from broker.runtime.breakers import BreakerBoard, breaker_key, breaker_open, split_key
from broker.runtime.identity import service_connect_options
from broker.runtime.jetstream import (
    AUDIT_INTAKE_STREAM,
    KV_BREAKERS,
    ensure_buckets,
    ensure_streams,
)
from broker.settings import Settings
from broker.subjects import Subjects
from schemas import AuditBatch, AuditEvent, Breaker


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


class Replica:
    """One service's board (its own connection and audit emitter)."""

    def __init__(self, nc: Client, board: BreakerBoard, emitter: AuditEmitter) -> None:
        self.nc, self.board, self.emitter = nc, board, emitter
        self.changed = asyncio.Event()

    async def sees(self, key: str, predicate: Callable[[Breaker], bool]) -> Breaker:
        """Wait (on the watch's change events) until this board's copy of ``key`` matches."""
        async with asyncio.timeout(5):
            while True:
                self.changed.clear()
                found = self.board.get(key)
                if found is not None and predicate(found):
                    return found
                await self.changed.wait()


@pytest.fixture
async def replicas(settings: Settings) -> AsyncIterator[tuple[Replica, Replica, Clock]]:
    clock = Clock()
    made: list[Replica] = []
    for i in range(2):
        options = service_connect_options(settings)
        nc = await connect(settings.nats_url, name=f"board-{i}", **options)
        js = nc.jetstream()
        await ensure_streams(js, settings)
        await ensure_buckets(js, settings)
        emitter = AuditEmitter(nc, Subjects("sb"), f"service:test-{i}")
        board = BreakerBoard(
            await js.key_value(KV_BREAKERS), emitter, f"service:test-{i}",
            probe_timeout=30, max_cooldown=100, clock=clock,
        )  # fmt: skip
        replica = Replica(nc, board, emitter)
        board.on_change = lambda old, new, r=replica: r.changed.set()
        await board.start()
        made.append(replica)
    yield made[0], made[1], clock
    for r in made:
        await r.board.stop()
        await r.emitter.close()
        await r.nc.close()


async def breaker_events(nc: Client) -> list[AuditEvent]:
    js = nc.jetstream()
    info = await js.stream_info(AUDIT_INTAKE_STREAM)
    out: list[AuditEvent] = []
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        raw = await js.get_msg(AUDIT_INTAKE_STREAM, seq=seq)
        out.extend(e for e in decode(raw.data or b"", AuditBatch).events if e.kind == "breaker")
    return sorted(out, key=lambda e: e.time)


def test_keys_are_scope_and_name() -> None:
    assert breaker_key("agent", "fraud-detection") == "agent.fraud-detection"
    assert split_key("team.risk") == ("team", "risk")
    for bad in ("risk", "project.x", "agent.", "agent.a.b", "team.a b"):
        with pytest.raises(InvalidInput):
            split_key(bad)
    with pytest.raises(InvalidInput):
        breaker_key("fleet", "x")  # type: ignore[arg-type]


async def test_a_trip_reaches_every_replica_and_check_is_a_lookup(
    replicas: tuple[Replica, Replica, Clock],
) -> None:
    a, b, clock = replicas
    assert not a.board.any_open() and a.board.check("agent.x", "team.t") == ()
    tripped = await a.board.trip(
        "agent.x", "manual", "maintenance", {"calls": 3}, cooldown=60, by="operator:ann"
    )
    assert (tripped.state, tripped.reason, tripped.trips) == ("open", "manual", 1)
    assert tripped.since == clock.now and tripped.until == clock.now + 60
    assert tripped.figures == {"calls": 3.0} and tripped.tripped_by == "operator:ann"
    assert a.board.check("agent.y", "agent.x") == (tripped,)  # our own write, at once
    assert await b.sees("agent.x", lambda r: r.state == "open") == tripped
    assert b.board.check("team.t", "agent.x") == (tripped,)
    assert [x.key for x in b.board.breakers()] == ["agent.x"]

    closed = await b.board.reset("agent.x", by="operator:bob", text="fixed")
    assert closed.state == "closed" and closed.until is None and closed.trips == 1
    await a.sees("agent.x", lambda r: r.state == "closed")
    assert a.board.check("agent.x") == () and not a.board.any_open()
    assert a.board.breakers() == [] and a.board.breakers(include_closed=True) == [closed]
    assert (await a.board.reset("agent.x")) == closed  # already closed: unchanged
    with pytest.raises(NotFound, match="signalbox breakers list"):
        await a.board.reset("agent.nobody")

    assert await a.emitter.flush() and await b.emitter.flush()
    events = await breaker_events(a.nc)
    assert [(e.actor, e.data["op"], e.data["from"], e.data["to"]) for e in events] == [
        ("operator:ann", "trip", "closed", "open"),
        ("operator:bob", "reset", "open", "closed"),
    ]
    assert events[0].subject == "$KV.sb_breakers.agent.x"
    assert events[1].data["breaker"]["text"] == "maintenance (reset: fixed)"


async def test_concurrent_trips_on_two_replicas_lose_no_update(
    replicas: tuple[Replica, Replica, Clock],
) -> None:
    a, b, _ = replicas
    await asyncio.gather(
        *(
            board.trip("team.risk", "budget", f"trip {i}", cooldown=10)
            for i in range(10)
            for board in (a.board, b.board)
        )
    )
    final = await a.sees("team.risk", lambda r: r.trips == 20)
    assert final.state == "open" and final.scope == "team" and final.name == "risk"
    assert a.board.stats["lost_races"] + b.board.stats["lost_races"] > 0


async def test_a_trip_never_shortens_an_open_breaker(
    replicas: tuple[Replica, Replica, Clock],
) -> None:
    a, _, clock = replicas
    await a.board.trip("agent.x", "manual", "until reset", cooldown=None)
    again = await a.board.trip("agent.x", "rate_anomaly", "burst", {"rate": 9}, cooldown=5)
    assert again.until is None and again.reason == "rate_anomaly" and again.trips == 2
    await a.board.reset("agent.x")
    await a.board.trip("agent.y", "error_rate", "long", cooldown=100)
    shorter = await a.board.trip("agent.y", "error_rate", "short", cooldown=5)
    assert shorter.until == clock.now + 100 and shorter.cooldown == 100


async def test_exactly_one_probe_after_the_cooldown_then_close_or_reopen(
    replicas: tuple[Replica, Replica, Clock],
) -> None:
    a, b, clock = replicas
    tripped = await a.board.trip("agent.t", "error_rate", "failing", cooldown=10)
    await b.sees("agent.t", lambda r: r.state == "open")
    assert not a.board.probe_due(tripped)
    assert await a.board.claim("agent.t", "too-early") is None  # cool-down not over
    clock.now += 10

    # Eight calls on two replicas race for the probe: exactly one wins.
    won = await asyncio.gather(
        *(board.claim("agent.t", f"call-{i}-{j}")
          for i in range(4) for j, board in enumerate((a.board, b.board)))
    )  # fmt: skip
    winners = [w for w in won if w is not None]
    assert len(winners) == 1
    probe = winners[0]
    assert probe.state == "half_open" and probe.probe is not None
    call_id = probe.probe.call_id
    await a.sees("agent.t", lambda r: r.state == "half_open")
    await b.sees("agent.t", lambda r: r.state == "half_open")
    assert await a.board.settle("agent.t", "not-the-probe", True) is None

    reopened = await a.board.settle("agent.t", call_id, False, figures={"error_rate": 1})
    assert reopened is not None
    assert (reopened.state, reopened.cooldown, reopened.trips) == ("open", 20, 2)
    assert reopened.until == clock.now + 20 and reopened.since == tripped.since
    assert reopened.figures == {"error_rate": 1.0}

    clock.now += 20
    second = await b.board.claim("agent.t", "second-probe")
    assert second is not None
    released = await b.board.settle("agent.t", "second-probe", None)  # tested nothing
    assert released is not None and released.state == "open" and released.trips == 2
    third = await a.board.claim("agent.t", "third-probe")
    assert third is not None
    closed = await a.board.settle("agent.t", "third-probe", True)
    assert closed is not None and closed.state == "closed" and closed.probe is None
    await b.sees("agent.t", lambda r: r.state == "closed")

    await a.emitter.flush()
    await b.emitter.flush()
    ops = [(e.data["op"], e.data["to"]) for e in await breaker_events(a.nc)]
    assert ops == [
        ("trip", "open"), ("probe", "half_open"), ("reopen", "open"), ("probe", "half_open"),
        ("release", "open"), ("probe", "half_open"), ("close", "closed"),
    ]  # fmt: skip


async def test_a_dead_replicas_probe_is_taken_over_and_cooldowns_are_capped(
    replicas: tuple[Replica, Replica, Clock],
) -> None:
    a, b, clock = replicas
    await a.board.trip("agent.t", "manual", "x", cooldown=80)
    clock.now += 80
    assert await a.board.claim("agent.t", "lost") is not None  # its replica then dies
    await b.sees("agent.t", lambda r: r.state == "half_open")
    assert await b.board.claim("agent.t", "mine") is None
    clock.now += 30  # probe_timeout
    taken = await b.board.claim("agent.t", "mine")
    assert taken is not None and taken.probe is not None and taken.probe.call_id == "mine"
    assert await a.board.settle("agent.t", "lost", True) is None  # too late: not ours
    reopened = await b.board.settle("agent.t", "mine", False)
    assert reopened is not None and reopened.cooldown == 100  # 160, capped


async def test_an_unreadable_record_fails_closed(
    replicas: tuple[Replica, Replica, Clock],
) -> None:
    a, _, _ = replicas
    await a.board.kv.put("agent.z", b"not a breaker")
    found = await a.sees("agent.z", lambda r: r.state == "open")
    assert found.until is None and found.reason == "unreadable"
    assert "cannot be read" in found.text and "resets it" in found.text
    assert a.board.check("agent.z") == (found,)
    assert a.emitter.stats.by_kind["alert"] == 1  # reported once, not a silent manual trip
    # A reset writes a clean record over it.
    reset = await a.board.reset("agent.z", by="operator:test")
    assert reset.state == "closed"
    assert decode((await a.board.kv.get("agent.z")).value, Breaker).state == "closed"


def test_the_refusal_says_which_why_since_until_and_what_to_do() -> None:
    breaker = Breaker(
        key="agent.fraud-detection", scope="agent", name="fraud-detection", state="open",
        reason="rate_anomaly", text="10x its baseline", figures={"rate": 50.0},
        since=1_700_000_000.0, until=1_700_000_030.0, cooldown=30, trips=1,
        tripped_by="service:policy",
    )  # fmt: skip
    err = breaker_open(breaker)
    assert isinstance(err, BreakerOpen) and isinstance(err, CallDenied)
    assert err.code == "breaker_open"
    assert "agent.fraud-detection is open (rate_anomaly: 10x its baseline)" in err.message
    assert "since 2023-11-14T22:13:20+00:00" in err.message
    assert "until 2023-11-14T22:13:50+00:00" in err.message
    assert "`signalbox breakers reset agent:fraud-detection`" in err.message
    assert err.details["breaker"] == "agent.fraud-detection"
    assert err.details["reason"] == "rate_anomaly" and err.details["figures"] == {"rate": 50.0}
    assert err.details["until"] == 1_700_000_030.0 and err.details["reason_code"] == "breaker_open"
    forever = breaker_open(Breaker(key="team.risk", scope="team", name="risk", state="open",
                                   reason="budget"))  # fmt: skip
    assert "until an operator resets it" in forever.message
    assert forever.details["reset"] == "signalbox breakers reset team:risk"
