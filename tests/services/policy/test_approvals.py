"""Human approvals: a call that needs one is parked until an operator approves or denies it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec
import nats
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg
from support import policy_of
from typer.testing import Result

from broker import Agent, CallDenied
from broker.codec import decode, encode
from broker.connection import connect, sync_connection
from broker.errors import Conflict, SignalboxError
from broker.runtime.identity import operator_connect_options
from broker.settings import Settings
from broker.subjects import Subjects, inbox_prefix
from schemas import ApprovalList, ApprovalRequest, DecideApproval, ListApprovals
from services.cli.client import admin_request
from services.policy.approvals import binding_hash, requested_subject
from services.policy.decider import H_ESTIMATED_TOKENS
from services.runner import Stack

if TYPE_CHECKING:
    from support import AgentFactory, AuditTrail, ServiceConnector, StackFactory

RULES = """
@id("a-may-call-b")
permit (principal == Signalbox::Agent::"a", action == Signalbox::Action::"call", resource)
when { resource.owner == Signalbox::Agent::"b" };

@id("large-invocation-needs-approval")
@effect("needs_approval")
forbid (principal, action, resource) when { context.estimated_tokens > 10000 };
"""
BIG = {H_ESTIMATED_TOKENS: "20000"}
SUBJECTS = Subjects("sb")


class Desk:
    """An operator's view: requests as they are published, and the admin endpoints."""

    def __init__(self, stack: Stack, operator: Client) -> None:
        self.stack = stack
        self.operator = operator
        self.requested: asyncio.Queue[ApprovalRequest] = asyncio.Queue()

    async def on_requested(self, msg: Msg) -> None:
        await self.requested.put(decode(msg.data, ApprovalRequest))

    async def next(self) -> ApprovalRequest:
        return await asyncio.wait_for(self.requested.get(), 10)

    async def list(self, *, all: bool = False) -> tuple[ApprovalRequest, ...]:
        listed = await admin_request(
            self.operator, SUBJECTS, "list", ListApprovals(all=all), ApprovalList,
            service="approvals",
        )  # fmt: skip
        return listed.approvals

    async def decide(self, op: str, approval_id: str, **fields: Any) -> ApprovalRequest:
        return await admin_request(
            self.operator, SUBJECTS, op, DecideApproval(id=approval_id, **fields),
            ApprovalRequest, service="approvals",
        )  # fmt: skip


@pytest.fixture
async def desk(
    settings: Settings, service_nc: ServiceConnector, make_stack: StackFactory
) -> AsyncIterator[Desk]:
    """A running stack with :data:`RULES`, an operator connection, and a feed of requests.

    Operators may not subscribe to ``sb.approvals.requested`` (yet): the feed
    is read on a service connection.
    """
    stack = await make_stack(rules=RULES)
    assert settings.nats_url is not None
    operator = await connect(
        settings.nats_url, name="test-operator", **operator_connect_options(settings)
    )
    desk = Desk(stack, operator)
    feed = await service_nc("approvals-feed")
    await feed.subscribe(requested_subject("sb"), cb=desk.on_requested)
    await sync_connection(feed)
    yield desk
    await operator.close()


async def _agents(make_agent: AgentFactory) -> tuple[Agent, list[dict[str, Any]]]:
    """``b`` echoes and records what it served; returns the started caller ``a``."""
    served: list[dict[str, Any]] = []
    b = make_agent("b")

    @b.capability()
    async def echo(req: dict[str, Any]) -> dict[str, Any]:
        served.append(req)
        return req

    a = make_agent("a")
    await b.start()
    await a.start()
    return a, served


