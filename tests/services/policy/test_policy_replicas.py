"""Policy replicas share the call load as a queue group; no call is delivered twice."""

from __future__ import annotations

import asyncio
import collections
from typing import TYPE_CHECKING, Any

from services.policy.service import PolicyService

if TYPE_CHECKING:
    from support import AgentFactory, AuditTrail, StackFactory

N = 300


async def test_two_replicas_deliver_each_call_exactly_once(
    make_stack: StackFactory, make_agent: AgentFactory, audit_trail: AuditTrail
) -> None:
    first = await make_stack(allow=[("caller", "counter", ["count"])])
    second = await make_stack(services=["policy"])  # a second replica on the same server
    replicas = [first.services["policy"], second.services["policy"]]
    assert all(isinstance(r, PolicyService) for r in replicas)

    seen: collections.Counter[int] = collections.Counter()
    call_ids: set[str] = set()
    target = make_agent("counter")

    @target.capability()
    async def count(req: dict[str, Any], ctx: Any) -> int:
        seen[req["i"]] += 1
        call_ids.add(ctx.meta.call_id)
        return int(req["i"])

    caller = make_agent("caller")
    await target.start()
    await caller.start()
    results = await asyncio.gather(*(caller.call("counter", "count", {"i": i}) for i in range(N)))

    assert results == list(range(N))
    assert seen == collections.Counter(range(N))  # every call served exactly once
    assert len(call_ids) == N
    calls = [r.stats.calls for r in replicas if isinstance(r, PolicyService)]
    assert sum(calls) == N
    assert all(c > 0 for c in calls), calls  # both replicas took a share
    # One decision and one call outcome per call in the audit trail, whoever decided it.
    decisions = await audit_trail.wait_for(lambda r: r.kind == "decision", count=N)
    outcomes = await audit_trail.wait_for(lambda r: r.kind == "call", count=N)
    assert len({d.data["call_id"] for d in decisions}) == N
    assert {o.data["call_id"] for o in outcomes} == call_ids


async def test_calls_keep_flowing_when_one_replica_stops(
    make_stack: StackFactory, make_agent: AgentFactory
) -> None:
    first = await make_stack(allow=[("caller", "counter", ["count"])])
    second = await make_stack(services=["policy"])
    target = make_agent("counter")

    @target.capability()
    async def count(req: dict[str, Any]) -> int:
        return int(req["i"])

    caller = make_agent("caller")
    await target.start()
    await caller.start()
    assert await caller.call("counter", "count", {"i": 1}) == 1
    await second.stop()
    results = await asyncio.gather(*(caller.call("counter", "count", {"i": i}) for i in range(50)))
    assert results == list(range(50))
    policy = first.services["policy"]
    assert isinstance(policy, PolicyService)
    assert policy.stats.ok >= 50
