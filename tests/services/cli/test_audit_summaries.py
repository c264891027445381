"""Every kind of audit record explains itself on one line (``audit replay``/``tail``, ``trace``).

The records are built with the ``data`` their services write (the emitting
code is named beside each); a real stack then shows that a breaker refusal,
a budget refusal and a model-use decision name their breaker, their budget,
and their model and region in ``signalbox trace`` (tree and JSON) and
``signalbox audit replay``.
"""

from __future__ import annotations

import io
import json
from typing import TYPE_CHECKING, Any

import msgspec
import pytest
from nats.aio.client import Client
from rich.cells import cell_len
from rich.console import Console
from support import ainvoke, eventually, policy_of

from broker.connection import connect
from broker.runtime.identity import operator_connect_options
from broker.settings import Settings
from broker.subjects import Subjects
from schemas import (
    AuditEvent,
    AuditKind,
    Breaker,
    Budget,
    BudgetCharge,
    BudgetStatus,
    CallOutcome,
    Decision,
    SetBudget,
    TripBreaker,
)
from services.cli.client import admin_request
from services.cli.render import audit_line, audit_table, summarize
from services.cli.trace_cmds import build_tree, trace_tree

if TYPE_CHECKING:
    from support import AgentFactory, AuditTrail, StackFactory

NOW = 1_795_000_000.0
CREDENTIAL = "abcdefgh23456789"
MODEL = "gpt-4o-mini-2024-07-18"
ERRORS = Breaker(
    key="agent.b", scope="agent", name="b", state="open", reason="error_rate",
    text="5 of 10 calls to b failed on its side in 60s (50%, trips above 20%)",
    figures={"errors": 5.0, "calls": 10.0, "error_rate": 0.5}, since=NOW, until=NOW + 30,
    cooldown=30.0, tripped_by="service:policy", trips=1,
)  # fmt: skip


def record(
    kind: AuditKind, data: dict[str, Any], *, actor: str = "a", subject: str = ""
) -> AuditEvent:
    return AuditEvent(
        id="e1", time=NOW, kind=kind, actor=actor, subject=subject,
        trace_id="4bf92f3577b34da6a3ce929d0e0e4736", seq=7, hash="9f86d081" * 8, data=data,
    )  # fmt: skip


def built(value: msgspec.Struct) -> dict[str, Any]:
    out: dict[str, Any] = msgspec.to_builtins(value)
    return out


def call_decision(decision: Decision, **extra: Any) -> dict[str, Any]:
    """As services.policy.service._on_call (and the breaker gate's _refuse_call) record it."""
    return {"call_id": "c1", "caller": "a", "target": "b", "capability": "work",
            "decision": built(decision), **extra}  # fmt: skip


def use_decision(decision: Decision, region: str = "eu-west-1", **extra: Any) -> dict[str, Any]:
    """As services.policy.service._authorize records a model use."""
    return {
        "request_id": "r1", "agent": "a", "action": "use_model", "resource": MODEL,
        "provider": "openai", "region": region, "price_per_1k_tokens": 0.0,
        "estimated_tokens": 10_000, "estimated_tokens_known": True, "data_tags": [],
        "on_behalf_of": [], "decision": built(decision), **extra,
    }  # fmt: skip


RISK_DAY = Budget(scope="team", name="risk", window="day", limit_usd=5.0, set_by="operator:alice")
RISK_CHARGE = BudgetCharge(key="team.risk.day", limit_usd=5.0, spent_usd=4.95, reserved_usd=0.04)

