"""Base class shared by every wire type."""

from __future__ import annotations

import msgspec

__all__ = ["SCHEMA_VERSION", "Wire"]

#: Major schema version; it is part of every tag (``"<name>.v1"``). Compatible
#: changes add fields with defaults and keep the version; an incompatible
#: change gets a new tag, so an old decoder rejects it instead of misreading.
SCHEMA_VERSION = 1


class Wire(msgspec.Struct, frozen=True, kw_only=True, tag_field="type", omit_defaults=False):
    """Frozen, tagged msgspec Struct: the only kind of object Signalbox puts on the wire.

    Unknown *fields* are ignored (a newer peer may add fields with defaults);
    unknown *tags* and wrong types are rejected with a path-bearing error.
    """
