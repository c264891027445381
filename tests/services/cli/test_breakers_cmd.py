"""``signalbox breakers list | trip | reset`` against a running stack; only operators may."""

from __future__ import annotations

import asyncio
import getpass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec
import nats
import pytest
from nats.aio.client import Client
from typer.testing import CliRunner, Result

from broker.connection import sync_connection
from broker.errors import BreakerOpen
from broker.settings import Settings
from broker.subjects import inbox_prefix
from services.cli.main import app

if TYPE_CHECKING:
    from support import AgentFactory, AuditTrail, ServiceConnector, StackFactory

from support import echo_pair, enroll


@pytest.fixture
def cli(settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setenv("SIGNALBOX_SECRETS_DIR", str(tmp_path / "data" / "secrets"))
    monkeypatch.setenv("COLUMNS", "220")
    assert settings.nats_url is not None
    url = ["--nats-url", settings.nats_url]

    async def run(*args: str) -> Result:
        # The CLI runs its own event loop: beside the test's.
        return await asyncio.to_thread(CliRunner().invoke, app, [*args, *url])

    return run


async def test_operators_trip_list_and_reset_breakers(
    make_stack: StackFactory, make_agent: AgentFactory, audit_trail: AuditTrail, cli: Any
) -> None:
    await make_stack(allow=[("a", "b", ["echo"])])
    a, _ = await echo_pair(make_agent, team="payments")
    assert (await cli("breakers", "list")).output.strip() == "no open breakers: every call flows"

    tripped = await cli("breakers", "trip", "b", "--reason", "bad deploy 4.2", "--for", "10m")
    assert tripped.exit_code == 0, tripped.output
    assert "tripped agent.b" in tripped.output and "(in 600s)" in tripped.output
    team = await cli("breakers", "trip", "team:payments", "--reason", "incident 7")
    assert team.exit_code == 0 and "until reset" in team.output

    table = await cli("breakers", "list")
    assert table.exit_code == 0, table.output
    for text in ("agent.b", "team.payments", "open", "manual: bad deploy 4.2", "until reset"):
        assert text in table.output, text
    listed = msgspec.json.decode((await cli("breakers", "list", "--json")).output)
    by_key = {x["key"]: x for x in listed["breakers"]}
    assert set(by_key) == {"agent.b", "team.payments"}
    login = getpass.getuser()
    assert by_key["agent.b"]["tripped_by"] == f"bootstrap:{login}"
    assert by_key["agent.b"]["cooldown"] == 600 and by_key["team.payments"]["until"] is None

    with pytest.raises(BreakerOpen, match=r"bad deploy 4\.2") as refused:
        await a.call("b", "echo", {"x": 1})
    assert refused.value.details["reset"] == "signalbox breakers reset agent:b"

    reset = await cli("breakers", "reset", "agent:b", "--reason", "rolled back")
    assert reset.exit_code == 0 and "reset agent.b: calls flow again" in reset.output
    assert await a.call("b", "echo", {"x": 2}) == {"x": 2}
    remaining = msgspec.json.decode((await cli("breakers", "list", "--json")).output)
    assert [x["key"] for x in remaining["breakers"]] == ["team.payments"]
    every = msgspec.json.decode((await cli("breakers", "list", "--all", "--json")).output)
    assert {x["key"]: x["state"] for x in every["breakers"]} == {
        "agent.b": "closed", "team.payments": "open",
    }  # fmt: skip

    changes = await audit_trail.wait_for(lambda r: r.kind == "breaker", count=3)
    assert {(r.actor, r.data["op"], r.data["key"]) for r in changes} == {
        (f"bootstrap:{login}", "trip", "agent.b"),
        (f"bootstrap:{login}", "trip", "team.payments"),
        (f"bootstrap:{login}", "reset", "agent.b"),
    }


async def test_bad_targets_and_unknown_breakers_are_refused_with_a_message(
    make_stack: StackFactory, cli: Any
) -> None:
    await make_stack(services=["tracing", "registry", "policy"])
    bad = await cli("breakers", "trip", "fleet:x", "--reason", "r")
    assert bad.exit_code == 1 and "names no breaker" in bad.output
    no_reason = await cli("breakers", "trip", "a", "--reason", "  ")
    assert no_reason.exit_code == 1 and "--reason" in no_reason.output
    bad_for = await cli("breakers", "trip", "a", "--reason", "r", "--for", "soon")
    assert bad_for.exit_code == 1 and "not a duration" in bad_for.output
    missing = await cli("breakers", "reset", "team:nobody")
    assert missing.exit_code == 1 and "there is no breaker team.nobody" in missing.output


async def test_an_agent_cannot_trip_breakers_or_write_the_bucket(
    make_stack: StackFactory, settings: Settings, service_nc: ServiceConnector
) -> None:
    await make_stack(services=["tracing", "registry", "policy"])
    watcher = await service_nc()
    seen: list[Any] = []

    async def on_msg(msg: Any) -> None:
        seen.append(msg)

    await watcher.subscribe("sb.admin.breakers.>", cb=on_msg)
    await watcher.subscribe("$KV.sb_breakers.>", cb=on_msg)
    await sync_connection(watcher)

    errors: asyncio.Queue[Exception] = asyncio.Queue()

    async def on_error(exc: Exception) -> None:
        await errors.put(exc)

    assert settings.nats_url is not None
    agent: Client = await nats.connect(
        servers=[settings.nats_url], token=enroll(settings, "mallory"),
        inbox_prefix=inbox_prefix("mallory"), error_cb=on_error, allow_reconnect=False,
    )  # fmt: skip
    try:
        for subject in ("sb.admin.breakers.trip", "sb.admin.breakers.reset",
                        "$KV.sb_breakers.agent.victim"):  # fmt: skip
            await agent.publish(subject, b"{}")
            async with asyncio.timeout(5):
                while True:  # the server says no, naming the subject
                    err = str(await errors.get()).lower()
                    if "permissions violation" in err and subject.lower() in err:
                        break
    finally:
        await agent.close()
    await sync_connection(watcher)
    assert seen == []
