"""Agent identity inside the registry: enrollment, revocation and the auth callout.

Operator-only endpoints (the server lets only operators and services
publish on ``sb.admin.>``)::

    sb.admin.registry.enroll        EnrollAgent      -> Enrolled
    sb.admin.registry.revoke        RevokeAgent      -> Revoked
    sb.admin.registry.credentials   ListCredentials  -> CredentialList

Revoking marks the credentials revoked in the SQL store (the callout
refuses them from then on) and disconnects the agent's live connections
on every server of the cluster (``$SYS.REQ.SERVER.PING.CONNZ`` to find
them, ``$SYS.REQ.SERVER.<id>.KICK`` to close them, as the system
account's ``sb-system`` user). Connections of the agent that hold another,
still valid credential reconnect on their own and pass the callout again.

When the server runs without identity (an open server: no secrets
folder), enrollment still records credentials but nothing enforces them;
the registry logs a warning at start.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from nats.aio.client import Client
from nats.aio.msg import Msg
from sqlalchemy import Engine

from broker.connection import connect
from broker.errors import ConfigError
from broker.identity import (
    ACCOUNT,
    SYSTEM_USER,
    ServerSecrets,
    resolve_secrets_dir,
)
from broker.service import Service
from schemas import (
    CredentialList,
    EnrollAgent,
    Enrolled,
    ListCredentials,
    RevokeAgent,
    Revoked,
)
from services.registry.authcallout import AuthCallout
from services.registry.credentials import CredentialStore

__all__ = ["Identity"]

log = logging.getLogger(__name__)

#: How long a revocation collects CONNZ answers from the cluster's servers.
CONNZ_WINDOW = 0.5


class Identity:
    """Enrollment, revocation and the auth callout, attached to the registry service.

    Args:
        service: The registry service (its endpoints, audit emitter, settings).
    """

    def __init__(self, service: Service) -> None:
        self.service = service
        self.settings = service.settings
        self.store: CredentialStore | None = None
        self.callout: AuthCallout | None = None
        self._sys: Client | None = None
        s = service.subjects
        service.endpoint(s.admin("registry", "enroll"), EnrollAgent)(self.enroll)
        service.endpoint(s.admin("registry", "revoke"), RevokeAgent)(self.revoke)
        service.endpoint(s.admin("registry", "credentials"), ListCredentials)(self.credentials)

    @property
    def credential_store(self) -> CredentialStore:
        """The credential store (after :meth:`start`)."""
        if self.store is None:
            raise RuntimeError("identity not started")
        return self.store

    async def start(self, engine: Engine | None = None) -> None:
        """Open the credential store; answer the auth callout if the server has identity on.

        Args:
            engine: The registry store's engine, shared (one pool per database).
        """
        self.store = await asyncio.to_thread(
            CredentialStore, self.settings.resolved_database_url, engine
        )
        folder = resolve_secrets_dir(self.settings)
        if not (folder / "issuer.nk").exists():
            log.warning(
                "no secrets in %s: the NATS server is assumed open (no identity enforced); "
                "`signalbox up` generates them on first start",
                folder,
            )
            return
        try:
            secrets = ServerSecrets.load(folder)
        except ConfigError:
            await self.stop()
            raise
        self.callout = AuthCallout(self.settings, secrets, self.store, self.service.audit)
        await self.callout.start()
        self._sys = await connect(
            self.settings.nats_url,
            name="signalbox-registry-system",
            connect_timeout=self.settings.connect_timeout,
            user=SYSTEM_USER,
            password=secrets.system_password,
        )

    async def stop(self) -> None:
        """Stop the callout and close connections and the store."""
        if self.callout is not None:
            await self.callout.stop()
            self.callout = None
        if self._sys is not None:
            await self._sys.close()
            self._sys = None
        if self.store is not None:
            await asyncio.to_thread(self.store.close)
            self.store = None

    # -- endpoints -------------------------------------------------------------------

    async def enroll(self, request: EnrollAgent) -> Enrolled:
        """Issue a credential for ``request.name`` (returned once, stored hashed)."""
        ttl = request.ttl or self.settings.agent_credential_ttl
        issued = await asyncio.to_thread(
            self.credential_store.issue,
            request.name,
            ttl,
            created_by="operator",
            note=request.note,
        )
        await self._audit(
            "enroll",
            agent=request.name,
            credential=issued.row.id,
            expires_at=issued.row.expires_at,
            note=request.note,
        )
        return Enrolled(credential=issued.row, token=issued.token)

    async def revoke(self, request: RevokeAgent, *, disconnect: bool = True) -> Revoked:
        """Revoke credentials of ``request.name`` and disconnect its live connections."""
        ids = await asyncio.to_thread(
            self.credential_store.revoke, request.name, request.credential
        )
        disconnected = await self.disconnect(request.name) if ids and disconnect else 0
        await self._audit(
            "revoke",
            agent=request.name,
            credentials=ids,
            disconnected=disconnected,
            reason=request.reason,
        )
        return Revoked(agent=request.name, credentials=tuple(ids), disconnected=disconnected)

    async def _audit(self, op: str, **data: Any) -> None:
        """An ``admin`` audit event for operation ``op`` on ``sb.admin.registry.<op>``."""
        await self.service.audit.emit(
            "admin",
            subject=self.service.subjects.admin("registry", op),
            actor="operator",
            data={"op": op, **data},
        )

    async def revoke_all(self, agent: str, *, reason: str, disconnect: bool = True) -> Revoked:
        """Revoke every credential of ``agent`` (used when its last version is deregistered)."""
        return await self.revoke(RevokeAgent(name=agent, reason=reason), disconnect=disconnect)

    async def credentials(self, request: ListCredentials) -> CredentialList:
        """Credentials of one agent or all (never their secrets)."""
        rows = await asyncio.to_thread(
            self.credential_store.list, request.name, include_inactive=request.include_inactive
        )
        return CredentialList(items=tuple(rows))

    # -- disconnecting ------------------------------------------------------------------

    async def disconnect(self, agent: str) -> int:
        """Close every live connection authenticated as ``agent`` (all servers); returns count."""
        if self._sys is None:
            return 0
        targets: list[tuple[str, int]] = []
        for server_id, conns in await self._connz():
            targets += [(server_id, c["cid"]) for c in conns if c.get("authorized_user") == agent]
        kicked = 0
        for server_id, cid in targets:
            try:
                reply = await self._sys.request(
                    f"$SYS.REQ.SERVER.{server_id}.KICK",
                    json.dumps({"cid": cid}).encode(),
                    timeout=2.0,
                )
            except TimeoutError:
                log.warning("revoke %s: server %s did not answer the kick of cid %s",
                            agent, server_id, cid)  # fmt: skip
                continue
            if not json.loads(reply.data or b"{}").get("error"):
                kicked += 1
        return kicked

    async def _connz(self) -> list[tuple[str, list[dict[str, Any]]]]:
        """Client connections of account SB on every server (answers gathered for a window)."""
        assert self._sys is not None
        answers: list[tuple[str, list[dict[str, Any]]]] = []

        async def on_answer(msg: Msg) -> None:
            try:
                body = json.loads(msg.data)
                answers.append(
                    (body["server"]["id"], list(body["data"].get("connections") or []))
                )
            except (ValueError, KeyError, TypeError):
                log.warning("revoke: unreadable CONNZ answer %r", msg.data[:200])

        inbox = self._sys.new_inbox()
        sub = await self._sys.subscribe(inbox, cb=on_answer)
        try:
            await self._sys.publish(
                "$SYS.REQ.SERVER.PING.CONNZ",
                json.dumps({"acc": ACCOUNT, "auth": True, "limit": 100_000}).encode(),
                reply=inbox,
            )
            await asyncio.sleep(CONNZ_WINDOW)
        finally:
            await sub.unsubscribe()
        return answers
