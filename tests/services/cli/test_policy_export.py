"""Policies for a real deployment: a fresh control plane activates the default set (deny
by default, models only by explicit permit), not the lending example; ``signalbox policy
export`` writes the active set, or a shipped example, to start from."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from typer.testing import CliRunner

from broker.settings import Settings
from services.cli.main import app
from services.policy.cedar.policy_set import CedarPolicies, read_policy_dir, shipped_policy_dir

if TYPE_CHECKING:
    from support import AgentFactory, StackFactory

runner = CliRunner()


@pytest.fixture(autouse=True)
def _operator_secrets(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SIGNALBOX_SECRETS_DIR", str(tmp_path / "data" / "secrets"))


def test_export_of_the_lending_example_needs_no_server(tmp_path: Path) -> None:
    folder = tmp_path / "lending"
    result = runner.invoke(app, ["policy", "export", str(folder), "--example", "lending"])
    assert result.exit_code == 0, result.output
    assert "signalbox policy apply" in result.output
    policies = CedarPolicies.from_dir(folder)  # a complete, valid set
    assert policies.label == "lending-demo"
    assert {"loan-may-score", "registered-agents-may-use-models"} <= set(policies.policies)
    # Not over an existing set without --force; with it, exactly the set written.
    (folder / "mine.cedar").write_text("")
    again = runner.invoke(app, ["policy", "export", str(folder), "--example", "lending"])
    assert again.exit_code == 1 and "--force" in again.output
    forced = runner.invoke(
        app, ["policy", "export", str(folder), "--example", "lending", "--force"]
    )
    assert forced.exit_code == 0, forced.output
    assert not (folder / "mine.cedar").exists()
    unknown = runner.invoke(app, ["policy", "export", str(tmp_path / "x"), "--example", "nope"])
    assert unknown.exit_code == 1 and "lending" in unknown.output


async def test_a_fresh_control_plane_activates_the_default_set_and_exports_it(
    make_stack: StackFactory, make_agent: AgentFactory, settings: Settings, tmp_path: Path
) -> None:
    await make_stack(policy_dir=None)  # what `signalbox up` does without SIGNALBOX_POLICY_DIR
    a = make_agent("a", heartbeat_interval=0)
    await a.start()
    decision = await a.authorize("use_model", "gpt-4o", provider="openai", region="eu-west-1")
    assert (decision.effect, decision.reason_code) == ("deny", "default_deny")

    assert settings.nats_url
    folder = tmp_path / "active"
    result = await asyncio.to_thread(
        runner.invoke, app,
        ["policy", "export", str(folder), "--json", "--nats-url", settings.nats_url],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["files"]
    exported, shipped = read_policy_dir(folder), read_policy_dir(shipped_policy_dir())
    assert exported.files == shipped.files and exported.schema == shipped.schema
    assert exported.label == "default"
    assert "lending-demo.cedar" not in exported.files
