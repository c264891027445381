"""An agent continues no trace it does not own: a forged ``traceparent`` cannot put its
calls, model authorizations or usage into another agent's trace.

A trace id is no secret (every agent a call reaches sees it), so the control
plane keeps a sender's trace context only when the sender owns the trace
(``Sb-Trace-Origin``, ``broker.telemetry.owned_trace_id``) or the policy
service vouched for it: the delegation chain it signed for the call being
served is bound to that call's trace. Any other claim is moved into
``owned_trace_id(sender, claimed)``: the same claim always lands in the same
trace of the sender's own, never in the victim's. Raw nats-py clients holding
one agent's credential; honest agents use the SDK.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import TYPE_CHECKING, Any

from nats.aio.client import Client
from support import RawAgent, cedar_policies, enroll

from broker import serving as sdk
from broker.agent import CallContext
from broker.codec import decode, encode
from broker.replies import H_CHAIN, H_CHAIN_SIG, H_MSG_ID, H_TRACE_ORIGIN
from broker.settings import Settings
from broker.telemetry import owned_trace_id
from schemas import AuditEvent, AuthzRequest, Decision, UsageReport

if TYPE_CHECKING:
    from support import AgentFactory, AuditTrail, StackFactory

MODELS = """
@id("any-model")
permit (principal, action == Signalbox::Action::"use_model", resource);
"""


def _parent(trace_id: str) -> str:
    return f"00-{trace_id}-{os.urandom(8).hex()}-01"


async def _call(nc: Client, caller: str, target: str, headers: dict[str, str]) -> None:
    await nc.request(f"sb.out.{caller}.{target}.echo", b"{}", timeout=5, headers=headers)


def _of(records: list[AuditEvent], actor: str, kind: str) -> list[AuditEvent]:
    return [r for r in records if r.actor == actor and r.kind == kind]


async def test_forged_trace_contexts_land_in_the_senders_own_trace(
    make_stack: StackFactory, make_agent: AgentFactory, settings: Settings,
    audit_trail: AuditTrail,
) -> None:  # fmt: skip
    allow = [("a", "b", ["*"]), ("mallory", "b", ["*"]), ("b", "c", ["*"])]
    await make_stack(rules=cedar_policies(allow) + MODELS)
    served: list[tuple[str, str, str]] = []  # (trace id, chain, signature) b was given
    b, c = make_agent("b"), make_agent("c")

    @b.capability("echo")
    async def echo(req: dict[str, Any], ctx: CallContext) -> dict[str, Any]:
        served.append((ctx.meta.trace_id, *sdk._CHAIN.get()))
        return req

    c_chains: list[str] = []  # the chain c was given with each call

    @c.capability("echo")
    async def echo_c(req: dict[str, Any]) -> dict[str, Any]:
        c_chains.append(sdk._CHAIN.get()[0])
        return req

    a = make_agent("a")
    for agent in (b, c, a):
        await agent.start()
    await a.call("b", "echo", {})  # the victim's trace: an honest call a -> b
    [(victim, chain, signature)] = served
    assert len(victim) == 32 and chain == "a" and signature

    assert settings.nats_url
    mallory = await RawAgent().connect(settings.nats_url, "mallory", enroll(settings, "mallory"))
    compromised_b = await RawAgent().connect(settings.nats_url, "b", enroll(settings, "b"))
    try:
        # 1. a call naming the victim's trace, bare or with a made-up origin
        await _call(mallory, "mallory", "b", {"traceparent": _parent(victim)})
        made_up = {"traceparent": _parent(victim), H_TRACE_ORIGIN: os.urandom(16).hex()}
        await _call(mallory, "mallory", "b", made_up)
        # 2. a model authorization naming it
        ask = AuthzRequest(action="use_model", resource="gpt-4o")
        answer = await mallory.request(
            "sb.authz.mallory", encode(ask), timeout=5, headers={"traceparent": _parent(victim)}
        )
        assert decode(answer.data, Decision).effect in ("allow", "deny")  # audited either way
        # 3. a usage report naming it in its headers and in its body
        report = UsageReport(
            id="forged-usage", agent="mallory", time=time.time(), model="gpt-4o",
            input_tokens=10, trace_id=victim,
        )  # fmt: skip
        await mallory.jetstream().publish(
            "sb.usage.mallory", encode(report),
            headers={H_MSG_ID: report.id, "traceparent": _parent(victim)},
        )  # fmt: skip
        # 4. b replays the chain it was signed for the victim's call into another trace
        elsewhere = os.urandom(16).hex()
        replay = {"traceparent": _parent(elsewhere), H_CHAIN: chain, H_CHAIN_SIG: signature}
        await _call(compromised_b, "b", "c", replay)
        # ... while with the trace it was signed for, the same chain is vouched for
        vouched = {"traceparent": _parent(victim), H_CHAIN: chain, H_CHAIN_SIG: signature}
        await _call(compromised_b, "b", "c", vouched)
    finally:
        await mallory.close()
        await compromised_b.close()

    moved = owned_trace_id("mallory", victim)
    await audit_trail.wait_for(lambda r: r.actor == "mallory" and r.kind == "usage")
    await audit_trail.wait_for(lambda r: r.kind == "call" and r.actor == "b", count=2)
    records = await audit_trail.settle()
    mine = [r for r in records if r.actor == "mallory" and r.kind != "auth"]
    assert sorted(r.kind for r in mine).count("decision") == 3  # two calls, one authorization
    assert {r.kind for r in mine} >= {"decision", "usage"}
    assert {r.trace_id for r in mine} == {moved}
    assert victim not in {r.trace_id for r in mine}

    b_calls = sorted(_of(records, "b", "decision"), key=lambda r: r.time)
    replayed, kept = b_calls[-2], b_calls[-1]
    assert replayed.trace_id == owned_trace_id("b", elsewhere)
    assert kept.trace_id == victim
    # The replayed chain was not believed (the call is b's own); the vouched one was.
    assert c_chains == ["b", "a,b"]
    in_victim = {(r.actor, r.kind) for r in records if r.trace_id == victim}
    assert ("b", "decision") in in_victim and not any(a == "mallory" for a, _ in in_victim)


async def test_an_sdk_agent_owns_the_traces_it_starts(
    make_stack: StackFactory, make_agent: AgentFactory, audit_trail: AuditTrail
) -> None:
    """Honest agents lose nothing: outside a handler the SDK starts a trace it owns
    (``Sb-Trace-Origin``), inside one it continues the vouched trace, and every record
    of the call is in that one trace."""
    await make_stack(allow=[("a", "b", ["*"]), ("b", "c", ["*"])])
    seen: list[str] = []
    b, c = make_agent("b"), make_agent("c")

    @b.capability("echo")
    async def echo(req: dict[str, Any], ctx: CallContext) -> dict[str, Any]:
        seen.append(ctx.meta.trace_id)
        return await b.call("c", "echo", req)  # type: ignore[no-any-return]

    @c.capability("echo")
    async def echo_c(req: dict[str, Any], ctx: CallContext) -> dict[str, Any]:
        seen.append(ctx.meta.trace_id)
        return req

    a = make_agent("a")
    for agent in (c, b, a):
        await agent.start()
    await asyncio.gather(*(a.call("b", "echo", {"n": n}) for n in range(3)))
    await audit_trail.wait_for(lambda r: r.kind == "call", count=6)
    records = await audit_trail.settle()
    # Three calls, three traces; each holds a's and b's decisions and both outcomes.
    traces = {r.trace_id for r in records if r.kind in ("decision", "call")}
    assert traces == set(seen) and len(traces) == 3
    for trace_id in traces:
        kinds = sorted((r.actor, r.kind) for r in records if r.trace_id == trace_id)
        assert kinds == [("a", "call"), ("a", "decision"), ("b", "call"), ("b", "decision")]
