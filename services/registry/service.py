"""Registry service: agent registration, versions, heartbeats, discovery.

The SQL store (:mod:`services.registry.store`; SQLite under the data dir by
default, PostgreSQL when ``SIGNALBOX_DATABASE_URL`` says so) is the source of
truth. Each replica answers discovery, list and get from an in-memory copy
(:mod:`services.registry.index`), kept current from its own writes and, across
replicas, through the change feed ``sb.registry.changed``. The KV bucket
``sb_agents`` mirrors the highest registered version of each agent so the
other services watch it instead of querying. Both are kept current by
:mod:`services.registry.replication`.

Endpoints (request-reply, queue group ``sb-registry``)::

    sb.registry.register.<agent>    AgentManifest    -> Registered
    sb.registry.heartbeat.<agent>   Heartbeat        -> AgentRecord
    sb.registry.deregister.<agent>  DeregisterAgent  -> AgentRecord
    sb.registry.get                 GetAgent         -> AgentRecord
    sb.registry.list                ListAgents       -> AgentList
    sb.registry.discover            DiscoverAgents   -> DiscoverResult
    sb.admin.registry.deregister    DeregisterAgent  -> AgentRecord   (operators)

Agent-scoped subjects end in the agent's name, which the NATS server binds to
the agent's credentials; a body naming another agent is refused with
``identity_mismatch`` (audited and counted) before anything is written.

Heartbeats are answered from the index at once and written to SQL in
batches: a flusher writes the latest beat of every (name, version, instance)
in one transaction every ``heartbeat_flush_interval`` seconds (and on stop),
then sends the batch to the other replicas. A crash loses at most one
interval of heartbeats, which agents repeat anyway.

Store access: for SQLite, reads and writes run inline (a local query costs
less than a thread switch), writes one at a time behind an asyncio lock that
the heartbeat flusher holds while it writes its batch in a worker thread; for
PostgreSQL, every call goes to a worker thread. Full scans always do.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Final, TypeVar

from nats.aio.msg import Msg
from nats.js.kv import KeyValue

from broker.diagnostics import cancel_and_wait
from broker.errors import IdentityMismatch, InvalidInput, InvalidReplySubject, NotFound
from broker.runtime.service import Service
from broker.settings import Settings
from broker.subjects import AGENT_REGISTRY_OPS, Audience
from schemas import (
    AgentBinding,
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
    Wire,
)
from services.registry.binding import binding_from_manifest
from services.registry.identity import Identity
from services.registry.index import AgentIndex
from services.registry.micro import MicroInstance, MicroResponder, instances_from_records
from services.registry.records import heartbeat_not_found
from services.registry.replication import Replication
from services.registry.store import AgentStore, Rebound

__all__ = ["RegistryService", "capability_tag_changes"]

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Heartbeats per change event (keeps events far below the server's max_payload).
_BEATS_PER_EVENT: Final = 256


def capability_tag_changes(
    previous: AgentManifest | None, current: AgentManifest
) -> dict[str, dict[str, list[str]]]:
    """Capabilities in both manifests whose data tags differ: ``{cap: {before, after}}``."""
    if previous is None:
        return {}
    before = {c.name: sorted(set(c.tags)) for c in previous.capabilities}
    changed: dict[str, dict[str, list[str]]] = {}
    for cap in current.capabilities:
        after = sorted(set(cap.tags))
        if cap.name in before and before[cap.name] != after:
            changed[cap.name] = {"before": before[cap.name], "after": after}
    return changed


class RegistryService(Service):
    """Answers ``sb.registry.*`` from an in-memory index of the SQL store; mirrors ``sb_agents``."""

    name = "registry"

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self._store: AgentStore | None = None
        self.micro: MicroResponder | None = None
        self._inline_db = False
        self._sqlite_writes = asyncio.Lock()
        #: This replica's copy of the store (see services.registry.index).
        self.index = AgentIndex()
        #: The change feed between replicas and the KV mirror (services.registry.replication).
        self.replication = Replication(
            self,
            self.index,
            read_versions=lambda names, since: self._db(self.store.snapshot, names, since=since),
            read_names=lambda: self._db(self.store.names),
            instances_since=self._instances_since,
        )
        self._tasks: list[asyncio.Task[None]] = []
        #: Heartbeats answered but not yet written to SQL, latest per instance.
        self._pending: dict[tuple[str, str, str], AgentInstance] = {}
        self._last_prune = 0.0
        s = self.subjects
        self.endpoint(s.registry_wildcard("register"), AgentManifest)(self.register)
        self.endpoint(s.registry_wildcard("heartbeat"), Heartbeat)(self.heartbeat)
        self.endpoint(s.registry_wildcard("deregister"), DeregisterAgent)(self._deregister_self)
        # Operators; and the policy service when an operator archives a version (rollout).
        self.endpoint(
            s.admin("registry", "deregister"),
            DeregisterAgent,
            audience=Audience.OPERATOR | Audience.SERVICE,
        )(self.deregister)
        reads: tuple[tuple[str, type[Any], Callable[[Any], Awaitable[Any]]], ...] = (
            ("get", GetAgent, self.get),
            ("list", ListAgents, self.list),
            ("discover", DiscoverAgents, self.discover),
        )
        for op, request_type, read in reads:
            # Agents ask as themselves (sb.registry.<op>.<agent>: the reply goes
            # to that agent's inbox only); operators and services on sb.registry.<op>.
            self.endpoint(s.registry_wildcard(op), request_type)(read)
            staff = Audience.OPERATOR | Audience.SERVICE
            self.endpoint(s.registry(op), request_type, audience=staff)(read)
            # Named operators read on sb.admin.registry.<op>.<operator> (their only subjects).
            self.endpoint(s.admin("registry", op), request_type)(read)
        #: Enrollment, revocation and the auth callout (adds sb.admin.registry.* endpoints).
        self.identity = Identity(
            self, rebind=lambda name, changes, by: self.rebind(name, changes, by=by)
        )

    @property
    def kv(self) -> KeyValue:
        """The ``sb_agents`` bucket."""
        return self.replication.kv

    @property
    def store(self) -> AgentStore:
        """The SQL store."""
        assert self._store is not None, "registry not started"
        return self._store

    @property
    def pending_heartbeats(self) -> int:
        """Heartbeats answered and not yet written to the store."""
        return len(self._pending)

    async def _db(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        """Run a store read: inline for SQLite, in a worker thread for a network database.

        A local SQLite query takes well under a millisecond; handing it to a
        thread costs a good part of that again. A PostgreSQL round trip must
        not block the event loop, so it goes to a thread.
        """
        if self._inline_db:
            return fn(*args, **kwargs)
        return await asyncio.to_thread(fn, *args, **kwargs)

    async def _write(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        """Run a store write: inline for SQLite (one at a time), in a worker thread otherwise.

        SQLite takes one writer at a time. This replica's writes queue on an
        asyncio lock, which the heartbeat flusher holds while it writes in a
        thread, so a write does not wait for SQLite's lock with the event
        loop held (unless another process writes the same file: run several
        replicas on PostgreSQL). A worker thread per write measured ~25%
        slower registrations here: the threads and the loop contend for the GIL.
        """
        if not self._inline_db:
            return await asyncio.to_thread(fn, *args, **kwargs)
        async with self._sqlite_writes:
            return fn(*args, **kwargs)

    async def _write_in_thread(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        """Run a long store write (the heartbeat flush) in a worker thread, on any database."""
        if not self._inline_db:
            return await asyncio.to_thread(fn, *args, **kwargs)
        async with self._sqlite_writes:
            return await asyncio.to_thread(fn, *args, **kwargs)

    # -- lifecycle -----------------------------------------------------------------------

    async def on_start(self) -> None:
        url = self.settings.resolved_database_url
        self._inline_db = url.startswith("sqlite")
        self._store = AgentStore(url)
        await asyncio.to_thread(self._store.create_schema)
        await self.replication.start(self._load_index)
        self._tasks = [
            asyncio.ensure_future(self.replication.apply_changes()),
            asyncio.ensure_future(self._flush_periodically()),
        ]
        # Registered agents answer the standard NATS micro discovery protocol.
        self.micro = MicroResponder(self.nc, self._micro_view, refuse=self._refuse_micro)
        await self.micro.start()
        # Agent credentials and the NATS auth callout (services.registry.identity).
        await self.identity.start(self.store.engine)
        await self._seed_bindings()

    async def _load_index(self) -> None:
        """Load the index from the store (every name)."""
        # A full scan: off the event loop, whatever the database.
        versions = await asyncio.to_thread(self.store.snapshot, since=self._instances_since())
        self.index.replace_many((), versions)

    async def _seed_bindings(self) -> None:
        """Bind agents enrolled before bindings existed to what they registered last.

        Every credential issued since leaves a binding row; an older one has
        none, and without one an agent's declared attributes would be taken
        as they come. Such an agent is bound once, here, to the attributes of
        its highest registered version (none if it never registered);
        operators change them with ``signalbox agents bind``.
        """
        store = self.identity.credential_store
        unbound = await asyncio.to_thread(store.unbound_agents)
        if not unbound:
            return
        now = time.time()
        latest: dict[str, AgentManifest] = {}
        for version in await asyncio.to_thread(self.store.snapshot, unbound):
            latest.setdefault(version.manifest.name, version.manifest)  # highest first
        by = f"service:{self.name}"
        bindings = [
            binding_from_manifest(latest[name], by=by, now=now)
            if name in latest
            else AgentBinding(agent=name, bound_at=now, bound_by=by)
            for name in unbound
        ]
        added = await asyncio.to_thread(store.seed_bindings, bindings)
        if added:
            log.warning(
                "registry: bound %d agent(s) enrolled by an older release to the attributes "
                "they registered last (`signalbox agents show NAME`; change them with "
                "`signalbox agents bind`): %s",
                added,
                ", ".join(unbound[:20]) + (" ..." if len(unbound) > 20 else ""),
            )

    async def on_stop(self) -> None:
        await self.identity.stop()
        if self.micro is not None:
            await self.micro.stop()
        for task in self._tasks:
            await cancel_and_wait(task, f"registry task {task.get_name()}")
        self._tasks = []
        if self._store is not None:
            # Endpoints have stopped: no heartbeat arrives after this flush.
            try:
                await self.flush_heartbeats()
            except Exception:
                log.exception("registry: the last heartbeat flush failed")
        await self.replication.close()
        if self._store is not None:
            await asyncio.to_thread(self._store.close)

    def _instances_since(self) -> float:
        """Oldest heartbeat of an instance still worth loading (older ones count nowhere)."""
        return time.time() - self.settings.down_after

    # -- identity-bound subjects ---------------------------------------------------------

    def _refuse_micro(self, msg: Msg) -> bool:
        """``$SRV.*`` requests come from operators (and services): they are answered only
        into those reply spaces (a refusal is counted and audited, summarized)."""
        fault = self.reply_fault(msg, Audience.OPERATOR | Audience.SERVICE)
        if fault is None:
            return False
        err = InvalidReplySubject(
            f"request on {msg.subject} refused: {fault}; it was not answered",
            details={"subject": msg.subject, "reply": msg.reply[:200], "fault": fault},
        )
        self.refused(err, subject=msg.subject, actor="unknown")
        return True

    def _bound_agent(self, subject: str) -> tuple[str, str] | None:
        """``(op, agent)`` of an agent-scoped registry subject; None for any other subject."""
        prefix = f"{self.subjects.prefix}.registry."
        if not subject.startswith(prefix):
            return None
        op, _, agent = subject[len(prefix) :].partition(".")
        return (op, agent) if op in AGENT_REGISTRY_OPS else None

    async def handle(
        self,
        data: bytes,
        subject: str,
        request_type: type[Any],
        fn: Callable[[Any], Awaitable[Wire]],
    ) -> tuple[bytes, dict[str, str]]:
        """The endpoint contract, plus: an agent-scoped request must name its subject's agent.

        Raises nothing: an ``identity_mismatch`` becomes a structured error
        reply, audited and counted like every rejection, and nothing is written.
        """
        bound = self._bound_agent(subject)
        if bound is None:
            return await super().handle(data, subject, request_type, fn)
        op, agent = bound

        async def checked(request: Any) -> Wire:
            if request.name != agent:
                raise IdentityMismatch(
                    f"{subject} acts for agent {agent!r} only, but the request names "
                    f"{request.name!r}: an agent may {op} only itself (publish on "
                    f"{self.subjects.prefix}.registry.{op}.<its own name>)",
                    details={
                        "path": "$.name",
                        "field": "name",
                        "name": request.name,
                        "subject_agent": agent,
                        "op": op,
                    },
                )
            return await fn(request)

        return await super().handle(data, subject, request_type, checked)

    # -- writes --------------------------------------------------------------------------

    async def register(self, manifest: AgentManifest) -> Registered:
        """Register (or re-register) one agent version.

        With identity on, the stored manifest carries the attributes an
        operator bound to the agent (:mod:`services.registry.binding`), never
        the declared ones. The audit record says when a capability's data
        tags changed since the agent's previous registration.

        Raises:
            AttributeMismatch: the manifest declares another team, owner,
                namespace, region, project or tags than the agent's binding.
            Conflict: the name belongs to another owner.
        """
        async with self.replication.name_lock(manifest.name):
            done = await self._write(
                self.store.register_and_read,
                manifest,
                now=time.time(),
                bound=self.identity.enforced,
            )
            await self.replication.committed(manifest.name, done.versions)
        stored = done.record.manifest
        data: dict[str, Any] = {
            "op": "register",
            "name": stored.name,
            "version": stored.version,
            "owner": stored.owner,
            "team": stored.team,
            "created": done.created,
            "capabilities": [c.name for c in stored.capabilities],
        }
        changed = capability_tag_changes(done.previous, stored)
        if changed:
            data["capability_tags_changed"] = changed
        await self.audit.emit(
            "registry",
            actor=stored.name,
            subject=self.subjects.registry_for("register", stored.name),
            data=data,
        )
        return Registered(
            name=stored.name,
            version=stored.version,
            registered_at=done.record.registered_at,
            created=done.created,
        )

    async def rebind(self, name: str, changes: dict[str, Any], *, by: str) -> Rebound:
        """Change ``name``'s bound attributes and rewrite its registered versions (mirrored).

        Called by :class:`~services.registry.identity.Identity` for
        ``sb.admin.registry.bind`` and enrollments that bind, which audit it.
        """
        async with self.replication.name_lock(name):
            rebound = await self._write(
                self.store.bind_and_read, name, changes, by=by, now=time.time()
            )
            if rebound.rewritten:
                await self.replication.committed(name, rebound.versions)
        return rebound

    async def _deregister_self(self, request: DeregisterAgent) -> AgentRecord:
        """``sb.registry.deregister.<agent>``: an agent removing itself (name checked)."""
        return await self.deregister(
            request, subject=self.subjects.registry_for("deregister", request.name)
        )

    async def deregister(self, request: DeregisterAgent, *, subject: str = "") -> AgentRecord:
        """Remove one version (or all versions) of an agent; returns the last removed record.

        The one place every deregistration goes through, whoever asks (the
        agent itself on ``sb.registry.deregister.<agent>``, an operator on
        ``sb.admin.registry.deregister``).

        Args:
            request: Name, and version (None: every version).
            subject: Where the request came in (for the audit record); empty
                means an operator.

        Raises:
            NotFound: no such agent (or not that version).
            InvalidInput: an instance without its version.
        """
        if request.instance is not None:
            return await self._leave(request, subject=subject)
        async with self.replication.name_lock(request.name):
            removed, versions = await self._write(
                self.store.deregister_and_read, request.name, request.version
            )
            await self.replication.committed(request.name, versions)
        await self.audit.emit(
            "registry",
            actor=request.name,
            subject=subject or self.subjects.admin("registry", "deregister"),
            data={
                "op": "deregister",
                "name": request.name,
                "versions": [r.manifest.version for r in removed],
                "by": "agent" if subject else "operator",
            },
        )
        if not versions:
            # Its last version is gone: so are its credentials. An operator's
            # deregistration also closes its live connections; an agent
            # deregistering itself keeps its connection (the reply must reach
            # it) until its session ends, and cannot reconnect.
            await self.identity.revoke_all(
                request.name, reason="deregistered", disconnect=not subject
            )
        return removed[-1]

    async def _leave(self, request: DeregisterAgent, *, subject: str) -> AgentRecord:
        """One instance of a version shut down: forget it everywhere, keep the version."""
        if request.version is None or request.instance is None:
            raise InvalidInput("an instance leaves one version: give the version too")
        name, version, instance = request.name, request.version, request.instance
        gone = AgentInstance(name=name, version=version, instance=instance, last_heartbeat=0.0)
        async with self.replication.name_lock(name):
            versions = await self._write(self.store.leave, name, version, instance)
            # A beat of it still waiting for the flush would bring it back.
            self._pending.pop((name, version, instance), None)
            await self.replication.committed(name, versions, left=(gone,))
        what = {"op": "leave", "name": name, "version": version, "instance": instance}
        by = "agent" if subject else "operator"
        where = subject or self.subjects.admin("registry", "deregister")
        await self.audit.emit("registry", actor=name, subject=where, data={**what, "by": by})
        return await self.get(GetAgent(name=name, version=version))

    async def heartbeat(self, beat: Heartbeat) -> AgentRecord:
        """Record that an instance is alive (in memory now, in SQL at the next flush).

        Raises:
            NotFound: that version is not registered (deregistered or revoked).
        """
        inst = AgentInstance(
            name=beat.name,
            version=beat.version,
            instance=beat.instance,
            last_heartbeat=time.time(),
            stats=beat.stats,
        )
        stale_after = self.settings.stale_after
        record = self.index.beat(inst, stale_after=stale_after)
        if record is None:
            # Registered through another replica whose event has not arrived yet?
            await self.replication.refresh([beat.name])
            record = self.index.beat(inst, stale_after=stale_after)
            if record is None:
                raise heartbeat_not_found(beat.name, beat.version)
        self._pending[(beat.name, beat.version, beat.instance)] = inst
        return record

    async def flush_heartbeats(self) -> int:
        """Write the pending heartbeats to SQL in one transaction, then tell the other replicas.

        Also sends an (empty) event when nothing is pending, so the other
        replicas notice lost events within one flush interval.

        Returns:
            How many heartbeats were written.
        """
        batch, self._pending = self._pending, {}
        beats = list(batch.values())
        if beats:
            try:
                await self._write_in_thread(self.store.record_heartbeats, beats)
            except Exception:
                # Keep them for the next flush, unless a newer beat arrived meanwhile.
                for key, inst in batch.items():
                    self._pending.setdefault(key, inst)
                raise
            # As the store now has them (a version registered again since a
            # beat was answered gets that beat's instance in SQL too).
            self.index.merge_beats(beats)
        for start in range(0, max(len(beats), 1), _BEATS_PER_EVENT):
            await self.replication.announce(beats=beats[start : start + _BEATS_PER_EVENT])
        return len(beats)

    async def _flush_periodically(self) -> None:
        interval = self.settings.heartbeat_flush_interval
        while True:
            await asyncio.sleep(interval)
            try:
                await self.flush_heartbeats()
            except Exception:
                log.exception("registry: heartbeat flush failed; retrying in %gs", interval)
            now = time.time()
            if now - self._last_prune >= self.settings.down_after:
                self._last_prune = now
                self.index.prune(before=now - self.settings.down_after)

    # -- reads ---------------------------------------------------------------------------

    async def _micro_view(self) -> list[MicroInstance]:
        """Every registered version and its live instances, as micro services."""
        records, instances = self.index.view(since=time.time() - self.settings.stale_after)
        return instances_from_records(records, instances, self.subjects)

    async def get(self, request: GetAgent) -> AgentRecord:
        """Look up one agent version (the highest when ``version`` is not given).

        Raises:
            NotFound: no such agent (or not that version).
        """
        settings = self.settings
        try:
            return self.index.get(
                request.name,
                request.version,
                now=time.time(),
                stale_after=settings.stale_after,
                down_after=settings.down_after,
            )
        except NotFound:
            # Just registered through another replica, whose event is on its way?
            await self.replication.refresh([request.name])
        return self.index.get(
            request.name,
            request.version,
            now=time.time(),
            stale_after=settings.stale_after,
            down_after=settings.down_after,
        )

    async def list(self, request: ListAgents) -> AgentList:
        """Every agent's highest version (or every version), filtered by capability and team."""
        agents: list[AgentRecord] = []
        cursor = ""
        while True:
            page = await self.discover(
                DiscoverAgents(
                    capability=request.capability, team=request.team, limit=1000, cursor=cursor,
                    all_versions=request.all_versions,
                )
            )  # fmt: skip
            agents.extend(page.agents)
            cursor = page.next_cursor
            if not cursor:
                return AgentList(agents=tuple(agents))

    async def discover(self, query: DiscoverAgents) -> DiscoverResult:
        """Capability discovery (filters, semver range, health, pagination), from the index.

        Raises:
            InvalidInput: an invalid semver range or cursor.
        """
        return self.index.discover(
            query,
            now=time.time(),
            stale_after=self.settings.stale_after,
            down_after=self.settings.down_after,
        )
