"""The allow-list decider: deny by default, exact and wildcard rules, strict file format."""

from __future__ import annotations

from pathlib import Path

import pytest

from broker.errors import ConfigError
from schemas import AgentManifest, AgentRecord
from services.policy.decider import AllowList, AllowRule, CallRequest


def _record(name: str) -> AgentRecord:
    return AgentRecord(
        manifest=AgentManifest(name=name, version="1.0.0", owner="o", team="t"),
        registered_at=0.0,
    )


def _ask(
    rules: AllowList, caller: str, target: str, capability: str
) -> tuple[str, tuple[str, ...]]:
    decision = rules.decide(
        CallRequest(caller, target, capability, _record(caller), _record(target))
    )
    assert decision.policy_version == rules.version
    assert decision.reasons
    return decision.effect, decision.policy_ids


RULES = AllowList.from_yaml(
    """
version: "2026-11-25.1"
allow:
  - {id: loan-score, caller: loan, target: credit, capabilities: [score]}
  - {id: any-to-support, caller: "*", target: support, capabilities: ["*"]}
  - {id: audit-reads, caller: auditor, target: "*", capabilities: [read]}
"""
)


@pytest.mark.parametrize(
    ("caller", "target", "capability", "effect", "policy_id"),
    [
        ("loan", "credit", "score", "allow", "loan-score"),
        ("loan", "credit", "delete", "deny", "default-deny"),
        ("fraud", "credit", "score", "deny", "default-deny"),
        ("fraud", "support", "answer", "allow", "any-to-support"),
        ("auditor", "credit", "read", "allow", "audit-reads"),
        ("auditor", "credit", "write", "deny", "default-deny"),
    ],
)
def test_rules_allow_only_what_they_name(
    caller: str, target: str, capability: str, effect: str, policy_id: str
) -> None:
    assert _ask(RULES, caller, target, capability) == (effect, (policy_id,))


def test_the_file_version_is_reported() -> None:
    assert RULES.version == "2026-11-25.1"


def test_without_a_version_the_content_digest_identifies_the_rules() -> None:
    one = AllowList((AllowRule(id="r", caller="a", target="b"),))
    same = AllowList((AllowRule(id="r", caller="a", target="b"),))
    other = AllowList((AllowRule(id="r", caller="a", target="c"),))
    assert one.version == same.version != other.version
    assert one.version.startswith("allowlist-")


def test_an_unregistered_caller_is_denied_even_by_a_wildcard_rule() -> None:
    everything = AllowList((AllowRule(id="all", caller="*", target="*"),))
    decision = everything.decide(CallRequest("ghost", "b", "x", None, _record("b")))
    assert decision.effect == "deny"
    assert decision.policy_ids == ("unregistered-caller",)


def test_a_missing_file_denies_everything(tmp_path: Path) -> None:
    rules = AllowList.from_file(tmp_path / "absent.yaml")
    assert rules.version == "deny-all"
    assert _ask(rules, "a", "b", "c") == ("deny", ("default-deny",))


@pytest.mark.parametrize(
    "text",
    [
        "allow: [{id: x, caller: 'a.b', target: b}]",
        "allow: [{id: x, caller: a, target: 'b c'}]",
        "allow: [{id: x, caller: a, target: b, capabilities: ['>']}]",
        "allow: [{caller: a, target: b}]",
        "allow: [{id: x, caller: a, target: b, extra: 1}]",
        "rules: []",
        "allow: {id: x}",
        "allow: [{id: x, caller: a",
    ],
)
def test_a_malformed_allow_list_is_a_config_error(text: str) -> None:
    with pytest.raises(ConfigError) as info:
        AllowList.from_yaml(text, source="rules.yaml")
    assert info.value.message.startswith("rules.yaml: ")


def test_an_empty_document_is_an_empty_deny_all_list() -> None:
    rules = AllowList.from_yaml("")
    assert rules.rules == ()
    assert _ask(rules, "a", "b", "c")[0] == "deny"
