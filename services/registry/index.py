"""In-memory index of the registry: discovery, list and get answered without SQL.

Each registry replica keeps one :class:`AgentIndex`. The SQL store stays the
source of truth; the index is a copy the replica builds from it and keeps
current:

* at start, from a full :meth:`~services.registry.store.AgentStore.snapshot`;
* after every write the replica makes, from the written name's versions as
  the write transaction left them (:meth:`AgentIndex.replace`), under the
  replica's per-name lock, so the copy never goes back to an older state;
* on every change another replica makes: replicas publish a
  :class:`~schemas.RegistryChange` on the core subject ``sb.registry.changed``
  (:attr:`broker.subjects.Subjects.registry_changes`) after each commit,
  naming what changed, and every other replica re-reads those names.
  Heartbeats travel the same way, in batches, after the heartbeat flusher
  has written them to SQL.

Why not watch the ``sb_agents`` KV mirror instead: it holds only the highest
version of each name, and discovery searches every version. Why re-read
instead of shipping the new state: re-reading after a commit is
correct whatever order events arrive in, from however many replicas (the
last re-read of a name happens after its last commit). Core NATS drops
messages while a replica is disconnected, so each replica numbers its
events; a receiver that sees a gap in a sender's numbers re-reads every name
(and every replica sends at least one event per heartbeat flush interval,
so a gap shows up within about a second of reconnecting).

Heartbeats are applied as "latest wins" per version and instance
(:meth:`AgentIndex.beat`), so their order does not matter either; a re-read
keeps an in-memory heartbeat newer than the store's (the flusher writes them
to SQL in batches) as long as the version is the same row (same id: a
deregistered and re-registered version starts afresh).

Queries have exactly the semantics of
:meth:`~services.registry.store.AgentStore.discover` (a property test checks
index results against store results): health is computed from the last
heartbeat at query time, the highest *matching* version per name unless
``all_versions``, name then highest version first, the same cursors.

Layout: every version is one ``_Entry``; sorted lists of entries (by name,
then descending semver precedence via the store's ``rank`` key) for all
versions and per capability, tag, team, owner and region. A query starts
from the smallest list its filters select and applies each other filter in
one pass over what is left.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Sequence
from operator import attrgetter
from typing import Final

from schemas import (
    AgentInstance,
    AgentManifest,
    AgentRecord,
    DiscoverAgents,
    DiscoverResult,
)
from services.registry.cursor import decode_cursor, encode_cursor
from services.registry.liveness import Cutoffs
from services.registry.records import StoredVersion, not_found
from services.registry.versions import check_range, in_range, version_rank

__all__ = ["AgentIndex"]


_Key = tuple[str, str]


class _Entry:
    """One registered version in the index (mutable: heartbeats update it in place)."""

    __slots__ = (
        "capabilities",
        "id",
        "instances",
        "key",
        "last_heartbeat",
        "manifest",
        "name",
        "owner",
        "region",
        "registered_at",
        "tags",
        "team",
        "version",
    )

    def __init__(self, stored: StoredVersion) -> None:
        m = stored.manifest
        self.id = stored.id
        self.name = m.name
        self.version = m.version
        self.key: _Key = (m.name, version_rank(m.version))
        self.manifest: AgentManifest = m
        self.registered_at = stored.registered_at
        self.last_heartbeat = stored.last_heartbeat
        self.instances: dict[str, AgentInstance] = {i.instance: i for i in stored.instances}
        self.capabilities = frozenset(c.name for c in m.capabilities)
        self.tags = frozenset(t for c in m.capabilities for t in c.tags)
        self.team = m.team
        self.owner = m.owner
        self.region = m.region

    def absorb(self, older: _Entry) -> None:
        """Keep heartbeats of ``older`` (the same row) that are newer than ours."""
        if older.last_heartbeat > self.last_heartbeat:
            self.last_heartbeat = older.last_heartbeat
        for instance_id, inst in older.instances.items():
            mine = self.instances.get(instance_id)
            if mine is None or inst.last_heartbeat > mine.last_heartbeat:
                self.instances[instance_id] = inst

    def live(self, since: float) -> int:
        """Instances that sent a heartbeat at or after ``since``."""
        return sum(1 for i in self.instances.values() if i.last_heartbeat >= since)

    def record(self, cutoffs: Cutoffs) -> AgentRecord:
        """The wire record, with health and live instances at the cutoffs' instant."""
        return AgentRecord(
            manifest=self.manifest,
            registered_at=self.registered_at,
            last_heartbeat=self.last_heartbeat,
            health=cutoffs.health(self.last_heartbeat),
            instances=self.live(cutoffs.stale),
        )


