"""FastStream application factory of the cost service."""

from __future__ import annotations

from faststream import FastStream

from broker.settings import Settings
from services.cost.service import CostService

__all__ = ["CostService", "create_app"]


def create_app(settings: Settings | None = None) -> FastStream:
    """Build the cost service's FastStream app from ``settings`` (default: environment)."""
    return CostService(settings or Settings()).app()
