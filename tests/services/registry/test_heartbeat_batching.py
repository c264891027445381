"""Heartbeats are answered from memory and written to SQL in batches.

Most tests run the registry with a flush interval of an hour and flush by
hand (``flush_heartbeats``), so what is in SQL at each step is known.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest
from support import eventually

from broker.errors import NotFound
from broker.settings import Settings
from schemas import AgentManifest, DeregisterAgent, GetAgent, Heartbeat, InstanceStats
from services.registry.service import RegistryService
from services.registry.store import AgentStore

if TYPE_CHECKING:
    from support import AgentFactory, StackFactory


def manifest(name: str = "credit-check", version: str = "1.0.0") -> AgentManifest:
    return AgentManifest(name=name, version=version, owner="risk", team="risk")


def beat(instance: str = "i-1", version: str = "1.0.0", requests: int = 0) -> Heartbeat:
    return Heartbeat(
        name="credit-check",
        version=version,
        instance=instance,
        stats=InstanceStats(started=1.0, requests=requests),
    )


async def start_registry(make_stack: StackFactory, **overrides: object) -> RegistryService:
    stack = await make_stack(services=["tracing", "registry"], **overrides)
    service = stack.services["registry"]
    assert isinstance(service, RegistryService)
    return service


async def test_a_heartbeat_is_answered_at_once_and_written_at_the_next_flush(
    make_stack: StackFactory,
) -> None:
    registry = await start_registry(make_stack, heartbeat_flush_interval=3600)
    registered = (await registry.register(manifest())).registered_at
    answered = await registry.heartbeat(beat(requests=3))
    assert (answered.health, answered.instances) == ("healthy", 1)
    assert answered.last_heartbeat >= registered
    # Discovery and get see it (from memory); SQL does not yet.
    assert (await registry.get(GetAgent(name="credit-check"))).instances == 1
    stored = registry.store.get(
        "credit-check", now=answered.last_heartbeat, stale_after=30, down_after=90
    )
    assert (stored.last_heartbeat, stored.instances) == (registered, 0)
    assert await registry.flush_heartbeats() == 1
    stored = registry.store.get(
        "credit-check", now=answered.last_heartbeat, stale_after=30, down_after=90
    )
    assert (stored.last_heartbeat, stored.instances) == (answered.last_heartbeat, 1)
    [instance] = registry.store.instances(since=0)
    assert (instance.instance, instance.stats.requests) == ("i-1", 3)
    assert await registry.flush_heartbeats() == 0  # nothing pending


async def test_each_flush_writes_the_latest_beat_of_each_instance(
    make_stack: StackFactory,
) -> None:
    registry = await start_registry(make_stack, heartbeat_flush_interval=3600)
    await registry.register(manifest())
    for requests in range(5):
        await registry.heartbeat(beat("i-1", requests=requests))
    await registry.heartbeat(beat("i-2", requests=100))
    assert registry.pending_heartbeats == 2
    assert await registry.flush_heartbeats() == 2
    stored = {i.instance: i.stats.requests for i in registry.store.instances(since=0)}
    assert stored == {"i-1": 4, "i-2": 100}


async def test_a_flushed_heartbeat_does_not_bring_back_a_deregistered_version(
    make_stack: StackFactory,
) -> None:
    registry = await start_registry(make_stack, heartbeat_flush_interval=3600)
    await registry.register(manifest(version="1.0.0"))
    await registry.register(manifest(version="2.0.0"))
    await registry.heartbeat(beat(version="1.0.0"))
    await registry.deregister(DeregisterAgent(name="credit-check", version="1.0.0"))
    await registry.flush_heartbeats()
    assert registry.store.instances(since=0) == []
    assert registry.store.snapshot(["credit-check"])[0].manifest.version == "2.0.0"
    with pytest.raises(NotFound):
        await registry.heartbeat(beat(version="1.0.0"))


async def test_pending_heartbeats_are_written_when_the_registry_stops(
    make_stack: StackFactory, settings: Settings
) -> None:
    stack = await make_stack(services=["tracing", "registry"], heartbeat_flush_interval=3600)
    registry = stack.services["registry"]
    assert isinstance(registry, RegistryService)
    await registry.register(manifest())
    await registry.heartbeat(beat(requests=7))
    await stack.stop()
    store = AgentStore(settings.resolved_database_url)
    try:
        [instance] = store.instances(since=0)
        assert instance.stats.requests == 7
    finally:
        store.close()


async def test_the_registry_flushes_on_its_own_every_interval(
    make_stack: StackFactory, make_agent: AgentFactory
) -> None:
    registry = await start_registry(make_stack, heartbeat_flush_interval=0.05)
    agent = make_agent("credit-check", heartbeat_interval=0)
    await agent.start()
    await agent.heartbeat()
    await eventually(
        lambda: registry.store.instances(since=0), "the heartbeat to be written", timeout=10
    )
    [instance] = registry.store.instances(since=0)
    assert instance.instance == agent.instance_id
