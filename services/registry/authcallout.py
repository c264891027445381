"""The registry's NATS auth-callout responder: agent credentials in, signed user JWTs out.

The server sends every agent connection attempt to ``$SYS.REQ.USER.AUTH``
(in the AUTH account, where only this responder's user lives) as an
authorization-request JWT. The responder checks the presented token
(:class:`~services.registry.credentials.CredentialStore`) and answers with
an authorization-response JWT signed by the callout issuer key: either a
user JWT for the agent's account ``SB`` with that agent's permissions
(:func:`broker.runtime.permissions.agent_permissions`) and an expiry of at most
``auth_session_ttl`` seconds (never past the credential's own expiry), or
an error. The server enforces the permissions from then on; the agent's
client reconnects when the user JWT expires, and its credential is
checked again.

Every decision is counted by outcome and audited (kind ``auth``):
each allowed connection on its own; failures per source and window
(:class:`broker.runtime.throttle.Summarizer`): a source's first failure at once,
then one summary with the count and the counts by reason when its window
closes (and at stop).

Failed authentication is throttled per source (:class:`broker.runtime.throttle.Backoff`):
``auth_fail_burst`` failures within ``auth_fail_window`` seconds and the
source's next attempts are refused at once, without reading the store,
for a window, doubling each time it is blocked again (up to
``auth_fail_backoff_max``). A source is the client's address plus the
presented credential's id when the failure concerns a real credential
(wrong secret, revoked, expired), and the address alone for what proves
nothing about a credential (missing, malformed, unknown id). So garbage
from an address never blocks a valid credential used from there, and a
success clears only its own credential's key, never the address's. The
refusal is an immediate error answer: nothing here waits (the server gives
the callout 2 s).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from typing import Any, Final

import nkeys
from nats.aio.client import Client
from nats.aio.msg import Msg

from broker.connection import connect
from broker.diagnostics import cancel_and_wait
from broker.errors import InvalidInput
from broker.runtime.audit import AuditEmitter
from broker.runtime.identity import (
    ACCOUNT,
    AUTH_USER,
    CALLOUT_SUBJECT,
    OPERATOR_TOKEN_PREFIX,
    ServerSecrets,
)
from broker.runtime.natsjwt import decode_jwt, encode_jwt
from broker.runtime.permissions import Permissions, agent_permissions, operator_permissions
from broker.runtime.throttle import Backoff, Emit, Summarizer
from broker.settings import Settings
from broker.subjects import Subjects
from services.registry.credentials import CredentialRejected, CredentialStore, parse_token
from services.registry.operators import OperatorRejected, OperatorStore

__all__ = ["AuthCallout", "source_key"]

log = logging.getLogger(__name__)

#: Most failing sources one responder tracks (throttle and audit summaries each).
MAX_SOURCES: Final = 10_000
#: Longest seconds between two flushes of closed audit windows.
FLUSH_INTERVAL: Final = 1.0
#: Reasons that prove nothing about the presented credential id: charged to the address.
ANONYMOUS_REASONS: Final = frozenset({"missing", "malformed", "unknown"})


def source_key(host: str, credential_id: str = "") -> str:
    """The throttle and audit key of a failure: ``host``, or ``host|credential_id``."""
    return f"{host}|{credential_id}" if credential_id else host


def _credential_id(token: str) -> str:
    """The id of a well-formed credential token (an agent's or an operator's); empty if
    missing or malformed (no I/O)."""
    if token.startswith(f"{OPERATOR_TOKEN_PREFIX}."):
        parts = token.split(".")
        return parts[2] if len(parts) == 4 and len(parts[2]) == 16 else ""
    try:
        return parse_token(token)[0]
    except CredentialRejected:
        return ""


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
        operators: OperatorStore | None = None,
    ) -> None:
        self.settings = settings
        self.subjects = Subjects(settings.subject_prefix)
        self._issuer: nkeys.KeyPair = secrets.issuer()
        self._auth_password = secrets.auth_password
        self.store = store
        #: Named operators' credentials (``sbo1.…`` tokens); None: only agents connect here.
        self.operators = operators
        self.audit = audit
        #: Decisions by outcome: ``allowed`` or ``refused:<reason>`` (``throttled``
        #: included: refused without checking).
        self.decisions: collections.Counter[str] = collections.Counter()
        #: Failures per source: blocks a source after a burst.
        self.backoff = Backoff(
            settings.auth_fail_burst,
            settings.auth_fail_window,
            max_block=settings.auth_fail_backoff_max,
            max_keys=MAX_SOURCES,
        )
        #: Failures per source and window, audited as first + summary.
        self.failures: Summarizer[dict[str, Any]] = Summarizer(
            settings.auth_fail_window, max_keys=MAX_SOURCES
        )
        self._nc: Client | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._flusher: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Connect as the auth user and answer requests (queue group ``sb-auth``)."""
        self._nc = await connect(
            self.settings.nats_url,
            name="signalbox-registry-auth",
            connect_timeout=self.settings.connect_timeout,
            user=AUTH_USER,
            password=self._auth_password,
            # Back before the agents after a server restart (they wait 0.5 s): every
            # agent's reconnect needs this responder, or it waits out the callout timeout.
            reconnect_time_wait=0.05,
        )
        await self._nc.subscribe(CALLOUT_SUBJECT, queue="sb-auth", cb=self._on_request)
        await self._nc.flush()
        self._flusher = asyncio.ensure_future(self._flush_periodically())

    async def stop(self) -> None:
        """Stop answering; in-flight answers finish first, then the open failure
        windows are audited (their summaries), so no count is lost."""
        nc, self._nc = self._nc, None
        if nc is None:
            return
        await cancel_and_wait(self._flusher, "auth callout flusher")
        self._flusher = None
        await nc.drain()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.flush(final=True)

    async def flush(self, *, final: bool = False) -> None:
        """Audit the summaries of the closed failure windows (all of them if ``final``)."""
        due = self.failures.flush_all() if final else self.failures.flush_due()
        for emit in due:
            await self._audit_failure(emit)

    async def _flush_periodically(self) -> None:
        interval = min(FLUSH_INTERVAL, self.settings.auth_fail_window / 4)
        pruned_at = time.monotonic()
        while True:
            await asyncio.sleep(interval)
            try:
                await self.flush()
                if time.monotonic() - pruned_at >= self.settings.auth_fail_window:
                    self.backoff.prune()
                    pruned_at = time.monotonic()
            except Exception:  # one bad round must not end the loop
                log.exception("auth callout: flushing failure summaries failed")

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
        host = str(client.get("host") or "?")
        cred_id = _credential_id(token)
        key = source_key(host, cred_id)
        if self.backoff.blocked(key):
            # Cheap refusal: no store read, no hashing, no waiting.
            await self._refused(key, "throttled", "unknown", cred_id, client)
            return self._response(
                user_nkey, server_id, error="too many failed attempts; retry later"
            )
        if token.startswith(f"{OPERATOR_TOKEN_PREFIX}.") and self.operators is not None:
            return await self._authorize_operator(token, key, host, user_nkey, server_id, client)
        try:
            cred = await asyncio.to_thread(self.store.verify, token)
        except CredentialRejected as rejected:
            charged = host if rejected.reason in ANONYMOUS_REASONS else key
            await self._refused(
                charged,
                rejected.reason,
                rejected.agent or "unknown",
                rejected.credential_id,
                client,
            )
            return self._response(user_nkey, server_id, error=f"credential {rejected.reason}")
        now = time.time()
        expires = int(min(now + self.settings.auth_session_ttl, cred.expires_at))
        if expires <= int(now):  # expires within the second: refuse rather than race
            await self._refused(key, "expired", cred.agent, cred.id, client)
            return self._response(user_nkey, server_id, error="credential expired")
        perms = agent_permissions(self.subjects, cred.agent)
        user_jwt = self._user_jwt(user_nkey, cred.agent, expires, perms)
        self.decisions["allowed"] += 1
        # Clears this credential's failures from this address, never the address's own:
        # one valid credential must not reopen guessing at others.
        self.backoff.succeeded(key)
        await self._audit(
            cred.agent, "allowed", reason="", credential=cred.id, client=client, expires=expires
        )
        return self._response(user_nkey, server_id, user_jwt=user_jwt)

    async def _authorize_operator(
        self,
        token: str,
        key: str,
        host: str,
        user_nkey: str,
        server_id: str,
        client: dict[str, Any],
    ) -> str:
        """A named operator's connection: a user JWT with that operator's permissions
        (its role; admin subjects under its own name only, its own inbox)."""
        assert self.operators is not None
        try:
            op = await asyncio.to_thread(self.operators.verify, token)
        except OperatorRejected as rejected:
            charged = key if rejected.credential_id else host
            who = f"operator:{rejected.name}" if rejected.name else "unknown"
            await self._refused(charged, rejected.reason, who, rejected.credential_id, client)
            return self._response(user_nkey, server_id, error=f"credential {rejected.reason}")
        now = time.time()
        expires = int(min(now + self.settings.auth_session_ttl, op.expires_at))
        who = f"operator:{op.name}"
        if expires <= int(now):
            await self._refused(key, "expired", who, op.id, client)
            return self._response(user_nkey, server_id, error="credential expired")
        perms = operator_permissions(self.subjects, op.name, op.role)
        self.decisions["allowed"] += 1
        self.backoff.succeeded(key)
        await self._audit(who, "allowed", reason="", credential=op.id, client=client,
                          expires=expires)  # fmt: skip
        return self._response(
            user_nkey, server_id, user_jwt=self._user_jwt(user_nkey, who, expires, perms)
        )

    def _user_jwt(self, user_nkey: str, name: str, expires: int, perms: Permissions) -> str:
        """A user JWT of account ``SB`` named ``name`` with ``perms``, expiring at ``expires``."""
        return encode_jwt(
            {
                "sub": user_nkey,
                "aud": ACCOUNT,
                "name": name,
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

    async def _refused(
        self, key: str, reason: str, agent: str, credential: str, client: dict[str, Any]
    ) -> None:
        """Count a failure of source ``key``; audit it if it opens the source's window."""
        self.decisions[f"refused:{reason}"] += 1
        if reason != "throttled":
            block = self.backoff.failed(key)
            if block:
                log.warning(
                    "auth callout: %d failed authentications from %s within %gs; refusing it "
                    "without checking for %gs",
                    self.backoff.burst, key, self.backoff.window, block,
                )  # fmt: skip
        payload = {
            "agent": agent,
            "credential": credential,
            "client_host": client.get("host", ""),
            "client_id": client.get("id", 0),
            "at": time.time(),
        }
        for emit in self.failures.note(key, payload, label=reason):
            await self._audit_failure(emit)

    async def _audit_failure(self, emit: Emit[dict[str, Any]]) -> None:
        """An ``auth`` event for a source's first failure of a window, or its summary."""
        first = emit.payload
        data: dict[str, Any] = {
            "outcome": "refused",
            "agent": first["agent"],
            "credential": first["credential"],
            "client_host": first["client_host"],
            "client_id": first["client_id"],
            "reason": emit.label,
            "source": emit.key,
        }
        if emit.kind == "summary":
            data["summary"] = True
            data["failures"] = emit.count
            data["reasons"] = dict(emit.counts)
            data["first_at"] = first["at"]
            data["window"] = self.failures.window
        if emit.overflow:
            data["other_sources"] = True
        await self.audit.emit("auth", subject=CALLOUT_SUBJECT, actor=first["agent"], data=data)

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
