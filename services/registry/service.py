"""Registry service: agent registration and lookup.

The KV bucket ``sb_agents`` holds one :class:`~schemas.AgentRecord` per
agent name (its latest registered version); every other service watches it.
Writes use compare-and-set on the key's revision, so two registrations
racing for one name cannot overwrite each other unnoticed.
"""

from __future__ import annotations

import logging
import time

import msgspec
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from broker.codec import decode, encode
from broker.errors import Conflict, NotFound
from broker.jetstream import KV_AGENTS
from broker.service import Service
from broker.settings import Settings
from schemas import (
    AgentList,
    AgentManifest,
    AgentRecord,
    DeregisterAgent,
    GetAgent,
    ListAgents,
    Registered,
)

__all__ = ["RegistryService"]

log = logging.getLogger(__name__)


class RegistryService(Service):
    """Answers ``sb.registry.{register,get,list,deregister}``."""

    name = "registry"

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self._kv: KeyValue | None = None
        s = self.subjects
        self.endpoint(s.registry("register"), AgentManifest)(self.register)
        self.endpoint(s.registry("get"), GetAgent)(self.get)
        self.endpoint(s.registry("list"), ListAgents)(self.list)
        self.endpoint(s.registry("deregister"), DeregisterAgent)(self.deregister)

    @property
    def kv(self) -> KeyValue:
        """The ``sb_agents`` bucket."""
        assert self._kv is not None, "registry not started"
        return self._kv

    async def on_start(self) -> None:
        self._kv = await self.js.key_value(KV_AGENTS)

    async def _load(self, name: str) -> tuple[AgentRecord | None, int]:
        try:
            entry = await self.kv.get(name)
        except KeyNotFoundError:
            return None, 0
        if not entry.value:
            return None, entry.revision or 0
        return decode(entry.value, AgentRecord), entry.revision or 0

    async def register(self, manifest: AgentManifest) -> Registered:
        """Register (or re-register) one agent version.

        Raises:
            Conflict: the name belongs to another owner, or a concurrent write won.
        """
        current, revision = await self._load(manifest.name)
        if current is not None and current.manifest.owner != manifest.owner:
            raise Conflict(
                f"agent {manifest.name!r} is owned by {current.manifest.owner!r}; "
                f"{manifest.owner!r} cannot register it. Pick another name or ask that owner",
                details={"name": manifest.name, "owner": current.manifest.owner},
            )
        if current is not None and current.manifest == manifest and current.status == "active":
            return Registered(
                name=manifest.name,
                version=manifest.version,
                registered_at=current.registered_at,
                created=False,
            )
        record = AgentRecord(manifest=manifest, registered_at=time.time())
        try:
            if revision:
                await self.kv.update(manifest.name, encode(record), last=revision)
            else:
                await self.kv.create(manifest.name, encode(record))
        except KeyWrongLastSequenceError as exc:
            raise Conflict(
                f"agent {manifest.name!r} was changed concurrently; retry the registration",
                details={"name": manifest.name},
            ) from exc
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
                "capabilities": [c.name for c in manifest.capabilities],
            },
        )
        return Registered(
            name=manifest.name,
            version=manifest.version,
            registered_at=record.registered_at,
            created=True,
        )

    async def get(self, request: GetAgent) -> AgentRecord:
        """Look up one agent.

        Raises:
            NotFound: no such agent (or not that version).
        """
        record, _ = await self._load(request.name)
        if record is None or (request.version and record.manifest.version != request.version):
            raise NotFound(
                f"no agent {request.name!r}"
                + (f" at version {request.version}" if request.version else "")
                + "; `signalbox agents list` shows registered agents",
                details={"name": request.name, "version": request.version},
            )
        return record

    async def list(self, request: ListAgents) -> AgentList:
        """List agents, filtered by capability and team."""
        records: list[AgentRecord] = []
        try:
            keys = await self.kv.keys()
        except Exception:  # nats-py raises NoKeysError on an empty bucket
            keys = []
        for key in sorted(keys):
            record, _ = await self._load(key)
            if record is None:
                continue
            m = record.manifest
            if request.team and m.team != request.team:
                continue
            if request.capability and request.capability not in {c.name for c in m.capabilities}:
                continue
            records.append(record)
        return AgentList(agents=tuple(records))

    async def deregister(self, request: DeregisterAgent) -> AgentRecord:
        """Remove an agent; returns its last record.

        Raises:
            NotFound: no such agent (or not that version).
        """
        record = await self.get(GetAgent(name=request.name, version=request.version))
        await self.kv.delete(request.name)
        await self.audit.emit(
            "registry",
            actor=request.name,
            subject=self.subjects.registry("deregister"),
            data={"op": "deregister", "name": request.name, "version": record.manifest.version},
        )
        return msgspec.structs.replace(record, status="deregistered")
