"""``signalbox status`` gathers every replica's health; ``signalbox probe`` reads the
health files a container orchestrator probes. Real services on a real server."""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec
from support import eventually
from typer.testing import CliRunner, Result

from broker.runtime.health import health_path, probe, write_health
from broker.settings import Settings
from schemas import ServiceHealth
from services.cli.main import app

if TYPE_CHECKING:
    from support import StackFactory

runner = CliRunner()


async def _invoke(args: Sequence[str]) -> Result:
    return await asyncio.to_thread(runner.invoke, app, list(args), terminal_width=80)


async def test_status_lists_every_replica_ready(
    make_stack: StackFactory, settings: Settings
) -> None:
    stack = await make_stack()
    assert settings.nats_url
    result = await _invoke(["status", "--json", "--nats-url", settings.nats_url])
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert out["ok"] and out["missing"] == [] and out["errors"] == []
    replicas = {r["service"]: r for r in out["replicas"]}
    assert set(replicas) == {"registry", "policy", "cost", "tracing"}
    assert all(r["ready"] and r["connected"] and not r["problems"] for r in replicas.values())
    assert replicas["policy"]["instance"] == stack.services["policy"].instance
    # The consumers' lag: the cost meter's usage consumer, the tracing sequencer's.
    assert replicas["cost"]["consumers"] and replicas["tracing"]["consumers"]
    assert all(r["audit_pending"] == 0 for r in replicas.values())

    table = await _invoke(["status", "--nats-url", settings.nats_url])
    assert table.exit_code == 0, table.output
    for service in stack.services.values():
        assert service.instance in table.output  # ids are never cut, even at 80 columns
    assert "All 4 replicas ready." in table.output


async def test_status_fails_and_says_what_to_start_when_a_service_is_missing(
    make_stack: StackFactory, settings: Settings
) -> None:
    await make_stack(services=["registry", "policy"])
    assert settings.nats_url
    result = await _invoke(["status", "--wait", "0.3", "--nats-url", settings.nats_url])
    assert result.exit_code == 1
    assert "cost:" in result.output and "python -m services.cost" in result.output
    only = await _invoke(
        ["status", "--service", "policy", "--json", "--nats-url", settings.nats_url]
    )
    assert only.exit_code == 0, only.output
    assert [r["service"] for r in json.loads(only.output)["replicas"]] == ["policy"]


async def test_probe_reads_the_health_files_of_live_services(
    make_stack: StackFactory, settings: Settings
) -> None:
    stack = await make_stack()
    data = str(settings.data_dir)
    for path in (health_path(settings.data_dir, s) for s in stack.services):
        await eventually(path.exists, f"{path} to be written")
    live = await _invoke(["probe", "--ready", "--data-dir", data])
    assert live.exit_code == 0, live.output
    assert live.output.count("ok ") == 4
    await stack.stop()  # a clean stop removes the reports
    gone = await _invoke(["probe", "policy", "--data-dir", data])
    assert gone.exit_code == 1 and "no health report" in gone.output


def _report(**changes: object) -> ServiceHealth:
    base = ServiceHealth(
        service="policy", instance="i1", host="h", pid=os.getpid(), started_at=time.time(),
        time=time.time(), connected=True, ready=True,
    )  # fmt: skip
    return msgspec.structs.replace(base, **changes)


def test_a_probe_fails_on_a_stale_dead_or_unready_report(tmp_path: Path) -> None:
    path = health_path(tmp_path, "policy")
    write_health(path, _report())
    assert probe(path, ready=True) == (True, "policy: ready")
    write_health(path, _report(time=time.time() - 60))
    ok, why = probe(path, ready=False)
    assert not ok and "hung or gone" in why
    write_health(path, _report(pid=2**22 + 12345))  # no such process
    ok, why = probe(path, ready=False)
    assert not ok and "is gone" in why
    write_health(path, _report(ready=False, problems=("not connected to NATS",)))
    assert probe(path, ready=False)[0]  # alive
    ok, why = probe(path, ready=True)
    assert not ok and "not connected to NATS" in why
    path.write_bytes(b"\xff garbage")
    ok, why = probe(path, ready=False)
    assert not ok and "unreadable" in why
