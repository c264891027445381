"""Attributes bound by operators: applied to manifests, changed only by partial updates,
stored with the enrollment (SQLite and, when configured, PostgreSQL)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import msgspec
import pytest

from broker.errors import AttributeMismatch
from broker.settings import Settings
from schemas import AgentBinding, AgentManifest, BindAgent, Capability, DiscoverAgents, EnrollAgent
from services.registry.binding import (
    apply_binding,
    binding_changes,
    binding_from_manifest,
    changed_fields,
    updated_binding,
)
from services.registry.credentials import CredentialStore
from services.registry.service import RegistryService, capability_tag_changes
from services.registry.store import AgentStore

if TYPE_CHECKING:
    from support import StackFactory

T0 = 1_000_000.0

BOUND = AgentBinding(
    agent="ledger",
    team="finance-ops",
    owner="fin",
    namespace="finance",
    region="eu",
    projects=("books", "audit"),
    tags=("data-residency:eu", "sox"),
)


def manifest(**fields: Any) -> AgentManifest:
    base: dict[str, Any] = {"name": "ledger", "version": "1.0.0", "owner": "", "team": ""}
    return AgentManifest(**{**base, **fields})


# -- applying a binding to a manifest ------------------------------------------------------


def test_empty_fields_are_filled_from_the_binding() -> None:
    stored = apply_binding(manifest(metadata={"tier": "gold"}), BOUND)
    assert (stored.team, stored.owner, stored.region) == ("finance-ops", "fin", "eu")
    assert stored.project == "books"  # the first bound project
    assert stored.metadata == {
        "tier": "gold",  # free metadata stays the agent's
        "namespace": "finance",
        "tags": "data-residency:eu,sox",
        "projects": "books,audit",
    }


def test_declaring_the_bound_values_is_fine() -> None:
    declared = manifest(
        team="finance-ops", owner="fin", region="eu", project="audit",
        metadata={"namespace": "finance", "tags": "sox, data-residency:eu"},
    )  # fmt: skip
    stored = apply_binding(declared, BOUND)
    assert stored.project == "audit"  # a bound project the agent chose
    assert stored.metadata["tags"] == "data-residency:eu,sox"


@pytest.mark.parametrize(
    ("fields", "field", "path", "bound"),
    [
        ({"team": "payments"}, "team", "$.team", "finance-ops"),
        ({"owner": "mallory"}, "owner", "$.owner", "fin"),
        ({"region": "us"}, "region", "$.region", "eu"),
        ({"project": "other"}, "project", "$.project", ["books", "audit"]),
        ({"metadata": {"namespace": "default"}}, "namespace", "$.metadata.namespace", "finance"),
        ({"metadata": {"tags": "sox"}}, "tags", "$.metadata.tags", ["data-residency:eu", "sox"]),
        ({"metadata": {"projects": "x"}}, "projects", "$.metadata.projects", ["books", "audit"]),
    ],
)
def test_declaring_another_value_is_an_attribute_mismatch(
    fields: dict[str, Any], field: str, path: str, bound: Any
) -> None:
    with pytest.raises(AttributeMismatch) as err:
        apply_binding(manifest(**fields), BOUND)
    assert err.value.code == "attribute_mismatch"
    assert err.value.details["field"] == field
    assert err.value.details["path"] == path
    assert err.value.details["bound"] == bound
    assert "signalbox agents bind ledger" in err.value.message
    assert field in err.value.message


def test_an_unbound_namespace_is_cedars_default() -> None:
    empty = AgentBinding(agent="ledger")
    stored = apply_binding(manifest(metadata={"namespace": "default"}), empty)
    assert "namespace" not in stored.metadata
    with pytest.raises(AttributeMismatch):  # an empty binding binds empty values
        apply_binding(manifest(team="risk"), empty)


def test_capability_tags_stay_the_agents_and_their_changes_are_named() -> None:
    before = manifest(capabilities=(Capability(name="post", tags=("pii",)),
                                    Capability(name="read")))  # fmt: skip
    after = manifest(capabilities=(Capability(name="post"), Capability(name="read"),
                                   Capability(name="new", tags=("x",))))  # fmt: skip
    assert apply_binding(after, BOUND).capabilities == after.capabilities
    assert capability_tag_changes(before, after) == {"post": {"before": ["pii"], "after": []}}
    assert capability_tag_changes(None, after) == {}


# -- partial updates ------------------------------------------------------------------------


def test_only_the_attributes_given_change() -> None:
    request = BindAgent(name="ledger", tags=("sox", "sox", "pci"), region="")
    changes = binding_changes(request)
    assert changes == {"region": "", "tags": ("sox", "pci")}  # deduplicated, order kept
    after = updated_binding(BOUND, "ledger", changes, by="operator:ops", now=T0)
    assert (after.team, after.owner, after.namespace, after.projects) == (
        BOUND.team, BOUND.owner, BOUND.namespace, BOUND.projects,
    )  # fmt: skip
    assert (after.region, after.tags, after.bound_by, after.bound_at) == (
        "", ("sox", "pci"), "operator:ops", T0,
    )  # fmt: skip
    assert changed_fields(BOUND, after) == ("region", "tags")
    assert binding_changes(EnrollAgent(name="ledger")) == {}
    fresh = updated_binding(None, "new", {"team": "t"}, by="x", now=T0)
    assert fresh == AgentBinding(agent="new", team="t", bound_at=T0, bound_by="x")
    assert changed_fields(None, fresh) == ("team",)


def test_projects_and_tags_are_single_values() -> None:
    for bad in ("a,b", " padded", "", "line\n"):
        with pytest.raises(msgspec.ValidationError):
            msgspec.convert({"type": "bind_agent.v1", "name": "a", "tags": [bad]}, BindAgent)


def test_a_legacy_agent_is_bound_to_what_it_registered() -> None:
    legacy = manifest(team="risk", owner="o", region="eu", project="p",
                      metadata={"namespace": "finance", "tags": "a, b"})  # fmt: skip
    assert binding_from_manifest(legacy, by="service:registry", now=T0) == AgentBinding(
        agent="ledger", team="risk", owner="o", namespace="finance", region="eu",
        projects=("p",), tags=("a", "b"), bound_at=T0, bound_by="service:registry",
    )  # fmt: skip


# -- the stores ---------------------------------------------------------------------------


@pytest.fixture
def stores(database_url: str) -> Iterator[tuple[AgentStore, CredentialStore]]:
    agents = AgentStore(database_url)
    agents.create_schema()
    credentials = CredentialStore(database_url, agents.engine)
    yield agents, credentials
    credentials.close()
    agents.close()


def test_issuing_a_credential_leaves_a_binding_and_keeps_an_existing_one(
    stores: tuple[AgentStore, CredentialStore],
) -> None:
    _, credentials = stores
    assert credentials.binding("ledger") is None
    credentials.issue("ledger", 60, binding=BOUND)
    assert credentials.binding("ledger") == BOUND
    credentials.issue("ledger", 60, binding=AgentBinding(agent="ledger", team="other"))
    assert credentials.binding("ledger") == BOUND  # enrolling again keeps it
    credentials.issue("bare", 60)
    bare = credentials.binding("bare")
    assert bare is not None and (bare.team, bare.tags) == ("", ())


def test_registration_applies_the_binding_in_the_write(
    stores: tuple[AgentStore, CredentialStore],
) -> None:
    agents, credentials = stores
    credentials.issue("ledger", 60, binding=BOUND)
    done = agents.register_and_read(manifest(), now=T0, bound=True)
    assert done.record.manifest.team == "finance-ops"
    assert done.previous is None
    assert agents.get("ledger", None, now=T0, stale_after=30, down_after=90).manifest == (
        done.record.manifest
    )
    with pytest.raises(AttributeMismatch):
        agents.register_and_read(manifest(version="2.0.0", team="x"), now=T0 + 1, bound=True)
    assert [v.manifest.version for v in done.versions] == ["1.0.0"]
    # Unbound (identity off) or never enrolled: the declared values, as before.
    free = agents.register_and_read(manifest(name="free", team="x", owner="y"), now=T0, bound=True)
    assert free.record.manifest.team == "x"
    again = agents.register_and_read(manifest(version="1.0.0"), now=T0 + 2, bound=True)
    assert again.previous == done.record.manifest and not again.created


def test_a_binding_change_rewrites_every_registered_version(
    stores: tuple[AgentStore, CredentialStore],
) -> None:
    agents, credentials = stores
    credentials.issue("ledger", 60, binding=BOUND)
    caps = (Capability(name="post", tags=("pii",)),)
    for version in ("1.0.0", "2.0.0"):
        agents.register_and_read(manifest(version=version, capabilities=caps), now=T0, bound=True)
    rebound = agents.bind_and_read(
        "ledger", {"team": "treasury", "owner": "cfo", "tags": ()}, by="operator:ops", now=T0 + 5
    )
    assert rebound.before == BOUND
    assert (rebound.after.team, rebound.after.namespace, rebound.after.tags) == (
        "treasury", "finance", (),
    )  # fmt: skip
    assert rebound.rewritten == 2
    for stored in rebound.versions:
        m = stored.manifest
        assert (m.team, m.owner, m.metadata.get("namespace"), "tags" in m.metadata) == (
            "treasury", "cfo", "finance", False,
        )  # fmt: skip
        assert stored.registered_at == T0 + 5  # a new record for caches keyed on it
    assert credentials.binding("ledger") == rebound.after
    # The search columns follow: discovery by team and by capability tag.
    query = DiscoverAgents(team="treasury", all_versions=True)
    assert agents.discover(query, now=T0 + 5, stale_after=30, down_after=90).total == 2
    by_tag = DiscoverAgents(tag="pii", team="finance-ops")
    assert agents.discover(by_tag, now=T0 + 5, stale_after=30, down_after=90).total == 0
    # The name now belongs to the new owner: a registration declaring it is accepted.
    agents.register_and_read(manifest(version="3.0.0", owner="cfo"), now=T0 + 6, bound=True)
    # Nothing to rewrite when nothing changes.
    same = agents.bind_and_read("ledger", {"team": "treasury"}, by="operator:ops", now=T0 + 7)
    assert same.rewritten == 0


def test_agents_enrolled_before_bindings_are_found(
    stores: tuple[AgentStore, CredentialStore],
) -> None:
    agents, credentials = stores
    credentials.issue("ledger", 60)
    with agents.engine.begin() as conn:  # a credential issued by an older release
        conn.exec_driver_sql("DELETE FROM agent_bindings")
    credentials.issue("newer", 60)
    assert credentials.unbound_agents() == ["ledger"]
    assert credentials.seed_bindings([BOUND, AgentBinding(agent="newer", team="x")]) == 1
    assert credentials.binding("ledger") == BOUND
    newer = credentials.binding("newer")
    assert newer is not None and newer.team == ""  # its own (empty) binding stays
    assert credentials.unbound_agents() == []


async def test_the_registry_binds_agents_enrolled_by_an_older_release_at_start(
    settings: Settings, make_stack: StackFactory
) -> None:
    """A credential without a binding (issued before bindings existed) must not let its
    agent declare anything: the registry binds it to what it registered last."""
    url = settings.resolved_database_url
    agents = AgentStore(url)
    agents.create_schema()
    credentials = CredentialStore(url, agents.engine)
    try:
        legacy = manifest(name="legacy", team="risk", owner="o", metadata={"namespace": "finance"})
        agents.register(legacy, now=T0)
        credentials.issue("legacy", 3600)
        credentials.issue("never-registered", 3600)
        with agents.engine.begin() as conn:
            conn.exec_driver_sql("DELETE FROM agent_bindings")
    finally:
        credentials.close()
        agents.close()
    stack = await make_stack(services=["tracing", "registry"])
    registry = stack.services["registry"]
    assert isinstance(registry, RegistryService)
    store = registry.identity.credential_store
    seeded = store.binding("legacy")
    assert seeded is not None
    assert (seeded.team, seeded.owner, seeded.namespace) == ("risk", "o", "finance")
    assert seeded.bound_by == "service:registry"
    empty = store.binding("never-registered")
    assert empty is not None and empty.team == ""
    # From now on it registers only as bound.
    with pytest.raises(AttributeMismatch):
        await registry.register(msgspec.structs.replace(legacy, team="lending"))
