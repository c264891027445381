"""The registry's SQL store, on SQLite and (when SIGNALBOX_DATABASE_URL is set) PostgreSQL.

Times are synthetic: every call gets its own ``now``, so health transitions
are checked without waiting.
"""

from __future__ import annotations

import base64
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
import semantic_version  # type: ignore[import-untyped]

from broker.errors import ConfigError, Conflict, InvalidInput, NotFound, SchemaError
from schemas import (
    AgentInstance,
    AgentManifest,
    AgentRecord,
    Capability,
    DiscoverAgents,
    DiscoverResult,
    Heartbeat,
    InstanceStats,
)
from services.registry.store import AgentStore

T0 = 1_000_000.0
STALE = 30.0
DOWN = 90.0


def manifest(
    name: str = "summarizer",
    version: str = "1.0.0",
    *,
    owner: str = "alice",
    team: str = "research",
    region: str = "eu-west",
    caps: dict[str, tuple[str, ...]] | None = None,
    **extra: Any,
) -> AgentManifest:
    """A manifest; ``caps`` maps capability names to their tags."""
    capabilities = tuple(
        Capability(name=c, description=f"does {c}", tags=tags)
        for c, tags in (caps if caps is not None else {"summarize": ("pii",)}).items()
    )
    return AgentManifest(
        name=name,
        version=version,
        owner=owner,
        team=team,
        region=region,
        capabilities=capabilities,
        **extra,
    )


@pytest.fixture
def store(database_url: str) -> Iterator[AgentStore]:
    s = AgentStore(database_url)
    s.create_schema()
    yield s
    s.close()


def get(store: AgentStore, name: str, version: str | None = None, now: float = T0) -> AgentRecord:
    return store.get(name, version, now=now, stale_after=STALE, down_after=DOWN)


def discover(store: AgentStore, now: float = T0, **query: Any) -> DiscoverResult:
    return store.discover(DiscoverAgents(**query), now=now, stale_after=STALE, down_after=DOWN)


def found(result: DiscoverResult) -> list[tuple[str, str]]:
    return [(r.manifest.name, r.manifest.version) for r in result.agents]


def everything(store: AgentStore) -> list[tuple[str, str, str, float, float]]:
    """What the store holds, for before/after comparisons."""
    records = discover(store, all_versions=True, limit=1000).agents
    return [
        (r.manifest.name, r.manifest.version, r.manifest.owner, r.registered_at, r.last_heartbeat)
        for r in records
    ]


# -- registration ------------------------------------------------------------------------


def test_a_new_version_is_created_and_its_record_comes_back(store: AgentStore) -> None:
    m = manifest()
    record, created = store.register(m, now=T0)
    assert created
    assert record.manifest == m
    assert record.registered_at == T0
    assert record.last_heartbeat == T0
    assert record.health == "healthy"
    assert get(store, "summarizer") == record
    assert store.count() == 1


def test_an_identical_registration_changes_nothing_but_the_heartbeat(store: AgentStore) -> None:
    m = manifest()
    store.register(m, now=T0)
    record, created = store.register(m, now=T0 + 50)
    assert not created
    assert record.registered_at == T0
    assert record.last_heartbeat == T0 + 50
    stored = get(store, "summarizer", now=T0 + 50)
    assert (stored.registered_at, stored.last_heartbeat, stored.health) == (T0, T0 + 50, "healthy")
    assert store.count() == 1


def test_the_same_owner_updates_a_version_in_place(store: AgentStore) -> None:
    store.register(manifest(caps={"summarize": ("pii",), "translate": ()}), now=T0)
    changed = manifest(caps={"classify": ("pci-dss",)}, team="platform", description="v2 text")
    record, created = store.register(changed, now=T0 + 5)
    assert not created
    assert record.manifest == changed
    assert get(store, "summarizer").manifest == changed
    assert store.count() == 1
    # The old capabilities and tags are gone, the new ones searchable.
    assert found(discover(store, capability="summarize")) == []
    assert found(discover(store, capability="translate")) == []
    assert found(discover(store, tag="pii")) == []
    assert found(discover(store, team="research")) == []
    assert found(discover(store, capability="classify")) == [("summarizer", "1.0.0")]
    assert found(discover(store, tag="pci-dss", team="platform")) == [("summarizer", "1.0.0")]


