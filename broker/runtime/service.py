"""The shape every Signalbox service shares.

A service is a :class:`Service` subclass. It owns one FastStream
``NatsBroker`` (one NATS connection), ensures the streams and buckets it
needs, owns an :class:`~broker.runtime.audit.AuditEmitter`, and declares
request-reply endpoints with :meth:`Service.endpoint` (a desk of the service
declares its own and the service includes them: :mod:`broker.runtime.desk`,
:meth:`Service.include`), which gives every endpoint the same contract:

* the request body is decoded with msgspec into the declared type; a decode
  failure is a ``schema_error`` reply carrying the field path;
* a :class:`~broker.errors.SignalboxError` from the handler becomes a
  structured error reply with its code;
* anything else becomes an ``internal`` error reply (and is logged);
* every rejected request is counted and audited (kind ``rejected``);
* the reply subject is checked *before any work* against the endpoint's
  :class:`~broker.subjects.Audience`: a reply goes only into the sender's
  own reply space (an agent's ``_INBOX.agent.<name>``, the operators' or the
  services' inbox), because it is published with the service's rights. A
  request naming anything else (``$KV.…``, an admin subject, another agent's
  inbox, no reply at all) is refused unanswered, counted and audited with
  the real sender.

FastStream's ``NatsBroker`` holds the connection; the lifecycle is
:class:`services.runner.Stack`'s (``signalbox up`` and ``python -m
services.<name>`` alike: one way to run a service). Endpoints and hot paths
(call mediation) are plain nats-py callbacks on that connection
(:attr:`Service.nc`): FastStream's per-message pipeline measured ~2x the
latency of a raw callback.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

from faststream.nats import NatsBroker
from faststream.nats.security import NatsUserPassword
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext
from opentelemetry import context as otel_context
from opentelemetry.trace import SpanKind, TracerProvider

from broker.codec import decode, encode
from broker.connection import SessionClient, sync_connection
from broker.diagnostics import cancel_and_wait
from broker.errors import InvalidReplySubject, NatsUnreachable, SchemaError, SignalboxError
from broker.ids import new_id
from broker.replies import error_reply
from broker.runtime.audit import AuditEmitter
from broker.runtime.consumer import PullWorker
from broker.runtime.desk import Desk, EndpointSpec, ServiceHost
from broker.runtime.health import INTERVAL as HEALTH_INTERVAL
from broker.runtime.health import build_health, health_path, remove_health, write_health
from broker.runtime.identity import service_connect_options
from broker.runtime.jetstream import ensure_buckets, ensure_streams
from broker.runtime.throttle import Emit, Summarizer
from broker.settings import Settings
from broker.subjects import SERVICE_INBOX, Audience, Subjects, reply_fault
from broker.telemetry import ATTR, Telemetry, annotate
from schemas import HealthRequest, ServiceHealth, Wire

__all__ = ["Desk", "EndpointSpec", "Service", "ServiceHost"]

log = logging.getLogger(__name__)

Req = TypeVar("Req")
Handler = Callable[[Any], Awaitable[Wire]]
SERVER = SpanKind.SERVER


#: The named operator whose admin request is being handled ("": the bootstrap
#: operator, or not an admin request); see :meth:`Service.operator`.
_OPERATOR: contextvars.ContextVar[str] = contextvars.ContextVar("sb_operator", default="")
#: The agent an agent-scoped endpoint's subject names (``sb.<…>.<agent>``).
_AGENT: contextvars.ContextVar[str] = contextvars.ContextVar("sb_agent", default="")


@dataclass(frozen=True, slots=True)
class _Endpoint:
    subject: str
    queue: str
    request_type: Any
    fn: Callable[[Any], Awaitable[Wire]]
    audience: Audience


class _ServiceBroker(NatsBroker):
    """FastStream's NATS broker on Signalbox's client class.

    FastStream connects with ``nats.connect()``, i.e. nats-py's plain
    ``Client``; this broker connects a :class:`broker.connection.SessionClient`
    instead, so the services parse message headers with its parser (half
    nats-py's cost, on every call, usage report and audit event a service
    reads) like the SDK and the CLI do. Overrides FastStream's ``_connect``
    (same three steps; faststream is pinned to 0.7.x in pyproject.toml, and
    ``tests/broker/test_service_client.py`` checks a service runs on it).
    """

    async def _connect(self) -> Client:
        connection = SessionClient()
        await connection.connect(**self._connection_kwargs)
        self.config.connect(connection)
        return connection


class Service:
    """Base class of the registry, policy, cost and tracing services.

    Args:
        settings: Resolved settings (``nats_url`` must be set).
    """

    #: Short name: used for the connection name, queue group and audit actor.
    name: ClassVar[str] = "service"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.subjects = Subjects(settings.subject_prefix)
        credentials = service_connect_options(settings, self.name)
        self.broker = _ServiceBroker(
            servers=(settings.nats_url or "").split(","),
            name=f"signalbox-{self.name}",
            logger=None,
            max_reconnect_attempts=-1,
            # Services are back within a quarter second of a server restart (agents' calls
            # and the callout wait on them); nats-py adds jitter to spread replicas.
            reconnect_time_wait=0.25,  # type: ignore[arg-type]  # FastStream says int; nats-py takes float seconds
            # Services' requests (to each other, to JetStream) get their replies
            # here; endpoints of Audience.SERVICE answer only under it.
            inbox_prefix=SERVICE_INBOX,
            error_cb=self._error_cb,
            security=(
                NatsUserPassword(credentials["user"], credentials["password"])
                if "user" in credentials
                else None
            ),
        )
        self.rejected: collections.Counter[str] = collections.Counter()
        self._refusals: Summarizer[dict[str, Any]] = Summarizer(settings.refusal_summary_window)
        self._refusal_flusher: asyncio.Task[None] | None = None
        self._audit: AuditEmitter | None = None
        self._endpoints: list[_Endpoint] = []
        self._subs: list[Subscription] = []
        self._inflight: set[asyncio.Task[None]] = set()
        self._slots = asyncio.Semaphore(256)
        self._js: tuple[Client, JetStreamContext] | None = None
        self._started = False
        #: Spans of this service (:meth:`use_tracer_provider` picks the provider).
        self.telemetry = Telemetry(f"signalbox.{self.name}")
        #: This replica's id in health reports; when it started serving.
        self.instance = new_id()[:12]
        self.started_at = 0.0
        self._health_task: asyncio.Task[None] | None = None
        # Every replica answers (no queue group): `signalbox status` gathers them all.
        self.endpoint(self.subjects.admin(self.name, "status"), HealthRequest, queue="")(
            self.status
        )

    async def _error_cb(self, exc: Exception) -> None:
        log.debug("%s connection: %r", self.name, exc)

    @property
    def actor(self) -> str:
        """Audit actor of this service."""
        return f"service:{self.name}"

    @staticmethod
    def operator(requested_by: str = "") -> str:
        """Audit actor of the admin request being handled: who the NATS server
        authenticated, never what the request body says.

        ``operator:<name>`` for a named operator (its subject
        ``sb.admin.<service>.<op>.<name>`` is the only one its credential may
        publish); for the shared bootstrap operator, ``bootstrap``, or
        ``bootstrap:<requested_by>`` with the login the CLI declares (a
        label, not an identity: the bootstrap credential is shared).
        """
        named = _OPERATOR.get()
        if named:
            return f"operator:{named}"
        return f"bootstrap:{requested_by}" if requested_by else "bootstrap"

    @staticmethod
    def requesting_agent() -> str:
        """The agent that sent the request being handled, on an endpoint an agent
        serves itself from (audience ``AGENT``, subject ``sb.<…>.<agent>``): the
        subject's last token, which the NATS server lets only that agent publish.
        ``""`` on every other endpoint. Never read an agent from the body instead.
        """
        return _AGENT.get()

    @property
    def nc(self) -> Client:
        """The service's NATS connection (after :meth:`start`)."""
        conn: Client = self.broker.connection
        return conn

    @property
    def js(self) -> JetStreamContext:
        """JetStream context on :attr:`nc` (one per connection)."""
        # Cached: each new context's first publish_async subscribes a fresh
        # reply inbox that is never removed, so a context per call leaks a
        # subscription per call.
        nc = self.nc
        if self._js is None or self._js[0] is not nc:
            self._js = (nc, nc.jetstream())
        return self._js[1]

    @property
    def audit(self) -> AuditEmitter:
        """The service's audit emitter (after :meth:`start`)."""
        assert self._audit is not None, "service not started"
        return self._audit

    # -- traces ---------------------------------------------------------------------------

    def use_tracer_provider(self, provider: TracerProvider | None) -> None:
        """Record this service's spans with ``provider`` (call before :meth:`start`;
        None: the global provider if set, else ids only, see :mod:`broker.telemetry`)."""
        self.telemetry = Telemetry(f"signalbox.{self.name}", provider)

    def traced(
        self,
        name: str,
        handler: Callable[[Msg], Awaitable[None]],
        *,
        kind: SpanKind = SERVER,
        parent: Callable[[Msg], otel_context.Context] | None = None,
    ) -> Callable[[Msg], Awaitable[None]]:
        """``handler`` run as a hop: a span named ``name``, current while it runs (so its
        audit events carry it), child of the message's trace context (``traceparent``),
        or of what ``parent(msg)`` makes of it (an agent's claim checked with
        :func:`broker.telemetry.trusted_parent`)."""
        telemetry = self.telemetry

        async def run(msg: Msg) -> None:
            context = parent(msg) if parent is not None else None
            with telemetry.hop(name, msg.headers or {}, kind=kind, parent=context) as span:
                annotate(span, lambda: {ATTR["system"]: "nats", ATTR["destination"]: msg.subject})
                await handler(msg)

        return run

    def endpoint(
        self,
        subject: str,
        request_type: type[Req],
        *,
        audience: Audience | None = None,
        queue: str | None = None,
    ) -> Callable[[Callable[[Req], Awaitable[Wire]]], Callable[[Req], Awaitable[Wire]]]:
        """Declare a request-reply endpoint (queue group: the service name).

        The decorated coroutine takes the decoded request and returns a wire
        Struct, or raises a :class:`SignalboxError`.

        Args:
            subject: What to subscribe to. A subject ending in ``.*`` is
                agent-scoped: its last token is the agent asking.
            request_type: The request's wire type.
            audience: Who may send it (where its reply may go). Default:
                operators for ``<prefix>.admin.…``, the named agent for
                agent-scoped subjects; any other subject must say.
            queue: Queue group (default ``sb-<service name>``; ``""``: none, every
                replica answers).
        """
        if audience is None:
            if subject.startswith(f"{self.subjects.prefix}.admin."):
                audience = Audience.OPERATOR
            elif subject.endswith(".*"):
                audience = Audience.AGENT
            else:
                raise ValueError(f"endpoint {subject}: say who may send it (audience=...)")
        if Audience.AGENT in audience and not subject.endswith(".*"):
            raise ValueError(f"endpoint {subject}: an agent audience needs an agent-scoped subject")

        def register(fn: Callable[[Req], Awaitable[Wire]]) -> Callable[[Req], Awaitable[Wire]]:
            group = queue if queue is not None else f"sb-{self.name}"
            self._endpoints.append(_Endpoint(subject, group, request_type, fn, audience))
            return fn

        return register

    def include(self, desk: Desk) -> None:
        """Serve the endpoints ``desk`` declares (:mod:`broker.runtime.desk`), each as
        :meth:`endpoint` would; call before :meth:`start`."""
        if self._subs:
            raise RuntimeError(f"{self.name}: include desks before the service serves")
        for spec in desk.endpoints():
            declare = self.endpoint(
                spec.subject, spec.request_type, audience=spec.audience, queue=spec.queue
            )
            declare(spec.handler)

    def reply_fault(self, msg: Msg, audience: Audience, agent: str = "") -> str | None:
        """Why ``msg``'s reply subject is outside its sender's reply space (None: it is not).

        See :func:`broker.subjects.reply_fault`; for endpoints the check is
        done by the base class, hot paths with their own subscriptions call
        this (then :meth:`refuse_reply`).
        """
        return reply_fault(msg.reply, audience, agent)

    async def refuse_reply(self, msg: Msg, fault: str, *, actor: str) -> None:
        """Count and audit (summarized per sender) a request refused for its reply
        subject; nothing is answered."""
        err = InvalidReplySubject(
            f"request on {msg.subject} refused: {fault}; it was not answered and had no effect",
            details={"subject": msg.subject, "reply": msg.reply[:200], "fault": fault},
        )
        self.refused(err, subject=msg.subject, actor=actor)

    def refused(self, err: SignalboxError, *, subject: str, actor: str) -> None:
        """Count a refused request and audit it, summarized per actor and code.

        For refusals a sender can repeat at will (bad reply subjects,
        unreadable messages): the first of each actor and code in a window
        (``SIGNALBOX_REFUSAL_SUMMARY_WINDOW``) is audited at once, the rest
        as one ``rejected`` record with their count when the window closes.
        Synchronous, no I/O (the connection's read loop calls it).
        """
        self.rejected[err.code] += 1
        payload = {"subject": subject, "message": err.message, "details": err.details}
        for emit in self._refusals.note(f"{actor}\0{err.code}", payload, label=err.code):
            self._audit_refusal(emit)

    def _audit_refusal(self, emit: Emit[dict[str, Any]]) -> None:
        if self._audit is None:
            return
        actor, _, code = emit.key.partition("\0")
        first = emit.payload
        data: dict[str, Any] = {
            "code": code or "rejected",
            "message": first["message"],
            "details": first["details"],
        }
        if emit.kind == "summary" or emit.overflow:
            data["summary"] = {
                "count": emit.count,
                "counts": dict(emit.counts),
                "window_s": round(emit.ends - emit.started, 3),
                "overflow": emit.overflow,
            }
        self._audit.add(
            self._audit.event(
                "rejected",
                subject=first["subject"],
                actor=actor if not emit.overflow else "unknown",
                data=data,
            )
        )

    def _on_malformed(self, subject: bytes, reply: bytes, reason: str) -> None:
        """The connection dropped a message it could not read: count and audit it
        (summarized), with the sender its subject names when it names one."""
        text = subject[:200].decode("ascii", "replace")
        err = SchemaError(
            f"message on {text!r} dropped unread: {reason}",
            details={"subject": text, "reply": reply[:200].decode("ascii", "replace")},
        )
        # The sender from the whole subject: cut at 200 bytes, a long one loses its tokens.
        sender = self.subjects.sender_of(subject.decode("ascii", "replace"))
        self.refused(err, subject=text, actor=sender or "unknown")

    async def _flush_refusals(self) -> None:
        """Audit the summaries of refusal windows as they close."""
        while True:
            await asyncio.sleep(min(self._refusals.window / 2, 5.0))
            for emit in self._refusals.flush_due():
                self._audit_refusal(emit)

    async def _serve_endpoints(self) -> None:
        """Subscribe every declared endpoint on :attr:`nc`.

        A plain nats-py callback, not a FastStream subscriber: FastStream's
        per-message pipeline measured ~0.4 ms per request here, more than a
        whole SQLite discovery query. Each request runs in its own task
        (bounded), so a slow one does not hold up the rest.
        """
        for ep in self._endpoints:

            async def on_request(msg: Msg, ep: _Endpoint = ep, named: bool = False) -> None:
                last = msg.subject.rpartition(".")[2]
                agent = last if Audience.AGENT in ep.audience else ""
                operator = last if named else ""
                fault = reply_fault(msg.reply, ep.audience, agent, operator)
                if fault is not None:
                    actor = (
                        agent
                        or (operator and f"operator:{operator}")
                        or ("bootstrap" if Audience.OPERATOR in ep.audience else "unknown")
                    )
                    await self.refuse_reply(msg, fault, actor=actor)
                    return
                await self._slots.acquire()
                token = _OPERATOR.set(operator)  # the task copies this context
                sender = _AGENT.set(agent)
                try:
                    task = asyncio.ensure_future(self._respond(msg, ep.request_type, ep.fn))
                finally:
                    _AGENT.reset(sender)
                    _OPERATOR.reset(token)
                self._inflight.add(task)
                task.add_done_callback(self._request_done)

            subscribe = functools.partial(
                self.nc.subscribe, queue=ep.queue, pending_msgs_limit=100_000
            )
            self._subs.append(await subscribe(ep.subject, cb=on_request))
            if ep.subject.startswith(f"{self.subjects.prefix}.admin."):
                # Named operators: sb.admin.<service>.<op>.<operator>.
                named = functools.partial(on_request, named=True)
                self._subs.append(await subscribe(f"{ep.subject}.*", cb=named))
        await sync_connection(self.nc)

    def _request_done(self, task: asyncio.Task[None]) -> None:
        self._inflight.discard(task)
        self._slots.release()

    async def _respond(
        self, msg: Msg, request_type: Any, fn: Callable[[Any], Awaitable[Wire]]
    ) -> None:
        body, headers = await self.handle(msg.data, msg.subject, request_type, fn)
        with contextlib.suppress(Exception):  # the reply space was checked on arrival
            await self.nc.publish(msg.reply, body, headers=headers or None)

    async def _stop_endpoints(self) -> None:
        for sub in self._subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        self._subs.clear()
        if self._inflight:
            await asyncio.wait(set(self._inflight), timeout=10)

    async def handle(
        self,
        data: bytes,
        subject: str,
        request_type: type[Req],
        fn: Callable[[Req], Awaitable[Wire]],
    ) -> tuple[bytes, dict[str, str]]:
        """Run one request through the endpoint contract; returns body and headers."""
        try:
            request = decode(data, request_type)
            return encode(await fn(request)), {}
        except SignalboxError as err:
            await self.reject(err, subject=subject)
            return error_reply(err)
        except Exception as exc:
            log.exception("%s: unexpected error on %s", self.name, subject)
            internal = SignalboxError(
                f"internal error in the {self.name} service; the request had no effect. "
                "Retry, and report it if it persists",
                details={"exception": type(exc).__name__},
            )
            await self.reject(internal, subject=subject)
            return error_reply(internal)

    async def reject(self, err: SignalboxError, *, subject: str, actor: str | None = None) -> None:
        """Count and audit a rejected request."""
        self.rejected[err.code] += 1
        await self.audit.emit(
            "rejected",
            subject=subject,
            actor=actor or self.actor,
            data={"code": err.code, "message": err.message, "details": err.details},
        )

    # -- health (broker.runtime.health) ------------------------------------------------------

    async def status(self, request: HealthRequest) -> ServiceHealth:
        """``sb.admin.<service>.status``: this replica's health."""
        return await self.health()

    async def health(self) -> ServiceHealth:
        """This replica's health: connection, audit, the lag of its JetStream consumers
        (the :class:`~broker.runtime.consumer.PullWorker` attributes), :meth:`health_problems`."""
        workers = [w for w in vars(self).values() if isinstance(w, PullWorker)]
        connected = self._started and self.nc.is_connected
        return await build_health(
            self.name, instance=self.instance, started_at=self.started_at,
            connected=connected, started=self._started, audit=self._audit,
            workers=workers, problems=self.health_problems(),
            rejected=sum(self.rejected.values()),
        )  # fmt: skip

    def health_problems(self) -> list[str]:
        """Hook: the service's own reasons not to be ready (each saying what to do)."""
        return []

    async def _write_health(self) -> None:
        path = health_path(self.settings.data_dir, self.name)
        while True:
            try:
                write_health(path, await self.health())
            except Exception as exc:  # a full disk must not stop the service
                log.warning("%s: cannot write its health report %s: %r", self.name, path, exc)
            await asyncio.sleep(HEALTH_INTERVAL)

    async def on_start(self) -> None:
        """Hook: runs after connecting and ensuring streams, before endpoints serve."""

    async def on_stop(self) -> None:
        """Hook: runs before the connection closes."""

    async def _prepare(self) -> None:
        try:
            # FastStream (nats-py) retries the first connection forever: bound it.
            await asyncio.wait_for(self.broker.connect(), self.settings.connect_timeout)
        except (TimeoutError, OSError) as exc:
            with contextlib.suppress(Exception):
                await self.broker.stop()
            raise NatsUnreachable(
                f"{self.name}: no NATS server answered at {self.settings.nats_url} within "
                f"{self.settings.connect_timeout:g}s; start one (`signalbox up`) or fix "
                "SIGNALBOX_NATS_URL",
                details={"url": self.settings.nats_url},
            ) from exc
        await ensure_streams(self.js, self.settings)
        await ensure_buckets(self.js, self.settings)
        self._audit = AuditEmitter(self.nc, self.subjects, self.actor)
        nc = self.nc
        if isinstance(nc, SessionClient):
            nc.on_malformed = self._on_malformed
        await self.on_start()
        self._refusal_flusher = asyncio.ensure_future(self._flush_refusals())
        self._started = True
        self.started_at = time.time()
        self._health_task = asyncio.ensure_future(self._write_health())

    async def start(self) -> None:
        """Connect, ensure streams and buckets, run :meth:`on_start`, serve endpoints."""
        await self._prepare()
        await self.broker.start()
        await self._serve_endpoints()
        log.info("%s service started", self.name)

    async def stop(self) -> None:
        """Stop serving, run :meth:`on_stop`, flush audit events, close the connection."""
        if not self._started:
            await self.broker.stop()
            return
        self._started = False
        await cancel_and_wait(self._health_task, f"the {self.name} health reports")
        self._health_task = None
        remove_health(health_path(self.settings.data_dir, self.name), self.instance)
        await self._stop_endpoints()
        await self.on_stop()
        await cancel_and_wait(self._refusal_flusher, f"the {self.name} refusal summaries")
        self._refusal_flusher = None
        for emit in self._refusals.flush_all():  # no count is lost at shutdown
            self._audit_refusal(emit)
        if self._audit is not None:
            await self._audit.close()
        await self.broker.stop()
        log.info("%s service stopped", self.name)
