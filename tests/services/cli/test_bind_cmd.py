"""``signalbox agents enroll --team ...``, ``agents bind`` and ``agents show``: the
attributes operators bind to agents, against a real stack."""

from __future__ import annotations

import asyncio
import getpass
import json
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import msgspec
import pytest
from typer.testing import CliRunner, Result

from broker.agent import Agent
from broker.errors import AttributeMismatch
from broker.replies import request
from broker.settings import Settings
from schemas import AgentManifest, Registered
from services.cli.main import app

if TYPE_CHECKING:
    from support import AuditTrail

    from services.runner import Stack

from support import eventually, registry_of

runner = CliRunner()


async def cli(*args: str) -> Result:
    """Run the CLI beside the test's event loop (it runs its own)."""
    return await asyncio.to_thread(runner.invoke, app, list(args))


def failed(result: Result, *needles: str) -> None:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in result.output, result.output


def _binding(doc: dict[str, Any]) -> dict[str, Any]:
    fields = ("team", "owner", "namespace", "region", "projects", "tags")
    return {k: doc[k] for k in fields}


async def test_enroll_binds_bind_changes_only_what_is_given_and_show_tells(
    stack: Stack, settings: Settings, audit_trail: AuditTrail
) -> None:
    url = settings.nats_url
    assert url is not None
    enrolled = await cli(
        "agents", "enroll", "ledger", "--team", "finance-ops", "--owner", "fin",
        "--namespace", "finance", "--region", "eu", "--project", "books", "--project", "audit",
        "--tag", "data-residency:eu", "--json", "--nats-url", url,
    )  # fmt: skip
    assert enrolled.exit_code == 0, enrolled.output
    body = json.loads(enrolled.stdout)
    assert _binding(body["binding"]) == {
        "team": "finance-ops", "owner": "fin", "namespace": "finance", "region": "eu",
        "projects": ["books", "audit"], "tags": ["data-residency:eu"],
    }  # fmt: skip
    # Who bound it, as the registry audits operators (the login is the CLI's).
    assert body["binding"]["bound_by"].endswith(f":{getpass.getuser()}")

    # The agent declares only its name, version and capabilities.
    agent = Agent(
        AgentManifest(name="ledger", version="1.0.0", owner="", team=""),
        nats_url=url, credential=body["token"], heartbeat_interval=0,
    )  # fmt: skip

    @agent.capability("post", tags=("pii",))
    async def post(req: dict[str, Any]) -> str:
        return "ok"

    async with agent:
        shown = await cli("agents", "show", "ledger", "--json", "--nats-url", url)
        assert shown.exit_code == 0, shown.output
        record = json.loads(shown.stdout)
        assert (record["manifest"]["team"], record["manifest"]["project"]) == (
            "finance-ops",
            "books",
        )
        assert record["manifest"]["metadata"]["namespace"] == "finance"
        assert record["manifest"]["capabilities"][0]["tags"] == ["pii"]
        assert _binding(record["binding"]) == _binding(body["binding"])
        table = await cli("agents", "show", "ledger", "--nats-url", url)
        assert table.exit_code == 0, table.output
        for needle in ("Bound by operators", "finance-ops", "data-residency:eu", "tags: pii"):
            assert needle in table.stdout, table.stdout

        # A partial update: only the tags change; the registered version is rewritten.
        bound = await cli(
            "agents", "bind", "ledger", "--tag", "sox", "--reason", "audit season", "--json",
            "--nats-url", url,
        )  # fmt: skip
        assert bound.exit_code == 0, bound.output
        change = json.loads(bound.stdout)
        assert change["changed"] == ["tags"] and change["versions"] == 1
        assert change["binding"]["tags"] == ["sox"]
        assert change["previous"]["tags"] == ["data-residency:eu"]
        assert _binding(change["binding"]) | {"tags": ["data-residency:eu"]} == _binding(
            body["binding"]
        )
        registry = registry_of(stack)
        await eventually(
            lambda: registry.index.get(
                "ledger", None, now=0, stale_after=1, down_after=1
            ).manifest.metadata.get("tags") == "sox",
            "the rewritten manifest",
        )  # fmt: skip
        human = await cli("agents", "bind", "ledger", "--team", "treasury", "--nats-url", url)
        assert human.exit_code == 0, human.output
        assert "finance-ops → treasury" in human.stdout and "Changed: team" in human.stdout

        # The agent's old declaration now mismatches: it must follow the binding.
        stale = msgspec.structs.replace(agent.full_manifest(), team="finance-ops")
        with pytest.raises(AttributeMismatch, match="signalbox agents bind ledger"):
            await request(agent.nc, "sb.registry.register.ledger", stale, Registered)

    audits = await audit_trail.wait_for(
        lambda r: r.kind == "admin" and r.data.get("op") == "bind", count=2
    )
    first = audits[0].data
    assert first["before"]["tags"] == ["data-residency:eu"] and first["after"]["tags"] == ["sox"]
    assert first["changed"] == ["tags"] and first["reason"] == "audit season"
    assert audits[0].actor == body["binding"]["bound_by"]
    [enroll_event] = await audit_trail.wait_for(
        lambda r: r.kind == "admin" and r.data.get("op") == "enroll"
    )
    assert enroll_event.data["binding"]["namespace"] == "finance"
    assert enroll_event.data["before"] is None

    # Enrolling again for a new credential keeps the binding.
    again = await cli("agents", "enroll", "ledger", "--json", "--nats-url", url)
    assert again.exit_code == 0, again.output
    kept = json.loads(again.stdout)["binding"]
    assert (kept["team"], kept["tags"]) == ("treasury", ["sox"])


