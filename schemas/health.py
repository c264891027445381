"""Service health: what each service replica reports to ``signalbox status`` and probes."""

from __future__ import annotations

from schemas._base import Wire

__all__ = ["ConsumerHealth", "HealthRequest", "ServiceHealth"]


class HealthRequest(Wire, frozen=True, tag="health_request.v1"):
    """Ask every replica of a service for its health (``sb.admin.<service>.status``)."""


class ConsumerHealth(Wire, frozen=True, tag="consumer_health.v1"):
    """One JetStream consumer of a service.

    Attributes:
        stream: The stream it reads.
        durable: The consumer's durable name.
        pending: Messages stored and not yet delivered (the lag).
        ack_pending: Delivered and not yet acknowledged.
        redelivered: Delivered more than once and not yet acknowledged.
    """

    stream: str
    durable: str
    pending: int = 0
    ack_pending: int = 0
    redelivered: int = 0


class ServiceHealth(Wire, frozen=True, tag="service_health.v1"):
    """One service replica's health.

    Attributes:
        service: ``registry``, ``policy``, ``cost`` or ``tracing``.
        instance: This replica's id (random at start).
        host: Host name.
        pid: Process id.
        started_at: Unix time the replica started.
        time: Unix time of this report.
        connected: Connected to NATS.
        ready: Serving: connected, started, no problem below.
        problems: What is wrong, each saying what to do.
        audit_pending: Audit events not yet stored in JetStream.
        audit_last_ack: Unix time JetStream last stored an audit batch (0: never).
        consumers: The replica's JetStream consumers and their lag.
        rejected: Requests refused since start.
    """

    service: str
    instance: str
    host: str
    pid: int
    started_at: float
    time: float
    connected: bool
    ready: bool
    problems: tuple[str, ...] = ()
    audit_pending: int = 0
    audit_last_ack: float = 0.0
    consumers: tuple[ConsumerHealth, ...] = ()
    rejected: int = 0
