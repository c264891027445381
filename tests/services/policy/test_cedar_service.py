"""The policy service on Cedar, end to end: sb.authz decisions and mediated calls."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from support import lending_policy_dir, policy_of

from broker import Agent, CallDenied, ConfigError, SchemaError
from broker.codec import decode
from broker.replies import H_ERROR
from schemas import ErrorReply
from services.policy.decider import H_DATA_TAGS, H_ESTIMATED_TOKENS, H_ON_BEHALF_OF
from services.runner import Stack

if TYPE_CHECKING:
    from support import AgentFactory, AuditTrail, StackFactory


async def test_an_agent_asks_before_using_a_model_and_every_answer_is_audited(
    make_stack: StackFactory, make_agent: AgentFactory, audit_trail: AuditTrail
) -> None:
    stack = await make_stack(policy_dir=lending_policy_dir())
    # Bound at enrollment: the registry writes the tag into the stored manifest.
    eu = make_agent("eu-bot", tags=("data-residency:eu",))
    await eu.start()

    us = await eu.authorize("use_model", "gpt-4o", provider="openai", region="us-east-1")
    assert (us.effect, us.reason_code) == ("deny", "forbidden")
    assert us.policy_ids == ("eu-residency-models-stay-in-eu",)
    assert us.policy_version == policy_of(stack).decider.version
    ok = await eu.authorize("use_model", "gpt-4o", provider="openai", region="eu-west-1",
                            price_per_1k_tokens=0.0025, data_tags=("pii",))  # fmt: skip
    assert (ok.effect, ok.policy_ids) == ("allow", ("registered-agents-may-use-models",))
    big = await eu.authorize("use_model", "gpt-4o", region="eu-west-1", estimated_tokens=20_000,
                             on_behalf_of=("user:ada",))  # fmt: skip
    assert (big.effect, big.policy_ids) == ("needs_approval", ("large-invocation-needs-approval",))
    tool = await eu.authorize("use_tool", "web-search")
    assert (tool.effect, tool.policy_ids) == ("deny", ("default-deny",))
    odd = await eu.authorize("use_gpu", "h100")
    assert (odd.effect, odd.reason_code) == ("deny", "unknown_action")

    records = await audit_trail.wait_for(
        lambda r: r.kind == "decision" and r.subject == "sb.authz.eu-bot", count=5
    )
    assert {r.actor for r in records} == {"eu-bot"}
    by_effect = {r.data["decision"]["effect"]: r for r in records}
    assert set(by_effect) == {"allow", "deny", "needs_approval"}
    asked = by_effect["needs_approval"]
    assert asked.policy_version == big.policy_version
    assert asked.data["action"] == "use_model" and asked.data["resource"] == "gpt-4o"
    assert asked.data["estimated_tokens"] == 20_000
    assert asked.data["on_behalf_of"] == ["user:ada"]
    assert asked.data["decision"]["policy_ids"] == ["large-invocation-needs-approval"]
    stats = policy_of(stack).stats
    assert (stats.authz, stats.authz_allowed, stats.authz_denied) == (5, 1, 4)


async def test_an_unregistered_agent_is_refused(
    make_stack: StackFactory, make_agent: AgentFactory
) -> None:
    await make_stack(policy_dir=lending_policy_dir())
    ghost = make_agent("ghost", register=False)
    await ghost.start()
    decision = await ghost.authorize("use_model", "gpt-4o", region="eu-west-1")
    assert (decision.effect, decision.reason_code) == ("deny", "unknown_agent")
    assert decision.policy_ids == ()


async def test_bad_authz_requests_get_structured_errors_and_are_audited(
    make_stack: StackFactory, make_agent: AgentFactory, audit_trail: AuditTrail
) -> None:
    stack = await make_stack(policy_dir=lending_policy_dir())
    bot = make_agent("bot")
    await bot.start()
    with pytest.raises(SchemaError) as info:
        await bot.authorize("use_model", "gpt-4o", estimated_tokens=-1)
    assert info.value.details["path"] == "$.estimated_tokens"
    subject = bot.subjects.authz("bot")
    garbage = await bot.nc.request(subject, b"{not json", timeout=5)
    assert garbage.headers is not None and garbage.headers[H_ERROR] == "schema_error"
    assert decode(garbage.data, ErrorReply).code == "schema_error"
    await bot.nc.publish(subject, b"{}")  # no reply subject: nobody to answer
    rejected = await audit_trail.wait_for(lambda r: r.kind == "rejected", count=3)
    assert sorted(r.data["code"] for r in rejected) == [
        "invalid_reply_subject", "schema_error", "schema_error",
    ]  # fmt: skip
    assert {r.subject for r in rejected} == {subject}
    # Still serving.
    assert (await bot.authorize("use_model", "m", region="us-east-1")).effect == "allow"
    assert policy_of(stack).rejected["schema_error"] == 2


TEST_PERMITS = """
@id("ledger-may-call-vault")
permit (principal == Signalbox::Agent::"ledger", action == Signalbox::Action::"call", resource)
when { resource.owner == Signalbox::Agent::"card-vault" };
"""


async def _finance_desk(
    make_stack: StackFactory, make_agent: AgentFactory, tmp_path: Path
) -> tuple[Stack, Agent]:
    folder = tmp_path / "policies"
    shutil.copytree(lending_policy_dir(), folder)
    (folder / "test.cedar").write_text(TEST_PERMITS)
    stack = await make_stack(policy_dir=folder)
    vault = make_agent("card-vault")

    @vault.capability("charge", tags=("pci-dss",))
    async def charge(req: dict[str, Any]) -> str:
        return "charged"

    @vault.capability("stats")
    async def stats(req: dict[str, Any]) -> int:
        return 42

    ledger = make_agent("ledger", namespace="finance")
    await vault.start()
    await ledger.start()
    return stack, ledger


async def test_mediated_calls_follow_the_cedar_policies(
    make_stack: StackFactory, make_agent: AgentFactory, audit_trail: AuditTrail, tmp_path: Path
) -> None:
    stack, ledger = await _finance_desk(make_stack, make_agent, tmp_path)
    assert await ledger.call("card-vault", "charge", {}) == "charged"

    with pytest.raises(CallDenied) as forbidden:
        await ledger.call("card-vault", "stats", {})
    assert forbidden.value.details["policy_ids"] == ["finance-calls-only-pci-dss"]
    assert forbidden.value.details["reason_code"] == "forbidden"
    assert "ledger -> card-vault.stats denied: forbidden by policy" in forbidden.value.message

    with pytest.raises(CallDenied) as big:
        # Parked for a human (tests/services/policy/test_approvals.py); nobody
        # decides within the caller's timeout, so it is denied as expired.
        await ledger.call(
            "card-vault", "charge", {}, timeout=1.0,
            headers={H_ESTIMATED_TOKENS: "20000", H_DATA_TAGS: "pci-dss",
                     H_ON_BEHALF_OF: "user:ada"},
        )  # fmt: skip
    assert big.value.details["reason_code"] == "approval_expired"
    assert big.value.details["approval_id"]

    with pytest.raises(CallDenied) as malformed:
        await ledger.call("card-vault", "charge", {}, headers={H_ESTIMATED_TOKENS: "lots"})
    assert malformed.value.details["reason_code"] == "malformed_context"
    assert malformed.value.details["policy_ids"] == []

    decisions = await audit_trail.wait_for(lambda r: r.kind == "decision", count=4)
    [asked] = [d for d in decisions if d.data["decision"]["effect"] == "needs_approval"]
    assert asked.data["context"] == {
        "estimated_tokens": 20_000, "estimated_tokens_known": True, "data_tags": ["pci-dss"],
        "on_behalf_of": ["user:ada"], "error": "",
    }  # fmt: skip
    stats = policy_of(stack).stats
    assert (stats.allowed, stats.denied) == (1, 3)


async def test_an_invalid_policy_set_stops_the_policy_service_with_cedars_message(
    make_stack: StackFactory, tmp_path: Path
) -> None:
    folder = tmp_path / "bad"
    shutil.copytree(lending_policy_dir(), folder)
    (folder / "typo.cedar").write_text(
        '@id("typo") permit (principal, action, resource) when { principal.teem == "x" };'
    )
    with pytest.raises(ConfigError) as info:
        await make_stack(policy_dir=folder, services=["policy"])
    assert "attribute `teem`" in info.value.message
    assert any(e.startswith("typo.cedar: ") for e in info.value.details["errors"])
