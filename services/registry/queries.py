"""The registry store's SQL statements of fixed shape, built once with bound parameters.

SQLAlchemy's compile overhead would otherwise cost more than the query. Every
parameter is a ``p_*`` bind parameter; the statements of discovery, whose
shape depends on the query, are in :mod:`services.registry.discovery`.
"""

from __future__ import annotations

from typing import Any, Final

from sqlalchemy import BindParameter, bindparam, func, insert, select, update

from services.registry.tables import AGENT_NAMES, AGENT_VERSIONS, INSTANCES

__all__ = [
    "ALL_VERSIONS",
    "ANY_VERSION",
    "BEAT_LATER",
    "BEAT_VERSION",
    "EXISTING_VERSION",
    "INSERT_VERSION",
    "LATEST_VERSION",
    "LIVE_INSTANCES",
    "LOCK_NAME",
    "NAME_CLAIM",
    "ONE_VERSION",
    "PREVIOUS_MANIFEST",
    "RECORD_COLUMNS",
    "SNAPSHOT_ALL",
    "SNAPSHOT_ONE",
    "SNAPSHOT_SOME",
    "TOUCH_VERSION",
    "VERSIONS_BY_IDS",
    "VERSION_LIST",
    "VERSION_MANIFESTS",
]

# Short names for the tables in the statements below.
_N, _V, _I = AGENT_NAMES, AGENT_VERSIONS, INSTANCES

#: What a record is built from; ``live`` counts instances seen since ``p_stale``.
RECORD_COLUMNS: Final = (
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
NAME_CLAIM: Final = select(_N.c.owner).where(_N.c.name == bindparam("p_name")).with_for_update()
LOCK_NAME: Final = select(_N.c.name).where(_N.c.name == bindparam("p_name")).with_for_update()
EXISTING_VERSION: Final = select(_V.c.id, _V.c.manifest, _V.c.registered_at).where(
    _V.c.name == bindparam("p_name"), _V.c.version == bindparam("p_version")
)
TOUCH_VERSION: Final = (
    update(_V).where(_V.c.id == bindparam("p_id")).values(last_heartbeat=bindparam("p_now"))
)
BEAT_VERSION: Final = (
    update(_V)
    .where(_V.c.name == bindparam("p_name"), _V.c.version == bindparam("p_version"))
    .values(last_heartbeat=bindparam("p_now"))
    .returning(_V.c.id, _V.c.manifest, _V.c.registered_at)
)
LIVE_INSTANCES: Final = (
    select(func.count())
    .select_from(_I)
    .where(_I.c.agent_id == bindparam("p_id"), _I.c.last_heartbeat >= bindparam("p_stale"))
)
LATEST_VERSION: Final = (
    select(*RECORD_COLUMNS).where(_V.c.name == bindparam("p_name")).order_by(_V.c.rank).limit(1)
)
ONE_VERSION: Final = select(*RECORD_COLUMNS).where(
    _V.c.name == bindparam("p_name"), _V.c.version == bindparam("p_version")
)
ALL_VERSIONS: Final = (
    select(*RECORD_COLUMNS).where(_V.c.name == bindparam("p_name")).order_by(_V.c.rank)
)
VERSION_LIST: Final = (
    select(_V.c.version).where(_V.c.name == bindparam("p_name")).order_by(_V.c.rank)
)
ANY_VERSION: Final = select(_V.c.id).where(_V.c.name == bindparam("p_name")).limit(1)
#: The manifest a registration follows: the same version's, else the highest version's.
PREVIOUS_MANIFEST: Final = (
    select(_V.c.manifest)
    .where(_V.c.name == bindparam("p_name"))
    .order_by((_V.c.version != bindparam("p_version")), _V.c.rank)
    .limit(1)
)
VERSION_MANIFESTS: Final = select(_V.c.id, _V.c.manifest).where(_V.c.name == bindparam("p_name"))
#: A batched heartbeat: never moves a version's heartbeat time backwards.
BEAT_LATER: Final = (
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
SNAPSHOT_ALL: Final = (_SNAPSHOT_VERSIONS, _SNAPSHOT_INSTANCES)
SNAPSHOT_SOME: Final = (
    _SNAPSHOT_VERSIONS.where(_V.c.name.in_(_NAMES_IN)),
    _SNAPSHOT_INSTANCES.where(_I.c.name.in_(_NAMES_IN)),
)
SNAPSHOT_ONE: Final = (
    _SNAPSHOT_VERSIONS.where(_V.c.name == bindparam("p_name")),
    _SNAPSHOT_INSTANCES.where(_I.c.name == bindparam("p_name")),
)
VERSIONS_BY_IDS: Final = select(*RECORD_COLUMNS).where(
    _V.c.id.in_(bindparam("p_ids", expanding=True))
)
INSERT_VERSION: Final = insert(_V).returning(_V.c.id)
