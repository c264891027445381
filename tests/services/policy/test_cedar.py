"""The Cedar engine: shipped examples, fail-closed guards, set validation, caching."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support import lending_policy_dir

from broker.errors import ConfigError
from schemas import AgentManifest, AgentRecord, Capability, Decision
from services.policy.cedar.decider import CedarDecider
from services.policy.cedar.entities import EntityCache, agent_entity
from services.policy.cedar.policy_set import (
    LABEL_FILE,
    SCHEMA_FILE,
    CedarPolicies,
    shipped_policy_dir,
)
from services.policy.decider import (
    H_DATA_TAGS,
    H_ESTIMATED_TOKENS,
    H_ON_BEHALF_OF,
    REASON_CODES,
    CallRequest,
    RequestContext,
    UseRequest,
    unknown_estimate,
)

#: The lending example on the default set (the demo's and the README's policies).
SHIPPED = lending_policy_dir()
#: The default set a fresh `signalbox up` activates.
DEFAULT = shipped_policy_dir()
SCHEMA = (SHIPPED / SCHEMA_FILE).read_text()
NOW = 1_800_000_000.0


def record(
    name: str,
    caps: dict[str, tuple[str, ...]] | None = None,
    *,
    registered_at: float = 1.0,
    **metadata: str,
) -> AgentRecord:
    """A registry record; ``metadata`` may carry ``namespace`` and ``tags``."""
    return AgentRecord(
        manifest=AgentManifest(
            name=name,
            version="1.0.0",
            owner="owner",
            team="team",
            metadata=metadata,
            capabilities=tuple(Capability(name=c, tags=t) for c, t in (caps or {}).items()),
        ),
        registered_at=registered_at,
    )


def shipped_plus(tmp_path: Path, extra: str) -> CedarDecider:
    """The shipped set plus one more policy file."""
    folder = tmp_path / "policies"
    shutil.copytree(SHIPPED, folder)
    (folder / "zz-test.cedar").write_text(extra)
    return CedarDecider(CedarPolicies.from_dir(folder), clock=lambda: NOW)


def texts(policies: str, *, schema: str = SCHEMA, label: str = "t") -> CedarDecider:
    return CedarDecider(
        CedarPolicies.from_texts({"p.cedar": policies}, schema, label=label), clock=lambda: NOW
    )


def call(
    decider: CedarDecider,
    caller: AgentRecord | None,
    target: AgentRecord | None,
    capability: str,
    **context: Any,
) -> Decision:
    decision = decider.decide(
        CallRequest(
            caller.manifest.name if caller else "ghost",
            target.manifest.name if target else "nobody",
            capability,
            caller,
            target,
            RequestContext(**context),
        )
    )
    _well_formed(decider, decision)
    return decision


def use(
    decider: CedarDecider, agent: AgentRecord | None, action: str, resource: str, **fields: Any
) -> Decision:
    context = RequestContext(**fields.pop("context", {}))
    name = agent.manifest.name if agent else "ghost"
    decision = decider.decide(UseRequest(name, agent, action, resource, context=context, **fields))
    _well_formed(decider, decision)
    return decision


def _well_formed(decider: CedarDecider, decision: Decision) -> None:
    assert decision.policy_version == decider.version
    assert decision.reason_code in REASON_CODES
    assert decision.reasons and all(decision.reasons)
    assert decision.eval_us > 0
    if decision.effect == "allow":
        assert decision.reason_code == "allowed"
        assert decision.policy_ids  # the permits that allowed it


LOANS = record("loan-origination")
CREDIT = record("credit-check", {"score": ("pii",), "history": ("pii",)})
SUPPORT = record("customer-support")
CARDS = record("card-vault", {"charge": ("pci-dss",), "stats": ()})
LEDGER = record("ledger", namespace="finance")
EU_BOT = record("eu-bot", tags="data-residency:eu, beta")
US_BOT = record("us-bot")


@pytest.fixture(scope="module")
def shipped() -> CedarDecider:
    return CedarDecider(CedarPolicies.from_dir(SHIPPED), clock=lambda: NOW)


# -- the shipped set -------------------------------------------------------------------------


def test_the_default_set_permits_nothing_and_keeps_its_guard_rails() -> None:
    """What a fresh `signalbox up` activates: deny by default, models only by explicit
    permit, the guard rails (forbids) in place; the lending example is not in it."""
    default = CedarDecider(CedarPolicies.from_dir(DEFAULT), clock=lambda: NOW)
    policies = default.policies
    assert policies.label == "default"
    assert set(policies.policies) == {
        "finance-calls-only-pci-dss",
        "eu-residency-models-stay-in-eu",
        "large-invocation-needs-approval",
    }
    assert call(default, LOANS, CREDIT, "score").reason_code == "default_deny"
    assert use(default, US_BOT, "use_model", "gpt-4o").reason_code == "default_deny"
    assert use(default, US_BOT, "use_tool", "web-search").reason_code == "default_deny"


def test_the_lending_example_loads_with_an_id_for_every_policy(shipped: CedarDecider) -> None:
    policies = shipped.policies
    assert policies.label == "lending-demo"
    assert policies.version == f"lending-demo@{policies.digest[:12]}"
    assert set(policies.policies) == {
        "loan-may-score",
        "fraud-may-score",
        "loan-may-check-fraud",
        "loan-may-ask-support",
        "portal-may-ask-recommender",
        "registered-agents-may-use-models",
        "finance-calls-only-pci-dss",
        "eu-residency-models-stay-in-eu",
        "large-invocation-needs-approval",
    }
    assert policies.approval_ids == {"large-invocation-needs-approval"}
    assert all(p.description for p in policies.policies.values())


def test_the_demo_calls_are_allowed_and_everything_else_denied_by_default(
    shipped: CedarDecider,
) -> None:
    allowed = call(shipped, LOANS, CREDIT, "score")
    assert (allowed.effect, allowed.policy_ids) == ("allow", ("loan-may-score",))
    denied = call(shipped, SUPPORT, CREDIT, "score")
    assert (denied.effect, denied.reason_code) == ("deny", "default_deny")
    assert denied.policy_ids == ("default-deny",)
    assert denied.reasons == (
        "no rule allows customer-support to call credit-check.score (deny by default)",
    )
    assert call(shipped, LOANS, CREDIT, "history").reason_code == "default_deny"
    # Tools are not permitted by the shipped set.
    assert use(shipped, US_BOT, "use_tool", "web-search").reason_code == "default_deny"


# -- the three examples ----------------------------------------------------------------------

LEDGER_MAY_CALL_CARDS = """
@id("ledger-may-call-cards")
permit (principal == Signalbox::Agent::"ledger", action == Signalbox::Action::"call",
        resource) when { resource.owner == Signalbox::Agent::"card-vault" };
