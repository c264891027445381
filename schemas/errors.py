"""Structured error reply shared by every service."""

from __future__ import annotations

from typing import Any

import msgspec

from schemas._base import Wire

__all__ = ["ErrorReply"]


class ErrorReply(Wire, frozen=True, tag="error.v1"):
    """What a service (or the SDK on a target agent) replies when a request fails.

    Attributes:
        code: Stable machine-readable code (see ``broker.errors``).
        message: Human-readable explanation that says what to do next.
        details: Structured context: field path, limits, policy ids...
    """

    code: str
    message: str
    details: dict[str, Any] = msgspec.field(default_factory=dict)