def test_another_owner_gets_a_conflict_and_nothing_is_written(store: AgentStore) -> None:
    store.register(manifest(version="1.0.0"), now=T0)
    before = everything(store)
    for version in ("1.0.0", "2.0.0"):  # the same version, and a new one
        with pytest.raises(Conflict) as err:
            store.register(manifest(version=version, owner="mallory"), now=T0 + 1)
        assert err.value.details == {"name": "summarizer", "owner": "alice"}
        assert "alice" in err.value.message and "mallory" in err.value.message
    assert everything(store) == before
    assert get(store, "summarizer").manifest.owner == "alice"


def test_an_invalid_manifest_is_refused_with_its_field_path_and_nothing_is_written(
    store: AgentStore,
) -> None:
    store.register(manifest(name="existing"), now=T0)
    before = everything(store)
    repeated = manifest(caps={"a": (), "b": ()})
    repeated = msgspec.structs.replace(
        repeated, capabilities=(*repeated.capabilities, Capability(name="a"))
    )
    with pytest.raises(InvalidInput) as err:
        store.register(repeated, now=T0)
    assert err.value.details["path"] == "$.capabilities[2].name"
    # Structs are not validated on construction; the store checks them anyway.
    with pytest.raises(SchemaError) as schema_err:
        store.register(manifest(name="bad name!"), now=T0)
    assert schema_err.value.details["path"] == "$.name"
    # Matches the wire pattern but is not semver (leading zero).
    with pytest.raises(InvalidInput) as version_err:
        store.register(manifest(version="01.2.3"), now=T0)
    assert version_err.value.details["path"] == "$.version"
    assert everything(store) == before
    assert found(discover(store, name="summarizer", all_versions=True)) == []


def test_versions_coexist_and_get_picks_the_highest_by_semver(store: AgentStore) -> None:
    for version in ("1.9.0", "1.10.0", "1.2.0"):
        store.register(manifest(version=version), now=T0)
    assert get(store, "summarizer").manifest.version == "1.10.0"
    store.register(manifest(version="2.0.0-rc.1"), now=T0)
    assert get(store, "summarizer").manifest.version == "2.0.0-rc.1"
    store.register(manifest(version="2.0.0"), now=T0)
    assert get(store, "summarizer").manifest.version == "2.0.0"
    assert get(store, "summarizer", "1.9.0").manifest.version == "1.9.0"
    assert store.count() == 5
    latest = store.latest("summarizer")
    assert latest is not None and latest.manifest.version == "2.0.0"
    assert store.latest("nobody") is None


def test_prerelease_precedence_follows_semver(store: AgentStore) -> None:
    # semver.org's own example, shuffled; ascending order per the spec.
    ordered = [
        "1.0.0-alpha",
        "1.0.0-alpha.1",
        "1.0.0-alpha.beta",
        "1.0.0-beta",
        "1.0.0-beta.2",
        "1.0.0-beta.11",
        "1.0.0-rc.1",
        "1.0.0",
    ]
    for version in ordered[3:] + ordered[:3]:
        store.register(manifest(version=version), now=T0)
    versions = [r.manifest.version for r in discover(store, all_versions=True).agents]
    assert versions == ordered[::-1]


