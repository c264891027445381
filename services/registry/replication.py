"""Keeping every registry replica's index, and the ``sb_agents`` KV mirror, current.

Each replica answers reads from its own in-memory copy of the store
(:mod:`services.registry.index`). After each commit, the replica that made it
updates its copy from what the write transaction read, publishes a numbered
:class:`~schemas.RegistryChange` on ``sb.registry.changed`` naming what
changed (the heartbeat flusher sends the beats it wrote the same way), and
mirrors the name's highest version into KV. Every other replica re-reads the
names it is told about; a gap in a sender's numbers makes it re-read every
name. Why re-reading is correct whatever the order of events: see
:mod:`services.registry.index`; why the mirror ends on the store's latest
state however writes race: see :meth:`Replication._mirror`.

Re-reads of a name and applying them to the index happen under the name's
lock (writes hold it too, :meth:`Replication.name_lock`), so this replica
applies reads in order.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Final

import nats.js.errors
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.kv import KV_DEL, KV_OP, KeyValue

from broker.codec import decode, encode
from broker.connection import sync_connection
from broker.errors import SignalboxError
from broker.ids import new_id
from broker.runtime.jetstream import KV_AGENTS
from broker.runtime.service import ServiceHost
from schemas import AgentInstance, AgentRecord, RegistryChange
from services.registry.index import AgentIndex
from services.registry.liveness import NO_CUTOFF
from services.registry.records import StoredVersion

__all__ = ["ReadNames", "ReadVersions", "Replication"]

log = logging.getLogger(__name__)

#: Reads the versions of some names from the store, with the instances seen
#: since the given time (the registry runs it inline or in a worker thread).
ReadVersions = Callable[[Sequence[str], float], Awaitable[list[StoredVersion]]]
#: Reads every agent name in the store.
ReadNames = Callable[[], Awaitable[list[str]]]

#: Names re-read from the store per query when a replica catches up on every name.
_RESYNC_CHUNK: Final = 500
#: Attempts at writing the KV mirror of a name when other replicas keep changing it.
_MIRROR_ATTEMPTS: Final = 20
#: JetStream error codes of a failed "expected last subject sequence" check.
_WRONG_LAST_SEQUENCE: Final = (10071, 10164)
_EXPECTED_LAST_SUBJECT_SEQUENCE: Final = "Nats-Expected-Last-Subject-Sequence"


class _MirrorConflict(Exception):
    """Another replica wrote the KV mirror of a name since we read its revision."""


class Replication:
    """This replica's side of the change feed ``sb.registry.changed`` and of the KV mirror.

    Args:
        host: The registry service (connection, JetStream, subjects, settings, rejections).
        index: This replica's in-memory index, kept current here.
        read_versions: Reads names' versions from the store.
        read_names: Reads every name in the store.
        instances_since: Oldest heartbeat time of an instance still worth loading.
    """

    def __init__(
        self,
        host: ServiceHost,
        index: AgentIndex,
        *,
        read_versions: ReadVersions,
        read_names: ReadNames,
        instances_since: Callable[[], float],
    ) -> None:
        self._host = host
        self._index = index
        self._read_versions = read_versions
        self._read_names = read_names
        self._instances_since = instances_since
        #: Id of this replica in the change feed.
        self.replica_id = new_id()[:22]
        self._kv: KeyValue | None = None
        self._seq = 0
        self._peers: dict[str, int] = {}
        self._baseline_until = 0.0
        self._changes: asyncio.Queue[RegistryChange] = asyncio.Queue()
        self._changes_sub: Subscription | None = None
        # Index re-reads and mirror writes of one name are serialized, so this
        # replica never applies an older read of a name over a newer one.
        self._name_locks: collections.defaultdict[str, asyncio.Lock] = collections.defaultdict(
            asyncio.Lock
        )
        #: KV revision of each name as of this replica's last mirror write.
        self._kv_revisions: dict[str, int] = {}

    @property
    def kv(self) -> KeyValue:
        """The ``sb_agents`` bucket."""
        assert self._kv is not None, "registry not started"
        return self._kv

    def name_lock(self, name: str) -> asyncio.Lock:
        """The lock of ``name``: held by every write to it, re-read and mirror write of it."""
        return self._name_locks[name]

    async def start(self, load_index: Callable[[], Awaitable[None]]) -> None:
        """Open the KV bucket, follow the change feed, then load the index (``load_index``).

        Run :meth:`apply_changes` afterwards, to apply the events queued meanwhile.
        """
        host = self._host
        self._kv = await host.js.key_value(KV_AGENTS)
        # Subscribe to the other replicas' changes before reading the store:
        # whatever changes after the read arrives as an event (queued until
        # the index is loaded, then applied).
        self._changes_sub = await host.nc.subscribe(
            host.subjects.registry_changes, cb=self._on_change, pending_msgs_limit=1_000_000
        )
        await sync_connection(host.nc)
        await load_index()
        loop = asyncio.get_running_loop()
        # Replicas already running are learnt from their first event; each sends
        # one per flush interval, so after two intervals every live one is known.
        self._baseline_until = loop.time() + 2 * host.settings.heartbeat_flush_interval

    async def close(self) -> None:
        """Stop following the change feed."""
        if self._changes_sub is not None:
            with contextlib.suppress(Exception):
                await self._changes_sub.unsubscribe()
            self._changes_sub = None

    async def committed(
        self, name: str, versions: list[StoredVersion], *, left: Sequence[AgentInstance] = ()
    ) -> None:
        """After a commit to ``name`` (its lock held): tell the others, update the index, mirror.

        Args:
            name: The agent name written.
            versions: Its versions as the write left them (read in the write transaction).
            left: Instances that left in that write (dropped from every replica's memory).
        """
        await self.announce(names=(name,), left=left)
        for gone in left:
            self._index.leave(gone.name, gone.version, gone.instance)
        self._index.replace(name, versions)
        # The KV revision must be known before the store state being mirrored
        # was read (see _mirror): first, that of our own last write of the
        # name, or 0 ("never written") for a name new to this replica; after
        # a conflict, the bucket's, then the store is read again.
        revision = self._kv_revisions.get(name, 0)
        for _ in range(_MIRROR_ATTEMPTS):
            try:
                await self._mirror(name, versions, revision)
                return
            except _MirrorConflict:
                self._kv_revisions.pop(name, None)
            revision = await self._kv_revision(name)
            versions = await self._read_versions([name], NO_CUTOFF)
            self._index.replace(name, versions)
        log.error(
            "registry: gave up mirroring %s into KV after %d conflicting writes; the KV "
            "copy may be stale until its next change",
            name,
            _MIRROR_ATTEMPTS,
        )

    async def refresh(self, names: Sequence[str]) -> None:
        """Re-read ``names`` from the store into the index (no mirror write)."""
        async with contextlib.AsyncExitStack() as stack:
            # Sorted: two refreshes of overlapping names cannot deadlock.
            for name in sorted(set(names)):
                await stack.enter_async_context(self._name_locks[name])
            versions = await self._read_versions(names, self._instances_since())
            self._index.replace_many(names, versions)

    async def _resync(self) -> None:
        """Re-read every name (the store's and the index's): after lost change events."""
        names = sorted(set(await self._read_names()) | set(self._index.names()))
        for start in range(0, len(names), _RESYNC_CHUNK):
            await self.refresh(names[start : start + _RESYNC_CHUNK])

    async def _kv_revision(self, name: str) -> int:
        """Current revision of ``sb_agents[name]``, read from the bucket (0 if never written)."""
        try:
            entry = await self.kv.get(name)
        except nats.js.errors.KeyNotFoundError as exc:  # absent, or a delete marker
            return int(exc.entry.revision or 0) if exc.entry is not None else 0
        return int(entry.revision or 0)

    async def _mirror(self, name: str, versions: Sequence[StoredVersion], revision: int) -> None:
        """Write ``name``'s highest version (or its absence) to KV if still at ``revision``.

        Every replica that commits a change to a name mirrors it afterwards:
        it takes a KV revision it learnt before reading the store (read from
        the bucket, the ack of its own last write, or 0 for "never written"),
        reads the store, and writes with "expected last subject sequence" =
        that revision. If the write succeeds, no other replica wrote since
        that revision, in particular none that read the store after us; any
        later commit is mirrored by its own replica after it, and that write
        either follows ours or fails and retries on a fresh read. So the last
        write always carries the store's latest state, however registrations
        race.

        Raises:
            _MirrorConflict: the revision moved; read again and retry.
        """
        headers = {_EXPECTED_LAST_SUBJECT_SEQUENCE: str(revision)}
        if versions:
            top = versions[0]  # highest version first
            # The first registered (lowest row id: a re-registration keeps its row).
            first = min(versions, key=lambda v: v.id)
            value = AgentRecord(
                manifest=top.manifest,
                registered_at=top.registered_at,
                last_heartbeat=top.last_heartbeat,
                instances=len(top.instances),
                established_version=first.manifest.version if len(versions) > 1 else "",
            )
            data = encode(value)
        else:
            headers[KV_OP] = KV_DEL
            data = b""
        try:
            ack = await self._host.js.publish(f"$KV.{KV_AGENTS}.{name}", data, headers=headers)
        except nats.js.errors.APIError as exc:
            if exc.err_code in _WRONG_LAST_SEQUENCE:
                raise _MirrorConflict(name) from exc
            raise
        self._kv_revisions[name] = ack.seq

    async def announce(
        self,
        *,
        names: Sequence[str] = (),
        beats: Sequence[AgentInstance] = (),
        left: Sequence[AgentInstance] = (),
    ) -> None:
        """Publish one change event to the other replicas (numbered, so losses show)."""
        self._seq += 1
        event = RegistryChange(
            origin=self.replica_id,
            seq=self._seq,
            names=tuple(names),
            beats=tuple(beats),
            left=tuple(left),
        )
        try:
            await self._host.nc.publish(self._host.subjects.registry_changes, encode(event))
        except Exception as exc:  # the others notice the gap and re-read everything
            log.warning("registry: change event %d not sent: %r", self._seq, exc)

    async def _on_change(self, msg: Msg) -> None:
        try:
            event = decode(msg.data, RegistryChange)
        except SignalboxError as err:
            await self._host.reject(err, subject=msg.subject)
            return
        if event.origin != self.replica_id:
            self._changes.put_nowait(event)

    async def apply_changes(self) -> None:
        """Apply the other replicas' events in arrival order (after the initial load)."""
        loop = asyncio.get_running_loop()
        while True:
            event = await self._changes.get()
            try:
                last = self._peers.get(event.origin)
                self._peers[event.origin] = event.seq
                if last is None:
                    # A replica heard of for the first time: it started after us
                    # (its numbers start at 1), or it was running before we
                    # loaded the store (anything older is in what we loaded).
                    lost = event.seq != 1 and loop.time() > self._baseline_until
                else:
                    lost = event.seq != last + 1
                if lost:
                    log.warning(
                        "registry: change events from replica %s were lost (got %d after %s); "
                        "re-reading every agent",
                        event.origin,
                        event.seq,
                        last,
                    )
                    await self._resync()
                elif event.names:
                    await self.refresh(event.names)
                if event.beats:
                    self._index.merge_beats(event.beats)
                for gone in event.left:
                    self._index.leave(gone.name, gone.version, gone.instance)
            except Exception:
                log.exception("registry: applying a change event failed; re-reading everything")
                with contextlib.suppress(Exception):
                    await self._resync()
