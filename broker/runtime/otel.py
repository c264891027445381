"""The control plane's OpenTelemetry providers: built from settings, exporting spans.

Agents need only the OpenTelemetry API (``broker.telemetry``): an application
that wants its agents' spans exported sets its own provider. The services
build theirs here from ``SIGNALBOX_OTEL_*`` (exporter ``none``, ``console``
or ``otlp``), with :class:`OwnedTraceIds` so a root span gets the trace id its
agent owns.
"""

from __future__ import annotations

import sys
from urllib.parse import urlsplit

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SimpleSpanProcessor,
    SpanExporter,
)
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.sdk.trace.sampling import ALWAYS_ON

from broker.errors import ConfigError
from broker.settings import Settings
from broker.telemetry import ID_ONLY, requested_root_trace

__all__ = ["OwnedTraceIds", "tracer_provider"]


class OwnedTraceIds(RandomIdGenerator):
    """The SDK's random ids, except a root span started by :meth:`Telemetry.owned_hop`,
    which gets the trace id its agent owns (what :func:`tracer_provider` installs)."""

    #: What :attr:`broker.telemetry.Telemetry.owns_ids` looks for.
    signalbox_owned_ids = True

    def generate_trace_id(self) -> int:
        """The owned trace id if one is being started, else a random one."""
        return requested_root_trace() or super().generate_trace_id()


def _otlp_exporter(settings: Settings) -> SpanExporter:
    endpoint = (settings.otel_endpoint or "").strip()
    if not endpoint:
        raise ConfigError(
            "SIGNALBOX_OTEL_EXPORTER=otlp needs SIGNALBOX_OTEL_ENDPOINT (the collector's "
            "URL, e.g. http://127.0.0.1:4318 for http/protobuf or http://127.0.0.1:4317 "
            "for grpc), or set SIGNALBOX_OTEL_EXPORTER=none",
            details={"field": "otel_endpoint", "exporter": "otlp"},
        )
    if settings.otel_protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
            OTLPSpanExporter as GrpcExporter,
        )

        return GrpcExporter(endpoint=endpoint)
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
        OTLPSpanExporter as HttpExporter,
    )

    if urlsplit(endpoint).path in ("", "/"):
        endpoint = endpoint.rstrip("/") + "/v1/traces"
    return HttpExporter(endpoint=endpoint)


def tracer_provider(
    settings: Settings,
    *,
    exporter: SpanExporter | None = None,
    service_name: str | None = None,
) -> trace.TracerProvider:
    """The tracer provider ``settings`` ask for (``SIGNALBOX_OTEL_*``).

    Args:
        settings: ``otel_exporter`` (``none``, ``console``, ``otlp``),
            ``otel_endpoint``, ``otel_protocol``, ``otel_service_name``.
        exporter: Export to this instead, synchronously (tests pass an
            ``InMemorySpanExporter``); the settings' exporter is ignored.
        service_name: ``service.name`` of the resource (default: the settings').

    Returns:
        :data:`ID_ONLY` for ``none`` (no exporter given), else an SDK
        ``TracerProvider`` sampling every span, with a batch processor for
        ``console`` and ``otlp``. Whoever builds a recording provider shuts
        it down (flushing what is batched).

    Raises:
        ConfigError: ``otlp`` without an endpoint.
    """
    if exporter is None and settings.otel_exporter == "none":
        return ID_ONLY
    resource = Resource.create({"service.name": service_name or settings.otel_service_name})
    provider = TracerProvider(resource=resource, sampler=ALWAYS_ON, id_generator=OwnedTraceIds())
    if exporter is not None:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    elif settings.otel_exporter == "console":
        # sys.stdout as it is now (the exporter's default is bound at import time).
        provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter(out=sys.stdout)))
    else:
        provider.add_span_processor(BatchSpanProcessor(_otlp_exporter(settings)))
    return provider