@id("loans-may-call-cards")
permit (principal == Signalbox::Agent::"loan-origination",
        action == Signalbox::Action::"call", resource);
"""


def test_finance_agents_may_only_call_pci_dss_capabilities(tmp_path: Path) -> None:
    decider = shipped_plus(tmp_path, LEDGER_MAY_CALL_CARDS)
    ok = call(decider, LEDGER, CARDS, "charge")
    assert (ok.effect, ok.policy_ids) == ("allow", ("ledger-may-call-cards",))
    # The permit covers "stats" too, but the forbid overrides it.
    refused = call(decider, LEDGER, CARDS, "stats")
    assert (refused.effect, refused.reason_code) == ("deny", "forbidden")
    assert refused.policy_ids == ("finance-calls-only-pci-dss",)
    assert "finance namespace may only call capabilities tagged pci-dss" in refused.reasons[0]
    # Outside the finance namespace the rule does not apply.
    assert call(decider, LOANS, CARDS, "stats").effect == "allow"


@pytest.mark.parametrize(
    ("agent", "region", "effect"),
    [
        (EU_BOT, "us-east-1", "deny"),
        (EU_BOT, "", "deny"),  # unknown region counts as outside the EU
        (EU_BOT, "eu-west-1", "allow"),
        (EU_BOT, "europe-west4", "allow"),
        (US_BOT, "us-east-1", "allow"),
    ],
)
def test_eu_resident_agents_may_not_use_models_outside_the_eu(
    shipped: CedarDecider, agent: AgentRecord, region: str, effect: str
) -> None:
    decision = use(shipped, agent, "use_model", "gpt-4o", provider="openai", region=region)
    assert decision.effect == effect
    expected = "eu-residency-models-stay-in-eu" if effect == "deny" else (
        "registered-agents-may-use-models"
    )  # fmt: skip
    assert decision.policy_ids == (expected,)


def test_an_invocation_over_10000_tokens_needs_approval(shipped: CedarDecider) -> None:
    at_limit = call(shipped, LOANS, CREDIT, "score", estimated_tokens=10_000)
    assert at_limit.effect == "allow"
    over = call(shipped, LOANS, CREDIT, "score", estimated_tokens=10_001)
    assert (over.effect, over.reason_code) == ("needs_approval", "needs_approval")
    assert over.policy_ids == ("large-invocation-needs-approval",)
    assert "needs human approval" in over.reasons[0]
    model = use(shipped, US_BOT, "use_model", "gpt-4o", region="us-east-1",
                context={"estimated_tokens": 50_000})  # fmt: skip
    assert model.effect == "needs_approval"


def test_approval_never_turns_a_deny_into_a_question(shipped: CedarDecider) -> None:
    # No permit: approving would not help, so it stays a plain default deny.
    nobody = call(shipped, SUPPORT, CREDIT, "score", estimated_tokens=50_000)
    assert (nobody.effect, nobody.policy_ids) == ("deny", ("default-deny",))
    # A hard forbid wins; the approval forbid is not reported as deciding.
    eu = use(shipped, EU_BOT, "use_model", "gpt-4o", region="us-east-1",
             context={"estimated_tokens": 50_000})  # fmt: skip
    assert (eu.effect, eu.policy_ids) == ("deny", ("eu-residency-models-stay-in-eu",))


# -- fail closed -------------------------------------------------------------------------------


def test_an_unregistered_caller_is_denied_even_by_a_permit_for_everyone() -> None:
    everyone = texts('@id("all") permit (principal, action, resource);')
    decision = call(everyone, None, CREDIT, "score")
    assert (decision.effect, decision.reason_code, decision.policy_ids) == (
        "deny", "unknown_agent", (),
    )  # fmt: skip
    # A record of someone else is no record of the caller.
    impostor = everyone.decide(CallRequest("mallory", "credit-check", "score", LOANS, CREDIT))
    assert impostor.reason_code == "unknown_agent"
    assert use(everyone, None, "use_model", "gpt-4o").reason_code == "unknown_agent"


def test_a_missing_target_or_capability_is_denied() -> None:
    everyone = texts('@id("all") permit (principal, action, resource);')
    assert call(everyone, LOANS, None, "score").reason_code == "missing_entity"
    missing = call(everyone, LOANS, CREDIT, "delete")
    assert missing.reason_code == "missing_entity"
    assert "no capability 'delete'" in missing.reasons[0]
    assert use(everyone, US_BOT, "use_tool", "").reason_code == "missing_entity"


@pytest.mark.parametrize("action", ["call", "launch_missiles", "use_models", ""])
def test_an_unknown_action_is_denied(action: str) -> None:
    everyone = texts('@id("all") permit (principal, action, resource);')
    decision = use(everyone, US_BOT, action, "thing")
    assert (decision.effect, decision.reason_code) == ("deny", "unknown_action")


@pytest.mark.parametrize(
    "context",
    [
        {"estimated_tokens": -1},
        {"estimated_tokens": 10**13},
        {"estimated_tokens": True},
        {"data_tags": ("x",) * 65},
        {"data_tags": ("",)},
        {"on_behalf_of": ("user:ada\n",)},
        {"on_behalf_of": ("x" * 257,)},
        {"time": -5.0},
        {"error": "header Sb-Estimated-Tokens must be an integer"},
    ],
)
def test_a_malformed_context_is_denied(context: dict[str, Any]) -> None:
    everyone = texts('@id("all") permit (principal, action, resource);')
    decision = call(everyone, LOANS, CREDIT, "score", **context)
    assert (decision.effect, decision.reason_code) == ("deny", "malformed_context")
    assert decision.reasons[0].startswith("malformed context: ")
    assert use(everyone, US_BOT, "use_model", "m", context=context).reason_code == (
        "malformed_context"
    )


def test_a_malformed_price_is_denied() -> None:
    everyone = texts('@id("all") permit (principal, action, resource);')
    decision = use(everyone, US_BOT, "use_model", "m", price_per_1k_tokens=-1.0)
    assert decision.reason_code == "malformed_context"


def test_a_forbid_that_fails_to_evaluate_denies_instead_of_being_skipped() -> None:
    # Cedar skips a policy whose evaluation errors (here: integer overflow), so
    # its answer is Allow; Signalbox denies on any evaluation error.
    decider = texts(
        '@id("all") permit (principal, action, resource);\n'
        '@id("overflow") forbid (principal, action, resource)\n'
        "  when { context.estimated_tokens * 100000000000 > 5 };"
    )
    assert call(decider, LOANS, CREDIT, "score", estimated_tokens=1).effect == "deny"
    decision = call(decider, LOANS, CREDIT, "score", estimated_tokens=10**12)
    assert (decision.effect, decision.reason_code) == ("deny", "evaluation_error")
    assert "overflow" in decision.reasons[0]
    assert decision.policy_ids == ()


def test_entities_that_do_not_match_the_schema_deny() -> None:
    # An operator's schema asks for an attribute the registry does not have.
    schema = SCHEMA.replace("    tags: Set<String>,\n  };\n\n  entity Capability",
                            "    tags: Set<String>,\n    clearance: Long,\n  };\n\n"
                            "  entity Capability")  # fmt: skip
    assert "clearance" in schema
    decider = texts('@id("all") permit (principal, action, resource);', schema=schema)
    decision = call(decider, LOANS, CREDIT, "score")
    assert (decision.effect, decision.reason_code) == ("deny", "evaluation_error")
    assert "do not match the policy set's schema" in decision.reasons[0]


def test_an_unexpected_failure_denies_and_never_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    everyone = texts('@id("all") permit (principal, action, resource);')

    def explode(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("engine on fire")

    monkeypatch.setattr("services.policy.cedar.engine.authorize", explode)
    decision = call(everyone, LOANS, CREDIT, "score")
    assert (decision.effect, decision.reason_code) == ("deny", "evaluation_error")
    assert "engine on fire" in decision.reasons[0]


# -- loading a set -----------------------------------------------------------------------------


def _rejected(policies: str, *, schema: str = SCHEMA) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        CedarPolicies.from_texts({"bad.cedar": policies}, schema, source="set")
    assert info.value.message.startswith("set: ")
    return info.value


def test_a_policy_that_does_not_match_the_schema_is_rejected_with_cedars_message() -> None:
    err = _rejected(
        '@id("typo") permit (principal, action, resource) when { principal.teem == "x" };\n'
        '@id("bad-type") forbid (principal == Signalbox::User::"a", action, resource);'
    )
    errors = err.details["errors"]
    assert any(
        e.startswith("bad.cedar: ") and "attribute `teem`" in e and "`typo`" in e for e in errors
    ), errors
    assert any("unrecognized entity type `Signalbox::User`" in e for e in errors), errors
    assert "nothing was loaded" in err.message


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("permit (principal, action, resource) when { 1 + };", "unexpected token"),
        ("permit (principal, action, resource);", "has no @id"),
        ('@id("x") permit (principal, action, resource);\n'
         '@id("x") forbid (principal, action, resource);', "already used"),
        ('@id("default-deny") forbid (principal, action, resource);', "reserved"),
        ('@id("p") @effect("needs_approval") permit (principal, action, resource);',
         "is not supported"),
        ('@id("p") @effect("maybe") forbid (principal, action, resource);', "is not supported"),
        ('@id("t") permit (principal == ?principal, action, resource);', "templates"),
    ],
)  # fmt: skip
def test_an_invalid_set_is_rejected(text: str, expected: str) -> None:
    err = _rejected(text)
    assert any(expected in e for e in err.details["errors"]), err.details["errors"]


def test_an_invalid_schema_is_rejected() -> None:
    err = _rejected('@id("a") permit (principal, action, resource);', schema="namespace X {")
    assert "not a valid Cedar schema" in err.message


def test_a_folder_needs_to_exist_and_hold_a_schema(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        CedarPolicies.from_dir(tmp_path / "absent")
    with pytest.raises(ConfigError, match=SCHEMA_FILE):
        CedarPolicies.from_dir(tmp_path)


def test_a_bad_label_is_rejected(tmp_path: Path) -> None:
    folder = tmp_path / "p"
    shutil.copytree(SHIPPED, folder)
    (folder / LABEL_FILE).write_text("two words\n")
    with pytest.raises(ConfigError, match="label"):
        CedarPolicies.from_dir(folder)


def test_the_version_is_the_label_and_a_digest_of_the_content(tmp_path: Path) -> None:
    one = CedarPolicies.from_texts({"a.cedar": ""}, SCHEMA)
    same = CedarPolicies.from_texts({"a.cedar": ""}, SCHEMA)
    other = CedarPolicies.from_texts({"a.cedar": "// a comment changes the content"}, SCHEMA)
    assert one.version == same.version == one.digest[:12]
    assert other.version != one.version
    labelled = CedarPolicies.from_texts({"a.cedar": ""}, SCHEMA, label="2026-11-25.1")
    assert labelled.version == f"2026-11-25.1@{one.digest[:12]}"
    folder = tmp_path / "p"
    shutil.copytree(SHIPPED, folder)
    assert CedarPolicies.from_dir(folder, label="mine").version.startswith("mine@")
    (folder / LABEL_FILE).unlink()
    assert "@" not in CedarPolicies.from_dir(folder).version


def test_an_empty_set_denies_everything() -> None:
    empty = texts("")
    assert call(empty, LOANS, CREDIT, "score").reason_code == "default_deny"
    assert use(empty, US_BOT, "use_model", "m").reason_code == "default_deny"


# -- entities and caching ----------------------------------------------------------------------


def test_agent_entities_carry_namespace_and_tags_from_the_manifest() -> None:
    attrs = agent_entity(EU_BOT)["attrs"]
    assert attrs["namespace"] == "default"
    assert attrs["tags"] == ["beta", "data-residency:eu"]
    assert agent_entity(LEDGER)["attrs"]["namespace"] == "finance"


def test_entities_are_built_once_per_record_and_answers_once_per_input() -> None:
    decider = texts('@id("all") permit (principal, action, resource);')
    for _ in range(50):
        assert call(decider, LOANS, CREDIT, "score").effect == "allow"
    assert decider.builds == 3  # credit-check, loan-origination, and the pair
    assert decider.evaluations == 1
    # A context no policy reads (a new estimate, another time) is the same input.
    call(decider, LOANS, CREDIT, "score", estimated_tokens=5, time=NOW + 3600)
    assert (decider.builds, decider.evaluations) == (3, 1)
    # A new registration of credit-check (a new record) is rebuilt and re-evaluated.
    newer = record("credit-check", {"score": ("pii", "pci-dss")}, registered_at=2.0)
    call(decider, LOANS, newer, "score")
    assert (decider.builds, decider.evaluations) == (5, 2)


def test_answers_are_reused_for_contexts_the_policies_cannot_tell_apart() -> None:
    decider = texts(
        '@id("all") permit (principal, action, resource);\n'
        '@id("big") forbid (principal, action, resource) when { context.estimated_tokens > 1000 };'
    )
    for tokens in (1, 50, 999):  # all below 1000
        assert call(decider, LOANS, CREDIT, "score", estimated_tokens=tokens).effect == "allow"
    assert decider.evaluations == 1
    # Equal to a constant is a class of its own (it decides ==, <= and >= differently).
    assert call(decider, LOANS, CREDIT, "score", estimated_tokens=1000).effect == "allow"
    assert decider.evaluations == 2
    for tokens in (1001, 5000, 10**9):
        assert call(decider, LOANS, CREDIT, "score", estimated_tokens=tokens).effect == "deny"
    assert decider.evaluations == 3
    for second in range(5):  # no policy reads the time
        call(decider, LOANS, CREDIT, "score", estimated_tokens=7, time=NOW + second)
    assert decider.evaluations == 3


@pytest.mark.parametrize(
    ("condition", "expected"),
    [
        ("context.estimated_tokens > 10", "((estimated_tokens, (10,)),)"),
        ("10 <= context.estimated_tokens && context.estimated_tokens != 99",
         "((estimated_tokens, (10, 99)),)"),
        ("context.estimated_tokens * 2 > 10", "((estimated_tokens, None),)"),
        ("context.estimated_tokens > 10 && context.estimated_tokens + 1 > 3",
         "((estimated_tokens, None),)"),
        ('context.data_tags.contains("pii")', "((data_tags, None),)"),
        ("context.time < 5 && context.estimated_tokens == 3",
         "((estimated_tokens, (3,)), (time, (5,)))"),
        ("context has time", "whole"),
        ("context.estimated_tokens > context.time", "((estimated_tokens, None), (time, None))"),
    ],
)  # fmt: skip
def test_the_projection_keeps_what_the_policies_can_observe(condition: str, expected: str) -> None:
    policies = CedarPolicies.from_texts(
        {"p.cedar": f'@id("x") forbid (principal, action, resource) when {{ {condition} }};'},
        SCHEMA,
    )
    projection = policies.slice(("Signalbox::Agent", "a"), ("Signalbox::Action", "call"),
                                ("Signalbox::Capability", "b/c")).context  # fmt: skip
    shown = "whole" if projection.whole else str(projection.attrs).replace("'", "")
    assert shown == expected


@settings(max_examples=60, deadline=None)
@given(
    constants=st.lists(st.integers(-5, 40), min_size=1, max_size=3),
    ops=st.lists(st.sampled_from(["<", "<=", ">", ">=", "==", "!="]), min_size=3, max_size=3),
    times=st.lists(st.integers(0, 40), min_size=1, max_size=3),
    unknown=st.lists(st.integers(-5, 40), max_size=2),
    whole=st.booleans(),
    requests=st.lists(
        st.tuples(
            st.integers(0, 45), st.integers(0, 45), st.sampled_from([(), ("pii",)]),
            st.booleans(),
        ),
        min_size=1,
        max_size=25,
    ),
)  # fmt: skip
def test_a_memoized_answer_is_always_the_answer_cedar_gives(
    constants: list[int],
    ops: list[str],
    times: list[int],
    unknown: list[int],
    whole: bool,
    requests: list[tuple[int, int, tuple[str, ...], bool]],
) -> None:
    """Random thresholds on the tokens and the time, a tag rule, rules on unknown
    estimates (``estimated_tokens_known``) and, sometimes, one reading the context
    whole: every answer from the memo equals a fresh evaluation of the same request."""
    rules = ['@id("all") permit (principal, action, resource);']
    for i, c in enumerate(constants):
        rules.append(f'@id("tok{i}") forbid (principal, action, resource) '
                     f"when {{ context.estimated_tokens {ops[i % 3]} {c} }};")  # fmt: skip
    for i, t in enumerate(times):
        rules.append(f'@id("time{i}") forbid (principal, action, resource) '
                     f"when {{ {t} {ops[(i + 1) % 3]} context.time && "
                     'context.data_tags.contains("pii") };')  # fmt: skip
    for i, c in enumerate(unknown):
        rules.append(f'@id("unknown{i}") @effect("needs_approval") '
                     "forbid (principal, action, resource) when { !context.estimated_tokens_known "
                     f"&& context.estimated_tokens {ops[i]} {c} }};")  # fmt: skip
    if whole:
        rules.append('@id("whole") forbid (principal, action, resource) '
                     "when { context has time && context.estimated_tokens_known && "
                     "context.estimated_tokens == 7 };")  # fmt: skip
    policies = CedarPolicies.from_texts({"p.cedar": "\n".join(rules)}, SCHEMA)
    memoized = CedarDecider(policies, clock=lambda: 0.0)
    fresh = CedarDecider(policies, clock=lambda: 0.0, memo_size=0)
    for tokens, when, tags, known in requests:
        context = {"estimated_tokens": tokens, "time": when, "data_tags": tags,
                   "estimated_tokens_known": known}  # fmt: skip
        a = call(memoized, LOANS, CREDIT, "score", **context)
        b = call(fresh, LOANS, CREDIT, "score", **context)
        assert (a.effect, a.policy_ids) == (b.effect, b.policy_ids), context


def test_an_unknown_estimate_is_its_own_memo_key() -> None:
    """Two requests alike but for whether their estimate was given are told apart."""
    decider = texts(
        '@id("all") permit (principal, action, resource);\n'
        '@id("say") @effect("needs_approval") forbid (principal, action, resource) '
        "when { !context.estimated_tokens_known };"
    )
    assert call(decider, LOANS, CREDIT, "score", estimated_tokens=5).effect == "allow"
    unknown = call(decider, LOANS, CREDIT, "score", estimated_tokens=5,
                   estimated_tokens_known=False)  # fmt: skip
    assert (unknown.effect, unknown.policy_ids) == ("needs_approval", ("say",))
    assert decider.evaluations == 2
    # A policy reading the context whole sees the flag too.
    whole = texts(
        '@id("all") permit (principal, action, resource);\n'
        '@id("w") forbid (principal, action, resource) '
        "when { context has data_tags && !context.estimated_tokens_known };"
    )
    assert call(whole, LOANS, CREDIT, "score").effect == "allow"
    assert call(whole, LOANS, CREDIT, "score", estimated_tokens_known=False).effect == "deny"


def test_a_missing_estimate_is_never_zero_tokens(shipped: CedarDecider) -> None:
    """The stand-in keeps the shipped approval rule meaningful without an estimate."""
    assert unknown_estimate(1_000) == 1_000
    assert unknown_estimate(1_000, payload_bytes=100) == 1_000
    assert unknown_estimate(1_000, payload_bytes=96_001) == 24_001  # 4 bytes a token
    assert unknown_estimate(1, payload_bytes=10**15) == 10**12  # capped, still valid
    # A call carrying 24,000 tokens of text and no Sb-Estimated-Tokens header:
    big = RequestContext.from_headers({}, unknown_tokens=unknown_estimate(1_000, 96_000))
    decision = call(shipped, LOANS, CREDIT, "score", estimated_tokens=big.estimated_tokens,
                    estimated_tokens_known=big.estimated_tokens_known)  # fmt: skip
    assert (decision.effect, decision.policy_ids) == (
        "needs_approval", ("large-invocation-needs-approval",),
    )  # fmt: skip
    small = RequestContext.from_headers({}, unknown_tokens=unknown_estimate(1_000, 200))
    assert call(shipped, LOANS, CREDIT, "score", estimated_tokens=small.estimated_tokens,
                estimated_tokens_known=False).effect == "allow"  # fmt: skip
    assert RequestContext(5, estimated_tokens_known=1).problem()  # type: ignore[arg-type]


def test_the_entities_follow_the_record(tmp_path: Path) -> None:
    decider = shipped_plus(tmp_path, LEDGER_MAY_CALL_CARDS)
    assert call(decider, LEDGER, CARDS, "stats").effect == "deny"
    retagged = record("card-vault", {"charge": ("pci-dss",), "stats": ("pci-dss",)},
                      registered_at=9.0)  # fmt: skip
    assert call(decider, LEDGER, retagged, "stats").effect == "allow"
    moved = record("ledger", registered_at=9.0, namespace="treasury")
    assert call(decider, moved, CARDS, "stats").effect == "allow"


def test_time_is_part_of_the_context() -> None:
    now = [NOW]
    decider = CedarDecider(
        CedarPolicies.from_texts(
            {"p.cedar": '@id("all") permit (principal, action, resource);\n'
                        '@id("after-hours") forbid (principal, action, resource)\n'
                        f"  when {{ context.time >= {int(NOW) + 60} }};"},
            SCHEMA,
        ),
        clock=lambda: now[0],
    )  # fmt: skip
    assert call(decider, LOANS, CREDIT, "score").effect == "allow"
    now[0] += 60
    assert call(decider, LOANS, CREDIT, "score").policy_ids == ("after-hours",)
    explicit = call(decider, LOANS, CREDIT, "score", time=NOW)
    assert explicit.effect == "allow"


def test_swap_replaces_the_set_for_the_next_decision() -> None:
    decider = texts("")
    assert call(decider, LOANS, CREDIT, "score").effect == "deny"
    newer = CedarPolicies.from_texts(
        {"p.cedar": '@id("all") permit (principal, action, resource);'}, SCHEMA, label="v2"
    )
    decider.swap(newer)
    decision = call(decider, LOANS, CREDIT, "score")
    assert (decision.effect, decision.policy_version) == ("allow", newer.version)


# -- call context from headers -----------------------------------------------------------------


def test_call_context_is_read_from_headers() -> None:
    ctx = RequestContext.from_headers(
        {H_ESTIMATED_TOKENS: " 12000 ", H_DATA_TAGS: "pii, pci-dss,,", H_ON_BEHALF_OF: "user:ada"}
    )
    assert ctx == RequestContext(12_000, ("pii", "pci-dss"), ("user:ada",))
    # No header: an unknown estimate, never zero tokens (the stand-in the service passes).
    missing = RequestContext.from_headers({}, unknown_tokens=1_000)
    assert missing == RequestContext(1_000, estimated_tokens_known=False)
    assert RequestContext.from_headers({H_ESTIMATED_TOKENS: "0"}) == RequestContext(0)
    for bad in ("12k", "-1", "1e5", "١٢", "9" * 30):
        assert RequestContext.from_headers({H_ESTIMATED_TOKENS: bad}).problem(), bad


def test_decisions_round_trip_on_the_wire(shipped: CedarDecider) -> None:
    decision = call(shipped, LOANS, CREDIT, "score")
    assert msgspec.json.decode(msgspec.json.encode(decision), type=Decision) == decision


# -- slices ----------------------------------------------------------------------------------

FLEET_RULES = (
    "".join(
        f'@id("caller-{i}-may-score")\n'
        f'permit (principal == Signalbox::Agent::"caller-{i}", action == Signalbox::Action::"call",'
        ' resource == Signalbox::Capability::"credit-check/score");\n'
        for i in range(20)
    )
    + """
