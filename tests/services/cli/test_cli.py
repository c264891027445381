"""The ``signalbox`` CLI against a real nats-server: output, filters, and failure modes."""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import Sequence
from pathlib import Path

import msgspec
import pytest
from support import ainvoke, enroll
from typer.testing import CliRunner, Result

from broker.agent import Agent
from broker.errors import CallDenied
from broker.runtime.jetstream import AUDIT_STREAM
from broker.runtime.server import EmbeddedServer, pick_ports
from broker.settings import Settings
from schemas import AgentManifest, AuditEvent
from services.cli import common as cli
from services.cli.main import app
from services.runner import Stack

runner = CliRunner()


def invoke(args: Sequence[str]) -> Result:
    """Run the CLI in-process (call from a worker thread when a loop is running)."""
    return runner.invoke(app, list(args))


def assert_clean_failure(result: Result, *needles: str) -> None:
    """Exit 1, the expected one-line hints, no traceback."""
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in result.output


def free_port() -> int:
    [port] = pick_ports(1)
    return port


@pytest.fixture(autouse=True)
def _short_connect(monkeypatch: pytest.MonkeyPatch) -> None:
    # Unreachable-server tests need not wait the interactive default.
    monkeypatch.setattr(cli, "CONNECT_TIMEOUT", 0.5)


def make_agent(settings: Settings, name: str, team: str = "risk") -> Agent:
    assert settings.nats_url is not None
    agent = Agent(
        AgentManifest(name=name, version="1.2.0", owner="risk-eng", team=team),
        nats_url=settings.nats_url,
        credential=enroll(settings, name, owner="risk-eng", team=team),
    )

    @agent.capability("score", tags=("pii",))
    async def score(req: dict[str, int]) -> dict[str, int]:
        return req

    return agent


# -- no server needed -----------------------------------------------------------------------


def test_version() -> None:
    result = invoke(["version"])
    assert result.exit_code == 0
    assert result.output.startswith("signalbox ")


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["audit", "tail", "--kind", "bogus"], "unknown audit kind 'bogus'"),
        (["audit", "tail", "--agent", "a.b"], "not a valid subject token"),
        (["audit", "tail", "--last", "-1"], "--last"),
        (["audit", "tail", "--count", "0"], "--count"),
        (["agents", "list", "--frobnicate"], "--frobnicate"),
        (["up", "--port", "99999"], "invalid setting nats_port"),
        (["no-such-command"], "no-such-command"),
    ],
)
def test_bad_arguments_exit_1_with_a_message(args: list[str], needle: str) -> None:
    assert_clean_failure(invoke(args), needle)


def test_bad_environment_setting_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SIGNALBOX_NATS_PORT", "lots")
    assert_clean_failure(invoke(["up"]), "invalid setting nats_port", "SIGNALBOX_NATS_PORT")


@pytest.mark.parametrize(
    "args",
    [["agents", "list"], ["audit", "tail", "--count", "1"], ["agents", "list", "--json"]],
)
def test_unreachable_server_says_what_to_do(args: list[str]) -> None:
    url = f"nats://127.0.0.1:{free_port()}"
    result = invoke([*args, "--nats-url", url])
    assert_clean_failure(result, f"cannot reach NATS at {url}", "signalbox up", "--nats-url")


def test_nats_url_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    url = f"nats://127.0.0.1:{free_port()}"
    monkeypatch.setenv("SIGNALBOX_NATS_URL", url)
    assert_clean_failure(invoke(["agents", "list"]), f"cannot reach NATS at {url}")


def test_up_with_an_unreachable_server_fails_fast() -> None:
    url = f"nats://127.0.0.1:{free_port()}"
    assert_clean_failure(invoke(["up", "--nats-url", url]), f"cannot reach NATS at {url}")


# -- a server without Signalbox ---------------------------------------------------------------


async def test_server_without_signalbox(fresh_server: EmbeddedServer) -> None:
    tail = await ainvoke(["audit", "tail", "--count", "1", "--nats-url", fresh_server.url])
    assert_clean_failure(tail, "no SB_AUDIT stream", "signalbox up")
    agents = await ainvoke(["agents", "list", "--nats-url", fresh_server.url])
    assert_clean_failure(agents, "no registry service answers", "signalbox up")


