"""SDK errors name their trace: ``err.trace_id``, and the message says ``signalbox trace <id>``.

The id is the trace the control plane recorded the refusal in (the policy
service's decision record carries it), so the command in the message shows
exactly what happened to that call.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest
from support import echo_pair

from broker.errors import CallDenied, SignalboxError

if TYPE_CHECKING:
    from support import AgentFactory, AuditTrail, StackFactory


def test_with_trace_names_the_trace_once() -> None:
    err = SignalboxError("refused", details={"x": 1})
    assert err.trace_id == ""
    assert err.with_trace("ab" * 16) is err
    assert err.trace_id == "ab" * 16
    assert err.message == f"refused (see `signalbox trace {'ab' * 16}`)" == str(err)
    err.with_trace("cd" * 16)  # a second trace never replaces the first
    assert err.trace_id == "ab" * 16 and err.message.count("signalbox trace") == 1
    assert SignalboxError("x").with_trace("").message == "x"


async def test_a_refused_call_names_the_trace_of_its_decision(
    make_stack: StackFactory, make_agent: AgentFactory, audit_trail: AuditTrail
) -> None:
    await make_stack(allow=[("b", "a", ["echo"])])  # nothing lets a call b
    a, _b = await echo_pair(make_agent)
    with pytest.raises(CallDenied) as denied:
        await a.call("b", "echo", {"x": 1})
    trace_id = denied.value.trace_id
    assert len(trace_id) == 32 and int(trace_id, 16)
    assert f"signalbox trace {trace_id}" in str(denied.value)
    # The decision the policy service recorded is in that very trace.
    decisions = await audit_trail.wait_for(
        lambda r: r.kind == "decision" and r.actor == "a" and r.trace_id == trace_id
    )
    assert decisions


async def test_a_refused_model_use_names_its_trace(
    make_stack: StackFactory, make_agent: AgentFactory, audit_trail: AuditTrail
) -> None:
    await make_stack(allow=[])  # no permit: model use is denied by default
    a = make_agent("a", heartbeat_interval=0)
    await a.start()
    with pytest.raises(CallDenied) as denied:
        async with a.model_call("gpt-4o", provider="openai", region="eu-west-1"):
            pytest.fail("a denied model use must not run")
    trace_id = denied.value.trace_id
    assert len(trace_id) == 32
    assert f"signalbox trace {trace_id}" in denied.value.message
    # The policy service says where it recorded the decision (the Decision's trace_id,
    # on the wire for raw clients too), and the record is there.
    assert denied.value.details["trace_id"] == trace_id
    records = await audit_trail.wait_for(
        lambda r: r.kind == "decision" and r.actor == "a" and r.trace_id == trace_id
    )
    assert records[0].data["resource"] == "gpt-4o"


async def test_every_authz_decision_names_the_trace_it_is_recorded_in(
    make_stack: StackFactory, make_agent: AgentFactory, audit_trail: AuditTrail
) -> None:
    await make_stack(allow=[])
    a = make_agent("a", heartbeat_interval=0)
    await a.start()
    first = await a.authorize("use_model", "gpt-4o", provider="openai", region="eu-west-1")
    second = await a.authorize("use_tool", "search")
    assert len(first.trace_id) == 32 and first.trace_id != second.trace_id
    for decision in (first, second):
        assert await audit_trail.wait_for(
            lambda r, d=decision: r.kind == "decision" and r.trace_id == d.trace_id
        )
