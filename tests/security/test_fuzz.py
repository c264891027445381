"""Random traffic from one agent changes nothing but that agent's own state.

Hypothesis drives agent ``mallory`` (a raw nats-py client holding only its own
credential) through everything an agent may publish, and a bit beyond: every
agent subject plus random suffixes, reply subjects anywhere (its own inbox,
other inboxes, KV keys, admin and call subjects, random strings), random
headers (the ones Signalbox reads among them: ``Sb-Caller``, ``Sb-Chain``,
``Sb-Chain-Sig``, ``traceparent``, ``Nats-Msg-Id``, ``Sb-Estimated-Tokens``...)
and random payloads (bytes, JSON, and every request type with random field
values). After each example: every service still answers (a registry read, a
mediated call and an authorization by another agent), and no KV key of
``sb_agents``, ``sb_breakers``, ``sb_budgets``, ``sb_policies`` or ``sb_routes``
changed except mallory's own, and no budget but mallory's moved. At the end
the audit chain verifies.

One stack serves every example (a few seconds to start); the examples run in
a worker thread and hand their traffic to the test's event loop.
"""

from __future__ import annotations

import asyncio
import json
import string
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import msgspec
import nats.errors
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nats.aio.msg import Msg
from nats.js.errors import KeyNotFoundError

from broker import Agent
from broker.codec import decode, encode
from broker.connection import Client, sync_connection
from broker.replies import H_ERROR
from broker.settings import Settings
from schemas import (
    AgentManifest,
    AuthzRequest,
    BudgetList,
    BudgetStatus,
    DeregisterAgent,
    DiscoverAgents,
    GetAgent,
    Heartbeat,
    ListAgents,
    ListBudgets,
    SetBudget,
    UsageReport,
)
from services.runner import Stack
from services.tracing.reader import scan
from services.tracing.verify import verify

if TYPE_CHECKING:
    from support import AgentFactory, ServiceConnector, StackFactory

from support import RawAgent, ask, cedar_policies, enroll, eventually

ME = "mallory"
EXAMPLES = 250
BUCKETS = ("sb_agents", "sb_breakers", "sb_budgets", "sb_policies", "sb_routes")
#: Keys mallory may change: its own registry entry, its own and its team's breakers.
MINE = {("sb_agents", ME), ("sb_breakers", f"agent.{ME}"), ("sb_breakers", "team.red")}
#: Budgets: (scope, name, limit). mallory (team red) owns the first two.
BUDGETS = (
    ("agent", ME, 1.0), ("team", "red", 1.0),
    ("agent", "b", 5.0), ("team", "blue", 5.0), ("project", "apollo", 5.0),
)  # fmt: skip
MY_BUDGETS = {f"agent.{ME}.day", "team.red.day"}


# -- strategies ---------------------------------------------------------------------------

TOKEN_CHARS = string.ascii_letters + string.digits + "_-"
token = st.text(TOKEN_CHARS, min_size=1, max_size=10)
printable = st.text(st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=40)
names = st.sampled_from([ME, "b", "probe", "nobody"]) | token
text = st.text(
    st.characters(blacklist_characters="\r\n", blacklist_categories=("Cs",)), max_size=30
)

AGENT_SUBJECTS = (
    f"sb.authz.{ME}",
    f"sb.usage.{ME}",
    *(f"sb.registry.{op}.{ME}" for op in
      ("get", "list", "discover", "register", "heartbeat", "deregister")),
)  # fmt: skip
subjects = st.one_of(
    st.builds(
        lambda t, c: f"sb.out.{ME}.{t}.{c}",
        st.sampled_from(["b", "probe", ME, "nobody"]) | token,
        st.sampled_from(["echo", "score"]) | token,
    ),
    st.sampled_from(AGENT_SUBJECTS),
    st.builds(lambda t: f"_INBOX.agent.{ME}.{t}", token),
    # Random suffixes: mostly outside the permissions (the server refuses them).
    st.builds(
        lambda base, tail: f"{base}{tail}",
        st.sampled_from((f"sb.out.{ME}", *AGENT_SUBJECTS, "sb.registry", "sb")),
        st.builds(lambda t: "." + t, printable) | printable,
    ),
)
replies = st.one_of(
    st.builds(lambda t: f"_INBOX.agent.{ME}.fz.{t}", token),  # its own inbox
    st.sampled_from([
        "", "_INBOX.agent.b.x", "_INBOX.agent.probe.x", "_INBOX.operator.x", "_INBOX.service.x",
        f"_INBOX.agent.{ME}.*", f"_INBOX.agent.{ME}.>", f"_INBOX.agent.{ME}",
        "$KV.sb_agents.b", "$KV.sb_breakers.agent.b", "$KV.sb_budgets.agent.b.day",
        "$KV.sb_policies.active", "$KV.sb_routes.b", "$JS.API.STREAM.PURGE.SB_AUDIT",
        "sb.admin.budgets.set", "sb.admin.breakers.trip", "sb.admin.registry.deregister",
        "sb.in.b.echo", "sb.usage.b", "sb.audit.in.admin.x", "sb.cost.reserve",
    ]),
    printable,
)  # fmt: skip
header_names = st.sampled_from([
    "Sb-Caller", "Sb-Chain", "Sb-Chain-Sig", "traceparent", "tracestate", "Nats-Msg-Id",
    "Sb-Estimated-Tokens", "Sb-Timeout-Ms", "Sb-Target-Version", "Sb-Route-Key",
    "Sb-Data-Tags", "Sb-On-Behalf-Of", "Sb-Call-Id", "Sb-Deadline", "Sb-Error", "Status",
]) | token  # fmt: skip
header_values = (
    text
    | st.integers(-(2**70), 2**70).map(str)
    | st.sampled_from(
        ["b", "b,probe", f"{ME},b", "0", "-1", "00-" + "1" * 32 + "-" + "2" * 16 + "-01"]
    )
)
headers = st.none() | st.dictionaries(header_names, header_values, max_size=5)

