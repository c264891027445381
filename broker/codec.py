"""msgspec JSON serialization with typed, path-bearing decode errors."""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Any, TypeVar

import msgspec

from broker.errors import PayloadTooLarge, SchemaError

__all__ = ["decode", "encode", "ensure_size"]

T = TypeVar("T")

_encoder = msgspec.json.Encoder()
_PATH = re.compile(r" - at `(?P<path>[^`]*)`$")


def encode(obj: Any) -> bytes:
    """Encode a wire Struct (or any msgspec-supported value) as JSON bytes.

    ``bytes`` pass through untouched so raw payloads need no wrapping.
    """
    if isinstance(obj, bytes | bytearray | memoryview):
        return bytes(obj)
    return _encoder.encode(obj)


@lru_cache(maxsize=512)
def _decoder(type_: Any) -> msgspec.json.Decoder[Any]:
    return msgspec.json.Decoder(type_)


def decode(data: bytes, type_: type[T]) -> T:
    """Decode JSON bytes into ``type_``.

    Raises:
        SchemaError: malformed JSON, an unknown tag, a missing field or a wrong
            type; ``details['path']`` names the offending field (``$.a[0].b``).
    """
    if type_ is bytes:
        return data  # type: ignore[return-value]
    try:
        return _decoder(type_).decode(data)  # type: ignore[arg-type,no-any-return]
    except msgspec.ValidationError as exc:
        text = str(exc)
        match = _PATH.search(text)
        path = match.group("path") if match else "$"
        raise SchemaError(
            f"invalid {getattr(type_, '__name__', str(type_))}: {text}",
            details={"path": path, "error": _PATH.sub("", text)},
        ) from exc
    except msgspec.DecodeError as exc:
        raise SchemaError(
            f"malformed JSON: {exc}", details={"path": "$", "error": str(exc)}
        ) from exc
    except UnicodeDecodeError as exc:  # msgspec raises it for invalid UTF-8 in a string
        raise SchemaError(
            f"malformed JSON: invalid UTF-8 at byte {exc.start}",
            details={"path": "$", "error": "invalid UTF-8"},
        ) from exc
    except RecursionError as exc:  # msgspec's own depth limit (~1,000 levels)
        raise SchemaError(
            "malformed JSON: nested too deeply", details={"path": "$", "error": str(exc)}
        ) from exc


def ensure_size(data: bytes, limit: int, *, what: str = "payload") -> None:
    """Raise :class:`PayloadTooLarge` if ``data`` is longer than ``limit`` bytes."""
    if len(data) > limit:
        raise PayloadTooLarge(
            f"{what} is {len(data)} bytes, over the {limit}-byte limit; "
            "send a reference (object store key, URL) instead of the content",
            details={"size": len(data), "limit": limit},
        )