def test_an_unknown_agent_or_version_is_not_found_with_what_exists(store: AgentStore) -> None:
    with pytest.raises(NotFound) as err:
        get(store, "ghost")
    assert "signalbox agents list" in err.value.message
    store.register(manifest(version="1.0.0"), now=T0)
    store.register(manifest(version="1.1.0"), now=T0)
    with pytest.raises(NotFound) as err:
        get(store, "summarizer", "3.0.0")
    assert err.value.details["versions"] == ["1.1.0", "1.0.0"]
    assert "1.1.0, 1.0.0" in err.value.message


# -- heartbeats and health ---------------------------------------------------------------


def test_health_goes_healthy_stale_down_and_back_with_a_heartbeat(store: AgentStore) -> None:
    store.register(manifest(), now=T0)
    assert get(store, "summarizer", now=T0 + STALE).health == "healthy"
    assert get(store, "summarizer", now=T0 + STALE + 1).health == "stale"
    assert get(store, "summarizer", now=T0 + DOWN).health == "stale"
    assert get(store, "summarizer", now=T0 + DOWN + 1).health == "down"
    beat = store.heartbeat(
        Heartbeat(name="summarizer", version="1.0.0", instance="i-1"), now=T0 + 200
    )
    assert (beat.health, beat.last_heartbeat, beat.instances) == ("healthy", T0 + 200, 1)
    record = get(store, "summarizer", now=T0 + 201)
    assert (record.health, record.last_heartbeat, record.registered_at) == (
        "healthy",
        T0 + 200,
        T0,
    )


def test_instances_count_only_those_beating_within_the_stale_threshold(store: AgentStore) -> None:
    store.register(manifest(), now=T0)
    store.heartbeat(Heartbeat(name="summarizer", version="1.0.0", instance="a"), now=T0)
    store.heartbeat(Heartbeat(name="summarizer", version="1.0.0", instance="b"), now=T0 + 20)
    assert get(store, "summarizer", now=T0 + 20).instances == 2
    assert get(store, "summarizer", now=T0 + 40).instances == 1  # "a" is 40 s old
    again = store.heartbeat(
        Heartbeat(name="summarizer", version="1.0.0", instance="a"), now=T0 + 45, stale_after=STALE
    )
    assert again.instances == 2
    assert discover(store, now=T0 + 45).agents[0].instances == 2


def test_heartbeats_upsert_instances_with_their_stats(store: AgentStore) -> None:
    store.register(manifest(), now=T0)
    store.register(manifest(name="other", caps={}), now=T0)
    stats = InstanceStats(started=T0, requests=7, errors=1, processing_time_ns=900)
    store.heartbeat(Heartbeat(name="summarizer", version="1.0.0", instance="a"), now=T0)
    store.heartbeat(
        Heartbeat(name="summarizer", version="1.0.0", instance="a", stats=stats), now=T0 + 10
    )
    store.heartbeat(Heartbeat(name="other", version="1.0.0", instance="z"), now=T0 + 1)
    listed = store.instances("summarizer", since=T0)
    assert [(i.instance, i.last_heartbeat, i.stats) for i in listed] == [("a", T0 + 10, stats)]
    assert [i.name for i in store.instances(since=T0)] == ["other", "summarizer"]
    assert [i.name for i in store.instances(since=T0 + 5)] == ["summarizer"]
    assert store.prune_instances(before=T0 + 5) == 1
    assert [i.name for i in store.instances(since=0)] == ["summarizer"]


def test_a_heartbeat_for_an_unregistered_version_is_not_found(store: AgentStore) -> None:
    with pytest.raises(NotFound):
        store.heartbeat(Heartbeat(name="ghost", version="1.0.0", instance="i"), now=T0)
    store.register(manifest(version="1.0.0"), now=T0)
    with pytest.raises(NotFound) as err:
        store.heartbeat(Heartbeat(name="summarizer", version="1.0.1", instance="i"), now=T0)
    assert "register" in err.value.message
    assert store.instances(since=0) == []


