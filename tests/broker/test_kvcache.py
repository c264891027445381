"""KVCache on a real server: loaded at start, kept current by the watch, fail-closed on
values that do not decode (broker/runtime/kvcache.py)."""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
from nats.aio.client import Client
from nats.js.kv import KeyValue
from support import eventually

from broker.codec import encode
from broker.connection import connect
from broker.runtime.kvcache import KVCache
from schemas import Budget, RenewReservation

pytestmark = pytest.mark.nats


def budget(name: str, limit: float = 1.0) -> Budget:
    return Budget(scope="agent", name=name, window="day", limit_usd=limit)


@pytest.fixture
async def nc(nats_url: str) -> AsyncIterator[Client]:
    conn = await connect(nats_url, name="test-kvcache")
    yield conn
    await conn.close()


@pytest.fixture
async def kv(nc: Client) -> AsyncIterator[KeyValue]:
    """A bucket of its own on the session server, removed afterwards."""
    js = nc.jetstream()
    name = f"test_kvcache_{os.urandom(4).hex()}"
    yield await js.create_key_value(bucket=name, history=5)
    await js.delete_key_value(name)


@dataclass
class Listener:
    """What the cache reported through ``on_change`` and ``on_unreadable``."""

    changes: list[tuple[str, Budget | None]] = field(default_factory=list)
    unreadable: list[tuple[str, str]] = field(default_factory=list)

    def on_change(self, key: str, value: Budget | None) -> None:
        self.changes.append((key, value))

    def on_unreadable(self, key: str, reason: str) -> None:
        self.unreadable.append((key, reason))


@pytest.fixture
def listener() -> Listener:
    return Listener()


@pytest.fixture
async def started(kv: KeyValue, listener: Listener) -> AsyncIterator[KVCache[Budget]]:
    """A started cache of Budget values on the empty bucket."""
    cache = KVCache(kv, Budget, on_change=listener.on_change, on_unreadable=listener.on_unreadable)
    await cache.start(timeout=5)
    yield cache
    await cache.stop()


async def test_start_returns_with_the_current_contents_loaded(kv: KeyValue) -> None:
    await kv.put("agent.a.day", encode(budget("a")))
    await kv.put("agent.b.day", encode(budget("b", 2.0)))
    revision = await kv.put("agent.b.day", encode(budget("b", 3.0)))
    cache = KVCache(kv, Budget)
    await cache.start(timeout=5)
    try:
        assert sorted(cache) == ["agent.a.day", "agent.b.day"] and len(cache) == 2
        assert cache.get("agent.b.day") == budget("b", 3.0)  # the latest value only
        assert "agent.a.day" in cache and "agent.c.day" not in cache
        assert cache.get("agent.c.day") is None
        assert sorted(v.name for v in cache.values()) == ["a", "b"]
        assert cache.revision == revision
    finally:
        await cache.stop()


async def test_an_empty_bucket_starts_empty(started: KVCache[Budget]) -> None:
    assert len(started) == 0 and list(started) == [] and started.values() == []
    assert started.unreadable == {}


async def test_the_watch_applies_puts_deletes_and_purges(
    kv: KeyValue, started: KVCache[Budget], listener: Listener
) -> None:
    first = await kv.put("agent.a.day", encode(budget("a")))
    await eventually(lambda: started.get("agent.a.day") == budget("a"), "the put applied")
    assert started.revision == first
    await kv.put("agent.a.day", encode(budget("a", 5.0)))
    await eventually(lambda: started.get("agent.a.day") == budget("a", 5.0), "the update")
    await kv.delete("agent.a.day")
    await eventually(lambda: "agent.a.day" not in started, "the delete applied")
    await kv.put("agent.b.day", encode(budget("b")))
    await kv.purge("agent.b.day")
    await eventually(
        lambda: ("agent.b.day", None) in listener.changes, "the purge reported as a change"
    )
    assert "agent.b.day" not in started and len(started) == 0
    assert listener.changes == [
        ("agent.a.day", budget("a")),
        ("agent.a.day", budget("a", 5.0)),
        ("agent.a.day", None),
        ("agent.b.day", budget("b")),
        ("agent.b.day", None),
    ]
    assert listener.unreadable == []


@pytest.mark.parametrize(
    "stored",
    [b"not json", b"\xff\xfe", encode(RenewReservation(reservation_id="r-1"))],
    ids=["not-json", "not-utf8", "another-type"],
)
async def test_a_value_that_does_not_decode_leaves_the_copy_and_is_reported(
    kv: KeyValue,
    started: KVCache[Budget],
    listener: Listener,
    stored: bytes,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.ERROR, logger="broker.runtime.kvcache")
    await kv.put("agent.a.day", encode(budget("a")))
    await eventually(lambda: "agent.a.day" in started, "the readable value")
    await kv.put("agent.a.day", stored)
    await eventually(lambda: "agent.a.day" in started.unreadable, "the key listed as unreadable")
    # The stale older value is not kept: readers see no value, and why.
    assert started.get("agent.a.day") is None and "agent.a.day" not in started
    reason = started.unreadable["agent.a.day"]
    assert reason
    assert listener.changes[-1] == ("agent.a.day", None)
    assert listener.unreadable == [("agent.a.day", reason)]
    [logged] = [r for r in caplog.records if r.levelno == logging.ERROR]
    bucket = (await kv.status()).bucket
    assert bucket in logged.getMessage() and "agent.a.day" in logged.getMessage()
    # A readable value replaces it.
    await kv.put("agent.a.day", encode(budget("a", 7.0)))
    await eventually(lambda: started.get("agent.a.day") == budget("a", 7.0), "the rewrite")
    assert started.unreadable == {}


async def test_each_unreadable_revision_is_reported_and_a_delete_clears_it(
    kv: KeyValue, started: KVCache[Budget], listener: Listener
) -> None:
    await kv.put("agent.a.day", b"{")
    await kv.put("agent.a.day", b"[]")
    await eventually(lambda: len(listener.unreadable) == 2, "both revisions reported")
    assert [key for key, _ in listener.unreadable] == ["agent.a.day", "agent.a.day"]
    # Nothing readable was there before: no change to report.
    assert listener.changes == []
    await kv.delete("agent.a.day")
    await eventually(lambda: started.unreadable == {}, "the delete to clear the key")
    assert listener.changes == [("agent.a.day", None)]


async def test_an_unreadable_value_at_start_does_not_hold_start_up(kv: KeyValue) -> None:
    await kv.put("agent.a.day", encode(budget("a")))
    await kv.put("agent.z.day", b"garbage")  # the last entry of the snapshot
    cache = KVCache(kv, Budget)
    await cache.start(timeout=5)
    try:
        assert list(cache) == ["agent.a.day"]
        assert list(cache.unreadable) == ["agent.z.day"]
    finally:
        await cache.stop()


async def test_a_failing_on_unreadable_listener_does_not_stop_the_watch(
    kv: KeyValue, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(key: str, reason: str) -> None:
        raise RuntimeError("listener bug")

    cache = KVCache(kv, Budget, on_unreadable=broken)
    await cache.start(timeout=5)
    try:
        await kv.put("agent.a.day", b"garbage")
        await kv.put("agent.b.day", encode(budget("b")))
        await eventually(lambda: "agent.b.day" in cache, "the value after the unreadable one")
        assert "agent.a.day" in cache.unreadable
        assert any("on_unreadable callback failed" in r.getMessage() for r in caplog.records)
    finally:
        await cache.stop()
