"""Circuit breakers in the policy service, against a real server: detectors trip them, every
replica honours them before Cedar, one probe call closes or re-opens them."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

import pytest
from nats.aio.client import Client

from broker import Agent
from broker.connection import connect
from broker.errors import BreakerOpen, RemoteError
from broker.replies import H_CHAIN
from broker.runtime.identity import operator_connect_options
from broker.settings import Settings
from broker.subjects import Subjects
from schemas import Breaker, BreakerList, ListBreakers, ResetBreaker, TripBreaker
from services.cli.client import admin_request
from services.policy.service import PolicyService

if TYPE_CHECKING:
    from support import AgentFactory, AuditTrail, StackFactory

from support import echo_pair, eventually, policy_of

SUBJECTS = Subjects("sb")


class Clock:
    """The detectors' clock, moved by the test."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def until_state(
    policy: PolicyService, key: str, check: Callable[[Breaker], bool], timeout: float = 5.0
) -> Breaker:
    """Wait until ``policy``'s in-memory copy of breaker ``key`` passes ``check``."""
    assert policy.breakers is not None

    def passing() -> Breaker | None:
        assert policy.breakers is not None
        found = policy.breakers.get(key)
        return found if found is not None and check(found) else None

    return await eventually(
        passing,
        lambda: f"breaker {key} to pass the check; it is {policy.breakers.get(key)}",  # type: ignore[union-attr]
        timeout=timeout,
        interval=0.005,
    )


@pytest.fixture
async def operator(settings: Settings) -> AsyncIterator[Client]:
    options = operator_connect_options(settings)
    nc = await connect(settings.nats_url, name="test-operator", **options)
    yield nc
    await nc.close()


# -- call-rate anomaly ---------------------------------------------------------------------

RATE = {
    "breaker_rate_window": 2.0, "breaker_rate_baseline": 60.0, "breaker_rate_min": 1.0,
    "breaker_rate_min_history": 10.0,
}  # fmt: skip


async def steady_traffic(a: Agent, clock: Clock, per_second: int, seconds: int) -> None:
    for _ in range(seconds):
        clock.now += 1.0
        for i in range(per_second):
            assert await a.call("b", "echo", {"i": i}) == {"i": i}


async def test_a_10x_burst_trips_the_callers_breaker_and_its_calls_are_refused(
    make_stack: StackFactory, make_agent: AgentFactory, audit_trail: AuditTrail
) -> None:
    stack = await make_stack(allow=[("a", "b", ["echo"])], **RATE)
    policy = policy_of(stack)
    clock = Clock()
    policy.guards.use_clock(clock)
    a, _ = await echo_pair(make_agent)
    await steady_traffic(a, clock, 2, 40)  # 2 calls/s for 40 s of the detectors' clock
    assert policy.breakers is not None and policy.breakers.get("agent.a") is None

    clock.now += 1.0
    # 25x: 100 calls within one second. The trip is async: the burst is answered, but
    # for its tail when the trip lands first (calls wait for their decision's write).
    burst = await asyncio.gather(
        *(a.call("b", "echo", {"i": i}) for i in range(100)), return_exceptions=True
    )
    refused_early = [r for r in burst if isinstance(r, BaseException)]
    assert all(isinstance(r, BreakerOpen) for r in refused_early), refused_early
    assert len(refused_early) < len(burst)
    tripped = await until_state(policy, "agent.a", lambda b: b.state == "open")
    assert tripped.reason == "rate_anomaly" and tripped.tripped_by == "service:policy"
    assert tripped.figures["rate"] >= 10 * tripped.figures["baseline"]
    assert tripped.until is not None and tripped.cooldown == 30  # SIGNALBOX_BREAKER_COOLDOWN
    assert "calls/s" in tripped.text

    with pytest.raises(BreakerOpen) as refused:
        await a.call("b", "echo", {"i": 0})
    assert refused.value.details["breaker"] == "agent.a"
    assert refused.value.details["reason"] == "rate_anomaly"
    assert "signalbox breakers reset agent:a" in refused.value.message
    # Model and tool use of the tripped agent is refused too, as a denial.
    decision = await a.authorize("use_model", "gpt-4o")
    assert decision.effect == "deny" and decision.reason_code == "breaker_open"
    assert policy.stats.breaker_refused >= 2

    trip = await audit_trail.wait_for(lambda r: r.kind == "breaker")
    assert trip[0].data["op"] == "trip" and trip[0].data["breaker"]["reason"] == "rate_anomaly"
    refusals = await audit_trail.wait_for(
        lambda r: r.kind == "decision" and r.data["decision"]["reason_code"] == "breaker_open",
        count=2,
    )
    assert all(r.data["breaker"]["key"] == "agent.a" for r in refusals)


