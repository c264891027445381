"""The fleet file: its model, reading and validating it, and writing it (TOML).

A fleet file lists agents' bound attributes, budgets, version routes and
manual circuit breakers (``docs/decisions.md``, 40; the README's "Fleet
configuration as a file" has a whole example)::

    [[budgets]]
    scope = "team"
    name = "risk"
    window = "day"
    limit_usd = 250.0

    [[routes]]
    agent = "recommender"
    stable = "1.0.0"
    canary = "2.0.0"
    weight = 5

    [routes.guard]
    max_error_rate = 0.05

It is read whole and validated before anything is asked of the control
plane: an unknown section or key (a typo) is an error, as is a wrong type or
value, or the same budget, route, binding or breaker twice; every error names
the file, the table (``[[budgets]] #2``, numbered from 1) and the field. The
model is this module's, not a wire type: :mod:`services.cli.fleet` turns its
entries into the admin requests (``SetBudget``, ``SetRollout``...).
"""

from __future__ import annotations

import tomllib
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any

import msgspec

from schemas import BudgetScope, BudgetWindow
from schemas.identity import AttributeValues
from schemas.registry import Name, ShortText, Version

__all__ = [
    "SECTIONS",
    "BindingEntry",
    "BreakerEntry",
    "BudgetEntry",
    "Entry",
    "FleetFile",
    "FleetFileError",
    "GuardEntry",
    "RouteEntry",
    "fleet_toml",
    "parse_fleet",
    "read_fleet_file",
    "toml_value",
]

#: The sections of a fleet file, in the order they are written and applied.
SECTIONS = ("bindings", "budgets", "routes", "breakers")

_Reason = Annotated[
    str, msgspec.Meta(min_length=1, max_length=512, pattern=r"^[^\x00-\x1f\x7f]*$(?!\n)")
]
_Target = Annotated[str, msgspec.Meta(pattern=r"^(agent|team):[A-Za-z0-9_-]{1,64}$(?!\n)")]
_Ratio = Annotated[float, msgspec.Meta(gt=0)]


