"""Semantic versions in the registry: parsing, npm-style ranges, and the ``rank`` sort key.

Ordering. ``rank`` is a text key whose ascending bytewise order is *descending*
semver precedence (release above its prereleases, numeric identifiers compared
as numbers...), the version text breaking ties, so "highest version first" is
an ascending index scan and "highest version per name" is ``min(rank)``
(:mod:`services.registry.tables` stores it; the in-memory index sorts by it too).
"""

from __future__ import annotations

import functools
from typing import Final

import semantic_version  # type: ignore[import-untyped]  # ships no type hints

from broker.errors import InvalidInput

__all__ = [
    "MAX_VERSION_LENGTH",
    "check_range",
    "checked_version",
    "in_range",
    "parse_version",
    "version_rank",
]

#: Longest version string accepted: the semver columns are 64-bit integers and
#: the rank key is indexed, so unbounded versions are refused up front.
MAX_VERSION_LENGTH: Final = 128


@functools.lru_cache(maxsize=4096)
def parse_version(version: str) -> semantic_version.Version:
    """``version`` parsed as semver (cached: a fleet repeats the same few versions).

    Raises:
        ValueError: not a semantic version.
    """
    return semantic_version.Version(version)


@functools.lru_cache(maxsize=256)
def _parse_range(spec: str) -> semantic_version.NpmSpec:
    return semantic_version.NpmSpec(spec)


@functools.lru_cache(maxsize=65536)
def in_range(spec: str, version: str) -> bool:
    """True if ``version`` satisfies the npm range ``spec`` (validate it with check_range)."""
    # Matching costs microseconds and a fleet repeats the same few versions.
    return bool(_parse_range(spec).match(parse_version(version)))


def check_range(spec: str) -> None:
    """Refuse an invalid npm-style version range.

    Raises:
        InvalidInput: ``spec`` does not parse (``details['field'] == 'versions'``).
    """
    try:
        _parse_range(spec)
    except ValueError as exc:
        raise InvalidInput(
            f"invalid version range {spec!r}: {exc}; use npm syntax such as "
            "'^1.2', '>=1.0.0 <2.0.0' or '1.x'",
            details={"field": "versions"},
        ) from exc


def _put_number(out: bytearray, number: int) -> None:
    # Length-prefixed digits order like the numbers (semver has no leading zeros).
    digits = str(number).encode("ascii")
    out.append(len(digits))
    out += digits


_INVERT: Final = bytes(range(255, -1, -1))


@functools.lru_cache(maxsize=4096)
def version_rank(version: str) -> str:
    """The sort key of ``version``: ascending = highest semver precedence first.

    The byte string built here orders like semver precedence, then like the
    version text (which only separates versions differing in build metadata).
    It is prefix-free (numbers are length-prefixed, identifiers and the text
    terminated), so two keys differ at some byte, and inverting every byte
    exactly reverses their order.
    """
    parsed = parse_version(version)
    out = bytearray()
    for number in (parsed.major, parsed.minor, parsed.patch):
        _put_number(out, number)
    if parsed.prerelease:
        out.append(1)  # a prerelease sorts below its release (3)
        for ident in parsed.prerelease:
            if ident.isdigit():
                out.append(1)  # numeric identifiers sort below alphanumeric ones (2)
                _put_number(out, int(ident))
            else:
                out.append(2)
                out += ident.encode("ascii")
                out.append(0)
        out.append(0)  # fewer identifiers sort first when the rest are equal
    else:
        out.append(3)
    out += version.encode("ascii")
    out.append(0)
    return bytes(out).translate(_INVERT).hex()


def checked_version(version: str) -> semantic_version.Version:
    """``version`` parsed, if it is a semantic version the store can hold.

    Raises:
        InvalidInput: not semver, longer than :data:`MAX_VERSION_LENGTH`, or a
            component over 2**63 - 1 (``details['field'] == 'version'``).
    """
    if len(version) > MAX_VERSION_LENGTH:
        raise InvalidInput(
            f"version is {len(version)} characters long, over the limit of {MAX_VERSION_LENGTH}",
            details={"path": "$.version", "field": "version"},
        )
    try:
        parsed = parse_version(version)
    except ValueError as exc:
        raise InvalidInput(
            f"version {version!r} is not semantic versioning (MAJOR.MINOR.PATCH, e.g. 1.4.0): "
            f"{exc}",
            details={"path": "$.version", "field": "version"},
        ) from exc
    if max(parsed.major, parsed.minor, parsed.patch) >= 2**63:
        raise InvalidInput(
            f"version {version!r} has a component over 2**63 - 1",
            details={"path": "$.version", "field": "version"},
        )
    return parsed
