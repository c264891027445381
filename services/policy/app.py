"""FastStream application factory of the policy service."""

from __future__ import annotations

from faststream import FastStream

from broker.settings import Settings
from services.policy.service import PolicyService

__all__ = ["PolicyService", "create_app"]


def create_app(settings: Settings | None = None) -> FastStream:
    """Build the policy service's FastStream app from ``settings`` (default: environment)."""
    return PolicyService(settings or Settings()).app()
