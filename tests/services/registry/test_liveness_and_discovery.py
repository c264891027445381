"""Heartbeats, health, discovery and NATS micro visibility, end to end through the SDK."""

from __future__ import annotations

import asyncio
import json
from typing import TYPE_CHECKING

import msgspec
import nats
import pytest
from nats.aio.msg import Msg

from broker.connection import sync_connection
from broker.errors import InvalidInput, NotFound
from broker.runtime.identity import service_connect_options
from broker.settings import Settings
from schemas import AgentRecord, DiscoverAgents, GetAgent

if TYPE_CHECKING:
    from support import AgentFactory, StackFactory


class Score(msgspec.Struct):
    applicant: str


async def test_heartbeats_keep_an_agent_healthy_with_its_instance_counted(
    make_stack: StackFactory, make_agent: AgentFactory
) -> None:
    # Health transitions over time (stale, down) are tested deterministically
    # on the store with a synthetic clock (tests/services/registry/test_store.py).
    await make_stack(heartbeat_interval=0.2, heartbeat_stale_missed=5, heartbeat_down_missed=10)
    agent = make_agent("credit-check", heartbeat_interval=0)

    @agent.capability("score", tags=("pii",))
    async def score(req: Score) -> int:
        return 700

    await agent.start()
    record = await agent.heartbeat()
    assert record.health == "healthy"
    assert record.instances == 1
    assert record.last_heartbeat >= record.registered_at
    [found] = (await agent.discover(name="credit-check", health="healthy")).agents
    assert found.manifest.name == "credit-check"
    assert (await agent.discover(name="credit-check", health="down")).agents == ()


async def test_heartbeat_after_deregistration_is_not_found(
    make_stack: StackFactory, make_agent: AgentFactory
) -> None:
    await make_stack()
    agent = make_agent("credit-check", heartbeat_interval=0)
    await agent.start()
    assert (await agent.heartbeat()).instances == 1
    # Deregistering itself keeps the agent's connection (an operator's
    # deregistration of the last version would also cut it off).
    await agent.deregister()
    with pytest.raises(NotFound):
        await agent.heartbeat()


async def test_discovery_filters_versions_and_rejects_bad_ranges(
    make_stack: StackFactory, make_agent: AgentFactory, settings: Settings
) -> None:
    stack = await make_stack()
    from schemas import AgentManifest, Capability
    from services.registry.service import RegistryService

    registry = stack.services["registry"]
    assert isinstance(registry, RegistryService)
    for version, region in (("1.2.0", "eu-west"), ("1.9.3", "eu-west"), ("2.0.0", "us-east")):
        check = Capability(name="check", tags=("pci-dss",))
        await registry.register(
            AgentManifest(name="fraud", version=version, owner="risk", team="risk",
                          region=region, capabilities=(check,))
        )  # fmt: skip
    asker = make_agent("asker", heartbeat_interval=0)
    await asker.start()
    latest = await asker.discover(capability="check")
    assert [r.manifest.version for r in latest.agents] == ["2.0.0"]
    v1 = await asker.discover(capability="check", versions="^1")
    assert [r.manifest.version for r in v1.agents] == ["1.9.3"]
    every = await asker.discover(tag="pci-dss", all_versions=True)
    assert [r.manifest.version for r in every.agents] == ["2.0.0", "1.9.3", "1.2.0"]
    eu = await asker.discover(DiscoverAgents(region="eu-west", all_versions=True, limit=1))
    assert eu.total == 2 and len(eu.agents) == 1 and eu.next_cursor
    rest = await asker.discover(
        DiscoverAgents(region="eu-west", all_versions=True, limit=1, cursor=eu.next_cursor)
    )
    assert {eu.agents[0].manifest.version, rest.agents[0].manifest.version} == {"1.9.3", "1.2.0"}
    assert not rest.next_cursor
    with pytest.raises(InvalidInput) as bad:
        await asker.discover(versions="not a range")
    assert bad.value.details.get("field") == "versions"
    exact = await asker._rpc(  # the SDK's own request helper
        asker.subjects.registry_for("get", asker.name),
        GetAgent(name="fraud", version="1.2.0"),
        AgentRecord,
        5,
    )
    assert exact.manifest.region == "eu-west"


async def test_running_agents_answer_a_raw_srv_ping(
    make_stack: StackFactory, make_agent: AgentFactory, settings: Settings
) -> None:
    await make_stack()
    agent = make_agent("credit-check", heartbeat_interval=0.1)

    @agent.capability("score")
    async def score(req: Score) -> int:
        return 1

    await agent.start()
    await agent.heartbeat()
    nc = await nats.connect(settings.nats_url or "", **service_connect_options(settings))
    try:
        inbox = nc.new_inbox()
        replies: list[dict[str, object]] = []

        first = asyncio.Event()

        async def collect(msg: Msg) -> None:
            replies.append(json.loads(msg.data))
            first.set()

        sub = await nc.subscribe(inbox, cb=collect)
        await sync_connection(nc)
        await nc.publish("$SRV.PING", b"", reply=inbox)
        await asyncio.wait_for(first.wait(), 5)
        await asyncio.sleep(0.2)  # let any further (duplicate) replies arrive
        await sub.unsubscribe()
    finally:
        await nc.close()
    mine = [r for r in replies if r["name"] == "credit-check"]
    assert len(mine) == 1
    assert mine[0]["type"] == "io.nats.micro.v1.ping_response"
    assert mine[0]["id"] == agent.instance_id
    assert mine[0]["version"] == "1.0.0"