#: (what, record, its one-line summary)
CASES: list[tuple[str, AuditEvent, str]] = [
    ("call allowed", record("decision", call_decision(
        Decision(effect="allow", reason_code="allowed", policy_ids=("a-may-call-b",)))),
     "allow → b.work [a-may-call-b]"),
    ("call denied by default", record("decision", call_decision(
        Decision(effect="deny", reason_code="default_deny", policy_ids=("default-deny",)))),
     "deny → b.work [default-deny]"),
    ("call forbidden", record("decision", call_decision(
        Decision(effect="deny", reason_code="forbidden", policy_ids=("pii-stays-in-the-eu",)))),
     "deny → b.work forbidden [pii-stays-in-the-eu]"),
    ("call held for approval", record("decision", call_decision(
        Decision(effect="needs_approval", reason_code="needs_approval",
                 policy_ids=("large-payments-need-approval",)), approval_id="ap1")),
     "needs_approval → b.work [large-payments-need-approval] approval ap1"),
    ("approved call used (relay.forward_approved)", record("decision", call_decision(
        Decision(effect="allow", reason_code="approved", policy_ids=("large-payments",)),
        approved_by="operator:alice", approval_id="ap1")),
     "allow → b.work approved by operator:alice"),
    ("call refused by a breaker (breaker_gate._refuse_call)", record("decision", call_decision(
        Decision(effect="deny", reason_code="breaker_open", reasons=("open",)),
        breaker=built(ERRORS))),
     "deny → b.work: breaker agent.b open (error_rate)"),
    ("fail-closed guard", record("decision", call_decision(
        Decision(effect="deny", reason_code="unknown_agent"))),
     "deny → b.work unknown_agent"),
    ("model use allowed, reserved", record("decision", use_decision(
        Decision(effect="allow", reason_code="allowed", policy_ids=("any-model",),
                 reservation_id="res1", reserved_usd=0.1), budgets=["agent.a.day"])),
     f"allow use_model {MODEL} @ eu-west-1 (openai) [any-model] reserved $0.10 on agent:a day"),
    ("model use forbidden, region unknown", record("decision", use_decision(
        Decision(effect="deny", reason_code="forbidden", policy_ids=("eu-only",)), region="")),
     f"deny use_model {MODEL} (openai) forbidden [eu-only]"),
    ("model use over budget (budget_check)", record("decision", use_decision(
        Decision(effect="deny", reason_code="budget_exceeded", budget=RISK_CHARGE),
        budget={"key": "team.risk.day", "scope": "team", "name": "risk", "window": "day",
                "limit_usd": 5.0, "spent_usd": 4.95, "reserved_usd": 0.04, "needed_usd": 0.1},
        allowed_by=["any-model"])),
     f"deny use_model {MODEL} @ eu-west-1 (openai) budget_exceeded: team:risk day budget, "
     "$4.95 spent + $0.04 reserved of $5.00, needs $0.10"),
    ("budget refusal recorded before budget fields (the permit is not shown)", record(
        "decision", use_decision(Decision(effect="deny", reason_code="budget_exceeded",
                                          policy_ids=("any-model",), budget=RISK_CHARGE))),
     f"deny use_model {MODEL} @ eu-west-1 (openai) budget_exceeded: team:risk day budget, "
     "$4.95 spent + $0.04 reserved of $5.00"),
    ("no estimate for a budgeted agent", record("decision", use_decision(
        Decision(effect="deny", reason_code="estimate_required"), budgets=["agent.a.day"],
        allowed_by=["any-model"])),
     f"deny use_model {MODEL} @ eu-west-1 (openai) estimate_required: budgets agent:a day"),
    ("unreadable budget", record("decision", use_decision(
        Decision(effect="deny", reason_code="budget_unreadable"),
        budget={"key": "team.risk.day", "scope": "team", "name": "risk", "window": "day",
                "unreadable": "Expected `object`"})),
     f"deny use_model {MODEL} @ eu-west-1 (openai) budget_unreadable: team:risk day budget "
     "record unreadable"),
    ("model use refused by a breaker (breaker_gate.check_use)", record("decision", use_decision(
        Decision(effect="deny", reason_code="breaker_open", breaker=ERRORS),
        breaker=built(ERRORS))),
     f"deny use_model {MODEL} @ eu-west-1 (openai): breaker agent.b open (error_rate)"),
    ("use refused by a breaker, recorded before the use was named", record("decision", {
        "request_id": "r1", "agent": "a", "breaker": built(ERRORS),
        "decision": built(Decision(effect="deny", reason_code="breaker_open", breaker=ERRORS))}),
     "deny model or tool use: breaker agent.b open (error_rate)"),
    ("shadow disagreement (policy_sets.compare_shadow)", record("shadow", {
        "agent": "a", "action": "use_model", "resource": MODEL,
        "active": {"effect": "allow", "policy_ids": ["any-model"], "policy_version": "v1"},
        "shadow": {"effect": "deny", "policy_ids": ["eu-only"], "policy_version": "v2",
                   "version": 13, "reasons": []}}),
     f"shadow v13 would deny (active allow) use_model {MODEL} [eu-only]"),
    ("call outcome (relay._outcome)", record("call", built(CallOutcome(
        call_id="c1", caller="a", target="b", capability="work", ok=False, latency_ms=5000.0,
        error_code="outcome_unknown", version="2.0.0")), subject="sb.in.b.work"),
     "error outcome_unknown b.work 5000.0 ms (version 2.0.0)"),
    ("usage (cost metering)", record("usage", {
        "model": MODEL, "provider": "openai", "input_tokens": 1_200, "output_tokens": 345,
        "cost_nanos": 1_234_000, "unreserved": True, "overspent": ["agent.a.day"]}),
     f"{MODEL} 1,200 in / 345 out $0.001234 unreserved over budget agent:a day"),
    ("rejected reply subject, summarized (Service._audit_refusal)", record("rejected", {
        "code": "invalid_reply_subject", "message": "request on sb.out.a.b.work refused",
        "details": {"subject": "sb.out.a.b.work", "reply": "$KV.sb_breakers.agent.a",
                    "fault": "reply subject outside the sender's reply space"},
        "summary": {"count": 12, "counts": {}, "window_s": 10.0, "overflow": False}},
        subject="sb.out.a.b.work"),
     "invalid_reply_subject on sb.out.a.b.work (reply $KV.sb_breakers.agent.a) "
     "(12 times in 10s)"),
    ("rejected unknown target (Service.reject)", record("rejected", {
        "code": "unknown_target", "message": "zz is not a registered agent",
        "details": {"target": "zz", "capability": "work"}}, subject="sb.out.a.zz.work"),
     "unknown_target on sb.out.a.zz.work (zz.work)"),
    ("register (registry)", record("registry", {
        "op": "register", "name": "a", "version": "1.2.0", "owner": "o", "team": "t",
        "created": True, "capabilities": ["score", "check"],
        "capability_tags_changed": {"score": {"before": [], "after": ["pii"]}}}),
     "register 1.2.0 [score, check] new data tags changed: score"),
    ("deregister (registry)", record("registry", {
        "op": "deregister", "name": "a", "versions": ["1.0.0", "1.1.0"], "by": "operator"}),
     "deregister 1.0.0, 1.1.0 by operator"),
    ("leave (registry)", record("registry", {
        "op": "leave", "name": "a", "version": "1.0.0", "instance": "i-1", "by": "agent"}),
     "leave 1.0.0 instance i-1"),
    ("auth refused (authcallout._audit_failure)", record("auth", {
        "outcome": "refused", "agent": "a", "credential": CREDENTIAL,
        "client_host": "10.0.0.1", "client_id": 4, "reason": "expired", "source": "k"}),
     f"refused expired credential {CREDENTIAL} from 10.0.0.1"),
    ("auth failures summarized", record("auth", {
        "outcome": "refused", "agent": "unknown", "credential": "", "client_host": "10.0.0.9",
        "client_id": 4, "reason": "unknown", "source": "10.0.0.9", "summary": True,
        "failures": 40, "reasons": {"unknown": 38, "bad_secret": 2}, "first_at": NOW,
        "window": 60.0}, actor="unknown"),
     "refused 40 times from 10.0.0.9 in 60s (unknown 38, bad_secret 2)"),
    ("budget set (budget_desk.set_budget)", record("admin", {
        "op": "budget_set", "budget": built(RISK_DAY),
        "previous": built(msgspec.structs.replace(RISK_DAY, limit_usd=2.0)),
        "given": ["limit_usd"]}, actor="operator:alice"),
     "set budget team:risk day $5.00 (was $2.00)"),
    ("budget removed", record("admin", {
        "op": "budget_removed", "budget": built(RISK_DAY)}, actor="operator:alice"),
     "removed budget team:risk day ($5.00)"),
    ("bind (identity.bind)", record("admin", {
        "op": "bind", "agent": "a", "before": {"team": "risk", "tags": ["x"]},
        "after": {"team": "payments", "tags": ["x", "y"]}, "changed": ["team", "tags"],
        "versions": 2, "reason": "moved desks"}, actor="operator:alice"),
     "bind a: team risk → payments; tags x → x, y: moved desks"),
    ("revoke (identity.revoke)", record("admin", {
        "op": "revoke", "agent": "a", "credentials": [CREDENTIAL], "disconnected": 2,
        "reason": "leaked"}, actor="operator:alice"),
     f"revoke a {CREDENTIAL} (2 connections closed): leaked"),
    ("operator revoked (operators.revoke)", record("admin", {
        "op": "operators.revoke", "name": "bob", "credentials": ["op1"], "disconnected": 0,
        "reason": ""}, actor="operator:alice"),
     "revoke operator bob op1"),
    ("policy applied (policy_sets._move)", record("admin", {
        "op": "policy.apply", "version": 12, "previous": 11, "digest": "abc",
        "label": "tighten pii", "policy_ids": ["x"]}, actor="operator:alice"),
     'policy apply v12 "tighten pii" (was v11)'),
    ("approval decided (approvals)", record("admin", {
        "op": "approvals.approve", "approval_id": "ap1", "call_id": "c1", "caller": "a",
        "target": "b", "capability": "pay", "binding": {}, "reason": "ok by finance"},
        actor="operator:alice"),
     "approve approval ap1: a → b.pay: ok by finance"),
    ("rollout (routes._change)", record("admin", {
        "op": "rollout_set", "target": "b", "weights": {"2.0.0": 10, "1.0.0": 90},
        "stable": "1.0.0", "canary": "2.0.0", "sticky": False, "deprecated": [],
        "guard": None, "weights_before": None}, actor="operator:alice"),
     "rollout set b: 2.0.0 10%, 1.0.0 90%"),
    ("an admin record nobody summarizes", record("admin", {
        "op": "trip", "note": "rolling back", "n": 3, "ok": True, "nested": {"k": [1, 2]}},
        actor="service:test"),
     'op=trip note="rolling back" n=3 ok=yes nested.k=1,2'),
    ("breaker tripped by a detector (BreakerBoard._audit)", record("breaker", {
        "op": "trip", "key": "agent.b", "from": "closed", "to": "open",
        "breaker": built(ERRORS)}, actor="service:policy"),
     "trip agent.b closed → open (error_rate) errors=5 calls=10 error_rate=0.5 for 30s"),
    ("breaker tripped by hand", record("breaker", {
        "op": "trip", "key": "team.risk", "from": "closed", "to": "open",
        "breaker": built(Breaker(key="team.risk", scope="team", name="risk", state="open",
                                 reason="manual", text="maintenance window"))},
        actor="operator:alice"),
     'trip team.risk closed → open (manual) until reset: "maintenance window"'),
    ("breaker tripped by an overspend (cost)", record("breaker", {
        "op": "trip", "key": "agent.a", "from": "closed", "to": "open",
        "breaker": built(Breaker(key="agent.a", scope="agent", name="a", state="open",
                                 reason="budget", figures={"limit_usd": 5.0, "spent_usd": 5.5}))},
        actor="service:cost"),
     "trip agent.a closed → open (budget) limit_usd=$5.00 spent_usd=$5.50 until reset"),
    ("breaker reset", record("breaker", {
        "op": "reset", "key": "agent.b", "from": "open", "to": "closed",
        "breaker": built(msgspec.structs.replace(ERRORS, state="closed", text="db fixed"))},
        actor="operator:alice"),
     'reset agent.b open → closed: "db fixed"'),
    ("soft budget alert (budget_desk.alert)", record("budget", {
        "event": "soft_threshold", "budget": built(RISK_DAY),
        "charge": built(BudgetCharge(key="team.risk.day", limit_usd=5.0, spent_usd=4.1)),
        "soft_ratio": 0.8}),
     "soft alert team:risk day at 80%: $4.10 spent + $0.00 reserved of $5.00"),
    ("budget exhausted", record("budget", {
        "event": "exhausted", "budget": built(RISK_DAY),
        "charge": built(BudgetCharge(key="team.risk.day", limit_usd=5.0, spent_usd=5.0)),
        "soft_ratio": 0.8}),
     "exhausted team:risk day: $5.00 spent + $0.00 reserved of $5.00"),
    ("reservation refused (budget_desk.reserve)", record("budget", {
        "event": "refused", "agent": "a", "model": MODEL, "amount_usd": 0.006,
        "budget": built(BudgetCharge(key="agent.a.day", limit_usd=0.0005, spent_usd=0.0004)),
        "exhausted": False}),
     f"refused {MODEL} $0.006: agent:a day $0.0004 spent + $0.00 reserved of $0.0005"),
    ("unreserved usage (metering._audit_unreserved)", record("budget", {
        "event": "unreserved", "alert": "unreserved", "agent": "a", "report": "u1",
        "model": MODEL, "cost_usd": 0.0123, "reservation_id": "res1",
        "reservation_expired": True, "text": "..."}),
     f"unreserved usage of {MODEL} $0.0123 (its reservation had expired)"),
    ("overspend (budget_desk._overspent)", record("alert", {
        "event": "overspend", "budget": "agent.a.day", "scope": "agent", "name": "a",
        "window": "day", "limit_usd": 5.0, "spent_usd": 5.5, "reserved_usd": 0.0,
        "over_usd": 0.5, "agent": "a", "report": "u1", "model": MODEL, "cost_usd": 0.6,
        "fix": "signalbox breakers reset agent:a"}),
     f"overspend agent:a day by $0.50: $5.50 spent + $0.00 reserved of $5.00 ({MODEL}); "
     "breaker agent.a tripped"),
    ("unreadable record (AuditEmitter.alert_unreadable)", record("alert", {
        "event": "unreadable_record", "bucket": "sb_budgets", "key": "team.risk.day",
        "reason": "Expected `object`, got `str`", "effect": "refused",
        "fix": "signalbox budgets set team:risk --limit USD --window day"}),
     "unreadable sb_budgets team.risk.day: Expected `object`, got `str`; fix: signalbox "
     "budgets set team:risk --limit USD --window day"),
]  # fmt: skip


