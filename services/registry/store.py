"""The registry's SQL source of truth: agent versions, capabilities, tags, instances.

Tables are SQLModel classes (never on the wire; the wire types live in
:mod:`schemas`). The same code runs on SQLite (the default, a file under the
data dir) and PostgreSQL (``postgresql+psycopg://...``). Every method is
synchronous; the registry service calls them through :func:`asyncio.to_thread`,
and one :class:`AgentStore` is safe to use from many threads at once.

Layout::

    registry_agent_names     name -> owner: the claim that makes a name belong
                             to its first owner (its primary key is what stops
                             two owners from registering one name concurrently)
    registry_agent_versions  one row per (name, version): searchable columns,
                             the msgspec-encoded manifest, heartbeat time,
                             semver columns and the ``rank`` sort key
    registry_capabilities    one row per capability of a version
    registry_capability_tags one row per tag of a capability of a version
    registry_instances       (version, instance id): heartbeat time, stats
    agent_bindings           (defined in services.registry.credentials) the
                             attributes operators bind to an agent; applied to
                             its manifests by register(..., bound=True) and
                             bind_and_read, in the transaction that writes them

Ordering. ``rank`` is a text key whose ascending bytewise order is *descending*
semver precedence (release above its prereleases, numeric identifiers compared
as numbers...), the version text breaking ties, so "highest version first" is
an ascending index scan and "highest version per name" is ``min(rank)``. Text
columns that are ordered or compared use the ``C`` collation on PostgreSQL, so
"name ascending" is the same bytewise order on both backends and in Python.

Discovery speed. The capability and tag tables repeat the immutable,
searchable columns of their version (agent name, rank, version, team, owner,
region) and are clustered on ``(capability|tag, agent, rank)`` (``WITHOUT
ROWID`` on SQLite), with ``(capability|tag, team|owner|region, agent, rank)``
indexes: a query by capability or tag, plus one of team/owner/region, counts
and pages through one contiguous index range and reads version rows only for
the page. Queries on the version table alone use covering ``(team|owner|region,
name, rank, last_heartbeat)`` indexes; keeping ``last_heartbeat`` in them makes
a heartbeat update four index entries instead of one, which is what lets
"region X, healthy" avoid reading thousands of rows. SQL statements are built
once per query shape with bound parameters, as SQLAlchemy's compile overhead
would otherwise cost more than the query.
"""

from __future__ import annotations

import base64
import binascii
import functools
from collections.abc import Callable, Sequence
from typing import Any, Final, NamedTuple, TypeVar

