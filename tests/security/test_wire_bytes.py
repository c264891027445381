"""Bytes no client library would send: no input stops a service's (or an agent's) reads.

nats-server relays subjects, reply subjects and header blocks as bytes: invalid
UTF-8, control characters, 4 KB subjects, broken status lines and 20,000
header lines all reach the subscribers. nats-py decodes some of them in its
read loop, where an exception used to end the loop and leave the connection
deaf for minutes. These attacks are made with a raw TCP client holding agent
``a``'s credential (the server's permissions still apply: everything sent is
on subjects ``a`` may publish); after each batch every service must still
answer at once, nothing may have been answered into a malformed reply
subject, and each dropped message is audited with its sender (``rejected``,
``schema_error``, "dropped unread").
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

import msgspec
import pytest

from broker import Agent
from broker.codec import encode
from broker.connection import SessionClient, sync_connection
from broker.runtime.identity import service_connect_options
from broker.runtime.jetstream import USAGE_STREAM
from broker.settings import Settings
from schemas import AuditEvent, AuthzRequest, GetAgent, Heartbeat, ListAgents
from services.cost.service import CONSUMER as COST_CONSUMER
from services.runner import Stack

if TYPE_CHECKING:
    from support import AgentFactory, AuditTrail, ServiceConnector, StackFactory

from support import enroll, eventually

# -- a raw NATS client: the protocol by hand --------------------------------------------------


@dataclass
class WireMsg:
    subject: bytes
    reply: bytes
    headers: bytes
    payload: bytes


@dataclass
class WireClient:
    """A NATS connection speaking the text protocol over a bare socket, so any byte can
    be sent. Collects what the server sends: messages, ``-ERR`` lines, ``PONG``s."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    msgs: list[WireMsg] = field(default_factory=list)
    errors: list[bytes] = field(default_factory=list)
    pongs: asyncio.Queue[None] = field(default_factory=asyncio.Queue)
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None

    @classmethod
    async def open(cls, url: str, **auth: Any) -> WireClient:
        """Connect, read INFO, send CONNECT (``auth``: ``auth_token`` or ``user``/``pass``)
        and a PING; returns once the server answered PONG (so it accepted the credential)."""
        where = urlparse(url)
        reader, writer = await asyncio.open_connection(where.hostname, where.port)
        info = await asyncio.wait_for(reader.readline(), 5)
        assert info.startswith(b"INFO "), info
        connect = {
            "verbose": False, "pedantic": False, "headers": True, "protocol": 1,
            "name": "wire-attacker", **auth,
        }  # fmt: skip
        writer.write(b"CONNECT " + json.dumps(connect).encode() + b"\r\n")
        client = cls(reader, writer)
        client.task = asyncio.ensure_future(client._read())
        await client.ping()
        return client

    async def _read(self) -> None:
        try:
            while True:
                line = await self.reader.readline()
                if not line:
                    return
                op, _, rest = line.rstrip(b"\r\n").partition(b" ")
                if op == b"PING":
                    self.writer.write(b"PONG\r\n")
                elif op == b"PONG":
                    self.pongs.put_nowait(None)
                elif op == b"-ERR":
                    self.errors.append(rest)
                elif op in (b"MSG", b"HMSG"):
                    args = rest.split(b" ")
                    total = int(args[-1])
                    hlen = int(args[-2]) if op == b"HMSG" else 0
                    reply = args[2] if len(args) == (5 if op == b"HMSG" else 4) else b""
                    body = (await self.reader.readexactly(total + 2))[:total]
                    self.msgs.append(WireMsg(args[0], reply, body[:hlen], body[hlen:]))
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            self.closed.set()

    def send(self, raw: bytes) -> None:
        self.writer.write(raw)

    def pub(self, subject: bytes, payload: bytes, reply: bytes = b"") -> None:
        """``PUB``: a message, any bytes in its subject and reply subject."""
        args = b" ".join(x for x in (subject, reply, str(len(payload)).encode()) if x)
        self.send(b"PUB " + args + b"\r\n" + payload + b"\r\n")

    def hpub(self, subject: bytes, headers: bytes, payload: bytes, reply: bytes = b"") -> None:
        """``HPUB``: a message with a header block of any bytes."""
        sizes = f"{len(headers)} {len(headers) + len(payload)}".encode()
        args = b" ".join(x for x in (subject, reply, sizes) if x)
        self.send(b"HPUB " + args + b"\r\n" + headers + payload + b"\r\n")

    def sub(self, subject: bytes, sid: int) -> None:
        self.send(b"SUB " + subject + b" " + str(sid).encode() + b"\r\n")

    async def ping(self) -> None:
        """Round trip: once the PONG is back, the server has processed all we sent."""
        self.send(b"PING\r\n")
        await self.writer.drain()
        pong = asyncio.ensure_future(self.pongs.get())
        closed = asyncio.ensure_future(self.closed.wait())
        done, _ = await asyncio.wait({pong, closed}, timeout=10, return_when="FIRST_COMPLETED")
        for waiter in (pong, closed):
            waiter.cancel()
        assert pong in done, f"no PONG from the server; errors: {self.errors}"

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(Exception):
            await self.writer.wait_closed()
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task

    def replies_to(self, prefix: bytes) -> list[WireMsg]:
        return [m for m in self.msgs if m.subject.startswith(prefix)]


