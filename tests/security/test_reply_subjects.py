"""Confused deputies: no agent can make a service publish where the agent may not.

A service publishes its replies with its own, all-powerful identity. So an
agent that names someone else's subject as the reply of a request (a KV key,
an admin endpoint, another agent's inbox or calls, the usage or audit intake,
a JetStream API subject) would have the service write there for it. Every
endpoint an agent may ask (the registry's ``sb.registry.<op>.<self>``, the
policy's ``sb.out.<self>.…`` and ``sb.authz.<self>``) must refuse such a
request before any work: no answer, no effect, counted, and audited as
``rejected`` / ``invalid_reply_subject`` with the real sender as actor.

Each attack is made by a raw nats-py client holding agent ``a``'s credential.
What did (not) happen is read with a service connection: the KV keys, a
subscription on every subject an attack names (proved empty with a sentinel:
a legitimate request sent after the attacks, whose answer is awaited before
the watchers are read), the audit trail and the services' counters.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import msgspec
import nats.errors
import pytest
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.errors import KeyNotFoundError, NoKeysError

from broker import Agent
from broker.codec import decode, encode
from broker.connection import Client, sync_connection
from broker.replies import H_ERROR, H_TIMEOUT_MS
from broker.runtime.jetstream import AUDIT_STREAM
from broker.settings import Settings
from schemas import (
    AgentManifest,
    AgentRecord,
    AuditEvent,
    AuthzRequest,
    BudgetList,
    Decision,
    DeregisterAgent,
    GetAgent,
    Heartbeat,
    ListBudgets,
    SetBudget,
    TripBreaker,
)
from services.runner import Stack

if TYPE_CHECKING:
    from support import AgentFactory, AuditTrail, ServiceConnector, StackFactory

from support import RawAgent, ask, enroll, eventually

#: Every reply subject an agent must not make a service publish to (agent ``a``;
#: ``b`` is another agent). The empty one: no reply at all.
BAD_REPLIES = (
    "$KV.sb_breakers.agent.b",  # open b's circuit breaker
    "$KV.sb_agents.b",  # overwrite b's registry entry
    "$KV.sb_budgets.agent.a.day",  # give itself a budget
    "$KV.sb_policies.active",  # switch the policy set
    "$KV.sb_routes.b",  # reroute b's calls
    "$JS.API.STREAM.PURGE.SB_AUDIT",  # erase the audit trail
    "$JS.API.STREAM.DELETE.SB_AUDIT",
    "sb.admin.budgets.set",  # an operator's endpoint
    "sb.in.b.echo",  # call b as the policy service
    "_INBOX.agent.b.x",  # forge a reply to b
    "_INBOX.agent.ab.x",  # an agent whose name starts with "a"
    "_INBOX.operator.x",  # forge a reply to an operator's CLI
    "_INBOX.service.x",  # forge a reply to a service's pending request
    "sb.usage.b",  # report usage as b
    "sb.audit.in.x.y",  # forge an audit event
    "",  # no reply at all
    "_INBOX.agent.a.*",  # a wildcard in its own inbox
    "_INBOX.agent.a",  # the bare inbox root
    "_INBOX.agent.a..x",  # an empty token
)

#: KV keys a deputized reply above would change: bucket -> keys.
KV_KEYS = {
    "sb_breakers": ("agent.b",),
    "sb_agents": ("b",),
    "sb_budgets": ("agent.a.day",),
    "sb_policies": ("active",),
    "sb_routes": ("b",),
}


class Echo(msgspec.Struct):
    text: str


@dataclass
class World:
    """A stack, agents ``a`` (SDK, for legitimate calls), ``b`` and ``c`` (serving), the
    attacker (raw nats-py with ``a``'s credential) and a service connection."""

    stack: Stack
    settings: Settings
    a: Agent
    b: Agent
    c: Agent
    raw: RawAgent
    svc: Client
    runs: dict[str, int] = field(default_factory=dict)

    @property
    def attacker(self) -> Client:
        assert self.raw.nc is not None
        return self.raw.nc

    def service(self, name: str) -> Any:
        return self.stack.services[name]


@pytest.fixture
async def world(
    make_stack: StackFactory,
    make_agent: AgentFactory,
    settings: Settings,
    service_nc: ServiceConnector,
) -> AsyncIterator[World]:
    stack = await make_stack(
        allow=[("a", "b", ["echo"]), ("a", "c", ["cap"])],
        max_call_bytes=4096,
        refusal_summary_window=0.5,
    )
    runs = {"echo": 0, "secret": 0, "cap": 0}
    b = make_agent("b", heartbeat_interval=0)

    @b.capability("echo")
    async def echo(req: Echo) -> Echo:
        runs["echo"] += 1
        return req

    @b.capability("secret")
    async def secret(req: Echo) -> Echo:  # registered, but no policy allows calling it
        runs["secret"] += 1
        return req

    c = make_agent("c", heartbeat_interval=0)

    @c.capability("cap")
    async def cap(req: dict[str, Any]) -> SetBudget:
        # The colluding target: its answer is a body the cost service's admin endpoint takes.
        runs["cap"] += 1
        return SetBudget(scope="agent", name="a", window="day", limit_usd=1_000_000.0)

    a = make_agent("a", heartbeat_interval=0)
    for agent in (b, c, a):
        await agent.start()
    raw = RawAgent()
    assert settings.nats_url is not None
    await raw.connect(settings.nats_url, "a", enroll(settings, "a"))
    yield World(stack, settings, a, b, c, raw, await service_nc("watcher"), runs)
    if raw.nc is not None:
        await raw.nc.close()


# -- what the attacks left behind --------------------------------------------------------


async def kv_revisions(svc: Client) -> dict[str, int | None]:
    """The revision of every key in :data:`KV_KEYS` (None: absent)."""
    js = svc.jetstream()
    out: dict[str, int | None] = {}
    for bucket, keys in KV_KEYS.items():
        kv = await js.key_value(bucket)
        for key in keys:
            try:
                out[f"{bucket}/{key}"] = (await kv.get(key)).revision
            except KeyNotFoundError:
                out[f"{bucket}/{key}"] = None
    return out


async def audit_stream_state(svc: Client) -> tuple[int, int]:
    info = await svc.jetstream().stream_info(AUDIT_STREAM)
    return info.state.first_seq, info.state.messages


class Watch:
    """Subscriptions (of a service connection) on subjects that must stay silent."""

    def __init__(self, nc: Client) -> None:
        self.nc = nc
        self.subs: dict[str, Subscription] = {}
        #: Subjects a wildcard subscription reports (the rest it sees is legitimate).
        self.only: dict[str, frozenset[str]] = {}

    @classmethod
    async def on(cls, nc: Client, subjects: tuple[str, ...]) -> Watch:
        """Watch ``subjects``; those nats-py cannot subscribe to (an empty token) through
        a wildcard over their parent, reporting only messages on exactly them."""
        watch = cls(nc)
        for subject in dict.fromkeys(s for s in subjects if s):
            try:
                watch.subs[subject] = await nc.subscribe(subject)
            except nats.errors.BadSubjectError:
                parent = subject.split("..")[0] + ".>"
                if parent not in watch.subs:
                    watch.subs[parent] = await nc.subscribe(parent)
                watch.only[parent] = watch.only.get(parent, frozenset()) | {subject}
        await sync_connection(nc)
        return watch

    async def seen(self) -> dict[str, list[tuple[str, bytes]]]:
        """What reached each watched subject so far. Call after a sentinel's answer
        arrived: the server relays a publisher's messages in order, so whatever a
        service published before its answer to the sentinel is in our socket before the
        echo of :func:`sync_connection`, hence in the subscriptions' queues."""
        await sync_connection(self.nc)
        out: dict[str, list[tuple[str, bytes]]] = {}
        for subject, sub in self.subs.items():
            got = []
            while sub.pending_msgs:
                msg = await sub.next_msg(timeout=1)
                if subject not in self.only or msg.subject in self.only[subject]:
                    got.append((msg.subject, msg.data))
            if got:
                out[subject] = got
        return out


#: Subjects watched besides the bad replies: anything reaching agent b, the admin
#: endpoints, the KV and JetStream API subjects, the intakes.
ALWAYS_WATCHED = (
    "sb.in.b.>",
    "_INBOX.agent.b.>",
    "sb.admin.>",
    "$KV.>",
    "$JS.API.STREAM.PURGE.>",  # (reads of the JetStream API are the services' own)
    "$JS.API.STREAM.DELETE.>",
    "$JS.API.STREAM.UPDATE.>",
    "$JS.API.STREAM.MSG.DELETE.>",
    "sb.usage.*",
    "sb.audit.in.x.>",
    "_INBOX.operator.>",
)


#: The subjects of each service's agent endpoints (a service summarizes its refusals per
#: sender and code: a summary carries the subject of its window's first refusal).
REGISTRY = ("sb.registry.",)
POLICY = ("sb.out.", "sb.authz.")


def refused_total(records: list[AuditEvent], actor: str, service: tuple[str, ...]) -> int:
    """Refusals of reply subjects by ``actor`` at one service (its subjects' prefixes) the
    audit trail accounts for: each window's first record, plus the rest of its events in
    its summary."""
    total = 0
    for r in records:
        if (r.kind, r.actor) != ("rejected", actor) or not r.subject.startswith(service):
            continue
        if r.data.get("code") != "invalid_reply_subject":
            continue
        summary = r.data.get("summary")
        total += summary["count"] - 1 if summary else 1
    return total


async def until_audited(trail: AuditTrail, actor: str, service: tuple[str, ...], n: int) -> None:
    """Wait until the audit trail accounts for ``n`` refusals of ``actor`` at a service (the
    first of a window at once, the rest in its summary when the window closes: the
    stacks here use a short window), and no more."""

    async def enough() -> bool:
        return refused_total(await trail.settle(), actor, service) >= n

    await eventually(enough, f"{n} refusals of {actor} at {service} audited")
    assert refused_total(trail.records, actor, service) == n


def is_error(msg: Msg, code: str) -> bool:
    return (msg.headers or {}).get(H_ERROR) == code


# -- the registry ---------------------------------------------------------------------------


async def test_the_registry_answers_an_agent_only_into_its_own_inbox(
    world: World, audit_trail: AuditTrail
) -> None:
    svc, nc = world.svc, world.attacker
    kv_before = await kv_revisions(svc)
    audit_before = await audit_stream_state(svc)
    watch = await Watch.on(svc, BAD_REPLIES + ALWAYS_WATCHED)
    body = encode(GetAgent(name="b"))
    for reply in BAD_REPLIES:
        await nc.publish("sb.registry.get.a", body, reply=reply)
    # The sentinel: the same request with a reply in a's own inbox is answered.
    answer = await nc.request("sb.registry.get.a", body, timeout=5)
    assert decode(answer.data, AgentRecord).manifest.name == "b"
    assert await watch.seen() == {}
    registry = world.service("registry")
    assert registry.rejected["invalid_reply_subject"] == len(BAD_REPLIES)
    assert await kv_revisions(svc) == kv_before
    first_seq, messages = await audit_stream_state(svc)
    # Nothing removed from the trail. An empty stream reports first_seq 0, and 1 once
    # its first record (maybe this test's refusals) is chained.
    assert first_seq <= (audit_before[0] or 1) and messages >= audit_before[1]
    assert world.raw.errors == []  # all of it was the agent's to publish
    # b still answers calls, and the attacker is accountable for every attempt.
    assert await world.a.call("b", "echo", Echo("hi"), returns=Echo) == Echo("hi")
    await until_audited(audit_trail, "a", REGISTRY, len(BAD_REPLIES))


async def test_registry_writes_with_a_bad_reply_change_nothing(
    world: World, service_nc: ServiceConnector, settings: Settings
) -> None:
    """Register, heartbeat and deregister are refused before any work: a refused
    deregistration neither removes the agent nor revokes its credentials."""
    svc, nc = world.svc, world.attacker
    get_a = encode(GetAgent(name="a"))
    registered = decode((await nc.request("sb.registry.get.a", get_a, timeout=5)).data, AgentRecord)
    before = await kv_revisions(svc)
    agents = await svc.jetstream().key_value("sb_agents")
    a_revision = (await agents.get("a")).revision
    watch = await Watch.on(svc, BAD_REPLIES + ALWAYS_WATCHED)
    manifest = encode(AgentManifest(name="a", version="9.9.9", owner="owner-1", team="team-1"))
    beat = encode(Heartbeat(name="a", version="1.0.0", instance="forged"))
    writes = (
        ("sb.registry.register.a", manifest),
        ("sb.registry.heartbeat.a", beat),
        ("sb.registry.deregister.a", encode(DeregisterAgent(name="a"))),
    )
    for reply in BAD_REPLIES:
        for subject, body in writes:
            await nc.publish(subject, body, reply=reply)
    got = decode((await nc.request("sb.registry.get.a", get_a, timeout=5)).data, AgentRecord)
    assert got.manifest == registered.manifest and got.manifest.version == "1.0.0"
    assert got.instances == registered.instances  # no forged instance
    assert await watch.seen() == {}
    assert (await agents.get("a")).revision == a_revision
    assert await kv_revisions(svc) == before
    assert world.service("registry").rejected["invalid_reply_subject"] == 3 * len(BAD_REPLIES)
    # Not revoked: the SDK agent and the attacker's own connection are still up.
    assert world.a.nc.is_connected and nc.is_connected
    assert await world.a.call("b", "echo", Echo("still"), returns=Echo) == Echo("still")


async def test_an_agent_cannot_use_the_registrys_shared_read_subjects(world: World) -> None:
    """``sb.registry.{get,list,discover}`` answer operators and services (their replies may
    go to those inboxes): the server refuses them to an agent, as it does another agent's
    scoped subjects."""
    for op in ("get", "list", "discover"):
        await world.raw.violation(
            lambda nc, op=op: nc.publish(f"sb.registry.{op}", b"{}"), f"sb.registry.{op}"
        )
        await world.raw.violation(
            lambda nc, op=op: nc.publish(f"sb.registry.{op}.b", b"{}"), f"sb.registry.{op}.b"
        )


# -- the policy service ---------------------------------------------------------------------


async def test_the_policy_service_never_relays_or_answers_outside_the_callers_inbox(
    world: World, audit_trail: AuditTrail
) -> None:
    svc, nc = world.svc, world.attacker
    policy = world.service("policy")
    kv_before = await kv_revisions(svc)
    watch = await Watch.on(svc, BAD_REPLIES + ALWAYS_WATCHED)
    call = encode(Echo("attack"))
    authz = encode(AuthzRequest(action="use_model", resource="gpt-4o", estimated_tokens=10))
    for reply in BAD_REPLIES:
        await nc.publish("sb.out.a.b.echo", call, reply=reply)
        await nc.publish("sb.authz.a", authz, reply=reply)
    # Sentinels: the same requests with a's own inbox are served.
    answer = await nc.request("sb.out.a.b.echo", encode(Echo("ok")), timeout=5)
    assert decode(answer.data, Echo) == Echo("ok")
    decision = decode((await nc.request("sb.authz.a", authz, timeout=5)).data, Decision)
    assert decision.effect in ("allow", "deny")
    seen = await watch.seen()
    # The sentinel call itself reached b (and only it).
    assert [data for _, data in seen.pop("sb.in.b.>", [])] == [encode(Echo("ok"))]
    assert [data for _, data in seen.pop("sb.in.b.echo", [])] == [encode(Echo("ok"))]
    assert seen == {}
    assert world.runs["echo"] == 1  # b's handler never ran for a refused call
    n = 2 * len(BAD_REPLIES)
    assert policy.rejected["invalid_reply_subject"] == n
    assert policy.stats.rejected == n
    assert policy.stats.allowed == 1 and policy.stats.authz == 1  # nothing decided
    assert await kv_revisions(svc) == kv_before
    await until_audited(audit_trail, "a", POLICY, n)
    # Refused requests were never decided: the only decisions are the sentinels'.
    await audit_trail.wait_for(lambda r: r.kind == "decision", count=2)
    decisions = [r for r in await audit_trail.settle() if r.kind == "decision"]
    assert len(decisions) == 2


async def test_no_error_path_of_the_policy_service_answers_a_bad_reply(
    world: World, audit_trail: AuditTrail
) -> None:
    """Unknown target or capability, a bad timeout header, an oversized payload, a denied
    call, a call to a target whose breaker is open: each is answered with its error to
    the caller's own inbox, and never to a reply subject outside it."""
    svc, nc = world.svc, world.attacker
    bad = ("sb.admin.budgets.set", "_INBOX.agent.b.x", "$KV.sb_breakers.agent.b", "")
    watch = await Watch.on(svc, bad + ALWAYS_WATCHED)
    body = encode(Echo("x"))
    cases: list[tuple[str, bytes, dict[str, str] | None, str]] = [
        ("sb.out.a.nobody.echo", body, None, "unknown_target"),
        ("sb.out.a.b.nope", body, None, "unknown_target"),
        ("sb.out.a.b.echo", body, {H_TIMEOUT_MS: "soon"}, "invalid_input"),
        ("sb.out.a.b.echo", body, {H_TIMEOUT_MS: "-5"}, "invalid_input"),
        ("sb.out.a.b.echo", b"x" * 5000, None, "payload_too_large"),
        ("sb.out.a.b.secret", body, None, "denied"),
    ]

    async def attack_then_check(cases: list[tuple[str, bytes, dict[str, str] | None, str]]) -> None:
        for subject, data, headers, _ in cases:
            for reply in bad:
                await nc.publish(subject, data, reply=reply, headers=headers)
        for subject, data, headers, code in cases:  # the sentinels: answered, to a only
            answer = await nc.request(subject, data, timeout=5, headers=headers)
            assert is_error(answer, code), (subject, answer.headers, answer.data)

    await attack_then_check(cases)
    # Open b's breaker (as an operator); calls to b are then refused before Cedar.
    tripped = await ask(
        svc, "sb.admin.breakers.trip", encode(TripBreaker(key="agent.b", text="test")),
        inbox="_INBOX.operator",
    )  # fmt: skip
    assert H_ERROR not in (tripped.headers or {}), tripped.data
    breaker_rev = (await (await svc.jetstream().key_value("sb_breakers")).get("agent.b")).revision
    await attack_then_check([("sb.out.a.b.echo", body, None, "breaker_open")])
    seen = await watch.seen()
    # The operator's trip wrote the breaker's key (and answered the operator); nothing else.
    assert [s for s, _ in seen.pop("$KV.>", [])] == ["$KV.sb_breakers.agent.b"]
    assert [s for s, _ in seen.pop("$KV.sb_breakers.agent.b", [])] == ["$KV.sb_breakers.agent.b"]
    assert [s for s, _ in seen.pop("sb.admin.>", [])] == ["sb.admin.breakers.trip"]
    assert len(seen.pop("_INBOX.operator.>", [])) == 1
    assert seen == {}
    breakers = await svc.jetstream().key_value("sb_breakers")
    assert (await breakers.get("agent.b")).revision == breaker_rev
    assert world.runs == {"echo": 0, "secret": 0, "cap": 0}
    policy = world.service("policy")
    assert policy.rejected["invalid_reply_subject"] == 7 * len(bad)
    await until_audited(audit_trail, "a", POLICY, 7 * len(bad))


async def test_a_colluding_target_cannot_turn_its_answer_into_an_admin_request(
    world: World, audit_trail: AuditTrail
) -> None:
    """a may call c; c answers with a SetBudget body. a names ``sb.admin.budgets.set`` as
    the reply: the policy service refuses the call, so c's answer never goes anywhere
    but a's inbox, and no budget is set."""
    svc, nc = world.svc, world.attacker
    watch = await Watch.on(svc, ("sb.admin.>", "$KV.sb_budgets.>", "sb.in.c.>"))
    await nc.publish("sb.out.a.c.cap", b"{}", reply="sb.admin.budgets.set")
    await nc.publish("sb.out.a.c.cap", b"{}", reply="sb.admin.budgets.set", headers={"x": "y"})
    # The sentinel: the same call, answered into a's inbox (c's body is harmless there).
    answer = await nc.request("sb.out.a.c.cap", b"{}", timeout=5)
    assert decode(answer.data, SetBudget).limit_usd == 1_000_000.0
    seen = await watch.seen()
    assert [data for _, data in seen.pop("sb.in.c.>", [])] == [b"{}"]  # the sentinel only
    assert seen == {}
    assert world.runs["cap"] == 1
    budgets = decode(
        (
            await ask(svc, "sb.admin.budgets.list", encode(ListBudgets()), inbox="_INBOX.operator")
        ).data,
        BudgetList,
    )
    assert budgets.budgets == ()
    with pytest.raises(NoKeysError):
        await (await svc.jetstream().key_value("sb_budgets")).keys()
    assert world.service("cost").rejected == {}  # the cost service saw nothing at all
    await until_audited(audit_trail, "a", POLICY, 2)
