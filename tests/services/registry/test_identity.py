"""Identity enforced by the NATS server, proved with raw nats-py clients.

Agent ``alice`` holds a credential of her own. With it, the server (not
Signalbox code) must refuse: publishing as ``bob``, reading bob's calls or
inbox, reading the audit stream, calling admin endpoints, and connecting
with an expired, revoked, forged or missing credential. Legitimate use
still works: calls through the policy, usage reports, discovery.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING

import msgspec
import nats
import nats.errors
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg

from broker.codec import encode
from broker.connection import connect, is_auth_error, sync_connection
from broker.errors import AuthenticationFailed
from broker.replies import request
from broker.runtime.identity import operator_connect_options
from broker.settings import Settings
from broker.subjects import inbox_prefix
from schemas import (
    AgentRecord,
    CredentialList,
    EnrollAgent,
    Enrolled,
    ListCredentials,
    RevokeAgent,
    Revoked,
)
from services.runner import Stack

if TYPE_CHECKING:
    from support import AgentFactory, AuditTrail, ServiceConnector, StackFactory

from support import RawAgent, enroll, eventually


class Echo(msgspec.Struct):
    text: str


@pytest.fixture
async def identity_stack(make_stack: StackFactory) -> Stack:
    """Tracing, registry (the auth callout) and policy; alice may call bob's echo."""
    return await make_stack(
        allow=[("alice", "bob", ["echo"])], services=["tracing", "registry", "policy"]
    )


@pytest.fixture
async def raw_alice(identity_stack: Stack, settings: Settings) -> AsyncIterator[RawAgent]:
    raw = RawAgent()
    assert settings.nats_url
    await raw.connect(settings.nats_url, "alice", enroll(settings, "alice"))
    yield raw
    if raw.nc is not None:
        await raw.nc.close()


@pytest.fixture
async def operator(identity_stack: Stack, settings: Settings) -> AsyncIterator[Client]:
    """An operator connection (the CLI's credentials from the secrets folder)."""
    options = operator_connect_options(settings)
    nc = await connect(settings.nats_url, name="test-operator", **options)
    yield nc
    await nc.close()


async def watch(nc: Client, subject: str) -> list[Msg]:
    """Collect what reaches ``subject`` (seen by a service connection)."""
    got: list[Msg] = []

    async def on_msg(msg: Msg) -> None:
        got.append(msg)

    await nc.subscribe(subject, cb=on_msg)
    await sync_connection(nc)
    return got


#: Alice's own outbound subject: hers to publish, so the server delivers it.
SENTINEL = "sb.out.alice.bob.echo"


async def after_sentinel(raw: RawAgent, seen: list[Msg]) -> list[str]:
    """Publish on :data:`SENTINEL` from ``raw``'s connection, wait until ``seen`` (one
    subscription covering it) has it, and return the subjects seen up to then.

    The server keeps one connection's messages in order to each subscription: whatever
    ``raw`` published before the sentinel, had the server let it through, has arrived
    by then. So "nothing else arrived" needs no pause.
    """
    assert raw.nc is not None
    await raw.nc.publish(SENTINEL, encode(Echo(text="sentinel")))
    await eventually(
        lambda: any(m.subject == SENTINEL for m in seen), "alice's sentinel to arrive", timeout=5
    )
    return [m.subject for m in seen]


# -- legitimate use -------------------------------------------------------------------------


async def test_agents_with_their_own_credentials_call_report_and_discover(
    identity_stack: Stack, make_agent: AgentFactory, audit_trail: AuditTrail
) -> None:
    bob = make_agent("bob")

    @bob.capability("echo")
    async def echo(req: Echo) -> Echo:
        return Echo(text=req.text.upper())

    alice = make_agent("alice")
    await bob.start()
    await alice.start()
    out = await alice.call("bob", "echo", Echo(text="hi"), returns=Echo, timeout=5)
    assert out.text == "HI"
    assert [r.manifest.name for r in (await alice.discover(capability="echo")).agents] == ["bob"]
    await alice.report_usage(model="gpt-4o", input_tokens=10, output_tokens=5)
    allowed = await audit_trail.wait_for(
        lambda r: r.kind == "auth" and r.data.get("outcome") == "allowed", count=2
    )
    assert {r.actor for r in allowed} >= {"alice", "bob"}


