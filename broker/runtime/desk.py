"""Desks: the parts a service is composed of, what they may use of it, how they declare endpoints.

A service that does several jobs (the policy service: relaying calls,
circuit breakers, policy sets, approvals, routes) keeps each job in a *desk*
of its own module. A desk takes a :class:`ServiceHost` (the service seen
through a Protocol) and explicit callbacks for anything else, never the
concrete service, so no desk imports the service that composes it.

A desk with request-reply endpoints declares them from :meth:`Desk.endpoints`
as :class:`EndpointSpec` rows (subject, request type, handler; made with
:func:`declare_endpoint`, so the type checker matches handler and request
type); the service registers them with
:meth:`broker.runtime.service.Service.include` (FastStream's
``include_router`` idea), each under the same endpoint contract as
:meth:`~broker.runtime.service.Service.endpoint`. Handlers are typed by their
request: no dispatch by name.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

from nats.aio.client import Client
from nats.js import JetStreamContext

from broker.errors import SignalboxError
from broker.runtime.audit import AuditEmitter
from broker.settings import Settings
from broker.subjects import Audience, Subjects
from broker.telemetry import Telemetry
from schemas import Wire

__all__ = ["Desk", "EndpointSpec", "ServiceHost", "declare_endpoint"]

Req = TypeVar("Req")


@dataclass(frozen=True, slots=True)
class EndpointSpec(Generic[Req]):
    """One request-reply endpoint a desk serves.

    Attributes:
        subject: What to subscribe to (see :meth:`ServiceHost.endpoint`).
        request_type: The request's wire type (decoded before ``handler`` runs).
        handler: Takes the decoded request; returns a wire Struct or raises a
            :class:`~broker.errors.SignalboxError`.
        audience: Who may send it (None: the default for the subject).
        queue: Queue group (None: the service's; ``""``: every replica answers).
    """

    subject: str
    request_type: type[Req]
    handler: Callable[[Req], Awaitable[Wire]]
    audience: Audience | None = None
    queue: str | None = None


def declare_endpoint(
    subject: str,
    request_type: type[Req],
    handler: Callable[[Req], Awaitable[Wire]],
    *,
    audience: Audience | None = None,
    queue: str | None = None,
) -> EndpointSpec[Any]:
    """An :class:`EndpointSpec` whose handler takes ``request_type`` (checked by mypy).

    Build a desk's rows with this rather than ``EndpointSpec(...)``: in a list
    of ``EndpointSpec[Any]`` the constructor's request type is inferred as
    ``Any`` and a handler of another request type would pass unnoticed.
    """
    return EndpointSpec(subject, request_type, handler, audience, queue)


class Desk(Protocol):
    """A part of a service that serves request-reply endpoints."""

    def endpoints(self) -> Sequence[EndpointSpec[Any]]:
        """The endpoints this desk serves (read once, when the service includes it)."""
        ...


class ServiceHost(Protocol):
    """What a desk of a service (approvals, routes, identity...) may use of the service
    it lives in: its connection and JetStream, subjects, settings, spans, audit, actor,
    the authenticated operator or agent of the request being handled, rejections and endpoints.

    Desks take this (and explicit callbacks for anything else), never the concrete
    service, so no desk imports the service that composes it.
    """

    settings: Settings
    subjects: Subjects
    #: The service's spans (:mod:`broker.telemetry`).
    telemetry: Telemetry

    @property
    def nc(self) -> Client:
        """The service's NATS connection."""
        ...

    @property
    def js(self) -> JetStreamContext:
        """JetStream on :attr:`nc`."""
        ...

    @property
    def audit(self) -> AuditEmitter:
        """The service's audit emitter."""
        ...

    @property
    def actor(self) -> str:
        """The service's audit actor."""
        ...

    def operator(self, requested_by: str = "") -> str:
        """The authenticated actor of the admin request being handled."""
        ...

    def requesting_agent(self) -> str:
        """The agent whose own subject carried the agent-scoped request being handled."""
        ...

    async def reject(self, err: SignalboxError, *, subject: str, actor: str | None = None) -> None:
        """Count and audit a rejected request."""
        ...

    def endpoint(
        self,
        subject: str,
        request_type: type[Req],
        *,
        audience: Audience | None = None,
        queue: str | None = None,
    ) -> Callable[[Callable[[Req], Awaitable[Wire]]], Callable[[Req], Awaitable[Wire]]]:
        """Declare a request-reply endpoint."""
        ...
