"""kill -9 of the embedded nats-server: `signalbox up` restarts it on the same store and port
(bounded), or exits non-zero so a process supervisor acts; never a zombie, never a silent hang.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from support import enroll, eventually

from broker import Agent
from broker.settings import Settings
from schemas import AgentManifest
from services.runner import Stack

pytestmark = pytest.mark.nats


def _exists(pid: int) -> bool:
    """The process is there, running or a zombie (its parent never reaped it)."""
    return Path(f"/proc/{pid}/stat").exists()


@pytest.fixture
async def embedded(tmp_path: Path) -> AsyncIterator[Stack]:
    """`signalbox up`'s stack in this process: embedded server (free port), all services."""
    settings = Settings(data_dir=tmp_path / "data", nats_port=0, nats_sync_always=False)
    stack = Stack(settings)
    await stack.start()
    yield stack
    await stack.stop()


async def test_a_killed_server_is_restarted_on_the_same_store_and_port(embedded: Stack) -> None:
    stack = embedded
    assert stack.server is not None and stack.server.pid is not None
    url, old_pid = stack.settings.nats_url, stack.server.pid
    agent = Agent(
        AgentManifest(name="survivor", version="1.0.0", owner="", team=""),
        nats_url=url or "",
        credential=enroll(stack.settings, "survivor"),
        heartbeat_interval=0,
    )
    async with agent:
        os.kill(old_pid, signal.SIGKILL)
        await eventually(lambda: stack.server_restarts == 1, "the server to be restarted")
        assert stack.server.pid != old_pid and stack.server.url == url  # same port
        assert not _exists(old_pid)  # reaped: no zombie

        async def served() -> bool:  # the agent and the registry reconnected by themselves
            try:
                found = await agent.discover(name="survivor")
            except Exception:
                return False
            return [r.manifest.name for r in found.agents] == ["survivor"]

        await eventually(served, "the registry to answer the agent again", timeout=30)
    assert stack.failed is not None and not stack.failed.done()


async def test_too_many_deaths_fail_the_stack_instead_of_hanging(tmp_path: Path) -> None:
    settings = Settings(
        data_dir=tmp_path / "data", nats_port=0, nats_sync_always=False, server_restart_attempts=0
    )
    stack = Stack(settings, services=["tracing"])
    await stack.start()
    try:
        assert stack.server is not None and stack.server.pid is not None
        pid = stack.server.pid
        os.kill(pid, signal.SIGKILL)
        assert stack.failed is not None
        reason = await asyncio.wait_for(stack.failed, 10)
        assert "signal 9" in reason and "giving up" in reason
        assert not _exists(pid)  # reaped: no zombie left
    finally:
        await stack.stop()


def _up(tmp_path: Path, **env: str) -> subprocess.Popen[bytes]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("SIGNALBOX_")}
    environ.update({"SIGNALBOX_NATS_SYNC_ALWAYS": "false", **env})
    return subprocess.Popen(
        [sys.executable, "-c", "from services.cli.main import app; app()", "up",
         "--data-dir", str(tmp_path / "up"), "--port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, env=environ,
    )  # fmt: skip


def _server_pid(tmp_path: Path, timeout: float = 30.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ports = list((tmp_path / "up" / "nats").glob("nats-server_*.ports"))
        if ports and (tmp_path / "up" / "nats" / "nats-server.log").exists():
            return int(ports[0].stem.split("_")[1])
        time.sleep(0.05)
    raise AssertionError("signalbox up never started its server")


@pytest.mark.timeout(60)
def test_signalbox_up_exits_non_zero_when_its_server_keeps_dying(tmp_path: Path) -> None:
    up = _up(tmp_path, SIGNALBOX_SERVER_RESTART_ATTEMPTS="0")
    try:
        pid = _server_pid(tmp_path)
        time.sleep(1.0)  # let the services come up (a kill during start-up is another path)
        os.kill(pid, signal.SIGKILL)
        code = up.wait(timeout=30)
    finally:
        if up.poll() is None:
            up.kill()
        out, err = up.communicate()
    assert code == 1, (out.decode(errors="replace"), err.decode(errors="replace"))
    assert b"died (signal 9)" in err and b"giving up" in err


@pytest.mark.timeout(60)
def test_signalbox_up_restarts_its_server_and_stops_cleanly(tmp_path: Path) -> None:
    up = _up(tmp_path)
    try:
        first = _server_pid(tmp_path)
        time.sleep(1.0)
        os.kill(first, signal.SIGKILL)
        deadline = time.monotonic() + 20
        second = first
        while second == first and time.monotonic() < deadline:
            ports = list((tmp_path / "up" / "nats").glob("nats-server_*.ports"))
            pids = [int(p.stem.split("_")[1]) for p in ports]
            second = next((p for p in pids if p != first), first)
            time.sleep(0.05)
        assert second != first, "no new server"
        assert up.poll() is None  # still up
        up.send_signal(signal.SIGTERM)
        code = up.wait(timeout=30)
    finally:
        if up.poll() is None:
            up.kill()
        _, err = up.communicate()
    assert code == 0, err.decode(errors="replace")
    assert b"restarting it on the same store" in err
    assert not _exists(second)  # the server stopped with it
