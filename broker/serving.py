"""The serving side of an agent: its capability handlers and the calls forwarded to them.

:class:`CapabilityServer` holds the handlers an :class:`~broker.agent.Agent`
serves (declared with :meth:`Agent.capability <broker.agent.Agent.capability>`),
subscribes to ``sb.in.<agent>.<capability>`` (and ``...<capability>.<version
token>``, where a version route sends calls to this version only), runs each
forwarded call in its own task under a concurrency limit, and answers it:
the handler's result, or a typed error reply. It refuses unrun a call that
arrives after its deadline, runs a keyed call at most once per caller and key
(:mod:`broker.dedup`), and counts what it served (the heartbeat's
:class:`~schemas.InstanceStats`). On stop it lets the calls in flight finish.

The call being served is remembered in a context variable (its ``Sb-Chain``
and ``Sb-Chain-Sig``, :func:`chain_headers`): every call, authorization and
usage report a handler makes carries it on.
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
from typing import Any

import msgspec
import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from opentelemetry import context as otel_context
from opentelemetry.trace import Span, SpanKind

from broker.codec import decode, encode
from broker.dedup import Deduplicator
from broker.errors import (
    BadRequest,
    DeadlineExceeded,
    InvalidInput,
    RemoteError,
    SignalboxError,
)
from broker.replies import (
    H_CALL_ID,
    H_CALLER,
    H_CHAIN,
    H_CHAIN_SIG,
    H_DEADLINE,
    H_ERROR,
    H_TRACE_ORIGIN,
    error_reply,
)
from broker.subjects import Subjects, validate_token, version_token
from broker.telemetry import ATTR, Telemetry, annotate, current_trace_id, fail
from schemas import AgentManifest, CallMeta, Capability, InstanceStats

__all__ = [
    "CallContext",
    "CapabilityServer",
    "HandlerFn",
    "chain_headers",
    "client_hop",
    "serving_a_call",
    "span_attributes",
]

log = logging.getLogger(__name__)

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


def chain_headers() -> dict[str, str]:
    """The ``Sb-Chain`` (and ``Sb-Chain-Sig``) of the call being served; empty outside handlers."""
    chain, signature = _CHAIN.get()
    if not chain:
        return {}
    return {H_CHAIN: chain, H_CHAIN_SIG: signature} if signature else {H_CHAIN: chain}


def serving_a_call() -> bool:
    """True inside a handler serving a call the policy service forwarded (with its chain)."""
    return bool(_CHAIN.get()[0])


@contextlib.contextmanager
def client_hop(
    telemetry: Telemetry,
    agent: str,
    name: str,
    kind: SpanKind,
    headers: dict[str, str],
    parent: otel_context.Context | None = None,
) -> Iterator[Span]:
    """The client span ``name`` of ``agent``'s call, authorization or usage report.

    Inside a handler (and with no parent given), a child of the call being
    served: the policy service vouched for that trace with the chain it
    signed. Otherwise a trace this agent owns (``Sb-Trace-Origin`` goes
    into ``headers``; see :func:`broker.telemetry.owned_trace_id`), linked
    to the application's span if there is one: the control plane continues
    no trace an agent merely names.
    """
    if parent is None and serving_a_call():
        with telemetry.hop(name, kind=kind) as span:
            yield span
        return
    with telemetry.owned_hop(name, agent, kind=kind, parent=parent) as (span, origin):
        headers[H_TRACE_ORIGIN] = origin
        yield span


def span_attributes(
    manifest: AgentManifest,
    *,
    target: str = "",
    capability: str = "",
    headers: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Who the agent is, and what the span is about (built only when spans record)."""
    m = manifest
    attrs: dict[str, Any] = {
        ATTR["agent"]: m.name, ATTR["version"]: m.version, ATTR["team"]: m.team,
        ATTR["target"]: target, ATTR["capability"]: capability, ATTR["system"]: "nats",
    }  # fmt: skip
    if headers:
        attrs[ATTR["caller"]] = headers.get(H_CALLER, "")
        attrs[ATTR["call_id"]] = headers.get(H_CALL_ID, "")
    return attrs


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
class _Handler:
    """One served capability: its declaration, and how to call its handler."""

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


