"""Agent credentials: issued by operators, checked by the auth callout, revocable.

A credential is ``sbc1.<id>.<secret>``: ``id`` (16 base32 characters) is
public and names the credential in listings and audit events; ``secret``
(256 random bits) is shown once at enrollment and stored only as its
SHA-256 (a slow hash buys nothing against 256 random bits, and the callout
checks a credential on every agent connect). A credential is bound to one
agent name, expires, and can be revoked; the callout refuses it afterwards.

The table lives in the registry's SQL database (SQLite or PostgreSQL).
Calls are synchronous SQLAlchemy, run in a worker thread by the caller.

Beside the credentials, ``agent_bindings`` holds the governance attributes
an operator bound to each enrolled agent (team, owner, namespace, region,
projects, principal tags: :class:`~schemas.AgentBinding`, applied by
:mod:`services.registry.binding`). Issuing a credential always leaves a
binding row for its agent (empty unless one was bound), so every agent that
can connect has one; the registry's store changes bindings together with
the agent's registered versions (``AgentStore.bind_and_read``).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal

from sqlalchemy import Engine, Text, insert, select, update
from sqlalchemy.engine import Connection
from sqlmodel import Field, Session, SQLModel, col

from broker.runtime.sql import make_engine, table_of
from schemas import AgentBinding, CredentialInfo

__all__ = [
    "BINDINGS",
    "AgentBindingRow",
    "CredentialRejected",
    "CredentialRow",
    "CredentialStore",
    "Issued",
    "parse_token",
    "read_binding",
    "secret_hash",
    "write_binding",
]

TOKEN_PREFIX = "sbc1"

Reason = Literal["missing", "malformed", "unknown", "expired", "revoked", "wrong_secret"]


class CredentialRow(SQLModel, table=True):
    """One issued credential (its secret only as a hash)."""

    __tablename__ = "agent_credentials"

    id: str = Field(primary_key=True, max_length=16)
    agent: str = Field(index=True, max_length=64)
    secret_hash: str = Field(max_length=64)
    created_at: float
    expires_at: float
    revoked_at: float | None = None
    created_by: str = Field(default="", max_length=128)
    note: str = Field(default="", max_length=256)

    def info(self) -> CredentialInfo:
        """The wire view (no secret)."""
        return CredentialInfo(
            id=self.id,
            agent=self.agent,
            created_at=self.created_at,
            expires_at=self.expires_at,
            revoked_at=self.revoked_at,
            created_by=self.created_by,
            note=self.note,
        )


class AgentBindingRow(SQLModel, table=True):
    """The governance attributes bound to one agent (see :class:`~schemas.AgentBinding`)."""

    __tablename__ = "agent_bindings"

    agent: str = Field(primary_key=True, max_length=64)
    team: str = Field(default="", max_length=256)
    owner: str = Field(default="", max_length=256)
    namespace: str = Field(default="", max_length=256)
    region: str = Field(default="", max_length=256)
    #: JSON list of project names.
    projects: str = Field(default="[]", sa_type=Text)
    #: JSON list of principal tags.
    tags: str = Field(default="[]", sa_type=Text)
    bound_at: float = 0.0
    bound_by: str = Field(default="", max_length=256)


_CREDENTIALS = table_of(CredentialRow)
#: The ``agent_bindings`` table.
BINDINGS: Final = table_of(AgentBindingRow)


def _binding_of(row: Any) -> AgentBinding:
    return AgentBinding(
        agent=row.agent,
        team=row.team,
        owner=row.owner,
        namespace=row.namespace,
        region=row.region,
        projects=tuple(json.loads(row.projects or "[]")),
        tags=tuple(json.loads(row.tags or "[]")),
        bound_at=float(row.bound_at or 0.0),
        bound_by=row.bound_by,
    )


def read_binding(conn: Connection, agent: str, *, lock: bool = False) -> AgentBinding | None:
    """``agent``'s binding in this transaction (None: never bound); ``lock``: FOR UPDATE.

    The row lock (PostgreSQL; SQLite's write transactions hold the database
    lock already) serializes a registration with a concurrent binding change.
    """
    query = select(BINDINGS).where(BINDINGS.c.agent == agent)
    if lock:
        query = query.with_for_update()
    row = conn.execute(query).first()
    return _binding_of(row) if row is not None else None


def write_binding(conn: Connection, binding: AgentBinding) -> None:
    """Insert or replace ``binding`` in this transaction."""
    values = {
        "team": binding.team,
        "owner": binding.owner,
        "namespace": binding.namespace,
        "region": binding.region,
        "projects": json.dumps(list(binding.projects)),
        "tags": json.dumps(list(binding.tags)),
        "bound_at": binding.bound_at,
        "bound_by": binding.bound_by,
    }
    changed = conn.execute(
        update(BINDINGS).where(BINDINGS.c.agent == binding.agent).values(**values)
    ).rowcount
    if not changed:
        conn.execute(insert(BINDINGS).values(agent=binding.agent, **values))


class CredentialRejected(Exception):
    """A presented credential is not valid now; ``reason`` says why (audited, not sent)."""

    def __init__(self, reason: Reason, credential_id: str = "", agent: str = "") -> None:
        super().__init__(reason)
        self.reason: Reason = reason
        self.credential_id = credential_id
        self.agent = agent


@dataclass(frozen=True, slots=True)
class Issued:
    """A new credential: its stored row and the token (shown once)."""

    row: CredentialInfo
    token: str


def secret_hash(secret: str) -> str:
    """How a credential's secret is stored: its SHA-256 (256 random bits need no slow hash)."""
    return hashlib.sha256(secret.encode()).hexdigest()


