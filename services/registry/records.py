"""Registry rows into records: decoded manifests, stored versions, lookup errors."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, Final, NamedTuple

from sqlalchemy.engine import Connection

from broker.codec import decode
from broker.errors import NotFound
from schemas import AgentInstance, AgentManifest, AgentRecord, InstanceStats
from services.registry.liveness import Cutoffs
from services.registry.queries import LIVE_INSTANCES, SNAPSHOT_ALL, SNAPSHOT_ONE, SNAPSHOT_SOME

__all__ = [
    "StoredVersion",
    "decoded_manifest",
    "decoded_stats",
    "heartbeat_not_found",
    "live_instances",
    "not_found",
    "read_versions",
    "to_record",
]

#: Decoded manifests by their JSON text: a page of discovery results mostly
#: repeats manifests already seen, and decoding dominates building a record.
_MANIFEST_CACHE_SIZE: Final = 16384


@functools.lru_cache(maxsize=_MANIFEST_CACHE_SIZE)
def decoded_manifest(text_: str) -> AgentManifest:
    """The manifest stored as the msgspec JSON ``text_`` (cached)."""
    # Keyed by the JSON itself, so a cached entry can never be stale.
    return decode(text_.encode(), AgentManifest)


@functools.lru_cache(maxsize=_MANIFEST_CACHE_SIZE)
def decoded_stats(text_: str) -> InstanceStats:
    """The instance stats stored as the msgspec JSON ``text_`` (cached)."""
    return decode(text_.encode(), InstanceStats)


def to_record(row: Any, cutoffs: Cutoffs | None) -> AgentRecord:
    """The record of a row of :data:`~services.registry.queries.RECORD_COLUMNS`.

    Args:
        row: The row.
        cutoffs: Health cut-offs at the time of the read (None: ``down``, as in KV).
    """
    # Unpacked rather than read by attribute: a Row attribute costs ~10x more.
    _id, _name, _version, manifest, registered_at, last_heartbeat, live = row
    return AgentRecord(
        manifest=decoded_manifest(manifest),
        # float(): SQLite hands back whole-number REALs as int.
        registered_at=float(registered_at),
        last_heartbeat=float(last_heartbeat),
        health=cutoffs.health(last_heartbeat) if cutoffs is not None else "down",
        instances=live,
    )


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


def read_versions(
    conn: Connection, names: Sequence[str] | None, since: float
) -> list[StoredVersion]:
    """The versions of ``names`` (all when None) with instances seen since ``since``."""
    params: dict[str, Any] = {"p_since": since}
    if names is None:
        versions, instances = SNAPSHOT_ALL
    elif len(names) == 1:
        versions, instances = SNAPSHOT_ONE
        params["p_name"] = names[0]
    else:
        versions, instances = SNAPSHOT_SOME
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
                stats=decoded_stats(stats),
            )
        )
    return [
        StoredVersion(
            id=agent_id,
            manifest=decoded_manifest(manifest),
            registered_at=float(registered_at),
            last_heartbeat=float(last_heartbeat),
            instances=tuple(by_version.get(agent_id, ())),
        )
        for agent_id, _name, manifest, registered_at, last_heartbeat in version_rows
    ]


def live_instances(conn: Connection, agent_id: int, since: float) -> int:
    """How many instances of the version ``agent_id`` sent a heartbeat at or after ``since``."""
    return int(conn.execute(LIVE_INSTANCES, {"p_id": agent_id, "p_stale": since}).scalar_one())


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