class _Entry(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One table of a fleet file: an unknown key is an error, never ignored."""


class BudgetEntry(_Entry, frozen=True, kw_only=True):
    """``[[budgets]]``: what :class:`~schemas.SetBudget` sets (every field: the file is the
    whole budget)."""

    scope: BudgetScope
    name: Name
    window: BudgetWindow = "day"
    limit_usd: Annotated[float, msgspec.Meta(gt=0, le=1e9)]
    soft_ratio: Annotated[float, msgspec.Meta(gt=0, le=1)] = 0.8

    @property
    def key(self) -> str:
        """``team:risk (day)``."""
        return f"{self.scope}:{self.name} ({self.window})"


class GuardEntry(_Entry, frozen=True, kw_only=True):
    """``[routes.guard]``: a canary's automatic rollback (:class:`~schemas.RouteGuard`)."""

    max_error_rate: Annotated[float, msgspec.Meta(ge=0, le=1)] = 0.05
    max_error_ratio: _Ratio = 2.0
    max_p99_ratio: _Ratio = 2.0
    max_cost_ratio: _Ratio = 1.5
    min_calls: Annotated[int, msgspec.Meta(ge=1, le=1_000_000)] = 50
    window: Annotated[float, msgspec.Meta(gt=0, le=86_400)] = 300.0


class RouteEntry(_Entry, frozen=True, kw_only=True):
    """``[[routes]]``: how an agent's calls split between its stable version and a canary.

    Without ``canary`` every call goes to ``stable`` (``rollout promote``);
    with one, ``weight`` percent go to it (``rollout set``), ``sticky`` keeps a
    route key's calls on one version and ``guard`` rolls it back on its own.
    """

    agent: Name
    stable: Version
    canary: Version | None = None
    weight: Annotated[int, msgspec.Meta(ge=0, le=100)] | None = None
    sticky: bool | None = None
    guard: GuardEntry | None = None

    @property
    def key(self) -> str:
        """The agent's name."""
        return self.agent


class BindingEntry(_Entry, frozen=True, kw_only=True):
    """``[[bindings]]``: an enrolled agent's bound attributes, all of them (one left out
    is bound empty)."""

    agent: Name
    team: ShortText = ""
    owner: ShortText = ""
    namespace: ShortText = ""
    region: ShortText = ""
    projects: AttributeValues = ()
    tags: AttributeValues = ()

    @property
    def key(self) -> str:
        """The agent's name."""
        return self.agent


class BreakerEntry(_Entry, frozen=True, kw_only=True):
    """``[[breakers]]``: a breaker an operator holds open until it leaves the file."""

    target: _Target
    reason: _Reason

    @property
    def key(self) -> str:
        """``agent:NAME`` or ``team:NAME``."""
        return self.target

    @property
    def breaker_key(self) -> str:
        """The breaker's key in ``sb_breakers`` (``team.legacy``)."""
        return self.target.replace(":", ".", 1)


Entry = BudgetEntry | RouteEntry | BindingEntry | BreakerEntry


class FleetFile(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A whole fleet file (also the control plane's state in the same terms)."""

    bindings: tuple[BindingEntry, ...] = ()
    budgets: tuple[BudgetEntry, ...] = ()
    routes: tuple[RouteEntry, ...] = ()
    breakers: tuple[BreakerEntry, ...] = ()


class FleetFileError(Exception):
    """A fleet file that cannot be applied: the message names the file, the table and the
    field."""


def read_fleet_file(path: Path) -> FleetFile:
    """Read and validate the fleet file at ``path`` (see :func:`parse_fleet`).

    Raises:
        FleetFileError: it cannot be read, or is not a valid fleet file.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise FleetFileError(f"cannot read {path}: {exc}") from exc
    return parse_fleet(text, str(path))


def parse_fleet(text: str, source: str) -> FleetFile:
    """The fleet file ``text`` (named ``source`` in errors), validated as a whole.

    Raises:
        FleetFileError: not TOML, an unknown section or key, a wrong type or
            value, or the same budget, route, binding or breaker twice.
    """
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise FleetFileError(f"{source}: not TOML: {exc}") from exc
    try:
        fleet = msgspec.convert(doc, FleetFile)
    except msgspec.ValidationError as exc:
        raise FleetFileError(_located(source, str(exc))) from exc
    fleet = msgspec.structs.replace(
        fleet, bindings=tuple(_normal(b) for b in fleet.bindings),
        routes=tuple(
            msgspec.structs.replace(r, sticky=bool(r.sticky) if r.canary else r.sticky or None)
            for r in fleet.routes
        ),
    )  # fmt: skip
    for section in SECTIONS:
        first: dict[str, int] = {}
        for number, entry in enumerate(getattr(fleet, section), start=1):
            where = f"{source}: [[{section}]] #{number} ({entry.key})"
            if entry.key in first:
                raise FleetFileError(f"{where} repeats [[{section}]] #{first[entry.key]}")
            first[entry.key] = number
            if isinstance(entry, RouteEntry):
                _check_route(entry, where)
    return fleet


def _located(source: str, message: str) -> str:
    """msgspec's ``... - at `$.budgets[0].limit_usd``` in the file's terms."""
    what, _, path = message.partition(" - at `$")
    what = what.replace("Object contains unknown field", "unknown field")
    path = path.rstrip("`")
    if not path:  # the top level: a section, not a key
        if what.startswith("unknown field"):
            name = what.removeprefix("unknown field ")
            known = ", ".join(f"[[{s}]]" for s in SECTIONS)
            return (
                f"{source}: unknown section {name} (a fleet file has {known}; nothing else "
                "is managed this way yet)"
            )
        return f"{source}: {what}"
    section, _, rest = path.lstrip(".").partition("[")
    index, _, field_path = rest.partition("]")
    if not index.isdigit():
        return f"{source}: [{section}]: {what} (write each entry as a [[{section}]] table)"
    where = f"{source}: [[{section}]] #{int(index) + 1}"
    if field_path:
        where += f", field {field_path.lstrip('.')}"
    return f"{where}: {what}"


def _check_route(route: RouteEntry, where: str) -> None:
    if route.canary is None:
        if route.weight is not None or route.sticky or route.guard is not None:
            raise FleetFileError(
                f"{where}: weight, sticky and guard need a canary (without one every call "
                "goes to the stable version)"
            )
        return
    if route.weight is None:
        raise FleetFileError(f"{where}: give the canary's weight (percent of the calls)")
    if route.canary == route.stable:
        raise FleetFileError(f"{where}: the canary {route.canary} is also the stable version")


def _normal(binding: BindingEntry) -> BindingEntry:
    """As the registry stores it: values stripped, each project and tag once."""
    return msgspec.structs.replace(
        binding, team=binding.team.strip(), owner=binding.owner.strip(),
        namespace=binding.namespace.strip(), region=binding.region.strip(),
        projects=tuple(dict.fromkeys(binding.projects)), tags=tuple(dict.fromkeys(binding.tags)),
    )  # fmt: skip


# -- writing TOML ----------------------------------------------------------------------------


def fleet_toml(fleet: FleetFile, header: Iterable[str] = ()) -> str:
    """``fleet`` as a fleet file (``header``: comment lines on top); read back by
    :func:`parse_fleet` to the same value."""
    lines = [f"# {line}" for line in header]
    for section in SECTIONS:
        for entry in getattr(fleet, section):
            doc = {k: v for k, v in msgspec.to_builtins(entry).items() if v is not None}
            lines += ["", f"[[{section}]]"]
            tables = {k: v for k, v in doc.items() if isinstance(v, dict)}
            lines += [f"{k} = {toml_value(v)}" for k, v in doc.items() if k not in tables]
            for name, table in tables.items():
                lines += ["", f"[{section}.{name}]"]
                lines += [f"{k} = {toml_value(v)}" for k, v in table.items()]
    return "\n".join(lines).lstrip("\n") + "\n"


_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f",
            "\r": "\\r"}  # fmt: skip


def toml_value(value: Any) -> str:
    """A TOML value: a basic string, a boolean, an integer, a float or an array of them."""
    if isinstance(value, str):
        escaped = (
            _ESCAPES.get(c) or (f"\\u{ord(c):04x}" if ord(c) < 0x20 or ord(c) == 0x7F else c)
            for c in value
        )
        return '"' + "".join(escaped) + '"'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value)  # shortest text that reads back to the same float
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML value for {value!r}")
