"""Subject builders and token validation: only safe subject tokens get through."""

from __future__ import annotations

import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.errors import InvalidInput, InvalidSubjectToken
from broker.subjects import (
    Audience,
    Subjects,
    inbox_prefix,
    is_valid_token,
    reply_fault,
    subject_fault,
    validate_token,
)

ALPHABET = string.ascii_letters + string.digits + "_-"
valid_tokens = st.text(alphabet=ALPHABET, min_size=1, max_size=64)
FORBIDDEN = [".", "*", ">", " ", "\t", "\n", "\r"]


@settings(database=None, deadline=None)
@given(valid_tokens)
def test_valid_tokens_round_trip_through_every_builder(token: str) -> None:
    assert validate_token(token) == token
    assert is_valid_token(token)
    s = Subjects("sb")
    assert s.out(token, token, token).split(".") == ["sb", "out", token, token, token]
    assert s.inbound(token, token).split(".") == ["sb", "in", token, token]
    assert s.usage(token) == f"sb.usage.{token}"
    assert s.registry(token) == f"sb.registry.{token}"
    assert Subjects(token).out_wildcard == f"{token}.out.*.*.*"


@settings(database=None, deadline=None)
@given(
    before=st.text(alphabet=ALPHABET, max_size=30),
    bad=st.sampled_from(FORBIDDEN),
    after=st.text(alphabet=ALPHABET, max_size=30),
)
def test_tokens_with_dots_wildcards_or_whitespace_are_rejected(
    before: str, bad: str, after: str
) -> None:
    token = before + bad + after
    assert not is_valid_token(token)
    with pytest.raises(InvalidSubjectToken) as info:
        validate_token(token, what="agent name")
    assert info.value.details == {"name": token, "what": "agent name"}
    with pytest.raises(InvalidSubjectToken):
        Subjects("sb").out("caller", token, "cap")
    with pytest.raises(InvalidSubjectToken):
        Subjects("sb").inbound(token, "cap")


@settings(database=None, deadline=None)
@given(st.text(min_size=1, max_size=80))
def test_validity_matches_the_documented_alphabet(token: str) -> None:
    expected = 1 <= len(token) <= 64 and all(c in ALPHABET for c in token)
    assert is_valid_token(token) is expected


@pytest.mark.parametrize(
    "name", ["", "a.b", "a*", ">", "a b", " a", "a\n", "x" * 65, "ünïcode", "a/b"]
)
def test_invalid_token_error_explains_the_rule(name: str) -> None:
    with pytest.raises(InvalidSubjectToken) as info:
        validate_token(name, what="capability")
    assert "capability" in info.value.message
    assert "A-Z" in info.value.message
    # Part of the InvalidInput family, and a ValueError for plain Python callers.
    assert isinstance(info.value, InvalidInput)
    assert isinstance(info.value, ValueError)


def test_64_characters_is_the_longest_token() -> None:
    assert validate_token("x" * 64) == "x" * 64
    with pytest.raises(InvalidSubjectToken):
        validate_token("x" * 65)


def test_non_string_names_are_rejected() -> None:
    with pytest.raises(InvalidSubjectToken):
        validate_token(42)  # type: ignore[arg-type]


def test_subjects_reject_a_bad_prefix() -> None:
    with pytest.raises(InvalidSubjectToken):
        Subjects("sb.x")
    with pytest.raises(InvalidSubjectToken):
        Subjects("")


def test_subjects_build_the_documented_layout() -> None:
    s = Subjects("acme")
    assert s.out("a", "b", "cap") == "acme.out.a.b.cap"
    assert s.out_of("a") == "acme.out.a.>"
    assert s.inbound("b", "cap") == "acme.in.b.cap"
    assert s.inbound_of("b") == "acme.in.b.*"
    assert s.registry("register") == "acme.registry.register"
    assert s.audit_intake_all == "acme.audit.in.>"
    assert s.audit_log_all == "acme.audit.log.>"
    assert s.usage_all == "acme.usage.*"
    assert s.admin("policy", "reload") == "acme.admin.policy.reload"


def test_audit_subjects_sanitise_service_actors() -> None:
    s = Subjects("sb")
    assert s.audit_intake("decision", "service:policy") == "sb.audit.in.decision.service_policy"
    assert s.audit_log("call", "a.b c") == "sb.audit.log.call.a_b_c"
    assert s.audit_log("call", "") == "sb.audit.log.call._"
    assert s.audit_log("call", "y" * 100) == "sb.audit.log.call." + "y" * 64
    with pytest.raises(InvalidSubjectToken):
        s.audit_intake("not a kind", "a")


def test_inbox_prefix_is_private_to_the_agent() -> None:
    assert inbox_prefix("loan-origination") == "_INBOX.agent.loan-origination"
    with pytest.raises(InvalidSubjectToken):
        inbox_prefix("a.>")


# -- reply spaces -----------------------------------------------------------------------


def _well_formed(subject: str) -> bool:
    """The definition subject_fault implements, spelled out slowly."""
    return (
        0 < len(subject) <= 512
        and all("!" <= c <= "~" for c in subject)
        and all(t and t not in ("*", ">") for t in subject.split("."))
    )


@settings(database=None, deadline=None)
@given(st.text(alphabet="ab.*>- \x01\xff_", max_size=12))
def test_subject_fault_is_exactly_the_definition(subject: str) -> None:
    assert (subject_fault(subject) is None) == _well_formed(subject)


@pytest.mark.parametrize(
    ("reply", "audience", "agent", "operator", "ok"),
    [
        ("_INBOX.agent.a.x1", Audience.AGENT, "a", "", True),
        ("_INBOX.agent.ab.x1", Audience.AGENT, "a", "", False),  # another agent's (prefix)
        ("_INBOX.agent.a", Audience.AGENT, "a", "", False),  # the bare prefix
        ("_INBOX.agent.a.*", Audience.AGENT, "a", "", False),  # a wildcard
        ("$KV.sb_breakers.agent.b", Audience.AGENT, "a", "", False),
        ("sb.admin.budgets.set", Audience.AGENT, "a", "", False),
        ("", Audience.AGENT, "a", "", False),
        ("_INBOX.operator.x", Audience.OPERATOR, "", "", True),  # the bootstrap operator
        ("_INBOX.operator.ada.x", Audience.OPERATOR, "", "ada", True),
        ("_INBOX.operator.bob.x", Audience.OPERATOR, "", "ada", False),  # another operator's
        ("_INBOX.service.x", Audience.OPERATOR, "", "", False),
        ("_INBOX.service.x", Audience.OPERATOR | Audience.SERVICE, "", "", True),
        ("_INBOX.agent.a.x", Audience.OPERATOR | Audience.SERVICE, "a", "", False),
    ],
)
def test_a_reply_goes_only_into_the_senders_own_space(
    reply: str, audience: Audience, agent: str, operator: str, ok: bool
) -> None:
    assert (reply_fault(reply, audience, agent, operator) is None) == ok


def test_agent_scoped_subjects_name_their_sender() -> None:
    s = Subjects("sb")
    assert s.sender_of("sb.out.a.b.score") == "a"
    assert s.sender_of("sb.authz.a") == "a"
    assert s.sender_of("sb.registry.get.a") == "a"
    assert s.sender_of("sb.registry.changed") is None
    assert s.sender_of("sb.admin.budgets.set") is None
    assert s.sender_of("sb.out.a\ufffd.b.c") is None