# -- a running stack ------------------------------------------------------------------------


async def test_agents_list(stack: Stack, settings: Settings) -> None:
    url = stack.settings.nats_url
    assert url is not None
    async with make_agent(settings, "credit-check"), make_agent(settings, "triage", team="ops"):
        as_json = await ainvoke(["agents", "list", "--json", "--nats-url", url])
        assert as_json.exit_code == 0, as_json.output
        records = json.loads(as_json.stdout)
        by_name = {r["manifest"]["name"]: r for r in records}
        assert set(by_name) == {"credit-check", "triage"}
        caps = by_name["credit-check"]["manifest"]["capabilities"]
        assert [(c["name"], c["tags"]) for c in caps] == [("score", ["pii"])]

        filtered = await ainvoke(["agents", "list", "--json", "--team", "ops", "--nats-url", url])
        assert [r["manifest"]["name"] for r in json.loads(filtered.stdout)] == ["triage"]

        table = await ainvoke(["agents", "list", "--nats-url", url])
        assert table.exit_code == 0
        for text in ("credit-check", "1.2.0", "risk-eng", "score", "pii", "triage"):
            assert text in table.stdout

        none = await ainvoke(["agents", "list", "--capability", "nope", "--nats-url", url])
        assert none.exit_code == 0
        assert "No agents registered matching the filters" in none.stdout


async def _audited_activity(stack: Stack, settings: Settings, denied_calls: int) -> None:
    """An agent connects (one ``auth`` record) and registers (one ``registry`` record),
    then makes ``denied_calls`` denied calls (one ``decision`` record each)."""
    async with make_agent(settings, "credit-check") as agent:
        for _ in range(denied_calls):
            with pytest.raises(CallDenied):
                await agent.call("credit-check", "score", {"x": 1})
    for service in stack.services.values():
        assert await service.audit.flush()
    # Flushed means in the intake stream; wait until the sequencer chained it all.
    js = stack.services["tracing"].js
    for _ in range(500):
        if (await js.stream_info(AUDIT_STREAM)).state.last_seq >= 2 + denied_calls:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the audit chain did not catch up")


def parse_lines(stdout: str) -> list[AuditEvent]:
    return [msgspec.json.decode(line, type=AuditEvent) for line in stdout.splitlines() if line]


async def test_audit_tail_json_prints_count_records(stack: Stack, settings: Settings) -> None:
    url = stack.settings.nats_url
    assert url is not None
    await _audited_activity(stack, settings, denied_calls=3)

    result = await ainvoke(["audit", "tail", "--count", "5", "--json", "--nats-url", url])
    assert result.exit_code == 0, result.output
    events = parse_lines(result.stdout)
    assert [e.kind for e in events] == ["auth", "registry", "decision", "decision", "decision"]
    assert [e.seq for e in events] == [1, 2, 3, 4, 5]
    assert all(e.prev_hash == p.hash for p, e in itertools.pairwise(events))


async def test_audit_tail_last_n_with_filters(stack: Stack, settings: Settings) -> None:
    url = stack.settings.nats_url
    assert url is not None
    await _audited_activity(stack, settings, denied_calls=5)  # 1 auth, 2 registry, 3-7 decisions

    decisions = await ainvoke(
        ["audit", "tail", "--kind", "decision", "--last", "2", "--count", "2", "--json",
         "--nats-url", url]
    )  # fmt: skip
    assert decisions.exit_code == 0, decisions.output
    assert [(e.kind, e.seq) for e in parse_lines(decisions.stdout)] == [
        ("decision", 6),
        ("decision", 7),
    ]

    registry = await ainvoke(
        ["audit", "tail", "--kind", "registry", "--agent", "credit-check", "--count", "1",
         "--json", "--nats-url", url]
    )  # fmt: skip
    [event] = parse_lines(registry.stdout)
    assert (event.kind, event.actor, event.seq) == ("registry", "credit-check", 2)

    table = await ainvoke(["audit", "tail", "--last", "3", "--count", "3", "--nats-url", url])
    assert table.exit_code == 0, table.output
    rows = [line for line in table.stdout.splitlines() if "decision" in line]
    assert len(rows) == 3
    assert all("deny → credit-check.score" in row and "default-deny" in row for row in rows)


