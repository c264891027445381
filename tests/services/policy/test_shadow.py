"""Shadow mode: a candidate evaluated beside the active set on live traffic, outcomes untouched."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec
import pytest
from nats.aio.client import Client
from support import cedar_policies, eventually
from typer.testing import CliRunner

from broker.connection import connect
from broker.errors import CallDenied
from broker.replies import request
from broker.runtime.identity import operator_connect_options
from broker.settings import Settings
from schemas import PolicyFiles, ShadowPolicies, ShadowStatus
from services.cli.main import app
from services.policy.cedar.policy_set import SCHEMA_FILE, shipped_policy_dir
from services.policy.service import PolicyService

if TYPE_CHECKING:
    from support import AgentFactory, AuditTrail, StackFactory

SCHEMA = (shipped_policy_dir() / SCHEMA_FILE).read_text()


class Echo(msgspec.Struct):
    text: str


pytestmark = pytest.mark.usefixtures("cli_operator")


async def _operator(settings: Settings) -> Client:
    return await connect(
        settings.nats_url, name="test-operator", **operator_connect_options(settings)
    )


async def test_shadow_disagreements_are_audited_and_outcomes_unchanged(
    make_stack: StackFactory,
    make_agent: AgentFactory,
    settings: Settings,
    audit_trail: AuditTrail,
) -> None:
    first = await make_stack(allow=[("alice", "bob", ["echo"])])
    second = await make_stack(services=["policy"])  # a second replica
    replicas: list[PolicyService] = [
        first.services["policy"],  # type: ignore[list-item]
        second.services["policy"],  # type: ignore[list-item]
    ]
    bob = make_agent("bob")

    @bob.capability("echo")
    async def echo(req: Echo) -> Echo:
        return req

    alice, carol = make_agent("alice"), make_agent("carol")
    for agent in (bob, alice, carol):
        await agent.start()

    operator = await _operator(settings)
    try:
        # The candidate lets carol call bob and no longer lets alice.
        candidate = PolicyFiles(
            files={"rules.cedar": cedar_policies([("carol", "bob", ["echo"])])},
            schema=SCHEMA,
            label="candidate",
        )
        status = await request(
            operator, "sb.admin.policy.shadow", ShadowPolicies(candidate=candidate), ShadowStatus
        )
        assert status.enabled and status.version == status.active_version + 1
        await eventually(  # every replica picks it up through the KV watch
            lambda: all(r.shadow is not None for r in replicas),
            "every replica to run the shadow set",
            timeout=5,
            interval=0.01,
        )
        assert all(r.shadow is not None and r.shadow.version == status.version for r in replicas)

        # Outcomes are the active set's.
        for _ in range(4):
            await alice.call("bob", "echo", Echo(text="hi"), returns=Echo, timeout=5)
        with pytest.raises(CallDenied):
            await carol.call("bob", "echo", Echo(text="hi"), timeout=5)

        found = await audit_trail.wait_for(lambda r: r.kind == "shadow", count=5)
        seen = {(r.actor, r.data["active"]["effect"], r.data["shadow"]["effect"]) for r in found}
        assert seen == {("alice", "allow", "deny"), ("carol", "deny", "allow")}
        assert all(r.data["shadow"]["version"] == status.version for r in found)
        assert sum(r.stats.shadow_disagreements for r in replicas) == 5

        off = await request(operator, "sb.admin.policy.shadow", ShadowPolicies(), ShadowStatus)
        assert not off.enabled
        await eventually(
            lambda: all(r.shadow is None for r in replicas),
            "every replica to stop shadowing",
            timeout=5,
            interval=0.01,
        )
    finally:
        await operator.close()


async def test_an_invalid_candidate_is_refused_and_nothing_runs(
    make_stack: StackFactory, settings: Settings
) -> None:
    stack = await make_stack(services=["tracing", "registry", "policy"])
    operator = await _operator(settings)
    try:
        from broker.errors import InvalidInput

        bad = PolicyFiles(files={"x.cedar": "permit (principal, action, resource) when {"},
                          schema=SCHEMA)  # fmt: skip
        with pytest.raises(InvalidInput):
            await request(operator, "sb.admin.policy.shadow", ShadowPolicies(candidate=bad),
                          ShadowStatus)  # fmt: skip
        assert stack.services["policy"].shadow is None  # type: ignore[attr-defined]
    finally:
        await operator.close()


async def test_policy_shadow_cli(make_stack: StackFactory, tmp_path: Path) -> None:
    stack = await make_stack()
    url = stack.settings.nats_url
    assert url is not None
    folder = tmp_path / "candidate"
    folder.mkdir()
    (folder / SCHEMA_FILE).write_text(SCHEMA)
    (folder / "rules.cedar").write_text(cedar_policies([("a", "b", ["*"])]))
    runner = CliRunner()
    on = await asyncio.to_thread(
        runner.invoke, app, ["policy", "shadow", str(folder), "--json", "--nats-url", url]
    )
    assert on.exit_code == 0, on.output
    assert json.loads(on.stdout)["enabled"] is True
    off = await asyncio.to_thread(
        runner.invoke, app, ["policy", "shadow", "--off", "--nats-url", url]
    )
    assert off.exit_code == 0, off.output
    assert "Shadow mode is off" in off.stdout
    neither = await asyncio.to_thread(runner.invoke, app, ["policy", "shadow", "--nats-url", url])
    assert neither.exit_code == 1 and "--off" in neither.output
