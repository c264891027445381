"""What-if replay: a candidate policy set against the decisions recorded in the audit trail."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec
import pytest
from support import cedar_policies
from typer.testing import CliRunner

from broker.errors import CallDenied
from broker.settings import Settings
from schemas import AgentManifest, AgentRecord, AuditEvent, Capability, Decision
from services.cli.main import app
from services.policy.cedar.decider import CedarDecider
from services.policy.cedar.policy_set import SCHEMA_FILE, CedarPolicies, shipped_policy_dir
from services.policy.whatif import request_from_record, what_if

if TYPE_CHECKING:
    from support import AgentFactory, AuditTrail, StackFactory


class Echo(msgspec.Struct):
    text: str


SCHEMA = (shipped_policy_dir() / SCHEMA_FILE).read_text()


def decider(rules: str) -> CedarDecider:
    return CedarDecider(CedarPolicies.from_texts({"rules.cedar": rules}, SCHEMA, label="cand"))


def record(name: str, caps: tuple[str, ...] = ()) -> AgentRecord:
    manifest = AgentManifest(
        name=name,
        version="1.0.0",
        owner="o",
        team="t",
        capabilities=tuple(Capability(name=c) for c in caps),
    )
    return AgentRecord(manifest=manifest, registered_at=1.0)


def decision_event(seq: int, caller: str, target: str, cap: str, effect: str) -> AuditEvent:
    decision = Decision(effect=effect, reason_code="allowed" if effect == "allow" else "forbidden")  # type: ignore[arg-type]
    return AuditEvent(
        id=f"e{seq}",
        time=1_790_000_000.0 + seq,
        kind="decision",
        actor=caller,
        seq=seq,
        data={
            "caller": caller,
            "target": target,
            "capability": cap,
            "decision": msgspec.to_builtins(decision),
        },
    )


def test_replay_reports_each_change_with_counts_by_agent() -> None:
    agents = {n: record(n, ("echo",)) for n in ("alice", "bob", "carol")}
    events = [
        decision_event(1, "alice", "bob", "echo", "allow"),
        decision_event(2, "alice", "bob", "echo", "allow"),
        decision_event(3, "carol", "bob", "echo", "deny"),
        decision_event(4, "carol", "alice", "echo", "deny"),
        AuditEvent(id="x", time=1.0, kind="registry", actor="bob", seq=5),
    ]
    candidate = decider(cedar_policies([("carol", "bob", ["echo"])]))
    report = what_if(events, candidate, agents)
    assert (report.evaluated, report.unchanged, report.skipped) == (4, 1, 1)
    assert report.by_transition == {("allow", "deny"): 2, ("deny", "allow"): 1}
    assert report.by_agent == {("alice", "allow", "deny"): 2, ("carol", "deny", "allow"): 1}
    assert [c.seq for c in report.changes] == [1, 2, 3]
    assert report.changes[0].policy_ids == ("default-deny",)
    assert report.as_dict()["changed"] == 3


def test_agents_no_longer_registered_are_evaluated_as_unknown() -> None:
    events = [decision_event(1, "ghost", "bob", "echo", "allow")]
    report = what_if(events, decider(cedar_policies([("*", "*", ["*"])])), {"bob": record("bob")})
    [change] = report.changes
    assert (change.before, change.after) == ("allow", "deny")
    assert "ghost" in change.reason


def test_model_use_decisions_are_rebuilt_too() -> None:
    event = AuditEvent(
        id="u1", time=1_790_000_000.0, kind="decision", actor="alice", seq=1,
        data={
            "agent": "alice", "action": "use_model", "resource": "gpt-4o",
            "provider": "openai", "region": "us-east-1", "price_per_1k_tokens": 0.0025,
            "estimated_tokens": 100, "data_tags": ["pii"], "on_behalf_of": [],
            "decision": {"effect": "allow"},
        },
    )  # fmt: skip
    rebuilt = request_from_record(event, {"alice": record("alice")})
    assert rebuilt is not None
    _, agent, action, resource = rebuilt
    assert (agent, action, resource) == ("alice", "use_model", "gpt-4o")
    report = what_if([event], decider(""), {"alice": record("alice")})  # nothing permitted
    assert report.by_transition == {("allow", "deny"): 1}


pytestmark = pytest.mark.usefixtures("cli_operator")


async def test_policy_test_replays_the_live_trail(
    make_stack: StackFactory,
    make_agent: AgentFactory,
    settings: Settings,
    audit_trail: AuditTrail,
    tmp_path: Path,
) -> None:
    stack = await make_stack(allow=[("alice", "bob", ["echo"])])
    bob = make_agent("bob")

    @bob.capability("echo")
    async def echo(req: Echo) -> Echo:
        return req

    alice, carol = make_agent("alice"), make_agent("carol")
    for agent in (bob, alice, carol):
        await agent.start()
    for _ in range(2):
        await alice.call("bob", "echo", Echo(text="hi"), returns=Echo, timeout=5)
    with pytest.raises(CallDenied):
        await carol.call("bob", "echo", Echo(text="hi"), timeout=5)
    await audit_trail.wait_for(lambda r: r.kind == "decision", count=3)

    candidate = tmp_path / "candidate"
    candidate.mkdir()
    (candidate / SCHEMA_FILE).write_text(SCHEMA)
    (candidate / "rules.cedar").write_text(cedar_policies([("carol", "bob", ["echo"])]))
    url = stack.settings.nats_url
    assert url is not None
    runner = CliRunner()
    result = await asyncio.to_thread(
        runner.invoke,
        app,
        ["policy", "test", str(candidate), "--replay-since", "1h", "--json", "--nats-url", url],
    )
    assert result.exit_code == 0, result.output
    body = json.loads(result.stdout)
    assert body["evaluated"] == 3
    by_agent = {(r["agent"], r["before"], r["after"]): r["count"] for r in body["by_agent"]}
    assert by_agent == {("alice", "allow", "deny"): 2, ("carol", "deny", "allow"): 1}

    table = await asyncio.to_thread(
        runner.invoke,
        app,
        ["policy", "test", str(candidate), "--replay-since", "1h", "--nats-url", url],
    )
    assert table.exit_code == 0, table.output
    assert "would change" in table.stdout and "alice" in table.stdout

    bad = await asyncio.to_thread(
        runner.invoke, app, ["policy", "test", str(candidate), "--replay-since", "soon"]
    )
    assert bad.exit_code == 1 and "is not a duration" in bad.output
