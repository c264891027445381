"""The README's promises: set-up commands, configuration table, the agent example."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import msgspec
from support import enroll

from broker.settings import Settings
from services.runner import Stack

README = Path(__file__).resolve().parents[1] / "README.md"


class ScoreRequest(msgspec.Struct):
    """The README's credit-check input (module level: the SDK resolves handler hints)."""

    applicant_id: str
    income: int


def _text() -> str:
    return README.read_text()


def test_readme_opens_with_the_two_setup_commands() -> None:
    block = re.search(r"```bash\n(.*?)```", _text(), re.S)
    assert block is not None
    lines = block.group(1).strip().splitlines()
    assert len(lines) == 2
    assert lines[0].endswith("pip install -e '.[server]' && signalbox demo")
    assert lines[1].endswith("pip install -e '.[test]' && pytest")
    # CI must run the same test command.
    ci = (README.parent / ".ci" / "run").read_text()
    assert "pip install -e '.[test]'" in ci
    assert re.search(r"^\s*(python -m )?pytest\b", ci, re.M)


def test_configuration_table_lists_every_setting_and_nothing_else() -> None:
    documented = set(re.findall(r"^\| `SIGNALBOX_([A-Z_]+)` \|", _text(), re.M))
    fields = {name.upper() for name in Settings.model_fields}
    assert documented == fields


def _enroll_options(name: str) -> dict[str, str]:
    """The attributes the README's `signalbox agents enroll NAME --team T --owner O` binds."""
    line = re.search(rf"^signalbox agents enroll {name} (.*)$", _text(), re.M)
    assert line is not None, f"the README enrolls no {name}"
    flags = line.group(1).split()
    pairs = zip(flags[::2], flags[1::2], strict=True)
    return {flag.removeprefix("--"): value for flag, value in pairs}


def _readme_policies(tmp_path: Path) -> Path:
    """Run the README's `signalbox policy export DIR --example NAME` into ``tmp_path``."""
    from typer.testing import CliRunner

    from services.cli.main import app

    line = re.search(r"^signalbox policy export (\S+) --example (\S+)", _text(), re.M)
    assert line is not None, "the README exports no example policy set"
    assert f"signalbox policy apply {line.group(1)}" in _text()
    folder = tmp_path / line.group(1)
    done = CliRunner().invoke(app, ["policy", "export", str(folder), "--example", line.group(2)])
    assert done.exit_code == 0, done.output
    return folder


def test_agent_example_runs(settings: Settings, tmp_path: Path) -> None:
    example = re.search(r"## An agent\n\n```python\n(.*?)```", _text(), re.S)
    assert example is not None
    # The lending example's policies, exported as the README says, decide its two calls
    # (the README then applies them; here the stack starts with them, to the same effect).
    settings = settings.model_copy(update={"policy_dir": _readme_policies(tmp_path)})
    script = tmp_path / "example.py"
    assert settings.nats_url
    script.write_text(example.group(1).replace("nats://127.0.0.1:4222", settings.nats_url))

    # Each agent with a credential of its own, as `signalbox agents enroll` issues them.
    env = {
        **os.environ,
        "CREDIT_CHECK_CREDENTIAL": enroll(
            settings, "credit-check", **_enroll_options("credit-check")
        ),
        "LOAN_ORIGINATION_CREDENTIAL": enroll(
            settings, "loan-origination", **_enroll_options("loan-origination")
        ),
    }

    import asyncio

    async def run() -> subprocess.CompletedProcess[str]:
        async with Stack(settings):
            return await asyncio.to_thread(
                subprocess.run,
                [sys.executable, str(script)],
                capture_output=True,
                text=True,
                timeout=30,
                cwd=README.parent,
                env=env,
            )

    done = asyncio.run(run())
    assert done.returncode == 0, done.stderr
    out = done.stdout.splitlines()
    assert out[0] == "708"
    assert "denied" in out[1] and "default-deny" in out[1]


def test_raw_client_example_runs(settings: Settings, tmp_path: Path) -> None:
    """The "Agents outside the SDK" example: plain nats-py, its credential, its inbox."""
    import asyncio

    from broker import Agent
    from schemas import AgentManifest

    example = re.search(r"### Agents outside the SDK\n.*?```python\n(.*?)```", _text(), re.S)
    assert example is not None
    assert "from broker" not in example.group(1) and "import nats" in example.group(1)
    script = tmp_path / "raw.py"
    assert settings.nats_url
    script.write_text(example.group(1).replace("nats://127.0.0.1:4222", settings.nats_url))
    settings = settings.model_copy(update={"policy_dir": _readme_policies(tmp_path)})
    env = {**os.environ, "CREDENTIAL": enroll(
        settings, "loan-origination", **_enroll_options("loan-origination")
    )}  # fmt: skip

    async def run() -> subprocess.CompletedProcess[str]:
        async with Stack(settings):
            credit = Agent(
                AgentManifest(name="credit-check", version="1.2.0", owner="risk-team",
                              team="risk"),
                nats_url=settings.nats_url,
                credential=enroll(settings, "credit-check", **_enroll_options("credit-check")),
                heartbeat_interval=0,
            )  # fmt: skip

            @credit.capability("score", tags=("pii",))
            async def score(req: ScoreRequest) -> dict[str, int]:
                return {"score": 700 + req.income // 10_000}

            async with credit:
                return await asyncio.to_thread(
                    subprocess.run, [sys.executable, str(script)], capture_output=True,
                    text=True, timeout=30, cwd=tmp_path, env=env,
                )  # fmt: skip

    done = asyncio.run(run())
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip() == "{'score': 708}"
