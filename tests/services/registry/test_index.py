"""The registry's in-memory index answers exactly as the SQL store does.

The property test drives a store and an index the way a registry replica
does (every write re-read into the index, heartbeats applied to the index
at once and flushed to SQL in batches) through random registrations,
heartbeats, deregistrations and flushes, then asks both the same random
queries, page by page.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker.errors import Conflict, InvalidInput, NotFound
from schemas import (
    AgentInstance,
    AgentManifest,
    AgentRecord,
    Capability,
    DiscoverAgents,
    DiscoverResult,
    InstanceStats,
)
from services.registry.index import AgentIndex
from services.registry.records import StoredVersion
from services.registry.store import AgentStore

T0 = 1_000_000.0
STALE = 30.0
DOWN = 90.0

NAMES = ["alpha", "B", "a-b", "a_b", "beta"]
VERSIONS = ["0.3.0", "1.0.0", "1.2.0", "1.10.0", "2.0.0-rc.1", "2.0.0", "1.0.0+build.7"]
TEAMS = ["research", "payments"]
REGIONS = ["eu-west", "us-east", ""]
CAPS = ["score", "check", "talk"]
TAGS = ["pii", "pci-dss"]
RANGES = ["^1", ">=1.0.0 <2.0.0", "1.x", "*", ">=2.0.0-0", "<1.10.0", "2.x || 0.x"]
INSTANCES = ["i-1", "i-2"]


def owner_of(name: str) -> str:
    return f"owner-{NAMES.index(name) % 3}"


capabilities = st.lists(
    st.builds(
        lambda name, tags: Capability(name=name, tags=tuple(tags)),
        st.sampled_from(CAPS),
        st.lists(st.sampled_from(TAGS), max_size=2, unique=True),
    ),
    max_size=3,
    unique_by=lambda c: c.name,
)


@st.composite
def manifests(draw: st.DrawFn) -> AgentManifest:
    name = draw(st.sampled_from(NAMES))
    # Mostly the name's owner; sometimes another (the store refuses it: a conflict).
    owner = draw(st.sampled_from([owner_of(name)] * 4 + ["mallory"]))
    return AgentManifest(
        name=name,
        version=draw(st.sampled_from(VERSIONS)),
        owner=owner,
        team=draw(st.sampled_from(TEAMS)),
        region=draw(st.sampled_from(REGIONS)),
        capabilities=tuple(draw(capabilities)),
    )


registration = st.tuples(st.just("register"), manifests())
heartbeat = st.tuples(
    st.just("beat"),
    st.sampled_from(NAMES),
    st.sampled_from(VERSIONS),
    st.sampled_from(INSTANCES),
)
operations = st.tuples(
    # A fleet first, then a mix of everything (heartbeats most often).
    st.lists(registration, min_size=3, max_size=20),
    st.lists(
        st.one_of(
            registration,
            heartbeat,
            heartbeat,
            heartbeat,
            st.tuples(
                st.just("deregister"),
                st.sampled_from(NAMES),
                st.sampled_from([None, *VERSIONS]),
            ),
            st.tuples(st.just("flush")),
        ),
        max_size=40,
    ),
).map(lambda parts: parts[0] + parts[1])


def sometimes(values: list[Any]) -> st.SearchStrategy[Any]:
    """None (no such filter) four times in five, else one of ``values``."""
    return st.sampled_from([None] * (4 * len(values)) + values)


queries = st.builds(
    DiscoverAgents,
    name=sometimes(NAMES),
    capability=sometimes(CAPS),
    tag=sometimes(TAGS),
    team=sometimes(TEAMS),
    owner=sometimes(sorted({owner_of(n) for n in NAMES})),
    region=sometimes(REGIONS),
    versions=sometimes(RANGES),
    health=sometimes(["healthy", "stale", "down"]),
    all_versions=st.booleans(),
    limit=st.integers(min_value=1, max_value=4),
)


class Replica:
    """A store and an index kept together as a registry replica keeps them."""

    def __init__(self) -> None:
        self.store = AgentStore("sqlite://")
        self.store.create_schema()
        self.index = AgentIndex()
        self.pending: dict[tuple[str, str, str], AgentInstance] = {}

    def refresh(self, name: str) -> None:
        self.index.replace(name, self.store.snapshot([name]))

    def apply(self, op: tuple[Any, ...], now: float) -> None:
        kind = op[0]
        if kind == "register":
            manifest: AgentManifest = op[1]
            try:
                self.store.register(manifest, now=now)
            except (Conflict, InvalidInput):
                return
            self.refresh(manifest.name)
        elif kind == "beat":
            _, name, version, instance = op
            stats = InstanceStats(started=T0, requests=int(now) % 7)
            beat = AgentInstance(
                name=name, version=version, instance=instance, last_heartbeat=now, stats=stats
            )
            if self.index.beat(beat, stale_after=STALE) is not None:
                self.pending[(name, version, instance)] = beat
        elif kind == "deregister":
            _, name, version = op
            try:
                self.store.deregister(name, version)
            except NotFound:
                return
            self.refresh(name)
        else:
            self.flush()

    def flush(self) -> None:
        batch = list(self.pending.values())
        self.pending.clear()
        self.store.record_heartbeats(batch)
        self.index.merge_beats(batch)

    def close(self) -> None:
        self.store.close()


def pages(source: Any, q: DiscoverAgents, now: float) -> Iterator[DiscoverResult]:
    import msgspec

    cursor = ""
    for _ in range(100):
        page: DiscoverResult = source.discover(
            msgspec.structs.replace(q, cursor=cursor),
            now=now,
            stale_after=STALE,
            down_after=DOWN,
        )
        yield page
        cursor = page.next_cursor
        if not cursor:
            return
    raise AssertionError("pagination does not end")


def lookup(source: Any, name: str, version: str | None, now: float) -> AgentRecord | str:
    try:
        record: AgentRecord = source.get(name, version, now=now, stale_after=STALE, down_after=DOWN)
        return record
    except NotFound as err:
        return f"{err.message} {err.details}"


@settings(
    max_examples=60,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    ops=operations,
    steps=st.lists(st.floats(min_value=0, max_value=20), min_size=60, max_size=60),
    probes=st.lists(st.tuples(queries, st.floats(min_value=0, max_value=150)), max_size=8),
)
def test_index_answers_every_query_as_the_store_does(
    ops: list[tuple[Any, ...]],
    steps: list[float],
    probes: list[tuple[DiscoverAgents, float]],
) -> None:
    replica = Replica()
    try:
        now = T0
        for op, step in zip(ops, steps, strict=False):
            now += step  # the registry's clock does not go back
            replica.apply(op, now)
        replica.flush()
        for q, later in probes:
            at = now + later
            assert list(pages(replica.index, q, at)) == list(pages(replica.store, q, at)), q
        for name in NAMES:
            for version in (None, *VERSIONS):
                assert lookup(replica.index, name, version, now) == lookup(
                    replica.store, name, version, now
                )
    finally:
        replica.close()


# -- examples ------------------------------------------------------------------------------


def stored(
    id_: int,
    version: str = "1.0.0",
    *,
    last_heartbeat: float = T0,
    instances: tuple[AgentInstance, ...] = (),
    caps: tuple[str, ...] = ("score",),
    name: str = "alpha",
) -> StoredVersion:
    manifest = AgentManifest(
        name=name,
        version=version,
        owner="o",
        team="t",
        capabilities=tuple(Capability(name=c) for c in caps),
    )
    return StoredVersion(id_, manifest, T0, last_heartbeat, instances)


def beat(instance: str, at: float, version: str = "1.0.0") -> AgentInstance:
    return AgentInstance(name="alpha", version=version, instance=instance, last_heartbeat=at)


def record(index: AgentIndex, version: str | None = None, now: float = T0) -> AgentRecord:
    return index.get("alpha", version, now=now, stale_after=STALE, down_after=DOWN)


def test_a_reread_keeps_newer_heartbeats_of_the_same_row() -> None:
    index = AgentIndex()
    index.replace("alpha", [stored(1)])
    reply = index.beat(beat("i-1", T0 + 50), stale_after=STALE)
    assert reply is not None and (reply.health, reply.instances) == ("healthy", 1)
    # The store has not been flushed yet: its copy is older.
    index.replace("alpha", [stored(1, last_heartbeat=T0 + 10)])
    got = record(index, now=T0 + 60)
    assert (got.last_heartbeat, got.instances, got.health) == (T0 + 50, 1, "healthy")
    # A newer time in the store wins over the index's.
    index.replace("alpha", [stored(1, last_heartbeat=T0 + 70)])
    assert record(index, now=T0 + 70).last_heartbeat == T0 + 70


def test_a_version_registered_again_starts_afresh() -> None:
    index = AgentIndex()
    index.replace("alpha", [stored(1)])
    index.beat(beat("i-1", T0 + 50), stale_after=STALE)
    index.replace("alpha", [stored(2)])  # deregistered and registered again: a new row
    got = record(index, now=T0 + 1)
    assert (got.last_heartbeat, got.instances) == (T0, 0)
    assert len(index) == 1
    found = index.discover(DiscoverAgents(capability="score"), now=T0, stale_after=1, down_after=2)
    assert [r.manifest.version for r in found.agents] == ["1.0.0"]


def test_a_changed_manifest_moves_the_version_between_lists() -> None:
    index = AgentIndex()
    index.replace("alpha", [stored(1, caps=("score",))])
    index.replace("alpha", [stored(1, caps=("check",))])

    def offering(capability: str) -> list[str]:
        found = index.discover(
            DiscoverAgents(capability=capability), now=T0, stale_after=1, down_after=2
        )
        return [r.manifest.name for r in found.agents]

    assert offering("score") == []
    assert offering("check") == ["alpha"]


def test_an_empty_reread_removes_the_name() -> None:
    index = AgentIndex()
    index.replace("alpha", [stored(1), stored(2, "2.0.0")])
    assert index.names() == ["alpha"] and len(index) == 2
    index.replace("alpha", [])
    assert index.names() == [] and len(index) == 0
    with pytest.raises(NotFound):
        record(index)


def test_heartbeats_of_unknown_versions_are_not_applied() -> None:
    index = AgentIndex()
    assert index.beat(beat("i-1", T0), stale_after=STALE) is None
    index.replace("alpha", [stored(1)])
    assert index.beat(beat("i-1", T0, version="9.9.9"), stale_after=STALE) is None
    assert index.merge_beats([beat("i-1", T0 + 5, version="9.9.9"), beat("i-2", T0 + 5)]) == 1


def test_merged_heartbeats_keep_the_latest_whatever_their_order() -> None:
    index = AgentIndex()
    index.replace("alpha", [stored(1)])
    index.merge_beats([beat("i-1", T0 + 30), beat("i-1", T0 + 10), beat("i-2", T0 + 20)])
    got = record(index, now=T0 + 45)
    assert (got.last_heartbeat, got.instances) == (T0 + 30, 2)
    assert record(index, now=T0 + 55).instances == 1  # i-2 is 35 s old by then
    _, instances = index.view(since=0)
    assert {(i.instance, i.last_heartbeat) for i in instances} == {
        ("i-1", T0 + 30),
        ("i-2", T0 + 20),
    }


def test_prune_forgets_silent_instances() -> None:
    index = AgentIndex()
    index.replace("alpha", [stored(1)])
    index.merge_beats([beat("i-1", T0 + 30), beat("i-2", T0 + 5)])
    assert index.prune(before=T0 + 10) == 1
    _, instances = index.view(since=0)
    assert [i.instance for i in instances] == ["i-1"]
