"""Unique ids for calls, events and batches (the SDK and the services share them)."""

from __future__ import annotations

import os

__all__ = ["new_id"]


def new_id() -> str:
    """A new unique id (128 random bits, hex) for events, batches and calls."""
    return os.urandom(16).hex()