# -- the stack and its checks ---------------------------------------------------------------


class Echo(msgspec.Struct):
    text: str


@dataclass
class World:
    stack: Stack
    settings: Settings
    a: Agent
    b: Agent
    wire: WireClient
    served: list[str]

    def service(self, name: str) -> Any:
        return self.stack.services[name]


@pytest.fixture
async def world(
    make_stack: StackFactory, make_agent: AgentFactory, settings: Settings
) -> AsyncIterator[World]:
    stack = await make_stack(allow=[("a", "b", ["echo"])], refusal_summary_window=0.5)
    served: list[str] = []
    b = make_agent("b", heartbeat_interval=0)

    @b.capability("echo")
    async def echo(req: Echo) -> Echo:
        served.append(req.text)
        return req

    a = make_agent("a", heartbeat_interval=0)
    await b.start()
    await a.start()
    assert settings.nats_url is not None
    wire = await WireClient.open(settings.nats_url, auth_token=enroll(settings, "a"))
    wire.sub(b"_INBOX.agent.a.>", 1)  # whatever any service answers to a, we see
    await wire.ping()
    yield World(stack, settings, a, b, wire, served)
    await wire.close()


async def still_serving(w: World, tag: str) -> None:
    """Every service answers at once: a mediated call, a registry read, an authorization."""
    assert await w.a.call("b", "echo", Echo(tag), returns=Echo, timeout=3) == Echo(tag)
    assert [r.manifest.name for r in (await w.a.discover(capability="echo")).agents] == ["b"]
    decision = await w.a.authorize("use_model", "gpt-4o", estimated_tokens=10, timeout=3)
    assert decision.effect == "deny"  # no rule allows it: an answer, not silence


def drops(records: list[AuditEvent], actor: str, prefixes: tuple[str, ...]) -> int:
    """Dropped messages the audit trail accounts for (firsts plus the rest of summaries)."""
    total = 0
    for r in records:
        if (r.kind, r.actor) != ("rejected", actor) or r.data.get("code") != "schema_error":
            continue
        if "dropped unread" not in r.data.get("message", ""):
            continue
        if not r.subject.startswith(prefixes):
            continue
        summary = r.data.get("summary")
        total += summary["count"] - 1 if summary else 1
    return total


async def until_dropped(trail: AuditTrail, actor: str, prefixes: tuple[str, ...], n: int) -> None:
    async def enough() -> bool:
        return drops(await trail.settle(), actor, prefixes) >= n

    await eventually(enough, f"{n} dropped messages of {actor} on {prefixes} audited")
    assert drops(trail.records, actor, prefixes) == n


LIST = encode(ListAgents())
AUTHZ = encode(AuthzRequest(action="use_model", resource="gpt-4o"))
ECHO = encode(Echo("garbage"))
BEAT = encode(Heartbeat(name="a", version="1.0.0", instance="wire"))
LONG = b"x" * 4000


