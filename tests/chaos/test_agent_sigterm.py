"""A pod stop loses nothing: SIGTERM to an agent process in the middle of a call.

The agent runs in its own process with ``Agent.run_forever()`` (what a
container's entry point does). The test calls it, waits until the handler is
running, sends SIGTERM, and checks that the call still gets its answer, that
the process exits normally, and that the registry stopped counting the
instance at once (it left, instead of aging out on missed heartbeats) while
the version stays registered.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from support import enroll, eventually

from broker.settings import Settings
from schemas import GetAgent

if TYPE_CHECKING:
    from conftest import AgentFactory, StackFactory

AGENT = """
import asyncio, os, pathlib, sys
from broker import Agent
from schemas import AgentManifest

marker = pathlib.Path(sys.argv[1])
b = Agent(
    AgentManifest(name="b", version="1.0.0", owner="owner-1", team="team-1"),
    nats_url=os.environ["NATS_URL"], credential=os.environ["CREDENTIAL"],
    heartbeat_interval=0.5,
)

@b.capability("slow")
async def slow(req: dict) -> dict:
    marker.write_text("running")
    await asyncio.sleep(1.5)
    return {"done": req["n"]}

async def main() -> None:
    await b.start()
    print("ready", flush=True)
    await b.run_forever()
    print("stopped cleanly", flush=True)

asyncio.run(main())
"""


async def test_sigterm_mid_call_finishes_the_call_and_leaves(
    make_stack: StackFactory, make_agent: AgentFactory, settings: Settings, tmp_path: Path
) -> None:
    stack = await make_stack(allow=[("a", "b", ["slow"])])
    registry = stack.services["registry"]
    assert settings.nats_url
    script, marker = tmp_path / "agent_b.py", tmp_path / "running"
    script.write_text(AGENT)
    env = {**os.environ, "NATS_URL": settings.nats_url,
           "CREDENTIAL": enroll(settings, "b", owner="owner-1", team="team-1")}  # fmt: skip
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(script), str(marker), env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        ready = await asyncio.wait_for(proc.stdout.readline(), 30)
        assert ready.strip() == b"ready", ready
        a = make_agent("a", heartbeat_interval=0)
        await a.start()

        async def live_instances() -> int:
            return (await registry.get(GetAgent(name="b", version="1.0.0"))).instances

        await eventually(live_instances, "b's heartbeat (one live instance)")
        call = asyncio.ensure_future(a.call("b", "slow", {"n": 7}, timeout=20))
        await eventually(marker.exists, "the handler to be running")
        proc.send_signal(signal.SIGTERM)
        assert await call == {"done": 7}  # answered although the process was told to stop
        out, err = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode == 0, err.decode()
        assert b"stopped cleanly" in out
        record = await registry.get(GetAgent(name="b", version="1.0.0"))
        assert record.instances == 0  # it left; the version is still registered
        assert record.manifest.version == "1.0.0"
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
