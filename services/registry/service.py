"""Registry service: agent registration, versions, heartbeats, discovery.

The SQL store (:mod:`services.registry.store`; SQLite under the data dir by
default, PostgreSQL when ``SIGNALBOX_DATABASE_URL`` says so) is the source of
truth. The KV bucket ``sb_agents`` mirrors the highest registered version of
each agent so the other services watch it instead of querying. Store calls
are synchronous SQLAlchemy and run in a worker thread.

Endpoints (request-reply, queue group ``sb-registry``)::

    sb.registry.register    AgentManifest    -> Registered
    sb.registry.heartbeat   Heartbeat        -> AgentRecord
    sb.registry.get         GetAgent         -> AgentRecord
    sb.registry.list        ListAgents       -> AgentList
    sb.registry.discover    DiscoverAgents   -> DiscoverResult
    sb.registry.deregister  DeregisterAgent  -> AgentRecord
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable
from typing import Any, TypeVar

from nats.js.kv import KeyValue

from broker.codec import encode
from broker.jetstream import KV_AGENTS
from broker.service import Service
from broker.settings import Settings
from schemas import (
    AgentInstance,
    AgentList,
    AgentManifest,
    AgentRecord,
    DeregisterAgent,
    DiscoverAgents,
    DiscoverResult,
    GetAgent,
    Heartbeat,
    ListAgents,
    Registered,
)
from services.registry.micro import MicroInstance, MicroResponder, instances_from_records
from services.registry.store import AgentStore

__all__ = ["RegistryService"]

log = logging.getLogger(__name__)

T = TypeVar("T")


class RegistryService(Service):
    """Answers ``sb.registry.*`` from the SQL store and mirrors it into ``sb_agents``."""

    name = "registry"

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self._kv: KeyValue | None = None
        self._store: AgentStore | None = None
        self.micro: MicroResponder | None = None
        self._inline_db = False
        # Mirror writes of one name are serialized so the KV copy ends on the
        # store's latest state even when registrations of a name race.
        self._name_locks: collections.defaultdict[str, asyncio.Lock] = collections.defaultdict(
            asyncio.Lock
        )
        s = self.subjects
        self.endpoint(s.registry("register"), AgentManifest)(self.register)
        self.endpoint(s.registry("heartbeat"), Heartbeat)(self.heartbeat)
        self.endpoint(s.registry("get"), GetAgent)(self.get)
        self.endpoint(s.registry("list"), ListAgents)(self.list)
        self.endpoint(s.registry("discover"), DiscoverAgents)(self.discover)
        self.endpoint(s.registry("deregister"), DeregisterAgent)(self.deregister)

    @property
    def kv(self) -> KeyValue:
        """The ``sb_agents`` bucket."""
        assert self._kv is not None, "registry not started"
        return self._kv

    async def _db(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        """Run a store call: inline for SQLite, in a worker thread for a network database.

        A local SQLite query takes well under a millisecond; handing it to a
        thread costs a good part of that again (thread switch, GIL), which
        discovery latency pays on every request. A PostgreSQL round trip must
        not block the event loop, so it goes to a thread.
        """
        if self._inline_db:
            return fn(*args, **kwargs)
        return await asyncio.to_thread(fn, *args, **kwargs)

    @property
    def store(self) -> AgentStore:
        """The SQL store."""
        assert self._store is not None, "registry not started"
        return self._store

    async def on_start(self) -> None:
        url = self.settings.resolved_database_url
        self._inline_db = url.startswith("sqlite")
        self._store = AgentStore(url)
        await self._db(self._store.create_schema)
        self._kv = await self.js.key_value(KV_AGENTS)
        # Registered agents answer the standard NATS micro discovery protocol.
        self.micro = MicroResponder(self.nc, self._micro_view)
        await self.micro.start()

    async def on_stop(self) -> None:
        if self.micro is not None:
            await self.micro.stop()
        if self._store is not None:
            await self._db(self._store.close)

    async def _mirror(self, name: str) -> None:
        """Make ``sb_agents[name]`` the store's highest version of ``name`` (or absent)."""
        async with self._name_locks[name]:
            latest = await self._db(self.store.latest, name)
            if latest is None:
                await self.kv.delete(name)
            else:
                await self.kv.put(name, encode(latest))

    async def _micro_view(self) -> list[MicroInstance]:
        """Every registered version and its live instances, as micro services."""

        def load() -> tuple[list[AgentRecord], list[AgentInstance]]:
            now = time.time()
            records: list[AgentRecord] = []
            cursor = ""
            while True:
                page = self.store.discover(
                    DiscoverAgents(all_versions=True, limit=1000, cursor=cursor),
                    now=now,
                    stale_after=self.settings.stale_after,
                    down_after=self.settings.down_after,
                )
                records.extend(page.agents)
                cursor = page.next_cursor
                if not cursor:
                    break
            return records, self.store.instances(since=now - self.settings.stale_after)

        # A full scan: always off the event loop, whatever the database.
        records, instances = await asyncio.to_thread(load)
        return instances_from_records(records, instances, self.subjects)

    async def register(self, manifest: AgentManifest) -> Registered:
        """Register (or re-register) one agent version.

        Raises:
            Conflict: the name belongs to another owner.
        """
        record, created = await self._db(self.store.register, manifest, now=time.time())
        await self._mirror(manifest.name)
        await self.audit.emit(
            "registry",
            actor=manifest.name,
            subject=self.subjects.registry("register"),
            data={
                "op": "register",
                "name": manifest.name,
                "version": manifest.version,
                "owner": manifest.owner,
                "team": manifest.team,
                "created": created,
                "capabilities": [c.name for c in manifest.capabilities],
            },
        )
        return Registered(
            name=manifest.name,
            version=manifest.version,
            registered_at=record.registered_at,
            created=created,
        )

    async def heartbeat(self, beat: Heartbeat) -> AgentRecord:
        """Record that an instance is alive.

        Raises:
            NotFound: that version is not registered (deregistered or revoked).
        """
        # One SQL round trip: the store's heartbeat returns the fresh record.
        return await self._db(
            self.store.heartbeat, beat, now=time.time(), stale_after=self.settings.stale_after
        )

    async def get(self, request: GetAgent) -> AgentRecord:
        """Look up one agent version (the highest when ``version`` is not given).

        Raises:
            NotFound: no such agent (or not that version).
        """
        return await self._db(
            self.store.get,
            request.name,
            request.version,
            now=time.time(),
            stale_after=self.settings.stale_after,
            down_after=self.settings.down_after,
        )

    async def list(self, request: ListAgents) -> AgentList:
        """Every agent's highest version, filtered by capability and team."""
        agents: list[AgentRecord] = []
        cursor = ""
        while True:
            page = await self.discover(
                DiscoverAgents(
                    capability=request.capability, team=request.team, limit=1000, cursor=cursor
                )
            )
            agents.extend(page.agents)
            cursor = page.next_cursor
            if not cursor:
                return AgentList(agents=tuple(agents))

    async def discover(self, query: DiscoverAgents) -> DiscoverResult:
        """Capability discovery (filters, semver range, health, pagination).

        Raises:
            InvalidInput: an invalid semver range or cursor.
        """
        return await self._db(
            self.store.discover,
            query,
            now=time.time(),
            stale_after=self.settings.stale_after,
            down_after=self.settings.down_after,
        )

    async def deregister(self, request: DeregisterAgent) -> AgentRecord:
        """Remove one version (or all versions) of an agent; returns the last removed record.

        Raises:
            NotFound: no such agent (or not that version).
        """
        removed = await self._db(self.store.deregister, request.name, request.version)
        await self._mirror(request.name)
        await self.audit.emit(
            "registry",
            actor=request.name,
            subject=self.subjects.registry("deregister"),
            data={
                "op": "deregister",
                "name": request.name,
                "versions": [r.manifest.version for r in removed],
            },
        )
        return removed[-1]