import msgspec
import semantic_version  # type: ignore[import-untyped]  # ships no type hints
from sqlalchemy import (
    BigInteger,
    BindParameter,
    ColumnElement,
    Float,
    Index,
    Select,
    String,
    Text,
    UniqueConstraint,
    and_,
    bindparam,
    delete,
    func,
    insert,
    select,
    text,
    tuple_,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.exc import IntegrityError
from sqlmodel import Field, SQLModel

from broker.codec import decode, encode
from broker.errors import ConfigError, Conflict, InvalidInput, NotFound
from broker.runtime.sql import make_engine, table_of
from schemas import (
    AgentBinding,
    AgentInstance,
    AgentManifest,
    AgentRecord,
    DiscoverAgents,
    DiscoverResult,
    Health,
    Heartbeat,
    InstanceStats,
)
from services.registry.binding import apply_binding, impose_binding, updated_binding
from services.registry.credentials import BINDINGS, read_binding, write_binding

__all__ = [
    "MAX_VERSION_LENGTH",
    "AgentNameRow",
    "AgentStore",
    "AgentVersionRow",
    "CapabilityRow",
    "CapabilityTagRow",
    "Cutoffs",
    "InstanceRow",
    "Rebound",
    "Registration",
    "StoredVersion",
    "check_range",
    "decode_cursor",
    "encode_cursor",
    "heartbeat_not_found",
    "in_range",
    "not_found",
    "version_rank",
]

T = TypeVar("T")

#: Longest version string accepted: the semver columns are 64-bit integers and
#: the rank key is indexed, so unbounded versions are refused up front.
MAX_VERSION_LENGTH: Final = 128

# Bytewise-ordered text on PostgreSQL (its default collation ignores
# punctuation and case at first level); SQLite's default BINARY already is.
_Token = String(64).with_variant(String(64, collation="C"), "postgresql")
_VersionText = String(MAX_VERSION_LENGTH).with_variant(
    String(MAX_VERSION_LENGTH, collation="C"), "postgresql"
)
_RankText = Text().with_variant(Text(collation="C"), "postgresql")
_Short = String(256)
_ShortKey = _Short.with_variant(String(256, collation="C"), "postgresql")


class AgentNameRow(SQLModel, table=True):
    """Who owns an agent name: claimed by the first registration, released with the last version."""

    __tablename__ = "registry_agent_names"

    name: str = Field(primary_key=True, sa_type=_Token)
    owner: str = Field(sa_type=_Short)
    claimed_at: float = Field(sa_type=Float)


class AgentVersionRow(SQLModel, table=True):
    """One registered version of an agent."""

    __tablename__ = "registry_agent_versions"
    __table_args__ = (
        UniqueConstraint("name", "version", name="uq_registry_agent_versions_name_version"),
        Index("ix_registry_agent_versions_name_rank", "name", "rank"),
        # Covering indexes for the filters on the version table itself: a
        # search walks one of them in name order, reading no table rows
        # (health included, at the cost of heartbeats updating them).
        *(
            Index(f"ix_registry_agent_versions_{column}", column, "name", "rank", "last_heartbeat")
            for column in ("team", "owner", "region")
        ),
    )

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(sa_type=_Token, foreign_key="registry_agent_names.name", ondelete="RESTRICT")
    version: str = Field(sa_type=_VersionText)
    owner: str = Field(sa_type=_Short)
    team: str = Field(sa_type=_Short)
    project: str = Field(sa_type=_Short, default="")
    region: str = Field(sa_type=_Short, default="")
    description: str = Field(sa_type=Text, default="")
    #: The msgspec JSON of the :class:`~schemas.AgentManifest`, the record's source.
    manifest: str = Field(sa_type=Text)
    registered_at: float = Field(sa_type=Float)
    last_heartbeat: float = Field(sa_type=Float, index=True)
    major: int = Field(sa_type=BigInteger)
    minor: int = Field(sa_type=BigInteger)
    patch: int = Field(sa_type=BigInteger)
    #: Dot-joined prerelease identifiers; empty for a release.
    prerelease: str = Field(sa_type=_VersionText, default="")
    #: Ascending order = descending semver precedence (see the module docstring).
    rank: str = Field(sa_type=_RankText)


class CapabilityRow(SQLModel, table=True):
    """A capability offered by one agent version (with that version's search columns)."""

    __tablename__ = "registry_capabilities"
    __table_args__ = (
        *(
            Index(f"ix_registry_capabilities_{column}", "name", column, "agent", "rank")
            for column in ("team", "owner", "region")
        ),
        {"sqlite_with_rowid": False},
    )

    name: str = Field(primary_key=True, sa_type=_Token)
    agent: str = Field(primary_key=True, sa_type=_Token)
    rank: str = Field(primary_key=True, sa_type=_RankText)
    agent_id: int = Field(foreign_key="registry_agent_versions.id", ondelete="CASCADE", index=True)
    version: str = Field(sa_type=_VersionText)
    team: str = Field(sa_type=_Short)
    owner: str = Field(sa_type=_Short)
    region: str = Field(sa_type=_Short)


class CapabilityTagRow(SQLModel, table=True):
    """A tag (``pii``, ``pci-dss``...) on one capability of one agent version."""

    __tablename__ = "registry_capability_tags"
    __table_args__ = (
        *(
            Index(f"ix_registry_capability_tags_{column}", "tag", column, "agent", "rank")
            for column in ("team", "owner", "region")
        ),
        {"sqlite_with_rowid": False},
    )

    tag: str = Field(primary_key=True, sa_type=_ShortKey)
    agent: str = Field(primary_key=True, sa_type=_Token)
    rank: str = Field(primary_key=True, sa_type=_RankText)
    capability: str = Field(primary_key=True, sa_type=_Token)
    agent_id: int = Field(foreign_key="registry_agent_versions.id", ondelete="CASCADE", index=True)
    version: str = Field(sa_type=_VersionText)
    team: str = Field(sa_type=_Short)
    owner: str = Field(sa_type=_Short)
    region: str = Field(sa_type=_Short)


class InstanceRow(SQLModel, table=True):
    """A running instance of an agent version, as last reported by its heartbeat."""

    __tablename__ = "registry_instances"
    __table_args__ = (Index("ix_registry_instances_name_version", "name", "version"),)

    agent_id: int = Field(
        primary_key=True, foreign_key="registry_agent_versions.id", ondelete="CASCADE"
    )
    instance: str = Field(primary_key=True, sa_type=_Token)
    name: str = Field(sa_type=_Token)
    version: str = Field(sa_type=_VersionText)
    last_heartbeat: float = Field(sa_type=Float, index=True)
    #: The msgspec JSON of the instance's :class:`~schemas.InstanceStats`.
    stats: str = Field(sa_type=Text)


_N = table_of(AgentNameRow)
_V = table_of(AgentVersionRow)
_C = table_of(CapabilityRow)
_T = table_of(CapabilityTagRow)
_I = table_of(InstanceRow)
_TABLES: Final = (_N, _V, _C, _T, _I, BINDINGS)

#: Attempts at a write that lost a race on a unique key before giving up.
_WRITE_ATTEMPTS: Final = 3
#: Key of the PostgreSQL advisory lock that serializes concurrent create_schema calls.
_SCHEMA_LOCK: Final = 0x5B0A6E15
#: Decoded manifests by their JSON text: a page of discovery results mostly
#: repeats manifests already seen, and decoding dominates building a record.
_MANIFEST_CACHE_SIZE: Final = 16384
_NO_CUTOFF: Final = float("-inf")


# -- semver ------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4096)
def _parse_version(version: str) -> semantic_version.Version:
    return semantic_version.Version(version)


@functools.lru_cache(maxsize=256)
def _parse_range(spec: str) -> semantic_version.NpmSpec:
    return semantic_version.NpmSpec(spec)


@functools.lru_cache(maxsize=65536)
def in_range(spec: str, version: str) -> bool:
    """True if ``version`` satisfies the npm range ``spec`` (validate it with check_range)."""
    # Matching costs microseconds and a fleet repeats the same few versions.
    return bool(_parse_range(spec).match(_parse_version(version)))


def check_range(spec: str) -> None:
    """Refuse an invalid npm-style version range.

    Raises:
        InvalidInput: ``spec`` does not parse (``details['field'] == 'versions'``).
    """
    try:
        _parse_range(spec)
    except ValueError as exc:
        raise InvalidInput(
            f"invalid version range {spec!r}: {exc}; use npm syntax such as "
            "'^1.2', '>=1.0.0 <2.0.0' or '1.x'",
            details={"field": "versions"},
        ) from exc


def _put_number(out: bytearray, number: int) -> None:
    # Length-prefixed digits order like the numbers (semver has no leading zeros).
    digits = str(number).encode("ascii")
    out.append(len(digits))
    out += digits


_INVERT: Final = bytes(range(255, -1, -1))


@functools.lru_cache(maxsize=4096)
def version_rank(version: str) -> str:
    """The sort key of ``version``: ascending = highest semver precedence first.

    The byte string built here orders like semver precedence, then like the
    version text (which only separates versions differing in build metadata).
    It is prefix-free (numbers are length-prefixed, identifiers and the text
    terminated), so two keys differ at some byte, and inverting every byte
    exactly reverses their order.
    """
    parsed = _parse_version(version)
    out = bytearray()
    for number in (parsed.major, parsed.minor, parsed.patch):
        _put_number(out, number)
    if parsed.prerelease:
        out.append(1)  # a prerelease sorts below its release (3)
        for ident in parsed.prerelease:
            if ident.isdigit():
                out.append(1)  # numeric identifiers sort below alphanumeric ones (2)
                _put_number(out, int(ident))
            else:
                out.append(2)
                out += ident.encode("ascii")
                out.append(0)
        out.append(0)  # fewer identifiers sort first when the rest are equal
    else:
        out.append(3)
    out += version.encode("ascii")
    out.append(0)
    return bytes(out).translate(_INVERT).hex()


# -- records -----------------------------------------------------------------------------


@functools.lru_cache(maxsize=_MANIFEST_CACHE_SIZE)
def _manifest(text_: str) -> AgentManifest:
    # Keyed by the JSON itself, so a cached entry can never be stale.
    return decode(text_.encode(), AgentManifest)


@functools.lru_cache(maxsize=_MANIFEST_CACHE_SIZE)
def _stats(text_: str) -> InstanceStats:
    return decode(text_.encode(), InstanceStats)


class Cutoffs:
    """Heartbeat times separating healthy, stale and down at one instant."""

    __slots__ = ("down", "stale")

    def __init__(self, now: float, stale_after: float, down_after: float) -> None:
        self.stale = now - stale_after
        self.down = now - down_after

    def health(self, last_heartbeat: float) -> Health:
        """Health of a version whose last heartbeat was at ``last_heartbeat``."""
        # The same comparisons as _health_condition, so filters and labels agree.
        if last_heartbeat >= self.stale:
            return "healthy"
        if last_heartbeat >= self.down:
            return "stale"
        return "down"


def _health_condition(health: Health) -> ColumnElement[bool]:
    lh = _V.c.last_heartbeat
    if health == "healthy":
        return lh >= bindparam("p_stale")
    if health == "stale":
        return and_(lh < bindparam("p_stale"), lh >= bindparam("p_down"))
    return lh < bindparam("p_down")


#: What a record is built from; ``live`` counts instances seen since ``p_stale``.
_RECORD_COLUMNS: Final = (
    _V.c.id,
    _V.c.name,
    _V.c.version,
    _V.c.manifest,
    _V.c.registered_at,
    _V.c.last_heartbeat,
    select(func.count())
    .where(_I.c.agent_id == _V.c.id, _I.c.last_heartbeat >= bindparam("p_stale"))
    .scalar_subquery()
    .label("live"),
)


def _to_record(row: Any, cutoffs: Cutoffs | None) -> AgentRecord:
    # Unpacked rather than read by attribute: a Row attribute costs ~10x more.
    _id, _name, _version, manifest, registered_at, last_heartbeat, live = row
    return AgentRecord(
        manifest=_manifest(manifest),
        # float(): SQLite hands back whole-number REALs as int.
        registered_at=float(registered_at),
        last_heartbeat=float(last_heartbeat),
        health=cutoffs.health(last_heartbeat) if cutoffs is not None else "down",
        instances=live,
    )


# -- statements of fixed shape (built once) ----------------------------------------------

_CLAIM: Final = select(_N.c.owner).where(_N.c.name == bindparam("p_name")).with_for_update()
_LOCK_NAME: Final = select(_N.c.name).where(_N.c.name == bindparam("p_name")).with_for_update()
_EXISTING: Final = select(_V.c.id, _V.c.manifest, _V.c.registered_at).where(
    _V.c.name == bindparam("p_name"), _V.c.version == bindparam("p_version")
)
_TOUCH: Final = (
    update(_V).where(_V.c.id == bindparam("p_id")).values(last_heartbeat=bindparam("p_now"))
)
_BEAT: Final = (
    update(_V)
    .where(_V.c.name == bindparam("p_name"), _V.c.version == bindparam("p_version"))
    .values(last_heartbeat=bindparam("p_now"))
    .returning(_V.c.id, _V.c.manifest, _V.c.registered_at)
)
_LIVE: Final = (
    select(func.count())
    .select_from(_I)
    .where(_I.c.agent_id == bindparam("p_id"), _I.c.last_heartbeat >= bindparam("p_stale"))
)
_LATEST: Final = (
    select(*_RECORD_COLUMNS).where(_V.c.name == bindparam("p_name")).order_by(_V.c.rank).limit(1)
)
_ONE_VERSION: Final = select(*_RECORD_COLUMNS).where(
    _V.c.name == bindparam("p_name"), _V.c.version == bindparam("p_version")
)
_ALL_VERSIONS: Final = (
    select(*_RECORD_COLUMNS).where(_V.c.name == bindparam("p_name")).order_by(_V.c.rank)
)
_VERSION_LIST: Final = (
    select(_V.c.version).where(_V.c.name == bindparam("p_name")).order_by(_V.c.rank)
)
_ANY_VERSION: Final = select(_V.c.id).where(_V.c.name == bindparam("p_name")).limit(1)
#: The manifest a registration follows: the same version's, else the highest version's.
_PREVIOUS: Final = (
    select(_V.c.manifest)
    .where(_V.c.name == bindparam("p_name"))
    .order_by((_V.c.version != bindparam("p_version")), _V.c.rank)
    .limit(1)
)
_VERSION_MANIFESTS: Final = select(_V.c.id, _V.c.manifest).where(_V.c.name == bindparam("p_name"))
#: A batched heartbeat: never moves a version's heartbeat time backwards.
_BEAT_LATER: Final = (
    update(_V)
    .where(
        _V.c.name == bindparam("p_name"),
        _V.c.version == bindparam("p_version"),
        _V.c.last_heartbeat < bindparam("p_now"),
    )
    .values(last_heartbeat=bindparam("p_now"))
)
_SNAPSHOT_VERSIONS: Final = select(
    _V.c.id, _V.c.name, _V.c.manifest, _V.c.registered_at, _V.c.last_heartbeat
).order_by(_V.c.name, _V.c.rank)
_SNAPSHOT_INSTANCES: Final = select(
    _I.c.agent_id, _I.c.name, _I.c.version, _I.c.instance, _I.c.last_heartbeat, _I.c.stats
).where(_I.c.last_heartbeat >= bindparam("p_since"))
_NAMES_IN: Final[BindParameter[Any]] = bindparam("p_names", expanding=True)
#: (versions, instances) statements of a snapshot: of every name, of some, of one.
_SNAPSHOT_ALL: Final = (_SNAPSHOT_VERSIONS, _SNAPSHOT_INSTANCES)
_SNAPSHOT_SOME: Final = (
    _SNAPSHOT_VERSIONS.where(_V.c.name.in_(_NAMES_IN)),
    _SNAPSHOT_INSTANCES.where(_I.c.name.in_(_NAMES_IN)),
)
_SNAPSHOT_ONE: Final = (
    _SNAPSHOT_VERSIONS.where(_V.c.name == bindparam("p_name")),
    _SNAPSHOT_INSTANCES.where(_I.c.name == bindparam("p_name")),
)
_BY_IDS: Final = select(*_RECORD_COLUMNS).where(_V.c.id.in_(bindparam("p_ids", expanding=True)))
_INSERT_VERSION: Final = insert(_V).returning(_V.c.id)


# -- discovery statements (built once per query shape) -----------------------------------


class _Shape(NamedTuple):
    """Which parts a discovery query has; one set of SQL statements per shape."""

    driver: str  # "capability", "tag" or "version": the table the search walks
    name: bool
    team: bool
    owner: bool
    region: bool
    tag: bool  # a tag filter besides a capability one
    health: Health | None
    all_versions: bool
    after: bool  # a cursor


class _Statements(NamedTuple):
    total: Select[Any]
    page: Select[Any]  # record rows of one page (SQL-only path)
    keys: Select[Any]  # (id, agent, rank, version) of every match, in order (range path)


@functools.lru_cache(maxsize=1024)
def _statements(shape: _Shape) -> _Statements:
    if shape.driver == "capability":
        d, base = _C, [_C.c.name == bindparam("p_capability")]
        agent, agent_id = _C.c.agent, _C.c.agent_id
    elif shape.driver == "tag":
        d, base = _T, [_T.c.tag == bindparam("p_tag")]
        agent, agent_id = _T.c.agent, _T.c.agent_id
    else:
        d, base = _V, []
        agent, agent_id = _V.c.name, _V.c.id
    rank, version = d.c.rank, d.c.version
    conditions: list[ColumnElement[bool]] = list(base)
    if shape.name:
        conditions.append(agent == bindparam("p_name"))
    if shape.team:
        conditions.append(d.c.team == bindparam("p_team"))
    if shape.owner:
        conditions.append(d.c.owner == bindparam("p_owner"))
    if shape.region:
        conditions.append(d.c.region == bindparam("p_region"))
    if shape.tag:
        conditions.append(agent_id.in_(select(_T.c.agent_id).where(_T.c.tag == bindparam("p_tag"))))
    source: Any = d
    if shape.health is not None:
        conditions.append(_health_condition(shape.health))
        if d is not _V:
            source = d.join(_V, _V.c.id == agent_id)

    # The tag table has a row per tagged capability, so a version may appear
    # on several rows there; the capability and version tables hold at most
    # one row per version for any one query.
    unique_rows = d is not _T
    per_name = not shape.all_versions
    total: Select[Any]
    if per_name and not conditions:
        # Every claimed name has at least one version (the last one releases it).
        total = select(func.count()).select_from(_N)
    elif per_name:
        total = select(func.count(func.distinct(agent))).select_from(source).where(*conditions)
    else:
        counted = func.count() if unique_rows else func.count(func.distinct(agent_id))
        total = select(counted).select_from(source).where(*conditions)

    page_conditions = list(conditions)
    if shape.after and per_name:
        page_conditions.append(agent > bindparam("p_after_agent"))
    elif shape.after:
        page_conditions.append(
            tuple_(agent, rank) > tuple_(bindparam("p_after_agent"), bindparam("p_after_rank"))
        )
    best = select(agent.label("agent"), (func.min(rank) if per_name else rank).label("rank"))
    best = best.select_from(source).where(*page_conditions)
    if per_name:
        best = best.group_by(agent).order_by(agent)
    else:
        best = (best if unique_rows else best.distinct()).order_by(agent, rank)
    best_sq = best.limit(bindparam("p_limit")).subquery()
    page = (
        select(*_RECORD_COLUMNS)
        .join_from(_V, best_sq, and_(_V.c.name == best_sq.c.agent, _V.c.rank == best_sq.c.rank))
        .order_by(_V.c.name, _V.c.rank)
    )
    if unique_rows:
        keys = select(agent_id, agent, rank, version).select_from(source).where(*conditions)
    else:
        keys = (
            select(func.min(agent_id), agent, rank, func.min(version))
            .select_from(source)
            .where(*conditions)
            .group_by(agent, rank)
        )
    keys = keys.order_by(agent, rank)
    return _Statements(total=total, page=page, keys=keys)


# -- cursors -----------------------------------------------------------------------------


def encode_cursor(name: str, version: str) -> str:
    """The opaque pagination cursor of a page that ended on ``name`` ``version``."""
    return base64.urlsafe_b64encode(encode([name, version])).decode("ascii")


def decode_cursor(cursor: str) -> tuple[str, str]:
    """The (agent name, rank) the previous page ended on.

    Raises:
        InvalidInput: not a cursor this registry made (``details['field'] == 'cursor'``).
    """
    try:
        name, version = msgspec.json.decode(
            base64.urlsafe_b64decode(cursor.encode("ascii")), type=tuple[str, str]
        )
        return name, version_rank(version)
    except (binascii.Error, UnicodeError, msgspec.DecodeError, ValueError) as exc:
        raise InvalidInput(
            "invalid cursor: pass the next_cursor of the previous page unchanged, "
            "or an empty cursor for the first page",
            details={"field": "cursor"},
        ) from exc


# -- the store ---------------------------------------------------------------------------


class StoredVersion(NamedTuple):
    """One registered version as the store holds it: what the in-memory index is built from.

    Attributes:
        id: Row id; a version deregistered and registered again gets a new one.
        manifest: The registered manifest.
        registered_at: Unix time of the (latest) registration.
        last_heartbeat: Unix time of the last heartbeat written to the store.
        instances: Its instances seen since the snapshot's ``since``.
    """

    id: int
    manifest: AgentManifest
    registered_at: float
    last_heartbeat: float
    instances: tuple[AgentInstance, ...]


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
        self._beat_later_sql = self._driver_sql(_BEAT_LATER)
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
            SQLModel.metadata.create_all(conn, tables=list(_TABLES))

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
        manifest, stored_json, version = _prepared(manifest)

        def attempt(conn: Connection) -> tuple[AgentRecord, bool]:
            return self._register(conn, manifest, stored_json, version, now)

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
        declared, declared_json, declared_version = _prepared(manifest)

        def attempt(conn: Connection) -> Registration:
            manifest, stored_json, version = declared, declared_json, declared_version
            binding = read_binding(conn, manifest.name, lock=True) if bound else None
            if binding is not None:
                applied = apply_binding(manifest, binding)
                if applied != manifest:
                    manifest, stored_json, version = _prepared(applied)
            row = conn.execute(
                _PREVIOUS, {"p_name": manifest.name, "p_version": manifest.version}
            ).first()
            record, created = self._register(conn, manifest, stored_json, version, now)
            return Registration(
                record=record,
                created=created,
                versions=_read_versions(conn, [manifest.name], _NO_CUTOFF),
                previous=_manifest(row.manifest) if row is not None else None,
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
            claim = conn.execute(_CLAIM, {"p_name": name}).first()
            rewritten = 0
            if claim is not None:
                for row in conn.execute(_VERSION_MANIFESTS, {"p_name": name}).all():
                    old = _manifest(row.manifest)
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
            return Rebound(before, after, rewritten, _read_versions(conn, [name], _NO_CUTOFF))

        return self._write(attempt, name)

    def _register(
        self,
        conn: Connection,
        manifest: AgentManifest,
        stored_json: str,
        version: semantic_version.Version,
        now: float,
    ) -> tuple[AgentRecord, bool]:
        name = manifest.name
        # FOR UPDATE (PostgreSQL; SQLite holds the database lock already)
        # serializes writes to one name.
        claim = conn.execute(_CLAIM, {"p_name": name}).first()
        if claim is None:
            # Losing this insert to a concurrent first registration raises
            # IntegrityError; the retry then sees the winner's claim.
            conn.execute(insert(_N), {"name": name, "owner": manifest.owner, "claimed_at": now})
        elif claim.owner != manifest.owner:
            raise Conflict(
                f"agent {name!r} is owned by {claim.owner!r}; {manifest.owner!r} cannot "
                f"register it. Pick another name, or ask {claim.owner!r} to deregister it "
                "(`signalbox agents revoke`)",
                details={"name": name, "owner": claim.owner},
            )
        existing = conn.execute(_EXISTING, {"p_name": name, "p_version": manifest.version}).first()
        if existing is not None and _manifest(existing.manifest) == manifest:
            conn.execute(_TOUCH, {"p_id": existing.id, "p_now": now})
            record = AgentRecord(
                manifest=manifest,
                registered_at=float(existing.registered_at),
                last_heartbeat=now,
                health="healthy",
                instances=self._live(conn, existing.id, _NO_CUTOFF),
            )
            return record, False
        rank = version_rank(manifest.version)
        values = {
            "owner": manifest.owner,
            "team": manifest.team,
            "project": manifest.project,
            "region": manifest.region,
            "description": manifest.description,
            "manifest": stored_json,
            "registered_at": now,
            "last_heartbeat": now,
            "major": version.major,
            "minor": version.minor,
            "patch": version.patch,
            "prerelease": ".".join(version.prerelease),
            "rank": rank,
        }
        if existing is not None:
            agent_id: int = existing.id
            conn.execute(update(_V).where(_V.c.id == agent_id).values(**values))
            conn.execute(delete(_T).where(_T.c.agent_id == agent_id))
            conn.execute(delete(_C).where(_C.c.agent_id == agent_id))
            live = self._live(conn, agent_id, _NO_CUTOFF)
        else:
            values.update(name=name, version=manifest.version)
            agent_id = conn.execute(_INSERT_VERSION, values).scalar_one()
            live = 0
        search = {
            "agent": name,
            "rank": rank,
            "agent_id": agent_id,
            "version": manifest.version,
            "team": manifest.team,
            "owner": manifest.owner,
            "region": manifest.region,
        }
        if manifest.capabilities:
            conn.execute(insert(_C), [{**search, "name": c.name} for c in manifest.capabilities])
        tags = [
            {**search, "capability": c.name, "tag": tag}
            for c in manifest.capabilities
            for tag in dict.fromkeys(c.tags)  # a repeated tag is stored once
        ]
        if tags:
            conn.execute(insert(_T), tags)
        record = AgentRecord(
            manifest=manifest,
            registered_at=now,
            last_heartbeat=now,
            health="healthy",
            instances=live,
        )
        return record, existing is None

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
        since = _NO_CUTOFF if stale_after is None else now - stale_after

        def attempt(conn: Connection) -> AgentRecord:
            row = conn.execute(
                _BEAT, {"p_name": hb.name, "p_version": hb.version, "p_now": now}
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
                manifest=_manifest(row.manifest),
                registered_at=float(row.registered_at),
                last_heartbeat=now,
                health="healthy",
                instances=self._live(conn, row.id, since),
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

        return self._write(lambda conn: self._deregister(conn, name, version), name)

    def deregister_and_read(
        self, name: str, version: str | None = None
    ) -> tuple[list[AgentRecord], list[StoredVersion]]:
        """:meth:`deregister`, also returning the versions of ``name`` left (read in the write)."""

        def attempt(conn: Connection) -> tuple[list[AgentRecord], list[StoredVersion]]:
            removed = self._deregister(conn, name, version)
            return removed, _read_versions(conn, [name], _NO_CUTOFF)

        return self._write(attempt, name)

    def _deregister(self, conn: Connection, name: str, version: str | None) -> list[AgentRecord]:
        conn.execute(_LOCK_NAME, {"p_name": name})
        params = {"p_name": name, "p_version": version, "p_stale": _NO_CUTOFF}
        rows = conn.execute(_ALL_VERSIONS if version is None else _ONE_VERSION, params).all()
        if not rows:
            raise self._not_found(conn, name, version)
        # Capabilities, tags and instances go with them (ON DELETE CASCADE).
        conn.execute(delete(_V).where(_V.c.id.in_([r.id for r in rows])))
        if conn.execute(_ANY_VERSION, {"p_name": name}).first() is None:
            conn.execute(delete(_N).where(_N.c.name == name))
        return [msgspec.structs.replace(_to_record(r, None), status="deregistered") for r in rows]

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
            latest[key] = max(float(b.last_heartbeat), latest.get(key, _NO_CUTOFF))
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
            row = conn.execute(_LATEST if version is None else _ONE_VERSION, params).first()
            if row is None:
                raise self._not_found(conn, name, version)
        return _to_record(row, cutoffs)

    def latest(self, name: str) -> AgentRecord | None:
        """The highest registered version of ``name``, or None (health ``down``, as in KV)."""
        with self._engine.connect() as conn:
            row = conn.execute(_LATEST, {"p_name": name, "p_stale": _NO_CUTOFF}).first()
        return None if row is None else _to_record(row, None)

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
        self, names: Sequence[str] | None = None, *, since: float = _NO_CUTOFF
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
            return _read_versions(conn, names, since)

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
        """One page of the agent versions matching every filter of ``q``.

        Name, capability, tag, team, owner, region and health filter in SQL;
        the semver range (``q.versions``, npm syntax) is applied in Python.
        Without ``all_versions`` only the highest *matching* version of each
        name is kept. ``capability`` and ``tag`` are independent: an agent
        matches when it offers the capability and some capability of it (not
        necessarily that one) carries the tag. Results are ordered by name
        (bytewise ascending), then version (highest first).

        Args:
            q: The query; ``q.cursor`` is the previous page's ``next_cursor``.
            now: Current time.
            stale_after: Seconds without heartbeat after which an agent is stale.
            down_after: Seconds without heartbeat after which an agent is down.

        Returns:
            The page, ``total`` matches across all pages, and ``next_cursor``
            (empty on the last page).

        Raises:
            InvalidInput: invalid ``versions`` range or ``cursor`` (``details['field']``).
        """
        if q.versions:
            check_range(q.versions)
        after = decode_cursor(q.cursor) if q.cursor else None
        cutoffs = Cutoffs(now, stale_after, down_after)
        driver = (
            "capability" if q.capability is not None else "tag" if q.tag is not None else "version"
        )
        shape = _Shape(
            driver=driver,
            name=q.name is not None,
            team=q.team is not None,
            owner=q.owner is not None,
            region=q.region is not None,
            tag=q.tag is not None and driver == "capability",
            health=q.health,
            all_versions=q.all_versions,
            after=after is not None,
        )
        statements = _statements(shape)
        params: dict[str, Any] = {
            "p_capability": q.capability,
            "p_tag": q.tag,
            "p_name": q.name,
            "p_team": q.team,
            "p_owner": q.owner,
            "p_region": q.region,
            "p_stale": cutoffs.stale,
            "p_down": cutoffs.down,
            "p_limit": q.limit + 1,  # one more tells whether another page follows
        }
        if after is not None:
            params["p_after_agent"], params["p_after_rank"] = after
        with self._engine.connect() as conn:
            if not q.versions:
                total = int(conn.execute(statements.total, params).scalar_one())
                rows: Sequence[Any] = conn.execute(statements.page, params).all()
                more = len(rows) > q.limit
                rows = rows[: q.limit]
            else:
                total, rows, more = self._page_in_range(conn, q, statements, params, after)
        records = tuple(_to_record(r, cutoffs) for r in rows)
        next_cursor = encode_cursor(rows[-1][1], rows[-1][2]) if more and rows else ""
        return DiscoverResult(agents=records, total=total, next_cursor=next_cursor)

    # -- helpers -------------------------------------------------------------------------

    @staticmethod
    def _page_in_range(
        conn: Connection,
        q: DiscoverAgents,
        statements: _Statements,
        params: dict[str, Any],
        after: tuple[str, str] | None,
    ) -> tuple[int, list[Any], bool]:
        """Apply the semver range in Python to the keys of every SQL match, then page."""
        spec = q.versions or "*"
        matches: list[tuple[int, str, str]] = []
        taken = ""
        for agent_id, agent, rank, version in conn.execute(statements.keys, params):
            if not q.all_versions and agent == taken:
                continue  # a higher version of this name already matched
            if in_range(spec, version):
                matches.append((agent_id, agent, rank))
                taken = agent
        start = 0
        if after is not None:
            # Python's str order is the bytewise order SQL sorted by.
            last_agent, last_rank = after
            while start < len(matches) and (
                matches[start][1] < last_agent
                or (
                    matches[start][1] == last_agent
                    and (not q.all_versions or matches[start][2] <= last_rank)
                )
            ):
                start += 1
        chosen = [agent_id for agent_id, _, _ in matches[start : start + q.limit]]
        rows: list[Any] = []
        if chosen:
            found = conn.execute(_BY_IDS, {"p_ids": chosen, "p_stale": params["p_stale"]})
            by_id = {r[0]: r for r in found}
            rows = [by_id[agent_id] for agent_id in chosen if agent_id in by_id]
        return len(matches), rows, start + q.limit < len(matches)

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

    @staticmethod
    def _live(conn: Connection, agent_id: int, since: float) -> int:
        return int(conn.execute(_LIVE, {"p_id": agent_id, "p_stale": since}).scalar_one())

    @staticmethod
    def _not_found(conn: Connection, name: str, version: str | None) -> NotFound:
        versions = [v for (v,) in conn.execute(_VERSION_LIST, {"p_name": name})]
        return not_found(name, version, versions)


def _read_versions(
    conn: Connection, names: Sequence[str] | None, since: float
) -> list[StoredVersion]:
    """The versions of ``names`` (all when None) with instances seen since ``since``."""
    params: dict[str, Any] = {"p_since": since}
    if names is None:
        versions, instances = _SNAPSHOT_ALL
    elif len(names) == 1:
        versions, instances = _SNAPSHOT_ONE
        params["p_name"] = names[0]
    else:
        versions, instances = _SNAPSHOT_SOME
        params["p_names"] = list(names)
    version_rows = conn.execute(versions, params).all()
    instance_rows = conn.execute(instances, params).all() if version_rows else []
    by_version: dict[int, list[AgentInstance]] = {}
    for agent_id, name, version, instance, last_heartbeat, stats in instance_rows:
        by_version.setdefault(agent_id, []).append(
            AgentInstance(
                name=name,
                version=version,
                instance=instance,
                last_heartbeat=float(last_heartbeat),
                stats=_stats(stats),
            )
        )
    return [
        StoredVersion(
            id=agent_id,
            manifest=_manifest(manifest),
            registered_at=float(registered_at),
            last_heartbeat=float(last_heartbeat),
            instances=tuple(by_version.get(agent_id, ())),
        )
        for agent_id, _name, manifest, registered_at, last_heartbeat in version_rows
    ]


def not_found(name: str, version: str | None, versions: Sequence[str]) -> NotFound:
    """The error for a lookup of ``name`` (``version``) that matched nothing.

    Args:
        name: Agent name asked for.
        version: Version asked for (None: any).
        versions: The versions of ``name`` that do exist, highest first.
    """
    if not versions:
        return NotFound(
            f"no agent {name!r} is registered; `signalbox agents list` shows registered agents",
            details={"name": name, "version": version},
        )
    return NotFound(
        f"agent {name!r} has no version {version}; registered versions: {', '.join(versions)}",
        details={"name": name, "version": version, "versions": list(versions)},
    )


def heartbeat_not_found(name: str, version: str) -> NotFound:
    """The error for a heartbeat of a version that is not registered."""
    return NotFound(
        f"agent {name!r} version {version} is not registered; register it "
        "again (the SDK does so when a heartbeat is refused)",
        details={"name": name, "version": version},
    )


def _prepared(manifest: AgentManifest) -> tuple[AgentManifest, str, semantic_version.Version]:
    """Check a manifest to register; returns it decoded, its JSON and its parsed version."""
    data = encode(manifest)
    manifest = decode(data, AgentManifest)  # enforce the wire constraints here too
    version = _checked_version(manifest.version)
    _check_capabilities(manifest)
    return manifest, data.decode(), version


def _checked_version(version: str) -> semantic_version.Version:
    if len(version) > MAX_VERSION_LENGTH:
        raise InvalidInput(
            f"version is {len(version)} characters long, over the limit of {MAX_VERSION_LENGTH}",
            details={"path": "$.version", "field": "version"},
        )
    try:
        parsed = _parse_version(version)
    except ValueError as exc:
        raise InvalidInput(
            f"version {version!r} is not semantic versioning (MAJOR.MINOR.PATCH, e.g. 1.4.0): "
            f"{exc}",
            details={"path": "$.version", "field": "version"},
        ) from exc
    if max(parsed.major, parsed.minor, parsed.patch) >= 2**63:
        raise InvalidInput(
            f"version {version!r} has a component over 2**63 - 1",
            details={"path": "$.version", "field": "version"},
        )
    return parsed


def _check_capabilities(manifest: AgentManifest) -> None:
    seen: set[str] = set()
    for index, capability in enumerate(manifest.capabilities):
        if capability.name in seen:
            raise InvalidInput(
                f"capability {capability.name!r} is listed twice; each capability name "
                "must appear once per manifest",
                details={"path": f"$.capabilities[{index}].name", "field": "capabilities"},
            )
        seen.add(capability.name)
