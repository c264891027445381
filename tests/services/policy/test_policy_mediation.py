"""The policy service mediates every call: allow, deny, reject, time out, always answering."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import msgspec
import nats
import pytest
from nats.aio.client import Client
from support import policy_of

from broker import (
    Agent,
    BadRequest,
    CallDenied,
    CallTimeout,
    DeadlineExceeded,
    OutcomeUnknown,
    PayloadTooLarge,
    TargetUnavailable,
    UnknownTarget,
)
from broker.codec import decode
from broker.replies import H_DEADLINE, H_ERROR, H_TIMEOUT_MS, error_from_reply
from broker.runtime.identity import service_connect_options
from broker.settings import Settings
from broker.subjects import inbox_prefix
from schemas import ErrorReply
from services.runner import Stack

if TYPE_CHECKING:
    from support import AgentFactory, AuditTrail, ServiceConnector, StackFactory


class Address(msgspec.Struct):
    city: str
    zip: int


class Customer(msgspec.Struct):
    name: str
    address: Address


@pytest.fixture
async def raw(settings: Settings) -> AsyncIterator[Client]:
    """A plain nats-py client, as a non-SDK agent ``a`` would use (its inbox prefix: the
    policy service answers only into the caller's own inbox)."""
    options = {**service_connect_options(settings), "inbox_prefix": inbox_prefix("a")}
    nc = await nats.connect(settings.nats_url or "", **options)
    yield nc
    await nc.close()


async def _serving(
    make_stack: StackFactory, make_agent: AgentFactory, **overrides: Any
) -> tuple[Stack, Agent, Agent, list[Customer]]:
    """A stack where ``a`` may call ``b.lookup``; ``b`` records what it served."""
    stack = await make_stack(allow=[("a", "b", ["lookup", "slow"])], **overrides)
    served: list[Customer] = []
    b = make_agent("b")

    @b.capability()
    async def lookup(c: Customer) -> str:
        served.append(c)
        return f"{c.name}@{c.address.city}"

    @b.capability()
    async def slow(req: dict[str, Any]) -> str:
        await RELEASE[b.name].wait()  # until the test has seen the timeout
        return "late"

    @b.capability()
    async def secret(req: dict[str, Any]) -> str:
        return "should never be reached"

    a = make_agent("a")
    RELEASE[b.name] = asyncio.Event()
    await b.start()
    await a.start()
    return stack, a, b, served


RELEASE: dict[str, asyncio.Event] = {}


GOOD = Customer(name="ada", address=Address(city="Paris", zip=75001))


async def test_an_allowed_call_is_forwarded_and_audited(
    make_stack: StackFactory, make_agent: AgentFactory, audit_trail: AuditTrail
) -> None:
    stack, a, _, served = await _serving(make_stack, make_agent)
    assert await a.call("b", "lookup", GOOD) == "ada@Paris"
    assert served == [GOOD]
    [decision] = await audit_trail.wait_for(lambda r: r.kind == "decision")
    assert decision.actor == "a"
    assert decision.subject == "sb.out.a.b.lookup"
    assert decision.policy_version.startswith("test-rules@")
    assert decision.data["decision"]["effect"] == "allow"
    assert decision.data["decision"]["policy_ids"] == ["a-b"]
    assert decision.data["decision"]["reason_code"] == "allowed"
    # The caller sent no context: an unknown estimate (a stand-in, never 0), no tags.
    assert decision.data["context"]["estimated_tokens_known"] is False
    assert decision.data["context"]["estimated_tokens"] == 1_000  # SIGNALBOX_DEFAULT_TOKEN_ESTIMATE
    assert decision.data["context"]["data_tags"] == []
    [call] = await audit_trail.wait_for(lambda r: r.kind == "call")
    assert call.data["ok"] is True
    assert call.data["call_id"] == decision.data["call_id"]
    assert call.data["error_code"] == ""
    assert call.data["request_bytes"] > 0 and call.data["reply_bytes"] > 0
    stats = policy_of(stack).stats
    assert (stats.calls, stats.allowed, stats.ok) == (1, 1, 1)


async def test_a_call_no_rule_allows_is_denied_with_reason_and_audited(
    make_stack: StackFactory, make_agent: AgentFactory, audit_trail: AuditTrail
) -> None:
    stack, a, _, _ = await _serving(make_stack, make_agent)
    with pytest.raises(CallDenied) as info:
        await a.call("b", "secret", {})
    err = info.value
    assert err.details["policy_ids"] == ["default-deny"]
    assert err.details["effect"] == "deny"
    assert err.details["reason_code"] == "default_deny"
    assert "deny by default" in err.details["reasons"][0]
    assert err.details["policy_version"].startswith("test-rules@")
    assert "a -> b.secret denied" in err.message
    [decision] = await audit_trail.wait_for(lambda r: r.kind == "decision")
    assert decision.data["decision"]["effect"] == "deny"
    assert decision.data["decision"]["policy_ids"] == ["default-deny"]
    assert (decision.data["caller"], decision.data["target"]) == ("a", "b")
    assert decision.data["capability"] == "secret"
    assert policy_of(stack).stats.denied == 1


async def test_an_unregistered_caller_is_denied(
    make_stack: StackFactory, make_agent: AgentFactory, audit_trail: AuditTrail
) -> None:
    await _serving(make_stack, make_agent)
    stranger = make_agent("a-twin", register=False)
    await stranger.start()
    with pytest.raises(CallDenied) as info:
        await stranger.call("b", "lookup", GOOD)
    assert info.value.details["reason_code"] == "unknown_agent"
    assert info.value.details["policy_ids"] == []
    assert "not registered" in info.value.details["reasons"][0]
    await audit_trail.wait_for(
        lambda r: r.kind == "decision" and r.actor == "a-twin"
        and r.data["decision"]["effect"] == "deny"
    )  # fmt: skip


async def test_an_unknown_target_is_reported_and_audited(
    make_stack: StackFactory, make_agent: AgentFactory, audit_trail: AuditTrail
) -> None:
    await _serving(make_stack, make_agent)
    a = make_agent("c")
    await a.start()
    with pytest.raises(UnknownTarget) as info:
        await a.call("nobody", "lookup", GOOD)
    assert info.value.details == {
        "trace_id": info.value.trace_id,
        "target": "nobody",
        "capability": "lookup",
    }
    assert "not a registered agent" in info.value.message
    [rejected] = await audit_trail.wait_for(lambda r: r.kind == "rejected")
    assert rejected.actor == "c"
    assert rejected.data["code"] == "unknown_target"


async def test_a_capability_the_target_does_not_offer_is_an_unknown_target(
    make_stack: StackFactory, make_agent: AgentFactory
) -> None:
    _, a, _, _ = await _serving(make_stack, make_agent)
    with pytest.raises(UnknownTarget) as info:
        await a.call("b", "fly", {})
    assert "no capability 'fly'" in info.value.message


async def test_a_registered_target_that_is_not_running_is_unavailable(
    make_stack: StackFactory, make_agent: AgentFactory, audit_trail: AuditTrail
) -> None:
    stack, a, b, _ = await _serving(make_stack, make_agent)
    await b.stop()  # still registered, nobody serving
    with pytest.raises(TargetUnavailable) as info:
        await a.call("b", "lookup", GOOD)
    assert info.value.details == {
        "trace_id": info.value.trace_id,
        "target": "b",
        "capability": "lookup",
    }
    [call] = await audit_trail.wait_for(lambda r: r.kind == "call")
    assert call.data["ok"] is False
    assert call.data["error_code"] == "target_unavailable"
    assert policy_of(stack).stats.errors == 1


async def test_a_slow_target_times_out_without_blocking_the_caller(
    make_stack: StackFactory, make_agent: AgentFactory, audit_trail: AuditTrail
) -> None:
    # The policy's own timer (call_timeout) caps the caller's Sb-Timeout-Ms.
    stack, a, _, _ = await _serving(make_stack, make_agent, call_timeout=0.5)
    with pytest.raises(OutcomeUnknown) as info:  # forwarded, unanswered: may have run
        await a.call("b", "slow", {}, timeout=30)
    assert isinstance(info.value, CallTimeout)
    assert info.value.details == {
        "trace_id": info.value.trace_id,
        "target": "b",
        "capability": "slow",
    }
    RELEASE["b"].set()  # its late reply is dropped by policy, not relayed
    # The caller is free at once, and the next call goes through.
    assert await a.call("b", "lookup", GOOD) == "ada@Paris"
    [call] = await audit_trail.wait_for(lambda r: r.kind == "call" and not r.data["ok"])
    assert call.data["error_code"] == "outcome_unknown"
    assert call.data["capability"] == "slow"
    policy = policy_of(stack)
    assert policy.stats.timeouts == 1
    await audit_trail.wait_for(lambda r: r.kind == "call" and r.data["ok"])
    assert policy.stats.late_replies == 1


async def test_garbage_input_is_a_bad_request_naming_the_field(
    make_stack: StackFactory, make_agent: AgentFactory, audit_trail: AuditTrail
) -> None:
    _, a, _, served = await _serving(make_stack, make_agent)
    with pytest.raises(BadRequest) as info:
        await a.call("b", "lookup", {"name": "x", "address": {"city": "Oslo", "zip": "0150"}})
    assert info.value.details["path"] == "$.address.zip"
    with pytest.raises(BadRequest) as garbage:
        await a.call("b", "lookup", b"{not json")
    assert garbage.value.details["path"] == "$"
    assert served == []
    # The failed calls are audited with the target's error code.
    bad = await audit_trail.wait_for(
        lambda r: r.kind == "call" and r.data["error_code"] == "bad_request", count=2
    )
    assert len(bad) == 2
    assert await a.call("b", "lookup", GOOD) == "ada@Paris"


async def test_an_oversize_payload_is_refused_by_policy_and_never_forwarded(
    make_stack: StackFactory, make_agent: AgentFactory, audit_trail: AuditTrail
) -> None:
    stack, a, _, served = await _serving(make_stack, make_agent, max_call_bytes=1024)
    big = Customer(name="x" * 2000, address=Address(city="Rome", zip=1))
    with pytest.raises(PayloadTooLarge) as info:
        await a.call("b", "lookup", big)
    assert info.value.details["limit"] == 1024
    assert info.value.details["size"] > 1024
    assert "SIGNALBOX_MAX_CALL_BYTES" in info.value.message
    assert served == []
    [rejected] = await audit_trail.wait_for(lambda r: r.kind == "rejected")
    assert rejected.data["code"] == "payload_too_large"
    assert rejected.actor == "a"
    assert rejected.subject == "sb.out.a.b.lookup"
    policy = policy_of(stack)
    assert policy.stats.rejected == 1
    assert policy.stats.allowed == 0
    assert policy.rejected["payload_too_large"] == 1
    assert await a.call("b", "lookup", GOOD) == "ada@Paris"


async def test_a_call_published_without_reply_subject_is_counted_and_audited(
    make_stack: StackFactory, make_agent: AgentFactory, audit_trail: AuditTrail, raw: Client
) -> None:
    stack, a, _, served = await _serving(make_stack, make_agent)
    await raw.publish("sb.out.a.b.lookup", msgspec.json.encode(GOOD))
    await raw.flush()
    [rejected] = await audit_trail.wait_for(lambda r: r.kind == "rejected")
    assert rejected.data["code"] == "invalid_reply_subject"
    assert rejected.actor == "a"  # the real sender (from the subject the server enforces)
    assert "reply subject" in rejected.data["message"]
    assert served == []
    assert policy_of(stack).stats.rejected == 1
    assert await a.call("b", "lookup", GOOD) == "ada@Paris"


@pytest.mark.parametrize("value", ["soon", "-5", "0", "1.5", ""])
async def test_an_invalid_timeout_header_gets_a_structured_error(
    make_stack: StackFactory, make_agent: AgentFactory, raw: Client, value: str
) -> None:
    _, a, _, served = await _serving(make_stack, make_agent)
    reply = await raw.request(
        "sb.out.a.b.lookup", msgspec.json.encode(GOOD), headers={H_TIMEOUT_MS: value}, timeout=5
    )
    assert reply.headers is not None
    assert reply.headers[H_ERROR] == "invalid_input"
    error = decode(reply.data, ErrorReply)
    assert error.code == "invalid_input"
    assert error.details["header"] == H_TIMEOUT_MS
    assert served == []
    assert await a.call("b", "lookup", GOOD) == "ada@Paris"


async def test_a_raw_client_gets_relayed_replies_and_structured_errors(
    make_stack: StackFactory, make_agent: AgentFactory, raw: Client
) -> None:
    await _serving(make_stack, make_agent)
    ok = await raw.request("sb.out.a.b.lookup", msgspec.json.encode(GOOD), timeout=5)
    assert not (ok.headers or {}).get(H_ERROR)
    assert msgspec.json.decode(ok.data) == "ada@Paris"
    denied = await raw.request("sb.out.a.b.secret", b"{}", timeout=5)
    assert denied.headers is not None and denied.headers[H_ERROR] == "denied"
    assert decode(denied.data, ErrorReply).details["policy_ids"] == ["default-deny"]


async def test_bad_input_of_every_kind_leaves_the_services_serving(
    make_stack: StackFactory, make_agent: AgentFactory, raw: Client, audit_trail: AuditTrail
) -> None:
    stack, a, _, served = await _serving(make_stack, make_agent, max_call_bytes=4096)
    for subject, data, headers in [
        ("sb.out.a.b.lookup", b"\xff" * 5000, None),
        ("sb.out.a.b.lookup", b"[1, 2", None),
        ("sb.out.a.b.lookup", b"{}", {H_TIMEOUT_MS: "x" * 200}),
        ("sb.out.a.nobody.x", b"{}", None),
        ("sb.out.a.b.secret", b"", None),
    ]:
        reply = await raw.request(subject, data, headers=headers, timeout=5)
        assert reply.headers is not None and H_ERROR in reply.headers, subject
    # Refused unanswered: the reply subject is not nobody's inbox, or there is none.
    await raw.publish("sb.out.nobody.b.lookup", b"{}", reply=raw.new_inbox())
    await raw.publish("sb.out.a.b.lookup", b"no reply wanted")
    assert await a.call("b", "lookup", GOOD) == "ada@Paris"
    assert served == [GOOD]
    await audit_trail.wait_for(lambda r: r.kind == "call" and r.data["ok"])
    policy = policy_of(stack)
    assert policy.stats.calls == 8
    assert policy.stats.ok == 1


async def test_a_call_past_its_deadline_is_refused_unrun(
    make_stack: StackFactory, make_agent: AgentFactory, audit_trail: AuditTrail, raw: Client
) -> None:
    """A request its client held back (disconnected) and sent after the caller gave up:
    refused with deadline_exceeded, never forwarded, audited; a bad deadline is invalid."""
    _, a, _, served = await _serving(make_stack, make_agent)
    late = await raw.request(
        "sb.out.a.b.lookup", msgspec.json.encode(GOOD),
        headers={H_DEADLINE: f"{time.time() - 2:.6f}"}, timeout=5,
    )  # fmt: skip
    assert late.headers is not None and late.headers[H_ERROR] == "deadline_exceeded"
    with pytest.raises(DeadlineExceeded):
        raise error_from_reply(late.data, late.headers)
    bad = await raw.request(
        "sb.out.a.b.lookup", msgspec.json.encode(GOOD), headers={H_DEADLINE: "soon"}, timeout=5
    )
    assert bad.headers is not None and bad.headers[H_ERROR] == "invalid_input"
    [rejected] = await audit_trail.wait_for(
        lambda r: r.kind == "rejected" and r.data["code"] == "deadline_exceeded"
    )
    assert rejected.actor == "a"
    assert served == []  # neither reached b
    assert await a.call("b", "lookup", GOOD) == "ada@Paris"  # the SDK sends a live deadline
    assert served == [GOOD]


async def test_the_target_sdk_does_not_run_a_delivery_past_its_deadline(
    make_stack: StackFactory, make_agent: AgentFactory, service_nc: ServiceConnector
) -> None:
    _, _, b, served = await _serving(make_stack, make_agent)
    nc = await service_nc()  # as the policy service would deliver it, but late
    reply = await nc.request(
        "sb.in.b.lookup", msgspec.json.encode(GOOD),
        headers={H_DEADLINE: f"{time.time() - 1:.6f}"}, timeout=5,
    )  # fmt: skip
    assert reply.headers is not None and reply.headers[H_ERROR] == "deadline_exceeded"
    assert served == [] and b.serving.late == 1
