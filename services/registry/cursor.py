"""Discovery's pagination cursors: opaque to clients, the (agent, version) a page ended on."""

from __future__ import annotations

import base64
import binascii

import msgspec

from broker.codec import encode
from broker.errors import InvalidInput
from services.registry.versions import version_rank

__all__ = ["decode_cursor", "encode_cursor"]


def encode_cursor(name: str, version: str) -> str:
    """The opaque pagination cursor of a page that ended on ``name`` ``version``."""
    return base64.urlsafe_b64encode(encode([name, version])).decode("ascii")


def decode_cursor(cursor: str) -> tuple[str, str]:
    """The (agent name, rank) the previous page ended on.

    Raises:
        InvalidInput: not a cursor this registry made (``details['field'] == 'cursor'``).
    """
    try:
        name, version = msgspec.json.decode(
            base64.urlsafe_b64decode(cursor.encode("ascii")), type=tuple[str, str]
        )
        return name, version_rank(version)
    except (binascii.Error, UnicodeError, msgspec.DecodeError, ValueError) as exc:
        raise InvalidInput(
            "invalid cursor: pass the next_cursor of the previous page unchanged, "
            "or an empty cursor for the first page",
            details={"field": "cursor"},
        ) from exc