versions = st.sampled_from(["1.0.0", "2.0.0", "1.0.0-rc.1"]) | text
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | text,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(text, inner, max_size=4),
    max_leaves=12,
)
counts = st.integers(-5, 10**12)
requests = st.one_of(
    st.builds(AgentManifest, name=names, version=versions, owner=text, team=text,
              project=st.sampled_from(["", "apollo", "red-proj"])),
    st.builds(Heartbeat, name=names, version=versions, instance=token | text),
    st.builds(GetAgent, name=names),
    st.builds(ListAgents, capability=st.none() | text, team=st.none() | text),
    st.builds(DiscoverAgents, name=st.none() | names),
    st.builds(DeregisterAgent, name=names, version=st.none() | versions),
    st.builds(
        AuthzRequest,
        action=st.sampled_from(["use_model", "use_tool", "call"]) | text,
        resource=st.sampled_from(["gpt-4o", "web-search"]) | text,
        estimated_tokens=st.none() | counts,
        max_output_tokens=counts,
        price_per_1k_tokens=st.floats(-1, 1e9),
        project=st.sampled_from(["", "apollo", "red-proj"]) | text,
        on_behalf_of=st.lists(names, max_size=3).map(tuple),
        data_tags=st.lists(text, max_size=3).map(tuple),
    ),
    st.builds(
        UsageReport, id=token, agent=names, time=st.floats(-1e10, 1e11),
        model=st.sampled_from(["gpt-4o", "unknown-model"]) | text,
        input_tokens=counts, output_tokens=counts, cached_tokens=counts,
        project=st.sampled_from(["", "apollo", "red-proj"]),
        on_behalf_of=st.lists(names, max_size=3).map(tuple), reservation_id=token | st.just(""),
    ),
    st.builds(SetBudget, scope=st.sampled_from(["agent", "team", "project"]), name=names,
              window=st.just("day"), limit_usd=st.floats(0, 1e6)),
).map(encode)  # fmt: skip
payloads = st.one_of(
    st.binary(max_size=300),
    json_values.map(lambda v: json.dumps(v).encode()),
    requests,
)
own_inbox = st.builds(lambda t: f"_INBOX.agent.{ME}.fz.{t}", token)
mostly_own = own_inbox | own_inbox | own_inbox | replies
mine = st.sampled_from([ME, ME, ME, "b", "probe"])
#: Requests whose subject and body go together (deeper into each service), random values.
coherent = st.one_of(
    st.tuples(st.just(f"sb.out.{ME}.b.echo"), mostly_own, headers,
              json_values.map(lambda v: json.dumps(v).encode())),
    st.tuples(st.just(f"sb.out.{ME}.b.score"), mostly_own, headers,
              st.builds(lambda i, n: encode({"applicant_id": i, "income": n}), text, counts)),
    st.tuples(st.just(f"sb.authz.{ME}"), mostly_own, headers, st.builds(
        AuthzRequest,
        action=st.sampled_from(["use_model", "use_model", "use_tool"]),
        resource=st.sampled_from(["gpt-4o", "gpt-4o-mini", "unknown-model"]),
        estimated_tokens=st.none() | st.integers(0, 200_000),
        max_output_tokens=st.integers(0, 100_000),
        project=st.sampled_from(["", "apollo", "red-proj"]),
        on_behalf_of=st.lists(st.sampled_from(["b", "probe", "user:x"]), max_size=2).map(tuple),
    ).map(encode)),
    st.tuples(st.just(f"sb.usage.{ME}"), st.just(""), headers, st.builds(
        UsageReport, id=token, agent=mine, time=st.floats(1.7e9, 1.9e9),
        model=st.sampled_from(["gpt-4o", "unknown-model"]),
        input_tokens=st.integers(0, 10**7), output_tokens=st.integers(0, 10**7),
        project=st.sampled_from(["", "apollo", "red-proj"]),
        on_behalf_of=st.lists(st.sampled_from(["b", "probe"]), max_size=2).map(tuple),
        reservation_id=token | st.just(""),
    ).map(encode)),
    st.tuples(st.just(f"sb.registry.register.{ME}"), mostly_own, headers, st.builds(
        AgentManifest, name=mine, version=st.sampled_from(["1.0.0", "2.0.0"]),
        owner=st.sampled_from(["eve", "owner-1"]), team=st.sampled_from(["red", "blue"]),
        project=st.sampled_from(["", "apollo", "red-proj"]),
        metadata=st.dictionaries(st.sampled_from(["projects", "team", "x"]), text, max_size=2),
    ).map(encode)),
    st.tuples(st.sampled_from([f"sb.registry.{op}.{ME}" for op in ("get", "heartbeat")]),
              mostly_own, headers,
              st.builds(lambda n, i: encode(Heartbeat(name=n, version="1.0.0", instance=i)),
                        mine, token) | st.builds(GetAgent, name=mine).map(encode)),
    st.tuples(st.just(f"sb.registry.deregister.{ME}"), mostly_own, headers,
              st.builds(DeregisterAgent, name=mine,
                        version=st.sampled_from([None, "1.0.0", "2.0.0"])).map(encode)),
)  # fmt: skip
messages = st.lists(
    st.tuples(subjects, replies, headers, payloads) | coherent, min_size=1, max_size=4
)