async def test_steady_traffic_and_normal_variation_never_trip(
    make_stack: StackFactory, make_agent: AgentFactory
) -> None:
    stack = await make_stack(allow=[("a", "b", ["echo"])], **RATE)
    policy = policy_of(stack)
    clock = Clock()
    policy.guards.use_clock(clock)
    a, _ = await echo_pair(make_agent)
    for per_second in (2, 4, 1, 3, 6, 2):  # a minute of varying but normal traffic
        await steady_traffic(a, clock, per_second, 10)
    for _ in range(5):  # an agent's usual bursts: 4x for a few seconds
        await steady_traffic(a, clock, 12, 1)
    assert policy.breakers is not None
    assert policy.breakers.breakers(include_closed=True) == []
    assert policy.stats.breaker_trips == 0


# -- failing target ------------------------------------------------------------------------


async def test_a_failing_target_trips_and_its_callers_fail_fast(
    make_stack: StackFactory, make_agent: AgentFactory, audit_trail: AuditTrail
) -> None:
    stack = await make_stack(
        allow=[("a", "b", ["work"])], breaker_error_min_calls=6, breaker_error_rate=0.5
    )
    policy = policy_of(stack)
    b = make_agent("b")

    @b.capability("work")
    async def work(req: dict[str, Any]) -> dict[str, Any]:
        if req.get("bad"):
            raise RuntimeError("model endpoint returned garbage")
        return req

    a = make_agent("a")
    await b.start()
    await a.start()
    assert await a.call("b", "work", {"n": 1}) == {"n": 1}
    for _ in range(5):
        with pytest.raises(RemoteError):
            await a.call("b", "work", {"bad": True})
    tripped = await until_state(policy, "agent.b", lambda r: r.state == "open")
    assert tripped.reason == "error_rate"
    assert tripped.figures["errors"] == 5 and tripped.figures["calls"] == 6
    assert "5 of 6 calls to b failed" in tripped.text

    # Callers now fail at once with BreakerOpen, however long they would wait.
    started = time.monotonic()
    with pytest.raises(BreakerOpen) as refused:
        await a.call("b", "work", {"n": 2}, timeout=30)
    assert time.monotonic() - started < 5
    assert refused.value.details["breaker"] == "agent.b"
    assert refused.value.details["reason"] == "error_rate"
    await audit_trail.wait_for(
        lambda r: (
            r.kind == "decision"
            and r.data["decision"]["reason_code"] == "breaker_open"
            and r.data["target"] == "b"
        )
    )


# -- call loops ----------------------------------------------------------------------------


