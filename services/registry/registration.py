"""Registering one agent version: the checks on a manifest and the rows one registration writes."""

from __future__ import annotations

import msgspec
import semantic_version  # type: ignore[import-untyped]  # ships no type hints
from sqlalchemy import delete, insert, update
from sqlalchemy.engine import Connection

from broker.codec import decode, encode
from broker.errors import Conflict, InvalidInput, NotFound
from schemas import AgentManifest, AgentRecord
from services.registry.liveness import NO_CUTOFF
from services.registry.queries import (
    ALL_VERSIONS,
    ANY_VERSION,
    EXISTING_VERSION,
    INSERT_VERSION,
    LOCK_NAME,
    NAME_CLAIM,
    ONE_VERSION,
    TOUCH_VERSION,
    VERSION_LIST,
)
from services.registry.records import (
    StoredVersion,
    decoded_manifest,
    live_instances,
    not_found,
    read_versions,
    to_record,
)
from services.registry.tables import (
    AGENT_NAMES,
    AGENT_VERSIONS,
    CAPABILITIES,
    CAPABILITY_TAGS,
    INSTANCES,
)
from services.registry.versions import checked_version, version_rank

__all__ = ["leave_instance", "missing", "prepared_manifest", "remove_versions", "write_version"]

# Short names for the tables in the statements below.
_N, _V, _C, _T = AGENT_NAMES, AGENT_VERSIONS, CAPABILITIES, CAPABILITY_TAGS


def prepared_manifest(
    manifest: AgentManifest,
) -> tuple[AgentManifest, str, semantic_version.Version]:
    """Check a manifest to register; returns it decoded, its JSON and its parsed version."""
    data = encode(manifest)
    manifest = decode(data, AgentManifest)  # enforce the wire constraints here too
    version = checked_version(manifest.version)
    _check_capabilities(manifest)
    return manifest, data.decode(), version


def _check_capabilities(manifest: AgentManifest) -> None:
    """Refuse a manifest listing a capability name twice."""
    seen: set[str] = set()
    for index, capability in enumerate(manifest.capabilities):
        if capability.name in seen:
            raise InvalidInput(
                f"capability {capability.name!r} is listed twice; each capability name "
                "must appear once per manifest",
                details={"path": f"$.capabilities[{index}].name", "field": "capabilities"},
            )
        seen.add(capability.name)


def write_version(
    conn: Connection,
    manifest: AgentManifest,
    stored_json: str,
    version: semantic_version.Version,
    now: float,
) -> tuple[AgentRecord, bool]:
    """Write one version of ``manifest`` in ``conn``'s transaction (see ``AgentStore.register``).

    Claims the name for its owner if it is new; refreshes only the heartbeat
    time of an identical manifest; replaces a changed one in place
    (capabilities and tags too).

    Args:
        conn: A write transaction.
        manifest: The manifest to store, from :func:`prepared_manifest`.
        stored_json: Its JSON, from :func:`prepared_manifest`.
        version: Its parsed version, from :func:`prepared_manifest`.
        now: Current time.

    Returns:
        The stored record and whether the version is new.

    Raises:
        Conflict: the name is owned by another owner.
        IntegrityError: lost a race on a unique key (the caller retries).
    """
    name = manifest.name
    # FOR UPDATE (PostgreSQL; SQLite holds the database lock already)
    # serializes writes to one name.
    claim = conn.execute(NAME_CLAIM, {"p_name": name}).first()
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
    existing = conn.execute(
        EXISTING_VERSION, {"p_name": name, "p_version": manifest.version}
    ).first()
    if existing is not None and decoded_manifest(existing.manifest) == manifest:
        conn.execute(TOUCH_VERSION, {"p_id": existing.id, "p_now": now})
        record = AgentRecord(
            manifest=manifest,
            registered_at=float(existing.registered_at),
            last_heartbeat=now,
            health="healthy",
            instances=live_instances(conn, existing.id, NO_CUTOFF),
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
        live = live_instances(conn, agent_id, NO_CUTOFF)
    else:
        values.update(name=name, version=manifest.version)
        agent_id = conn.execute(INSERT_VERSION, values).scalar_one()
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


def missing(conn: Connection, name: str, version: str | None) -> NotFound:
    """The error for ``name`` (``version``) not found, listing the versions that exist."""
    versions = [v for (v,) in conn.execute(VERSION_LIST, {"p_name": name})]
    return not_found(name, version, versions)


def remove_versions(conn: Connection, name: str, version: str | None) -> list[AgentRecord]:
    """Delete one version of ``name`` (every version when None); the removed records.

    Removing the last version releases the name.

    Raises:
        NotFound: nothing matched.
    """
    conn.execute(LOCK_NAME, {"p_name": name})
    params = {"p_name": name, "p_version": version, "p_stale": NO_CUTOFF}
    rows = conn.execute(ALL_VERSIONS if version is None else ONE_VERSION, params).all()
    if not rows:
        raise missing(conn, name, version)
    # Capabilities, tags and instances go with them (ON DELETE CASCADE).
    conn.execute(delete(_V).where(_V.c.id.in_([r.id for r in rows])))
    if conn.execute(ANY_VERSION, {"p_name": name}).first() is None:
        conn.execute(delete(_N).where(_N.c.name == name))
    return [msgspec.structs.replace(to_record(r, None), status="deregistered") for r in rows]


def leave_instance(conn: Connection, name: str, version: str, instance: str) -> list[StoredVersion]:
    """Forget one instance of ``name`` ``version`` (it shut down); the versions of ``name``.

    Raises:
        NotFound: no such version.
    """
    conn.execute(LOCK_NAME, {"p_name": name})
    params = {"p_name": name, "p_version": version, "p_stale": NO_CUTOFF}
    row = conn.execute(ONE_VERSION, params).first()
    if row is None:
        raise missing(conn, name, version)
    conn.execute(
        delete(INSTANCES).where(INSTANCES.c.agent_id == row.id, INSTANCES.c.instance == instance)
    )
    return read_versions(conn, [name], NO_CUTOFF)
