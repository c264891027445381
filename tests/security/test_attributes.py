"""Operators own the attributes policy reads; budgets are charged only by what was decided.

An agent holding its own credential (a raw nats-py client, no SDK) tries to:

* re-register with another team, owner, region, namespace or principal tags,
  to escape the finance and EU forbid policies (policies/) or to charge
  another team: refused with ``attribute_mismatch``, the policies still apply;
  declaring no tags at all changes nothing either (the bound ones are stored);
* report usage naming another agent in ``on_behalf_of``, or with a chain
  nobody signed, or a project not bound to it: neither that agent's nor that
  project's budget moves (nor trips a breaker); only a chain the policy
  service signed charges the delegating agent. Usage a budget applies to
  that settles no reservation is charged, flagged ``unreserved`` and audited.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import msgspec
import pytest
from nats.aio.client import Client
from sqlalchemy import select

from broker.codec import decode, encode
from broker.connection import connect
from broker.errors import AttributeMismatch, CallDenied
from broker.replies import H_CHAIN, H_CHAIN_SIG, H_ERROR, H_MSG_ID, error_from_reply, request
from broker.runtime.identity import operator_connect_options
from broker.settings import Settings
from schemas import (
    AgentManifest,
    AuthzRequest,
    BudgetStatus,
    CostReportRequest,
    Decision,
    Registered,
    SetBudget,
    UsageReport,
)
from services.cost.store import UsageRow

if TYPE_CHECKING:
    from support import AgentFactory, AuditTrail, StackFactory

    from services.runner import Stack

from support import RawAgent, cost_of, enroll, eventually, lending_policy_dir, policy_of

FRAUD = "fraud-detection"  # fraud-may-score (policies/lending-demo.cedar) lets it call credit-check


@pytest.fixture
async def desk(make_stack: StackFactory, make_agent: AgentFactory) -> Stack:
    """The lending example policies, and credit-check serving its pii-tagged score."""
    stack = await make_stack(policy_dir=lending_policy_dir())
    credit = make_agent("credit-check", team="risk", owner="risk-eng")

    @credit.capability("score", tags=("pii",))
    async def score(req: dict[str, Any]) -> dict[str, int]:
        return {"score": 700}

    await credit.start()
    return stack


async def _register(nc: Client, manifest: AgentManifest) -> Registered | AttributeMismatch:
    reply = await nc.request(f"sb.registry.register.{manifest.name}", encode(manifest), timeout=5)
    if reply.headers and H_ERROR in reply.headers:
        err = error_from_reply(reply.data, reply.headers)
        assert isinstance(err, AttributeMismatch), err
        return err
    return decode(reply.data, Registered)


async def _still_governed(nc: Client) -> None:
    """The finance namespace forbid and the EU residency forbid both apply to fraud-detection."""
    reply = await nc.request(
        f"sb.out.{FRAUD}.credit-check.score", encode({"applicant_id": "a-1"}), timeout=5
    )
    denied = error_from_reply(reply.data, reply.headers)
    assert isinstance(denied, CallDenied), denied
    assert denied.details["policy_ids"] == ["finance-calls-only-pci-dss"]
    ask = AuthzRequest(action="use_model", resource="gpt-4o", region="us-east-1")
    answer = await nc.request(f"sb.authz.{FRAUD}", encode(ask), timeout=5)
    decision = decode(answer.data, Decision)
    assert (decision.effect, decision.policy_ids) == ("deny", ("eu-residency-models-stay-in-eu",))


async def test_re_registering_with_other_attributes_escapes_no_policy(
    desk: Stack, settings: Settings, audit_trail: AuditTrail
) -> None:
    assert settings.nats_url
    token = enroll(
        settings, FRAUD, team="risk", owner="fraud-ops", namespace="finance",
        tags=("data-residency:eu",),
    )  # fmt: skip
    raw = RawAgent()
    nc = await raw.connect(settings.nats_url, FRAUD, token)
    try:
        # It declares nothing of its own: the registry stores what was bound.
        honest = AgentManifest(name=FRAUD, version="1.0.0", owner="", team="")
        assert isinstance(await _register(nc, honest), Registered)
        policy = policy_of(desk)

        def stored(version: str) -> AgentManifest | None:
            record = policy.agents.get(FRAUD) if policy.agents is not None else None
            ok = record is not None and record.manifest.version == version
            return record.manifest if ok and record is not None else None

        await eventually(lambda: stored("1.0.0"), "the policy service to see fraud-detection")
        first = stored("1.0.0")
        assert first is not None
        assert (first.team, first.owner) == ("risk", "fraud-ops")
        assert first.metadata == {"namespace": "finance", "tags": "data-residency:eu"}
        await _still_governed(nc)

        attacks: list[tuple[str, dict[str, Any]]] = [
            ("team", {"team": "lending"}),
            ("owner", {"owner": "mallory"}),
            ("region", {"region": "us-east-1"}),
            ("namespace", {"metadata": {"namespace": "default"}}),
            ("namespace", {"metadata": {"namespace": "lending", "tags": "data-residency:eu"}}),
            ("tags", {"metadata": {"namespace": "finance", "tags": "trusted"}}),
            ("project", {"project": "someone-elses"}),
        ]
        for field, change in attacks:
            forged = msgspec.structs.replace(honest, version="1.0.1", **change)
            refused = await _register(nc, forged)
            assert isinstance(refused, AttributeMismatch), (field, refused)
            assert refused.details["field"] == field
            assert "signalbox agents bind fraud-detection" in refused.message
        # Nothing of those was written: still version 1.0.0 only, still governed.
        assert stored("1.0.0") == first
        await _still_governed(nc)

        # "Without the residency tag": declaring no metadata at all is no escape either.
        bare = msgspec.structs.replace(honest, version="1.0.2", metadata={"tier": "gold"})
        assert isinstance(await _register(nc, bare), Registered)
        await eventually(lambda: stored("1.0.2"), "the re-registration")
        again = stored("1.0.2")
        assert again is not None
        assert again.metadata == {
            "tier": "gold",
            "namespace": "finance",
            "tags": "data-residency:eu",
        }
        await _still_governed(nc)
    finally:
        await nc.close()
    rejected = await audit_trail.wait_for(
        lambda r: r.kind == "rejected" and r.data.get("code") == "attribute_mismatch",
        count=len(attacks),
    )
    assert {r.subject for r in rejected} == {f"sb.registry.register.{FRAUD}"}


# -- cost attribution ------------------------------------------------------------------------

MODEL = "gpt-4o"  # $10 per million output tokens: 10,000 of them cost $0.10


@pytest.fixture
async def operator(settings: Settings) -> AsyncIterator[Client]:
    nc = await connect(
        settings.nats_url, name="test-operator", **operator_connect_options(settings)
    )
    yield nc
    await nc.close()


async def _budget(operator: Client, stack: Stack, scope: str, name: str, limit: float) -> str:
    status = await request(
        operator, "sb.admin.budgets.set",
        SetBudget(scope=scope, name=name, window="day", limit_usd=limit,  # type: ignore[arg-type]
                  requested_by="ops"),
        BudgetStatus,
    )  # fmt: skip
    key = status.budget.key
    cache = cost_of(stack).budgets.cache
    await eventually(lambda: cache.get(key) == status.budget, f"the cost service to see {key}")
    return key


def _spent(stack: Stack, key: str) -> float:
    cost = cost_of(stack)
    budget = cost.budgets.cache.get(key)
    assert budget is not None
    return cost.store.ledger.status(budget, time.time())[0].spent_usd


def _rows(stack: Stack) -> dict[str, dict[str, Any]]:
    """Stored usage rows by report id."""
    table = UsageRow.__table__  # type: ignore[attr-defined]
    with cost_of(stack).store._engine.connect() as conn:
        return {r.id: dict(r._mapping) for r in conn.execute(select(table))}


async def test_usage_reports_charge_only_what_operators_and_the_policy_service_decided(
    make_stack: StackFactory,
    make_agent: AgentFactory,
    settings: Settings,
    operator: Client,
    audit_trail: AuditTrail,
) -> None:
    stack = await make_stack(allow=[("orchestrator", "worker", ["work"])])
    worker = make_agent("worker", team="ops", projects=("mine",))

    @worker.capability("work")
    async def work(_: dict[str, Any]) -> str:
        # Reported while serving orchestrator's call: the SDK sends the signed chain.
        await worker.report_usage(report=UsageReport(
            id="signed", agent="worker", time=time.time(), model=MODEL, output_tokens=10_000,
        ))  # fmt: skip
        return "done"

    await worker.start()
    orchestrator = make_agent("orchestrator", team="planning")
    await orchestrator.start()
    keys = {
        "victim": await _budget(operator, stack, "agent", "victim", 0.05),  # one charge trips it
        "secret": await _budget(operator, stack, "project", "secret", 0.05),
        "victims": await _budget(operator, stack, "team", "victims", 0.05),
        "worker": await _budget(operator, stack, "agent", "worker", 100.0),
        "mine": await _budget(operator, stack, "project", "mine", 100.0),
        "orchestrator": await _budget(operator, stack, "agent", "orchestrator", 100.0),
    }
    cost = cost_of(stack)
    await eventually(lambda: cost._team("worker") == "ops", "the cost service to see worker")

    assert settings.nats_url
    raw = RawAgent()
    nc = await raw.connect(settings.nats_url, "worker", enroll(settings, "worker"))
    try:
        js = nc.jetstream()
        forged = [
            # Names a victim and a project that is not the worker's.
            (UsageReport(id="named", agent="worker", time=time.time(), model=MODEL,
                         output_tokens=10_000, project="secret", on_behalf_of=("victim",)), {}),
            # A chain nobody signed, and the worker's own bound project.
            (UsageReport(id="unsigned", agent="worker", time=time.time(), model=MODEL,
                         output_tokens=10_000, project="mine"),
             {H_CHAIN: "victim", H_CHAIN_SIG: "99999999999.000000"}),
            # A chain signed for another agent does not verify for this one either.
            (UsageReport(id="replayed", agent="worker", time=time.time(), model=MODEL,
                         output_tokens=10_000),
             {H_CHAIN: "victim", H_CHAIN_SIG: "garbage"}),
        ]  # fmt: skip
        for report, headers in forged:
            await js.publish(
                "sb.usage.worker", encode(report), headers={H_MSG_ID: report.id, **headers}
            )
    finally:
        await nc.close()
    assert await orchestrator.call("worker", "work", {}) == "done"
    await eventually(lambda: len(_rows(stack)) == 4, "the four reports to be metered")

    rows = _rows(stack)
    assert (rows["named"]["project"], rows["named"]["on_behalf_of"]) == ("", "")
    assert (rows["named"]["ignored_project"], rows["named"]["dropped_on_behalf_of"]) == (
        "secret", "victim",
    )  # fmt: skip
    assert (rows["unsigned"]["project"], rows["unsigned"]["dropped_on_behalf_of"]) == (
        "mine", "victim",
    )  # fmt: skip
    assert rows["replayed"]["dropped_on_behalf_of"] == "victim"
    assert (rows["signed"]["on_behalf_of"], rows["signed"]["dropped_on_behalf_of"]) == (
        "orchestrator", "",
    )  # fmt: skip
    assert {r["team"] for r in rows.values()} == {"ops"}
    # No reservation covered any of them, but budgets applied: charged and flagged.
    assert all(r["unreserved"] for r in rows.values())

    # Whose budgets moved: the worker's own (4 x $0.10), its bound project (one report),
    # and the delegating agent of the signed chain; never the victim's or the project's.
    assert _spent(stack, keys["worker"]) == pytest.approx(0.40)
    assert _spent(stack, keys["mine"]) == pytest.approx(0.10)
    assert _spent(stack, keys["orchestrator"]) == pytest.approx(0.10)
    for victim in ("victim", "secret", "victims"):
        assert _spent(stack, keys[victim]) == 0, victim
    assert cost.breakers is not None and cost.breakers.get("agent.victim") is None

    report = await cost.cost_report(CostReportRequest(by="agent"))
    [row] = report.rows
    assert (row.key, row.reports, row.unreserved, row.attribution_dropped) == ("worker", 4, 4, 3)
    alerts = await audit_trail.wait_for(
        lambda r: r.kind == "budget" and r.data.get("event") == "unreserved", count=4
    )
    assert {r.data["report"] for r in alerts} == {"named", "unsigned", "replayed", "signed"}
    assert all(r.data["alert"] == "unreserved" and r.actor == "worker" for r in alerts)
    counted = {"ignored_projects": 1, "unsigned_chains": 3, "unreserved": 4}
    await eventually(lambda: cost.attribution_stats == counted, "the counters")