# -- subjects and reply subjects ------------------------------------------------------------


async def test_malformed_subjects_and_replies_are_dropped_and_every_service_answers(
    world: World, audit_trail: AuditTrail
) -> None:
    w = world.wire
    # (subject, reply, payload): each is dropped by the service that receives it.
    registry = [
        (b"sb.registry.list.a", b"_INBOX.agent.a.\xff\xfe", LIST),
        (b"sb.registry.list.a", b"_INBOX.agent.a.\xc3\x28", LIST),  # invalid 2-byte sequence
        (b"sb.registry.list.a", b"_INBOX.agent.a.\x01\x02\x7f", LIST),  # control characters
        (b"sb.registry.list.a", b"_INBOX.agent.a.\x00", LIST),
        (b"sb.registry.list.a", b"_INBOX.agent.a." + LONG, LIST),  # 4 KB reply subject
        (b"sb.registry.heartbeat.a", b"_INBOX.agent.a.\xff", BEAT),
        (b"sb.registry.get.a", "_INBOX.agent.a.é".encode(), encode(GetAgent(name="b"))),
    ]
    policy = [
        (b"sb.out.a.\xff.score", b"_INBOX.agent.a.r1", ECHO),
        (b"sb.out.a.b\xfe.echo", b"_INBOX.agent.a.r2", ECHO),
        (b"sb.out.a.b.\xc3\x28", b"_INBOX.agent.a.r3", ECHO),
        (b"sb.out.a.b\x01.echo", b"_INBOX.agent.a.r4", ECHO),
        (b"sb.out.a.b.echo\x7f", b"_INBOX.agent.a.r5", ECHO),
        (b"sb.out.a.b." + LONG, b"_INBOX.agent.a.r6", ECHO),  # 4 KB subject
        (b"sb.out.a." + LONG + b".echo", b"_INBOX.agent.a.r7", ECHO),
        (b"sb.out.a.b.echo", b"_INBOX.agent.a.\xff\xfe", ECHO),
        (b"sb.authz.a", b"_INBOX.agent.a.\xff\xfe", AUTHZ),
        (b"sb.authz.a", b"_INBOX.agent.a.\x1b[31m", AUTHZ),
        (b"sb.authz.a", b"_INBOX.agent.a." + LONG, AUTHZ),
    ]
    for subject, reply, payload in registry + policy:
        w.pub(subject, payload, reply)
    await w.ping()
    assert w.errors == []  # all of it was the agent's to publish
    # Sentinels on the same subscriptions, after the garbage: answered.
    w.pub(b"sb.registry.list.a", LIST, b"_INBOX.agent.a.s1")
    w.pub(b"sb.authz.a", AUTHZ, b"_INBOX.agent.a.s2")
    w.pub(b"sb.out.a.b.echo", encode(Echo("sentinel")), b"_INBOX.agent.a.s3")
    await eventually(lambda: len(w.msgs) >= 3, "the sentinels' answers")
    assert sorted(m.subject for m in w.msgs) == [
        b"_INBOX.agent.a.s1", b"_INBOX.agent.a.s2", b"_INBOX.agent.a.s3",
    ]  # fmt: skip
    assert world.served == ["sentinel"]  # b never saw the garbage
    await still_serving(world, "after-subjects")
    assert world.service("registry").nc.malformed == len(registry)
    assert world.service("policy").nc.malformed == len(policy)
    assert world.service("registry").rejected["schema_error"] == len(registry)
    assert world.service("policy").rejected["schema_error"] == len(policy)
    await until_dropped(audit_trail, "a", ("sb.registry.",), len(registry))
    await until_dropped(audit_trail, "a", ("sb.out.", "sb.authz."), len(policy))


# -- header blocks --------------------------------------------------------------------------