class Score(msgspec.Struct):
    applicant_id: str
    income: int


# -- the world ------------------------------------------------------------------------------


@dataclass
class World:
    stack: Stack
    settings: Settings
    probe: Agent
    svc: Client
    raw: RawAgent
    kv_before: dict[tuple[str, str], int | None]
    budgets_before: dict[str, tuple[float, float, int]]
    #: Error codes (``ok``: none) of the answers mallory got into its own inbox.
    answers: list[str]
    reconnects: int = 0

    @property
    def mallory(self) -> Client:
        assert self.raw.nc is not None
        return self.raw.nc


async def kv_state(svc: Client) -> dict[tuple[str, str], int | None]:
    """Every key of the watched buckets with its revision (None: deleted). The keys come
    from the server's own list of the bucket stream's subjects (nats-py's ``keys()``, a
    watcher, can come back short while the bucket is written)."""
    js = svc.jetstream()
    out: dict[tuple[str, str], int | None] = {}
    for bucket in BUCKETS:
        prefix = f"$KV.{bucket}."
        info = await js.stream_info(f"KV_{bucket}", subjects_filter=f"{prefix}>")
        kv = await js.key_value(bucket)
        for subject in info.state.subjects or {}:
            key = subject[len(prefix) :]
            try:
                out[(bucket, key)] = (await kv.get(key)).revision
            except KeyNotFoundError:  # deleted (or purged)
                out[(bucket, key)] = None
    return out


async def budget_state(svc: Client) -> dict[str, tuple[float, float, int]]:
    """Spent, reserved and open reservations of every budget but mallory's."""
    reply = await ask(svc, "sb.admin.budgets.list", encode(ListBudgets()), inbox="_INBOX.operator")
    listed = decode(reply.data, BudgetList)
    return {
        s.budget.key: (s.spent_usd, s.reserved_usd, s.open_reservations)
        for s in listed.budgets
        if s.budget.key not in MY_BUDGETS
    }


async def register_mallory(nc: Client) -> None:
    manifest = AgentManifest(name=ME, version="1.0.0", owner="eve", team="red")
    reply = await nc.request(f"sb.registry.register.{ME}", encode(manifest), timeout=5)
    assert H_ERROR not in (reply.headers or {}), reply.data


async def connect_mallory(settings: Settings, answers: list[str]) -> RawAgent:
    """mallory's raw connection, with a fresh credential (a deregistration of its last
    version revokes them), registered; the codes of the answers it gets go to ``answers``."""
    raw = RawAgent()
    assert settings.nats_url is not None
    token_ = enroll(settings, ME, owner="eve", team="red", projects=("red-proj",))
    await raw.connect(settings.nats_url, ME, token_)
    assert raw.nc is not None
    await register_mallory(raw.nc)

    async def answered(msg: Msg) -> None:
        answers.append((msg.headers or {}).get(H_ERROR, "ok"))

    await raw.nc.subscribe(f"_INBOX.agent.{ME}.fz.>", cb=answered)
    return raw