async def test_an_approved_call_reaches_the_target_once_and_everything_is_audited(
    desk: Desk, make_agent: AgentFactory, audit_trail: AuditTrail
) -> None:
    a, served = await _agents(make_agent)
    # Small calls need no approval.
    assert await a.call("b", "echo", {"n": 0}) == {"n": 0}

    call = asyncio.ensure_future(a.call("b", "echo", {"n": 1}, headers=BIG, timeout=10))
    request = await desk.next()
    assert (request.caller, request.target, request.capability) == ("a", "b", "echo")
    assert request.binding == binding_hash("a", "b", "echo", encode({"n": 1}))
    assert request.policy_ids == ("large-invocation-needs-approval",)
    assert request.status == "pending"
    assert request.requested_at < request.expires_at <= request.requested_at + 10
    assert [r.id for r in await desk.list()] == [request.id]
    assert served == [{"n": 0}]  # parked: not forwarded
    assert not call.done()

    approved = await desk.decide("approve", request.id, reason="checked", requested_by="ada")
    assert (approved.status, approved.decided_by) == ("approved", "bootstrap:ada")
    assert await call == {"n": 1}
    assert served == [{"n": 0}, {"n": 1}]

    assert await desk.list() == ()
    [stored] = await desk.list(all=True)
    assert (stored.id, stored.status, stored.reason) == (request.id, "used", "checked")
    assert stored.used_at >= stored.decided_at > 0
    # Used: it cannot be decided (or used) again.
    with pytest.raises(Conflict, match="already used"):
        await desk.decide("approve", request.id)

    asked = await audit_trail.wait_for(
        lambda r: r.kind == "decision" and r.data.get("approval_id") == request.id, count=2
    )
    effects = [(d.data["decision"]["effect"], d.data["decision"]["reason_code"]) for d in asked]
    assert effects == [("needs_approval", "needs_approval"), ("allow", "approved")]
    assert asked[1].data["approved_by"] == "bootstrap:ada"
    [admin] = await audit_trail.wait_for(
        lambda r: r.kind == "admin" and r.data.get("approval_id") == request.id
    )
    assert (admin.actor, admin.data["op"], admin.data["reason"]) == (
        "bootstrap:ada", "approvals.approve", "checked",
    )  # fmt: skip
    [outcome] = await audit_trail.wait_for(
        lambda r: r.kind == "call" and r.data.get("call_id") == request.call_id
    )
    assert outcome.data["ok"] is True


async def test_a_denied_call_is_refused_with_the_approval_id(
    desk: Desk, make_agent: AgentFactory
) -> None:
    a, served = await _agents(make_agent)
    call = asyncio.ensure_future(a.call("b", "echo", {"n": 1}, headers=BIG, timeout=10))
    request = await desk.next()
    denied = await desk.decide("deny", request.id, reason="too big", requested_by="ada")
    assert denied.status == "denied"
    with pytest.raises(CallDenied) as info:
        await call
    assert info.value.details["reason_code"] == "approval_denied"
    assert info.value.details["approval_id"] == request.id
    assert info.value.details["policy_ids"] == ["large-invocation-needs-approval"]
    assert "denied by bootstrap:ada: too big" in info.value.message
    assert served == []
    with pytest.raises(Conflict, match="already denied by bootstrap:ada"):
        await desk.decide("approve", request.id)


async def test_no_decision_before_the_callers_timeout_means_approval_expired(
    desk: Desk, make_agent: AgentFactory
) -> None:
    a, served = await _agents(make_agent)
    call = asyncio.ensure_future(a.call("b", "echo", {"n": 1}, headers=BIG, timeout=1.0))
    request = await desk.next()
    assert request.expires_at - request.requested_at == pytest.approx(0.9, abs=0.05)
    with pytest.raises(CallDenied) as info:
        await call  # refused by the policy service, not a bare SDK time-out
    assert info.value.details["reason_code"] == "approval_expired"
    assert info.value.details["approval_id"] == request.id
    assert "no operator decided before it expired" in info.value.message
    with pytest.raises(Conflict, match="already expired"):
        await desk.decide("approve", request.id)
    [stored] = await desk.list(all=True)
    assert stored.status == "expired"
    assert served == []