async def test_audit_tail_follows_new_records(stack: Stack, settings: Settings) -> None:
    url = stack.settings.nats_url
    assert url is not None
    await _audited_activity(stack, settings, denied_calls=1)  # seq 1 to 3 exist already

    tail = asyncio.ensure_future(
        ainvoke(
            [
                "audit",
                "tail",
                "--kind",
                "decision",
                "--last",
                "0",
                "--count",
                "1",
                "--json",
                "--nats-url",
                url,
            ]
        )
    )
    # Keep producing until the tail has printed one new record: it may
    # subscribe after the first of them.
    async with make_agent(settings, "credit-check") as agent:
        while not tail.done():
            with pytest.raises(CallDenied):
                await agent.call("credit-check", "score", {"x": 1})
            await asyncio.wait({tail}, timeout=0.2)
    result = tail.result()
    assert result.exit_code == 0, result.output
    [event] = parse_lines(result.stdout)
    assert event.seq > 3
    assert event.kind == "decision"


# -- identity: enroll, list, revoke ---------------------------------------------------------


async def test_enroll_list_and_revoke_credentials(stack: Stack, settings: Settings) -> None:
    url = stack.settings.nats_url
    assert url is not None
    enrolled = await ainvoke(
        ["agents", "enroll", "credit-check", "--ttl", "2h", "--note", "ticket-1", "--json",
         "--team", "risk", "--owner", "risk-eng", "--nats-url", url]
    )  # fmt: skip
    assert enrolled.exit_code == 0, enrolled.output
    body = json.loads(enrolled.stdout)
    token, cred_id = body["token"], body["credential"]["id"]
    assert 7190 < body["credential"]["expires_at"] - body["credential"]["created_at"] <= 7200

    table = await ainvoke(["agents", "enroll", "triage", "--nats-url", url])
    assert table.exit_code == 0, table.output
    assert "shown once" in table.stdout and "SIGNALBOX_AGENT_CREDENTIAL" in table.stdout

    # The token works for an agent.
    agent = Agent(
        AgentManifest(name="credit-check", version="1.2.0", owner="risk-eng", team="risk"),
        nats_url=url,
        credential=token,
    )
    async with agent:
        listed = await ainvoke(["agents", "credentials", "credit-check", "--nats-url", url])
        assert listed.exit_code == 0, listed.output
        for text in (cred_id, "active", "ticket-1"):
            assert text in listed.stdout
        assert token.split(".")[2] not in listed.stdout

        revoked = await ainvoke(
            ["agents", "revoke", "credit-check", "--reason", "left the team", "--nats-url", url]
        )
        assert revoked.exit_code == 0, revoked.output
        assert cred_id in revoked.stdout and "closed 1 live" in revoked.stdout

    after = await ainvoke(["agents", "credentials", "--all", "--json", "--nats-url", url])
    statuses = {c["id"]: c["revoked_at"] is not None for c in json.loads(after.stdout)["items"]}
    assert statuses[cred_id] is True
    assert len(statuses) == 2


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["agents", "enroll", "a.b"], "not a valid subject token"),
        (["agents", "enroll", "a", "--ttl", "soon"], "is not a duration"),
        (["agents", "revoke", "a", "--credential", "NOPE"], "credential ids look like"),
    ],
)
def test_identity_commands_reject_bad_arguments(args: list[str], needle: str) -> None:
    assert_clean_failure(invoke(args), needle)


async def test_identity_init_writes_secrets_and_a_server_config(tmp_path: Path) -> None:
    folder = tmp_path / "ids"
    conf = tmp_path / "auth.conf"
    result = await ainvoke(
        ["identity", "init", "--secrets-dir", str(folder), "--server-config", str(conf)]
    )
    assert result.exit_code == 0, result.output
    assert (folder / "issuer.nk").stat().st_mode & 0o777 == 0o600
    assert "auth_callout" in conf.read_text()
    again = await ainvoke(["identity", "init", "--secrets-dir", str(folder)])
    assert again.exit_code == 0
    assert (folder / "issuer.nk").read_text() == (folder / "issuer.nk").read_text()
