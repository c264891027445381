"""A call or a model use with no token estimate is never treated as zero tokens.

Leaving ``Sb-Estimated-Tokens`` out of a call that carries 24,000 tokens of
text must not skip the shipped approval rule (``large-invocation-needs-
approval``: more than 10,000 tokens); an ``sb.authz`` request without an
estimate is evaluated with ``SIGNALBOX_DEFAULT_TOKEN_ESTIMATE``. Either way
the context says the estimate is unknown (``estimated_tokens_known``), and
the decision record keeps what was evaluated, so what-if replays agree.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytest
from support import lending_policy_dir

from broker.errors import CallDenied
from schemas import AgentManifest, AgentRecord
from services.policy.cedar.policy_set import shipped_policy_dir
from services.policy.decider import H_ESTIMATED_TOKENS, CallRequest
from services.policy.whatif import request_from_record

if TYPE_CHECKING:
    from support import AgentFactory, AuditTrail, StackFactory

#: a may call b, under the shipped approval rule itself.
RULES = (
    '@id("a-may-call-b")\n'
    'permit (principal == Signalbox::Agent::"a", action == Signalbox::Action::"call", resource)\n'
    'when { resource.owner == Signalbox::Agent::"b" };\n'
    + (shipped_policy_dir() / "large-invocations.cedar").read_text()
)
#: About 24,000 tokens of text (4 bytes a token).
DOCUMENT = {"document": "lorem ipsum " * 8_000}


async def test_a_big_call_without_an_estimate_still_needs_approval(
    make_stack: StackFactory, make_agent: AgentFactory, audit_trail: AuditTrail
) -> None:
    await make_stack(rules=RULES)
    b = make_agent("b")

    @b.capability("echo")
    async def echo(req: dict[str, Any]) -> dict[str, Any]:
        return {"n": len(req)}

    a = make_agent("a")
    await b.start()
    await a.start()
    # Small calls without an estimate flow (the stand-in is 1,000 tokens).
    assert await a.call("b", "echo", {"x": 1}) == {"n": 1}
    # 24,000 tokens of text and no header: parked for a human, not waved through as 0.
    with pytest.raises(CallDenied) as parked:
        await a.call("b", "echo", DOCUMENT, timeout=1.0)
    assert parked.value.details["reason_code"] == "approval_expired"
    # An explicit estimate is the caller's claim, as before (its risk to make).
    assert await a.call("b", "echo", {"x": 1}, headers={H_ESTIMATED_TOKENS: "0"}) == {"n": 1}

    records = await audit_trail.wait_for(
        lambda r: r.kind == "decision" and r.data.get("capability") == "echo"
        and r.data["decision"].get("reason_code") in ("allowed", "needs_approval"),
        count=3,
    )  # fmt: skip
    # A record without a context is the empty one: a known estimate of 0, no tags.
    contexts = [r.data.get("context", {"estimated_tokens": 0, "estimated_tokens_known": True})
                for r in records]  # fmt: skip
    by_effect = {(r.data["decision"]["effect"], c["estimated_tokens_known"]): (r, c)
                 for r, c in zip(records, contexts, strict=True)}  # fmt: skip
    small = by_effect[("allow", False)][1]
    big, big_context = by_effect[("needs_approval", False)]
    assert small["estimated_tokens"] == 1_000
    assert big_context["estimated_tokens"] >= 24_000
    assert big.data["decision"]["policy_ids"] == ["large-invocation-needs-approval"]
    assert by_effect[("allow", True)][1]["estimated_tokens"] == 0
    # A what-if replay re-evaluates exactly what was decided.
    agents = {
        name: AgentRecord(
            manifest=AgentManifest(name=name, version="1.0.0", owner="o", team="t"),
            registered_at=1.0,
        )
        for name in ("a", "b")
    }
    rebuilt = request_from_record(big, agents)
    assert rebuilt is not None and isinstance(rebuilt[0], CallRequest)
    context = rebuilt[0].context
    assert context.estimated_tokens_known is False
    assert context.estimated_tokens == big_context["estimated_tokens"]


@pytest.mark.parametrize(("default", "effect"), [(1_000, "allow"), (20_000, "needs_approval")])
async def test_a_model_use_without_an_estimate_gets_the_default_estimate(
    default: int,
    effect: str,
    make_stack: StackFactory,
    make_agent: AgentFactory,
    audit_trail: AuditTrail,
) -> None:
    await make_stack(policy_dir=lending_policy_dir(), default_token_estimate=default)
    bot = make_agent("bot")
    await bot.start()
    decision = await bot.authorize("use_model", "gpt-4o", region="eu-west-1")
    assert decision.effect == effect
    given = await bot.authorize("use_model", "gpt-4o", region="eu-west-1", estimated_tokens=5)
    assert given.effect == "allow"
    records = await audit_trail.wait_for(
        lambda r: r.kind == "decision" and r.subject == "sb.authz.bot", count=2
    )
    unknown = [r for r in records if r.data["estimated_tokens_known"] is False]
    assert [r.data["estimated_tokens"] for r in unknown] == [default]
    known = [r for r in records if r.data["estimated_tokens_known"] is True]
    assert [r.data["estimated_tokens"] for r in known] == [5]
