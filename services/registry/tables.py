"""The registry's SQL tables: SQLModel classes, never on the wire (wire types are in schemas).

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

Ordering. ``rank`` (:func:`services.registry.versions.version_rank`) sorts
ascending as highest version first. Text columns that are ordered or
compared use the ``C`` collation on PostgreSQL, so "name ascending" is the
same bytewise order on both backends and in Python.

Discovery speed. The capability and tag tables repeat the immutable,
searchable columns of their version (agent name, rank, version, team, owner,
region) and are clustered on ``(capability|tag, agent, rank)`` (``WITHOUT
ROWID`` on SQLite), with ``(capability|tag, team|owner|region, agent, rank)``
indexes: a query by capability or tag, plus one of team/owner/region, counts
and pages through one contiguous index range and reads version rows only for
the page. Queries on the version table alone use covering ``(team|owner|region,
name, rank, last_heartbeat)`` indexes; keeping ``last_heartbeat`` in them makes
a heartbeat update four index entries instead of one, which is what lets
"region X, healthy" avoid reading thousands of rows.
"""

from __future__ import annotations

from typing import Final

from sqlalchemy import BigInteger, Float, Index, String, Text, UniqueConstraint
from sqlmodel import Field, SQLModel

from broker.runtime.sql import table_of
from services.registry.credentials import BINDINGS
from services.registry.versions import MAX_VERSION_LENGTH

__all__ = [
    "AGENT_NAMES",
    "AGENT_VERSIONS",
    "CAPABILITIES",
    "CAPABILITY_TAGS",
    "INSTANCES",
    "TABLES",
    "AgentNameRow",
    "AgentVersionRow",
    "CapabilityRow",
    "CapabilityTagRow",
    "InstanceRow",
]

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
    #: Ascending order = descending semver precedence (see services.registry.versions).
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


#: The tables, as SQLAlchemy Core handles for building statements.
AGENT_NAMES: Final = table_of(AgentNameRow)
AGENT_VERSIONS: Final = table_of(AgentVersionRow)
CAPABILITIES: Final = table_of(CapabilityRow)
CAPABILITY_TAGS: Final = table_of(CapabilityTagRow)
INSTANCES: Final = table_of(InstanceRow)
#: Every table the registry's store creates (the agent bindings too).
TABLES: Final = (AGENT_NAMES, AGENT_VERSIONS, CAPABILITIES, CAPABILITY_TAGS, INSTANCES, BINDINGS)
