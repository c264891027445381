"""Discovery in SQL: one set of statements per query shape, and the paging over them.

Name, capability, tag, team, owner, region and health filter in SQL, through
the indexes described in :mod:`services.registry.tables`; the semver range is
applied in Python. The statements of a shape are built once (SQLAlchemy's
compile overhead would otherwise cost more than the query), with bound
parameters.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, NamedTuple

from sqlalchemy import ColumnElement, Select, and_, bindparam, func, select, tuple_
from sqlalchemy.engine import Connection, Engine

from schemas import DiscoverAgents, DiscoverResult, Health
from services.registry.cursor import decode_cursor, encode_cursor
from services.registry.liveness import Cutoffs, health_condition
from services.registry.queries import RECORD_COLUMNS, VERSIONS_BY_IDS
from services.registry.records import to_record
from services.registry.tables import AGENT_NAMES, AGENT_VERSIONS, CAPABILITIES, CAPABILITY_TAGS
from services.registry.versions import check_range, in_range

__all__ = ["discover"]

# Short names for the tables in the statements below.
_N, _V, _C, _T = AGENT_NAMES, AGENT_VERSIONS, CAPABILITIES, CAPABILITY_TAGS


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
        conditions.append(health_condition(shape.health))
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
        select(*RECORD_COLUMNS)
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


def discover(
    engine: Engine,
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
        engine: The registry database.
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
    driver = "capability" if q.capability is not None else "tag" if q.tag is not None else "version"
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
    with engine.connect() as conn:
        if not q.versions:
            total = int(conn.execute(statements.total, params).scalar_one())
            rows: Sequence[Any] = conn.execute(statements.page, params).all()
            more = len(rows) > q.limit
            rows = rows[: q.limit]
        else:
            total, rows, more = _page_in_range(conn, q, statements, params, after)
    records = tuple(to_record(r, cutoffs) for r in rows)
    next_cursor = encode_cursor(rows[-1][1], rows[-1][2]) if more and rows else ""
    return DiscoverResult(agents=records, total=total, next_cursor=next_cursor)


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
        found = conn.execute(VERSIONS_BY_IDS, {"p_ids": chosen, "p_stale": params["p_stale"]})
        by_id = {r[0]: r for r in found}
        rows = [by_id[agent_id] for agent_id in chosen if agent_id in by_id]
    return len(matches), rows, start + q.limit < len(matches)
