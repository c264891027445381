"""A reply the server refuses says why, and the caller is told "may have run".

The server grants an agent one reply per request it received, on the
connection it received it on. A handler that finishes after the server
restarted answers on a new connection: the server refuses the reply. The
target's log must say that in words (not "credentials do not allow it",
which reads as a misconfiguration), and the caller must get
``OutcomeUnknown``: its call was delivered and may have run. A retry with
the same idempotency key gets the first run's result, without a second run.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

import pytest
from support import eventually

from broker.connection import _sampled
from broker.errors import OutcomeUnknown
from broker.runtime.server import EmbeddedServer

if TYPE_CHECKING:
    from support import AgentFactory, StackFactory

pytestmark = pytest.mark.nats


def test_a_burst_of_refused_replies_is_logged_at_1_10_100() -> None:
    assert [n for n in range(1, 1001) if _sampled(n)] == [1, 10, 100, 1000]


@pytest.mark.parametrize("answered", ["after reconnecting", "while disconnected"])
async def test_a_reply_after_a_server_restart_is_refused_and_explained(
    make_stack: StackFactory,
    make_agent: AgentFactory,
    fresh_server: EmbeddedServer,
    caplog: pytest.LogCaptureFixture,
    answered: str,
) -> None:
    """``while disconnected``: nats-py buffers the reply and flushes it on reconnect
    before it calls ``reconnected_cb``, so the server's refusal can arrive first."""
    await make_stack(allow=[("a", "b", ["slow"])])
    received, release = asyncio.Event(), asyncio.Event()
    runs: list[str] = []
    b = make_agent("b", heartbeat_interval=0)

    @b.capability("slow")
    async def slow(req: dict[str, Any]) -> dict[str, Any]:
        runs.append("run")
        received.set()
        await release.wait()
        return {"ran": len(runs)}

    a = make_agent("a", heartbeat_interval=0)
    await b.start()
    await a.start()
    caplog.set_level(logging.WARNING, logger="broker.connection")
    calling = asyncio.ensure_future(
        a.call("b", "slow", {}, timeout=15.0, idempotency_key="order-1")
    )
    await asyncio.wait_for(received.wait(), 10)

    await asyncio.to_thread(fresh_server.stop)
    if answered == "while disconnected":
        await eventually(lambda: not b.nc.is_connected, "b to notice the server is gone")
        release.set()  # the reply waits in nats-py's buffer
        await asyncio.sleep(0.2)
    await asyncio.to_thread(fresh_server.restart)
    await eventually(
        lambda: b.nc.is_connected and a.nc.is_connected, "the agents to reconnect", timeout=30
    )
    release.set()  # the handler answers now, on the new connection

    await eventually(lambda: "refused a reply" in caplog.text, "the refused reply to be logged")
    said = next(r.getMessage() for r in caplog.records if "refused a reply" in r.getMessage())
    assert "before the connection was re-established" in said
    assert "outcome_unknown" in said and "same idempotency key" in said
    assert "credentials do not allow it" not in said
    with pytest.raises(OutcomeUnknown):
        await calling
    # As the log says: the retry with the same key gets the first run's result.
    again = await a.call("b", "slow", {}, timeout=10.0, idempotency_key="order-1")
    assert again == {"ran": 1} and runs == ["run"]


async def test_a_reply_to_a_request_never_received_is_refused_and_explained(
    make_stack: StackFactory,
    make_agent: AgentFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    await make_stack()
    a = make_agent("a", heartbeat_interval=0)
    await a.start()
    caplog.set_level(logging.WARNING, logger="broker.connection")
    await a.nc.publish("_INBOX.service.forged.1", b"{}")  # nobody asked a anything
    await a.nc.flush()
    await eventually(lambda: "refused a reply" in caplog.text, "the refused reply to be logged")
    said = next(r.getMessage() for r in caplog.records if "refused a reply" in r.getMessage())
    assert "may answer each request it received once" in said
    assert "re-established" not in said
