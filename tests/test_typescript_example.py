"""The TypeScript examples in ``docs/examples/typescript`` work with the official NATS
JavaScript client: a raw agent registers and calls another agent through Signalbox, and
an operator lists agents with the NATS services client from ``signalbox identity
nats-context``'s context.

They need Node.js and npm (Debian's ``nodejs`` and ``npm``; ``.ci/run`` installs
them). Without them the tests skip, except in CI (``CI=true``), where they fail.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
from pathlib import Path

import msgspec
import pytest
from support import enroll, lending_policy_dir
from typer.testing import CliRunner

from broker import Agent
from broker.settings import Settings
from schemas import AgentManifest
from services.cli.main import app
from services.runner import Stack

EXAMPLE = Path(__file__).resolve().parents[1] / "docs" / "examples" / "typescript"


def _node_or_skip() -> None:
    missing = [tool for tool in ("node", "npm") if shutil.which(tool) is None]
    if missing:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must run the TypeScript example: install {', '.join(missing)}")
        pytest.skip(f"no {', '.join(missing)} here (Debian: apt-get install nodejs npm)")


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The example, installed from its lock file and compiled, in a folder of its own."""
    _node_or_skip()
    folder = tmp_path_factory.mktemp("ts") / "typescript"
    shutil.copytree(EXAMPLE, folder, ignore=shutil.ignore_patterns("node_modules", "dist"))
    for command in (["npm", "ci", "--no-audit", "--no-fund"], ["npx", "tsc", "-p", "."]):
        done = subprocess.run(command, cwd=folder, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, f"{' '.join(command)}:\n{done.stdout}\n{done.stderr}"
    return folder


class ScoreRequest(msgspec.Struct):
    applicant_id: str
    income: int


def test_typescript_agent_calls_and_operator_lists(
    built: Path, settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert settings.nats_url
    # The lending example's permits (loan-origination may ask credit-check for a score).
    settings = settings.model_copy(update={"policy_dir": lending_policy_dir()})
    monkeypatch.setenv("SIGNALBOX_SECRETS_DIR", str(settings.data_dir / "secrets"))
    credential = enroll(settings, "loan-origination", team="lending", owner="lending")
    env = {**os.environ, "NATS_URL": settings.nats_url, "CREDENTIAL": credential}

    async def run() -> tuple[subprocess.CompletedProcess[str], subprocess.CompletedProcess[str]]:
        async with Stack(settings):
            credit = Agent(
                AgentManifest(name="credit-check", version="1.2.0", owner="risk-team",
                              team="risk"),
                nats_url=settings.nats_url,
                credential=enroll(settings, "credit-check", team="risk", owner="risk-team"),
                heartbeat_interval=0,
            )  # fmt: skip

            @credit.capability("score", tags=("pii",))
            async def score(req: ScoreRequest) -> dict[str, int]:
                return {"score": 700 + req.income // 10_000}

            async with credit:
                called = await asyncio.to_thread(
                    subprocess.run, ["node", "dist/call-agent.js"], cwd=built, env=env,
                    capture_output=True, text=True, timeout=60,
                )  # fmt: skip
                context = await asyncio.to_thread(
                    CliRunner().invoke, app,
                    ["identity", "nats-context", "ops", "--dir", str(tmp_path),
                     "--nats-url", settings.nats_url],
                )  # fmt: skip
                assert context.exit_code == 0, context.output
                listed = await asyncio.to_thread(
                    subprocess.run, ["node", "dist/list-agents.js", str(tmp_path / "ops.json")],
                    cwd=built, capture_output=True, text=True, timeout=60,
                )  # fmt: skip
                return called, listed

    called, listed = asyncio.run(run())
    assert called.returncode == 0, called.stdout + called.stderr
    assert json.loads(called.stdout) == {"score": 708}
    assert listed.returncode == 0, listed.stdout + listed.stderr
    names = {line.split("\t")[0] for line in listed.stdout.splitlines()}
    assert "credit-check" in names, listed.stdout