def test_a_batch_of_heartbeats_is_written_latest_first_and_never_backwards(
    store: AgentStore,
) -> None:
    store.register(manifest(version="1.0.0"), now=T0)
    store.register(manifest(version="2.0.0"), now=T0)

    def inst(instance: str, at: float, version: str = "1.0.0", **stats: Any) -> AgentInstance:
        return AgentInstance(
            name="summarizer",
            version=version,
            instance=instance,
            last_heartbeat=at,
            stats=InstanceStats(**stats),
        )

    store.record_heartbeats(
        [
            inst("a", T0 + 20, requests=2),
            inst("b", T0 + 10),
            inst("c", T0 + 5, version="2.0.0"),
            inst("z", T0 + 30, version="9.9.9"),  # not registered: skipped
            AgentInstance(name="ghost", version="1.0.0", instance="g", last_heartbeat=T0 + 30),
        ]
    )
    assert get(store, "summarizer", "1.0.0", now=T0 + 20).last_heartbeat == T0 + 20
    assert get(store, "summarizer", "2.0.0", now=T0 + 20).last_heartbeat == T0 + 5
    listed = {(i.version, i.instance): (i.last_heartbeat, i.stats.requests)
              for i in store.instances(since=0)}  # fmt: skip
    assert listed == {
        ("1.0.0", "a"): (T0 + 20, 2),
        ("1.0.0", "b"): (T0 + 10, 0),
        ("2.0.0", "c"): (T0 + 5, 0),
    }
    # An older batch (from a slower replica) changes nothing; a newer one does.
    store.record_heartbeats([inst("a", T0 + 15, requests=1), inst("b", T0 + 40, requests=9)])
    listed = {i.instance: (i.last_heartbeat, i.stats.requests) for i in store.instances(since=0)}
    assert listed == {"a": (T0 + 20, 2), "b": (T0 + 40, 9), "c": (T0 + 5, 0)}
    assert get(store, "summarizer", "1.0.0", now=T0 + 40).last_heartbeat == T0 + 40
    store.record_heartbeats([])  # nothing to do


def test_a_snapshot_holds_versions_in_order_with_their_recent_instances(
    store: AgentStore,
) -> None:
    store.register(manifest(name="b", version="1.0.0"), now=T0)
    store.register(manifest(name="a", version="1.10.0"), now=T0)
    store.register(manifest(name="a", version="1.9.0"), now=T0 + 1)
    store.heartbeat(Heartbeat(name="a", version="1.9.0", instance="old"), now=T0 + 2)
    store.heartbeat(Heartbeat(name="a", version="1.9.0", instance="new"), now=T0 + 50)
    everything = store.snapshot()
    assert [(v.manifest.name, v.manifest.version) for v in everything] == [
        ("a", "1.10.0"),
        ("a", "1.9.0"),
        ("b", "1.0.0"),
    ]
    a19 = everything[1]
    assert (a19.registered_at, a19.last_heartbeat) == (T0 + 1, T0 + 50)
    assert sorted(i.instance for i in a19.instances) == ["new", "old"]
    [recent] = [v for v in store.snapshot(["a"], since=T0 + 10) if v.instances]
    assert [i.instance for i in recent.instances] == ["new"]
    assert [v.manifest.name for v in store.snapshot(["b", "nobody"])] == ["b"]
    assert store.snapshot([]) == []
    assert store.names() == ["a", "b"]
    # A changed manifest keeps the row; registering again after removal makes a new one.
    store.register(manifest(name="b", version="1.0.0", team="other"), now=T0 + 60)
    [b_changed] = store.snapshot(["b"])
    assert b_changed.id == everything[2].id and b_changed.manifest.team == "other"
    store.deregister("b")
    store.register(manifest(name="b", version="1.0.0"), now=T0 + 70)
    assert store.snapshot(["b"])[0].id != everything[2].id


# -- deregistration ----------------------------------------------------------------------