# -- what the server refuses --------------------------------------------------------------


async def test_agent_cannot_publish_as_another_agent(
    raw_alice: RawAgent, service_nc: ServiceConnector
) -> None:
    seen = await watch(await service_nc(), "sb.out.>")
    await raw_alice.violation(
        lambda nc: nc.publish("sb.out.bob.carol.echo", encode(Echo(text="x"))), "sb.out.bob."
    )
    # Her own outbound subject still works on the same connection, and arrives alone.
    assert await after_sentinel(raw_alice, seen) == [SENTINEL]


async def test_agent_cannot_register_or_heartbeat_as_another_agent(raw_alice: RawAgent) -> None:
    await raw_alice.violation(lambda nc: nc.publish("sb.registry.register.bob", b"{}"), "bob")
    await raw_alice.violation(lambda nc: nc.publish("sb.registry.heartbeat.bob", b"{}"), "bob")
    await raw_alice.violation(lambda nc: nc.publish("sb.usage.bob", b"{}"), "sb.usage.bob")


async def test_agent_cannot_read_another_agents_calls_or_inbox(raw_alice: RawAgent) -> None:
    await raw_alice.violation(lambda nc: nc.subscribe("sb.in.bob.>"), "sb.in.bob.>")
    await raw_alice.violation(lambda nc: nc.subscribe("sb.in.*.echo"), "sb.in.*.echo")
    await raw_alice.violation(
        lambda nc: nc.subscribe(f"{inbox_prefix('bob')}.>"), f"{inbox_prefix('bob')}.>"
    )
    await raw_alice.violation(lambda nc: nc.subscribe("_INBOX.>"), "_INBOX.>")
    await raw_alice.violation(lambda nc: nc.subscribe(">"), '">"')


async def test_agent_cannot_read_the_audit_stream(raw_alice: RawAgent) -> None:
    await raw_alice.violation(lambda nc: nc.subscribe("sb.audit.>"), "sb.audit.>")
    await raw_alice.violation(lambda nc: nc.subscribe("sb.audit.log.>"), "sb.audit.log.>")

    async def create_consumer(nc: Client) -> None:
        js = nc.jetstream(timeout=1.0)
        with pytest.raises((nats.errors.TimeoutError, nats.errors.Error, TimeoutError)):
            await js.pull_subscribe("sb.audit.log.>", stream="SB_AUDIT")

    await raw_alice.violation(create_consumer, "$JS.API.CONSUMER")

    async def read_message(nc: Client) -> None:
        js = nc.jetstream(timeout=1.0)
        with pytest.raises((nats.errors.TimeoutError, nats.errors.Error, TimeoutError)):
            await js.get_msg("SB_AUDIT", seq=1)

    await raw_alice.violation(read_message, "$JS.API.STREAM.MSG.GET.SB_AUDIT")


async def test_agent_cannot_call_admin_endpoints_or_change_policy(
    raw_alice: RawAgent, service_nc: ServiceConnector, settings: Settings
) -> None:
    seen = await watch(await service_nc(), "sb.>")  # admin subjects and the sentinel
    await raw_alice.violation(
        lambda nc: nc.publish("sb.admin.registry.enroll", encode(EnrollAgent(name="mallory"))),
        "sb.admin.registry.enroll",
    )
    await raw_alice.violation(lambda nc: nc.publish("sb.admin.policy.apply", b"{}"), "sb.admin.")
    # Writing the policy bucket directly is refused too.
    await raw_alice.violation(lambda nc: nc.publish("$KV.sb_policies.active", b"x"), "$KV.")
    arrived = await after_sentinel(raw_alice, seen)
    assert [subject for subject in arrived if subject.startswith("sb.admin.")] == []


