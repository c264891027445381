"""The registry's SQL source of truth: agent versions, capabilities, tags, instances.

The same code runs on SQLite (the default, a file under the data dir) and
PostgreSQL (``postgresql+psycopg://...``). Every method is synchronous; the
registry service calls them through :func:`asyncio.to_thread` (or inline on
SQLite), and one :class:`AgentStore` is safe to use from many threads at once.

The tables and their indexes are in :mod:`services.registry.tables`, the
statements in :mod:`services.registry.queries` and (discovery)
:mod:`services.registry.discovery`; versions are ordered by the ``rank`` key
of :mod:`services.registry.versions`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Final, NamedTuple, TypeVar

from sqlalchemy import Float, String, Text, bindparam, delete, func, select, text, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.exc import IntegrityError
from sqlmodel import SQLModel

from broker.codec import decode, encode
from broker.errors import ConfigError, Conflict
from broker.runtime.sql import make_engine
from schemas import (
    AgentBinding,
    AgentInstance,
    AgentManifest,
    AgentRecord,
    DiscoverAgents,
    DiscoverResult,
    Heartbeat,
    InstanceStats,
)
from services.registry.binding import apply_binding, impose_binding, updated_binding
from services.registry.credentials import read_binding, write_binding
from services.registry.discovery import discover
from services.registry.liveness import NO_CUTOFF, Cutoffs
from services.registry.queries import (
    BEAT_LATER,
    BEAT_VERSION,
    LATEST_VERSION,
    NAME_CLAIM,
    ONE_VERSION,
    PREVIOUS_MANIFEST,
    VERSION_MANIFESTS,
)
from services.registry.records import (
    StoredVersion,
    decoded_manifest,
    heartbeat_not_found,
    live_instances,
    read_versions,
    to_record,
)
from services.registry.registration import (
    leave_instance,
    missing,
    prepared_manifest,
    remove_versions,
    write_version,
)
from services.registry.tables import (
    AGENT_NAMES,
    AGENT_VERSIONS,
    CAPABILITIES,
    CAPABILITY_TAGS,
    INSTANCES,
    TABLES,
)

__all__ = ["AgentStore", "Rebound", "Registration"]

T = TypeVar("T")

# Short names for the tables in the statements below.
_N, _V, _C, _T, _I = AGENT_NAMES, AGENT_VERSIONS, CAPABILITIES, CAPABILITY_TAGS, INSTANCES

#: Attempts at a write that lost a race on a unique key before giving up.
_WRITE_ATTEMPTS: Final = 3
#: Key of the PostgreSQL advisory lock that serializes concurrent create_schema calls.
_SCHEMA_LOCK: Final = 0x5B0A6E15


class Registration(NamedTuple):
    """What :meth:`AgentStore.register_and_read` did.

    Attributes:
        record: The stored record (its manifest carries the bound attributes).
        created: The version is new.
        versions: Every version of the name as the write left them.
        previous: The manifest registered before: of the same version if it
            existed, else of the highest version (None: the name was new).
    """

    record: AgentRecord
    created: bool
    versions: list[StoredVersion]
    previous: AgentManifest | None


class Rebound(NamedTuple):
    """What :meth:`AgentStore.bind_and_read` did.

    Attributes:
        before: The binding before (None: there was none).
        after: The binding stored.
        rewritten: Registered versions whose stored manifest changed.
        versions: Every version of the name as the write left them.
    """

    before: AgentBinding | None
    after: AgentBinding
    rewritten: int
    versions: list[StoredVersion]


class AgentStore:
    """Agent versions, capabilities and instances in SQL (SQLite or PostgreSQL).

    Args:
        url: SQLAlchemy URL, e.g. ``sqlite:////abs/path/signalbox.db`` (the
            parent folder is created) or ``postgresql+psycopg://u:p@host/db``.

    Raises:
        ConfigError: the URL names another kind of database.

    Times (``now``, ``since``) are Unix seconds supplied by the caller, so the
    service decides the clock and tests can move it. ``stale_after`` and
    ``down_after`` are seconds since the last heartbeat after which an agent
    version is stale, then down.
    """

    def __init__(self, url: str) -> None:
        backend = make_url(url).get_backend_name()
        if backend not in ("sqlite", "postgresql"):
            raise ConfigError(
                f"unsupported database {backend!r} in the registry's database URL; use "
                "sqlite:///<path> or postgresql+psycopg://user:password@host/db",
                details={"backend": backend},
            )
        self._engine = make_engine(url)
        self._writer = self._engine.execution_options(sb_write=True)
        self._postgres = self._engine.dialect.name == "postgresql"
        dialect_insert = postgresql.insert if self._postgres else sqlite.insert
        upsert = dialect_insert(_I)
        self._upsert_instance = upsert.on_conflict_do_update(
            index_elements=[_I.c.agent_id, _I.c.instance],
            set_={"last_heartbeat": upsert.excluded.last_heartbeat, "stats": upsert.excluded.stats},
        )
        # A batched heartbeat of an instance: the version is looked up by name
        # and version in the same statement (nothing is written if it is gone),
        # and an older beat never overwrites a newer one.
        beat = dialect_insert(_I).from_select(
            ["agent_id", "instance", "name", "version", "last_heartbeat", "stats"],
            select(
                _V.c.id,
                bindparam("p_instance", type_=String),
                _V.c.name,
                _V.c.version,
                bindparam("p_now", type_=Float),
                bindparam("p_stats", type_=Text),
            ).where(_V.c.name == bindparam("p_name"), _V.c.version == bindparam("p_version")),
        )
        upsert_beat = beat.on_conflict_do_update(
            index_elements=[_I.c.agent_id, _I.c.instance],
            set_={"last_heartbeat": beat.excluded.last_heartbeat, "stats": beat.excluded.stats},
            where=beat.excluded.last_heartbeat >= _I.c.last_heartbeat,
        )
        self._beat_later_sql = self._driver_sql(BEAT_LATER)
        self._upsert_beat_sql = self._driver_sql(upsert_beat)

    def _driver_sql(self, statement: Any) -> tuple[str, tuple[str, ...] | None]:
        """``statement`` compiled once for this database: SQL text and, for drivers
        taking positional parameters, the order of the parameter names."""
        compiled = statement.compile(dialect=self._engine.dialect)
        order = compiled.positiontup if self._engine.dialect.positional else None
        return compiled.string, None if order is None else tuple(order)

    # -- lifecycle -----------------------------------------------------------------------

    @property
    def engine(self) -> Engine:
        """The store's engine (other tables in the same database share it)."""
        return self._engine

    def create_schema(self) -> None:
        """Create the tables and indexes that do not exist yet (idempotent).

        There are no migrations yet: an existing table is left as it is.
        """
        with self._writer.begin() as conn:
            if self._postgres:
                # Two registries starting together would otherwise race on
                # PostgreSQL's catalog (duplicate type/relation errors).
                conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _SCHEMA_LOCK})
            SQLModel.metadata.create_all(conn, tables=list(TABLES))

    def close(self) -> None:
        """Close every pooled connection."""
        self._engine.dispose()

    # -- writes --------------------------------------------------------------------------

    def register(self, manifest: AgentManifest, *, now: float) -> tuple[AgentRecord, bool]:
        """Register one agent version, in a single transaction.

        A name belongs to its first owner. Re-registering an identical
        manifest only refreshes the heartbeat time; a changed manifest for an
        existing version replaces it in place (capabilities and tags too).
        Registering counts as a heartbeat.

        Args:
            manifest: The agent version to register.
            now: Current time; becomes ``last_heartbeat`` (and ``registered_at``
                unless the manifest is unchanged).

        Returns:
            The stored record (health ``healthy``; ``instances`` counts every
            instance known for the version) and whether the version is new.

        Raises:
            SchemaError: the manifest breaks a schema constraint (``details['path']``).
            InvalidInput: the version is not semver or is too long, or a
                capability name is repeated (``details['path']``).
            Conflict: the name is owned by another owner.
        """
        now = float(now)
        manifest, stored_json, version = prepared_manifest(manifest)

        def attempt(conn: Connection) -> tuple[AgentRecord, bool]:
            return write_version(conn, manifest, stored_json, version, now)

        return self._write(attempt, manifest.name)

    def register_and_read(
        self, manifest: AgentManifest, *, now: float, bound: bool = False
    ) -> Registration:
        """:meth:`register`, also returning every version of the name as the write left them.

        Read inside the write transaction, so it is exactly the state the
        write committed (what the registry's in-memory index needs, without
        another round trip).

        Args:
            manifest: The agent version to register.
            now: Current time.
            bound: Apply the agent's binding (``agent_bindings``), read and
                locked in the same transaction, so a concurrent binding change
                is either seen or rewrites this version after it. An agent
                with no binding (never enrolled) keeps the declared values.

        Raises:
            AttributeMismatch: ``bound`` and the manifest declares another
                value than the binding (nothing is written).
            Conflict: the name is owned by another owner.
        """
        now = float(now)
        declared, declared_json, declared_version = prepared_manifest(manifest)

        def attempt(conn: Connection) -> Registration:
            manifest, stored_json, version = declared, declared_json, declared_version
            binding = read_binding(conn, manifest.name, lock=True) if bound else None
            if binding is not None:
                applied = apply_binding(manifest, binding)
                if applied != manifest:
                    manifest, stored_json, version = prepared_manifest(applied)
            row = conn.execute(
                PREVIOUS_MANIFEST, {"p_name": manifest.name, "p_version": manifest.version}
            ).first()
            record, created = write_version(conn, manifest, stored_json, version, now)
            return Registration(
                record=record,
                created=created,
                versions=read_versions(conn, [manifest.name], NO_CUTOFF),
                previous=decoded_manifest(row.manifest) if row is not None else None,
            )

        return self._write(attempt, manifest.name)

    def binding(self, name: str) -> AgentBinding | None:
        """``name``'s bound attributes (None: never enrolled nor bound)."""
        with self._engine.connect() as conn:
            return read_binding(conn, name)

    def bind_and_read(self, name: str, changes: dict[str, Any], *, by: str, now: float) -> Rebound:
        """Change ``name``'s binding and rewrite its registered versions with it, in one
        transaction (the binding row is locked, as registrations lock it).

        Rewritten versions get ``registered_at = now``: readers that cache per
        registration (the policy service's Cedar entities) see a new record.

        Args:
            name: The agent.
            changes: Attributes to set (:func:`services.registry.binding.binding_changes`);
                the others keep their bound value.
            by: Who changes it (audit actor).
            now: Current time.
        """
        now = float(now)

        def attempt(conn: Connection) -> Rebound:
            before = read_binding(conn, name, lock=True)
            after = updated_binding(before, name, changes, by=by, now=now)
            write_binding(conn, after)
            claim = conn.execute(NAME_CLAIM, {"p_name": name}).first()
            rewritten = 0
            if claim is not None:
                for row in conn.execute(VERSION_MANIFESTS, {"p_name": name}).all():
                    old = decoded_manifest(row.manifest)
                    new = impose_binding(old, after)
                    if new == old:
                        continue
                    search = {"team": new.team, "owner": new.owner, "region": new.region}
                    conn.execute(
                        update(_V)
                        .where(_V.c.id == row.id)
                        .values(
                            **search, project=new.project, manifest=encode(new).decode(),
                            registered_at=now,
                        )
                    )  # fmt: skip
                    conn.execute(update(_C).where(_C.c.agent_id == row.id).values(**search))
                    conn.execute(update(_T).where(_T.c.agent_id == row.id).values(**search))
                    rewritten += 1
                if claim.owner != after.owner:
                    conn.execute(update(_N).where(_N.c.name == name).values(owner=after.owner))
            return Rebound(before, after, rewritten, read_versions(conn, [name], NO_CUTOFF))

        return self._write(attempt, name)

    def heartbeat(
        self, hb: Heartbeat, *, now: float, stale_after: float | None = None
    ) -> AgentRecord:
        """Record a heartbeat of one instance of a registered agent version.

        Args:
            hb: The heartbeat (name, version, instance id, stats).
            now: Current time; becomes the version's and the instance's ``last_heartbeat``.
            stale_after: When given, ``instances`` in the result counts the
                instances seen within it; otherwise every known instance.

        Returns:
            The version's record (health ``healthy``, as it just beat).

        Raises:
            NotFound: that name and version are not registered (the agent must register again).
        """
        now = float(now)
        stats = encode(hb.stats).decode()
        since = NO_CUTOFF if stale_after is None else now - stale_after

        def attempt(conn: Connection) -> AgentRecord:
            row = conn.execute(
                BEAT_VERSION, {"p_name": hb.name, "p_version": hb.version, "p_now": now}
            ).first()
            if row is None:
                raise heartbeat_not_found(hb.name, hb.version)
            conn.execute(
                self._upsert_instance,
                {
                    "agent_id": row.id,
                    "instance": hb.instance,
                    "name": hb.name,
                    "version": hb.version,
                    "last_heartbeat": now,
                    "stats": stats,
                },
            )
            return AgentRecord(
                manifest=decoded_manifest(row.manifest),
                registered_at=float(row.registered_at),
                last_heartbeat=now,
                health="healthy",
                instances=live_instances(conn, row.id, since),
            )

        return self._write(attempt, hb.name)

    def deregister(self, name: str, version: str | None = None) -> list[AgentRecord]:
        """Remove one version of an agent, or all of them (with capabilities, tags, instances).

        Removing the last version releases the name: another owner may then claim it.

        Args:
            name: Agent name.
            version: The version to remove; ``None`` removes every version.

        Returns:
            The removed records (highest version first), with status ``deregistered``.

        Raises:
            NotFound: nothing matched.
        """

        return self._write(lambda conn: remove_versions(conn, name, version), name)

    def deregister_and_read(
        self, name: str, version: str | None = None
    ) -> tuple[list[AgentRecord], list[StoredVersion]]:
        """:meth:`deregister`, also returning the versions of ``name`` left (read in the write)."""

        def attempt(conn: Connection) -> tuple[list[AgentRecord], list[StoredVersion]]:
            removed = remove_versions(conn, name, version)
            return removed, read_versions(conn, [name], NO_CUTOFF)

        return self._write(attempt, name)

    def leave(self, name: str, version: str, instance: str) -> list[StoredVersion]:
        """Forget one instance of a version (it shut down); returns the versions of ``name``."""
        return self._write(lambda conn: leave_instance(conn, name, version, instance), name)

    def record_heartbeats(self, beats: Sequence[AgentInstance]) -> None:
        """Write a batch of heartbeats in one transaction (the registry's heartbeat flush).

        Each beat sets its instance's heartbeat time and stats and its
        version's ``last_heartbeat``, unless the store already holds a later
        time (beats may arrive out of order from several replicas). Beats of
        versions that are no longer registered are skipped.

        Args:
            beats: At most one per (name, version, instance) is useful; the
                latest of several wins either way.
        """
        if not beats:
            return
        latest: dict[tuple[str, str], float] = {}
        for b in beats:
            key = (b.name, b.version)
            latest[key] = max(float(b.last_heartbeat), latest.get(key, NO_CUTOFF))
        versions = [{"p_name": n, "p_version": v, "p_now": t} for (n, v), t in latest.items()]
        instances = [
            {
                "p_name": b.name,
                "p_version": b.version,
                "p_instance": b.instance,
                "p_now": float(b.last_heartbeat),
                "p_stats": encode(b.stats).decode(),
            }
            for b in beats
        ]
        with self._writer.begin() as conn:
            # Straight to the driver's executemany: SQLAlchemy's per-row
            # parameter processing would hold the GIL for about half the
            # flush, stalling the event loop of the registry meanwhile.
            for (sql, order), rows in ((self._beat_later_sql, versions),
                                       (self._upsert_beat_sql, instances)):  # fmt: skip
                params = rows if order is None else [tuple(r[k] for k in order) for r in rows]
                conn.exec_driver_sql(sql, params)

    def prune_instances(self, *, before: float) -> int:
        """Forget instances whose last heartbeat is older than ``before``; returns how many."""
        with self._writer.begin() as conn:
            return conn.execute(delete(_I).where(_I.c.last_heartbeat < before)).rowcount

    # -- reads ---------------------------------------------------------------------------

    def get(
        self,
        name: str,
        version: str | None = None,
        *,
        now: float,
        stale_after: float,
        down_after: float,
    ) -> AgentRecord:
        """One agent version, with its health at ``now``.

        Args:
            name: Agent name.
            version: Exact version; ``None`` picks the highest by semver
                precedence (a prerelease is lower than its release).
            now: Current time.
            stale_after: Seconds without heartbeat after which it is stale.
            down_after: Seconds without heartbeat after which it is down.

        Raises:
            NotFound: no such agent or version (the message lists the registered versions).
        """
        cutoffs = Cutoffs(now, stale_after, down_after)
        params = {"p_name": name, "p_version": version, "p_stale": cutoffs.stale}
        with self._engine.connect() as conn:
            row = conn.execute(LATEST_VERSION if version is None else ONE_VERSION, params).first()
            if row is None:
                raise missing(conn, name, version)
        return to_record(row, cutoffs)

    def latest(self, name: str) -> AgentRecord | None:
        """The highest registered version of ``name``, or None (health ``down``, as in KV)."""
        with self._engine.connect() as conn:
            row = conn.execute(LATEST_VERSION, {"p_name": name, "p_stale": NO_CUTOFF}).first()
        return None if row is None else to_record(row, None)

    def instances(self, name: str | None = None, *, since: float) -> list[AgentInstance]:
        """Instances that sent a heartbeat at or after ``since``, by name, version, instance.

        Args:
            name: Only instances of this agent (any version).
            since: Oldest heartbeat time to include.
        """
        query = select(
            _I.c.name, _I.c.version, _I.c.instance, _I.c.last_heartbeat, _I.c.stats
        ).where(_I.c.last_heartbeat >= since)
        if name is not None:
            query = query.where(_I.c.name == name)
        query = query.order_by(_I.c.name, _I.c.version, _I.c.instance)
        with self._engine.connect() as conn:
            rows = conn.execute(query).all()
        return [
            AgentInstance(
                name=r.name,
                version=r.version,
                instance=r.instance,
                last_heartbeat=float(r.last_heartbeat),
                stats=decode(r.stats.encode(), InstanceStats),
            )
            for r in rows
        ]

    def snapshot(
        self, names: Sequence[str] | None = None, *, since: float = NO_CUTOFF
    ) -> list[StoredVersion]:
        """Every version of ``names`` (all names when None), read in one transaction.

        Args:
            names: Agent names to read; names with no version are simply absent.
            since: Only instances that sent a heartbeat at or after this time.

        Returns:
            The versions ordered by name (bytewise), then highest version first.
        """
        if names is not None and not names:
            return []
        conn_ = self._engine.connect()
        if self._postgres:
            # One snapshot for both statements (READ COMMITTED takes one per statement).
            conn_ = conn_.execution_options(isolation_level="REPEATABLE READ")
        with conn_ as conn:
            return read_versions(conn, names, since)

    def names(self) -> list[str]:
        """Every registered agent name, bytewise ascending."""
        with self._engine.connect() as conn:
            return [n for (n,) in conn.execute(select(_N.c.name).order_by(_N.c.name))]

    def count(self) -> int:
        """Number of registered agent versions (all names, all versions)."""
        with self._engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(_V)).scalar_one())

    def discover(
        self,
        q: DiscoverAgents,
        *,
        now: float,
        stale_after: float,
        down_after: float,
    ) -> DiscoverResult:
        """One page of the agent versions matching every filter of ``q``
        (:func:`services.registry.discovery.discover`, which says how filters combine).

        Raises:
            InvalidInput: invalid ``versions`` range or ``cursor`` (``details['field']``).
        """
        return discover(self._engine, q, now=now, stale_after=stale_after, down_after=down_after)

    # -- helpers -------------------------------------------------------------------------

    def _write(self, attempt: Callable[[Connection], T], name: str) -> T:
        """Run ``attempt`` in a write transaction, again if it lost a race on a unique key."""
        for _ in range(_WRITE_ATTEMPTS - 1):
            try:
                with self._writer.begin() as conn:
                    return attempt(conn)
            except IntegrityError:
                continue  # rolled back; the next attempt sees the winner's rows
        try:
            with self._writer.begin() as conn:
                return attempt(conn)
        except IntegrityError as exc:
            raise Conflict(
                f"agent {name!r} was changed concurrently; retry the request",
                details={"name": name},
            ) from exc
