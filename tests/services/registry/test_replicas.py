"""Several registry replicas on one store: their indexes and the KV mirror stay right.

Two replicas share the SQLite store (as replicas share PostgreSQL in a
deployment). Writes go to one replica's methods directly, so the test knows
which replica made them; reads go to the other.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import nats.js.errors
import pytest
from support import eventually

from broker.codec import decode, encode
from broker.errors import NotFound
from broker.replies import H_ERROR
from broker.subjects import inbox_prefix
from schemas import (
    AgentManifest,
    AgentRecord,
    Capability,
    DeregisterAgent,
    DiscoverAgents,
    GetAgent,
    Heartbeat,
    InstanceStats,
    RegistryChange,
)
from services.registry.records import StoredVersion
from services.registry.service import RegistryService

if TYPE_CHECKING:
    from support import ServiceConnector, StackFactory


def manifest(name: str = "credit-check", version: str = "1.0.0", **kw: Any) -> AgentManifest:
    return AgentManifest(
        name=name,
        version=version,
        owner="risk",
        team="risk",
        capabilities=(Capability(name="score", tags=("pii",)),),
        **kw,
    )


Replicas = tuple[RegistryService, RegistryService]


@pytest.fixture
async def replicas(make_stack: StackFactory) -> Replicas:
    """Two registry replicas on one store (no automatic heartbeat flush)."""
    services: list[RegistryService] = []
    for names in (["tracing", "registry"], ["registry"]):
        stack = await make_stack(services=names, heartbeat_flush_interval=3600)
        service = stack.services["registry"]
        assert isinstance(service, RegistryService)
        services.append(service)
    a, b = services
    assert a.replication.replica_id != b.replication.replica_id
    return a, b


def names(result: Any) -> list[tuple[str, str]]:
    return [(r.manifest.name, r.manifest.version) for r in result.agents]


async def test_a_registration_through_one_replica_is_discoverable_through_the_other(
    replicas: Replicas,
) -> None:
    a, b = replicas
    await a.register(manifest(version="1.0.0"))
    await a.register(manifest(version="2.0.0"))
    await eventually(lambda: b.index.contains("credit-check", "2.0.0"), "b to see 2.0.0")
    found = await b.discover(DiscoverAgents(capability="score", tag="pii", all_versions=True))
    assert names(found) == [("credit-check", "2.0.0"), ("credit-check", "1.0.0")]
    assert (await b.get(GetAgent(name="credit-check"))).manifest.version == "2.0.0"
    # And back: a deregistration through b disappears from a.
    await b.deregister(DeregisterAgent(name="credit-check", version="2.0.0"))
    await eventually(lambda: not a.index.contains("credit-check", "2.0.0"), "a to drop 2.0.0")
    assert names(await a.discover(DiscoverAgents(capability="score"))) == [
        ("credit-check", "1.0.0")
    ]


async def test_heartbeats_through_one_replica_reach_the_other_with_the_flush(
    replicas: Replicas,
) -> None:
    a, b = replicas
    await a.register(manifest())
    await eventually(lambda: b.index.contains("credit-check"), "b to see the agent")
    stats = InstanceStats(started=1.0, requests=5)
    beat = Heartbeat(name="credit-check", version="1.0.0", instance="i-1", stats=stats)
    answered = await a.heartbeat(beat)
    assert (answered.health, answered.instances) == ("healthy", 1)
    # Answered from memory: neither the store nor b has it before the flush.
    assert a.store.instances(since=0) == []
    assert (await b.get(GetAgent(name="credit-check"))).instances == 0
    assert await a.flush_heartbeats() == 1
    [stored] = a.store.instances(since=0)
    assert (stored.instance, stored.stats) == ("i-1", stats)

    def b_counts_it() -> bool:
        _, instances = b.index.view(since=0)
        return [i.instance for i in instances] == ["i-1"]

    await eventually(b_counts_it, "b to get the flushed heartbeat")
    seen = await b.get(GetAgent(name="credit-check"))
    assert (seen.instances, seen.last_heartbeat) == (1, answered.last_heartbeat)


async def test_a_replica_that_has_not_heard_of_an_agent_asks_the_store(
    replicas: Replicas,
) -> None:
    a, _ = replicas
    # Written by "another replica" whose change event has not arrived (or was lost).
    a.store.register(manifest("late"), now=time.time())
    a.store.register(manifest("later"), now=time.time())
    assert names(await a.discover(DiscoverAgents(capability="score"))) == []
    assert (await a.get(GetAgent(name="late"))).manifest.name == "late"
    record = await a.heartbeat(Heartbeat(name="later", version="1.0.0", instance="i-1"))
    assert record.instances == 1
    # Both are in the index from then on.
    assert names(await a.discover(DiscoverAgents(capability="score"))) == [
        ("late", "1.0.0"),
        ("later", "1.0.0"),
    ]
    with pytest.raises(NotFound):
        await a.heartbeat(Heartbeat(name="ghost", version="1.0.0", instance="i-1"))


async def test_a_gap_in_a_replicas_events_makes_the_others_read_everything_again(
    replicas: Replicas, service_nc: ServiceConnector
) -> None:
    a, b = replicas
    # Changes whose events never reached a: one added, one removed behind its back.
    await a.register(manifest("removed"))
    a.store.register(manifest("missed"), now=time.time())
    a.store.deregister("removed")
    nc = await service_nc()
    subject = a.subjects.registry_changes
    # A peer's events 1 and 3 arrive; 2 was lost.
    await nc.publish(subject, encode(RegistryChange(origin="peer", seq=1)))
    await nc.publish(subject, encode(RegistryChange(origin="peer", seq=3)))
    await eventually(lambda: a.index.contains("missed"), "a to re-read the store")
    assert a.index.names() == ["missed"]
    await eventually(lambda: b.index.names() == ["missed"], "b to re-read the store")


async def test_an_unreadable_change_event_is_refused_and_counted(
    replicas: Replicas, service_nc: ServiceConnector
) -> None:
    a, b = replicas
    nc = await service_nc()
    await nc.publish(a.subjects.registry_changes, b'{"type": "registry_change.v1", "seq": "x"}')
    await eventually(
        lambda: a.rejected["schema_error"] == 1 and b.rejected["schema_error"] == 1,
        "both replicas to refuse the event",
    )


# -- the KV mirror ---------------------------------------------------------------------------


async def mirrored(service: RegistryService, name: str) -> str | None:
    """Version in ``sb_agents[name]`` (None when absent)."""
    try:
        entry = await service.kv.get(name)
    except nats.js.errors.KeyNotFoundError:
        return None
    assert entry.value is not None
    return decode(entry.value, AgentRecord).manifest.version


async def test_racing_registrations_through_two_replicas_leave_the_mirror_on_the_latest(
    replicas: Replicas, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = replicas
    # a reads the store (1.0.0 only), then stalls before its KV write; meanwhile
    # b registers 2.0.0 and mirrors it. a's write must not put 1.0.0 back.
    stalled, go = asyncio.Event(), asyncio.Event()
    mirror = a.replication._mirror

    async def slow_mirror(name: str, versions: Sequence[StoredVersion], revision: int) -> None:
        if not go.is_set():
            stalled.set()
            await go.wait()
        await mirror(name, versions, revision)

    monkeypatch.setattr(a.replication, "_mirror", slow_mirror)
    registering = asyncio.ensure_future(a.register(manifest(version="1.0.0")))
    await stalled.wait()
    await b.register(manifest(version="2.0.0"))
    assert await mirrored(b, "credit-check") == "2.0.0"
    go.set()
    await registering
    assert await mirrored(a, "credit-check") == "2.0.0"
    # The same for removals: a stalls with "1.0.0 is the highest left" while b
    # removes 1.0.0 too.
    go.clear()
    stalled.clear()
    removing = asyncio.ensure_future(
        a.deregister(DeregisterAgent(name="credit-check", version="2.0.0"))
    )
    await stalled.wait()
    await b.deregister(DeregisterAgent(name="credit-check", version="1.0.0"))
    go.set()
    await removing
    assert await mirrored(a, "credit-check") is None


async def test_many_racing_registrations_of_one_name_end_on_the_stores_latest(
    replicas: Replicas, service_nc: ServiceConnector
) -> None:
    a, _ = replicas
    nc = await service_nc(inbox_prefix=inbox_prefix("credit-check"))  # asks as credit-check

    async def send(op: str, body: Any) -> None:
        reply = await nc.request(f"sb.registry.{op}.credit-check", encode(body), timeout=10)
        assert H_ERROR not in (reply.headers or {}), reply.data

    for round_ in range(3):
        # Both replicas take some (queue group), racing on one name.
        versions = [f"{round_}.{i}.0" for i in range(12)]
        await asyncio.gather(*(send("register", manifest(version=v)) for v in versions))
        latest = a.store.latest("credit-check")
        assert latest is not None
        assert await mirrored(a, "credit-check") == latest.manifest.version
        await asyncio.gather(
            *(send("deregister", DeregisterAgent(name="credit-check", version=v)) for v in versions)
        )
        assert await mirrored(a, "credit-check") is None
