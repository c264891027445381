"""``signalbox apply -f fleet.toml`` and ``signalbox export``: declarative fleet configuration
through the operators' endpoints, against a real stack."""

from __future__ import annotations

import json
import re
import tomllib
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from typer.testing import Result

from broker import Agent
from broker.settings import Settings
from schemas import AgentManifest, AuditEvent
from services.cli.fleet_file import fleet_toml, parse_fleet
from services.runner import Stack

if TYPE_CHECKING:
    from support import AuditTrail, StackFactory

from support import ainvoke, enroll

FLEET = """
# The growth team's canary and budget, the ledger's attributes, a retired team.
[[bindings]]
agent = "ledger"
team = "finance-ops"
owner = "fin"
projects = ["books"]
tags = ["data-residency:eu"]

[[budgets]]
scope = "team"
name = "growth"
limit_usd = 25.0

[[budgets]]
scope = "agent"
name = "ledger"
window = "month"
limit_usd = 0.0005
soft_ratio = 0.5

[[routes]]
agent = "recommender"
stable = "1.0.0"
canary = "2.0.0"
weight = 5
sticky = true

[routes.guard]
max_error_rate = 0.1
min_calls = 20

[[breakers]]
target = "team:legacy"
reason = "decommissioned (OPS-12)"
"""


@pytest.fixture
async def stack(make_stack: StackFactory) -> Stack:
    return await make_stack(services=["tracing", "registry", "policy", "cost"])


@pytest.fixture
async def recommender(stack: Stack, settings: Settings) -> AsyncIterator[None]:
    """recommender 1.0.0 and 2.0.0 running (a route needs healthy versions), and ledger
    enrolled with nothing bound."""
    made = []
    for version in ("1.0.0", "2.0.0"):
        agent = Agent(
            AgentManifest(name="recommender", version=version, owner="o", team="growth"),
            nats_url=settings.nats_url,
            credential=enroll(settings, "recommender", owner="o", team="growth"),
        )  # fmt: skip

        @agent.capability("suggest")
        async def suggest(req: dict[str, Any]) -> str:
            return "ok"

        made.append(agent)
        await agent.start()
    enroll(settings, "ledger")
    yield
    for agent in reversed(made):
        await agent.stop()


async def cli(settings: Settings, *args: str) -> Result:
    assert settings.nats_url is not None
    return await ainvoke([*args, "--nats-url", settings.nats_url])


async def planned(settings: Settings, *args: str, code: int = 0) -> dict[str, Any]:
    """``signalbox apply ARGS --json``, which must exit with ``code``."""
    result = await cli(settings, "apply", *args, "--json")
    assert result.exit_code == code, result.output
    doc: dict[str, Any] = json.loads(result.stdout)
    return doc


def actions(doc: dict[str, Any]) -> dict[tuple[str, str], str]:
    return {(c["kind"], c["name"]): c["action"] for c in doc["changes"]}


async def exported(settings: Settings) -> dict[str, Any]:
    result = await cli(settings, "export")
    assert result.exit_code == 0, result.output
    return tomllib.loads(result.stdout)


def changes_of(records: list[AuditEvent]) -> Counter[tuple[str, str]]:
    """The operator changes in audit records: (kind, op)."""
    return Counter(
        (r.kind, str(r.data.get("op"))) for r in records if r.kind in ("admin", "breaker")
    )


