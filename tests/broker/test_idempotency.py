"""Idempotency keys: a call retried with the same key runs at most once on its target.

A caller that got ``OutcomeUnknown`` (forwarded, unanswered: it may have run)
retries with the same ``idempotency_key`` and gets the first run's answer, or
``CallInProgress`` while that run is still going; never a second run. Keys
are per caller (a key another agent uses runs separately) and checked at
the policy service. Real server, real agents; the cache's bounds unit-tested.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

import pytest
from support import RawAgent, enroll

from broker import Agent
from broker.dedup import Deduplicator
from broker.errors import CallInProgress, InvalidInput, OutcomeUnknown
from broker.replies import H_CALLER, H_ERROR, H_IDEMPOTENCY_KEY, H_TIMEOUT_MS
from broker.settings import Settings

if TYPE_CHECKING:
    from support import AgentFactory, StackFactory


class Target:
    """``b``, whose ``book`` capability counts its runs and can be held."""

    def __init__(self, make_agent: AgentFactory) -> None:
        self.runs: list[Any] = []
        self.release = asyncio.Event()
        self.release.set()
        self.agent = make_agent("b")

        @self.agent.capability("book")
        async def book(req: dict[str, Any]) -> dict[str, Any]:
            self.runs.append(req)
            await self.release.wait()
            return {"booking": len(self.runs), **req}


@pytest.fixture
async def target(make_stack: StackFactory, make_agent: AgentFactory) -> Target:
    await make_stack(allow=[("a", "b", ["book"]), ("c", "b", ["book"])], call_timeout=30)
    b = Target(make_agent)
    await b.agent.start()
    return b


async def _caller(make_agent: AgentFactory, name: str = "a") -> Agent:
    agent = make_agent(name)
    await agent.start()
    return agent


async def test_a_retried_call_returns_the_first_answer_without_running_again(
    target: Target, make_agent: AgentFactory
) -> None:
    a = await _caller(make_agent)
    first = await a.call("b", "book", {"seat": "1A"}, idempotency_key="order-17")
    again = await a.call("b", "book", {"seat": "1A"}, idempotency_key="order-17")
    assert first == again == {"booking": 1, "seat": "1A"}
    assert target.runs == [{"seat": "1A"}]
    # Without a key (or with another one) every call runs.
    await a.call("b", "book", {"seat": "1A"})
    await a.call("b", "book", {"seat": "1A"}, idempotency_key="order-18")
    assert len(target.runs) == 3
    assert target.agent.dedup.stats.replayed == 1


async def test_after_outcome_unknown_a_keyed_retry_waits_for_the_first_run(
    target: Target, make_agent: AgentFactory
) -> None:
    a = await _caller(make_agent)
    target.release.clear()  # the first run hangs past its caller's timeout
    with pytest.raises(OutcomeUnknown) as unknown:
        await a.call("b", "book", {"seat": "2B"}, idempotency_key="order-2", timeout=0.5)
    assert unknown.value.details["idempotency_key"] == "order-2"
    assert "order-2" in unknown.value.message
    # Retried while the first run is still going, with too little time to wait for it.
    with pytest.raises(CallInProgress):
        await a.call("b", "book", {"seat": "2B"}, idempotency_key="order-2", timeout=0.5)
    # Retried with time to wait: the first run finishes and its answer comes back.
    retry = asyncio.ensure_future(
        a.call("b", "book", {"seat": "2B"}, idempotency_key="order-2", timeout=10)
    )
    await asyncio.sleep(0.2)
    target.release.set()
    assert await retry == {"booking": 1, "seat": "2B"}
    assert target.runs == [{"seat": "2B"}]


async def test_keys_belong_to_their_caller(target: Target, make_agent: AgentFactory) -> None:
    a, c = await _caller(make_agent, "a"), await _caller(make_agent, "c")
    mine = await a.call("b", "book", {"who": "a"}, idempotency_key="shared-key")
    theirs = await c.call("b", "book", {"who": "c"}, idempotency_key="shared-key")
    assert mine == {"booking": 1, "who": "a"} and theirs == {"booking": 2, "who": "c"}


async def test_a_bad_key_is_refused_before_any_call(
    target: Target, make_agent: AgentFactory, settings: Settings
) -> None:
    a = await _caller(make_agent)
    for bad in ("", "x" * 129, "has space", "semi;colon", "ünïcode"):
        if not bad:
            continue  # "" means no key
        with pytest.raises(InvalidInput):
            await a.call("b", "book", {}, idempotency_key=bad)
    # A raw client sending one anyway: refused by the policy service, not forwarded.
    assert settings.nats_url
    raw = await RawAgent().connect(settings.nats_url, "a", enroll(settings, "a"))
    try:
        reply = await raw.request(
            "sb.out.a.b.book", b"{}", timeout=5,
            headers={H_IDEMPOTENCY_KEY: "x" * 500, H_TIMEOUT_MS: "5000"},
        )  # fmt: skip
    finally:
        await raw.close()
    assert reply.headers is not None and reply.headers[H_ERROR] == "invalid_input"
    assert target.runs == []


# -- the cache's bounds ----------------------------------------------------------------------


async def _answer(n: int, size: int = 10) -> tuple[bytes, dict[str, str] | None]:
    return b"x" * size, {"n": str(n)}


async def test_the_cache_keeps_at_most_its_entries_and_bytes() -> None:
    cache = Deduplicator(window=600, max_entries=3, max_bytes=10_000)
    for n in range(5):
        await cache.run(("a", f"k{n}"), 0, lambda n=n: _answer(n))  # type: ignore[misc]
    assert len(cache) == 3 and cache.stats.evicted == 2
    small = Deduplicator(window=600, max_entries=100, max_bytes=100)
    for n in range(5):
        await small.run(("a", f"k{n}"), 0, lambda n=n: _answer(n, 40))  # type: ignore[misc]
    assert len(small) == 2  # 2 x (40 + key) bytes fit in 100


async def test_answers_expire_after_the_window() -> None:
    cache = Deduplicator(window=0.0)
    runs = 0

    async def work() -> tuple[bytes, dict[str, str] | None]:
        nonlocal runs
        runs += 1
        return b"ok", None

    await cache.run(("a", "k"), 0, work)
    await cache.run(("a", "k"), 0, work)
    assert runs == 2  # the first answer had expired


def test_only_a_caller_named_by_the_policy_service_and_a_valid_key_count() -> None:
    assert Deduplicator.key_of({H_CALLER: "a", H_IDEMPOTENCY_KEY: "k-1"}) == ("a", "k-1")
    assert Deduplicator.key_of({H_IDEMPOTENCY_KEY: "k-1"}) is None
    assert Deduplicator.key_of({H_CALLER: "a", H_IDEMPOTENCY_KEY: "bad key"}) is None
    assert Deduplicator.key_of({H_CALLER: "a"}) is None
