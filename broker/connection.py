"""Connecting to NATS: one helper with sane defaults for services, agents and the CLI."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from asyncio import FIRST_COMPLETED
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import nats
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from tenacity import (
    AsyncRetrying,
    retry_if_exception_type,
    retry_if_not_exception_type,
    stop_after_delay,
    wait_exponential,
)

from broker.errors import AuthenticationFailed, ConfigError, IdentityMismatch

__all__ = [
    "Client",
    "MalformedHandler",
    "RawHandler",
    "SessionClient",
    "Status",
    "connect",
    "is_auth_error",
    "parse_status",
    "permission_violation",
    "sync_connection",
]

log = logging.getLogger(__name__)


async def connect(
    url: str | None,
    *,
    name: str,
    connect_timeout: float = 10.0,
    inbox_prefix: str | None = None,
    **options: Any,
) -> Client:
    """Connect to NATS, retrying the first connection for up to ``connect_timeout`` seconds.

    After the first success nats-py reconnects by itself forever; errors are
    logged (not printed) so a service's output stays readable.

    Args:
        url: ``nats://host:port`` (comma-separate several for a cluster).
        name: Connection name shown in server monitoring (``signalbox-policy``...).
        connect_timeout: Total seconds to keep trying the first connection.
        inbox_prefix: Private reply-subject prefix (agents use ``_INBOX.agent.<name>``).
        **options: Passed to :func:`nats.connect` (credentials, TLS...).

    Raises:
        ConfigError: ``url`` is empty.
        AuthenticationFailed: the server refused the credentials.
        OSError: nothing answered within ``connect_timeout``.
    """
    if not url:
        raise ConfigError(
            "no NATS URL: set SIGNALBOX_NATS_URL or pass --nats-url (or run `signalbox up`)"
        )
    servers = [u.strip() for u in url.split(",") if u.strip()]
    # nats-py retries a refused first connection forever; a refusal of the
    # credentials will not heal by retrying, so stop at the first one.
    refused: asyncio.Future[Exception] = asyncio.get_running_loop().create_future()
    state = _ReconnectState(wait=float(options.pop("reconnect_time_wait", 0.5)))
    user_error_cb = options.pop("error_cb", None)
    user_disconnected_cb = options.pop("disconnected_cb", None)
    user_reconnected_cb = options.pop("reconnected_cb", None)

    async def _error_cb(exc: Exception) -> None:
        denial = permission_violation(exc)
        if denial and is_refused_reply(denial):
            state.refused_replies += 1
            if _sampled(state.refused_replies):
                log.warning("nats connection %s: %s", name, refused_reply_text(denial, state))
            if state.client is not None:
                state.client.note_violation(denial)
        elif denial:
            # The server refused one command and kept the connection: say so where
            # the operator looks (it was a debug line, so only the server log told).
            log.warning(
                "nats connection %s: the server refused %s (this connection's credentials "
                "do not allow it)",
                name,
                denial,
            )
            if state.client is not None:
                state.client.note_violation(denial)
        elif is_auth_error(exc):
            if not state.connected and not refused.done():
                refused.set_result(exc)
            if state.connected:
                state.refusals += 1
                log.warning(
                    "nats connection %s: the server refused its credentials on reconnect "
                    "(revoked, expired, or the registry is down); retrying in %.1fs",
                    name,
                    state.delay(),
                )
        else:
            log.debug("nats connection %s: %r", name, exc)
        if user_error_cb is not None:
            await user_error_cb(exc)

    async def _disconnected_cb() -> None:
        # Counted here, not on reconnect: nats-py flushes what was written meanwhile
        # (a handler's reply) before it calls reconnected_cb, so the server's refusal
        # of that reply can arrive first.
        state.interruptions += 1
        state.refused_replies = 0
        log.info("nats connection %s: disconnected", name)
        if user_disconnected_cb is not None:
            await user_disconnected_cb()

    async def _reconnected_cb() -> None:
        state.refusals = 0
        log.info("nats connection %s: reconnected", name)
        if user_reconnected_cb is not None:
            await user_reconnected_cb()

    kwargs: dict[str, Any] = {
        "servers": servers,
        "name": name,
        # Per attempt. Above the server's auth-callout timeout (2 s): when no
        # registry answers the callout, the server refuses the client after
        # that long, and the refusal (not a timeout) is what explains it.
        "connect_timeout": 4,
        "allow_reconnect": True,
        "max_reconnect_attempts": -1,
        "error_cb": _error_cb,
        "disconnected_cb": _disconnected_cb,
        "reconnected_cb": _reconnected_cb,
        "reconnect_to_server_handler": state.next_server,
        **options,
    }
    if inbox_prefix:
        kwargs["inbox_prefix"] = inbox_prefix
    deadline = time.monotonic() + connect_timeout
    async for attempt in AsyncRetrying(
        stop=stop_after_delay(connect_timeout),
        wait=wait_exponential(multiplier=0.1, max=1.0),
        retry=retry_if_exception_type((OSError, nats.errors.NoServersError, TimeoutError))
        # AuthenticationFailed is a PermissionError, hence an OSError: never retried.
        & retry_if_not_exception_type(AuthenticationFailed),
        reraise=True,
    ):
        with attempt:
            nc = SessionClient()
            state.client = nc
            try:
                # With max_reconnect_attempts=-1 nats-py retries the *first*
                # connection forever too: bound it, or a down server hangs us.
                remaining = max(deadline - time.monotonic(), 0.1)
                attempt_task: asyncio.Future[Any] = asyncio.ensure_future(nc.connect(**kwargs))
                waiting: set[asyncio.Future[Any]] = {attempt_task, refused}
                done, _ = await asyncio.wait(
                    waiting, timeout=remaining, return_when=FIRST_COMPLETED
                )
                if attempt_task not in done:
                    attempt_task.cancel()
                    with contextlib.suppress(BaseException):
                        await attempt_task
                    if refused.done():
                        raise AuthenticationFailed(
                            f"the NATS server at {url} refused the credentials of {name!r}: "
                            "check the credential (SIGNALBOX_AGENT_CREDENTIAL for agents, "
                            "SIGNALBOX_NATS_USER/_PASSWORD or the secrets dir for services and "
                            "the CLI); an agent needs a valid, unexpired, unrevoked credential "
                            "from `signalbox agents enroll`, and a running registry service "
                            "(it checks agent credentials for the server)",
                            details={"url": url, "connection": name},
                        )
                    raise TimeoutError(f"no NATS server answered at {url}")
                attempt_task.result()
            except BaseException:
                with contextlib.suppress(Exception):
                    await nc.close()
                raise
            state.connected = True
            return nc
    raise AssertionError("unreachable")  # pragma: no cover


#: Called with a message's reply subject, payload and raw header block (``b""``
#: when it has none), synchronously, from the connection's read loop.
RawHandler = Callable[[bytes, bytes, bytes], None]

#: Called with a dropped message's subject, reply subject (raw bytes, possibly
#: invalid UTF-8) and the reason, synchronously, from the connection's read loop.
MalformedHandler = Callable[[bytes, bytes, str], None]

# What a subject or reply subject may be off the wire: 1-512 printable ASCII
# bytes (broker.subjects.MAX_SUBJECT_BYTES). The server relays any bytes but
# whitespace; nats-py's reply.decode() on invalid UTF-8 ends its read loop.
_WIRE_SUBJECT = re.compile(rb"[!-~]{1,512}")


class SessionClient(Client):
    """nats-py's client, reconnecting (not closing) when the server ends an expired session.

    Agent connections carry a user JWT that expires after
    ``SIGNALBOX_AUTH_SESSION_TTL``; the server then sends ``-ERR 'User
    Authentication Expired'`` and closes the connection. nats-py 2.16 treats
    that like a fatal protocol error and closes the client for good; the Go
    client reconnects, and so does this one: the reconnect presents the
    credential again, and the auth callout checks it again.

    No input can stop its read loop (nats-py's ends on any exception in
    message processing and leaves the connection deaf until the server pings
    it out, minutes later): a message whose subject or reply subject is not
    1-512 printable ASCII bytes is dropped before nats-py decodes it, any
    other failure to process a message drops that message, and both are
    counted (:attr:`malformed`) and reported to :attr:`on_malformed`. Should
    the read loop end anyway while the connection is up, the connection
    reconnects (:meth:`_read_loop`).

    Also: a faster header parser (:meth:`_parse_header_lines`) and raw
    subscriptions (:meth:`subscribe_raw`) for bulk readers.
    """

    _raw_handlers: dict[int, RawHandler] | None = None
    #: Told about each permission violation the server reports (:meth:`note_violation`).
    _violation_waiters: set[asyncio.Future[str]] | None = None
    #: Messages dropped because they could not be read (see the class docstring).
    malformed: int = 0
    #: Told about each dropped message (services count and audit them).
    on_malformed: MalformedHandler | None = None
    #: Subscriptions whose dropped messages are terminated (:meth:`term_unreadable`).
    _term_sids: set[int] | None = None

    def note_violation(self, denial: str) -> None:
        """Record that the server refused a command (``denial``: what, as the server said it);
        wakes whoever waits in :meth:`next_violation`."""
        waiters, self._violation_waiters = self._violation_waiters or set(), None
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(denial)

    def next_violation(self) -> asyncio.Future[str]:
        """A future resolved with the next permission violation the server reports."""
        waiter: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        if self._violation_waiters is None:
            self._violation_waiters = set()
        self._violation_waiters.add(waiter)
        return waiter

    def term_unreadable(self, sub: Subscription) -> None:
        """Terminate (``+TERM``) the JetStream messages of ``sub`` that are dropped unread.

        For a pull consumer's delivery inbox, on which only JetStream delivers:
        a message never acked is redelivered after ``ack_wait`` forever and
        holds a slot of the consumer's ``max_ack_pending`` meanwhile, so stored
        messages nobody can read (an agent's usage report with a broken header
        block) would stall the consumer for everyone.
        """
        if self._term_sids is None:
            self._term_sids = set()
        self._term_sids.add(sub._id)

    async def subscribe_raw(self, subject: str, handler: RawHandler) -> Subscription:
        """Subscribe with ``handler`` called for each message as it is read off the socket.

        Nothing else happens per message: no header parsing, no ``Msg``, no
        queue and no task switch (nats-py does all four for every message of
        a subscription). For bulk readers that take everything that arrives
        and look at little of it: the audit replay reads twice the records per
        second through this (``bench/audit.py``). ``handler`` must be quick and
        must not raise; it gets bytes (decode what you use; :func:`parse_status`
        reads a status header block). Unsubscribe with the subscription returned.
        """
        sub = await self.subscribe(subject)
        if self._raw_handlers is None:
            self._raw_handlers = {}
        self._raw_handlers[sub._id] = handler
        return sub

    async def _process_msg(
        self, sid: int, subject: bytes, reply: bytes, data: bytes, headers: bytes
    ) -> None:
        if _WIRE_SUBJECT.fullmatch(subject) is None or (
            reply and _WIRE_SUBJECT.fullmatch(reply) is None
        ):
            self._drop(subject, reply, "subject or reply subject is not 1-512 printable ASCII")
            return
        handlers = self._raw_handlers
        handler = handlers.get(sid) if handlers else None
        if handler is None:
            try:
                await super()._process_msg(sid, subject, reply, data, headers)
            except Exception as exc:  # never the read loop's end: drop this message only
                self._drop(subject, reply, f"unreadable message ({type(exc).__name__})")
                if self._term_sids and sid in self._term_sids and reply.startswith(b"$JS.ACK."):
                    with contextlib.suppress(Exception):  # reply: printable ASCII (checked)
                        await self.publish(reply.decode(), b"+TERM")
            return
        if sid not in self._subs:  # unsubscribed: forget it
            del handlers[sid]  # type: ignore[union-attr]
            return
        self.stats["in_msgs"] += 1
        self.stats["in_bytes"] += len(data)
        try:
            handler(reply, data, headers or b"")  # nats-py passes None for no headers
        except Exception:  # a handler bug must not take the connection's read loop down
            log.exception("a raw subscription's handler failed; the message is dropped")

    def _drop(self, subject: bytes, reply: bytes, reason: str) -> None:
        self.malformed += 1
        log.debug("nats: dropped a message on %r: %s", subject[:80], reason)
        hook = self.on_malformed
        if hook is not None:
            try:
                hook(subject, reply, reason)
            except Exception:
                log.exception("the malformed-message hook failed")

    async def _read_loop(self) -> None:
        """nats-py's read loop, and a watchdog: if it ends while the connection is
        still up (an error nats-py only logs), reconnect instead of going deaf."""
        await super()._read_loop()
        if self.is_connected:
            log.error("nats: the connection's read loop ended unexpectedly; reconnecting")
            await self._process_op_err(nats.errors.ProtocolError())

    async def _process_err(self, err_msg: str) -> None:
        if _EXPIRED in err_msg.lower() and self.options.get("allow_reconnect"):
            await self._process_op_err(nats.errors.Error(f"nats: {err_msg.strip(chr(39))}"))
            return
        await super()._process_err(err_msg)

    @staticmethod
    def _parse_header_lines(raw: bytes) -> dict[str, str]:
        """nats-py's header-block parser with the same rules, several times faster.

        nats-py 2.16 tests every header name for whitespace one character at
        a time through a generator, which was the largest single cost of
        reading the audit stream (a profile of ``bench/audit.py``'s replay)
        and is paid on every message with headers, calls included. Property-
        tested against nats-py's own parser (``tests/broker/test_connection_headers.py``).
        """
        out: dict[str, str] = {}
        for line in raw.split(b"\r\n"):
            if not line:
                continue
            name, sep, value = line.partition(b":")
            if not sep:
                continue
            try:
                key = name.strip().decode("ascii")
            except UnicodeDecodeError:
                continue  # a malformed (non-ASCII) name: skipped, as nats-py does
            if _WHITESPACE.search(key) is not None:
                continue  # whitespace inside a name is invalid: skipped, as nats-py does
            out[key] = value.strip().decode("utf-8", "replace")
        return out


@dataclass(frozen=True, slots=True)
class Status:
    """A status message from the server (``NATS/1.0 <code> <description>`` header block).

    Attributes:
        code: ``"100"`` (idle heartbeat, flow control), ``"404"``, ``"408"``, ``"503"``...
        description: What follows the code, e.g. ``"Idle Heartbeat"``.
        headers: The header lines after the status line.
    """

    code: str
    description: str
    headers: dict[str, str]


def parse_status(block: bytes) -> Status | None:
    """The status in a raw header block (see :meth:`SessionClient.subscribe_raw`); None
    when the block is a plain header block (``NATS/1.0`` and header lines) or empty."""
    if not block.startswith(_STATUS_LINE):
        return None
    line, _, rest = block[len(_STATUS_LINE) :].partition(b"\r\n")
    code, _, description = line.strip().partition(b" ")
    return Status(
        code=code.decode("ascii", "replace"),
        description=description.strip().decode("utf-8", "replace"),
        headers=SessionClient._parse_header_lines(rest),
    )


_STATUS_LINE = b"NATS/1.0 "
_EXPIRED = "user authentication expired"
#: What ``str.isspace`` calls whitespace, for the ASCII of a header name.
_WHITESPACE = re.compile(r"\s")


class _ReconnectState:
    """Round-robin over the servers; back off while the server refuses our credentials."""

    def __init__(self, wait: float) -> None:
        self.wait = wait
        self.connected = False
        self.refusals = 0
        self._turn = 0
        #: The client being connected (told about permission violations).
        self.client: SessionClient | None = None
        #: Disconnections so far, and replies refused since the last one (or connecting).
        self.interruptions = 0
        self.refused_replies = 0

    def delay(self) -> float:
        if self.refusals == 0:
            return self.wait
        if self.refusals <= _QUICK_REFUSALS:
            # Right after a server restart the registry's callout responder may not be
            # back yet: the first refusals are retried quickly, not backed off.
            return min(self.wait, _QUICK_REFUSED_WAIT)
        return float(min(_MAX_REFUSED_WAIT, self.wait * 2 ** (self.refusals - _QUICK_REFUSALS)))

    def next_server(self, servers: list[Any], _info: dict[str, Any]) -> tuple[Any, float]:
        self._turn += 1
        return servers[self._turn % len(servers)], self.delay()


#: Longest wait between reconnects the server keeps refusing (a revoked agent
#: retries at this pace, in case it was the registry that was down).
_MAX_REFUSED_WAIT = 30.0
#: Refusals retried at once (``_QUICK_REFUSED_WAIT``) before backing off: a server
#: that just restarted refuses everyone until the registry's callout is back.
_QUICK_REFUSALS = 3
_QUICK_REFUSED_WAIT = 0.25


def permission_violation(exc: BaseException) -> str:
    """What the server refused, if ``exc`` is its ``Permissions Violation`` error, else ``""``.

    nats-py lower-cases the server's text: ``permissions violation for
    subscription to "_inbox.agent.a.x"``.
    """
    text = str(exc)
    marker = "permissions violation for "
    at = text.lower().find(marker)
    return text[at + len(marker) :].strip() if at >= 0 else ""


def is_refused_reply(denial: str) -> bool:
    """True if ``denial`` (see :func:`permission_violation`) is a publish to an inbox:
    a reply the server did not grant (agents may answer only requests they received)."""
    return denial.startswith('publish to "_inbox.')


def _sampled(count: int) -> bool:
    """Log the 1st, 10th, 100th... of a burst (each line says how many so far)."""
    return count == 1 or (count % 10 == 0 and str(count).rstrip("0") == "1")


def refused_reply_text(denial: str, state: _ReconnectState) -> str:
    """Why the server refused a reply, in words an operator can act on."""
    subject = denial.removeprefix("publish to ")
    count = state.refused_replies
    so_far = f" ({count} since the connection was (re)established)" if count > 1 else ""
    if state.interruptions:
        why = (
            "most likely it answers a request received before the connection was "
            "re-established (else a second reply, or one to a request never received): the "
            "server grants a reply only on the connection the request arrived on, once. The "
            "caller sees that call as one that may have run (outcome_unknown); a retry with "
            "the same idempotency key (Sb-Idempotency-Key) gets this run's result"
        )
    else:
        why = (
            "an agent may answer each request it received once, and publish to no other "
            "inbox: a second reply to the same request, or a reply to a request this "
            "connection never received, is refused"
        )
    return f"the server refused a reply to {subject}{so_far}: {why}"


def is_auth_error(exc: BaseException) -> bool:
    """True if ``exc`` is the server refusing a connection's credentials."""
    return isinstance(exc, nats.errors.AuthorizationError) or (
        "authorization violation" in str(exc).lower()
    )


async def sync_connection(nc: Client, timeout: float = 5.0) -> None:
    """Return once the server has processed everything ``nc`` sent before the call.

    ``Client.flush()`` is not enough in nats-py 2.16: it writes its PING straight
    to the socket while earlier SUB/PUB commands may still wait in the client's
    pending buffer, so the PONG can come back before the server has seen them
    (a subscription made then "flushed" misses a message published right after,
    about once in a hundred tries here). A message to ourselves goes through
    the same buffer, after those commands; once it arrives, they have all been
    processed.

    The echo goes through the connection's own inbox, so it doubles as an
    identity check: a connection whose credentials do not own its inbox
    prefix (an agent started with another agent's credential) is refused the
    subscription, and this raises at once instead of waiting out ``timeout``.

    Raises:
        IdentityMismatch: the server refused the echo's subscription or publish
            (the credentials are not those of the inbox's owner).
        TimeoutError: the echo did not come back within ``timeout`` seconds.
    """
    echoed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def on_echo(_msg: Msg) -> None:
        if not echoed.done():
            echoed.set_result(None)

    denied: asyncio.Future[str] = (
        nc.next_violation()
        if isinstance(nc, SessionClient)
        else asyncio.get_running_loop().create_future()
    )
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox, cb=on_echo)
    try:
        await nc.publish(sub.subject, b"")
        async with asyncio.timeout(timeout):
            while not echoed.done():
                waiting: set[asyncio.Future[Any]] = {echoed, denied}
                await asyncio.wait(waiting, return_when=FIRST_COMPLETED)
                if denied.done() and not echoed.done():
                    denial = denied.result()
                    if f'"{inbox.lower()}"' in denial:
                        raise IdentityMismatch(
                            f"the NATS server refused this connection its own inbox "
                            f"({denial}): its credentials belong to someone else. An agent "
                            "needs its own credential (`signalbox agents enroll <name>`)",
                            details={"inbox": inbox, "refused": denial},
                        )
                    # Another command was refused: keep waiting for the echo.
                    denied = nc.next_violation()  # type: ignore[attr-defined]
    finally:
        if not denied.done():
            denied.cancel()
        await sub.unsubscribe()