async def test_no_forged_expired_or_missing_credential_connects(
    identity_stack: Stack, settings: Settings, audit_trail: AuditTrail
) -> None:
    assert settings.nats_url
    valid = enroll(settings, "alice")
    forged = valid[:-4] + ("AAAA" if not valid.endswith("AAAA") else "BBBB")
    expired = enroll(settings, "alice", ttl=0.001)
    await asyncio.sleep(0.01)
    for token in (None, "", "not-a-credential", forged, expired):
        with pytest.raises(nats.errors.Error) as info:
            await RawAgent().connect(settings.nats_url, "alice", token)
        assert is_auth_error(info.value), info.value
    # Failures are audited per source and window (docs/identity.md): a source's first
    # at once, the rest in its summary. The three tokens that name no credential share
    # the address's source; the forged and the expired one have a source each.
    refused = await audit_trail.wait_for(
        lambda r: r.kind == "auth" and r.data.get("outcome") == "refused", count=3
    )
    reasons = {r.data["reason"] for r in refused}
    assert reasons == {"missing", "wrong_secret", "expired"}
    callout = identity_stack.services["registry"].identity.callout  # type: ignore[attr-defined]
    assert callout.decisions["refused:missing"] == 2
    assert callout.decisions["refused:malformed"] == 1
    # The SDK's connect helper says so at once instead of retrying until its timeout.
    started = time.monotonic()
    with pytest.raises(AuthenticationFailed, match="refused the credentials"):
        await connect(settings.nats_url, name="agent-alice", token=expired, connect_timeout=20)
    assert time.monotonic() - started < 10


async def test_a_static_user_with_a_wrong_password_is_refused(
    identity_stack: Stack, settings: Settings
) -> None:
    assert settings.nats_url
    with pytest.raises(nats.errors.Error) as info:
        await RawAgent().connect(settings.nats_url, "x", None, user="sb-service", password="guess")
    assert is_auth_error(info.value)


# -- enrollment and revocation --------------------------------------------------------------


async def test_operator_enrolls_lists_and_revokes_and_the_agent_is_cut_off(
    operator: Client, settings: Settings, audit_trail: AuditTrail
) -> None:
    assert settings.nats_url
    enrolled = await request(
        operator, "sb.admin.registry.enroll", EnrollAgent(name="alice", note="t"), Enrolled
    )
    assert enrolled.token.startswith(f"sbc1.{enrolled.credential.id}.")
    listed = await request(
        operator, "sb.admin.registry.credentials", ListCredentials(name="alice"), CredentialList
    )
    assert [c.id for c in listed.items] == [enrolled.credential.id]
    assert enrolled.token not in encode(listed).decode()  # the secret is never shown again

    raw = RawAgent()
    closed = asyncio.Event()

    async def on_closed() -> None:
        closed.set()

    await raw.connect(settings.nats_url, "alice", enrolled.token, closed_cb=on_closed)
    revoked = await request(
        operator, "sb.admin.registry.revoke", RevokeAgent(name="alice", reason="test"), Revoked
    )
    assert revoked.credentials == (enrolled.credential.id,)
    assert revoked.disconnected == 1
    await asyncio.wait_for(closed.wait(), 5)  # the live connection was closed by the server
    with pytest.raises(nats.errors.Error) as info:
        await RawAgent().connect(settings.nats_url, "alice", enrolled.token)
    assert is_auth_error(info.value)
    await audit_trail.wait_for(
        lambda r: r.kind == "auth" and r.data.get("reason") == "revoked", count=1
    )
    await audit_trail.wait_for(lambda r: r.kind == "admin" and r.data.get("op") == "revoke")
    active = await request(
        operator, "sb.admin.registry.credentials", ListCredentials(name="alice"), CredentialList
    )
    assert active.items == ()


async def test_revoking_one_credential_leaves_the_others(
    operator: Client, settings: Settings
) -> None:
    assert settings.nats_url
    first = await request(operator, "sb.admin.registry.enroll", EnrollAgent(name="alice"), Enrolled)
    second = await request(
        operator, "sb.admin.registry.enroll", EnrollAgent(name="alice"), Enrolled
    )
    await request(
        operator,
        "sb.admin.registry.revoke",
        RevokeAgent(name="alice", credential=first.credential.id),
        Revoked,
    )
    with pytest.raises(nats.errors.Error):
        await RawAgent().connect(settings.nats_url, "alice", first.token)
    ok = RawAgent()
    await ok.connect(settings.nats_url, "alice", second.token)
    assert ok.nc is not None and ok.nc.is_connected
    await ok.nc.close()