def parse_token(token: str) -> tuple[str, str]:
    """``(id, secret)`` of a credential token.

    Raises:
        CredentialRejected: not of the form ``sbc1.<id>.<secret>``.
    """
    parts = token.split(".")
    if len(parts) != 3 or parts[0] != TOKEN_PREFIX or len(parts[1]) != 16 or not parts[2]:
        raise CredentialRejected("malformed")
    return parts[1], parts[2]


class CredentialStore:
    """Issue, verify, list and revoke agent credentials in the SQL store.

    Args:
        url: SQLAlchemy URL (the registry's database).
        engine: Share this engine (the registry's store) instead of creating one
            from ``url``; its owner disposes of it.
    """

    def __init__(self, url: str, engine: Engine | None = None) -> None:
        self._owns_engine = engine is None
        self._engine = engine or make_engine(url)
        self._writer = self._engine.execution_options(sb_write=True)
        SQLModel.metadata.create_all(self._engine, tables=[_CREDENTIALS, BINDINGS])

    def close(self) -> None:
        """Release the engine's connections (unless the engine was lent by its owner)."""
        if self._owns_engine:
            self._engine.dispose()

    def issue(
        self,
        agent: str,
        ttl: float,
        *,
        created_by: str = "",
        note: str = "",
        binding: AgentBinding | None = None,
    ) -> Issued:
        """Issue a credential for ``agent`` valid for ``ttl`` seconds.

        The agent keeps the binding it has; one that has none gets
        ``binding`` (default: an empty one), so every agent holding a
        credential has a binding row. To *change* a binding of an agent that
        may be registered, use the registry (``AgentStore.bind_and_read``),
        which rewrites its registered versions too.
        """
        now = time.time()
        cred_id = base64.b32encode(secrets.token_bytes(10)).decode().lower()
        secret = secrets.token_urlsafe(32)
        row = CredentialRow(
            id=cred_id,
            agent=agent,
            secret_hash=secret_hash(secret),
            created_at=now,
            expires_at=now + ttl,
            created_by=created_by,
            note=note,
        )
        with self._writer.begin() as conn:
            conn.execute(insert(_CREDENTIALS).values(**row.model_dump()))
            if read_binding(conn, agent, lock=True) is None:
                write_binding(
                    conn, binding or AgentBinding(agent=agent, bound_at=now, bound_by=created_by)
                )
        return Issued(row=row.info(), token=f"{TOKEN_PREFIX}.{cred_id}.{secret}")

    def binding(self, agent: str) -> AgentBinding | None:
        """``agent``'s bound attributes (None: it was never enrolled or bound)."""
        with self._engine.connect() as conn:
            return read_binding(conn, agent)

    def unbound_agents(self) -> list[str]:
        """Agents holding a credential (any state) but no binding: enrolled by an older release."""
        query = (
            select(_CREDENTIALS.c.agent)
            .distinct()
            .where(~_CREDENTIALS.c.agent.in_(select(BINDINGS.c.agent)))
            .order_by(_CREDENTIALS.c.agent)
        )
        with self._engine.connect() as conn:
            return [r[0] for r in conn.execute(query)]

    def seed_bindings(self, bindings: Sequence[AgentBinding]) -> int:
        """Store the ``bindings`` of agents that have none yet (legacy enrollments); how many."""
        added = 0
        with self._writer.begin() as conn:
            for binding in bindings:
                if read_binding(conn, binding.agent, lock=True) is None:
                    write_binding(conn, binding)
                    added += 1
        return added

    def verify(self, token: str, now: float | None = None) -> CredentialInfo:
        """The credential ``token`` proves, if it is valid at ``now``.

        Raises:
            CredentialRejected: empty, malformed, unknown, wrong secret,
                expired or revoked.
        """
        if not token:
            raise CredentialRejected("missing")
        cred_id, secret = parse_token(token)
        with Session(self._engine) as session:
            row = session.get(CredentialRow, cred_id)
            if row is None:
                raise CredentialRejected("unknown", cred_id)
            info = row.info()
            stored_hash = row.secret_hash
        if not hmac.compare_digest(stored_hash, secret_hash(secret)):
            raise CredentialRejected("wrong_secret", cred_id, info.agent)
        if info.revoked_at is not None:
            raise CredentialRejected("revoked", cred_id, info.agent)
        if info.expires_at <= (time.time() if now is None else now):
            raise CredentialRejected("expired", cred_id, info.agent)
        return info

    def revoke(self, agent: str, credential_id: str | None = None) -> list[str]:
        """Revoke ``agent``'s active credentials (or just ``credential_id``); returns their ids."""
        now = time.time()
        table = _CREDENTIALS
        cond = (table.c.agent == agent) & table.c.revoked_at.is_(None)
        if credential_id is not None:
            cond = cond & (table.c.id == credential_id)
        with self._engine.begin() as conn:
            ids = [r[0] for r in conn.execute(select(table.c.id).where(cond))]
            if ids:
                conn.execute(update(table).where(table.c.id.in_(ids)).values(revoked_at=now))
        return sorted(ids)

    def list(
        self, agent: str | None = None, *, include_inactive: bool = False
    ) -> Sequence[CredentialInfo]:
        """Credentials, newest first; only active ones unless ``include_inactive``."""
        now = time.time()
        query = select(CredentialRow).order_by(col(CredentialRow.created_at).desc())
        if agent is not None:
            query = query.where(col(CredentialRow.agent) == agent)
        with Session(self._engine) as session:
            rows = [r.info() for r in session.scalars(query)]
        if include_inactive:
            return rows
        return [r for r in rows if r.status(now) == "active"]
