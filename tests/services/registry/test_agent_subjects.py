"""Agent-scoped registry subjects: an agent registers, beats and deregisters only itself.

``sb.registry.{register,heartbeat,deregister}.<agent>`` carry the agent's name,
which the NATS server binds to the agent's credentials; the registry refuses a
body naming anyone else (``identity_mismatch``) before writing anything.
Operators deregister any agent through ``sb.admin.registry.deregister``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import nats.js.errors
import pytest

from broker.errors import ControlPlaneUnavailable, IdentityMismatch, InvalidInput, NotFound
from broker.replies import request
from broker.subjects import AGENT_REGISTRY_OPS, OPERATOR_INBOX, REGISTRY_READ_OPS, Subjects
from schemas import (
    AgentList,
    AgentManifest,
    AgentRecord,
    DeregisterAgent,
    GetAgent,
    Heartbeat,
    ListAgents,
    Registered,
)
from services.registry.service import RegistryService

if TYPE_CHECKING:
    from support import AgentFactory, AuditTrail, ServiceConnector, StackFactory


def registry_of(stack: object) -> RegistryService:
    service = stack.services["registry"]  # type: ignore[attr-defined]
    assert isinstance(service, RegistryService)
    return service


def manifest(name: str, version: str = "1.0.0") -> AgentManifest:
    return AgentManifest(name=name, version=version, owner="owner-1", team="team-1")


# -- subject builders ------------------------------------------------------------------------


def test_agent_scoped_subjects_end_in_the_agent_name() -> None:
    s = Subjects("acme")
    assert s.registry_for("register", "credit-check") == "acme.registry.register.credit-check"
    assert s.registry_for("heartbeat", "a") == "acme.registry.heartbeat.a"
    assert s.registry_for("deregister", "a") == "acme.registry.deregister.a"
    assert s.registry_wildcard("heartbeat") == "acme.registry.heartbeat.*"
    assert s.registry_changes == "acme.registry.changed"
    assert s.registry_of("a") == (
        "acme.registry.register.a",
        "acme.registry.heartbeat.a",
        "acme.registry.deregister.a",
        "acme.registry.get.a",
        "acme.registry.list.a",
        "acme.registry.discover.a",
    )
    assert set(AGENT_REGISTRY_OPS).isdisjoint(REGISTRY_READ_OPS)
    # Reads too: the registry must know who asks to answer only into its inbox.
    assert s.registry_for("get", "a") == "acme.registry.get.a"


@pytest.mark.parametrize("op", ["changed", "register.x", "*", "enroll"])
def test_only_registry_operations_get_an_agent_subject(op: str) -> None:
    with pytest.raises(InvalidInput) as err:
        Subjects("sb").registry_for(op, "a")
    assert err.value.details == {"op": op}


@pytest.mark.parametrize("agent", ["a.b", "*", ">", ""])
def test_an_agent_subject_needs_a_valid_name(agent: str) -> None:
    with pytest.raises(InvalidInput):
        Subjects("sb").registry_for("register", agent)


# -- the registry ----------------------------------------------------------------------------


async def test_registering_another_name_on_ones_own_subject_fails_and_writes_nothing(
    make_stack: StackFactory, make_agent: AgentFactory, audit_trail: AuditTrail
) -> None:
    registry = registry_of(await make_stack(services=["tracing", "registry"]))
    mallory = make_agent("mallory", heartbeat_interval=0)
    await mallory.start()  # registered itself, on its own subject
    subject = mallory.subjects.registry_for("register", "mallory")
    with pytest.raises(IdentityMismatch) as err:
        await request(mallory.nc, subject, manifest("credit-check"), Registered)
    assert err.value.code == "identity_mismatch"
    assert err.value.details == {
        "path": "$.name",
        "field": "name",
        "name": "credit-check",
        "subject_agent": "mallory",
        "op": "register",
    }
    # Nothing written: not in the store, the index or the KV mirror.
    with pytest.raises(NotFound):
        await request(
            mallory.nc, "sb.registry.get.mallory", GetAgent(name="credit-check"), AgentRecord
        )
    listed = await request(mallory.nc, "sb.registry.list.mallory", ListAgents(), AgentList)
    assert [r.manifest.name for r in listed.agents] == ["mallory"]
    assert registry.store.names() == ["mallory"]
    with pytest.raises(nats.js.errors.KeyNotFoundError):
        await registry.kv.get("credit-check")
    assert registry.rejected["identity_mismatch"] == 1
    [rejected] = await audit_trail.wait_for(
        lambda r: r.kind == "rejected" and r.data["code"] == "identity_mismatch"
    )
    assert rejected.subject == "sb.registry.register.mallory"
    assert rejected.data["details"]["name"] == "credit-check"


async def test_heartbeats_and_deregistrations_for_someone_else_are_refused(
    make_stack: StackFactory, make_agent: AgentFactory
) -> None:
    # No flush during the test: what is pending is what was accepted.
    stack = await make_stack(services=["tracing", "registry"], heartbeat_flush_interval=3600)
    registry = registry_of(stack)
    victim = make_agent("credit-check", heartbeat_interval=0)
    mallory = make_agent("mallory", heartbeat_interval=0)
    await victim.start()
    await mallory.start()
    beat = Heartbeat(name="credit-check", version="1.0.0", instance="fake")
    with pytest.raises(IdentityMismatch):
        await request(
            mallory.nc, mallory.subjects.registry_for("heartbeat", "mallory"), beat, AgentRecord
        )
    with pytest.raises(IdentityMismatch):
        await request(
            mallory.nc,
            mallory.subjects.registry_for("deregister", "mallory"),
            DeregisterAgent(name="credit-check"),
            AgentRecord,
        )
    assert registry.rejected["identity_mismatch"] == 2
    record = await victim.heartbeat()  # still registered, and the fake instance never counted
    assert (record.status, record.instances) == ("active", 1)
    assert registry.pending_heartbeats == 1  # the victim's own beat only


async def test_an_agent_deregisters_itself_and_its_heartbeats_stop_counting(
    make_stack: StackFactory, make_agent: AgentFactory, audit_trail: AuditTrail
) -> None:
    await make_stack(services=["tracing", "registry"])
    agent = make_agent("credit-check", heartbeat_interval=0)
    await agent.start()
    gone = await agent.deregister()
    assert (gone.status, gone.manifest.version) == ("deregistered", "1.0.0")
    with pytest.raises(NotFound):
        await agent.heartbeat()
    with pytest.raises(NotFound):
        await agent.deregister()
    [event] = await audit_trail.wait_for(
        lambda r: r.kind == "registry" and r.data["op"] == "deregister"
    )
    assert event.subject == "sb.registry.deregister.credit-check"
    assert event.data["by"] == "agent"


async def test_operators_deregister_any_agent_on_the_admin_subject(
    make_stack: StackFactory,
    make_agent: AgentFactory,
    service_nc: ServiceConnector,
    audit_trail: AuditTrail,
) -> None:
    registry = registry_of(await make_stack(services=["tracing", "registry"]))
    await registry.register(manifest("credit-check", "1.0.0"))
    await registry.register(manifest("credit-check", "2.0.0"))
    nc = await service_nc(inbox_prefix=OPERATOR_INBOX)  # an operator's reply space
    admin = "sb.admin.registry.deregister"
    gone = await request(nc, admin, DeregisterAgent(name="credit-check"), AgentRecord)
    assert (gone.status, gone.manifest.version) == ("deregistered", "1.0.0")  # the last removed
    assert registry.store.names() == []
    with pytest.raises(NotFound):
        await request(nc, admin, DeregisterAgent(name="credit-check"), AgentRecord)
    [event] = await audit_trail.wait_for(
        lambda r: r.kind == "registry" and r.data["op"] == "deregister"
    )
    assert event.subject == admin
    assert (event.data["by"], event.data["versions"]) == ("operator", ["2.0.0", "1.0.0"])


@pytest.mark.parametrize("op", AGENT_REGISTRY_OPS)
async def test_the_unscoped_agent_subjects_have_no_responder(
    make_stack: StackFactory, service_nc: ServiceConnector, op: str
) -> None:
    await make_stack(services=["tracing", "registry"])
    nc = await service_nc()
    with pytest.raises(ControlPlaneUnavailable):
        await request(nc, f"sb.registry.{op}", manifest("credit-check"), Registered)
