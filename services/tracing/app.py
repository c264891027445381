"""FastStream application factory of the tracing service."""

from __future__ import annotations

from faststream import FastStream

from broker.settings import Settings
from services.tracing.service import TracingService

__all__ = ["TracingService", "create_app"]


def create_app(settings: Settings | None = None) -> FastStream:
    """Build the tracing service's FastStream app from ``settings`` (default: environment)."""
    return TracingService(settings or Settings()).app()
