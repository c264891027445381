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
import logging
import signal
import time
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any, TypeVar, overload

import msgspec
from nats.aio.client import Client
from opentelemetry import context as otel_context
from opentelemetry.trace import Span, SpanKind, TracerProvider

from broker.codec import encode
from broker.connection import connect, sync_connection
from broker.dedup import Deduplicator, validate_idempotency_key
from broker.diagnostics import cancel_and_wait, finish_within
from broker.errors import ConfigError, SignalboxError
from broker.ids import new_id
from broker.membership import Membership
from broker.modelcall import ModelCall, authz_request
from broker.process import STOP_SIGNALS, serve
from broker.replies import (
    H_DEADLINE,
    H_IDEMPOTENCY_KEY,
    H_MSG_ID,
    H_ROUTE_KEY,
    H_TARGET_VERSION,
    H_TIMEOUT_MS,
    H_TRACEPARENT,
    mediated_request,
)
from broker.replies import request as request_reply
from broker.serving import (
    CallContext,
    CapabilityServer,
    HandlerFn,
    chain_headers,
    client_hop,
    span_attributes,
)
from broker.settings import Settings
from broker.subjects import Subjects, inbox_prefix, validate_token
from broker.telemetry import (
    ATTR,
    Telemetry,
    annotate,
    current_trace_id,
    decision_attributes,
    extract,
    inject,
)
from broker.usage import USAGE_RETRY_FOR, check_retry_for, publish_usage
from schemas import AgentManifest, AuthzRequest, Decision, InstanceStats, Registered, UsageReport

__all__ = ["Agent", "CallContext"]

log = logging.getLogger(__name__)

#: Longest an agent waits for nats-py to close its connection at stop.
_CLOSE_TIMEOUT = 5.0

T = TypeVar("T")


