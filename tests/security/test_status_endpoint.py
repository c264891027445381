"""``sb.admin.<service>.status`` (every replica answers): operators only, replies only into
the asker's inbox, any bytes answered with a structured error. Raw nats-py clients."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import nats
import pytest
from nats.aio.client import Client
from pydantic import SecretStr
from support import RawAgent, enroll, eventually, policy_of

from broker.codec import encode
from broker.replies import H_ERROR, request
from broker.runtime.identity import operator_connect_options
from broker.settings import Settings
from schemas import AddOperator, HealthRequest, OperatorAdded, ServiceHealth

if TYPE_CHECKING:
    from support import StackFactory


@pytest.fixture
async def bootstrap(settings: Settings) -> AsyncIterator[Client]:
    nc = await nats.connect(settings.nats_url or "", **operator_connect_options(settings))
    yield nc
    await nc.close()


async def test_an_agent_cannot_ask_for_the_services_health(
    make_stack: StackFactory, settings: Settings
) -> None:
    await make_stack(services=["registry", "policy"])
    assert settings.nats_url
    raw = RawAgent()
    await raw.connect(settings.nats_url, "mallory", enroll(settings, "mallory"))
    try:
        for subject in ("sb.admin.policy.status", "sb.admin.policy.status.ada"):
            await raw.violation(
                lambda nc, s=subject: nc.publish(s, encode(HealthRequest())),
                subject,
            )
    finally:
        assert raw.nc is not None
        await raw.nc.close()


async def test_a_viewer_may_read_it_and_replies_go_only_to_the_askers_inbox(
    make_stack: StackFactory, settings: Settings, bootstrap: Client
) -> None:
    stack = await make_stack(services=["registry", "policy"])
    added = await request(
        bootstrap, "sb.admin.operators.add", AddOperator(name="val", role="viewer"), OperatorAdded
    )
    named = settings.model_copy(update={"operator_credential": SecretStr(added.token)})
    val = await nats.connect(settings.nats_url or "", **operator_connect_options(named))
    try:
        health = await request(val, "sb.admin.policy.status.val", HealthRequest(), ServiceHealth)
        assert health.service == "policy" and health.ready
    finally:
        await val.close()
    # The bootstrap operator pointing the reply at an agent's inbox: refused unanswered.
    policy = policy_of(stack)
    before = policy.rejected["invalid_reply_subject"]
    await bootstrap.publish(
        "sb.admin.policy.status", encode(HealthRequest()), reply="_INBOX.agent.victim.x"
    )
    await eventually(lambda: policy.rejected["invalid_reply_subject"] == before + 1, "the refusal")


@pytest.mark.parametrize("body", [b"", b"\xff\xfe", b"{" * 10_000, b'{"type":"nope.v9"}'])
async def test_any_bytes_get_a_structured_error(
    make_stack: StackFactory, bootstrap: Client, body: bytes
) -> None:
    await make_stack(services=["registry", "policy"])
    reply = await bootstrap.request("sb.admin.policy.status", body, timeout=5)
    assert reply.headers is not None and reply.headers[H_ERROR] in ("schema_error", "invalid_input")
