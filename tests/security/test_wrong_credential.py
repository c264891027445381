"""An agent started with another agent's credential is told so at once, by name.

The server binds a connection to the agent its credential names: agent
``a`` holding ``b``'s credential may not subscribe to ``a``'s inbox, and the
server says so only with a ``Permissions Violation`` error that keeps the
connection open. Before, the SDK logged that at debug level and waited out
a 5 s request timeout (``CallTimeout ... check the services' logs``); now
the connection's first echo through its own inbox (``sync_connection``)
fails with :class:`IdentityMismatch` as soon as the server's error arrives.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from broker.connection import connect, permission_violation, sync_connection
from broker.errors import IdentityMismatch
from broker.settings import Settings
from broker.subjects import inbox_prefix

if TYPE_CHECKING:
    from support import AgentFactory, StackFactory

from support import enroll


def test_the_servers_permission_errors_are_recognised() -> None:
    text = 'nats: permissions violation for subscription to "_inbox.agent.a.x"'
    assert permission_violation(Exception(text)) == 'subscription to "_inbox.agent.a.x"'
    assert permission_violation(Exception("nats: authorization violation")) == ""


async def test_a_connection_with_someone_elses_credential_fails_its_inbox_check(
    make_stack: StackFactory, settings: Settings
) -> None:
    await make_stack()
    assert settings.nats_url is not None
    token_b = enroll(settings, "b")
    nc = await connect(
        settings.nats_url, name="agent-a", inbox_prefix=inbox_prefix("a"), token=token_b
    )
    try:
        with pytest.raises(IdentityMismatch) as refused:
            await sync_connection(nc, timeout=30.0)
        assert "_inbox.agent.a." in refused.value.details["refused"]
        assert "signalbox agents enroll" in refused.value.message
    finally:
        await nc.close()
    # Its own credential passes the same check.
    nc = await connect(
        settings.nats_url, name="agent-b", inbox_prefix=inbox_prefix("b"), token=token_b
    )
    try:
        await sync_connection(nc, timeout=30.0)
    finally:
        await nc.close()


async def test_an_agent_started_with_another_agents_credential_fails_at_start(
    make_stack: StackFactory, make_agent: AgentFactory, settings: Settings
) -> None:
    await make_stack()
    impostor = make_agent("a", credential=enroll(settings, "b"), heartbeat_interval=0)
    with pytest.raises(IdentityMismatch) as refused:
        await impostor.start()
    assert "agents enroll" in refused.value.message
