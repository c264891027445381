from __future__ import annotations

import msgspec
import pytest

from broker import Agent, CallDenied
from schemas import AgentManifest


class Q(msgspec.Struct):
    x: int


class R(msgspec.Struct):
    y: int


async def test_round_trip(settings, tmp_path):
    settings.resolved_allowlist_path.parent.mkdir(parents=True, exist_ok=True)
    settings.resolved_allowlist_path.write_text(
        "version: t1\nallow:\n  - {id: a-b, caller: a, target: b, capabilities: [double]}\n"
    )
    from services.runner import Stack

    async with Stack(settings) as stack:
        b = Agent(AgentManifest(name="b", version="1.0.0", owner="o", team="t"), nats_url=settings.nats_url)

        @b.capability("double")
        async def double(q: Q) -> R:
            return R(y=q.x * 2)

        a = Agent(AgentManifest(name="a", version="1.0.0", owner="o", team="t"), nats_url=settings.nats_url)
        async with b, a:
            r = await a.call("b", "double", Q(x=21), returns=R)
            assert r.y == 42
            with pytest.raises(CallDenied):
                await b.call("b", "double", Q(x=1))
        await stack.services["policy"].audit.flush()
        print(stack.services["policy"].stats)