def test_deregister_one_version_keeps_the_others(store: AgentStore) -> None:
    store.register(manifest(version="1.0.0"), now=T0)
    store.register(manifest(version="2.0.0"), now=T0)
    store.heartbeat(Heartbeat(name="summarizer", version="2.0.0", instance="i"), now=T0)
    removed = store.deregister("summarizer", "2.0.0")
    assert [(r.manifest.version, r.status) for r in removed] == [("2.0.0", "deregistered")]
    assert get(store, "summarizer").manifest.version == "1.0.0"
    assert store.instances(since=0) == []
    with pytest.raises(NotFound):
        store.deregister("summarizer", "2.0.0")
    # The name is still alice's.
    with pytest.raises(Conflict):
        store.register(manifest(version="3.0.0", owner="bob"), now=T0)


def test_deregister_all_versions_removes_everything_and_releases_the_name(
    store: AgentStore,
) -> None:
    store.register(manifest(version="1.0.0"), now=T0)
    store.register(manifest(version="1.5.0", caps={"translate": ("gdpr",)}), now=T0)
    store.register(manifest(name="keeper"), now=T0)
    store.heartbeat(Heartbeat(name="summarizer", version="1.0.0", instance="i"), now=T0)
    removed = store.deregister("summarizer")
    assert [r.manifest.version for r in removed] == ["1.5.0", "1.0.0"]
    assert {r.status for r in removed} == {"deregistered"}
    with pytest.raises(NotFound):
        get(store, "summarizer")
    with pytest.raises(NotFound):
        store.deregister("summarizer")
    assert found(discover(store, capability="translate")) == []
    assert found(discover(store, tag="pii")) == [("keeper", "1.0.0")]
    assert store.instances(since=0) == []
    assert store.count() == 1
    record, created = store.register(manifest(owner="bob"), now=T0 + 1)
    assert created and record.manifest.owner == "bob"


# -- discovery ---------------------------------------------------------------------------

FLEET = [
    manifest("alpha", "1.0.0", team="research", region="eu-west", caps={"summarize": ("pii",)}),
    manifest("alpha", "1.2.0", team="research", region="eu-west", caps={"summarize": ("pii",)}),
    manifest(
        "alpha",
        "2.0.0",
        team="research",
        region="eu-west",
        caps={"summarize": (), "translate": ("gdpr",)},
    ),
    manifest("beta", "1.10.0", owner="bob", team="payments", region="us-east", caps={"charge": ("pci-dss", "pii")}),  # noqa: E501
    manifest("beta", "1.9.0", owner="bob", team="payments", region="us-east", caps={"charge": ("pci-dss",)}),  # noqa: E501
    manifest("gamma", "0.3.0", owner="carol", team="research", region="us-east", caps={"summarize": ()}),  # noqa: E501
    manifest("delta", "3.1.4-beta.1", owner="carol", team="ops", region="ap-south", caps={}),
]  # fmt: skip


@pytest.fixture
def fleet(store: AgentStore) -> AgentStore:
    for m in FLEET:
        store.register(m, now=T0)
    return store