class CapabilityServer:
    """Serves one agent's capability handlers (see the module docstring).

    Args:
        manifest: The agent's manifest (its name, version and team).
        subjects: Subject builder of the agent's prefix.
        telemetry: The agent's spans (``sb.serve``).
        dedup: Answers of keyed calls, for their retries.
        max_concurrency: Handler invocations running at once; further
            requests wait in the subscription's buffer.
    """

    def __init__(
        self,
        manifest: AgentManifest,
        *,
        subjects: Subjects,
        telemetry: Telemetry,
        dedup: Deduplicator,
        max_concurrency: int,
    ) -> None:
        self.manifest = manifest
        self.subjects = subjects
        self.telemetry = telemetry
        self.dedup = dedup
        self._handlers: dict[str, _Handler] = {}
        self._nc: Client | None = None
        self._subs: list[Subscription] = []
        self._inflight: set[asyncio.Task[None]] = set()
        self._slots = asyncio.Semaphore(max_concurrency)
        self._requests = 0
        self._errors = 0
        self._processing_ns = 0
        self._last_error = ""
        #: Calls refused unrun because they arrived after their deadline.
        self.late = 0

    @property
    def name(self) -> str:
        """The agent's name."""
        return self.manifest.name

    @property
    def capabilities(self) -> dict[str, Capability]:
        """The declarations of the served capabilities, by name."""
        return {name: handler.spec for name, handler in self._handlers.items()}

    def add(
        self, fn: HandlerFn, name: str | None, *, description: str, tags: tuple[str, ...]
    ) -> None:
        """Serve ``fn`` as capability ``name`` (default: its name, ``_`` as ``-``).

        Its input type is its first parameter's annotation; a second
        parameter receives the :class:`CallContext`. The declaration's
        JSON schemas come from the input and return annotations.
        """
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
        self._handlers[cap_name] = _Handler(spec, fn, input_type, wants_ctx)

    async def start(self, nc: Client) -> None:
        """Take the calls forwarded to this agent's capabilities on ``nc`` (none served: nothing).

        The caller makes sure the server has the subscriptions (see
        :func:`broker.connection.sync_connection`) before it counts on them.
        """
        self._nc = nc
        self._subs = []  # those of a start that failed went with its connection
        if not self._handlers:
            return
        self._subs.append(await nc.subscribe(
            self.subjects.inbound_of(self.name),
            queue=f"agent-{self.name}",
            cb=self._on_request,
            pending_msgs_limit=65536,
        ))  # fmt: skip
        # Calls a version route (canary rollout) sends to this version only.
        self._subs.append(await nc.subscribe(
            self.subjects.inbound_versions_of(self.name, self.manifest.version),
            queue=f"agent-{self.name}-{version_token(self.manifest.version)}",
            cb=self._on_request,
            pending_msgs_limit=65536,
        ))  # fmt: skip

    async def stop(self, drain_timeout: float) -> None:
        """Take no more calls; let those running finish (up to ``drain_timeout``), cancel the rest.

        Their replies still go out: the connection is closed by the agent after this.
        """
        self._nc = None
        subs, self._subs = self._subs, []
        for sub in subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
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

    def stats(self, started: float) -> InstanceStats:
        """The counters of what this server has served, for an instance started at ``started``."""
        return InstanceStats(
            started=started,
            requests=self._requests,
            errors=self._errors,
            processing_time_ns=self._processing_ns,
            last_error=self._last_error[:256],
        )

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
        nc = self._nc
        if nc is None:  # stopping: not taken, like the requests still buffered
            return
        headers = msg.headers or {}
        _CHAIN.set((headers.get(H_CHAIN, ""), headers.get(H_CHAIN_SIG, "")))
        # sb.in.<self>.<capability>, or .<version token> after it for a routed call.
        cap_name = msg.subject.split(".", 4)[3]
        if _past(headers.get(H_DEADLINE, "")):
            # Its caller has given up: running it now is work nobody waits for.
            self.late += 1
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
            annotate(span, lambda: span_attributes(
                self.manifest, capability=cap_name, headers=headers
            ))  # fmt: skip
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
            cap = self._handlers.get(cap_name)
            if cap is None:
                raise InvalidInput(
                    f"agent {self.name!r} has no capability {cap_name!r}",
                    details={"capability": cap_name, "offered": sorted(self._handlers)},
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
