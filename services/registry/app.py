"""FastStream application factory of the registry service."""

from __future__ import annotations

from faststream import FastStream

from broker.settings import Settings
from services.registry.service import RegistryService

__all__ = ["RegistryService", "create_app"]


def create_app(settings: Settings | None = None) -> FastStream:
    """Build the registry service's FastStream app from ``settings`` (default: environment)."""
    return RegistryService(settings or Settings()).app()