def test_discover_without_filters_lists_the_highest_version_of_every_agent(
    fleet: AgentStore,
) -> None:
    result = discover(fleet)
    assert found(result) == [
        ("alpha", "2.0.0"),
        ("beta", "1.10.0"),
        ("delta", "3.1.4-beta.1"),
        ("gamma", "0.3.0"),
    ]
    assert (result.total, result.next_cursor) == (4, "")
    everything = discover(fleet, all_versions=True)
    assert found(everything) == [
        ("alpha", "2.0.0"),
        ("alpha", "1.2.0"),
        ("alpha", "1.0.0"),
        ("beta", "1.10.0"),
        ("beta", "1.9.0"),
        ("delta", "3.1.4-beta.1"),
        ("gamma", "0.3.0"),
    ]
    assert everything.total == 7


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ({"name": "beta"}, [("beta", "1.10.0")]),
        ({"capability": "summarize"}, [("alpha", "2.0.0"), ("gamma", "0.3.0")]),
        # The highest version matching both (alpha 2.0.0 dropped the pii tag).
        ({"capability": "summarize", "tag": "pii"}, [("alpha", "1.2.0")]),
        ({"tag": "pii"}, [("alpha", "1.2.0"), ("beta", "1.10.0")]),
        ({"tag": "gdpr"}, [("alpha", "2.0.0")]),
        ({"tag": "pci-dss"}, [("beta", "1.10.0")]),
        ({"team": "research"}, [("alpha", "2.0.0"), ("gamma", "0.3.0")]),
        ({"owner": "carol"}, [("delta", "3.1.4-beta.1"), ("gamma", "0.3.0")]),
        ({"region": "us-east"}, [("beta", "1.10.0"), ("gamma", "0.3.0")]),
        ({"team": "research", "region": "us-east"}, [("gamma", "0.3.0")]),
        ({"capability": "charge", "tag": "pii", "owner": "bob"}, [("beta", "1.10.0")]),
        ({"tag": "pii", "team": "research", "region": "eu-west"}, [("alpha", "1.2.0")]),
        ({"capability": "summarize", "team": "payments"}, []),
        ({"name": "alpha", "tag": "pci-dss"}, []),
        ({"capability": "nothing-offers-this"}, []),
    ],
)
def test_discover_filters_combine_with_and(
    fleet: AgentStore, query: dict[str, Any], expected: list[tuple[str, str]]
) -> None:
    result = discover(fleet, **query)
    assert found(result) == expected
    assert result.total == len(expected)


def test_discover_tag_with_all_versions_counts_each_version_once(fleet: AgentStore) -> None:
    # beta 1.10.0 carries pii and pci-dss on one capability; alpha's pii is on old versions.
    result = discover(fleet, tag="pii", all_versions=True)
    assert found(result) == [("alpha", "1.2.0"), ("alpha", "1.0.0"), ("beta", "1.10.0")]
    assert result.total == 3


@pytest.mark.parametrize(
    ("versions", "all_versions", "expected"),
    [
        ("^1.2", False, [("alpha", "1.2.0"), ("beta", "1.10.0")]),
        ("^1.2", True, [("alpha", "1.2.0"), ("beta", "1.10.0"), ("beta", "1.9.0")]),
        (">=1.0.0 <2.0.0", False, [("alpha", "1.2.0"), ("beta", "1.10.0")]),
        (
            ">=1.0.0 <2.0.0",
            True,
            [("alpha", "1.2.0"), ("alpha", "1.0.0"), ("beta", "1.10.0"), ("beta", "1.9.0")],
        ),
        ("1.x", False, [("alpha", "1.2.0"), ("beta", "1.10.0")]),
        ("2.x || 0.x", False, [("alpha", "2.0.0"), ("gamma", "0.3.0")]),
        # npm semantics: a prerelease matches only a range naming its own version.
        ("*", False, [("alpha", "2.0.0"), ("beta", "1.10.0"), ("gamma", "0.3.0")]),
        (">=3.1.4-beta.0", False, [("delta", "3.1.4-beta.1")]),
        ("^9", False, []),
    ],
)
def test_discover_by_semver_range(
    fleet: AgentStore, versions: str, all_versions: bool, expected: list[tuple[str, str]]
) -> None:
    result = discover(fleet, versions=versions, all_versions=all_versions)
    assert found(result) == expected
    assert result.total == len(expected)


def test_a_range_combines_with_the_other_filters(fleet: AgentStore) -> None:
    assert found(discover(fleet, versions="^1", tag="pii")) == [
        ("alpha", "1.2.0"),
        ("beta", "1.10.0"),
    ]
    assert found(discover(fleet, versions="^1", capability="summarize")) == [("alpha", "1.2.0")]
    assert found(discover(fleet, versions="<1.10.0", owner="bob", all_versions=True)) == [
        ("beta", "1.9.0")
    ]


