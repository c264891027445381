"""``signalbox up`` on a custom data folder and port: its hints work as printed, and
``--port`` means the embedded server even when ``SIGNALBOX_NATS_URL`` names another."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

from typer.testing import CliRunner

from services.cli.main import app

CLI = [sys.executable, "-c", "from services.cli import main; main()"]


def test_port_and_nats_url_together_are_refused() -> None:
    result = CliRunner().invoke(app, ["up", "--port", "0", "--nats-url", "nats://127.0.0.1:1"])
    assert result.exit_code == 1
    assert "give one of them" in result.output


def _wait_for_banner(proc: subprocess.Popen[str], lines: list[str]) -> None:
    assert proc.stdout is not None
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line.rstrip("\n"))
        if lines[-1].startswith("export "):
            return
    raise AssertionError("no export hint from `signalbox up`:\n" + "\n".join(lines))


def test_up_hints_work_as_printed_from_another_folder(tmp_path: Path) -> None:
    data = tmp_path / "custom data"  # a space: the hint must quote it
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIGNALBOX_")}
    # A stale URL in the environment: --port must start the embedded server anyway.
    env["SIGNALBOX_NATS_URL"] = "nats://127.0.0.1:1"
    proc = subprocess.Popen(
        [*CLI, "up", "--data-dir", str(data), "--port", "0"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    lines: list[str] = []
    try:
        _wait_for_banner(proc, lines)
        output = "\n".join(lines)
        assert "SIGNALBOX_NATS_URL=nats://127.0.0.1:1 is ignored" in output
        assert "embedded nats-server" in output
        # The hint, exactly as printed, in a shell elsewhere, then the suggested command.
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        clean = {k: v for k, v in env.items() if not k.startswith("SIGNALBOX_")}
        script = f"{lines[-1]} && {shlex.join(CLI)} agents list --json"
        listed = subprocess.run(
            ["bash", "-c", script], cwd=elsewhere, env=clean,
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert listed.returncode == 0, listed.stdout + listed.stderr
        assert listed.stdout.strip().startswith("[")
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
