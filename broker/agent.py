"""The agent SDK: register, serve capabilities, call other agents through the control plane.

Example::

    import msgspec
    from broker import Agent
    from schemas import AgentManifest

    class Score(msgspec.Struct):
        applicant: str

    class Result(msgspec.Struct):
        score: int

    agent = Agent(AgentManifest(name="credit-check", version="1.0.0", owner="risk", team="risk"),
                  nats_url="nats://127.0.0.1:4222")

    @agent.capability("score", tags=("pii",))
    async def score(req: Score) -> Result:
        return Result(score=720)

    async with agent:                                     # connect, register, serve
        out = await agent.call("fraud-detection", "check", {"id": 1}, timeout=2.0)

An agent never addresses another agent directly: ``call`` requests
``sb.out.<self>.<target>.<capability>``; the policy service decides and
forwards allowed calls to ``sb.in.<target>.<capability>``, where this SDK
serves the handlers registered with :meth:`Agent.capability`.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import inspect
import logging
import time
import typing
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, TypeVar, overload

import msgspec
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from opentelemetry import context as otel_context
from opentelemetry.trace import Span, SpanKind, TracerProvider
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_delay, wait_exponential

from broker.codec import decode, encode
from broker.connection import connect, sync_connection
from broker.dedup import Deduplicator, validate_idempotency_key
from broker.diagnostics import cancel_and_wait, finish_within
from broker.errors import (
    BadRequest,
    ConfigError,
    ControlPlaneUnavailable,
    DeadlineExceeded,
    InvalidInput,
    NotFound,
    OutcomeUnknown,
    RemoteError,
    SignalboxError,
    UsageNotRecorded,
)
from broker.ids import new_id
from broker.modelcall import ModelCall
from broker.replies import (
    H_CALL_ID,
    H_CALLER,
    H_CHAIN,
    H_CHAIN_SIG,
    H_DEADLINE,
    H_ERROR,
    H_IDEMPOTENCY_KEY,
    H_MSG_ID,
    H_ROUTE_KEY,
    H_TARGET_VERSION,
    H_TIMEOUT_MS,
    H_TRACE_ORIGIN,
    H_TRACEPARENT,
    error_from_reply,
    error_reply,
    is_error,
    request,
)
from broker.settings import Settings
from broker.subjects import (
    USAGE_DUPLICATE_WINDOW,
    Subjects,
    inbox_prefix,
    validate_token,
    version_token,
)
from broker.telemetry import (
    ATTR,
    Telemetry,
    annotate,
    current_trace_id,
    decision_attributes,
    extract,
    fail,
    inject,
)
from schemas import (
    AgentManifest,
    AgentRecord,
    AuthzRequest,
    CallMeta,
    Capability,
    Decision,
    DeregisterAgent,
    DiscoverAgents,
    DiscoverResult,
    Heartbeat,
    InstanceStats,
    Registered,
    UsageReport,
)

__all__ = ["Agent", "CallContext"]

log = logging.getLogger(__name__)

#: Longest an agent waits for nats-py to close its connection at stop.
_CLOSE_TIMEOUT = 5.0

T = TypeVar("T")
HandlerFn = Callable[..., Awaitable[Any]]

#: The ``Sb-Chain`` and ``Sb-Chain-Sig`` of the call the current handler serves
#: (empty outside handlers): sent back with every call and model authorization
#: the handler makes, so the policy service can refuse call loops
#: (``call_loop``) and charge the budgets of the agents the work is done for
#: (it believes the chain only with its own signature; see broker.runtime.identity).
#: Each served call runs in its own task, hence its own context.
_CHAIN: contextvars.ContextVar[tuple[str, str]] = contextvars.ContextVar(
    "sb_chain", default=("", "")
)


def _chain_headers() -> dict[str, str]:
    chain, signature = _CHAIN.get()
    if not chain:
        return {}
    return {H_CHAIN: chain, H_CHAIN_SIG: signature} if signature else {H_CHAIN: chain}


@dataclass(frozen=True, slots=True)
class CallContext:
    """What a capability handler knows about the call it serves.

    Attributes:
        meta: Caller, target, capability, call id, trace id, deadline.
        headers: All NATS headers of the forwarded request.
    """

    meta: CallMeta
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def remaining(self) -> float:
        """Seconds until the caller stops waiting (inf when unknown)."""
        if not self.meta.deadline:
            return float("inf")
        return max(0.0, self.meta.deadline - time.time())


@dataclass(slots=True)
class _Cap:
    spec: Capability
    fn: HandlerFn
    input_type: Any
    wants_ctx: bool


def _schema(tp: Any) -> dict[str, Any] | None:
    if tp in (bytes, Any):
        return None
    try:
        schema: dict[str, Any] = msgspec.json.schema(tp)
    except TypeError:
        return None
    return schema


#: Default seconds :meth:`Agent.report_usage` retries one report.
USAGE_RETRY_FOR = 30.0
# Worth another attempt: no answer (yet), nobody answering (a stream leader
# election, a reconnect), the server busy.
_TRANSIENT_PUBLISH = (
    nats.errors.TimeoutError,
    nats.errors.NoRespondersError,
    nats.errors.ConnectionReconnectingError,
    nats.errors.StaleConnectionError,
    nats.js.errors.NoStreamResponseError,
    nats.js.errors.ServiceUnavailableError,
)


def _deadline_of(headers: dict[str, str]) -> float:
    """The ``Sb-Deadline`` of a forwarded call (Unix seconds), 0 if none or unreadable."""
    try:
        return float(headers.get(H_DEADLINE, "") or 0)
    except ValueError:
        return 0.0


def _past(deadline: str) -> bool:
    """True if ``deadline`` (Unix seconds, the ``Sb-Deadline`` header) has passed."""
    try:
        return bool(deadline) and float(deadline) < time.time()
    except ValueError:
        return False


class Agent:
    """One running agent instance.

    Args:
        manifest: Who the agent is; capabilities declared with
            :meth:`capability` are added to it at registration.
        nats_url: Server URL(s), comma-separated.
        subject_prefix: Prefix of Signalbox subjects (``sb``).
        register: Register the manifest on start (set False when an operator
            pre-registers the agent).
        max_concurrency: Handler invocations running at once; further
            requests wait in the subscription's buffer.
        heartbeat_interval: Seconds between heartbeats to the registry (0: none).
        credential: The agent's credential from ``signalbox agents enroll``
            (presented to the server, which checks it through the registry
            and gives the connection this agent's permissions only).
        tracer_provider: OpenTelemetry provider of this agent's spans (``sb.call``,
            ``sb.serve``, ``sb.authz``, ``sb.usage``); default: the global provider
            if the application set one, else ids only (see :mod:`broker.telemetry`).
            Either way the W3C trace context travels with every call.
        usage_retry_for: Seconds :meth:`report_usage` keeps retrying one report
            (same id, deduplicated by the stream) before it raises
            :class:`~broker.errors.UsageNotRecorded` (default 30).
        idempotency_window: Seconds the answer of a call made with an
            idempotency key is kept for its retries (:mod:`broker.dedup`).
        connect_options: Passed to :func:`nats.connect` (TLS...).
    """

    def __init__(
        self,
        manifest: AgentManifest,
        *,
        nats_url: str,
        subject_prefix: str = "sb",
        register: bool = True,
        max_concurrency: int = 256,
        heartbeat_interval: float = 5.0,
        credential: str | None = None,
        tracer_provider: TracerProvider | None = None,
        usage_retry_for: float = USAGE_RETRY_FOR,
        idempotency_window: float = 600.0,
        **connect_options: Any,
    ) -> None:
        validate_token(manifest.name, what="agent name")
        if not 0 < usage_retry_for <= USAGE_DUPLICATE_WINDOW / 2:
            raise ConfigError(
                f"usage_retry_for must be between 0 and {USAGE_DUPLICATE_WINDOW / 2:g} s (half the "
                "usage stream's duplicate window, so a retried report is never counted twice)"
            )
        #: How long :meth:`report_usage` retries one report (same id) before giving up.
        self.usage_retry_for = usage_retry_for
        #: Answers of keyed calls, for their retries (broker.dedup).
        self.dedup = Deduplicator(window=idempotency_window)
        #: This agent's spans (broker.telemetry).
        self.telemetry = Telemetry("signalbox.agent", tracer_provider)
        self.manifest = manifest
        self.nats_url = nats_url
        self.subjects = Subjects(subject_prefix)
        self.register_on_start = register
        self.connect_options = connect_options
        if credential:
            self.connect_options["token"] = credential
        self._caps: dict[str, _Cap] = {}
        self._nc: Client | None = None
        self._sub: Subscription | None = None
        self._version_sub: Subscription | None = None
        self._inflight: set[asyncio.Task[None]] = set()
        self._slots = asyncio.Semaphore(max_concurrency)
        self.registration: Registered | None = None
        self.heartbeat_interval = heartbeat_interval
        #: Unique id of this running instance (shown by ``$SRV.PING``).
        self.instance_id = new_id()[:22]
        self._started_at = 0.0
        self._requests = 0
        self._errors = 0
        self._processing_ns = 0
        self._last_error = ""
        self._heartbeat_task: asyncio.Task[None] | None = None
        #: Calls refused unrun because they arrived after their deadline.
        self._late = 0

    @classmethod
    def from_settings(cls, manifest: AgentManifest, settings: Settings, **kwargs: Any) -> Agent:
        """An agent configured from :class:`~broker.settings.Settings`.

        Uses ``nats_url``, ``subject_prefix``, ``heartbeat_interval`` and
        ``agent_credential`` (``SIGNALBOX_AGENT_CREDENTIAL``); keyword
        arguments override them.
        """
        if not settings.nats_url:
            raise ConfigError("no NATS URL: set SIGNALBOX_NATS_URL (see `signalbox up`)")
        options: dict[str, Any] = {
            "nats_url": settings.nats_url,
            "subject_prefix": settings.subject_prefix,
            "heartbeat_interval": settings.heartbeat_interval,
        }
        if settings.agent_credential is not None:
            options["credential"] = settings.agent_credential.get_secret_value()
        options.update(kwargs)
        return cls(manifest, **options)

    @property
    def name(self) -> str:
        """The agent's name (its identity on the bus)."""
        return self.manifest.name

    @property
    def nc(self) -> Client:
        """The agent's NATS connection (after :meth:`start`)."""
        if self._nc is None:
            raise RuntimeError(
                "agent not started: use `async with agent:` or `await agent.start()`"
            )
        return self._nc

    # -- serving ---------------------------------------------------------------

    def capability(
        self,
        name: str | None = None,
        *,
        description: str = "",
        tags: tuple[str, ...] = (),
    ) -> Callable[[HandlerFn], HandlerFn]:
        """Serve the decorated coroutine as capability ``name`` (default: its name).

        The handler takes the decoded input (type from its first parameter's
        annotation: a msgspec Struct, builtin types, or ``bytes`` for raw) and,
        optionally, a ``ctx: CallContext``; its return value is encoded as the
        reply. Raising a :class:`~broker.errors.SignalboxError` replies with
        that error's code; any other exception replies ``remote_error``.
        """

        def register(fn: HandlerFn) -> HandlerFn:
            cap_name = validate_token(name or fn.__name__.replace("_", "-"), what="capability")
            hints = typing.get_type_hints(fn)
            params = [p for p in inspect.signature(fn).parameters.values() if p.name != "self"]
            if not params:
                raise TypeError(f"capability {cap_name!r}: the handler must take the input payload")
            input_type = hints.get(params[0].name, Any)
            wants_ctx = len(params) > 1
            spec = Capability(
                name=cap_name,
                description=description or (inspect.getdoc(fn) or "").split("\n")[0],
                input_schema=_schema(input_type),
                output_schema=_schema(hints.get("return", Any)),
                tags=tags,
            )
            self._caps[cap_name] = _Cap(spec, fn, input_type, wants_ctx)
            return fn

        return register

    async def _on_request(self, msg: Msg) -> None:
        await self._slots.acquire()
        task = asyncio.ensure_future(self._serve(msg))
        self._inflight.add(task)
        task.add_done_callback(self._served)

    def _served(self, task: asyncio.Task[None]) -> None:
        self._inflight.discard(task)
        self._slots.release()

    async def _serve(self, msg: Msg) -> None:
        # Captured now: stop() clears self._nc before draining, and the reply
        # of a call that was running must still go out on this connection.
        nc = self.nc
        headers = msg.headers or {}
        _CHAIN.set((headers.get(H_CHAIN, ""), headers.get(H_CHAIN_SIG, "")))
        # sb.in.<self>.<capability>, or .<version token> after it for a routed call.
        cap_name = msg.subject.split(".", 4)[3]
        if _past(headers.get(H_DEADLINE, "")):
            # Its caller has given up: running it now is work nobody waits for.
            self._late += 1
            late_body, late_headers = error_reply(DeadlineExceeded(
                f"{self.name}.{cap_name}: the call arrived after its deadline; not run",
                details={"capability": cap_name, "deadline": headers.get(H_DEADLINE, "")},
            ))  # fmt: skip
            if msg.reply:
                with contextlib.suppress(nats.errors.ConnectionClosedError):
                    await nc.publish(msg.reply, late_body, headers=late_headers)
            return
        started = time.perf_counter_ns()
        # The server span of this call: current while the handler runs, so the
        # handler's own calls, authorizations and usage reports are its children.
        with self.telemetry.hop("sb.serve", headers) as span:
            annotate(span, lambda: self._span_attributes(capability=cap_name, headers=headers))
            key = Deduplicator.key_of(headers)
            if key is None:
                body, reply_headers = await self._run(msg, cap_name, headers)
            else:  # a keyed call: at most one run per caller and key (broker.dedup)
                body, reply_headers = await self.dedup.run(
                    key, _deadline_of(headers), lambda: self._run(msg, cap_name, headers)
                )
            if reply_headers and H_ERROR in reply_headers:
                fail(span, reply_headers[H_ERROR])
        self._requests += 1
        self._processing_ns += time.perf_counter_ns() - started
        if reply_headers and H_ERROR in reply_headers:
            self._errors += 1
            self._last_error = f"{cap_name}: {reply_headers[H_ERROR]}"
        if msg.reply:
            with contextlib.suppress(nats.errors.ConnectionClosedError):
                await nc.publish(msg.reply, body, headers=reply_headers)

    async def _run(
        self, msg: Msg, cap_name: str, headers: dict[str, str]
    ) -> tuple[bytes, dict[str, str] | None]:
        try:
            cap = self._caps.get(cap_name)
            if cap is None:
                raise InvalidInput(
                    f"agent {self.name!r} has no capability {cap_name!r}",
                    details={"capability": cap_name, "offered": sorted(self._caps)},
                )
            payload = decode(msg.data, cap.input_type)
        except InvalidInput as err:
            # Decode failures and unknown capabilities are the caller's fault.
            return error_reply(BadRequest(f"bad request: {err.message}", details=err.details))
        except Exception as exc:  # any bytes at all get an answer, never silence
            return error_reply(
                BadRequest(
                    f"bad request: the input could not be read ({type(exc).__name__})",
                    details={"exception": type(exc).__name__},
                )
            )
        try:
            if cap.wants_ctx:
                ctx = CallContext(meta=self._meta(headers, cap_name), headers=headers)
                result = await cap.fn(payload, ctx)
            else:
                result = await cap.fn(payload)
            return encode(result), None
        except SignalboxError as err:
            # The handler's own typed error keeps its code (conflict, denied...).
            return error_reply(err)
        except Exception as exc:
            log.exception("%s: capability %s failed", self.name, cap_name)
            return error_reply(
                RemoteError(
                    f"{self.name}.{cap_name} failed: {type(exc).__name__}: {exc}",
                    details={"exception": type(exc).__name__},
                )
            )

    def _meta(self, headers: dict[str, str], cap_name: str) -> CallMeta:
        deadline = headers.get(H_DEADLINE, "")
        return CallMeta(
            call_id=headers.get(H_CALL_ID, ""),
            caller=headers.get(H_CALLER, ""),
            target=self.name,
            capability=cap_name,
            trace_id=current_trace_id(),  # of the sb.serve span, from traceparent
            deadline=float(deadline) if deadline.replace(".", "", 1).isdigit() else 0.0,
        )

    # -- lifecycle -------------------------------------------------------------

    def full_manifest(self) -> AgentManifest:
        """The manifest with the capabilities declared on this agent merged in."""
        declared = {c.name: c for c in self.manifest.capabilities}
        declared.update({name: cap.spec for name, cap in self._caps.items()})
        return msgspec.structs.replace(self.manifest, capabilities=tuple(declared.values()))

    async def start(self) -> None:
        """Connect, register (unless disabled) and start serving capabilities."""
        if self._nc is not None:
            return
        self._nc = await connect(
            self.nats_url,
            name=f"agent-{self.name}",
            inbox_prefix=inbox_prefix(self.name),
            **self.connect_options,
        )
        try:
            if self.register_on_start:
                self.registration = await self.register()
            if self._caps:
                self._sub = await self._nc.subscribe(
                    self.subjects.inbound_of(self.name),
                    queue=f"agent-{self.name}",
                    cb=self._on_request,
                    pending_msgs_limit=65536,
                )
                # Calls a version route (canary rollout) sends to this version only.
                self._version_sub = await self._nc.subscribe(
                    self.subjects.inbound_versions_of(self.name, self.manifest.version),
                    queue=f"agent-{self.name}-{version_token(self.manifest.version)}",
                    cb=self._on_request,
                    pending_msgs_limit=65536,
                )
            # Not nc.flush(): see sync_connection (nats-py can PONG before our SUB).
            await sync_connection(self._nc)
        except BaseException:
            await self._nc.close()
            self._nc = None
            raise
        self._started_at = time.time()
        if self.heartbeat_interval > 0:
            self._heartbeat_task = asyncio.ensure_future(self._heartbeats())

    def stats(self) -> InstanceStats:
        """This instance's counters (sent with every heartbeat)."""
        return InstanceStats(
            started=self._started_at,
            requests=self._requests,
            errors=self._errors,
            processing_time_ns=self._processing_ns,
            last_error=self._last_error[:256],
        )

    async def heartbeat(self, timeout: float = 2.0) -> AgentRecord:
        """Send one heartbeat now; returns the registry's view of this agent.

        Raises:
            NotFound: this version is no longer registered (deregistered or revoked).
        """
        beat = Heartbeat(
            name=self.name,
            version=self.manifest.version,
            instance=self.instance_id,
            stats=self.stats(),
        )
        return await self._rpc(
            self.subjects.registry_for("heartbeat", self.name), beat, AgentRecord, timeout
        )

    async def _heartbeats(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_interval)
            try:
                await self.heartbeat()
            except NotFound:
                # Not re-registering on our own: an operator may have revoked us.
                log.error(
                    "%s %s is no longer registered; heartbeats stop. Restart the agent "
                    "to register again (if it was not revoked on purpose)",
                    self.name,
                    self.manifest.version,
                )
                return
            except (SignalboxError, RuntimeError) as exc:
                log.debug("%s: heartbeat failed: %r", self.name, exc)

    async def discover(self, query: DiscoverAgents | None = None, **filters: Any) -> DiscoverResult:
        """Ask the registry who offers what (see :class:`schemas.DiscoverAgents`).

        Example:
            ``await agent.discover(capability="score", versions="^1")``
        """
        q = query or DiscoverAgents(**filters)
        return await self._rpc(
            self.subjects.registry_for("discover", self.name), q, DiscoverResult, 5.0
        )

    async def register(self, timeout: float = 5.0) -> Registered:
        """Register :meth:`full_manifest` with the registry.

        Raises:
            SignalboxError: the registry refused (invalid manifest, conflict...).
            ControlPlaneUnavailable: no registry is answering.
        """
        return await self._rpc(
            self.subjects.registry_for("register", self.name),
            self.full_manifest(),
            Registered,
            timeout,
        )

    async def deregister(self, *, all_versions: bool = False, timeout: float = 5.0) -> AgentRecord:
        """Remove this agent's version (every version with ``all_versions``) from the registry.

        Heartbeats of a deregistered version are refused (``NotFound``), so
        call it when retiring a version for good, then :meth:`stop`.

        Returns:
            The removed record (the lowest version removed, with ``all_versions``),
            status ``deregistered``.

        Raises:
            NotFound: not registered (any more).
        """
        body = DeregisterAgent(
            name=self.name, version=None if all_versions else self.manifest.version
        )
        return await self._rpc(
            self.subjects.registry_for("deregister", self.name), body, AgentRecord, timeout
        )

    async def _rpc(self, subject: str, body: Any, returns: type[T], timeout: float) -> T:
        return await request(self.nc, subject, body, returns, timeout=timeout)

    async def stop(self, drain_timeout: float = 10.0) -> None:
        """Stop taking requests, finish in-flight ones (up to ``drain_timeout``), disconnect."""
        nc, self._nc = self._nc, None
        if nc is None:
            return
        await cancel_and_wait(self._heartbeat_task, f"{self.name}: heartbeats")
        self._heartbeat_task = None
        for sub in (self._sub, self._version_sub):
            if sub is not None:
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()
        self._sub = self._version_sub = None
        if self._inflight:
            _, pending = await asyncio.wait(set(self._inflight), timeout=drain_timeout)
            for task in pending:
                task.cancel()
            if pending:
                log.warning(
                    "%s: %d requests still running at shutdown were cancelled",
                    self.name,
                    len(pending),
                )
        with contextlib.suppress(Exception):
            await nc.flush(timeout=2)
        await finish_within(nc.close(), _CLOSE_TIMEOUT, f"{self.name}: closing its connection")

    async def __aenter__(self) -> Agent:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    # -- calling ---------------------------------------------------------------

    @overload
    async def call(
        self,
        target: str,
        capability: str,
        payload: Any = ...,
        *,
        returns: type[T],
        timeout: float = ...,
        headers: dict[str, str] | None = ...,
        route_key: str = ...,
        version: str = ...,
        idempotency_key: str = ...,
    ) -> T: ...

    @overload
    async def call(
        self,
        target: str,
        capability: str,
        payload: Any = ...,
        *,
        timeout: float = ...,
        headers: dict[str, str] | None = ...,
        route_key: str = ...,
        version: str = ...,
        idempotency_key: str = ...,
    ) -> Any: ...

    async def call(
        self,
        target: str,
        capability: str,
        payload: Any = None,
        *,
        returns: Any = Any,
        timeout: float = 5.0,
        headers: dict[str, str] | None = None,
        route_key: str = "",
        version: str = "",
        idempotency_key: str = "",
    ) -> Any:
        """Call ``target``'s ``capability`` through the control plane.

        Retrying: refusals (``CallDenied``, ``DeadlineExceeded``,
        ``AuditUnavailable``, ``TargetUnavailable``...) did not run; retry as
        their message says. :class:`~broker.errors.OutcomeUnknown` may have
        run: retry only with the same ``idempotency_key``, which makes the
        target return the first run's result (or ``CallInProgress``) instead
        of running it again (:mod:`broker.dedup`).

        Args:
            target: Target agent name.
            capability: Capability name.
            payload: A msgspec Struct, builtins, or ``bytes`` (sent as is).
            returns: Type to decode the reply into (default: builtins).
            timeout: Seconds to wait for the reply.
            headers: Extra headers (``traceparent``...).
            route_key: Key of a sticky version route (a customer, a conversation):
                its calls stay on one version of ``target`` during a rollout.
            version: Pin a version of ``target`` (refused if it is deprecated).
            idempotency_key: One logical call's key (1-128 of ``A-Z a-z 0-9 . _ : -``,
                e.g. a UUID): calls with the same key run at most once within the
                target's window (10 minutes by default), per target instance.

        Raises:
            CallDenied: policy refused the call (``details`` has the reason), or a call
                parked for human approval was denied or expired
                (``details["reason_code"]`` ``approval_denied`` / ``approval_expired``,
                ``details["approval_id"]``).
            UnknownTarget: ``target`` is not registered.
            TargetUnavailable: nobody serves the capability right now.
            OutcomeUnknown: no reply within ``timeout``: the call may have run
                (a ``CallTimeout``; ``CallInProgress`` when a run with the same
                idempotency key is still going).
            AuditUnavailable: its decision could not be stored; not run.
            InvalidInput: ``idempotency_key`` is not a valid key.
            DeadlineExceeded: the call reached the policy service or the target
                after its deadline and was refused unrun.
            BadRequest: the target rejected the payload.
            RemoteError: the target's handler failed.
            ControlPlaneUnavailable: no policy service is running.
        """
        subject = self.subjects.out(self.name, target, capability)
        # The absolute deadline too: a request held back by a disconnected connection
        # and sent on reconnect, after this call gave up, is refused unrun.
        hdrs = {H_TIMEOUT_MS: str(int(timeout * 1000)), H_DEADLINE: f"{time.time() + timeout:.6f}"}
        if route_key:  # a sticky route keeps this key's calls on one version
            hdrs[H_ROUTE_KEY] = route_key
        if version:
            hdrs[H_TARGET_VERSION] = version
        if idempotency_key:
            hdrs[H_IDEMPOTENCY_KEY] = validate_idempotency_key(idempotency_key)
        hdrs.update(_chain_headers())  # made by a handler: the chain it serves goes on
        if headers:
            hdrs.update(headers)
        # A traceparent in ``headers`` is the parent; else the current span (a handler's).
        parent = extract(headers) if headers and H_TRACEPARENT in headers else None
        with self._hop("sb.call", SpanKind.CLIENT, hdrs, parent) as span:
            annotate(span, lambda: self._span_attributes(target=target, capability=capability))
            inject(hdrs, span)
            try:
                msg = await self.nc.request(subject, encode(payload), timeout=timeout, headers=hdrs)
            except nats.errors.NoRespondersError as exc:
                raise ControlPlaneUnavailable(
                    "no policy service is mediating calls; start one with `signalbox up`",
                    details={"subject": subject},
                ) from exc
            except nats.errors.TimeoutError as exc:
                # Nothing came back, not even the policy service's time-out: the call
                # may have been forwarded and run. Only a keyed retry is safe.
                details: dict[str, Any] = {
                    "target": target, "capability": capability, "timeout": timeout,
                }  # fmt: skip
                retry = "pass idempotency_key= to retry safely"
                if idempotency_key:
                    details["idempotency_key"] = idempotency_key
                    retry = f"retry with idempotency_key={idempotency_key!r} to run it at most once"
                raise OutcomeUnknown(
                    f"{target}.{capability} did not answer within {timeout:g}s; it may have "
                    f"run: {retry}",
                    details=details,
                ) from exc
            if is_error(msg.headers):
                raise error_from_reply(msg.data, msg.headers)
            return decode(msg.data, returns)

    async def authorize(
        self,
        action: str,
        resource: str,
        *,
        provider: str = "",
        region: str = "",
        price_per_1k_tokens: float = 0.0,
        estimated_tokens: int | None = None,
        data_tags: tuple[str, ...] = (),
        on_behalf_of: tuple[str, ...] = (),
        max_output_tokens: int = 0,
        project: str = "",
        timeout: float = 2.0,
    ) -> Decision:
        """Ask the policy service, before an LLM or tool call, whether this agent may make it.

        The request goes to ``sb.authz.<self>`` and is decided by the Cedar
        policies (deny by default) and audited. A denial is an answer, not an
        error: check ``decision.effect`` (``allow``, ``deny`` or
        ``needs_approval``); ``decision.reasons`` and ``decision.policy_ids``
        say why.

        Args:
            action: ``use_model`` or ``use_tool``.
            resource: Model or tool id (``gpt-4o``, ``web-search``).
            provider: Model or tool provider.
            region: Region of the endpoint that would serve the call.
            price_per_1k_tokens: Model price in USD per 1,000 tokens.
            estimated_tokens: Tokens this one invocation is expected to use; None
                (the default): not given, which policies see as an unknown
                estimate (``context.estimated_tokens_known`` false), never as 0.
            data_tags: Classification tags of the data sent (``pii``...).
            on_behalf_of: Delegation chain (agents or users), outermost first.
            max_output_tokens: Most completion tokens the call may produce.
            project: Project the call is charged to.
            timeout: Seconds to wait for the decision.

        When a budget applies to this agent (its own, its team's, the
        project's, or a delegating agent's), an allowed ``use_model`` also
        reserves the call's worst-case cost: ``decision.reservation_id``; report
        the call's usage with it to settle (:meth:`model_call` does all of
        this). A budget that cannot cover the call makes the decision a deny
        (``reason_code`` ``budget_exceeded``, ``decision.budget`` says which).

        Raises:
            SchemaError: a field is out of range (the details name it).
            ControlPlaneUnavailable: no policy service is answering.
            CallTimeout: no decision within ``timeout``.

        Example:
            ``d = await agent.authorize("use_model", "gpt-4o", region="eu-west-1",
            estimated_tokens=1_200)``
        """
        ask = AuthzRequest(
            action=action,
            resource=resource,
            provider=provider,
            region=region,
            price_per_1k_tokens=price_per_1k_tokens,
            estimated_tokens=estimated_tokens,
            data_tags=tuple(data_tags),
            on_behalf_of=tuple(on_behalf_of),
            max_output_tokens=max_output_tokens,
            project=project,
        )
        origin: dict[str, str] = {}
        with self._hop("sb.authz", SpanKind.CLIENT, origin) as span:
            annotate(span, lambda: {
                **self._span_attributes(), ATTR["action"]: action, ATTR["resource"]: resource,
                ATTR["provider"]: provider,
            })  # fmt: skip
            decision = await request(
                self.nc,
                self.subjects.authz(self.name),
                ask,
                Decision,
                timeout=timeout,
                hint="no policy service is answering; start one with `signalbox up`",
                # The sb.authz span's trace context, and the chain a handler serves.
                headers=inject({**_chain_headers(), **origin}),
            )
            annotate(span, lambda: decision_attributes(decision))
            return decision

    def model_call(
        self,
        model: str,
        *,
        provider: str = "",
        region: str = "",
        estimated_tokens: int | None = None,
        max_output_tokens: int = 0,
        project: str = "",
        data_tags: tuple[str, ...] = (),
        on_behalf_of: tuple[str, ...] = (),
        timeout: float = 5.0,
    ) -> ModelCall:
        """Authorize, reserve the budget of, and settle one model call (async context manager).

        Raises on entry :class:`~broker.errors.BudgetExceeded` (a budget cannot
        cover the worst case) or :class:`~broker.errors.CallDenied` (policy,
        breaker, approval needed); on exit reports the usage recorded with
        :meth:`ModelCall.record`, settling the reservation. See
        :mod:`broker.modelcall`.

        Example:
            ``async with agent.model_call("gpt-4o", estimated_tokens=900) as call:``
            ``    call.record(input_tokens=700, output_tokens=150)``
        """
        return ModelCall(
            self, model, provider=provider, region=region, estimated_tokens=estimated_tokens,
            max_output_tokens=max_output_tokens, project=project, data_tags=data_tags,
            on_behalf_of=on_behalf_of, timeout=timeout,
        )  # fmt: skip

    @contextlib.contextmanager
    def _hop(
        self,
        name: str,
        kind: SpanKind,
        headers: dict[str, str],
        parent: otel_context.Context | None = None,
    ) -> Iterator[Span]:
        """The client span of a call, authorization or usage report.

        Inside a handler (and with no parent given), a child of the call being
        served: the policy service vouched for that trace with the chain it
        signed. Otherwise a trace this agent owns (``Sb-Trace-Origin`` goes
        into ``headers``; see :func:`broker.telemetry.owned_trace_id`), linked
        to the application's span if there is one: the control plane continues
        no trace an agent merely names.
        """
        if parent is None and _CHAIN.get()[0]:
            with self.telemetry.hop(name, kind=kind) as span:
                yield span
            return
        with self.telemetry.owned_hop(name, self.name, kind=kind, parent=parent) as (span, origin):
            headers[H_TRACE_ORIGIN] = origin
            yield span

    async def report_usage(self, report: UsageReport | None = None, **fields: Any) -> str:
        """Report LLM or tool usage to ``sb.usage.<self>`` (JetStream, deduplicated by id).

        Either pass a :class:`~schemas.UsageReport` or its fields
        (``model=``, ``input_tokens=``...). Returns the report id.

        Reported from a handler, the report carries the delegation chain the
        policy service signed for the call being served (``Sb-Chain``,
        ``Sb-Chain-Sig``): the cost service charges the budgets of those
        agents, and of no one the report's ``on_behalf_of`` names. Its
        ``project`` is charged only if an operator bound it to this agent.
        """
        origin: dict[str, str] = {}
        with self._hop("sb.usage", SpanKind.PRODUCER, origin) as span:
            # Charged to the current trace (a handler's call) unless it names its own.
            if report is None:
                fields.setdefault("trace_id", current_trace_id())
                fields.setdefault("agent_version", self.manifest.version)
                report = UsageReport(id=new_id(), agent=self.name, time=time.time(), **fields)
            elif not report.trace_id:
                report = msgspec.structs.replace(report, trace_id=current_trace_id())
            if not report.agent_version:  # canary cost comparisons need it
                report = msgspec.structs.replace(report, agent_version=self.manifest.version)
            usage = report
            annotate(span, lambda: {
                **self._span_attributes(), ATTR["model"]: usage.model,
                ATTR["provider"]: usage.provider, ATTR["input_tokens"]: usage.input_tokens,
                ATTR["output_tokens"]: usage.output_tokens,
            })  # fmt: skip
            # The chain a handler serves: the only delegation the cost service charges.
            headers = inject({H_MSG_ID: report.id, **_chain_headers(), **origin}, span)
            await self._publish_usage(report, encode(report), headers)
            return report.id

    async def _publish_usage(
        self, report: UsageReport, data: bytes, headers: dict[str, str]
    ) -> None:
        """Store one usage report, retrying with its id (the stream deduplicates) on
        transient failures for :attr:`usage_retry_for` seconds.

        Raises:
            UsageNotRecorded: not stored by the deadline, or refused for good;
                it carries the report (resending it, same id, is safe).
        """
        js = self.nc.jetstream()
        subject = self.subjects.usage(self.name)
        attempts = 0
        reached = False  # an attempt may have been stored even though its ack was lost
        try:
            async for attempt in AsyncRetrying(
                stop=stop_after_delay(self.usage_retry_for),
                wait=wait_exponential(multiplier=0.05, max=2.0),
                retry=retry_if_exception_type(_TRANSIENT_PUBLISH),
                reraise=True,
            ):
                with attempt:
                    attempts += 1
                    try:
                        await js.publish(subject, data, timeout=2.0, headers=headers)
                    except nats.errors.TimeoutError:
                        reached = True
                        raise
        except Exception as exc:
            raise UsageNotRecorded(
                f"{self.name}: usage report {report.id} was not recorded after {attempts} "
                f"attempt(s) ({type(exc).__name__}: {exc or 'no acknowledgement'}); "
                + (
                    "it may have been stored: resend the same report (err.report, same id) "
                    "within 10 minutes and it is counted once"
                    if reached
                    else "resend the same report (err.report) once the control plane is back"
                ),
                details={
                    "report_id": report.id, "attempts": attempts, "may_be_recorded": reached,
                    "error": type(exc).__name__,
                },
                report=report,
            ) from exc

    # -- traces (broker.telemetry) -------------------------------------------------------

    def _span_attributes(
        self, *, target: str = "", capability: str = "", headers: dict[str, str] | None = None
    ) -> dict[str, Any]:
        """Who this agent is, and what the span is about (built only when spans record)."""
        m = self.manifest
        attrs: dict[str, Any] = {
            ATTR["agent"]: m.name, ATTR["version"]: m.version, ATTR["team"]: m.team,
            ATTR["target"]: target, ATTR["capability"]: capability, ATTR["system"]: "nats",
        }  # fmt: skip
        if headers:
            attrs[ATTR["caller"]] = headers.get(H_CALLER, "")
            attrs[ATTR["call_id"]] = headers.get(H_CALL_ID, "")
        return attrs