@pytest.mark.parametrize("versions", ["not a range", ">=>1", "^1.2.3.4"])
def test_an_invalid_range_is_invalid_input(fleet: AgentStore, versions: str) -> None:
    with pytest.raises(InvalidInput) as err:
        discover(fleet, versions=versions)
    assert err.value.details == {"field": "versions"}
    assert "npm syntax" in err.value.message


def test_discover_by_health(fleet: AgentStore) -> None:
    fleet.heartbeat(Heartbeat(name="beta", version="1.9.0", instance="b1"), now=T0 + 60)
    fleet.heartbeat(Heartbeat(name="gamma", version="0.3.0", instance="g1"), now=T0 + 100)
    now = T0 + 125  # registrations 125 s old (down), beta 1.9.0 65 s (stale), gamma 25 s
    assert found(discover(fleet, now=now, health="healthy")) == [("gamma", "0.3.0")]
    # The highest version in that state: beta 1.10.0 is down, 1.9.0 stale.
    assert found(discover(fleet, now=now, health="stale")) == [("beta", "1.9.0")]
    down = discover(fleet, now=now, health="down", all_versions=True)
    assert found(down) == [
        ("alpha", "2.0.0"),
        ("alpha", "1.2.0"),
        ("alpha", "1.0.0"),
        ("beta", "1.10.0"),
        ("delta", "3.1.4-beta.1"),
    ]
    assert {r.health for r in down.agents} == {"down"}
    assert found(discover(fleet, now=now, health="stale", capability="charge")) == [
        ("beta", "1.9.0")
    ]
    assert found(discover(fleet, now=now, health="healthy", tag="pii")) == []


def test_names_sort_bytewise_on_every_backend(store: AgentStore) -> None:
    names = ["b", "B", "a-b", "a_b", "ab", "a0", "A-1", "_x", "-y"]
    for name in names:
        store.register(manifest(name=name), now=T0)
    assert [n for n, _ in found(discover(store))] == sorted(names)


def walk(store: AgentStore, **query: Any) -> tuple[list[tuple[str, str]], set[int]]:
    """Every page of a query: the matches in order, and the totals reported."""
    seen: list[tuple[str, str]] = []
    totals: set[int] = set()
    cursor = ""
    for _ in range(100):
        page = discover(store, cursor=cursor, **query)
        assert len(page.agents) <= query.get("limit", 50)
        seen += found(page)
        totals.add(page.total)
        cursor = page.next_cursor
        if not cursor:
            return seen, totals
        assert page.agents, "a non-final page must not be empty"
    raise AssertionError("pagination does not end")


@pytest.mark.parametrize("limit", [1, 4, 7, 50])
@pytest.mark.parametrize(
    "query",
    [
        {},
        {"all_versions": True},
        {"capability": "work"},
        {"tag": "pii", "all_versions": True},
        {"versions": "^1"},
        {"versions": ">=1.0.0-0", "all_versions": True},
    ],
    ids=["latest", "all", "capability", "tag-all", "range", "range-all"],
)
def test_pagination_returns_every_match_once_in_order(
    store: AgentStore, limit: int, query: dict[str, Any]
) -> None:
    versions = ["1.0.0", "1.2.0", "2.0.0-rc.1", "1.10.0"]
    for i in range(13):
        for v in versions[: 1 + i % 4]:
            caps = {"work": ("pii", "internal")} if i % 3 else {"rest": ("pii",)}
            store.register(manifest(name=f"agent-{i:02d}", version=v, caps=caps), now=T0)
    expected = found(discover(store, limit=1000, **query))
    assert expected  # the query means something
    by_semver = sorted(expected, key=lambda nv: semantic_version.Version(nv[1]), reverse=True)
    assert expected == sorted(by_semver, key=lambda nv: nv[0])  # name up, then version down
    seen, totals = walk(store, limit=limit, **query)
    assert seen == expected
    assert len(set(seen)) == len(seen)
    assert totals == {len(expected)}