class Agent(Membership):
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

    The agent composes its parts: :attr:`serving` (the handlers and the calls
    forwarded to them, :mod:`broker.serving`), its registration, heartbeats and
    discovery (:class:`~broker.membership.Membership`), and here its calls,
    authorizations, model calls (:mod:`broker.modelcall`) and usage reports
    (:mod:`broker.usage`).
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
        #: How long :meth:`report_usage` retries one report (same id) before giving up.
        self.usage_retry_for = check_retry_for(usage_retry_for)
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
        #: The capability handlers, and the calls forwarded to them (broker.serving).
        self.serving = CapabilityServer(
            manifest, subjects=self.subjects, telemetry=self.telemetry, dedup=self.dedup,
            max_concurrency=max_concurrency,
        )  # fmt: skip
        self._nc: Client | None = None
        self._stopping = False
        self.registration: Registered | None = None
        self.heartbeat_interval = heartbeat_interval
        #: Unique id of this running instance (shown by ``$SRV.PING``).
        self.instance_id = new_id()[:22]
        self._started_at = 0.0
        self._heartbeat_task: asyncio.Task[None] | None = None

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

    # -- serving (broker.serving) ----------------------------------------------

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
            self.serving.add(fn, name, description=description, tags=tags)
            return fn

        return register

    # -- lifecycle -------------------------------------------------------------

    def full_manifest(self) -> AgentManifest:
        """The manifest with the capabilities declared on this agent merged in."""
        declared = {c.name: c for c in self.manifest.capabilities}
        declared.update(self.serving.capabilities)
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
            # First, an echo through this agent's own inbox: with another agent's
            # credential the server refuses that inbox, and this says so at once
            # (IdentityMismatch) instead of a registration timing out.
            await sync_connection(self._nc)
            if self.register_on_start:
                self.registration = await self.register()
            await self.serving.start(self._nc)
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
        return self.serving.stats(self._started_at)

    async def stop(self, drain_timeout: float = 10.0, *, leave: bool = False) -> None:
        """Stop taking requests, finish in-flight ones (up to ``drain_timeout``), disconnect.

        With ``leave``, the instance also tells the registry it is gone
        (:meth:`leave`) once it takes no more requests; a registry that does
        not answer only delays that (the instance then ages out by heartbeats).
        """
        if self._nc is None or self._stopping:
            return
        self._stopping = True
        await cancel_and_wait(self._heartbeat_task, f"{self.name}: heartbeats")
        self._heartbeat_task = None
        if leave and self.register_on_start:
            # Concurrently with the drain: nothing new reaches it, running calls finish.
            drained = asyncio.ensure_future(self.serving.stop(drain_timeout))
            try:
                await self.leave(timeout=min(5.0, drain_timeout))
            except (SignalboxError, OSError, TimeoutError) as exc:
                log.warning("%s: could not leave the registry (%r)", self.name, exc)
            await drained
        else:
            await self.serving.stop(drain_timeout)
        nc, self._nc, self._stopping = self._nc, None, False
        assert nc is not None  # only stop() clears it, and _stopping kept others out
        with contextlib.suppress(Exception):
            await nc.flush(timeout=2)
        await finish_within(nc.close(), _CLOSE_TIMEOUT, f"{self.name}: closing its connection")

    async def run_forever(
        self,
        *,
        drain_timeout: float = 25.0,
        signals: Sequence[signal.Signals] = STOP_SIGNALS,
    ) -> None:
        """Serve until SIGTERM or SIGINT, then stop without losing a call (:func:`broker.serve`:
        no new calls, leave the registry, finish the running ones within ``drain_timeout``,
        under Kubernetes' default 30 s grace period, reply, disconnect, return)."""
        await serve(self, drain_timeout=drain_timeout, signals=signals)

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
        hdrs.update(chain_headers())  # made by a handler: the chain it serves goes on
        if headers:
            hdrs.update(headers)
        # A traceparent in ``headers`` is the parent; else the current span (a handler's).
        parent = extract(headers) if headers and H_TRACEPARENT in headers else None
        with self._hop("sb.call", SpanKind.CLIENT, hdrs, parent) as span:
            annotate(span, lambda: self._span_attributes(target=target, capability=capability))
            inject(hdrs, span)
            try:
                return await mediated_request(
                    self.nc, subject, payload, returns, hdrs, timeout,
                    target=target, capability=capability, idempotency_key=idempotency_key,
                )  # fmt: skip
            except SignalboxError as err:
                raise err.with_trace(f"{span.get_span_context().trace_id:032x}") from err.__cause__

    @overload
    async def authorize(self, request: AuthzRequest, /, *, timeout: float = ...) -> Decision: ...

    @overload
    async def authorize(
        self, action: str, resource: str, /, *, timeout: float = ..., **fields: Any
    ) -> Decision: ...

    async def authorize(
        self,
        request: AuthzRequest | str,
        resource: str = "",
        /,
        *,
        timeout: float = 2.0,
        **fields: Any,
    ) -> Decision:
        """Ask the policy service, before an LLM or tool call, whether this agent may make it.

        The request goes to ``sb.authz.<self>`` and is decided by the Cedar
        policies (deny by default) and audited. A denial is an answer, not an
        error: check ``decision.effect`` (``allow``, ``deny`` or
        ``needs_approval``); ``decision.reasons`` and ``decision.policy_ids``
        say why.

        Args:
            request: The :class:`~schemas.AuthzRequest` (its docstring says
                what each field means); or its ``action`` (``use_model``,
                ``use_tool``), with ``resource`` and its other fields as keywords
                (built by :func:`broker.modelcall.authz_request`).
            resource: Model or tool id, with an ``action``.
            timeout: Seconds to wait for the decision.
            fields: With an ``action``: the request's other fields (``provider=``,
                ``region=``, ``estimated_tokens=``, ``max_output_tokens=``...).

        When a budget applies to this agent (its own, its team's, the
        project's, or a delegating agent's), an allowed ``use_model`` also
        reserves the call's worst-case cost: ``decision.reservation_id``; report
        the call's usage with it to settle (:meth:`model_call` does all of
        this). A budget that cannot cover the call makes the decision a deny
        (``reason_code`` ``budget_exceeded``, ``decision.budget`` says which).

        Raises:
            SchemaError: a field is out of range (the details name it).
            TypeError: a keyword is not a field of the request, or came with one.
            ControlPlaneUnavailable: no policy service is answering.
            CallTimeout: no decision within ``timeout``.

        Example:
            ``d = await agent.authorize("use_model", "gpt-4o", region="eu-west-1",
            estimated_tokens=1_200)``
        """
        if not isinstance(request, AuthzRequest):
            ask = authz_request(request, resource, **fields)
        elif resource or fields:
            raise TypeError("authorize: give the AuthzRequest, or its fields, not both")
        else:
            ask = request
        origin: dict[str, str] = {}
        with self._hop("sb.authz", SpanKind.CLIENT, origin) as span:
            annotate(span, lambda: {
                **self._span_attributes(), ATTR["action"]: ask.action,
                ATTR["resource"]: ask.resource, ATTR["provider"]: ask.provider,
            })  # fmt: skip
            decision = await request_reply(
                self.nc,
                self.subjects.authz(self.name),
                ask,
                Decision,
                timeout=timeout,
                hint="no policy service is answering; start one with `signalbox up`",
                # The sb.authz span's trace context, and the chain a handler serves.
                headers=inject({**chain_headers(), **origin}),
            )
            annotate(span, lambda: decision_attributes(decision))
            return decision

    def model_call(
        self, model: str | AuthzRequest, *, timeout: float = 5.0, **fields: Any
    ) -> ModelCall:
        """Authorize, reserve the budget of, and settle one model call (async context manager).

        ``model`` is the model id, with the model use's other fields as
        keywords (``provider=``, ``region=``, ``estimated_tokens=``,
        ``max_output_tokens=``, ``project=``, ``data_tags=``,
        ``on_behalf_of=``: see :class:`~schemas.AuthzRequest`); or the
        ``use_model`` request itself. ``timeout``: seconds to wait for the
        decision (and for each renewal of the reservation).

        Raises on entry :class:`~broker.errors.BudgetExceeded` (a budget cannot
        cover the worst case) or :class:`~broker.errors.CallDenied` (policy,
        breaker, approval needed); on exit reports the usage recorded with
        :meth:`ModelCall.record`, settling the reservation. See
        :mod:`broker.modelcall`.

        Example:
            ``async with agent.model_call("gpt-4o", estimated_tokens=900) as call:``
            ``    call.record(input_tokens=700, output_tokens=150)``
        """
        if isinstance(model, AuthzRequest):
            if fields:
                raise TypeError("model_call: give the AuthzRequest, or its fields, not both")
            return ModelCall(self, model, timeout=timeout)
        return ModelCall(self, authz_request("use_model", model, **fields), timeout=timeout)

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
            headers = inject({H_MSG_ID: report.id, **chain_headers(), **origin}, span)
            await publish_usage(
                self.nc,
                self.subjects.usage(self.name),
                report,
                encode(report),
                headers,
                retry_for=self.usage_retry_for,
                agent=self.name,
            )
            return report.id

    # -- traces (broker.telemetry) -------------------------------------------------------

    def _hop(
        self,
        name: str,
        kind: SpanKind,
        headers: dict[str, str],
        parent: otel_context.Context | None = None,
    ) -> contextlib.AbstractContextManager[Span]:
        """The client span of a call, authorization or usage report (see
        :func:`broker.serving.client_hop`)."""
        return client_hop(self.telemetry, self.name, name, kind, headers, parent)

    def _span_attributes(
        self, *, target: str = "", capability: str = "", headers: dict[str, str] | None = None
    ) -> dict[str, Any]:
        """Who this agent is, and what the span is about (built only when spans record)."""
        return span_attributes(self.manifest, target=target, capability=capability, headers=headers)