#: Header blocks nats-py cannot read: the message is dropped (no answer), never the loop.
UNREADABLE = (
    b"NATS/1.0 \xff\xfe\r\n\r\n",  # invalid UTF-8 in the status line
    b"NATS/1.0 503 \xff\xfe\r\n\r\n",  # ... in its description
    b"NATS/1.0 100 \xc3\x28\r\nX-A: b\r\n\r\n",  # ... followed by header lines
    b"NATS\r\n\r\n",  # shorter than the version line
)
#: Header blocks that are read (bad names skipped, bad values replaced): answered.
READABLE = (
    b"NATS/1.0\r\n\xff\xfe: v\r\n\r\n",  # invalid UTF-8 in a name
    b"NATS/1.0\r\nX-A: \xff\xfe\r\n\r\n",  # ... in a value
    b"NATS/1.0\r\nX A: v\r\n:\r\nno colon\r\n\x00\x01: \x02\r\n\r\n",
    b"NATS/1.0\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(20_000)) + b"\r\n",
    b"NATS/1.0\r\nSb-Caller: b\r\nSb-Chain: b,c\r\nSb-Chain-Sig: \xff\r\nStatus: 503\r\n\r\n",
)


async def test_unreadable_header_blocks_are_dropped_and_every_service_answers(
    world: World, audit_trail: AuditTrail
) -> None:
    w = world.wire
    targets = [
        (b"sb.registry.list.a", LIST),
        (b"sb.registry.heartbeat.a", BEAT),
        (b"sb.out.a.b.echo", ECHO),
        (b"sb.authz.a", AUTHZ),
    ]
    expected: set[bytes] = set()
    for t, (subject, payload) in enumerate(targets):
        for i, block in enumerate(UNREADABLE):
            w.hpub(subject, block, payload, b"_INBOX.agent.a.bad.%d.%d" % (t, i))
        for i, block in enumerate(READABLE):
            reply = b"_INBOX.agent.a.good.%d.%d" % (t, i)
            w.hpub(subject, block, payload, reply)
            expected.add(reply)
    await w.ping()
    assert w.errors == []
    # The readable ones are answered (the last one sent on each subject is the sentinel
    # for the unreadable ones before it); the unreadable ones never are.
    await eventually(lambda: len(w.msgs) >= len(expected), "answers to the readable blocks")
    assert {m.subject for m in w.msgs} == expected
    assert world.served == ["garbage"] * len(READABLE)
    await still_serving(world, "after-headers")
    n = len(UNREADABLE)
    assert world.service("registry").nc.malformed == 2 * n
    assert world.service("policy").nc.malformed == 2 * n
    await until_dropped(audit_trail, "a", ("sb.registry.",), 2 * n)
    await until_dropped(audit_trail, "a", ("sb.out.", "sb.authz."), 2 * n)


async def test_unreadable_usage_reports_do_not_stall_metering(
    world: World, service_nc: ServiceConnector, audit_trail: AuditTrail
) -> None:
    """``sb.usage.<agent>`` is stored (``SB_USAGE``) before the cost service reads it. A
    report whose header block the cost service's client cannot read is dropped and
    terminated: never acked, it would be redelivered forever, each holding a slot of the
    consumer's unacked window (4,096 of them stopped all metering)."""
    w = world.wire
    for block in UNREADABLE:
        w.hpub(b"sb.usage.a", block, b"{}")
    for _ in range(20):  # JetStream delivers this one as sent: too short to read
        w.hpub(b"sb.usage.a", b"NATS\r\n\r\n", b"{}")
    await w.ping()
    assert w.errors == []
    cost = world.service("cost")
    await world.a.report_usage(model="gpt-4o", input_tokens=10, output_tokens=5)
    await eventually(lambda: cost.metered == 1, "the valid report metered")
    js = (await service_nc()).jetstream()

    async def settled() -> bool:
        info = await js.consumer_info(USAGE_STREAM, COST_CONSUMER)
        return info.num_ack_pending == 0 and info.num_pending == 0

    await eventually(settled, "no report left unacked on the cost consumer")
    assert cost.nc.malformed >= 20
    await until_dropped(audit_trail, "a", ("sb.usage.a",), cost.nc.malformed)
    await still_serving(world, "after-usage")


