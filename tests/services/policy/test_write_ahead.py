"""Write-ahead decisions: a call is forwarded only once its decision record is stored.

The audit intake stream is taken away under a running policy service (what a
JetStream outage looks like to it): an allowed call is then refused unrun
with ``AuditUnavailable`` (the target never sees it), its refusal recorded as
the call's outcome once the stream is back; with write-ahead off, the same
call runs with its decision only in memory (the gap issue 14 F1 found).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytest
from support import policy_of

from broker.errors import AuditUnavailable
from broker.runtime.jetstream import AUDIT_INTAKE_STREAM, ensure_streams
from broker.settings import Settings

if TYPE_CHECKING:
    from nats.aio.client import Client
    from support import AgentFactory, ServiceConnector, StackFactory

    from broker import Agent


async def _pair(make_agent: AgentFactory) -> tuple[Agent, list[Any]]:
    served: list[Any] = []
    b = make_agent("b")

    @b.capability("echo")
    async def echo(req: dict[str, Any]) -> dict[str, Any]:
        served.append(req)
        return req

    a = make_agent("a")
    await b.start()
    await a.start()
    return a, served


async def _intake_gone(nc: Client) -> None:
    await nc.jetstream().delete_stream(AUDIT_INTAKE_STREAM)


@pytest.mark.parametrize("write_ahead", [True, False])
async def test_no_call_runs_before_its_decision_is_stored(
    make_stack: StackFactory, make_agent: AgentFactory, service_nc: ServiceConnector,
    settings: Settings, write_ahead: bool,
) -> None:  # fmt: skip
    stack = await make_stack(
        allow=[("a", "b", ["echo"])], services=["registry", "policy"],
        write_ahead=write_ahead, write_ahead_timeout=0.5,
    )  # fmt: skip
    a, served = await _pair(make_agent)
    assert await a.call("b", "echo", {"n": 1}) == {"n": 1}
    nc = await service_nc()
    await _intake_gone(nc)
    if write_ahead:
        with pytest.raises(AuditUnavailable) as refused:
            await a.call("b", "echo", {"n": 2}, timeout=5)
        assert "not forwarded" in refused.value.message
        assert served == [{"n": 1}]  # the target never saw it
        assert policy_of(stack).stats.audit_unavailable == 1
    else:
        # Without write-ahead the call runs; its decision waits in memory, and is
        # lost with the process if it dies now.
        assert await a.call("b", "echo", {"n": 2}, timeout=5) == {"n": 2}
        assert served == [{"n": 1}, {"n": 2}]
    await ensure_streams(nc.jetstream(), settings)
    # Back: calls go through again (the queued records are stored by the retry loop).
    assert await a.call("b", "echo", {"n": 3}, timeout=5) == {"n": 3}
