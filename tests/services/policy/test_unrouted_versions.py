"""Safe defaults for versions: a second version that registers without a route takes no
traffic; the established (first registered) one keeps it until an operator routes.

``SIGNALBOX_UNROUTED_VERSIONS=any`` opts into any version's instance; ``agents list``
shows every registered version.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from support import enroll, eventually, policy_of

from broker import Agent
from broker.settings import Settings
from schemas import AgentManifest, ListAgents

if TYPE_CHECKING:
    from support import AgentFactory, StackFactory


def _version_of_b(settings: Settings, version: str) -> Agent:
    assert settings.nats_url
    agent = Agent(
        AgentManifest(name="b", version=version, owner="owner-1", team="team-1"),
        nats_url=settings.nats_url,
        credential=enroll(settings, "b", owner="owner-1", team="team-1"),
        heartbeat_interval=0.5,
    )

    @agent.capability("which")
    async def which(req: dict[str, Any]) -> dict[str, str]:
        return {"version": version}

    return agent


async def _served_by(a: Agent, n: int) -> set[str]:
    return {(await a.call("b", "which", {}))["version"] for _ in range(n)}


async def test_a_new_version_without_a_route_takes_no_traffic(
    make_stack: StackFactory, make_agent: AgentFactory, settings: Settings
) -> None:
    stack = await make_stack(allow=[("a", "b", ["which"])])
    policy = policy_of(stack)
    v1, v2 = _version_of_b(settings, "1.0.0"), _version_of_b(settings, "2.0.0")
    a = make_agent("a", heartbeat_interval=0)
    try:
        for agent in (v1, a):
            await agent.start()
        assert await _served_by(a, 4) == {"1.0.0"}  # one version: any instance, as before
        await v2.start()

        def established() -> str:
            record = policy.agents.get("b") if policy.agents else None
            return record.established_version if record else ""

        await eventually(lambda: established() == "1.0.0", "the established version in KV")
        assert await _served_by(a, 16) == {"1.0.0"}
        # The registry lists both versions (what `signalbox agents list` shows).
        listed = await stack.services["registry"].list(ListAgents(all_versions=True))
        assert [r.manifest.version for r in listed.agents if r.manifest.name == "b"] == [
            "2.0.0", "1.0.0"
        ]  # fmt: skip
        # The established version retires: the next one registered takes over.
        await v1.deregister()
        await v1.stop()
        await eventually(lambda: established() == "", "a single version left")
        assert await _served_by(a, 4) == {"2.0.0"}
    finally:
        for agent in (v2, v1):
            await agent.stop()


async def test_any_version_when_the_deployment_opts_in(
    make_stack: StackFactory, make_agent: AgentFactory, settings: Settings
) -> None:
    stack = await make_stack(allow=[("a", "b", ["which"])], unrouted_versions="any")
    policy = policy_of(stack)
    v1, v2 = _version_of_b(settings, "1.0.0"), _version_of_b(settings, "2.0.0")
    a = make_agent("a", heartbeat_interval=0)
    try:
        for agent in (v1, v2, a):
            await agent.start()

        def established() -> str:
            record = policy.agents.get("b") if policy.agents else None
            return record.established_version if record else ""

        await eventually(lambda: established() == "1.0.0", "the established version in KV")
        # Both versions share the queue group: 40 calls all on one has odds 2^-39.
        assert await _served_by(a, 40) == {"1.0.0", "2.0.0"}
    finally:
        for agent in (v2, v1):
            await agent.stop()