def test_the_last_page_has_no_cursor_and_an_exact_fit_ends_there(fleet: AgentStore) -> None:
    first = discover(fleet, limit=2)
    assert len(first.agents) == 2 and first.next_cursor
    second = discover(fleet, limit=2, cursor=first.next_cursor)
    assert found(second) == [("delta", "3.1.4-beta.1"), ("gamma", "0.3.0")]
    assert second.next_cursor == ""


@pytest.mark.parametrize(
    "cursor",
    [
        "%%%not base64",
        base64.urlsafe_b64encode(b"not json").decode(),
        base64.urlsafe_b64encode(b'{"a": 1}').decode(),
        base64.urlsafe_b64encode(b'["alpha", "not-a-version"]').decode(),
    ],
)
def test_an_invalid_cursor_is_invalid_input(fleet: AgentStore, cursor: str) -> None:
    with pytest.raises(InvalidInput) as err:
        discover(fleet, cursor=cursor)
    assert err.value.details == {"field": "cursor"}


# -- concurrency -------------------------------------------------------------------------


def race(workers: list[Callable[[], Any]]) -> list[Any]:
    """Run the callables at once (released together); returns results or exceptions."""
    barrier = threading.Barrier(len(workers))
    results: list[Any] = [None] * len(workers)

    def run(i: int) -> None:
        barrier.wait()
        try:
            results[i] = workers[i]()
        except Exception as exc:
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(workers))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    return results


def test_concurrent_registrations_by_different_owners_leave_one_owner(
    database_url: str, store: AgentStore
) -> None:
    # Separate stores (engines, pools) stand in for separate registry processes.
    others = [AgentStore(database_url) for _ in range(3)]
    try:
        stores = [store, *others]
        for round_ in range(5):
            name = f"contested-{round_}"
            workers = [
                # Different owners, and different versions: the name is what is claimed.
                lambda s=s, i=i, name=name: s.register(
                    manifest(name=name, version=f"1.{i}.0", owner=f"owner-{i}"), now=T0
                )
                for i, s in enumerate(stores)
            ]
            results = race(workers)
            winners = [r for r in results if isinstance(r, tuple)]
            assert len(winners) == 1, results
            assert all(isinstance(r, Conflict) for r in results if r not in winners), results
            owner = winners[0][0].manifest.owner
            stored = discover(store, name=name, all_versions=True).agents
            assert [r.manifest.owner for r in stored] == [owner]
    finally:
        for s in others:
            s.close()


def test_concurrent_identical_registrations_create_one_version(
    database_url: str, store: AgentStore
) -> None:
    other = AgentStore(database_url)
    try:
        m = manifest(name="twin")
        results = race([lambda s=s: s.register(m, now=T0) for s in (store, other, store, other)])
        assert all(isinstance(r, tuple) for r in results), results
        assert sorted(created for _, created in results) == [False, False, False, True]
        assert store.count() == 1
    finally:
        other.close()


# -- lifecycle ---------------------------------------------------------------------------


def test_create_schema_is_idempotent_and_data_survives_a_reopen(
    database_url: str, store: AgentStore
) -> None:
    store.register(manifest(), now=T0)
    store.create_schema()
    reopened = AgentStore(database_url)
    try:
        reopened.create_schema()
        assert get(reopened, "summarizer").manifest == manifest()
    finally:
        reopened.close()


def test_sqlite_creates_its_folder_and_uses_wal_with_foreign_keys(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "er" / "signalbox.db"
    s = AgentStore(f"sqlite:///{path}")
    try:
        s.create_schema()
        assert path.exists()
        with s._engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
    finally:
        s.close()


def test_another_kind_of_database_is_a_config_error() -> None:
    with pytest.raises(ConfigError) as err:
        AgentStore("mysql://u:p@localhost/db")
    assert "postgresql+psycopg" in err.value.message
