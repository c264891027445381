"""Registry endpoints: validated registration, ownership, lookups, and nothing half-written."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, TypeVar

import msgspec
import nats
import pytest
from nats.aio.client import Client
from support import ask

from broker.codec import decode, encode
from broker.errors import Conflict, NotFound, SchemaError, SignalboxError
from broker.replies import H_ERROR, error_from_reply
from broker.runtime.identity import service_connect_options
from broker.settings import Settings
from broker.subjects import AGENT_REGISTRY_OPS, inbox_prefix
from schemas import (
    AgentList,
    AgentManifest,
    AgentRecord,
    Capability,
    DeregisterAgent,
    GetAgent,
    ListAgents,
    Registered,
)

if TYPE_CHECKING:
    from support import AuditTrail, StackFactory

T = TypeVar("T")


class Registry:
    """A raw nats-py client of the registry endpoints.

    Agent-scoped operations go to ``sb.registry.<op>.<agent>``, the agent
    being the name in the body (``credit-check`` for raw bodies) unless
    ``as_agent`` says otherwise.
    """

    def __init__(self, nc: Client) -> None:
        self.nc = nc

    async def send(
        self, op: str, body: Any, *, as_agent: str | None = None
    ) -> tuple[bytes, dict[str, str]]:
        data = body if isinstance(body, bytes) else encode(body)
        subject = f"sb.registry.{op}"
        if op in AGENT_REGISTRY_OPS:
            # As that agent: the registry answers only into the agent's own inbox.
            agent = as_agent or (body.name if not isinstance(body, bytes) else "credit-check")
            subject = f"{subject}.{agent}"
            reply = await ask(self.nc, subject, data, inbox=inbox_prefix(agent))
        else:
            reply = await self.nc.request(subject, data, timeout=5)
        return reply.data, reply.headers or {}

    async def ok(self, op: str, body: Any, returns: type[T], *, as_agent: str | None = None) -> T:
        data, headers = await self.send(op, body, as_agent=as_agent)
        assert H_ERROR not in headers, data
        return decode(data, returns)

    async def fails(self, op: str, body: Any, *, as_agent: str | None = None) -> SignalboxError:
        data, headers = await self.send(op, body, as_agent=as_agent)
        assert H_ERROR in headers, data
        return error_from_reply(data, headers)


@pytest.fixture
async def registry(make_stack: StackFactory, settings: Settings) -> AsyncIterator[Registry]:
    await make_stack(services=["tracing", "registry"])
    nc = await nats.connect(settings.nats_url or "", **service_connect_options(settings))
    yield Registry(nc)
    await nc.close()


def manifest(name: str = "credit-check", owner: str = "risk", **kw: Any) -> AgentManifest:
    return AgentManifest(name=name, version=kw.pop("version", "1.0.0"), owner=owner, team="risk",
                         capabilities=(Capability(name="score"),), **kw)  # fmt: skip


def raw_manifest(**overrides: Any) -> bytes:
    doc = msgspec.to_builtins(manifest())
    doc.update(overrides)
    return msgspec.json.encode({k: v for k, v in doc.items() if v is not ...})


async def test_register_then_get_returns_the_stored_record(registry: Registry) -> None:
    reg = await registry.ok("register", manifest(), Registered)
    assert reg.created
    assert (reg.name, reg.version) == ("credit-check", "1.0.0")
    record = await registry.ok("get", GetAgent(name="credit-check"), AgentRecord)
    assert record.manifest == manifest()
    assert record.status == "active"
    assert record.registered_at == reg.registered_at


async def test_registering_the_same_manifest_again_changes_nothing(registry: Registry) -> None:
    first = await registry.ok("register", manifest(), Registered)
    again = await registry.ok("register", manifest(), Registered)
    assert not again.created
    assert again.registered_at == first.registered_at


async def test_versions_coexist_and_get_returns_the_highest(registry: Registry) -> None:
    await registry.ok("register", manifest(), Registered)
    upgraded = await registry.ok("register", manifest(version="1.10.0"), Registered)
    assert upgraded.created
    await registry.ok("register", manifest(version="1.9.0"), Registered)
    record = await registry.ok("get", GetAgent(name="credit-check"), AgentRecord)
    assert record.manifest.version == "1.10.0"  # semver order, not string order
    old = await registry.ok("get", GetAgent(name="credit-check", version="1.0.0"), AgentRecord)
    assert old.manifest.version == "1.0.0"
    missing = await registry.fails("get", GetAgent(name="credit-check", version="2.0.0"))
    assert isinstance(missing, NotFound)
    assert "2.0.0" in missing.message


@pytest.mark.parametrize(
    ("body", "path", "mentions"),
    [
        (raw_manifest(name="credit.check"), "$.name", "regex"),
        (raw_manifest(name="credit check"), "$.name", "regex"),
        (raw_manifest(owner=...), "$", "owner"),
        (raw_manifest(version="one"), "$.version", "regex"),
        (raw_manifest(capabilities=[{"name": "a.b"}]), "$.capabilities[0].name", "regex"),
        (raw_manifest(type="agent_manifest.v9"), "$.type", "Invalid value"),
        (b"{not json", "$", "malformed"),
    ],
)
async def test_an_invalid_manifest_is_a_schema_error_with_the_path(
    registry: Registry, body: bytes, path: str, mentions: str
) -> None:
    err = await registry.fails("register", body)
    assert isinstance(err, SchemaError)
    assert err.details["path"] == path
    assert mentions in err.message
    listed = await registry.ok("list", ListAgents(), AgentList)
    assert listed.agents == ()  # nothing half-written


async def test_another_owner_cannot_take_a_registered_name(registry: Registry) -> None:
    await registry.ok("register", manifest(owner="risk"), Registered)
    before = await registry.ok("get", GetAgent(name="credit-check"), AgentRecord)
    err = await registry.fails("register", manifest(owner="mallory", version="9.9.9"))
    assert isinstance(err, Conflict)
    assert err.details == {"name": "credit-check", "owner": "risk"}
    assert "owned by 'risk'" in err.message
    after = await registry.ok("get", GetAgent(name="credit-check"), AgentRecord)
    assert after == before  # the stored record is untouched


async def test_list_filters_by_team_and_capability(registry: Registry) -> None:
    await registry.ok("register", manifest("credit-check"), Registered)
    await registry.ok(
        "register",
        AgentManifest(name="support", version="2.0.0", owner="cx", team="cx",
                      capabilities=(Capability(name="answer"),)),
        Registered,
    )  # fmt: skip
    everyone = await registry.ok("list", ListAgents(), AgentList)
    assert [r.manifest.name for r in everyone.agents] == ["credit-check", "support"]
    cx = await registry.ok("list", ListAgents(team="cx"), AgentList)
    assert [r.manifest.name for r in cx.agents] == ["support"]
    scorers = await registry.ok("list", ListAgents(capability="score"), AgentList)
    assert [r.manifest.name for r in scorers.agents] == ["credit-check"]
    nobody = await registry.ok("list", ListAgents(capability="fly"), AgentList)
    assert nobody.agents == ()


async def test_listing_an_empty_registry_is_empty(registry: Registry) -> None:
    assert (await registry.ok("list", ListAgents(), AgentList)).agents == ()


async def test_deregister_removes_the_agent(registry: Registry) -> None:
    await registry.ok("register", manifest(), Registered)
    gone = await registry.ok("deregister", DeregisterAgent(name="credit-check"), AgentRecord)
    assert gone.status == "deregistered"
    assert gone.manifest == manifest()
    assert isinstance(await registry.fails("get", GetAgent(name="credit-check")), NotFound)
    assert (await registry.ok("list", ListAgents(), AgentList)).agents == ()
    # The name is free again, for anyone.
    reg = await registry.ok("register", manifest(owner="someone-else"), Registered)
    assert reg.created


async def test_deregistering_an_unknown_agent_is_not_found(registry: Registry) -> None:
    err = await registry.fails("deregister", DeregisterAgent(name="ghost"))
    assert isinstance(err, NotFound)
    assert err.details["name"] == "ghost"
    await registry.ok("register", manifest(), Registered)
    wrong_version = await registry.fails(
        "deregister", DeregisterAgent(name="credit-check", version="0.0.1")
    )
    assert isinstance(wrong_version, NotFound)
    assert (await registry.ok("get", GetAgent(name="credit-check"), AgentRecord)).status == "active"


async def test_get_with_a_bad_name_is_a_schema_error(registry: Registry) -> None:
    err = await registry.fails("get", b'{"name": "a.*"}')
    assert isinstance(err, SchemaError)
    assert err.details["path"] == "$.name"


async def test_registry_changes_and_rejections_are_audited(
    registry: Registry, audit_trail: AuditTrail
) -> None:
    await registry.ok("register", manifest(), Registered)
    await registry.fails("register", manifest(owner="mallory"))
    await registry.ok("deregister", DeregisterAgent(name="credit-check"), AgentRecord)
    ops = await audit_trail.wait_for(lambda r: r.kind == "registry", count=2)
    assert [r.data["op"] for r in ops] == ["register", "deregister"]
    assert ops[0].data["capabilities"] == ["score"]
    assert ops[0].actor == "credit-check"
    [rejected] = await audit_trail.wait_for(lambda r: r.kind == "rejected")
    assert rejected.data["code"] == "conflict"
    assert rejected.subject == "sb.registry.register.credit-check"
    assert rejected.actor == "service:registry"


async def test_racing_registrations_of_one_name_have_one_winner(registry: Registry) -> None:
    owners = [f"owner-{i}" for i in range(8)]
    replies = await asyncio.gather(*(registry.send("register", manifest(owner=o)) for o in owners))
    won = [decode(d, Registered) for d, h in replies if H_ERROR not in h]
    lost = [error_from_reply(d, h) for d, h in replies if H_ERROR in h]
    assert len(won) == 1
    assert len(lost) == len(owners) - 1
    assert all(isinstance(e, Conflict) for e in lost)
    record = await registry.ok("get", GetAgent(name="credit-check"), AgentRecord)
    assert record.registered_at == won[0].registered_at
