"""Policy sets versioned in KV: apply, validate, show, history, diff, rollback, hot swap.

Against a real nats-server with identity enforced; two policy-service
replicas where switching matters; the CLI through typer's CliRunner.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import msgspec
import nats
import pytest
from nats.aio.client import Client
from support import ainvoke, cedar_policies, enroll, eventually
from typer.testing import CliRunner, Result

from broker.connection import connect
from broker.errors import CallDenied, Conflict, InvalidInput, NotFound
from broker.runtime.identity import operator_connect_options
from broker.runtime.jetstream import KV_POLICIES
from broker.settings import Settings
from broker.subjects import Subjects, inbox_prefix
from schemas import (
    ActivePolicy,
    ApplyPolicies,
    DiffPolicies,
    PolicyApplied,
    PolicyDiff,
    PolicyFiles,
    PolicyHistory,
    PolicyHistoryRequest,
    PolicySetRecord,
    PolicyShown,
    PolicyValidation,
    RollbackPolicies,
    ShowPolicies,
    ValidatePolicies,
)
from services.cli import common as cli
from services.cli.client import admin_request
from services.cli.main import app
from services.policy.cedar.policy_set import (
    LABEL_FILE,
    SCHEMA_FILE,
    CedarPolicies,
    shipped_policy_dir,
)
from services.policy.service import PolicyService

if TYPE_CHECKING:
    from support import AgentFactory, AuditTrail, ServiceConnector, StackFactory

    from services.runner import Stack

T = TypeVar("T")

SCHEMA = (shipped_policy_dir() / SCHEMA_FILE).read_text()
ALLOW = cedar_policies([("caller", "target", ["echo"])])
BROKEN = (
    '@id("broken")\n'
    'permit (principal, action == Signalbox::Action::"call", resource)\n'
    "when { resource.no_such_attribute == 1 };\n"
)


def candidate(rules: str, label: str = "lifecycle", name: str = "rules.cedar") -> PolicyFiles:
    """A policy set of one file over the shipped schema."""
    return PolicyFiles(files={name: rules}, schema=SCHEMA, label=label)


def version_of(files: PolicyFiles) -> str:
    """The decider version a replica reports once it evaluates ``files``."""
    return CedarPolicies.from_texts(files.files, files.schema, label=files.label).version


class Operator:
    """An operator connection asking ``sb.admin.policy.<op>``."""

    def __init__(self, nc: Client, subjects: Subjects) -> None:
        self.nc = nc
        self.subjects = subjects

    async def ask(self, op: str, body: Any, returns: type[T]) -> T:
        return await admin_request(self.nc, self.subjects, op, body, returns, service="policy")

    async def apply(self, files: PolicyFiles, **kwargs: Any) -> PolicyApplied:
        return await self.ask("apply", ApplyPolicies(candidate=files, **kwargs), PolicyApplied)

    async def history(self) -> PolicyHistory:
        return await self.ask("history", PolicyHistoryRequest(), PolicyHistory)


@pytest.fixture
async def operator(settings: Settings) -> AsyncIterator[Operator]:
    assert settings.nats_url is not None
    nc = await connect(
        settings.nats_url, name="test-operator", **operator_connect_options(settings)
    )
    yield Operator(nc, Subjects(settings.subject_prefix))
    await nc.close()


def replicas(*stacks: Stack) -> list[PolicyService]:
    found = [s.services["policy"] for s in stacks]
    assert all(isinstance(r, PolicyService) for r in found)
    return [r for r in found if isinstance(r, PolicyService)]


async def switched(services: Sequence[PolicyService], version: str, within: float = 1.0) -> None:
    """Every replica evaluates ``version`` within ``within`` seconds (the requirement)."""
    await eventually(
        lambda: all(r.decider.version == version for r in services),
        lambda: f"version {version} on every replica: {[r.decider.version for r in services]}",
        timeout=within,
        interval=0.005,
    )


async def two_replicas(make_stack: StackFactory) -> list[PolicyService]:
    """A full stack that denies everything, plus a second policy replica."""
    first = await make_stack(rules="")
    second = await make_stack(services=["policy"])
    return replicas(first, second)


# -- apply and hot swap ---------------------------------------------------------------------


async def test_apply_switches_both_replicas_and_calls_flip_to_allowed(
    make_stack: StackFactory,
    make_agent: AgentFactory,
    operator: Operator,
    audit_trail: AuditTrail,
) -> None:
    services = await two_replicas(make_stack)
    seeded = services[0].decider.version
    assert all(r.active_version == 1 and r.decider.version == seeded for r in services)
    target = make_agent("target")

    @target.capability()
    async def echo(req: dict[str, Any]) -> dict[str, Any]:
        return req

    caller = make_agent("caller")
    await target.start()
    await caller.start()
    with pytest.raises(CallDenied):
        await caller.call("target", "echo", {"n": 0})

    files = candidate(ALLOW)
    applied = await operator.apply(files, requested_by="ada")
    assert (applied.version, applied.previous, applied.unchanged) == (2, 1, False)
    await switched(services, version_of(files))
    assert all(r.active_version == 2 for r in services)
    results = await asyncio.gather(*(caller.call("target", "echo", {"n": i}) for i in range(20)))
    assert results == [{"n": i} for i in range(20)]

    (event,) = await audit_trail.wait_for(lambda r: r.kind == "admin" and "policy" in r.subject)
    assert event.actor == "bootstrap:ada"
    assert event.data["op"] == "policy.apply"
    assert (event.data["version"], event.data["previous"]) == (2, 1)
    assert event.data["digest"] == applied.digest
    # The same set again changes nothing and stores nothing.
    again = await operator.apply(files)
    assert again.unchanged and again.version == 2
    assert [v.version for v in (await operator.history()).versions] == [2, 1]


async def test_invalid_set_is_rejected_with_cedars_messages_and_the_active_set_stays(
    make_stack: StackFactory, operator: Operator, audit_trail: AuditTrail
) -> None:
    services = await two_replicas(make_stack)
    before = services[0].decider.version

    checked = await operator.ask(
        "validate", ValidatePolicies(candidate=candidate(BROKEN)), PolicyValidation
    )
    assert not checked.ok
    assert any("no_such_attribute" in e and e.startswith("rules.cedar") for e in checked.errors)

    with pytest.raises(InvalidInput) as caught:
        await operator.apply(candidate(BROKEN))
    assert "no_such_attribute" in caught.value.message
    assert "active policy set stays" in caught.value.message
    assert any("no_such_attribute" in e for e in caught.value.details["errors"])

    assert [v.version for v in (await operator.history()).versions] == [1]
    assert all(r.decider.version == before and r.active_version == 1 for r in services)
    rejected = await audit_trail.wait_for(
        lambda r: r.kind == "rejected" and r.subject.endswith("policy.apply")
    )
    assert rejected[0].data["code"] == "invalid_input"

    valid = await operator.ask(
        "validate", ValidatePolicies(candidate=candidate(ALLOW)), PolicyValidation
    )
    assert valid.ok and valid.policy_ids == ("caller-target",)


async def test_history_show_diff_and_rollback(
    make_stack: StackFactory, operator: Operator, audit_trail: AuditTrail
) -> None:
    services = await two_replicas(make_stack)
    seeded = services[0].decider.version
    v2 = candidate(ALLOW, label="v2")
    both = cedar_policies([("caller", "target", ["echo"]), ("other", "target", ["echo"])])
    v3 = PolicyFiles(files={"more.cedar": both}, schema=SCHEMA, label="v3")
    assert (await operator.apply(v2)).version == 2
    assert (await operator.apply(v3)).version == 3
    await switched(services, version_of(v3))

    history = await operator.history()
    assert [v.version for v in history.versions] == [3, 2, 1]
    assert [v.active for v in history.versions] == [True, False, False]
    assert history.active_version == 3
    assert history.versions[1].label == "v2"
    assert history.versions[1].policy_ids == ("caller-target",)

    shown = await operator.ask("show", ShowPolicies(version=2), PolicyShown)
    assert shown.record.files == v2.files and shown.record.schema == SCHEMA
    assert not shown.active and shown.active_version == 3
    active = await operator.ask("show", ShowPolicies(), PolicyShown)
    assert active.active and active.record.version == 3
    with pytest.raises(NotFound):
        await operator.ask("show", ShowPolicies(version=99), PolicyShown)

    d = await operator.ask("diff", DiffPolicies(from_version=2, to_version=3), PolicyDiff)
    assert (d.from_name, d.to_name) == ("v2", "v3")
    assert {(f.name, f.change) for f in d.files} == {
        ("rules.cedar", "removed"),
        ("more.cedar", "added"),
    }
    assert d.added_ids == ("other-target",) and d.removed_ids == ()
    # A candidate against the active set (v3): a modified file and a removed policy.
    d = await operator.ask("diff", DiffPolicies(candidate=candidate(ALLOW, name="more.cedar")),
                           PolicyDiff)  # fmt: skip
    assert [(f.name, f.change) for f in d.files] == [("more.cedar", "modified")]
    assert '-@id("other-target")' in d.files[0].diff
    assert d.removed_ids == ("other-target",) and d.added_ids == ()

    back = await operator.ask("rollback", RollbackPolicies(requested_by="bob"), PolicyApplied)
    assert (back.version, back.previous) == (2, 3)
    await switched(services, version_of(v2))
    back = await operator.ask("rollback", RollbackPolicies(to=1), PolicyApplied)
    assert (back.version, back.previous) == (1, 2)
    await switched(services, seeded)
    history = await operator.history()
    assert [v.version for v in history.versions] == [3, 2, 1]  # rollbacks store nothing
    assert history.active_version == 1
    events = await audit_trail.wait_for(
        lambda r: r.kind == "admin" and r.data.get("op") == "policy.rollback", count=2
    )
    actors = [(e.actor, e.data["version"]) for e in events]
    assert actors == [("bootstrap:bob", 2), ("bootstrap", 1)]
    with pytest.raises(NotFound):
        await operator.ask("rollback", RollbackPolicies(to=42), PolicyApplied)


async def test_concurrent_applies_never_overwrite_each_other(
    make_stack: StackFactory, operator: Operator
) -> None:
    await make_stack(rules="")
    sets = [candidate(cedar_policies([(f"agent-{i}", "target", ["echo"])])) for i in range(6)]

    # Both require version 1 to be active: exactly one wins, the other is told.
    outcomes = await asyncio.gather(
        *(operator.apply(s, expected_active=1) for s in sets[:2]), return_exceptions=True
    )
    wins = [o for o in outcomes if isinstance(o, PolicyApplied)]
    losses = [o for o in outcomes if isinstance(o, Conflict)]
    assert len(wins) == 1 and len(losses) == 1, outcomes
    assert "version 1 is no longer active" in losses[0].message or "changed" in losses[0].message
    history = await operator.history()
    assert {v.version for v in history.versions} == {1, wins[0].version}

    # Without a precondition: each one either applied in turn or failed with conflict.
    outcomes = await asyncio.gather(*(operator.apply(s) for s in sets[2:]), return_exceptions=True)
    assert all(isinstance(o, PolicyApplied | Conflict) for o in outcomes), outcomes
    applied = [o for o in outcomes if isinstance(o, PolicyApplied)]
    assert applied
    history = await operator.history()
    stored = {v.version for v in history.versions}
    assert stored == {1, wins[0].version} | {a.version for a in applied}
    assert len(stored) == 2 + len(applied)  # distinct versions, none lost or overwritten
    assert history.active_version in {a.version for a in applied}


async def test_a_replica_keeps_its_set_when_the_active_one_cannot_load(
    make_stack: StackFactory,
    service_nc: ServiceConnector,
    operator: Operator,
    audit_trail: AuditTrail,
) -> None:
    services = await two_replicas(make_stack)
    before = services[0].decider.version
    # Someone writes an invalid set and the pointer straight into KV, bypassing apply.
    kv = await (await service_nc()).jetstream().key_value(KV_POLICIES)
    bad = PolicySetRecord(version=7, digest="0" * 64, files={"x.cedar": BROKEN}, schema=SCHEMA)
    await kv.put("set.7", msgspec.json.encode(bad))
    await kv.put("active", msgspec.json.encode(ActivePolicy(version=7, digest="0" * 64)))

    events = await audit_trail.wait_for(
        lambda r: r.kind == "rejected" and "version 7 could not be loaded" in r.data["message"],
        count=2,  # one per replica
    )
    assert all("no_such_attribute" in e.data["message"] for e in events)
    assert all(r.decider.version == before and r.active_version == 1 for r in services)
    # Applying a valid set recovers (the pointer's compare-and-set reads the new revision).
    files = candidate(ALLOW)
    await operator.apply(files)
    await switched(services, version_of(files))


async def test_a_started_bucket_wins_over_a_replicas_folder(
    make_stack: StackFactory, tmp_path: Path, operator: Operator
) -> None:
    first = await make_stack(rules="")
    files = candidate(ALLOW)
    await operator.apply(files)
    other = tmp_path / "other-policies"
    other.mkdir()
    (other / SCHEMA_FILE).write_text(SCHEMA)
    (other / "x.cedar").write_text(cedar_policies([("x", "y", ["*"])]))
    late = await make_stack(services=["policy"], policy_dir=other)
    services = replicas(first, late)
    await switched(services, version_of(files))
    assert [r.active_version for r in services] == [2, 2]


async def test_an_agent_cannot_use_the_policy_admin_endpoints(
    make_stack: StackFactory, settings: Settings, operator: Operator
) -> None:
    await make_stack(rules="")
    assert settings.nats_url is not None
    errors: list[Exception] = []

    async def on_error(exc: Exception) -> None:
        errors.append(exc)

    nc = await nats.connect(
        servers=[settings.nats_url],
        token=enroll(settings, "mallory"),
        inbox_prefix=inbox_prefix("mallory"),
        error_cb=on_error,
        allow_reconnect=False,
        connect_timeout=3,
    )
    try:
        body = msgspec.json.encode(ApplyPolicies(candidate=candidate(ALLOW)))
        await nc.publish("sb.admin.policy.apply", body)
        await nc.publish("sb.admin.policy.rollback", msgspec.json.encode(RollbackPolicies(to=1)))
        await eventually(
            lambda: len([e for e in errors if "permissions violation" in str(e).lower()]) >= 2,
            lambda: f"two permission violations; errors: {errors}",
            timeout=5,
        )
        assert any("sb.admin.policy.apply" in str(e) for e in errors), errors
    finally:
        await nc.close()
    assert [v.version for v in (await operator.history()).versions] == [1]


# -- the CLI --------------------------------------------------------------------------------

runner = CliRunner()


@pytest.fixture
def _cli_operator(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # The CLI is an operator of the test's server (secrets in <tmp_path>/data/secrets).
    monkeypatch.setenv("SIGNALBOX_SECRETS_DIR", str(tmp_path / "data" / "secrets"))
    monkeypatch.setattr(cli, "CONNECT_TIMEOUT", 0.5)


def invoke(args: Sequence[str]) -> Result:
    return runner.invoke(app, list(args))


def policy_folder(path: Path, rules: str, label: str = "") -> Path:
    path.mkdir(parents=True)
    (path / SCHEMA_FILE).write_text(SCHEMA)
    (path / "rules.cedar").write_text(rules)
    if label:
        (path / LABEL_FILE).write_text(label + "\n")
    return path


@pytest.mark.usefixtures("_cli_operator")
def test_cli_validate_works_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SIGNALBOX_NATS_URL", "nats://127.0.0.1:1")  # nothing there
    good = invoke(["policy", "validate", str(policy_folder(tmp_path / "good", ALLOW))])
    assert good.exit_code == 0, good.output
    assert "valid" in good.output and "caller-target" in good.output

    bad = invoke(["policy", "validate", str(policy_folder(tmp_path / "bad", BROKEN))])
    assert bad.exit_code == 1, bad.output
    assert "no_such_attribute" in bad.output  # Cedar's own message
    assert "fix each policy named above" in bad.output
    assert "Traceback" not in bad.output

    as_json = invoke(["policy", "validate", str(tmp_path / "bad"), "--json"])
    assert as_json.exit_code == 1
    assert json.loads(as_json.output)["ok"] is False

    missing = invoke(["policy", "validate", str(tmp_path / "nowhere")])
    assert missing.exit_code == 1 and "does not exist" in missing.output


@pytest.mark.usefixtures("_cli_operator")
async def test_cli_apply_history_show_diff_rollback(
    make_stack: StackFactory, settings: Settings, tmp_path: Path
) -> None:
    (service,) = replicas(await make_stack(rules=""))
    url = ["--nats-url", str(settings.nats_url)]
    folder = policy_folder(tmp_path / "v2", ALLOW, label="allow-echo")

    result = await ainvoke(["policy", "apply", str(folder), *url])
    assert result.exit_code == 0, result.output
    assert "applied" in result.output and "version 2" in result.output
    await switched([service], version_of(candidate(ALLOW, label="allow-echo")))

    result = await ainvoke(["policy", "apply", str(policy_folder(tmp_path / "bad", BROKEN)), *url])
    assert result.exit_code == 1
    assert "no_such_attribute" in result.output and "stays" in result.output

    result = await ainvoke(["policy", "history", "--json", *url])
    history = msgspec.json.decode(result.output, type=PolicyHistory)
    assert [(v.version, v.active, v.label) for v in history.versions] == [
        (2, True, "allow-echo"),
        (1, False, "test-rules"),
    ]
    table = await ainvoke(["policy", "history", *url])
    assert table.exit_code == 0 and "allow-echo" in table.output and "active" in table.output

    shown = await ainvoke(["policy", "show", "--version", "1", "--json", *url])
    assert msgspec.json.decode(shown.output, type=PolicyShown).record.files == {"rules.cedar": ""}
    shown = await ainvoke(["policy", "show", *url])
    assert shown.exit_code == 0 and '@id("caller-target")' in shown.output

    diff = await ainvoke(["policy", "diff", "--from", "1", "--to", "2", "--json", *url])
    parsed = msgspec.json.decode(diff.output, type=PolicyDiff)
    assert parsed.added_ids == ("caller-target",)
    diff = await ainvoke(["policy", "diff", str(policy_folder(tmp_path / "v3", "")), *url])
    assert diff.exit_code == 0, diff.output
    assert '-@id("caller-target")' in diff.output and "removed" in diff.output
    usage = await ainvoke(["policy", "diff", *url])
    assert usage.exit_code == 1 and "nothing to compare" in usage.output

    back = await ainvoke(["policy", "rollback", *url])
    assert back.exit_code == 0 and "rolled back to version 1" in back.output, back.output
    await switched([service], version_of(candidate("", label="test-rules")))
    gone = await ainvoke(["policy", "rollback", "--to", "9", *url])
    assert gone.exit_code == 1 and "version 9 does not exist" in gone.output
