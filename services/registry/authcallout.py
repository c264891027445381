"""The registry's NATS auth-callout responder: agent credentials in, signed user JWTs out.

The server sends every agent connection attempt to ``$SYS.REQ.USER.AUTH``
(in the AUTH account, where only this responder's user lives) as an
authorization-request JWT. The responder checks the presented token
(:class:`~services.registry.credentials.CredentialStore`) and answers with
an authorization-response JWT signed by the callout issuer key: either a
user JWT for the agent's account ``SB`` with that agent's permissions
(:func:`broker.identity.agent_permissions`) and an expiry of at most
``auth_session_ttl`` seconds (never past the credential's own expiry), or
an error. The server enforces the permissions from then on; the agent's
client reconnects when the user JWT expires, and its credential is
checked again.

Every decision is audited (kind ``auth``) and counted by outcome.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from typing import Any

import nkeys
from nats.aio.client import Client
from nats.aio.msg import Msg

from broker.audit import AuditEmitter
from broker.connection import connect
from broker.errors import InvalidInput
from broker.identity import (
    ACCOUNT,
    AUTH_USER,
    CALLOUT_SUBJECT,
    ServerSecrets,
    agent_permissions,
    decode_jwt,
    encode_jwt,
)
from broker.settings import Settings
from broker.subjects import Subjects
from services.registry.credentials import CredentialRejected, CredentialStore

__all__ = ["AuthCallout"]

log = logging.getLogger(__name__)


class AuthCallout:
    """Answers the server's authorization requests for agent connections.

    Args:
        settings: Settings (URL, session lifetime, subject prefix).
        secrets: The deployment's secrets (issuer key, auth user's password).
        store: Where credentials are checked.
        audit: Emitter of ``auth`` audit events.
    """

    def __init__(
        self,
        settings: Settings,
        secrets: ServerSecrets,
        store: CredentialStore,
        audit: AuditEmitter,
    ) -> None:
        self.settings = settings
        self.subjects = Subjects(settings.subject_prefix)
        self._issuer: nkeys.KeyPair = secrets.issuer()
        self._auth_password = secrets.auth_password
        self.store = store
        self.audit = audit
        #: Decisions by outcome: ``allowed`` or ``refused:<reason>``.
        self.decisions: collections.Counter[str] = collections.Counter()
        self._nc: Client | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        """Connect as the auth user and answer requests (queue group ``sb-auth``)."""
        self._nc = await connect(
            self.settings.nats_url,
            name="signalbox-registry-auth",
            connect_timeout=self.settings.connect_timeout,
            user=AUTH_USER,
            password=self._auth_password,
        )
        await self._nc.subscribe(CALLOUT_SUBJECT, queue="sb-auth", cb=self._on_request)
        await self._nc.flush()

    async def stop(self) -> None:
        """Stop answering; in-flight answers finish first."""
        nc, self._nc = self._nc, None
        if nc is None:
            return
        await nc.drain()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _on_request(self, msg: Msg) -> None:
        # Each request in its own task: the credential check does SQL I/O.
        task = asyncio.ensure_future(self._answer(msg))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _answer(self, msg: Msg) -> None:
        try:
            response = await self.authorize(msg.data.decode(errors="replace"))
        except Exception:  # never let one request kill the responder
            log.exception("auth callout: answering failed")
            self.decisions["refused:internal"] += 1
            return
        if response is not None and msg.reply:
            await msg.respond(response.encode())

    async def authorize(self, request_jwt: str) -> str | None:
        """The signed authorization response to one request (None: unanswerable).

        A request that is not a valid authorization request JWT gets no
        answer: the server then refuses the connection on its own timeout.
        """
        try:
            claims = decode_jwt(request_jwt)
            req = claims["nats"]
            if req.get("type") != "authorization_request":
                raise InvalidInput("not an authorization request")
            user_nkey: str = req["user_nkey"]
            server_id: str = req["server_id"]["id"]
        except (InvalidInput, KeyError, TypeError) as exc:
            log.warning("auth callout: ignoring a malformed request: %s", exc)
            self.decisions["refused:malformed_request"] += 1
            return None
        opts: dict[str, Any] = req.get("connect_opts") or {}
        client: dict[str, Any] = req.get("client_info") or {}
        token = str(opts.get("auth_token") or "")
        try:
            cred = await asyncio.to_thread(self.store.verify, token)
        except CredentialRejected as rejected:
            self.decisions[f"refused:{rejected.reason}"] += 1
            await self._audit(
                rejected.agent or "unknown",
                "refused",
                reason=rejected.reason,
                credential=rejected.credential_id,
                client=client,
            )
            return self._response(user_nkey, server_id, error=f"credential {rejected.reason}")
        now = time.time()
        expires = int(min(now + self.settings.auth_session_ttl, cred.expires_at))
        if expires <= int(now):  # expires within the second: refuse rather than race
            self.decisions["refused:expired"] += 1
            await self._audit(
                cred.agent, "refused", reason="expired", credential=cred.id, client=client
            )
            return self._response(user_nkey, server_id, error="credential expired")
        perms = agent_permissions(self.subjects, cred.agent)
        user_jwt = encode_jwt(
            {
                "sub": user_nkey,
                "aud": ACCOUNT,
                "name": cred.agent,
                "exp": expires,
                "nats": {
                    **perms.jwt_claims(),
                    "subs": -1,
                    "data": -1,
                    "payload": -1,
                    "type": "user",
                    "version": 2,
                },
            },
            self._issuer,
        )
        self.decisions["allowed"] += 1
        await self._audit(
            cred.agent, "allowed", reason="", credential=cred.id, client=client, expires=expires
        )
        return self._response(user_nkey, server_id, user_jwt=user_jwt)

    def _response(
        self, user_nkey: str, server_id: str, *, user_jwt: str = "", error: str = ""
    ) -> str:
        body: dict[str, Any] = {"type": "authorization_response", "version": 2}
        if user_jwt:
            body["jwt"] = user_jwt
        else:
            body["error"] = error
        return encode_jwt({"sub": user_nkey, "aud": server_id, "nats": body}, self._issuer)

    async def _audit(
        self,
        agent: str,
        outcome: str,
        *,
        reason: str,
        credential: str,
        client: dict[str, Any],
        expires: int = 0,
    ) -> None:
        data: dict[str, Any] = {
            "outcome": outcome,
            "agent": agent,
            "credential": credential,
            "client_host": client.get("host", ""),
            "client_id": client.get("id", 0),
        }
        if reason:
            data["reason"] = reason
        if expires:
            data["session_expires"] = expires
        await self.audit.emit("auth", subject=CALLOUT_SUBJECT, actor=agent, data=data)