async def test_apply_creates_then_changes_nothing_and_export_round_trips(
    recommender: None, settings: Settings, audit_trail: AuditTrail, tmp_path: Path
) -> None:
    fleet = tmp_path / "fleet.toml"
    fleet.write_text(FLEET)
    before = await exported(settings)
    assert set(before) == {"bindings"} and len(before["bindings"]) == 2  # recommender, ledger

    # A dry run plans every entry and changes nothing.
    dry = await planned(settings, "-f", str(fleet), "--dry-run")
    assert actions(dry) == {
        ("binding", "ledger"): "update",  # enrolled: bound with nothing
        ("budget", "team:growth (day)"): "create",
        ("budget", "agent:ledger (month)"): "create",
        ("route", "recommender"): "create",
        ("breaker", "team:legacy"): "create",
    }
    assert dry["applied"] == 0 and {c["status"] for c in dry["changes"]} == {"planned"}
    team = next(c for c in dry["changes"] if c["name"] == "team:growth (day)")
    assert {f["field"]: f["after"] for f in team["fields"]}["limit_usd"] == "25.0"
    assert await exported(settings) == before
    table = await cli(settings, "apply", "-f", str(fleet), "--dry-run")
    assert table.exit_code == 0, table.output
    assert "Dry run: nothing was changed." in table.stdout
    assert "agent:ledger (month)" in table.stdout and "Plan: 4 to create, 1 to update" in (
        table.stdout
    )
    assert max(len(line) for line in table.stdout.splitlines()) <= 80

    # Applied: every change goes through its endpoint, each audited.
    seen = len(await audit_trail.settle())
    done = await planned(settings, "-f", str(fleet))
    assert done["applied"] == 5 and done["failed"] == 0
    now = await exported(settings)
    assert parse_fleet(fleet_toml(parse_fleet(FLEET, "x")), "y") == parse_fleet(FLEET, "x")
    ledger = next(b for b in now["bindings"] if b["agent"] == "ledger")
    assert (ledger["team"], ledger["projects"], ledger["namespace"]) == (
        "finance-ops", ["books"], "",
    )  # fmt: skip
    assert now["budgets"] == [
        {"scope": "agent", "name": "ledger", "window": "month", "limit_usd": 0.0005,
         "soft_ratio": 0.5},
        {"scope": "team", "name": "growth", "window": "day", "limit_usd": 25.0,
         "soft_ratio": 0.8},
    ]  # fmt: skip
    [route] = now["routes"]
    assert (route["stable"], route["canary"], route["weight"], route["sticky"]) == (
        "1.0.0", "2.0.0", 5, True,
    )  # fmt: skip
    assert route["guard"]["max_error_rate"] == 0.1 and route["guard"]["min_calls"] == 20
    assert route["guard"]["max_p99_ratio"] == 2.0  # the defaults fill the rest
    assert now["breakers"] == [{"target": "team:legacy", "reason": "decommissioned (OPS-12)"}]
    records = await audit_trail.wait_for(lambda r: r.kind in ("admin", "breaker"), count=5)
    assert changes_of(records) == Counter({
        ("admin", "bind"): 1, ("admin", "budget_set"): 2, ("admin", "rollout_set"): 1,
        ("breaker", "trip"): 1,
    })  # fmt: skip

    # The same file again: nothing to do, nothing sent, nothing audited.
    again = await planned(settings, "-f", str(fleet))
    assert set(actions(again).values()) == {"unchanged"} and again["applied"] == 0
    text = await cli(settings, "apply", "-f", str(fleet))
    assert text.exit_code == 0 and "No changes" in text.stdout, text.output
    assert len(await audit_trail.settle()) == seen + 5

    # export -> apply --dry-run (--prune too) plans no change: the round trip.
    out = tmp_path / "exported.toml"
    written = await cli(settings, "export", "-o", str(out))
    assert written.exit_code == 0, written.output
    assert tomllib.loads(out.read_text()) == now
    round_trip = await planned(settings, "-f", str(out), "--dry-run", "--prune")
    assert set(actions(round_trip).values()) == {"unchanged"}
    assert len(round_trip["changes"]) == 6  # two bindings, two budgets, a route, a breaker


