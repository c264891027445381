"""Agent credentials: issued by operators, checked by the auth callout, revocable.

A credential is ``sbc1.<id>.<secret>``: ``id`` (16 base32 characters) is
public and names the credential in listings and audit events; ``secret``
(256 random bits) is shown once at enrollment and stored only as its
SHA-256 (a slow hash buys nothing against 256 random bits, and the callout
checks a credential on every agent connect). A credential is bound to one
agent name, expires, and can be revoked; the callout refuses it afterwards.

The table lives in the registry's SQL database (SQLite or PostgreSQL).
Calls are synchronous SQLAlchemy, run in a worker thread by the caller.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from sqlalchemy import Engine, select, update
from sqlmodel import Field, Session, SQLModel, col

from broker.sql import make_engine, table_of
from schemas import CredentialInfo

__all__ = ["CredentialRejected", "CredentialRow", "CredentialStore", "Issued", "parse_token"]

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


_CREDENTIALS = table_of(CredentialRow)


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


def _hash(secret: str) -> str:
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
        SQLModel.metadata.create_all(self._engine, tables=[_CREDENTIALS])

    def close(self) -> None:
        """Release the engine's connections (unless the engine was lent by its owner)."""
        if self._owns_engine:
            self._engine.dispose()

    def issue(
        self, agent: str, ttl: float, *, created_by: str = "", note: str = ""
    ) -> Issued:
        """Issue a credential for ``agent`` valid for ``ttl`` seconds."""
        now = time.time()
        cred_id = base64.b32encode(secrets.token_bytes(10)).decode().lower()
        secret = secrets.token_urlsafe(32)
        row = CredentialRow(
            id=cred_id,
            agent=agent,
            secret_hash=_hash(secret),
            created_at=now,
            expires_at=now + ttl,
            created_by=created_by,
            note=note,
        )
        with Session(self._engine) as session:
            session.add(row)
            session.commit()
            info = row.info()
        return Issued(row=info, token=f"{TOKEN_PREFIX}.{cred_id}.{secret}")

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
        if not hmac.compare_digest(stored_hash, _hash(secret)):
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
