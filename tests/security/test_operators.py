"""Operators are people with names: the actor of an admin action is who the NATS server
authenticated, never a body field; viewers only read; nobody acts as another operator."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import nats
import pytest
from nats.aio.client import Client
from pydantic import SecretStr
from support import RawAgent, eventually, registry_of

from broker.codec import encode
from broker.connection import connect
from broker.errors import AuthenticationFailed
from broker.replies import request
from broker.runtime.identity import operator_connect_options
from broker.settings import Settings
from schemas import (
    AddOperator,
    BudgetList,
    BudgetStatus,
    ListBudgets,
    ListOperators,
    OperatorAdded,
    OperatorList,
    OperatorRevoked,
    RevokeOperator,
    SetBudget,
)

if TYPE_CHECKING:
    from support import AuditTrail, StackFactory

pytestmark = pytest.mark.nats


@pytest.fixture
async def bootstrap(settings: Settings) -> AsyncIterator[Client]:
    """The shared bootstrap operator (secrets folder's operator.password)."""
    nc = await nats.connect(settings.nats_url or "", **operator_connect_options(settings))
    yield nc
    await nc.close()


async def _add(nc: Client, name: str, role: str, operator: str = "") -> OperatorAdded:
    subject = f"sb.admin.operators.add.{operator}" if operator else "sb.admin.operators.add"
    return await request(nc, subject, AddOperator(name=name, role=role), OperatorAdded)  # type: ignore[arg-type]


async def _as(settings: Settings, token: str, raw: RawAgent | None = None) -> Client:
    """Connect with a named operator's credential, as the CLI does."""
    named = settings.model_copy(update={"operator_credential": SecretStr(token)})
    options = operator_connect_options(named)
    if raw is not None:
        return await raw.connect(settings.nats_url or "", "unused", **options)
    return await connect(settings.nats_url, name="test-operator", **options)


async def test_a_named_operator_is_the_actor_whatever_the_body_says(
    make_stack: StackFactory, settings: Settings, bootstrap: Client, audit_trail: AuditTrail
) -> None:
    await make_stack(services=["tracing", "registry", "cost"])
    added = await _add(bootstrap, "ada", "admin")
    assert added.token.startswith("sbo1.ada.") and added.operator.role == "admin"
    ada = await _as(settings, added.token)
    try:
        status = await request(
            ada,
            "sb.admin.budgets.set.ada",
            SetBudget(scope="team", name="risk", window="day", limit_usd=5, requested_by="eve"),
            BudgetStatus,
        )
        # Not eve: the body's word is not an identity.
        assert status.budget.set_by == "operator:ada"
        [event] = await audit_trail.wait_for(
            lambda r: r.kind == "admin" and r.data.get("op") == "budget_set"
        )
        assert event.actor == "operator:ada"
    finally:
        await ada.close()
    # The bootstrap operator is a shared credential: its actions say so.
    shared = await request(
        bootstrap,
        "sb.admin.budgets.set",
        SetBudget(scope="team", name="risk", window="day", limit_usd=6, requested_by="eve"),
        BudgetStatus,
    )
    assert shared.budget.set_by == "bootstrap:eve"
    # And who added ada is recorded.
    listed = await request(bootstrap, "sb.admin.operators.list", ListOperators(), OperatorList)
    assert [(o.name, o.role, o.created_by) for o in listed.operators] == [
        ("ada", "admin", "bootstrap")
    ]


async def test_a_viewer_reads_but_cannot_change_anything(
    make_stack: StackFactory, settings: Settings, bootstrap: Client
) -> None:
    await make_stack(services=["tracing", "registry", "cost"])
    added = await _add(bootstrap, "val", "viewer")
    raw = RawAgent()
    val = await _as(settings, added.token, raw)
    try:
        listed = await request(val, "sb.admin.budgets.list.val", ListBudgets(), BudgetList)
        assert listed.budgets == ()
        body = SetBudget(scope="team", name="risk", window="day", limit_usd=1e6)
        await raw.violation(
            lambda nc: nc.publish("sb.admin.budgets.set.val", encode(body)), "sb.admin.budgets.set"
        )
        await raw.violation(
            lambda nc: nc.publish(
                "sb.admin.operators.add.val", encode(AddOperator(name="val2", role="admin"))
            ),
            "sb.admin.operators.add",
        )
    finally:
        await val.close()
    after = await request(bootstrap, "sb.admin.budgets.list", ListBudgets(), BudgetList)
    assert after.budgets == ()


@pytest.mark.parametrize(
    "subject",
    [
        "sb.admin.budgets.set.bob",  # as another operator
        "sb.admin.budgets.set",  # as the bootstrap operator
        "sb.registry.list",  # the bootstrap operator's registry reads
        "$KV.sb_budgets.team.risk.day",
    ],
)
async def test_an_operator_cannot_act_as_another(
    make_stack: StackFactory, settings: Settings, bootstrap: Client, subject: str
) -> None:
    await make_stack(services=["tracing", "registry", "cost"])
    added = await _add(bootstrap, "ada", "admin")
    raw = RawAgent()
    ada = await _as(settings, added.token, raw)
    try:
        body = SetBudget(scope="team", name="risk", window="day", limit_usd=1e6)
        await raw.violation(lambda nc: nc.publish(subject, encode(body)), subject.split(".")[0])
    finally:
        await ada.close()


async def test_replies_go_only_to_the_operators_own_inbox(
    make_stack: StackFactory, settings: Settings, bootstrap: Client
) -> None:
    stack = await make_stack(services=["tracing", "registry", "cost"])
    ada = await _as(settings, (await _add(bootstrap, "ada", "admin")).token)
    cost = stack.services["cost"]
    try:
        body = encode(SetBudget(scope="team", name="risk", window="day", limit_usd=1e6))
        # ada may publish on her subject, but names bob's inbox (or a KV key) as reply.
        await ada.publish("sb.admin.budgets.set.ada", body, reply="_INBOX.operator.bob.x")
        await eventually(lambda: cost.rejected["invalid_reply_subject"] == 1, "the refusal")
        listed = await request(ada, "sb.admin.budgets.list.ada", ListBudgets(), BudgetList)
        assert listed.budgets == ()  # refused before any work
    finally:
        await ada.close()


async def test_a_revoked_operator_is_cut_off_at_once(
    make_stack: StackFactory, settings: Settings, bootstrap: Client, audit_trail: AuditTrail
) -> None:
    stack = await make_stack(services=["tracing", "registry", "cost"])
    added = await _add(bootstrap, "ada", "admin")
    ada = await _as(settings, added.token)
    closed = ada.is_closed
    assert not closed
    revoked = await request(
        bootstrap, "sb.admin.operators.revoke", RevokeOperator(name="ada"), OperatorRevoked
    )
    assert revoked.credentials == (added.operator.id,)
    assert revoked.disconnected >= 1
    await eventually(lambda: not ada.is_connected, "ada's connection to close")
    await ada.close()
    with pytest.raises(AuthenticationFailed):
        await _as(settings, added.token)
    [event] = await audit_trail.wait_for(
        lambda r: r.kind == "admin" and r.data.get("op") == "operators.revoke"
    )
    assert event.actor == "bootstrap"
    assert registry_of(stack).identity.callout is not None
    refused: dict[str, Any] = dict(registry_of(stack).identity.callout.decisions)
    assert refused.get("refused:revoked", 0) >= 1
