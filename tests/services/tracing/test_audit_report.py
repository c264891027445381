"""``signalbox audit report --tag``: who called tagged capabilities, how often, decided how."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import pytest
from support import ainvoke
from typer.testing import CliRunner

from broker.errors import CallDenied
from schemas import AgentManifest, AgentRecord, AuditEvent, Capability
from services.cli.main import app
from services.tracing.report import tag_report, tagged_capabilities

if TYPE_CHECKING:
    from support import AgentFactory, AuditTrail, StackFactory

runner = CliRunner()


pytestmark = pytest.mark.usefixtures("cli_operator")


def record(name: str, caps: dict[str, tuple[str, ...]], version: str = "1.0.0") -> AgentRecord:
    manifest = AgentManifest(
        name=name, version=version, owner="o", team="t",
        capabilities=tuple(Capability(name=c, tags=tags) for c, tags in caps.items()),
    )  # fmt: skip
    return AgentRecord(manifest=manifest, registered_at=0.0)


def decision(caller: str, target: str, cap: str, effect: str, t: float) -> AuditEvent:
    return AuditEvent(
        id=f"{caller}-{t}", time=t, kind="decision", actor=caller,
        data={"caller": caller, "target": target, "capability": cap,
              "decision": {"effect": effect}},
    )  # fmt: skip


def test_tagged_capabilities_are_taken_from_every_version() -> None:
    records = [
        record("credit", {"score": ("pii",), "ping": ()}),
        record("credit", {"score": (), "history": ("pii", "finance")}, version="2.0.0"),
        record("fraud", {"check": ("finance",)}),
    ]
    assert tagged_capabilities(records, "pii") == {("credit", "score"), ("credit", "history")}
    assert tagged_capabilities(records, "nope") == set()


def test_tag_report_counts_decisions_per_caller_and_capability() -> None:
    tagged = {("credit", "score")}
    events = [
        decision("loan", "credit", "score", "allow", 1.0),
        decision("loan", "credit", "score", "deny", 2.0),
        decision("loan", "credit", "score", "allow", 3.0),
        decision("chat", "credit", "score", "deny", 4.0),
        decision("loan", "credit", "ping", "allow", 5.0),  # not tagged
        AuditEvent(
            id="c",
            time=6.0,
            kind="call",
            actor="loan",
            data={"target": "credit", "capability": "score"},
        ),
    ]
    rows = tag_report(events, tagged)
    assert [(r.caller, r.attempts, r.effects) for r in rows] == [
        ("loan", 3, {"allow": 2, "deny": 1}),
        ("chat", 1, {"deny": 1}),
    ]
    assert (rows[0].first_time, rows[0].last_time) == (1.0, 3.0)


async def test_cli_report_lists_callers_of_tagged_capabilities(
    make_stack: StackFactory, make_agent: AgentFactory, audit_trail: AuditTrail
) -> None:
    stack = await make_stack(allow=[("loan", "credit", ["score", "ping"])])
    credit = make_agent("credit")

    @credit.capability("score", tags=("pii",))
    async def score(req: Any) -> Any:
        return req

    @credit.capability("ping")
    async def ping(req: Any) -> Any:
        return req

    loan, chat = make_agent("loan"), make_agent("chat")
    for agent in (credit, loan, chat):
        await agent.start()
    for _ in range(3):
        await loan.call("credit", "score", {"x": 1})
    await loan.call("credit", "ping", {})
    with pytest.raises(CallDenied):
        await chat.call("credit", "score", {"x": 1})
    await audit_trail.wait_for(lambda r: r.kind == "decision", count=5)

    url = stack.settings.nats_url or ""
    result = await ainvoke(["audit", "report", "--tag", "pii", "--since", "1h", "--json",
                            "--nats-url", url])  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["capabilities"] == ["credit.score"]
    assert [
        (r["caller"], r["capability"], r["attempts"], r["effects"]) for r in report["rows"]
    ] == [
        ("loan", "score", 3, {"allow": 3}),
        ("chat", "score", 1, {"deny": 1}),
    ]

    table = await ainvoke(["audit", "report", "--tag", "pii", "--since", "1h", "--nats-url", url])
    assert table.exit_code == 0, table.output
    assert "credit.score" in table.stdout and "allow 3" in table.stdout
    assert "deny 1" in table.stdout

    none = await ainvoke(["audit", "report", "--tag", "pci-dss", "--since", "1h",
                          "--nats-url", url])  # fmt: skip
    assert none.exit_code == 0
    assert "No registered capability carries the tag 'pci-dss'" in none.stdout


def test_cli_report_needs_tag_and_since() -> None:
    for args in (["--tag", "pii"], ["--since", "1h"]):
        result = runner.invoke(app, ["audit", "report", *args])
        assert result.exit_code == 1 and "Traceback" not in result.output