async def test_enrollment_rejects_bad_names_with_a_structured_error(operator: Client) -> None:
    from broker.errors import SchemaError

    with pytest.raises(SchemaError) as info:
        await request(
            operator,
            "sb.admin.registry.enroll",
            {"type": "enroll_agent.v1", "name": "a.b"},
            Enrolled,
        )
    assert "name" in str(info.value.details)


async def test_sessions_expire_and_the_sdk_reconnects_with_its_credential(
    make_stack: StackFactory, make_agent: AgentFactory, settings: Settings
) -> None:
    stack = await make_stack(services=["tracing", "registry"], auth_session_ttl=1.0)
    reconnected = asyncio.Event()
    alice = make_agent("alice", heartbeat_interval=0, reconnected_cb=_set(reconnected))
    await alice.start()
    callout = stack.services["registry"].identity.callout  # type: ignore[attr-defined]
    assert callout is not None
    before = callout.decisions["allowed"]
    await asyncio.wait_for(reconnected.wait(), 10)  # the server closed it at the JWT's expiry
    assert callout.decisions["allowed"] > before  # ... and the credential was checked again
    assert (await alice.discover()).agents


def _set(event: asyncio.Event) -> Callable[[], Awaitable[None]]:
    async def cb() -> None:
        event.set()

    return cb


async def test_operator_credentials_are_limited_too(
    identity_stack: Stack, settings: Settings
) -> None:
    assert settings.nats_url
    raw = RawAgent()
    await raw.connect(settings.nats_url, "op", None, **operator_connect_options(settings))
    try:
        # Operators administer; they do not call or serve as agents.
        await raw.violation(lambda nc: nc.publish("sb.out.alice.bob.echo", b"x"), "sb.out.")
        await raw.violation(lambda nc: nc.subscribe("sb.in.bob.>"), "sb.in.bob.>")
    finally:
        assert raw.nc is not None
        await raw.nc.close()


async def test_a_revoked_sdk_agent_stays_out_and_backs_off(
    identity_stack: Stack, make_agent: AgentFactory, operator: Client
) -> None:
    stack = identity_stack
    disconnected = asyncio.Event()
    alice = make_agent("alice", heartbeat_interval=0, disconnected_cb=_set(disconnected))
    await alice.start()
    callout = stack.services["registry"].identity.callout  # type: ignore[attr-defined]
    revoked = await request(
        operator, "sb.admin.registry.revoke", RevokeAgent(name="alice"), Revoked
    )
    assert revoked.disconnected == 1
    await asyncio.wait_for(disconnected.wait(), 5)
    await asyncio.sleep(2.0)
    assert not alice.nc.is_connected
    # It keeps trying (the registry might have been down, or the server just
    # restarted: three quick retries 0.25 s apart), then backs off: 0.5 s, 1 s,
    # 2 s... not a refusal every quarter second.
    assert 1 <= callout.decisions["refused:revoked"] <= 6


async def test_deregistering_the_last_version_revokes_the_credentials(
    identity_stack: Stack, make_agent: AgentFactory, operator: Client, settings: Settings
) -> None:
    from schemas import DeregisterAgent

    disconnected = asyncio.Event()
    alice = make_agent("alice", heartbeat_interval=0, disconnected_cb=_set(disconnected))
    await alice.start()
    token = alice.connect_options["token"]
    await request(
        operator, "sb.admin.registry.deregister", DeregisterAgent(name="alice"), AgentRecord
    )
    await asyncio.wait_for(disconnected.wait(), 5)  # an operator's deregistration cuts it off
    assert settings.nats_url
    with pytest.raises(nats.errors.Error) as info:
        await RawAgent().connect(settings.nats_url, "alice", token)
    assert is_auth_error(info.value)