async def test_a_capability_whose_tags_change_is_named_in_the_audit(
    stack: Stack, settings: Settings, audit_trail: AuditTrail
) -> None:
    url = settings.nats_url
    assert url is not None
    enrolled = await cli("agents", "enroll", "scorer", "--team", "risk", "--owner", "o",
                         "--json", "--nats-url", url)  # fmt: skip
    token = json.loads(enrolled.stdout)["token"]
    for tags in (("pii",), ()):
        agent = Agent(
            AgentManifest(name="scorer", version="1.0.0", owner="o", team="risk"),
            nats_url=url, credential=token, heartbeat_interval=0,
        )  # fmt: skip
        agent.capability("score", tags=tags)(_echo)
        async with agent:
            pass
    records = await audit_trail.wait_for(
        lambda r: r.kind == "registry" and r.data.get("op") == "register", count=2
    )
    assert "capability_tags_changed" not in records[0].data
    assert records[1].data["capability_tags_changed"] == {"score": {"before": ["pii"], "after": []}}


async def _echo(req: dict[str, Any]) -> dict[str, Any]:
    return req


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["agents", "bind", "a"], "nothing to change"),
        (["agents", "bind", "a", "--tag", "x,y"], "without commas"),
        (["agents", "bind", "a", "--tag", "x", "--clear-tags"], "not both"),
        (["agents", "enroll", "a", "--project", " padded"], "without commas"),
        (["agents", "bind", "a.b", "--team", "t"], "not a valid subject token"),
    ],
)
async def test_bind_rejects_bad_arguments(args: Sequence[str], needle: str) -> None:
    failed(await cli(*args), needle)


async def test_bind_needs_an_enrolled_agent_and_clears_lists(
    stack: Stack, settings: Settings
) -> None:
    url = settings.nats_url
    assert url is not None
    failed(
        await cli("agents", "bind", "ghost", "--team", "t", "--nats-url", url),
        "never enrolled",
        "signalbox agents enroll ghost",
    )
    await cli("agents", "enroll", "p", "--project", "a", "--tag", "k", "--nats-url", url)
    cleared = await cli(
        "agents", "bind", "p", "--clear-projects", "--clear-tags", "--json", "--nats-url", url
    )
    assert cleared.exit_code == 0, cleared.output
    binding = json.loads(cleared.stdout)["binding"]
    assert (binding["projects"], binding["tags"]) == ([], [])
    shown = await cli("agents", "show", "p", "--nats-url", url)
    failed(shown, "no agent 'p' is registered")  # never registered: nothing to show yet