_by_key: Final = attrgetter("key")
_by_name: Final = attrgetter("name")


def _insert(lists: dict[str, list[_Entry]], value: str, entry: _Entry) -> None:
    bucket = lists.setdefault(value, [])
    bisect.insort(bucket, entry, key=_by_key)


def _remove(lists: dict[str, list[_Entry]], value: str, entry: _Entry) -> None:
    bucket = lists.get(value)
    if bucket is None:
        return
    _remove_from(bucket, entry)
    if not bucket:
        del lists[value]


def _remove_from(bucket: list[_Entry], entry: _Entry) -> None:
    i = bisect.bisect_left(bucket, entry.key, key=_by_key)
    if i < len(bucket) and bucket[i] is entry:
        del bucket[i]


class AgentIndex:
    """Every registered version of every agent, in memory, searchable like the store.

    Not thread-safe: use it from the event loop only.
    """

    def __init__(self) -> None:
        self._versions: dict[str, list[_Entry]] = {}  # name -> entries, highest version first
        self._by_version: dict[tuple[str, str], _Entry] = {}  # (name, version) -> entry
        self._names: list[str] = []  # sorted
        self._all: list[_Entry] = []  # sorted by key
        self._capability: dict[str, list[_Entry]] = {}
        self._tag: dict[str, list[_Entry]] = {}
        self._team: dict[str, list[_Entry]] = {}
        self._owner: dict[str, list[_Entry]] = {}
        self._region: dict[str, list[_Entry]] = {}

    def __len__(self) -> int:
        """Number of versions (all names, all versions)."""
        return len(self._all)

    def names(self) -> list[str]:
        """Every name with at least one version, bytewise ascending."""
        return list(self._names)

    # -- changes -------------------------------------------------------------------------

    def replace(self, name: str, versions: Sequence[StoredVersion]) -> None:
        """Make ``name``'s versions those of ``versions`` (its rows in a store snapshot).

        Heartbeats the index holds for the same rows (same ids) and that are
        newer than the snapshot's are kept: the store gets them in batches.
        An empty ``versions`` removes the name.
        """
        old = {e.id: e for e in self._versions.get(name, ())}
        # Rows that are gone leave first: a row of the same version (deregistered,
        # then registered again) may take their place in the sorted lists.
        kept = {stored.id for stored in versions}
        for gone in [e for e in old.values() if e.id not in kept]:
            self._unindex(old.pop(gone.id))
        entries: list[_Entry] = []
        for stored in versions:
            if stored.manifest.name != name:
                raise ValueError(f"snapshot row of {stored.manifest.name!r} given for {name!r}")
            prev = old.pop(stored.id, None)
            if prev is not None and prev.manifest == stored.manifest:
                # Same row, same manifest: nothing searchable changed.
                fresh = _Entry(stored)
                fresh.absorb(prev)
                prev.registered_at = fresh.registered_at
                prev.last_heartbeat = fresh.last_heartbeat
                prev.instances = fresh.instances
                entries.append(prev)
                continue
            entry = _Entry(stored)
            if prev is not None:
                entry.absorb(prev)
                self._unindex(prev)
            self._index(entry)
            entries.append(entry)
        if entries:
            entries.sort(key=_by_key)
            if name not in self._versions:
                bisect.insort(self._names, name)
            self._versions[name] = entries
        elif name in self._versions:
            del self._versions[name]
            i = bisect.bisect_left(self._names, name)
            del self._names[i]

    def replace_many(self, names: Iterable[str], versions: Iterable[StoredVersion]) -> None:
        """:meth:`replace` for each of ``names`` from one snapshot of them (absent: removed)."""
        grouped: dict[str, list[StoredVersion]] = {name: [] for name in names}
        for stored in versions:
            grouped.setdefault(stored.manifest.name, []).append(stored)
        for name, rows in grouped.items():
            self.replace(name, rows)

    def beat(self, inst: AgentInstance, *, stale_after: float) -> AgentRecord | None:
        """Apply one heartbeat (latest wins); None if that version is not in the index.

        Returns:
            The version's record as a heartbeat reply: health ``healthy``,
            ``instances`` counting those seen within ``stale_after`` of the beat.
        """
        entry = self._by_version.get((inst.name, inst.version))
        if entry is None:
            return None
        self._beat(entry, inst)
        return AgentRecord(
            manifest=entry.manifest,
            registered_at=entry.registered_at,
            last_heartbeat=entry.last_heartbeat,
            health="healthy",
            instances=entry.live(inst.last_heartbeat - stale_after),
        )

    def merge_beats(self, beats: Iterable[AgentInstance]) -> int:
        """Apply heartbeats from another replica (latest wins); returns how many applied."""
        applied = 0
        for inst in beats:
            entry = self._by_version.get((inst.name, inst.version))
            if entry is not None:
                self._beat(entry, inst)
                applied += 1
        return applied

    def leave(self, name: str, version: str, instance: str) -> bool:
        """Forget one instance that shut down; whether the index had it."""
        entry = self._by_version.get((name, version))
        return entry is not None and entry.instances.pop(instance, None) is not None

    def prune(self, *, before: float) -> int:
        """Forget instances not heard from since ``before``; returns how many."""
        pruned = 0
        for entry in self._all:
            old = [k for k, i in entry.instances.items() if i.last_heartbeat < before]
            for k in old:
                del entry.instances[k]
            pruned += len(old)
        return pruned

    @staticmethod
    def _beat(entry: _Entry, inst: AgentInstance) -> None:
        if inst.last_heartbeat > entry.last_heartbeat:
            entry.last_heartbeat = inst.last_heartbeat
        mine = entry.instances.get(inst.instance)
        if mine is None or inst.last_heartbeat >= mine.last_heartbeat:
            entry.instances[inst.instance] = inst

    def _index(self, entry: _Entry) -> None:
        self._by_version[(entry.name, entry.version)] = entry
        bisect.insort(self._all, entry, key=_by_key)
        for capability in entry.capabilities:
            _insert(self._capability, capability, entry)
        for tag in entry.tags:
            _insert(self._tag, tag, entry)
        _insert(self._team, entry.team, entry)
        _insert(self._owner, entry.owner, entry)
        _insert(self._region, entry.region, entry)

    def _unindex(self, entry: _Entry) -> None:
        if self._by_version.get((entry.name, entry.version)) is entry:
            del self._by_version[(entry.name, entry.version)]
        _remove_from(self._all, entry)
        for capability in entry.capabilities:
            _remove(self._capability, capability, entry)
        for tag in entry.tags:
            _remove(self._tag, tag, entry)
        _remove(self._team, entry.team, entry)
        _remove(self._owner, entry.owner, entry)
        _remove(self._region, entry.region, entry)

    # -- reads ---------------------------------------------------------------------------

    def contains(self, name: str, version: str | None = None) -> bool:
        """True if ``name`` (that ``version``, when given) is in the index."""
        if version is None:
            return name in self._versions
        return (name, version) in self._by_version

    def get(
        self,
        name: str,
        version: str | None = None,
        *,
        now: float,
        stale_after: float,
        down_after: float,
    ) -> AgentRecord:
        """One agent version (the highest when ``version`` is None), health at ``now``.

        Raises:
            NotFound: no such agent or version (as :meth:`AgentStore.get` says it).
        """
        entries = self._versions.get(name, ())
        if version is None:
            entry = entries[0] if entries else None
        else:
            entry = self._by_version.get((name, version))
        if entry is None:
            raise not_found(name, version, [e.version for e in entries])
        return entry.record(Cutoffs(now, stale_after, down_after))

    def discover(
        self,
        q: DiscoverAgents,
        *,
        now: float,
        stale_after: float,
        down_after: float,
    ) -> DiscoverResult:
        """One page of the versions matching every filter of ``q``.

        Same semantics as :meth:`AgentStore.discover
        <services.registry.store.AgentStore.discover>`.

        Raises:
            InvalidInput: invalid ``versions`` range or ``cursor`` (``details['field']``).
        """
        spec = q.versions
        if spec:
            check_range(spec)
        after = decode_cursor(q.cursor) if q.cursor else None
        cutoffs = Cutoffs(now, stale_after, down_after)
        per_name = not q.all_versions
        limit = q.limit
        filtered = (
            q.name is not None
            or q.capability is not None
            or q.tag is not None
            or q.team is not None
            or q.owner is not None
            or q.region is not None
            or q.health is not None
            or bool(spec)
        )
        matches: Sequence[_Entry]
        if not filtered and per_name:
            # Every name's highest version: page through the names themselves.
            names = self._names
            start = bisect.bisect_right(names, after[0]) if after is not None else 0
            page = [self._versions[n][0] for n in names[start : start + limit]]
            total, more = len(names), start + limit < len(names)
        else:
            matches = self._all if not filtered else self._matches(q, cutoffs)
            if after is None:
                start = 0
            elif per_name:
                start = bisect.bisect_right(matches, after[0], key=_by_name)
            else:
                start = bisect.bisect_right(matches, after, key=_by_key)
            page = list(matches[start : start + limit])
            total, more = len(matches), start + limit < len(matches)
        records = tuple(e.record(cutoffs) for e in page)
        last = page[-1] if page else None
        next_cursor = encode_cursor(last.name, last.version) if more and last else ""
        return DiscoverResult(agents=records, total=total, next_cursor=next_cursor)

    def _matches(self, q: DiscoverAgents, cutoffs: Cutoffs) -> Sequence[_Entry]:
        """Every entry matching ``q`` (the highest matching one per name unless all_versions).

        Walks the smallest list the filters select, then applies each other
        filter present as one list comprehension (a loop testing every filter
        on every entry costs several times more in Python).
        """
        lists: list[tuple[str, list[_Entry]]] = []
        if q.name is not None:
            lists.append(("name", self._versions.get(q.name, [])))
        for field, by_value, value in (
            ("capability", self._capability, q.capability),
            ("tag", self._tag, q.tag),
            ("team", self._team, q.team),
            ("owner", self._owner, q.owner),
            ("region", self._region, q.region),
        ):
            if value is not None:
                lists.append((field, by_value.get(value, [])))
        walked, found = min(lists, key=lambda item: len(item[1])) if lists else ("", self._all)
        if not found:
            return found
        name, capability, tag = q.name, q.capability, q.tag
        team, owner, region = q.team, q.owner, q.region
        if name is not None and walked != "name":
            found = [e for e in found if e.name == name]
        if capability is not None and walked != "capability":
            found = [e for e in found if capability in e.capabilities]
        if tag is not None and walked != "tag":
            found = [e for e in found if tag in e.tags]
        if team is not None and walked != "team":
            found = [e for e in found if e.team == team]
        if owner is not None and walked != "owner":
            found = [e for e in found if e.owner == owner]
        if region is not None and walked != "region":
            found = [e for e in found if e.region == region]
        stale, down = cutoffs.stale, cutoffs.down
        if q.health == "healthy":
            found = [e for e in found if e.last_heartbeat >= stale]
        elif q.health == "stale":
            found = [e for e in found if down <= e.last_heartbeat < stale]
        elif q.health == "down":
            found = [e for e in found if e.last_heartbeat < down]
        spec = q.versions
        if spec:
            found = [e for e in found if in_range(spec, e.version)]
        if q.all_versions or len(self._all) == len(self._names):
            return found  # (with one version per name, nothing to drop)
        # Lists are in (name, highest version first) order: keep each name's first.
        out: list[_Entry] = []
        taken = None
        for e in found:
            if e.name != taken:
                out.append(e)
                taken = e.name
        return out

    def view(self, *, since: float) -> tuple[list[AgentRecord], list[AgentInstance]]:
        """Every version (health ``down``: not computed) and its instances seen since ``since``.

        What the NATS micro responder lists
        (:func:`services.registry.micro.instances_from_records`).
        """
        records: list[AgentRecord] = []
        instances: list[AgentInstance] = []
        for e in self._all:
            records.append(
                AgentRecord(
                    manifest=e.manifest,
                    registered_at=e.registered_at,
                    last_heartbeat=e.last_heartbeat,
                )
            )
            instances.extend(i for i in e.instances.values() if i.last_heartbeat >= since)
        return records, instances