async def test_the_approval_timeout_setting_caps_how_long_a_call_is_parked(
    make_stack: StackFactory, make_agent: AgentFactory, settings: Settings
) -> None:
    stack = await make_stack(rules=RULES, approval_timeout=0.5)
    a, served = await _agents(make_agent)
    with pytest.raises(CallDenied) as info:
        await a.call("b", "echo", {"n": 1}, headers=BIG, timeout=30)
    assert info.value.details["reason_code"] == "approval_expired"
    assert served == []
    stats = policy_of(stack).stats
    assert (stats.parked, stats.denied, stats.approved) == (1, 1, 0)


async def test_an_approval_is_bound_to_its_call_and_never_reused(
    desk: Desk, make_agent: AgentFactory
) -> None:
    a, served = await _agents(make_agent)
    first = asyncio.ensure_future(a.call("b", "echo", {"n": 1}, headers=BIG, timeout=10))
    request = await desk.next()
    # An operator who checked another call's binding decides nothing.
    other = binding_hash("a", "b", "echo", encode({"n": 2}))
    with pytest.raises(Conflict, match="binding hash differs"):
        await desk.decide("approve", request.id, binding=other)
    await desk.decide("approve", request.id, binding=request.binding)
    assert await first == {"n": 1}

    # The same call again, and one with other arguments: each is parked anew.
    again = asyncio.ensure_future(a.call("b", "echo", {"n": 1}, headers=BIG, timeout=10))
    changed = asyncio.ensure_future(a.call("b", "echo", {"n": 2}, headers=BIG, timeout=10))
    bindings = {(await desk.next()).binding for _ in range(2)}
    pending = await desk.list()
    assert len(pending) == 2 and request.id not in {p.id for p in pending}
    assert bindings == {request.binding, other}
    assert not again.done() and not changed.done()
    assert served == [{"n": 1}]
    for p in pending:
        await desk.decide("deny", p.id)
    for call in (again, changed):
        with pytest.raises(CallDenied, match="approval was denied"):
            await call
    assert served == [{"n": 1}]


async def test_two_operators_deciding_at_once_one_wins(
    desk: Desk, make_agent: AgentFactory
) -> None:
    a, served = await _agents(make_agent)
    for _ in range(3):
        call = asyncio.ensure_future(a.call("b", "echo", {"n": 1}, headers=BIG, timeout=10))
        request = await desk.next()
        results = await asyncio.gather(
            desk.decide("approve", request.id, requested_by="ada"),
            desk.decide("deny", request.id, requested_by="bob"),
            return_exceptions=True,
        )
        won = [r for r in results if isinstance(r, ApprovalRequest)]
        lost = [r for r in results if isinstance(r, SignalboxError)]
        assert len(won) == 1 and len(lost) == 1
        assert isinstance(lost[0], Conflict)
        if won[0].status == "approved":
            assert await call == {"n": 1}
        else:
            with pytest.raises(CallDenied):
                await call
    assert len(served) == sum(1 for r in await desk.list(all=True) if r.status == "used")


async def test_an_agent_can_neither_decide_nor_watch_approvals(
    desk: Desk, settings: Settings, make_agent: AgentFactory
) -> None:
    from support import enroll

    errors: asyncio.Queue[Exception] = asyncio.Queue()

    async def on_error(exc: Exception) -> None:
        await errors.put(exc)

    assert settings.nats_url is not None
    nc = await nats.connect(
        settings.nats_url, token=enroll(settings, "a"), inbox_prefix=inbox_prefix("a"),
        error_cb=on_error, allow_reconnect=False,
    )  # fmt: skip
    try:
        approve = SUBJECTS.admin("approvals", "approve")
        await nc.publish(approve, encode(DecideApproval(id="0" * 32)))
        refused = await asyncio.wait_for(errors.get(), 5)
        assert "permissions violation" in str(refused).lower()
        assert approve in str(refused)

        await nc.subscribe(requested_subject("sb"))
        refused = await asyncio.wait_for(errors.get(), 5)
        assert "permissions violation" in str(refused).lower()
        assert requested_subject("sb") in str(refused)
    finally:
        await nc.close()