async def test_a_call_loop_is_refused_past_the_limit(
    make_stack: StackFactory, make_agent: AgentFactory, audit_trail: AuditTrail
) -> None:
    stack = await make_stack(
        allow=[("a", "b", ["pong"]), ("b", "a", ["ping"])], breaker_loop_max_visits=2
    )
    policy = policy_of(stack)
    a = make_agent("a")
    b = make_agent("b")
    hops: list[str] = []

    @a.capability("ping")
    async def ping(n: int, ctx: Any) -> int:
        hops.append(f"a<{ctx.headers.get(H_CHAIN)}")
        result: int = await a.call("b", "pong", n + 1)
        return result

    @b.capability("pong")
    async def pong(n: int, ctx: Any) -> int:
        hops.append(f"b<{ctx.headers.get(H_CHAIN)}")
        result: int = await b.call("a", "ping", n + 1)
        return result

    await a.start()
    await b.start()
    with pytest.raises(BreakerOpen) as refused:
        await a.call("b", "pong", 0, timeout=10)
    # a -> b -> a -> b, then b -> a would visit a a third time.
    assert hops == ["b<a", "a<a,b", "b<a,b,a"]
    assert refused.value.details["reason"] == "call_loop"
    assert refused.value.details["breaker"] == "agent.a"
    loop = await until_state(policy, "agent.a", lambda r: r.state == "open")
    assert loop.figures["visits"] == 3 and loop.figures["max_visits"] == 2
    assert "a -> b -> a -> b -> a" in loop.text
    await audit_trail.wait_for(lambda r: r.kind == "breaker" and r.data["key"] == "agent.a")


async def test_a_chain_the_policy_service_did_not_sign_is_ignored(
    make_stack: StackFactory, make_agent: AgentFactory
) -> None:
    """An agent cannot name others in Sb-Chain to trip their loop breakers (or, in
    tests/services/cost/test_budgets.py, to spend their budgets): unsigned chains count
    as none, malformed ones too."""
    stack = await make_stack(allow=[("a", "b", ["echo"])], breaker_loop_max_visits=2)
    a, _ = await echo_pair(make_agent)
    policy = stack.services["policy"]
    assert isinstance(policy, PolicyService)
    for forged in ("victim,victim,victim,victim", "x,*", "b,a,b,a,b"):
        assert await a.call("b", "echo", {"n": 1}, headers={H_CHAIN: forged}) == {"n": 1}
    assert policy.stats.unsigned_chains == 3
    assert policy.breakers is not None
    assert policy.breakers.get("agent.victim") is None
    assert policy.breakers.get("agent.b") is None


# -- half-open: one probe, two replicas ----------------------------------------------------


async def probe_round(
    a: Agent, first: PolicyService, second: PolicyService, operator: Client, gate: asyncio.Event
) -> tuple[asyncio.Future[Any], Breaker]:
    """Trip ``agent.b`` for 0.3 s, let the cool-down pass, race 20 calls on two replicas.

    Returns the one call let through (held in b's handler until ``gate``) and
    the half-open breaker.
    """
    tripped = await admin_request(
        operator, SUBJECTS, "trip", TripBreaker(key="agent.b", text="drill", cooldown=0.3),
        Breaker, service="breakers",
    )  # fmt: skip
    for replica in (first, second):
        await until_state(replica, "agent.b", lambda r: r.state == "open")
    assert tripped.until is not None
    await asyncio.sleep(max(0.0, tripped.until - time.time()) + 0.02)  # the cool-down itself
    calls = [asyncio.ensure_future(a.call("b", "slow", {"i": i}, timeout=10)) for i in range(20)]
    async with asyncio.timeout(10):
        while sum(c.done() for c in calls) < 19:
            await asyncio.wait(calls, return_when=asyncio.FIRST_COMPLETED)
            await asyncio.sleep(0)
    refused = [c for c in calls if c.done()]
    assert all(isinstance(c.exception(), BreakerOpen) for c in refused)
    assert {c.exception().details["state"] for c in refused} <= {"half_open", "open"}  # type: ignore[union-attr]
    (probe,) = [c for c in calls if not c.done()]
    half_open = await until_state(first, "agent.b", lambda r: r.state == "half_open")
    await until_state(second, "agent.b", lambda r: r.state == "half_open")
    return probe, half_open