async def test_prune_removes_what_the_file_drops_and_failures_are_reported(
    recommender: None, settings: Settings, audit_trail: AuditTrail, tmp_path: Path
) -> None:
    fleet = tmp_path / "fleet.toml"
    fleet.write_text(FLEET)
    assert (await planned(settings, "-f", str(fleet)))["applied"] == 5

    # A canary version nobody registered fails; the budget change beside it lands.
    broken = tmp_path / "broken.toml"
    broken.write_text(FLEET.replace("limit_usd = 25.0", "limit_usd = 30.0").replace(
        'canary = "2.0.0"', 'canary = "3.0.0"'
    ))  # fmt: skip
    result = await cli(settings, "apply", "-f", str(broken))
    assert result.exit_code == 1
    assert "failed: route recommender:" in result.output and "3.0.0" in result.output
    assert "1 of 2 change(s) failed" in result.output and "1 applied" in result.output
    budgets = {b["name"]: b["limit_usd"] for b in (await exported(settings))["budgets"]}
    assert budgets == {"growth": 30.0, "ledger": 0.0005}

    # --prune: the budget and the breaker the file drops are removed; the route and the
    # bindings it does not name are kept (no endpoint removes them), and said so.
    fewer = tmp_path / "fewer.toml"
    fewer.write_text('[[budgets]]\nscope = "team"\nname = "growth"\nlimit_usd = 30.0\n')
    dry = await planned(settings, "-f", str(fewer), "--prune", "--dry-run")
    assert actions(dry) == {
        ("binding", "ledger"): "keep",
        ("binding", "recommender"): "keep",
        ("budget", "team:growth (day)"): "unchanged",
        ("budget", "agent:ledger (month)"): "delete",
        ("route", "recommender"): "keep",
        ("breaker", "team:legacy"): "delete",
    }
    assert len((await exported(settings))["budgets"]) == 2  # the dry run removed nothing
    pruned = await planned(settings, "-f", str(fewer), "--prune")
    assert pruned["applied"] == 2 and pruned["failed"] == 0
    now = await exported(settings)
    assert [b["name"] for b in now["budgets"]] == ["growth"]
    assert "breakers" not in now and now["routes"][0]["canary"] == "2.0.0"
    records = await audit_trail.wait_for(
        lambda r: r.data.get("op") in ("budget_removed", "reset"), count=2
    )
    assert {(r.kind, r.data["op"]) for r in records} == {
        ("admin", "budget_removed"), ("breaker", "reset"),
    }  # fmt: skip


async def test_an_invalid_file_fails_before_any_change_naming_the_place(
    make_stack: StackFactory, settings: Settings, tmp_path: Path
) -> None:
    await make_stack()
    good = '[[budgets]]\nscope = "team"\nname = "a"\nlimit_usd = 5.0\n'
    cases = {
        good + '\n[[budgets]]\nscope = "team"\nname = "b"\nlimit_usd = 5.0\nhard = true\n':
            "[[budgets]] #2: unknown field `hard`",
        good + '\n[[budgets]]\nscope = "team"\nname = "b"\nlimit_usd = "ten"\n':
            "[[budgets]] #2, field limit_usd: Expected `float`, got `str`",
        good + '\n[[providers]]\nname = "openai"\n': "unknown section `providers`",
        good + '\n[[routes]]\nagent = "r"\nstable = "1.0.0"\n[routes.guard]\nmin_calls = 5\n':
            "[[routes]] #1 (r): weight, sticky and guard need a canary",
        good + good: "[[budgets]] #2 (team:a (day)) repeats [[budgets]] #1",
        good + "[budgets\n": "not TOML",
    }  # fmt: skip
    for number, (text, where) in enumerate(cases.items()):
        path = tmp_path / f"fleet-{number}.toml"
        path.write_text(text)
        result = await cli(settings, "apply", "-f", str(path))
        assert result.exit_code == 1, result.output
        assert f"{path}: " in result.output and where in result.output, result.output
        assert "nothing was changed" in result.output and "Traceback" not in result.output
    assert "budgets" not in await exported(settings)

    # An agent never enrolled cannot be bound by a file: the plan is blocked, nothing changes.
    ghost = tmp_path / "ghost.toml"
    ghost.write_text(good + '\n[[bindings]]\nagent = "ghost"\nteam = "t"\n')
    blocked = await planned(settings, "-f", str(ghost), code=1)
    assert actions(blocked)[("binding", "ghost")] == "blocked" and blocked["applied"] == 0
    assert "never enrolled" in next(c["note"] for c in blocked["changes"] if c["name"] == "ghost")
    assert "budgets" not in await exported(settings)


def test_the_readme_example_is_a_valid_fleet_file_that_writes_back_the_same() -> None:
    readme = (Path(__file__).parents[3] / "README.md").read_text()
    block = re.search(r"\*\*Fleet configuration as a file.*?```toml\n(.*?)```", readme, re.S)
    assert block is not None, "the README shows no fleet file"
    fleet = parse_fleet(block.group(1), "README.md")
    assert [len(getattr(fleet, s)) for s in ("bindings", "budgets", "routes", "breakers")] == [
        1, 1, 1, 1,
    ]  # fmt: skip
    assert parse_fleet(fleet_toml(fleet), "written") == fleet