@pytest.mark.parametrize(("event", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_each_kind_of_record_is_one_readable_line(event: AuditEvent, expected: str) -> None:
    summary = summarize(event).plain
    assert summary == expected
    assert "\n" not in summary and "{" not in summary and "?.?" not in summary


def test_every_kind_the_services_emit_has_its_own_summary() -> None:
    kinds = {c[1].kind for c in CASES}
    assert kinds == {"decision", "shadow", "call", "usage", "rejected", "registry", "auth",
                     "admin", "breaker", "budget", "alert"}  # fmt: skip


def _printed(width: int, *renderables: Any, soft_wrap: bool = False) -> list[str]:
    console = Console(width=width, file=io.StringIO(), force_terminal=False, soft_wrap=soft_wrap)
    for renderable in renderables:
        console.print(renderable)
    file = console.file
    assert isinstance(file, io.StringIO)
    return file.getvalue().splitlines()


def test_summaries_stay_readable_at_80_columns_in_a_pipe() -> None:
    events = [c[1] for c in CASES]
    lines = _printed(80, audit_table(events, title="Audit replay"))
    assert all(cell_len(line) <= 80 for line in lines), lines
    tokens = {token for line in lines for token in line.split()}
    # Ids, models, keys and amounts are never cut or split.
    for word in (MODEL, CREDENTIAL, "agent.b", "team:risk", "$4.95", "eu-west-1",
                 "sb.out.a.b.work", "[eu-only]"):  # fmt: skip
        assert word in tokens, (word, lines)
    # audit tail: one line per record, whatever its length.
    tail = _printed(80, *(audit_line(e) for e in events), soft_wrap=True)
    assert len(tail) == len(events)


def test_a_trace_tree_names_the_model_and_region_of_a_use() -> None:
    use = msgspec.structs.replace(
        CASES[7][1], span_id="a1b2c3d4e5f60718", parent_span_id="0102030405060708"
    )
    [root] = build_tree([use])
    lines = _printed(200, trace_tree(use.trace_id, [root]))
    assert any(f"authz a allow use_model {MODEL} @ eu-west-1 (openai)" in ln for ln in lines)


# -- end to end ------------------------------------------------------------------------------

USE_MODELS = """
@id("any-model")
permit (principal, action == Signalbox::Action::"use_model", resource);
"""


@pytest.fixture(autouse=True)
def _wide_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "400")  # one record, one tree node per line


async def _operator(settings: Settings) -> Client:
    return await connect(settings.nats_url, name="test-operator",
                         **operator_connect_options(settings))  # fmt: skip


async def test_refusals_name_their_breaker_budget_and_model_in_traces_and_replay(
    make_stack: StackFactory,
    make_agent: AgentFactory,
    audit_trail: AuditTrail,
    settings: Settings,
) -> None:
    stack = await make_stack(rules=USE_MODELS, services=["tracing", "registry", "policy", "cost"])
    policy = policy_of(stack)
    user, spender, tripped = make_agent("user"), make_agent("spender"), make_agent("tripped")
    for agent in (user, spender, tripped):
        await agent.start()
    operator = await _operator(settings)
    subjects = Subjects(settings.subject_prefix)
    try:
        await admin_request(
            operator, subjects, "set",
            SetBudget(scope="agent", name="spender", window="day", limit_usd=0.0005,
                      requested_by="alice"),
            BudgetStatus, service="budgets",
        )  # fmt: skip
        await admin_request(
            operator, subjects, "trip",
            TripBreaker(key="agent.tripped", text="maintenance window", requested_by="alice"),
            Breaker, service="breakers",
        )  # fmt: skip
    finally:
        await operator.close()
    await eventually(
        lambda: (
            policy.budgets is not None
            and policy.budgets.get("agent.spender.day")
            and policy.breakers.get("agent.tripped")
        ),
        "the policy service to see the budget and the breaker",
    )

    ask: dict[str, Any] = {"provider": "openai", "region": "eu-west-1", "estimated_tokens": 10_000}
    allowed = await user.authorize("use_model", "gpt-4o-mini", **ask)
    allowed_trace = allowed.trace_id
    over = await spender.authorize("use_model", "gpt-4o-mini", **ask)
    over_trace = over.trace_id
    refused = await tripped.authorize("use_model", "gpt-4o-mini", **ask)
    refused_trace = refused.trace_id
    assert (allowed.effect, allowed.policy_ids) == ("allow", ("any-model",))
    # The budget's deny is the budget's: the permit that allowed the use is not its reason.
    assert (over.effect, over.reason_code, over.policy_ids) == ("deny", "budget_exceeded", ())
    assert over.budget is not None and over.budget.key == "agent.spender.day"
    assert len(over.reasons) == 1 and "agent.spender.day" in over.reasons[0]
    assert (refused.effect, refused.reason_code) == ("deny", "breaker_open")
    traces = {allowed_trace, over_trace, refused_trace}
    records = await audit_trail.wait_for(
        lambda r: r.kind == "decision" and r.trace_id in traces, count=3
    )
    by_trace = {r.trace_id: r.data for r in records}
    # The records carry what explains them (additive fields).
    budget = dict(by_trace[over_trace]["budget"])
    assert budget.pop("needed_usd") > 0.0005
    assert budget == {
        "key": "agent.spender.day", "scope": "agent", "name": "spender", "window": "day",
        "limit_usd": 0.0005, "spent_usd": 0.0, "reserved_usd": 0.0,
    }  # fmt: skip
    assert by_trace[over_trace]["allowed_by"] == ["any-model"]
    assert by_trace[over_trace]["decision"]["policy_ids"] == []
    assert by_trace[refused_trace]["breaker"]["key"] == "agent.tripped"
    assert by_trace[refused_trace]["resource"] == "gpt-4o-mini"
    assert by_trace[refused_trace]["region"] == "eu-west-1"

    expected = {
        allowed_trace: "allow use_model gpt-4o-mini @ eu-west-1 (openai) [any-model]",
        over_trace: "deny use_model gpt-4o-mini @ eu-west-1 (openai) budget_exceeded: "
        "agent:spender day budget, $0.00 spent + $0.00 reserved of $0.0005, needs",
        refused_trace: "deny use_model gpt-4o-mini @ eu-west-1 (openai): breaker "
        'agent.tripped open (manual: "maintenance window")',
    }
    url = settings.nats_url or ""
    for trace_id, summary in expected.items():
        tree = await ainvoke(["trace", trace_id, "--nats-url", url])
        assert tree.exit_code == 0, tree.output
        assert any("authz" in line and summary in line for line in tree.output.splitlines()), (
            summary, tree.output,
        )  # fmt: skip
        as_json = await ainvoke(["trace", trace_id, "--json", "--nats-url", url])
        assert as_json.exit_code == 0, as_json.output
        spans = json.loads(as_json.output)["spans"]
        [span] = [s for s in spans if s["kind"] == "decision"]
        assert span["summary"].startswith(summary), span["summary"]
        assert "?.?" not in tree.output + span["summary"]
        if trace_id == over_trace:  # the cost service's refusal, in the same trace
            [cost] = [s for s in spans if s["kind"] == "budget"]
            assert cost["summary"].startswith("refused gpt-4o-mini $"), cost["summary"]
            assert "agent:spender day $0.00 spent" in cost["summary"]

    replay = await ainvoke(["audit", "replay", "--since", "1h", "--nats-url", url])
    assert replay.exit_code == 0, replay.output
    lines = replay.output.splitlines()
    for summary in expected.values():
        assert any(summary in line for line in lines), (summary, replay.output)
    # The operators' own records: the budget set, the breaker tripped, the cost refusal.
    for summary in (
        "set budget agent:spender day $0.0005 (new)",
        'trip agent.tripped closed → open (manual) until reset: "maintenance window"',
        "refused gpt-4o-mini $",
    ):
        assert any(summary in line for line in lines), (summary, replay.output)
