"""Named operators: individual credentials with a role, checked by the auth callout.

The shared bootstrap operator (the static user ``sb-operator``, password in
the secrets folder) is for the first start. From then on each person gets a
credential of their own, ``signalbox operators add NAME --role admin|viewer``:

* the token is ``sbo1.<name>.<id>.<secret>``: the name is in it so the CLI
  knows which subjects to use; the 256-bit secret is shown once and stored
  only as its SHA-256, like an agent's credential;
* the auth callout answers a connection presenting it with a user JWT whose
  permissions are :func:`broker.runtime.permissions.operator_permissions` for that name
  and role: publish ``sb.admin.<service>.<op>.<name>`` only (every operation
  for ``admin``, the read-only ones for ``viewer``), subscribe
  ``_INBOX.operator.<name>.>`` only;
* so the last token of an admin subject is the operator's authenticated
  identity, and services record it as the actor (``operator:<name>``) of
  everything it asks (:meth:`broker.runtime.service.Service.operator`), whatever a
  request body says.

Only an admin (or the bootstrap operator) may add and revoke operators; a
revocation also closes the operator's live connections. The table
``operator_credentials`` lives in the registry's SQL database.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import secrets
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

from sqlalchemy import Engine, insert, select, update
from sqlmodel import Field, Session, SQLModel, col

from broker.runtime.identity import OPERATOR_TOKEN_PREFIX
from broker.runtime.sql import make_engine, table_of
from schemas import (
    AddOperator,
    ListOperators,
    OperatorAdded,
    OperatorInfo,
    OperatorList,
    OperatorRevoked,
    RevokeOperator,
)
from services.registry.credentials import secret_hash

if TYPE_CHECKING:
    from broker.runtime.service import ServiceHost

__all__ = ["OperatorCredentialRow", "OperatorDesk", "OperatorRejected", "OperatorStore"]


class OperatorCredentialRow(SQLModel, table=True):
    """One operator credential (the secret only as its SHA-256)."""

    __tablename__ = "operator_credentials"

    id: str = Field(primary_key=True)
    name: str = Field(index=True)
    role: str
    secret_hash: str
    created_at: float
    expires_at: float
    revoked_at: float | None = None
    created_by: str = ""
    note: str = ""

    def info(self) -> OperatorInfo:
        """The credential as operators see it."""
        return OperatorInfo(
            id=self.id, name=self.name, role=self.role, created_at=self.created_at,
            expires_at=self.expires_at, revoked_at=self.revoked_at,
            created_by=self.created_by, note=self.note,
        )  # fmt: skip


_TABLE = table_of(OperatorCredentialRow)


class OperatorRejected(Exception):
    """A presented operator credential is not valid now; ``reason`` says why."""

    def __init__(self, reason: str, credential_id: str = "", name: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
        self.credential_id = credential_id
        self.name = name


class OperatorStore:
    """Issue, verify, list and revoke operator credentials in the SQL store.

    Args:
        url: SQLAlchemy URL (the registry's database).
        engine: Share this engine instead of creating one from ``url``.
    """

    def __init__(self, url: str, engine: Engine | None = None) -> None:
        self._owns_engine = engine is None
        self._engine = engine or make_engine(url)
        self._writer = self._engine.execution_options(sb_write=True)
        SQLModel.metadata.create_all(self._engine, tables=[_TABLE])

    def close(self) -> None:
        """Release the engine's connections (unless the engine was lent)."""
        if self._owns_engine:
            self._engine.dispose()

    def issue(
        self, name: str, role: str, ttl: float, *, created_by: str = "", note: str = ""
    ) -> tuple[OperatorInfo, str]:
        """A new credential for operator ``name``: its row and the token (shown once)."""
        now = time.time()
        cred_id = base64.b32encode(secrets.token_bytes(10)).decode().lower()
        secret = secrets.token_urlsafe(32)
        row = OperatorCredentialRow(
            id=cred_id, name=name, role=role, secret_hash=secret_hash(secret), created_at=now,
            expires_at=now + ttl, created_by=created_by, note=note,
        )  # fmt: skip
        with self._writer.begin() as conn:
            conn.execute(insert(_TABLE).values(**row.model_dump()))
        return row.info(), f"{OPERATOR_TOKEN_PREFIX}.{name}.{cred_id}.{secret}"

    def verify(self, token: str, now: float | None = None) -> OperatorInfo:
        """The operator credential ``token`` proves, if valid at ``now``.

        Raises:
            OperatorRejected: malformed, unknown, wrong secret, another name,
                expired or revoked.
        """
        parts = token.split(".")
        if len(parts) != 4 or parts[0] != OPERATOR_TOKEN_PREFIX or len(parts[2]) != 16:
            raise OperatorRejected("malformed")
        _, name, cred_id, secret = parts
        with Session(self._engine) as session:
            row = session.get(OperatorCredentialRow, cred_id)
            if row is None:
                raise OperatorRejected("unknown", cred_id)
            info, stored = row.info(), row.secret_hash
        if not hmac.compare_digest(stored, secret_hash(secret)) or info.name != name:
            raise OperatorRejected("wrong_secret", cred_id, info.name)
        if info.revoked_at is not None:
            raise OperatorRejected("revoked", cred_id, info.name)
        if info.expires_at <= (time.time() if now is None else now):
            raise OperatorRejected("expired", cred_id, info.name)
        return info

    def revoke(self, name: str, credential_id: str | None = None) -> list[str]:
        """Revoke ``name``'s active credentials (or one); returns their ids."""
        cond = (_TABLE.c.name == name) & _TABLE.c.revoked_at.is_(None)
        if credential_id is not None:
            cond = cond & (_TABLE.c.id == credential_id)
        with self._writer.begin() as conn:
            ids = [r[0] for r in conn.execute(select(_TABLE.c.id).where(cond))]
            if ids:
                conn.execute(
                    update(_TABLE).where(_TABLE.c.id.in_(ids)).values(revoked_at=time.time())
                )
        return sorted(ids)

    def list(self, *, include_inactive: bool = False) -> Sequence[OperatorInfo]:
        """Operator credentials, newest first; only active ones unless ``include_inactive``."""
        now = time.time()
        query = select(OperatorCredentialRow).order_by(col(OperatorCredentialRow.created_at).desc())
        with Session(self._engine) as session:
            rows = [r.info() for r in session.scalars(query)]
        return rows if include_inactive else [r for r in rows if r.status(now) == "active"]


class OperatorDesk:
    """The registry's ``sb.admin.operators.{add,list,revoke}`` endpoints.

    Args:
        service: The registry (endpoints, settings, audit, the operator actor).
        disconnect: Closes every live connection of a NATS user name (the
            registry's system connection); returns how many.
    """

    def __init__(self, service: ServiceHost, disconnect: Callable[[str], Awaitable[int]]) -> None:
        self.service = service
        #: Where operator credentials live (set when the registry starts).
        self.store: OperatorStore | None = None
        self._disconnect = disconnect
        s = service.subjects
        service.endpoint(s.admin("operators", "add"), AddOperator)(self.add)
        service.endpoint(s.admin("operators", "list"), ListOperators)(self.list)
        service.endpoint(s.admin("operators", "revoke"), RevokeOperator)(self.revoke)

    async def add(self, request: AddOperator) -> OperatorAdded:
        """Issue a credential for an operator (returned once, stored hashed; audited)."""
        by = self.service.operator()
        ttl = request.ttl or self.service.settings.operator_credential_ttl
        info, token = await asyncio.to_thread(
            self._store().issue, request.name, request.role, ttl, created_by=by, note=request.note
        )
        await self._audit("add", by, name=request.name, role=request.role, credential=info.id,
                          expires_at=info.expires_at, note=request.note)  # fmt: skip
        return OperatorAdded(operator=info, token=token)

    async def list(self, request: ListOperators) -> OperatorList:
        """Operator credentials (never their secrets)."""
        rows = await asyncio.to_thread(
            self._store().list, include_inactive=request.include_inactive
        )
        return OperatorList(operators=tuple(rows))

    async def revoke(self, request: RevokeOperator) -> OperatorRevoked:
        """Revoke an operator's credentials and close its live connections (audited)."""
        by = self.service.operator()
        ids = await asyncio.to_thread(self._store().revoke, request.name, request.credential)
        disconnected = await self._disconnect(f"operator:{request.name}") if ids else 0
        await self._audit("revoke", by, name=request.name, credentials=ids,
                          disconnected=disconnected, reason=request.reason)  # fmt: skip
        return OperatorRevoked(name=request.name, credentials=tuple(ids), disconnected=disconnected)

    def _store(self) -> OperatorStore:
        if self.store is None:
            raise RuntimeError("the registry is not started")
        return self.store

    async def _audit(self, op: str, actor: str, **data: Any) -> None:
        await self.service.audit.emit(
            "admin",
            subject=self.service.subjects.admin("operators", op),
            actor=actor,
            data={"op": f"operators.{op}", **data},
        )