async def test_half_open_lets_exactly_one_probe_through_then_closes_or_reopens(
    make_stack: StackFactory, make_agent: AgentFactory, operator: Client,
    audit_trail: AuditTrail,
) -> None:  # fmt: skip
    first = policy_of(await make_stack(allow=[("a", "b", ["slow"])]))
    second = policy_of(await make_stack(services=["policy"]))
    b = make_agent("b")
    entered: list[int] = []
    gate = asyncio.Event()
    fail = {"now": False}

    @b.capability("slow")
    async def slow(req: dict[str, Any]) -> dict[str, Any]:
        entered.append(req["i"])
        await gate.wait()
        if fail["now"]:
            raise RuntimeError("still broken")
        return req

    a = make_agent("a")
    await b.start()
    await a.start()

    # Failing probe: re-opened with the cool-down doubled.
    fail["now"] = True
    probe, half_open = await probe_round(a, first, second, operator, gate)
    # Forwarded once its decision is stored: the probe reaches b a moment later.
    await eventually(lambda: entered, "the probe to reach b")
    assert len(entered) == 1 and half_open.probe is not None
    gate.set()
    with pytest.raises(RemoteError):
        await probe
    reopened = await until_state(first, "agent.b", lambda r: r.state == "open" and r.trips == 2)
    assert reopened.cooldown == pytest.approx(0.6)
    await until_state(second, "agent.b", lambda r: r.trips == 2)

    # Successful probe: closed, and calls flow again on both replicas.
    await admin_request(
        operator, SUBJECTS, "reset", ResetBreaker(key="agent.b"), Breaker, service="breakers"
    )
    gate.clear()
    entered.clear()
    fail["now"] = False
    probe, _ = await probe_round(a, first, second, operator, gate)
    await eventually(lambda: entered, "the probe to reach b")
    assert len(entered) == 1
    gate.set()
    assert (await probe)["i"] == entered[0]
    for replica in (first, second):
        await until_state(replica, "agent.b", lambda r: r.state == "closed")
    assert await asyncio.gather(*(a.call("b", "slow", {"i": i}) for i in range(10))) == [
        {"i": i} for i in range(10)
    ]
    assert first.stats.breaker_probes + second.stats.breaker_probes == 2
    # Every change is audited by whoever made it (replicas and operators alike).
    changes = await audit_trail.wait_for(lambda r: r.kind == "breaker", count=7)
    assert [r.data["op"] for r in sorted(changes, key=lambda r: r.time)] == [
        "trip", "probe", "reopen", "reset", "trip", "probe", "close",
    ]  # fmt: skip


async def test_both_replicas_honour_a_trip_within_a_second(
    make_stack: StackFactory, make_agent: AgentFactory, operator: Client
) -> None:
    first = policy_of(await make_stack(allow=[("a", "b", ["echo"])]))
    second = policy_of(await make_stack(services=["policy"]))
    a, _ = await echo_pair(make_agent)
    await admin_request(
        operator, SUBJECTS, "trip",
        TripBreaker(key="team.team-1", text="incident 42", requested_by="ann"),
        Breaker, service="breakers",
    )  # fmt: skip
    for replica in (first, second):
        seen = await until_state(replica, "team.team-1", lambda r: r.state == "open", 1.0)
        assert seen.tripped_by == "bootstrap:ann" and seen.until is None
    results = await asyncio.gather(
        *(a.call("b", "echo", {"i": i}) for i in range(20)), return_exceptions=True
    )
    assert all(isinstance(r, BreakerOpen) for r in results)
    assert all(r.details["breaker"] == "team.team-1" for r in results)  # type: ignore[union-attr]
    assert first.stats.breaker_refused + second.stats.breaker_refused == 20
    listed = await admin_request(
        operator, SUBJECTS, "list", ListBreakers(), BreakerList, service="breakers"
    )
    assert [x.key for x in listed.breakers] == ["team.team-1"]