@id("agents-may-ask-support")
permit (principal is Signalbox::Agent, action in [Signalbox::Action::"call"], resource)
when { resource.owner == Signalbox::Agent::"customer-support" };
@id("no-tools-for-callers")
forbid (principal, action in [Signalbox::Action::"use_tool", Signalbox::Action::"use_model"],
        resource is Signalbox::Tool) when { principal.team == "team" };
"""
)


def test_each_request_is_evaluated_against_the_policies_that_can_apply(tmp_path: Path) -> None:
    import cedarpy

    decider = shipped_plus(tmp_path, FLEET_RULES)
    policies = decider.policies
    answer = record("customer-support", {"answer": ()})
    callers = [record(f"caller-{i}") for i in range(0, 25, 3)] + [LOANS, SUPPORT, EU_BOT]
    seen: set[str] = set()
    whole_set_entities = EntityCache(64)
    for caller in callers:
        for target, capability in ((CREDIT, "score"), (CREDIT, "history"), (answer, "answer")):
            for tokens in (0, 20_000):
                decision = call(decider, caller, target, capability, estimated_tokens=tokens)
                seen.add(decision.reason_code)
                # The same request against the whole set, straight through Cedar.
                entities = whole_set_entities.for_call(
                    policies.schema, caller, whole_set_entities.agent(policies.schema, target)
                )
                request = {
                    "principal": {"type": "Signalbox::Agent", "id": caller.manifest.name},
                    "action": {"type": "Signalbox::Action", "id": "call"},
                    "resource": {"type": "Signalbox::Capability",
                                 "id": f"{target.manifest.name}/{capability}"},
                    "context": {"estimated_tokens": tokens, "data_tags": [], "on_behalf_of": [],
                                "time": int(NOW)},
                }  # fmt: skip
                whole = cedarpy.is_authorized(request, policies.cedar, entities)
                assert not whole.diagnostics.errors
                if decision.effect == "allow":
                    assert whole.allowed
                    assert set(decision.policy_ids) == set(whole.diagnostics.reasons)
                elif decision.reason_code == "default_deny":  # no permit matched
                    assert not whole.allowed
                    assert set(whole.diagnostics.reasons) <= policies.approval_ids
                else:  # the forbids that decided are among those Cedar saw match
                    assert not whole.allowed
                    assert set(decision.policy_ids) <= set(whole.diagnostics.reasons)
    assert seen == {"allowed", "default_deny", "needs_approval"}
    # One caller's slice leaves the other callers' permits out.
    own = policies.slice(
        ("Signalbox::Agent", "caller-3"),
        ("Signalbox::Action", "call"),
        ("Signalbox::Capability", "credit-check/score"),
    )
    assert "caller-3-may-score" in own.ids
    assert not any(i.startswith("caller-") and i != "caller-3-may-score" for i in own.ids)
    assert "agents-may-ask-support" in own.ids  # `resource` unconstrained in its scope
    assert "no-tools-for-callers" not in own.ids  # action scope rules it out
    assert "eu-residency-models-stay-in-eu" not in own.ids
    assert len(own.ids) < len(policies.policies) / 4


@pytest.mark.parametrize(
    "body",
    [
        {"action": "use_model", "resource": "gpt-4o", "data_tags": ["pii\n"]},
        {"action": "use_model", "resource": "gpt-4o", "region": "eu-west-1\n"},
        {"action": "use_model", "resource": "gpt 4o"},
        {"action": "use.model", "resource": "gpt-4o"},
        {"action": "use_model", "resource": "gpt-4o", "estimated_tokens": -1},
        {"action": "use_model", "resource": "gpt-4o", "on_behalf_of": ["x"] * 33},
    ],
)
def test_an_authz_request_out_of_shape_does_not_decode(body: dict[str, Any]) -> None:
    from schemas import AuthzRequest

    with pytest.raises(msgspec.ValidationError):
        msgspec.json.decode(
            msgspec.json.encode({"type": "authz_request.v1", **body}), type=AuthzRequest
        )