# -- an agent's own connection ---------------------------------------------------------------


async def test_an_sdk_agent_keeps_serving_after_garbage_on_its_call_subjects(
    world: World, settings: Settings
) -> None:
    """Only services may publish on ``sb.in.<agent>.…``: a service's credential sends b
    the garbage an attacker would need the policy service to relay."""
    assert settings.nats_url is not None
    options = service_connect_options(settings)
    svc = await WireClient.open(
        settings.nats_url, user=options["user"], **{"pass": options["password"]}
    )
    try:
        svc.pub(b"sb.in.b.echo", ECHO, b"_INBOX.agent.a.\xff\xfe")
        svc.pub(b"sb.in.b.\xff", ECHO, b"_INBOX.agent.a.x")
        svc.pub(b"sb.in.b." + LONG, ECHO, b"_INBOX.agent.a.x")
        svc.pub(b"sb.in.b.\xc3\x28.1_0_0", ECHO, b"_INBOX.agent.a.x")  # a routed call
        for block in UNREADABLE:
            svc.hpub(b"sb.in.b.echo", block, ECHO, b"_INBOX.agent.a.x")
        await svc.ping()
        assert svc.errors == []
    finally:
        await svc.close()
    await still_serving(world, "after-inbound-garbage")
    assert isinstance(world.b.nc, SessionClient)
    assert world.b.nc.malformed == 4 + len(UNREADABLE)
    assert world.served == ["after-inbound-garbage"]


# -- the client class itself ----------------------------------------------------------------


async def test_the_session_client_drops_unreadable_messages_and_reads_on(
    settings: Settings, service_nc: ServiceConnector
) -> None:
    nc = await service_nc("reader")
    assert isinstance(nc, SessionClient)
    seen: list[tuple[bytes, bytes, str]] = []
    nc.on_malformed = lambda subject, reply, reason: seen.append((subject, reply, reason))
    sub = await nc.subscribe("test.read")
    await sync_connection(nc)
    assert settings.nats_url is not None
    options = service_connect_options(settings)
    wire = await WireClient.open(
        settings.nats_url, user=options["user"], **{"pass": options["password"]}
    )
    try:
        wire.pub(b"test.read", b"one", b"_INBOX.\xff\xfe")  # invalid UTF-8 reply
        wire.hpub(b"test.read", b"NATS/1.0 \xff\r\n\r\n", b"two")  # unreadable status line
        wire.pub(b"test.read", b"three")
        await wire.ping()
    finally:
        await wire.close()
    msg = await sub.next_msg(timeout=5)
    assert msg.data == b"three"
    assert nc.malformed == 2
    assert [(s, r) for s, r, _ in seen] == [(b"test.read", b"_INBOX.\xff\xfe"), (b"test.read", b"")]
    assert "printable ASCII" in seen[0][2] and "unreadable" in seen[1][2]
    assert nc.is_connected


async def test_the_read_loop_watchdog_reconnects_a_connection_whose_loop_ended(
    settings: Settings, service_nc: ServiceConnector
) -> None:
    reconnected = asyncio.Event()

    async def on_reconnect() -> None:
        reconnected.set()

    nc = await service_nc("watched", reconnected_cb=on_reconnect)
    assert isinstance(nc, SessionClient)
    sub = await nc.subscribe("test.watchdog")
    await sync_connection(nc)
    parser = nc._ps
    parse = parser.parse
    failures: list[int] = []

    async def broken_once(data: bytes = b"") -> None:
        if not failures:
            failures.append(len(data))
            raise RuntimeError("a bug in the parser")  # not a ProtocolError: the loop just ends
        await parse(data)

    parser.parse = broken_once  # type: ignore[method-assign]
    await nc.publish("test.watchdog", b"lost")  # its echo reaches the broken parser
    await asyncio.wait_for(reconnected.wait(), 10)
    assert failures
    await nc.publish("test.watchdog", b"after")
    while (msg := await sub.next_msg(timeout=5)).data != b"after":
        assert msg.data == b"lost"  # unless it came in the chunk the parser lost
    assert nc.is_connected
