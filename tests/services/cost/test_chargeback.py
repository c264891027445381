"""Chargeback by who asked: ``cost report --by caller`` and ``--by caller-team`` (issue 16, item 7).

A target agent's model calls made while serving a call are charged back to
the calling agent (the last agent of the delegation chain the policy
service signed) and to that caller's bound team, resolved by the cost
service; usage made for no one is ``(direct)``, and so is usage metered
before callers were recorded (a store from an earlier release gains the
columns in place). Forged chains: ``tests/security/test_caller_chargeback.py``.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from sqlalchemy import inspect, select, text
from support import ainvoke, cost_of, eventually

from broker.runtime.sql import make_engine
from broker.settings import Settings
from schemas import UsageReport
from schemas.cost import DIRECT_CALLER
from services.cost.prices import load_prices
from services.cost.store import UsageRow, UsageStore
from services.policy.cedar.policy_set import shipped_policy_dir

if TYPE_CHECKING:
    from support import AgentFactory, AuditTrail, StackFactory

    from services.runner import Stack

MODEL = "gpt-4o"  # $10 per million output tokens: 10,000 of them cost $0.10


def _rows(stack: Stack) -> list[dict[str, Any]]:
    table = UsageRow.__table__  # type: ignore[attr-defined]
    with cost_of(stack).store._engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(select(table))]


async def _report(settings: Settings, by: str, fmt: str = "json") -> str:
    result = await ainvoke(
        ["cost", "report", "--by", by, "--format", fmt, "--nats-url", settings.nats_url or ""]
    )
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.usefixtures("cli_operator")
async def test_usage_made_while_serving_a_call_is_charged_back_to_the_caller_and_its_team(
    make_stack: StackFactory, make_agent: AgentFactory, settings: Settings, tmp_path: Path,
    audit_trail: AuditTrail,
) -> None:  # fmt: skip
    policies = tmp_path / "policies"
    shutil.copytree(shipped_policy_dir(), policies)
    (policies / "delegation.cedar").write_text(
        '@id("orchestrator-may-delegate")\n'
        'permit (principal == Signalbox::Agent::"orchestrator", '
        'action == Signalbox::Action::"call", '
        'resource == Signalbox::Capability::"worker/work");\n'
        '@id("worker-may-use-models")\n'
        'permit (principal == Signalbox::Agent::"worker", '
        'action == Signalbox::Action::"use_model", resource);\n'
    )
    stack = await make_stack(policy_dir=policies)
    worker = make_agent("worker", team="ops")

    @worker.capability("work")
    async def work(_: dict[str, Any]) -> str:
        # A real model call made while serving orchestrator's call.
        async with worker.model_call(MODEL, estimated_tokens=10_000) as call:
            call.record(output_tokens=10_000)  # $0.10
        return "done"

    await worker.start()
    orchestrator = make_agent("orchestrator", team="planning")
    await orchestrator.start()
    cost = cost_of(stack)
    await eventually(
        lambda: cost._team("worker") == "ops" and cost._team("orchestrator") == "planning",
        "the cost service to know both teams",
    )
    assert await orchestrator.call("worker", "work", {}) == "done"
    assert await orchestrator.call("worker", "work", {}) == "done"
    # The same agent's model call on its own account: on behalf of no one.
    async with worker.model_call(MODEL, estimated_tokens=10_000) as call:
        call.record(output_tokens=5_000)  # $0.05
    await eventually(lambda: len(_rows(stack)) == 3, "three metered reports")

    rows = sorted(_rows(stack), key=lambda r: r["cost_nanos"])
    assert [(r["agent"], r["caller"], r["caller_team"]) for r in rows] == [
        ("worker", None, None), ("worker", "orchestrator", "planning"),
        ("worker", "orchestrator", "planning"),
    ]  # fmt: skip

    by_caller = json.loads(await _report(settings, "caller"))
    assert by_caller["by"] == "caller"
    assert [(r["key"], r["reports"], r["cost_usd"]) for r in by_caller["rows"]] == [
        ("orchestrator", 2, pytest.approx(0.20)), (DIRECT_CALLER, 1, pytest.approx(0.05)),
    ]  # fmt: skip
    by_team = json.loads(await _report(settings, "caller-team"))
    assert by_team["by"] == "caller_team"
    assert [(r["key"], r["reports"]) for r in by_team["rows"]] == [
        ("planning", 2), (DIRECT_CALLER, 1),
    ]  # fmt: skip
    table = await _report(settings, "caller", "table")
    assert "orchestrator" in table and "(direct)" in table and "$0.20" in table
    as_csv = list(csv.reader(io.StringIO(await _report(settings, "caller-team", "csv"))))
    assert [r[0] for r in as_csv] == ["caller_team", "planning", "(direct)", "total"]
    # The team report still charges the agent's own team.
    by_own_team = json.loads(await _report(settings, "team"))
    assert [(r["key"], r["reports"]) for r in by_own_team["rows"]] == [("ops", 3)]

    # The usage audit record says who asked (verified), only when someone did.
    events = await audit_trail.wait_for(lambda r: r.kind == "usage", count=3)
    assert sorted((e.data.get("caller", "-"), e.data.get("caller_team", "-")) for e in events) == [
        ("-", "-"), ("orchestrator", "planning"), ("orchestrator", "planning"),
    ]  # fmt: skip


def test_a_store_from_an_earlier_release_gains_the_caller_columns(database_url: str) -> None:
    """``cost_usage`` without ``caller`` and ``caller_team``: added in place; its rows are
    usage made for no one known, reported as ``(direct)``."""
    table = UsageRow.__table__  # type: ignore[attr-defined]
    old = [c for c in table.columns if c.name not in ("caller", "caller_team")]
    engine = make_engine(database_url)
    columns = ", ".join(f"{c.name} {c.type.compile(engine.dialect)}" for c in old)
    with engine.begin() as conn:
        conn.execute(text(f"CREATE TABLE cost_usage ({columns}, PRIMARY KEY (agent, id))"))
        conn.execute(
            text(
                "INSERT INTO cost_usage (agent, id, time, hour, day, team, cost_nanos) "
                "VALUES ('worker', 'before', 1.0, 0, 0, 'ops', 1000)"
            )
        )
    engine.dispose()
    store = UsageStore(database_url, load_prices(None))
    try:
        store.create_schema()
        store.create_schema()  # idempotent
        names = {c["name"] for c in inspect(store._engine).get_columns("cost_usage")}
        assert {"caller", "caller_team"} <= names
        report = UsageReport(id="after", agent="worker", time=2.0, model=MODEL, output_tokens=100)
        store.record([store.row(report, team="ops", now=2.0, caller="boss", caller_team="")])
        by_caller = store.report("caller", None, None)
        assert sorted((r.key, r.reports) for r in by_caller.rows) == [
            (DIRECT_CALLER, 1), ("boss", 1),
        ]  # fmt: skip
        # A caller whose team is unknown is not "(direct)": it has no team ("").
        by_team = store.report("caller_team", None, None)
        assert sorted((r.key, r.reports) for r in by_team.rows) == [("", 1), (DIRECT_CALLER, 1)]
    finally:
        store.close()