@pytest.fixture
async def world(
    make_stack: StackFactory,
    make_agent: AgentFactory,
    settings: Settings,
    service_nc: ServiceConnector,
) -> AsyncIterator[World]:
    rules = cedar_policies([(ME, "b", ["echo", "score"]), ("probe", "b", ["echo"])])
    rules += (
        '@id("models") permit (principal, action == Signalbox::Action::"use_model", resource);\n'
    )
    stack = await make_stack(rules=rules)
    b = make_agent("b", team="blue", projects=("apollo",), heartbeat_interval=0)

    @b.capability("echo")
    async def echo(req: dict[str, Any]) -> dict[str, Any]:
        return req

    @b.capability("score")
    async def score(req: Score) -> int:
        return req.income // 1000

    probe = make_agent("probe", team="grey", heartbeat_interval=0)
    await b.start()
    await probe.start()
    svc = await service_nc("fuzz-observer")
    policy, cost = stack.services["policy"], stack.services["cost"]
    for scope, name, limit in BUDGETS:
        body = SetBudget(scope=scope, name=name, window="day", limit_usd=limit)
        reply = await ask(svc, "sb.admin.budgets.set", encode(body), inbox="_INBOX.operator")
        status = decode(reply.data, BudgetStatus)
        key = status.budget.key
        await eventually(  # every replica watches the definitions
            lambda key=key: (
                policy.budgets.get(key) is not None and cost.budgets.cache.get(key) is not None
            ),
            "both services to see the budget",
        )
    answers: list[str] = []
    raw = await connect_mallory(settings, answers)
    world = World(
        stack, settings, probe, svc, raw, await kv_state(svc), await budget_state(svc), answers
    )
    yield world
    if world.raw.nc is not None:
        await world.raw.nc.close()


# -- one example ----------------------------------------------------------------------------


async def still_serving(w: World, n: int) -> None:
    """Another agent's registry read, mediated call and authorization are answered."""
    assert await w.probe.call("b", "echo", {"n": n}, timeout=5) == {"n": n}
    found = await w.probe.discover(DiscoverAgents(name="b"))
    assert [r.manifest.name for r in found.agents] == ["b"]
    decision = await w.probe.authorize("use_model", "gpt-4o", estimated_tokens=10, timeout=5)
    assert decision.effect == "allow", decision


async def unchanged(w: World) -> None:
    after = await kv_state(w.svc)
    changed = {
        key for key in set(after) | set(w.kv_before)
        if after.get(key) != w.kv_before.get(key) and key not in MINE
    }  # fmt: skip
    assert not changed, f"KV keys changed by mallory's traffic: {sorted(changed)}"
    assert await budget_state(w.svc) == w.budgets_before


async def run_example(
    w: World, n: int, msgs: list[tuple[str, str, dict[str, str] | None, bytes]]
) -> None:
    if w.raw.nc is None or w.raw.nc.is_closed:
        # Its deregistration revoked its credentials; the server closes the connection
        # when its session ends (not within this test, but this keeps the fuzzer going).
        w.raw = await connect_mallory(w.settings, w.answers)
        w.reconnects += 1
    nc = w.mallory
    try:
        for subject, reply, hdrs, payload in msgs:
            try:
                await nc.publish(subject, payload, reply=reply, headers=hdrs)
            except nats.errors.BadSubjectError:
                continue
        await sync_connection(nc)
    except (nats.errors.ConnectionClosedError, TimeoutError):
        pass  # closed mid-example: the next one reconnects
    await still_serving(w, n)
    await unchanged(w)


async def test_random_traffic_from_one_agent_changes_nothing_but_its_own_state(
    world: World, service_nc: ServiceConnector
) -> None:
    loop = asyncio.get_running_loop()
    count = [0]

    def on_loop(coro_fn: Callable[[], Any]) -> None:
        asyncio.run_coroutine_threadsafe(coro_fn(), loop).result(timeout=30)

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )
    @given(msgs=messages)
    def example(msgs: list[tuple[str, str, dict[str, str] | None, bytes]]) -> None:
        count[0] += 1
        on_loop(lambda: run_example(world, count[0], msgs))

    await asyncio.to_thread(example)
    assert count[0] >= EXAMPLES
    # The fuzzer got through to the services: answers, refusals, errors, successes.
    assert "ok" in world.answers and len(set(world.answers)) >= 3, world.answers
    # The audit trail of all of it is one sound chain.
    js = world.svc.jetstream()
    records = [item async for item in scan(js, "sb.audit.log.>")]
    report = verify(records, last_pos=records[-1][0])
    assert report.ok, report.problem
    assert report.checked == len(records) > EXAMPLES
    assert report.first_seq == 1
