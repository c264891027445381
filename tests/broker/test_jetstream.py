"""Streams and buckets are created idempotently and follow configuration changes."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from nats.aio.client import Client
from nats.js.api import RetentionPolicy, StorageType

from broker.connection import connect
from broker.errors import ConfigError
from broker.runtime.identity import service_connect_options
from broker.runtime.jetstream import (
    AUDIT_INTAKE_STREAM,
    AUDIT_STREAM,
    KV_AGENTS,
    KV_POLICIES,
    USAGE_STREAM,
    bucket_configs,
    bucket_keys,
    ensure_buckets,
    ensure_streams,
    stream_configs,
)
from broker.runtime.server import EmbeddedServer
from broker.settings import Settings


@pytest.fixture
async def nc(settings: Settings) -> AsyncIterator[Client]:
    conn = await connect(
        settings.nats_url, name="test-jetstream", **service_connect_options(settings)
    )
    yield conn
    await conn.close()


async def test_ensure_streams_twice_creates_each_stream_once(
    nc: Client, settings: Settings
) -> None:
    js = nc.jetstream()
    await ensure_streams(js, settings)
    first = {s.config.name: s.config for s in await js.streams_info()}
    await ensure_streams(js, settings)
    second = {s.config.name: s.config for s in await js.streams_info()}
    assert set(first) == {AUDIT_STREAM, AUDIT_INTAKE_STREAM, USAGE_STREAM}
    assert first == second
    audit = second[AUDIT_STREAM]
    assert audit.storage == StorageType.FILE
    assert audit.deny_delete is True
    assert audit.subjects == ["sb.audit.log.>"]
    assert second[AUDIT_INTAKE_STREAM].retention == RetentionPolicy.WORK_QUEUE


async def test_ensure_streams_updates_a_changed_definition(nc: Client, settings: Settings) -> None:
    js = nc.jetstream()
    await ensure_streams(js, settings)
    await js.publish("sb.audit.log.call.a", b"kept")
    changed = settings.model_copy(update={"audit_max_age_days": 2.0})
    await ensure_streams(js, changed)
    info = await js.stream_info(AUDIT_STREAM)
    assert info.config.max_age == 2 * 86_400
    assert info.state.messages == 1  # updated in place, not recreated


async def test_streams_follow_the_subject_prefix(nc: Client, settings: Settings) -> None:
    acme = settings.model_copy(update={"subject_prefix": "acme"})
    assert [c.subjects for c in stream_configs(acme)] == [
        ["acme.audit.in.>"],
        ["acme.audit.log.>"],
        ["acme.usage.*"],
    ]


async def test_ensure_buckets_twice_returns_the_same_bucket(nc: Client, settings: Settings) -> None:
    js = nc.jetstream()
    first = await ensure_buckets(js, settings)
    await first[KV_AGENTS].put("a", b"1")
    second = await ensure_buckets(js, settings)
    assert set(second) == {c.bucket for c in bucket_configs(settings)}
    entry = await second[KV_AGENTS].get("a")
    assert entry.value == b"1"  # not recreated: the value survived
    status = await second[KV_AGENTS].status()
    assert status.history == 5


async def test_bucket_keys_lists_what_the_server_holds(nc: Client, settings: Settings) -> None:
    js = nc.jetstream()
    kv = (await ensure_buckets(js, settings))[KV_POLICIES]
    assert await bucket_keys(js, KV_POLICIES) == []
    for key in ("set.2", "set.10", "active", "set.1"):
        await kv.put(key, b"x")
    assert await bucket_keys(js, KV_POLICIES, "set.") == ["set.1", "set.10", "set.2"]
    assert await bucket_keys(js, KV_POLICIES) == ["active", "set.1", "set.10", "set.2"]
    # The listing is the server's answer, every time (kv.keys() came back empty at times).
    for _ in range(20):
        assert len(await bucket_keys(js, KV_POLICIES, "set.")) == 3


async def test_connect_without_a_url_is_a_config_error() -> None:
    with pytest.raises(ConfigError) as info:
        await connect(None, name="x")
    assert "SIGNALBOX_NATS_URL" in info.value.message


async def test_connect_sets_a_private_inbox_prefix(nats_url: str) -> None:
    conn = await connect(nats_url, name="x", inbox_prefix="_INBOX.alice")
    try:
        assert conn.new_inbox().startswith("_INBOX.alice.")
    finally:
        await conn.close()


async def test_connect_gives_up_when_nothing_answers() -> None:
    # nats-py alone would retry the first connection forever (reconnects are unbounded).
    with pytest.raises(OSError):
        await connect("nats://127.0.0.1:1", name="x", connect_timeout=0.5)


async def test_connect_waits_for_a_server_that_is_starting(tmp_path: Path) -> None:
    server = EmbeddedServer(tmp_path / "nats", port=0, sync_always=False)
    url = server.start()
    server.stop()  # its port is now free; restart it on the same port shortly
    port = int(url.rsplit(":", 1)[1])
    later = EmbeddedServer(tmp_path / "nats2", port=port, sync_always=False)
    loop = asyncio.get_running_loop()
    starting = loop.run_in_executor(None, later.start)
    try:
        conn = await connect(url, name="x", connect_timeout=20)
        assert conn.is_connected
        await conn.close()
    finally:
        await starting
        later.stop()