async def test_requests_outlive_a_policy_replica_restart(
    desk: Desk, make_stack: StackFactory, make_agent: AgentFactory
) -> None:
    a, served = await _agents(make_agent)
    call = asyncio.ensure_future(a.call("b", "echo", {"n": 1}, headers=BIG, timeout=10))
    request = await desk.next()
    # A second replica starts, then the one holding the call stops: it tells its caller.
    await make_stack(services=["policy"])
    await desk.stack.services.pop("policy").stop()
    with pytest.raises(CallDenied) as info:
        await call
    assert info.value.details["reason_code"] == "approval_expired"
    assert info.value.details["approval_id"] == request.id
    assert "the policy replica holding it stopped" in info.value.message
    [stored] = await desk.list(all=True)  # answered by the other replica, from KV
    assert (stored.id, stored.status) == (request.id, "expired")
    with pytest.raises(Conflict):
        await desk.decide("approve", request.id)
    assert served == []


# -- the CLI --------------------------------------------------------------------------------


async def test_the_cli_lists_approves_and_denies(
    desk: Desk,
    make_agent: AgentFactory,
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    from typer.testing import CliRunner

    from services.cli.main import app

    monkeypatch.setenv("SIGNALBOX_SECRETS_DIR", str(tmp_path / "data" / "secrets"))
    monkeypatch.setenv("COLUMNS", "200")
    assert settings.nats_url is not None
    url = ["--nats-url", settings.nats_url]

    async def cli(*args: str) -> Result:
        # The CLI runs its own event loop: beside the test's.
        return await asyncio.to_thread(CliRunner().invoke, app, [*args, *url])

    a, served = await _agents(make_agent)
    first = asyncio.ensure_future(a.call("b", "echo", {"n": 1}, headers=BIG, timeout=10))
    second = asyncio.ensure_future(a.call("b", "echo", {"n": 2}, headers=BIG, timeout=10))
    ids = {(await desk.next()).id, (await desk.next()).id}

    table = await cli("approvals", "list")
    assert table.exit_code == 0, table.output
    assert "a -> b.echo" in table.output and "pending" in table.output
    listed = msgspec.json.decode((await cli("approvals", "list", "--json")).output)
    assert {r["id"] for r in listed["approvals"]} == ids

    by_binding = {r["binding"]: r["id"] for r in listed["approvals"]}
    yes = by_binding[binding_hash("a", "b", "echo", encode({"n": 1}))]
    no = by_binding[binding_hash("a", "b", "echo", encode({"n": 2}))]
    approved = await cli("approvals", "approve", yes, "--reason", "ok")
    assert approved.exit_code == 0, approved.output
    assert f"approved {yes}" in approved.output
    denied = await cli("approvals", "deny", no, "--reason", "no")
    assert denied.exit_code == 0 and f"denied {no}" in denied.output
    assert await first == {"n": 1}
    with pytest.raises(CallDenied):
        await second

    again = await cli("approvals", "approve", no)
    assert again.exit_code == 1
    assert "already denied" in again.output
    unknown = await cli("approvals", "deny", "f" * 32)
    assert unknown.exit_code == 1 and "no approval request" in unknown.output
    assert (await cli("approvals", "list")).output.strip() == "no pending approval requests"
    assert served == [{"n": 1}]


async def test_a_replica_parks_a_bounded_number_of_calls(
    desk: Desk, make_agent: AgentFactory
) -> None:
    a, served = await _agents(make_agent)
    approvals = policy_of(desk.stack).approvals
    assert approvals is not None
    approvals.max_parked = 1
    first = asyncio.ensure_future(a.call("b", "echo", {"n": 1}, headers=BIG, timeout=10))
    request = await desk.next()
    with pytest.raises(CallDenied) as info:
        await a.call("b", "echo", {"n": 2}, headers=BIG, timeout=10)
    assert info.value.details["reason_code"] == "approval_unavailable"
    assert "calls already wait for approval" in info.value.message
    assert [r.id for r in await desk.list(all=True)] == [request.id]
    await desk.decide("approve", request.id)
    assert await first == {"n": 1}
    assert served == [{"n": 1}]
