"""An instance leaves the registry only as itself: no agent can make another's leave.

``DeregisterAgent(instance=...)`` (``Agent.stop(leave=True)``, SIGTERM) rides the
agent's own ``sb.registry.deregister.<agent>`` subject; a request naming another
agent is refused ``identity_mismatch`` before anything changes, and a leave of an
instance id that is not there changes nothing either.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest
from support import eventually, registry_of

from broker.errors import IdentityMismatch
from broker.replies import request
from schemas import AgentRecord, DeregisterAgent, GetAgent

if TYPE_CHECKING:
    from support import AgentFactory, StackFactory


async def test_an_agent_cannot_make_another_agents_instance_leave(
    make_stack: StackFactory, make_agent: AgentFactory
) -> None:
    stack = await make_stack(services=["tracing", "registry"])
    registry = registry_of(stack)
    victim = make_agent("credit-check", heartbeat_interval=0.2)
    mallory = make_agent("mallory", heartbeat_interval=0)
    await victim.start()
    await mallory.start()

    async def live() -> int:
        return (await registry.get(GetAgent(name="credit-check"))).instances

    await eventually(live, "the victim's first heartbeat")
    forged = DeregisterAgent(name="credit-check", version="1.0.0", instance=victim.instance_id)
    own_subject = mallory.subjects.registry_for("deregister", "mallory")
    with pytest.raises(IdentityMismatch):
        await request(mallory.nc, own_subject, forged, AgentRecord)
    assert registry.rejected["identity_mismatch"] == 1
    # An instance of its own that does not exist: nothing of anyone changes.
    ghost = DeregisterAgent(name="mallory", version="1.0.0", instance="no-such-instance")
    await request(mallory.nc, own_subject, ghost, AgentRecord)
    assert await live() == 1  # the victim is still counted
    # The victim itself can leave.
    left = await victim.leave()
    assert left.instances == 0 and left.status == "active"
