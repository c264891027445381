"""NATS micro discovery ($SRV.PING/INFO/STATS) answered by the registry for its agents.

Requests go out from a plain nats-py connection exactly as the nats CLI sends
them: publish on ``$SRV.<VERB>[.<name>[.<id>]]`` with a reply inbox, collect
every reply. Instead of waiting for a quiet period, the collector waits until
the responders have handled the request and flushed their connections, then
flushes its own: every reply that will ever come has arrived by then.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import nats
import pytest
from nats.aio.client import Client
from nats.micro import add_service
from nats.micro.service import ServiceInfo, ServicePing, ServiceStats
from support import eventually

from broker.connection import sync_connection
from broker.runtime.identity import service_connect_options
from broker.runtime.server import EmbeddedServer
from broker.settings import Settings
from broker.subjects import Subjects
from schemas import AgentInstance, AgentManifest, AgentRecord, Capability, InstanceStats
from services.registry.micro import (
    QUEUE_GROUP,
    MicroInstance,
    MicroResponder,
    instances_from_records,
    rfc3339,
    stable_id,
)

SUBJECTS = Subjects("sb")
T0 = 1_714_564_800.25  # 2024-05-01T12:00:00.25Z

# The semver pattern the io.nats.micro.v1 schemas (and nats.go) require.
SEMVER = re.compile(
    r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)"
    r"(?:-((?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*)(?:\.(?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*))*))?"
    r"(?:\+([0-9a-zA-Z-]+(?:\.[0-9a-zA-Z-]+)*))?$"
)


def record(
    name: str,
    version: str = "1.0.0",
    *,
    caps: Sequence[Capability] = (Capability(name="score", tags=("pii", "pci-dss")),),
    status: str = "active",
    **kw: Any,
) -> AgentRecord:
    manifest = AgentManifest(
        name=name,
        version=version,
        owner=kw.pop("owner", "risk-owner"),
        team=kw.pop("team", "risk"),
        description=kw.pop("description", f"{name} agent"),
        region=kw.pop("region", "eu-west"),
        project=kw.pop("project", "lending"),
        capabilities=tuple(caps),
        **kw,
    )
    return AgentRecord(manifest=manifest, registered_at=T0, status=status)  # type: ignore[arg-type]


def instance(name: str, inst: str, version: str = "1.0.0", **stats: Any) -> AgentInstance:
    return AgentInstance(
        name=name,
        version=version,
        instance=inst,
        last_heartbeat=T0 + 10,
        stats=InstanceStats(**{"started": T0 + 1, **stats}),
    )


RECORDS = [
    record("credit-check", caps=(Capability(name="score", tags=("pii", "pci-dss")),
                                 Capability(name="explain", description="why"))),
    record("kyc", "2.1.0", caps=(Capability(name="verify"),)),
]  # fmt: skip
INSTANCES = [
    instance("credit-check", "inst-a", requests=10, errors=2, processing_time_ns=5_000_000,
             last_error="boom"),
    instance("credit-check", "inst-b", requests=3),
]  # fmt: skip


# -- the view (no server) ------------------------------------------------------------------


def test_each_live_instance_is_one_micro_instance_with_its_id_and_counters() -> None:
    view = instances_from_records(RECORDS, INSTANCES, SUBJECTS)
    assert [(i.name, i.id, i.version) for i in view] == [
        ("credit-check", "inst-a", "1.0.0"),
        ("credit-check", "inst-b", "1.0.0"),
        ("kyc", stable_id("kyc", "2.1.0"), "2.1.0"),
    ]
    a = view[0]
    assert (a.requests, a.errors, a.processing_time_ns, a.last_error) == (10, 2, 5_000_000, "boom")
    assert a.started == T0 + 1
    assert a.description == "credit-check agent"
    assert a.metadata == {
        "team": "risk", "owner": "risk-owner", "region": "eu-west", "project": "lending",
    }  # fmt: skip


def test_capabilities_are_endpoints_on_the_inbound_subjects_in_the_agent_queue_group() -> None:
    view = instances_from_records(RECORDS, INSTANCES, Subjects("acme"))
    eps = view[0].endpoints
    assert [(e.name, e.subject, e.queue_group) for e in eps] == [
        ("score", "acme.in.credit-check.score", "agent-credit-check"),
        ("explain", "acme.in.credit-check.explain", "agent-credit-check"),
    ]
    assert eps[0].metadata["tags"] == "pii,pci-dss"
    assert eps[1].metadata == {"tags": "", "description": "why"}


def test_a_version_with_no_instance_has_a_stable_id_and_zero_counters() -> None:
    first = instances_from_records(RECORDS, [], SUBJECTS)
    again = instances_from_records(list(reversed(RECORDS)), [], SUBJECTS)
    assert first == again
    kyc = first[1]
    assert kyc.id == stable_id("kyc", "2.1.0") != stable_id("kyc", "2.2.0")
    assert len(kyc.id) == 22
    assert (kyc.requests, kyc.errors, kyc.processing_time_ns, kyc.last_error) == (0, 0, 0, "")
    assert kyc.started == T0  # registration time


def test_deregistered_versions_and_instances_of_unknown_versions_are_left_out() -> None:
    records = [record("a"), record("b", status="deregistered"), record("a", "2.0.0")]
    instances = [instance("a", "x", version="9.9.9"), instance("b", "y"), instance("a", "z")]
    view = instances_from_records(records, instances, SUBJECTS)
    assert [(i.name, i.version, i.id) for i in view] == [
        ("a", "1.0.0", "z"),
        ("a", "2.0.0", stable_id("a", "2.0.0")),
    ]


def test_versions_micro_clients_would_reject_are_left_out() -> None:
    records = [record("a", "01.2.3"), record("a", "1.2.3-rc.1+build.7"), record("b", "1.0.0-..")]
    view = instances_from_records(records, [], SUBJECTS)
    assert [(i.name, i.version) for i in view] == [("a", "1.2.3-rc.1+build.7")]
    assert all(SEMVER.match(i.version) for i in view)


def test_signalbox_fields_win_over_free_metadata_of_the_same_name() -> None:
    view = instances_from_records(
        [record("a", metadata={"team": "spoofed", "tier": "gold"})], [], SUBJECTS
    )
    assert view[0].metadata["team"] == "risk"
    assert view[0].metadata["tier"] == "gold"


def test_an_instance_without_a_start_time_uses_its_heartbeat() -> None:
    view = instances_from_records([record("a")], [instance("a", "x", started=0.0)], SUBJECTS)
    assert view[0].started == T0 + 10


def test_rfc3339_is_utc_with_microseconds() -> None:
    assert rfc3339(T0) == "2024-05-01T12:00:00.250000Z"
    assert datetime.fromisoformat(rfc3339(T0)) == datetime.fromtimestamp(T0, UTC)


@pytest.mark.parametrize(
    "subject", ["$SRV", "$SRV.PING.a.b.c", "$SRV.SCHEMA", "$SRV.ping", "X.PING"]
)
def test_malformed_subjects_do_not_parse(subject: str) -> None:
    assert MicroResponder.parse(subject) is None


def test_well_formed_subjects_parse() -> None:
    assert MicroResponder.parse("$SRV.PING") == ("PING", None, None)
    assert MicroResponder.parse("$SRV.INFO.kyc") == ("INFO", "kyc", None)
    assert MicroResponder.parse("$SRV.STATS.kyc.abc") == ("STATS", "kyc", "abc")


# -- over a real server --------------------------------------------------------------------


class View:
    """A source whose answer the test changes (or makes fail)."""

    def __init__(self, instances: Sequence[MicroInstance]) -> None:
        self.instances = list(instances)
        self.error: Exception | None = None
        self.calls = 0

    async def __call__(self) -> Sequence[MicroInstance]:
        self.calls += 1
        if self.error is not None:
            raise self.error
        return self.instances


def _seen(responders: Sequence[MicroResponder]) -> int:
    return sum(r.handled + r.ignored for r in responders)


class Discovery:
    """A raw nats-py requester plus the responders under test."""

    def __init__(self, nc: Client, responders: list[MicroResponder]) -> None:
        self.nc = nc
        self.responders = responders

    async def request(self, subject: str) -> list[dict[str, Any]]:
        """Send one request the way `nats micro` does; every reply, parsed."""
        sub = await self.nc.subscribe(self.nc.new_inbox())
        before = _seen(self.responders)
        await self.nc.publish(subject, b"", reply=sub.subject)
        await eventually(
            lambda: _seen(self.responders) > before,
            f"a responder to take {subject}",
            interval=0.005,  # every discovery request waits here
        )
        # The responder has queued its replies: once the server has processed what
        # its connection sent, they are on their way to us, ahead of our PONG.
        for r in self.responders:
            await sync_connection(r.nc)
        await self.nc.flush()
        replies = [await sub.next_msg() for _ in range(sub.pending_msgs)]
        await sub.unsubscribe()
        return [json.loads(m.data) for m in replies]


ResponderFactory = Callable[[View], Awaitable[MicroResponder]]


@pytest.fixture
async def connections(
    fresh_server: EmbeddedServer, settings: Settings
) -> AsyncIterator[Callable[[], Awaitable[Client]]]:
    opened: list[Client] = []

    async def open_one() -> Client:
        nc = await nats.connect(fresh_server.url, **service_connect_options(settings))
        opened.append(nc)
        return nc

    yield open_one
    for nc in reversed(opened):
        await nc.close()


@pytest.fixture
async def responders(
    connections: Callable[[], Awaitable[Client]],
) -> AsyncIterator[tuple[list[MicroResponder], ResponderFactory]]:
    made: list[MicroResponder] = []

    async def make(view: View) -> MicroResponder:
        responder = MicroResponder(await connections(), view)
        await responder.start()
        made.append(responder)
        return responder

    yield made, make
    for r in made:
        await r.stop()


@pytest.fixture
async def discovery(
    connections: Callable[[], Awaitable[Client]],
    responders: tuple[list[MicroResponder], ResponderFactory],
) -> Discovery:
    made, _ = responders
    return Discovery(await connections(), made)


@pytest.fixture
async def view(responders: tuple[list[MicroResponder], ResponderFactory]) -> View:
    _, make = responders
    source = View(instances_from_records(RECORDS, INSTANCES, SUBJECTS))
    await make(source)
    return source


def _identity(reply: dict[str, Any]) -> tuple[str, str, str]:
    return reply["name"], reply["id"], reply["version"]


EXPECTED = [
    ("credit-check", "inst-a", "1.0.0"),
    ("credit-check", "inst-b", "1.0.0"),
    ("kyc", stable_id("kyc", "2.1.0"), "2.1.0"),
]


async def test_a_raw_srv_ping_gets_one_reply_per_instance(discovery: Discovery, view: View) -> None:
    replies = await discovery.request("$SRV.PING")
    assert sorted(_identity(r) for r in replies) == EXPECTED
    for r in replies:
        assert r["type"] == "io.nats.micro.v1.ping_response"
        assert set(r) == {"type", "name", "id", "version", "metadata"}
        assert SEMVER.match(r["version"])
        assert r["metadata"]["team"] in {"risk"}


async def test_info_lists_endpoints_with_subjects_and_queue_groups(
    discovery: Discovery, view: View
) -> None:
    replies = await discovery.request("$SRV.INFO")
    assert sorted(_identity(r) for r in replies) == EXPECTED
    info = next(r for r in replies if r["id"] == "inst-a")
    assert info["type"] == "io.nats.micro.v1.info_response"
    assert info["description"] == "credit-check agent"
    assert info["metadata"] == {
        "team": "risk", "owner": "risk-owner", "region": "eu-west", "project": "lending",
    }  # fmt: skip
    assert info["endpoints"] == [
        {"name": "score", "subject": "sb.in.credit-check.score",
         "queue_group": "agent-credit-check",
         "metadata": {"tags": "pii,pci-dss", "description": ""}},
        {"name": "explain", "subject": "sb.in.credit-check.explain",
         "queue_group": "agent-credit-check", "metadata": {"tags": "", "description": "why"}},
    ]  # fmt: skip


async def test_stats_carry_the_counters_and_an_rfc3339_start(
    discovery: Discovery, view: View
) -> None:
    replies = {r["id"]: r for r in await discovery.request("$SRV.STATS")}
    assert len(replies) == 3
    a = replies["inst-a"]
    assert a["type"] == "io.nats.micro.v1.stats_response"
    assert a["started"] == "2024-05-01T12:00:01.250000Z"
    assert datetime.fromisoformat(a["started"]).timestamp() == T0 + 1
    score, explain = a["endpoints"]
    # Instance totals sit on the first endpoint so a sum over endpoints is right.
    assert score == {
        "name": "score", "subject": "sb.in.credit-check.score",
        "queue_group": "agent-credit-check", "num_requests": 10, "num_errors": 2,
        "last_error": "boom", "processing_time": 5_000_000,
        "average_processing_time": 500_000, "data": {"scope": "instance"},
    }  # fmt: skip
    assert (explain["num_requests"], explain["processing_time"], explain["data"]) == (0, 0, {})
    kyc = replies[stable_id("kyc", "2.1.0")]
    assert kyc["started"] == "2024-05-01T12:00:00.250000Z"
    assert [e["num_requests"] for e in kyc["endpoints"]] == [0]
    for reply in replies.values():
        for e in reply["endpoints"]:
            for key in ("num_requests", "num_errors", "processing_time", "average_processing_time"):
                assert isinstance(e[key], int)


@pytest.mark.parametrize("verb", ["PING", "INFO", "STATS"])
async def test_a_name_narrows_to_that_agent_and_a_name_and_id_to_one_instance(
    discovery: Discovery, view: View, verb: str
) -> None:
    by_name = await discovery.request(f"$SRV.{verb}.credit-check")
    assert sorted(_identity(r) for r in by_name) == EXPECTED[:2]
    one = await discovery.request(f"$SRV.{verb}.credit-check.inst-b")
    assert [_identity(r) for r in one] == [EXPECTED[1]]
    idle = await discovery.request(f"$SRV.{verb}.kyc.{stable_id('kyc', '2.1.0')}")
    assert [_identity(r) for r in idle] == [EXPECTED[2]]


@pytest.mark.parametrize(
    "subject", ["$SRV.PING.nobody", "$SRV.INFO.kyc.inst-a", "$SRV.STATS.credit-check.nope"]
)
async def test_an_unknown_name_or_id_gets_no_reply(
    discovery: Discovery, view: View, subject: str
) -> None:
    assert await discovery.request(subject) == []
    assert view.calls == 1  # it was looked at, and nothing matched


@pytest.mark.parametrize("subject", ["$SRV.PING.credit-check.inst-a.extra", "$SRV.SCHEMA"])
async def test_malformed_requests_are_ignored_and_counted(
    discovery: Discovery, view: View, subject: str
) -> None:
    assert await discovery.request(subject) == []
    assert discovery.responders[0].ignored == 1
    assert view.calls == 0
    # Still serving.
    assert len(await discovery.request("$SRV.PING")) == 3


async def test_two_replicas_in_one_queue_group_answer_each_request_once(
    discovery: Discovery, responders: tuple[list[MicroResponder], ResponderFactory]
) -> None:
    _, make = responders
    instances = instances_from_records(RECORDS, INSTANCES, SUBJECTS)
    first, second = View(instances), View(instances)
    await make(first)
    await make(second)
    for _ in range(20):
        replies = await discovery.request("$SRV.PING")
        assert sorted(_identity(r) for r in replies) == EXPECTED
    assert first.calls + second.calls == 20
    assert QUEUE_GROUP == "sb-registry-micro"


async def test_a_failing_source_answers_nothing_and_the_responder_keeps_serving(
    discovery: Discovery, view: View
) -> None:
    view.error = RuntimeError("store unavailable")
    assert await discovery.request("$SRV.PING") == []
    assert discovery.responders[0].failed == 1
    view.error = None
    assert sorted(_identity(r) for r in await discovery.request("$SRV.PING")) == EXPECTED


async def test_a_source_returning_garbage_answers_nothing_and_the_responder_keeps_serving(
    discovery: Discovery, view: View
) -> None:
    good = view.instances
    view.instances = [None]  # type: ignore[list-item]
    assert await discovery.request("$SRV.INFO") == []
    assert discovery.responders[0].failed == 1
    view.instances = good
    assert len(await discovery.request("$SRV.INFO")) == 3


async def test_stop_unsubscribes(discovery: Discovery, view: View) -> None:
    responder = discovery.responders[0]
    await responder.stop()
    await responder.start()  # a stopped responder can start again
    assert len(await discovery.request("$SRV.PING")) == 3


# -- compatibility with nats.py's own micro package ----------------------------------------


async def test_replies_parse_with_nats_py_micro_types(discovery: Discovery, view: View) -> None:
    pings = [ServicePing.from_dict(r) for r in await discovery.request("$SRV.PING")]
    assert sorted((p.name, p.id, p.version) for p in pings) == EXPECTED
    infos = [ServiceInfo.from_dict(r) for r in await discovery.request("$SRV.INFO.credit-check")]
    assert {e.subject for i in infos for e in i.endpoints} == {
        "sb.in.credit-check.score", "sb.in.credit-check.explain",
    }  # fmt: skip
    stats = [ServiceStats.from_dict(r) for r in await discovery.request("$SRV.STATS.kyc")]
    assert len(stats) == 1
    assert stats[0].started == datetime(2024, 5, 1, 12, 0, 0, 250000)  # naive UTC, as nats.py
    assert stats[0].endpoints[0].queue_group == "agent-kyc"


async def test_replies_have_the_same_shape_as_a_real_nats_py_micro_service(
    discovery: Discovery, view: View, connections: Callable[[], Awaitable[Client]]
) -> None:
    nc = await connections()
    service = await add_service(nc, name="echo", version="1.0.0", description="d")

    async def echo(req: Any) -> None:
        await req.respond(req.data)

    await service.add_endpoint(name="echo", handler=echo, subject="echo", metadata={"k": "v"})
    await sync_connection(nc)  # nats-py's own flush does not make its subscriptions live
    try:
        for verb in ("PING", "INFO", "STATS"):
            # The real service answers by itself: our collector barrier only covers
            # the registry's reply, so ask it directly, by name.
            real = json.loads((await discovery.nc.request(f"$SRV.{verb}.echo", b"")).data)
            ours = (await discovery.request(f"$SRV.{verb}.kyc"))[0]
            assert set(ours) == set(real), verb
            assert ours["type"] == real["type"]
            for mine, theirs in zip(ours.get("endpoints", []), real.get("endpoints", []),
                                    strict=True):  # fmt: skip
                assert set(mine) == set(theirs), verb
                for key, value in theirs.items():
                    if isinstance(value, int):
                        assert isinstance(mine[key], int), (verb, key)
    finally:
        await service.stop()
