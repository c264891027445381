"""Canary rollouts end to end: routes split traffic, stick, roll back on their own and by hand."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec
import pytest
from nats.aio.client import Client
from typer.testing import CliRunner, Result

from broker import Agent
from broker.codec import encode
from broker.connection import connect
from broker.errors import InvalidInput, NotFound, TargetUnavailable
from broker.replies import request
from broker.runtime.identity import operator_connect_options
from broker.settings import Settings
from schemas import (
    AgentManifest,
    DeprecateVersion,
    PromoteRollout,
    RollbackRollout,
    RolloutStatus,
    RolloutStatusRequest,
    Route,
    RouteGuard,
    SetRollout,
)
from services.cli.main import app
from services.runner import Stack

if TYPE_CHECKING:
    from support import AuditTrail, StackFactory

from support import RawAgent, cost_of, enroll, eventually, policy_of

V1, V2 = "1.0.0", "2.0.0"


class Ask(msgspec.Struct):
    customer: str = ""
    fail: bool = False
    #: Output tokens of gpt-4o the version reports using to answer (0: none).
    tokens: int = 0


@pytest.fixture
async def stack(make_stack: StackFactory) -> Stack:
    return await make_stack(
        allow=[("shop", "recommender", ["suggest"])],
        services=["tracing", "registry", "policy", "cost"],
        rollout_guard_interval=0.1,
        rollout_stats_slot=0.5,
        # Health decays fast: a version that stops heartbeating is stale after 1.5 s.
        heartbeat_interval=0.5,
    )


@pytest.fixture
async def operator(stack: Stack, settings: Settings) -> AsyncIterator[Client]:
    options = operator_connect_options(settings)
    nc = await connect(settings.nats_url, name="test-operator", **options)
    yield nc
    await nc.close()


@pytest.fixture
async def fleet(stack: Stack, settings: Settings) -> AsyncIterator[dict[str, Agent]]:
    """shop, and recommender 1.0.0 and 2.0.0 (2.0.0 fails calls asking it to)."""
    made: list[Agent] = []

    def version(v: str, *, heartbeat: float = 0.2) -> Agent:
        agent = Agent(
            AgentManifest(name="recommender", version=v, owner="o", team="growth"),
            nats_url=settings.nats_url,
            credential=enroll(settings, "recommender", owner="o", team="growth"),
            heartbeat_interval=heartbeat,
        )  # fmt: skip

        @agent.capability("suggest")
        async def suggest(ask: Ask) -> str:
            if ask.fail and v == V2:
                raise RuntimeError("v2 regression")
            if ask.tokens:
                await agent.report_usage(model="gpt-4o", output_tokens=ask.tokens)
            return v

        made.append(agent)
        return agent

    shop = Agent(
        AgentManifest(name="shop", version="1.0.0", owner="o", team="web"),
        nats_url=settings.nats_url, credential=enroll(settings, "shop", owner="o", team="web"),
        heartbeat_interval=0.2,
    )  # fmt: skip
    made.append(shop)
    agents = {"shop": shop, V1: version(V1), V2: version(V2)}
    for agent in made:
        await agent.start()
    yield agents
    for agent in reversed(made):
        await agent.stop()


async def _rollout(operator: Client, op: str, body: Any) -> RolloutStatus:
    return await request(operator, f"sb.admin.rollout.{op}", body, RolloutStatus, timeout=10)


async def _routed(stack: Stack, route: RolloutStatus) -> None:
    """Wait until the policy replica applies the route the operator just set."""
    await eventually(
        lambda: policy_of(stack).routes.routes.get("recommender") == route.route,
        "the policy service to see the route",
    )


async def _calls(shop: Agent, n: int, **kw: Any) -> Counter[str]:
    async def one(i: int) -> str:
        return str(await shop.call("recommender", "suggest", Ask(customer=f"c{i}"), **kw))

    out: Counter[str] = Counter()
    for start in range(0, n, 100):
        out.update(await asyncio.gather(*(one(i) for i in range(start, min(n, start + 100)))))
    return out


async def test_a_route_splits_traffic_within_statistical_tolerance(
    stack: Stack, operator: Client, fleet: dict[str, Agent]
) -> None:
    shop = fleet["shop"]
    # No route: the established (first registered) version takes every call.
    policy = policy_of(stack)

    def established() -> str:
        record = policy.agents.get("recommender") if policy.agents else None
        return record.established_version if record else ""

    await eventually(lambda: established() == V1, "recommender's established version in KV")
    assert await _calls(shop, 50) == {V1: 50}
    status = await _rollout(
        operator, "set", SetRollout(target="recommender", weights={V2: 20}, stable=V1)
    )
    assert status.route is not None and status.route.weights == {V1: 80, V2: 20}
    await _routed(stack, status)
    counts = await _calls(shop, 2_000)
    # 20% of 2,000 = 400, sd ~18: 5 sd either side.
    assert 310 <= counts[V2] <= 490, counts
    assert counts[V1] + counts[V2] == 2_000
    # Per-version figures from every replica, within the status window.
    await eventually(
        lambda: (
            sum(r.calls for r in policy_of(stack).routes.merged("recommender", 0).values()) >= 2_050
        ),
        "2,050 calls counted for recommender",
    )
    shown = await _rollout(operator, "status", RolloutStatusRequest(target="recommender"))
    by_version = {v.version: v for v in shown.versions}
    # The 50 unrouted calls went to V1's subject too, and count for it.
    assert by_version[V2].calls == counts[V2] and by_version[V1].calls == counts[V1] + 50
    assert by_version[V2].weight == 20 and by_version[V1].health == "healthy"
    assert by_version[V1].p50_ms > 0 and by_version[V1].p99_ms >= by_version[V1].p50_ms


async def test_sticky_routes_keep_a_customer_on_one_version(
    stack: Stack, operator: Client, fleet: dict[str, Agent]
) -> None:
    shop = fleet["shop"]
    status = await _rollout(
        operator, "set",
        SetRollout(target="recommender", weights={V2: 50}, stable=V1, sticky=True),
    )  # fmt: skip
    await _routed(stack, status)
    for customer in ("ada", "grace", "linus", "barbara"):
        answers = {
            await shop.call("recommender", "suggest", Ask(), route_key=customer) for _ in range(10)
        }
        assert len(answers) == 1, (customer, answers)
    # A pin beats the route.
    assert await shop.call("recommender", "suggest", Ask(), version=V2) == V2


async def test_a_failing_canary_is_rolled_back_automatically(
    stack: Stack, operator: Client, fleet: dict[str, Agent], audit_trail: AuditTrail
) -> None:
    shop = fleet["shop"]
    guard = RouteGuard(max_error_rate=0.05, min_calls=20, window=60)
    status = await _rollout(
        operator, "set",
        SetRollout(target="recommender", weights={V2: 30}, stable=V1, guard=guard),
    )  # fmt: skip
    await _routed(stack, status)
    failures = 0
    for _ in range(300):
        try:
            assert await shop.call("recommender", "suggest", Ask(fail=True)) in (V1, V2)
        except Exception:
            failures += 1
        route = policy_of(stack).routes.routes.get("recommender")
        if route is not None and route.weights.get(V2, 0) == 0:
            break
    route = policy_of(stack).routes.routes.get("recommender")
    assert route is not None and route.weights == {V1: 100}, route
    assert route.reason.startswith("auto-rollback of 2.0.0: error rate")
    assert route.figures["canary_error_rate"] > 0.05
    assert route.previous is not None and route.previous.weights == {V1: 70, V2: 30}
    assert 20 <= failures < 300
    # The stable version keeps serving, every call.
    assert await _calls(shop, 100, timeout=5) == Counter({V1: 100})
    [event] = await audit_trail.wait_for(
        lambda r: r.kind == "admin" and r.data.get("op") == "auto_rollback"
    )
    assert event.data["guard"] == "error_rate" and event.actor == "service:policy"
    assert event.data["figures"]["canary_calls"] >= 20


async def test_promote_and_one_command_rollback(
    stack: Stack, operator: Client, fleet: dict[str, Agent], audit_trail: AuditTrail
) -> None:
    shop = fleet["shop"]
    status = await _rollout(
        operator, "set", SetRollout(target="recommender", weights={V2: 10}, stable=V1,
                                    requested_by="ops")
    )  # fmt: skip
    await _routed(stack, status)
    promoted = await _rollout(operator, "promote", PromoteRollout(target="recommender", version=V2))
    await _routed(stack, promoted)
    assert await _calls(shop, 50) == Counter({V2: 50})
    back = await _rollout(
        operator, "rollback", RollbackRollout(target="recommender", reason="oops")
    )
    assert back.route is not None and back.route.stable == V1 and back.route.weights == {V1: 100}
    await _routed(stack, back)
    assert await _calls(shop, 50) == Counter({V1: 50})
    ops = await audit_trail.wait_for(
        lambda r: r.kind == "admin" and str(r.data.get("op", "")).startswith("rollout_"), count=3
    )
    assert [o.data["op"] for o in ops] == ["rollout_set", "rollout_promote", "rollout_rollback"]
    assert ops[0].actor == "bootstrap:ops"


async def test_bad_routes_are_refused_and_the_old_route_stays(
    stack: Stack, operator: Client, fleet: dict[str, Agent], settings: Settings
) -> None:
    status = await _rollout(
        operator, "set", SetRollout(target="recommender", weights={V2: 10}, stable=V1)
    )
    with pytest.raises(NotFound, match=r"no registered version 9\.9\.9"):
        await _rollout(operator, "set", SetRollout(target="recommender", weights={"9.9.9": 5}))
    with pytest.raises(NotFound, match="not a registered agent"):
        await _rollout(operator, "set", SetRollout(target="nobody", weights={V2: 5}))
    # A version whose instances stopped heartbeating is not healthy: no traffic for it.
    silent = Agent(
        AgentManifest(name="recommender", version="3.0.0", owner="o", team="growth"),
        nats_url=settings.nats_url,
        credential=enroll(settings, "recommender", owner="o", team="growth"),
        heartbeat_interval=0,
    )  # fmt: skip
    await silent.start()
    try:
        desk = policy_of(stack).routes

        async def stale() -> bool:
            found = (await desk._versions("recommender")).get("3.0.0")
            return found is not None and found.health != "healthy"

        await eventually(stale, "version 3.0.0 to turn unhealthy", timeout=30)
        with pytest.raises(InvalidInput, match="not healthy"):
            await _rollout(operator, "set", SetRollout(target="recommender", weights={"3.0.0": 5}))
    finally:
        await silent.stop()
    kept = await _rollout(operator, "status", RolloutStatusRequest(target="recommender"))
    assert kept.route == status.route


async def test_a_deprecated_version_gets_no_new_calls_and_can_be_archived(
    stack: Stack, operator: Client, fleet: dict[str, Agent], audit_trail: AuditTrail
) -> None:
    shop = fleet["shop"]
    status = await _rollout(
        operator, "deprecate", DeprecateVersion(target="recommender", version=V1)
    )
    assert status.route is not None and status.route.weights == {V2: 100}
    assert status.route.deprecated == (V1,)
    await _routed(stack, status)
    assert await _calls(shop, 40) == Counter({V2: 40})
    with pytest.raises(TargetUnavailable, match="deprecated"):
        await shop.call("recommender", "suggest", Ask(), version=V1)
    with pytest.raises(InvalidInput, match="deprecated"):
        await _rollout(operator, "set", SetRollout(target="recommender", weights={V1: 5}))
    archived = await _rollout(
        operator, "deprecate", DeprecateVersion(target="recommender", version=V1, archive=True)
    )
    assert V1 not in {v.version for v in archived.versions if v.health != "deregistered"}
    assert await _calls(shop, 10) == Counter({V2: 10})
    # Its history stays replayable: the calls it served are still in the audit trail.
    served = await audit_trail.wait_for(
        lambda r: r.kind == "call" and r.data.get("version") == V2, count=10
    )
    assert served


async def test_operators_roll_out_from_the_cli(
    stack: Stack, fleet: dict[str, Agent], settings: Settings,
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
) -> None:  # fmt: skip
    monkeypatch.setenv("SIGNALBOX_SECRETS_DIR", str(tmp_path / "data" / "secrets"))
    runner = CliRunner()
    url = ["--nats-url", settings.nats_url or ""]

    async def cli(*args: str) -> Result:
        return await asyncio.to_thread(runner.invoke, app, list(args))

    none = await cli("rollout", "status", "recommender", *url)
    assert none.exit_code == 0 and "has no route" in none.output
    made = await cli("rollout", "set", "recommender", "2.0.0=5%", "--stable", V1, *url)
    assert made.exit_code == 0, made.output
    assert "1.0.0=95%" in made.output and "2.0.0=5%" in made.output
    bad = await cli("rollout", "set", "recommender", "2.0.0", *url)
    assert bad.exit_code == 1 and "VERSION=PERCENT" in bad.output
    unknown = await cli("rollout", "set", "recommender", "7.0.0=5%", *url)
    assert unknown.exit_code == 1 and "no registered version 7.0.0" in unknown.output
    await _calls(fleet["shop"], 30)
    as_json = await cli("rollout", "status", "recommender", "--window", "5m", "--json", *url)
    assert as_json.exit_code == 0, as_json.output
    body = json.loads(as_json.output)
    assert body["route"]["weights"] == {V1: 95, V2: 5}
    back = await cli("rollback", "recommender", "--reason", "test", *url)
    assert back.exit_code == 0 and "1.0.0=100%" in back.output


async def test_agents_cannot_change_routes_or_take_another_agents_version_calls(
    stack: Stack, settings: Settings
) -> None:
    raw = RawAgent()
    assert settings.nats_url
    await raw.connect(settings.nats_url, "mallory", enroll(settings, "mallory"))
    try:
        await raw.violation(
            lambda nc: nc.publish(
                "sb.admin.rollout.set",
                encode(SetRollout(target="recommender", weights={"6.6.6": 100})),
            ),
            "sb.admin.rollout.set",
        )
        await raw.violation(
            lambda nc: nc.publish("$KV.sb_routes.recommender", encode(Route(
                target="recommender", weights={"6.6.6": 100}, stable="6.6.6"))),
            "$KV.",
        )  # fmt: skip
        await raw.violation(
            lambda nc: nc.subscribe("sb.in.recommender.suggest.2_0_0"), "sb.in.recommender"
        )
    finally:
        assert raw.nc is not None
        await raw.nc.close()


async def test_every_policy_replica_applies_a_route_change_within_a_second(
    stack: Stack, make_stack: StackFactory, operator: Client, fleet: dict[str, Agent]
) -> None:
    second = policy_of(await make_stack(services=["policy"]))
    first = policy_of(stack)
    loop = asyncio.get_running_loop()
    for weights in ({V2: 10}, {V2: 40}):
        status = await _rollout(
            operator, "set", SetRollout(target="recommender", weights=weights, stable=V1)
        )
        applied = loop.time()
        await eventually(
            lambda status=status: all(
                p.routes.routes.get("recommender") == status.route for p in (first, second)
            ),
            "both replicas to see the route",
            timeout=1.0,
        )
        assert loop.time() - applied < 1.0
    # Figures merge across replicas: calls routed by either count once.
    counts = await _calls(fleet["shop"], 200)
    await eventually(
        lambda: all(
            sum(m.calls for m in p.routes.merged("recommender", 0).values()) == 200
            for p in (first, second)
        ),
        "200 calls counted by both replicas",
    )
    assert sum(counts.values()) == 200


async def test_rollout_status_shows_the_window_and_cost_per_call_the_guard_uses(
    stack: Stack, fleet: dict[str, Agent], settings: Settings,
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
) -> None:  # fmt: skip
    """``--guard-window 2m``: status is over the guard's 120 s, from the route's change (as
    the guard weighs it), and its $/call is the guard's, not a 300 s mix of before and after."""
    monkeypatch.setenv("SIGNALBOX_SECRETS_DIR", str(tmp_path / "data" / "secrets"))
    runner = CliRunner()
    url = ["--nats-url", settings.nats_url or ""]

    async def cli(*args: str) -> Result:
        return await asyncio.to_thread(runner.invoke, app, list(args))

    async def calls(n: int, tokens: int) -> None:
        shop = fleet["shop"]
        await asyncio.gather(
            *(shop.call("recommender", "suggest", Ask(customer=f"c{i}", tokens=tokens))
              for i in range(n))
        )  # fmt: skip

    async def metered(n: int) -> None:
        cost = cost_of(stack)

        async def count() -> bool:
            report = await asyncio.to_thread(cost.store.report, "agent", None, None)
            return report.total.reports >= n

        await eventually(count, f"{n} usage reports metered")

    await calls(20, 10_000)  # before the route: $0.10 a call
    await metered(20)
    await asyncio.sleep(1.0)  # past the figures' slot (0.5 s) the last of them counted in
    made = await cli(
        "rollout", "set", "recommender", "2.0.0=50%", "--stable", V1, "--guard-window", "2m",
        "--min-calls", "100000", *url,
    )  # fmt: skip
    assert made.exit_code == 0, made.output
    desk = policy_of(stack).routes
    await eventually(lambda: desk.routes.get("recommender"), "the policy service to see the route")
    await calls(40, 1_000)  # on the route: $0.01 a call
    await metered(60)
    route = desk.routes.get("recommender")
    assert route is not None and route.guard is not None and route.guard.window == 120
    await eventually(
        lambda: sum(m.calls for m in desk.merged("recommender", route.changed_at).values()) >= 40,
        "the 40 routed calls counted",
    )

    shown = await cli("rollout", "status", "recommender", *url)
    assert shown.exit_code == 0, shown.output
    assert "last 120s" in shown.output
    as_json = await cli("rollout", "status", "recommender", "--json", *url)
    assert as_json.exit_code == 0, as_json.output
    body = json.loads(as_json.output)
    assert body["window"] == 120
    rows = {v["version"]: v for v in body["versions"]}
    assert rows[V1]["calls"] + rows[V2]["calls"] == 40
    # What the guard compares: the same figures from the same source over the same span.
    since = max(time.time() - 120, route.changed_at)
    guard_costs = await desk._cost_per_call(
        "recommender", since, desk.merged("recommender", since), time.time()
    )
    for version in (V1, V2):
        assert rows[version]["cost_per_call_usd"] == pytest.approx(0.01), version
        assert rows[version]["cost_per_call_usd"] == pytest.approx(guard_costs[version]), version
