"""Agent identity inside the registry: enrollment, revocation and the auth callout.

Operator-only endpoints (the server lets only operators and services
publish on ``sb.admin.>``)::

    sb.admin.registry.enroll        EnrollAgent      -> Enrolled
    sb.admin.registry.bind          BindAgent        -> Bound
    sb.admin.registry.binding       GetBinding       -> AgentBinding
    sb.admin.registry.revoke        RevokeAgent      -> Revoked
    sb.admin.registry.credentials   ListCredentials  -> CredentialList

Enrollment and ``bind`` set the agent's governance attributes (team, owner,
namespace, region, projects, principal tags: :mod:`services.registry.binding`);
the registry rewrites the agent's registered versions with them at once and
applies them to every later registration (identity on). Both are audited
(kind ``admin``) with the binding before and after.

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
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg
from sqlalchemy import Engine

from broker.connection import connect
from broker.errors import ConfigError, InvalidInput, NotFound
from broker.runtime.identity import (
    ACCOUNT,
    SYSTEM_USER,
    ServerSecrets,
    resolve_secrets_dir,
)
from broker.runtime.service import ServiceHost
from schemas import (
    AgentBinding,
    BindAgent,
    Bound,
    CredentialList,
    EnrollAgent,
    Enrolled,
    GetBinding,
    ListCredentials,
    RevokeAgent,
    Revoked,
)
from services.registry.authcallout import AuthCallout
from services.registry.binding import binding_changes, changed_fields
from services.registry.credentials import CredentialStore
from services.registry.operators import OperatorDesk, OperatorStore
from services.registry.store import Rebound

#: Changes an agent's bound attributes and rewrites its registered versions
#: (``RegistryService.rebind``): name, changes, the authenticated actor.
Rebind = Callable[[str, dict[str, Any], str], Awaitable[Rebound]]

__all__ = ["Identity"]

log = logging.getLogger(__name__)

#: How long a revocation collects CONNZ answers from the cluster's servers.
CONNZ_WINDOW = 0.5


class Identity:
    """Enrollment, revocation and the auth callout, attached to the registry service.

    Args:
        service: The service it lives in (endpoints, audit emitter, settings).
        rebind: Changes a binding with the registered versions (the registry's store).
    """

    def __init__(self, service: ServiceHost, *, rebind: Rebind) -> None:
        self.service = service
        self._rebind = rebind
        self.settings = service.settings
        self.store: CredentialStore | None = None
        self.callout: AuthCallout | None = None
        self._sys: Client | None = None
        s = service.subjects
        service.endpoint(s.admin("registry", "enroll"), EnrollAgent)(self.enroll)
        service.endpoint(s.admin("registry", "bind"), BindAgent)(self.bind)
        service.endpoint(s.admin("registry", "binding"), GetBinding)(self.binding)
        service.endpoint(s.admin("registry", "revoke"), RevokeAgent)(self.revoke)
        service.endpoint(s.admin("registry", "credentials"), ListCredentials)(self.credentials)
        #: Named operators (``sb.admin.operators.*``; the store after :meth:`start`).
        self.operators = OperatorDesk(service, self.disconnect)

    @property
    def enforced(self) -> bool:
        """The NATS server checks identities (the callout runs): bindings apply to registrations.

        False on an open server (no secrets), where anyone may connect as
        anything and registrations keep their declared attributes.
        """
        return self.callout is not None

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
        self.operators.store = await asyncio.to_thread(
            OperatorStore, self.settings.resolved_database_url, engine
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
        self.callout = AuthCallout(
            self.settings, secrets, self.store, self.service.audit, self.operators.store
        )
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
        if self.operators.store is not None:
            await asyncio.to_thread(self.operators.store.close)
            self.operators.store = None

    # -- endpoints -------------------------------------------------------------------

    async def enroll(self, request: EnrollAgent) -> Enrolled:
        """Issue a credential for ``request.name`` (returned once, stored hashed).

        Attributes given in the request are bound first (the agent's
        registered versions are rewritten with them); attributes not given
        keep their bound value, and a new agent without any gets an empty
        binding, so it can register only without team, owner, namespace,
        region, project or tags until an operator binds them.
        """
        ttl = request.ttl or self.settings.agent_credential_ttl
        by = self.service.operator(request.requested_by)
        changes = binding_changes(request)
        before: AgentBinding | None = None
        binding: AgentBinding | None = None
        if changes:
            rebound = await self._rebind(request.name, changes, by)
            before, binding = rebound.before, rebound.after
        issued = await asyncio.to_thread(
            self.credential_store.issue,
            request.name,
            ttl,
            created_by=by,
            note=request.note,
        )
        if binding is None:
            binding = await asyncio.to_thread(self.credential_store.binding, request.name)
        data: dict[str, Any] = {
            "agent": request.name,
            "credential": issued.row.id,
            "expires_at": issued.row.expires_at,
            "note": request.note,
            "binding": msgspec.to_builtins(binding) if binding is not None else None,
        }
        if changes and binding is not None:
            data["before"] = msgspec.to_builtins(before) if before is not None else None
            data["changed"] = list(changed_fields(before, binding))
        await self._audit("enroll", actor=by, **data)
        return Enrolled(credential=issued.row, token=issued.token, binding=binding)

    async def bind(self, request: BindAgent) -> Bound:
        """Change an enrolled agent's bound attributes (only those given), at once.

        Raises:
            InvalidInput: no attribute given.
            NotFound: the agent was never enrolled.
        """
        changes = binding_changes(request)
        if not changes:
            raise InvalidInput(
                f"nothing to bind for {request.name}: give at least one of --team, --owner, "
                "--namespace, --region, --project, --tag",
                details={"agent": request.name},
            )
        store = self.credential_store
        existing = await asyncio.to_thread(store.binding, request.name)
        if existing is None and not await asyncio.to_thread(
            store.list, request.name, include_inactive=True
        ):
            raise NotFound(
                f"agent {request.name!r} was never enrolled; enroll it with its attributes: "
                f"`signalbox agents enroll {request.name} --team ... --owner ...`",
                details={"agent": request.name},
            )
        by = self.service.operator(request.requested_by)
        rebound = await self._rebind(request.name, changes, by)
        changed = changed_fields(rebound.before, rebound.after)
        await self._audit(
            "bind",
            actor=by,
            agent=request.name,
            before=msgspec.to_builtins(rebound.before) if rebound.before is not None else None,
            after=msgspec.to_builtins(rebound.after),
            changed=list(changed),
            versions=rebound.rewritten,
            reason=request.reason,
        )
        return Bound(
            binding=rebound.after,
            previous=rebound.before,
            changed=changed,
            versions=rebound.rewritten,
        )

    async def binding(self, request: GetBinding) -> AgentBinding:
        """An agent's bound attributes.

        Raises:
            NotFound: the agent has no binding (never enrolled).
        """
        found = await asyncio.to_thread(self.credential_store.binding, request.name)
        if found is None:
            raise NotFound(
                f"agent {request.name!r} has no bound attributes: it was never enrolled "
                f"(`signalbox agents enroll {request.name} --team ...`)",
                details={"agent": request.name},
            )
        return found

    async def revoke(
        self, request: RevokeAgent, *, disconnect: bool = True, actor: str = ""
    ) -> Revoked:
        """Revoke credentials of ``request.name`` and disconnect its live connections.

        ``actor``: who does it (default: the operator whose request this is).
        """
        ids = await asyncio.to_thread(
            self.credential_store.revoke, request.name, request.credential
        )
        disconnected = await self.disconnect(request.name) if ids and disconnect else 0
        await self._audit(
            "revoke",
            actor=actor or self.service.operator(),
            agent=request.name,
            credentials=ids,
            disconnected=disconnected,
            reason=request.reason,
        )
        return Revoked(agent=request.name, credentials=tuple(ids), disconnected=disconnected)

    async def _audit(self, op: str, *, actor: str, **data: Any) -> None:
        """An ``admin`` audit event for operation ``op`` on ``sb.admin.registry.<op>``."""
        await self.service.audit.emit(
            "admin",
            subject=self.service.subjects.admin("registry", op),
            actor=actor,
            data={"op": op, **data},
        )

    async def revoke_all(self, agent: str, *, reason: str, disconnect: bool = True) -> Revoked:
        """Revoke every credential of ``agent`` (used when its last version is deregistered)."""
        return await self.revoke(
            RevokeAgent(name=agent, reason=reason), disconnect=disconnect, actor=self.service.actor
        )

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
                answers.append((body["server"]["id"], list(body["data"].get("connections") or [])))
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
