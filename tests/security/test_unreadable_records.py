"""Nothing unreadable fails open or stops the system: budgets, the active-policy pointer
and its sets, circuit breakers.

Garbage is written straight into the KV buckets with a service-privileged
JetStream client (what a bug, a bad restore or someone with the services'
credentials could leave there), either before the services start (a cold
start) or while they run, in three shapes: a record with invalid UTF-8 in a
string, a truncated record, and a well-formed record of another type (a
wrong tag). Each must fail safe, be visible (ERROR log, an ``alert`` audit
event, the operator's view) and be fixable with the usual command.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

import pytest
from nats.aio.client import Client
from nats.js.kv import KeyValue
from rich.console import Console
from support import cedar_policies, echo_pair, eventually, lending_policy_dir, policy_of

from broker.codec import decode, encode
from broker.connection import connect
from broker.errors import BreakerOpen, ConfigError
from broker.replies import request
from broker.runtime.identity import operator_connect_options
from broker.runtime.jetstream import (
    KV_BREAKERS,
    KV_BUDGETS,
    KV_POLICIES,
    ensure_buckets,
    ensure_streams,
)
from broker.settings import Settings
from broker.subjects import Subjects
from schemas import (
    ActivePolicy,
    ApplyPolicies,
    AuditEvent,
    Breaker,
    BreakerList,
    Budget,
    BudgetList,
    BudgetStatus,
    ListBreakers,
    ListBudgets,
    PolicyApplied,
    PolicyFiles,
    PolicySetRecord,
    PolicyShown,
    Reservation,
    ReserveBudget,
    ResetBreaker,
    RollbackPolicies,
    SetBudget,
    ShowPolicies,
)
from services.cli.breakers_cmds import breakers_table
from services.cli.client import admin_request
from services.policy.cedar.policy_set import SCHEMA_FILE, CedarPolicies, shipped_policy_dir

if TYPE_CHECKING:
    from support import AgentFactory, AuditTrail, ServiceConnector, StackFactory


T = TypeVar("T")
SUBJECTS = Subjects("sb")
SCHEMA = (shipped_policy_dir() / SCHEMA_FILE).read_text()

#: (shape of the garbage, when it is written): every shape once, cold and live both covered.
CASES = [("invalid-utf8", "cold"), ("truncated", "live"), ("wrong-tag", "live")]


def garbage(shape: str, valid: bytes, field: str, other: bytes) -> bytes:
    """``valid`` spoiled as ``shape``: invalid UTF-8 at the start of string ``field``,
    cut in half, or replaced by ``other`` (a well-formed record of another type)."""
    if shape == "invalid-utf8":
        marker = f'"{field}":"'.encode()
        assert marker in valid
        return valid.replace(marker, marker + b"\xff\xfe", 1)
    if shape == "truncated":
        return valid[: len(valid) // 2]
    assert shape == "wrong-tag"
    return other


@pytest.fixture
async def operator(settings: Settings) -> AsyncIterator[Client]:
    assert settings.nats_url is not None
    nc = await connect(
        settings.nats_url, name="test-operator", **operator_connect_options(settings)
    )
    yield nc
    await nc.close()


Bucket = Callable[[str], Awaitable[KeyValue]]


@pytest.fixture
async def bucket(service_nc: ServiceConnector, settings: Settings) -> Bucket:
    """``await bucket(name)``: a KV bucket on a service connection (created if need be)."""
    js = (await service_nc("kv-writer")).jetstream()
    await ensure_streams(js, settings)
    await ensure_buckets(js, settings)

    async def get(name: str) -> KeyValue:
        return await js.key_value(name)

    return get


async def ask(nc: Client, service: str, op: str, body: Any, returns: type[T]) -> T:
    return await admin_request(nc, SUBJECTS, op, body, returns, service=service)


def alerted(key: str) -> Callable[[AuditEvent], bool]:
    return lambda r: r.kind == "alert" and r.data.get("key") == key


# -- budgets -------------------------------------------------------------------------------


@pytest.mark.parametrize(("shape", "when"), CASES)
async def test_an_unreadable_budget_denies_the_model_calls_it_governs(
    shape: str,
    when: str,
    make_stack: StackFactory,
    make_agent: AgentFactory,
    bucket: Bucket,
    operator: Client,
    audit_trail: AuditTrail,
) -> None:
    key = "team.risk.day"
    valid = encode(Budget(scope="team", name="risk", window="day", limit_usd=5.0))
    other = encode(ActivePolicy(version=1, digest="0" * 64))
    kv = await bucket(KV_BUDGETS)
    if when == "cold":
        await kv.put(key, garbage(shape, valid, "name", other))
    stack = await make_stack(policy_dir=lending_policy_dir())
    policy = policy_of(stack)
    if when == "live":
        await kv.put(key, garbage(shape, valid, "name", other))
    assert policy.budgets is not None
    await eventually(lambda: key in policy.budgets.unreadable, "the budget record to be unreadable")  # type: ignore[union-attr]

    spender = make_agent("spender", team="risk")
    free = make_agent("free", team="other")
    await spender.start()
    await free.start()
    # Never skipped as "no budget": refused, saying which record and how to fix it.
    denied = await spender.authorize("use_model", "gpt-4o", estimated_tokens=100)
    assert (denied.effect, denied.reason_code) == ("deny", "budget_unreadable")
    assert (
        "budget record team.risk.day in KV bucket sb_budgets is unreadable" in (denied.reasons[-1])
    )
    assert "signalbox budgets set team:risk --limit USD --window day" in denied.reasons[-1]
    assert policy.stats.budget_unreadable == 1
    # Charged on behalf of nobody else: an agent no unreadable budget governs is unaffected.
    assert (await free.authorize("use_model", "gpt-4o", estimated_tokens=100)).effect == "allow"
    # The cost service refuses a reservation on it too (defence in depth).
    reserve = ReserveBudget(agent="spender", model="gpt-4o", input_tokens=100)
    with pytest.raises(ConfigError, match=r"team\.risk\.day"):
        await request(policy.nc, SUBJECTS.cost_reserve, reserve, Reservation, timeout=5)

    # Visible: an alert in the audit trail and in `signalbox budgets list`.
    alert = (await audit_trail.wait_for(alerted(key)))[0]
    assert alert.data["bucket"] == KV_BUDGETS and alert.data["fix"].startswith(
        "signalbox budgets set team:risk"
    )
    listed = await ask(operator, "budgets", "list", ListBudgets(), BudgetList)
    assert key in listed.unreadable
    refused = await audit_trail.wait_for(
        lambda r: r.kind == "decision" and r.actor == "spender"
        and r.data["decision"]["reason_code"] == "budget_unreadable"
    )  # fmt: skip
    assert refused[0].data["decision"]["effect"] == "deny"

    # Fixed with the usual command: the rewritten budget governs again.
    fix = SetBudget(scope="team", name="risk", window="day", limit_usd=5.0)
    await ask(operator, "budgets", "set", fix, BudgetStatus)
    await eventually(
        lambda: key not in policy.budgets.unreadable,  # type: ignore[union-attr]
        "the budget record to be readable again",
    )
    allowed = await spender.authorize("use_model", "gpt-4o", estimated_tokens=100)
    assert allowed.effect == "allow" and allowed.reservation_id


# -- the active-policy pointer and the sets it names ----------------------------------------

ALLOW = cedar_policies([("a", "b", ["echo"])])


def pointer_garbage(shape: str) -> bytes:
    valid = encode(ActivePolicy(version=1, digest="0" * 64))
    return garbage(shape, valid, "digest", encode(Budget(scope="team", name="x", window="day",
                                                           limit_usd=1.0)))  # fmt: skip


@pytest.mark.parametrize(("shape", "when"), CASES)
async def test_an_unreadable_policy_pointer_keeps_the_last_valid_set_and_raises_an_alarm(
    shape: str,
    when: str,
    make_stack: StackFactory,
    make_agent: AgentFactory,
    bucket: Bucket,
    operator: Client,
    audit_trail: AuditTrail,
    caplog: pytest.LogCaptureFixture,
) -> None:
    kv = await bucket(KV_POLICIES)
    if when == "cold":
        # The bucket holds nothing readable: the replica must still start, on its folder set.
        await kv.put("active", pointer_garbage(shape))
    stack = await make_stack(allow=[("a", "b", ["echo"])])
    policy = policy_of(stack)
    before = policy.decider.version
    if when == "live":
        await kv.put("active", pointer_garbage(shape))
    await eventually(
        lambda: "cannot be read" in policy.policy_alarm,
        "the policy alarm about the unreadable set",
    )
    assert policy.decider.version == before  # the last valid set is kept
    a, _ = await echo_pair(make_agent)
    assert await a.call("b", "echo", {"n": 1}) == {"n": 1}

    # The alarm: an ERROR log, an audit alert, `signalbox policy show`.
    assert any(
        r.levelname == "ERROR" and "active-policy pointer" in r.getMessage() for r in caplog.records
    )
    alert = (await audit_trail.wait_for(alerted("active")))[0]
    assert alert.data["bucket"] == KV_POLICIES and "rollback" in alert.data["fix"]
    shown = await ask(operator, "policy", "show", ShowPolicies(), PolicyShown)
    assert "$KV.sb_policies.active cannot be read" in shown.alarm
    assert shown.evaluating == before and not shown.active
    assert shown.record.version == 1  # the folder's set, stored as version 1

    # Fixed by moving the pointer to a stored version: the alarm clears.
    await ask(operator, "policy", "rollback", RollbackPolicies(to=1), PolicyApplied)
    await eventually(lambda: not policy.policy_alarm, "the policy alarm to clear")
    assert policy.active_version == 1
    shown = await ask(operator, "policy", "show", ShowPolicies(), PolicyShown)
    assert (shown.alarm, shown.active, shown.active_version) == ("", True, 1)


async def test_a_stored_set_that_does_not_read_keeps_the_running_set(
    make_stack: StackFactory,
    make_agent: AgentFactory,
    bucket: Bucket,
    operator: Client,
    audit_trail: AuditTrail,
) -> None:
    stack = await make_stack(rules="")
    policy = policy_of(stack)
    files = PolicyFiles(files={"rules.cedar": ALLOW}, schema=SCHEMA, label="good")
    applied = await ask(operator, "policy", "apply", ApplyPolicies(candidate=files),
                        PolicyApplied)  # fmt: skip
    good = CedarPolicies.from_texts(files.files, files.schema, label="good").version
    await eventually(lambda: policy.decider.version == good, "the good policy version in force")
    # Version 9 is garbage (invalid UTF-8 in its texts) and the pointer names it.
    kv = await bucket(KV_POLICIES)
    record = encode(PolicySetRecord(version=9, digest="1" * 64, files={}, schema=SCHEMA))
    await kv.put("set.9", garbage("invalid-utf8", record, "digest", b""))
    await kv.put("active", encode(ActivePolicy(version=9, digest="1" * 64)))
    await eventually(
        lambda: "version 9" in policy.policy_alarm,
        "the policy alarm naming version 9",
    )
    assert policy.decider.version == good and policy.active_version == applied.version
    a, _ = await echo_pair(make_agent)
    assert await a.call("b", "echo", {"n": 2}) == {"n": 2}
    alert = (await audit_trail.wait_for(alerted("set.9")))[0]
    assert alert.data["event"] == "unusable_record" and "invalid UTF-8" in alert.data["reason"]
    shown = await ask(operator, "policy", "show", ShowPolicies(), PolicyShown)
    assert "version 9" in shown.alarm and shown.record.version == applied.version


# -- circuit breakers ----------------------------------------------------------------------


def breaker_garbage(shape: str) -> bytes:
    valid = encode(Breaker(key="agent.b", scope="agent", name="b", state="closed",
                           reason="manual", text="fine"))  # fmt: skip
    return garbage(shape, valid, "text", encode(Budget(scope="agent", name="b", window="day",
                                                        limit_usd=1.0)))  # fmt: skip


@pytest.mark.parametrize(("shape", "when"), CASES)
async def test_an_unreadable_breaker_fails_closed_is_reported_and_reset_rewrites_it(
    shape: str,
    when: str,
    make_stack: StackFactory,
    make_agent: AgentFactory,
    bucket: Bucket,
    operator: Client,
    audit_trail: AuditTrail,
) -> None:
    kv = await bucket(KV_BREAKERS)
    if when == "cold":
        await kv.put("agent.b", breaker_garbage(shape))
    stack = await make_stack(allow=[("a", "b", ["echo"])])
    policy = policy_of(stack)
    if when == "live":
        await kv.put("agent.b", breaker_garbage(shape))
    assert policy.breakers is not None
    await eventually(
        lambda: policy.breakers.get("agent.b") is not None,  # type: ignore[union-attr]
        "a breaker held for agent.b",
    )

    # Fail closed: calls to b are refused at once, saying why and what to do.
    a, _ = await echo_pair(make_agent)
    with pytest.raises(BreakerOpen) as refused:
        await a.call("b", "echo", {"n": 1})
    assert refused.value.details["reason"] == "unreadable"
    assert "cannot be read" in refused.value.details["text"]
    assert "signalbox breakers reset agent:b" in refused.value.message

    # Reported: an audit alert (not a silent "manual" trip) and `signalbox breakers list`.
    alert = (await audit_trail.wait_for(alerted("agent.b")))[0]
    assert alert.data["bucket"] == KV_BREAKERS
    assert alert.data["fix"] == "signalbox breakers reset agent:b"
    listed = await ask(operator, "breakers", "list", ListBreakers(), BreakerList)
    (shown,) = [b for b in listed.breakers if b.key == "agent.b"]
    assert (shown.state, shown.reason) == ("open", "unreadable")
    console = Console(width=200, record=True)
    console.print(breakers_table(listed.breakers, 0.0))
    assert "unreadable: its stored record in sb_breakers cannot be read" in console.export_text()

    # `signalbox breakers reset` writes a clean record; calls flow again.
    reset = await ask(operator, "breakers", "reset", ResetBreaker(key="agent.b"), Breaker)
    assert reset.state == "closed"
    stored = decode((await kv.get("agent.b")).value, Breaker)
    assert (stored.key, stored.state) == ("agent.b", "closed")
    await eventually(lambda: not policy.breakers.any_open(), "every breaker closed")  # type: ignore[union-attr]
    assert await a.call("b", "echo", {"n": 2}) == {"n": 2}
    resets = await audit_trail.wait_for(lambda r: r.kind == "breaker" and r.data["op"] == "reset")
    assert resets[0].data["from"] == "open" and resets[0].data["to"] == "closed"
