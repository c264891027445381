"""Model prices: the shipped defaults (``prices.toml``), an operator's override, the fallback.

Pure and synchronous: no I/O but reading the files. A prices file is TOML::

    as_of = "2025-06-01"            # when these prices were taken (shown in reports)
    currency = "USD"                # only USD for now

    [fallback]                      # prices an unknown model (and flags the report)
    input = 15.0
    output = 60.0
    cached_input = 7.5              # optional; defaults to `input`

    [models."gpt-4o"]               # US dollars per million tokens
    provider = "openai"
    input = 2.5
    output = 10.0
    cached_input = 1.25

An override file has the same shape, every part optional: each of its models
replaces the shipped entry of that name (or adds one), its ``fallback``
replaces the shipped fallback, its ``as_of`` replaces the date.

Costs are computed in integers (prices are read as decimals, kept as
pico-dollars per token, and each report's cost rounded to nano-dollars), so a
total is the same whatever order reports are summed in.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from decimal import ROUND_HALF_EVEN, Decimal
from importlib import resources
from pathlib import Path
from typing import Any, Final

import msgspec

from broker.errors import ConfigError

__all__ = [
    "NANOS_PER_USD",
    "ModelPrice",
    "Price",
    "Priced",
    "Prices",
    "load_prices",
    "parse_prices",
    "shipped_prices_text",
]

#: Costs are stored as integer nano-dollars.
NANOS_PER_USD: Final = 1_000_000_000

_PICO_PER_USD_PER_MILLION: Final = Decimal(1_000_000)  # $/Mtok -> pico-$/token
_SUFFIX = re.compile(r"[-@:.]")


class _Price(msgspec.Struct, forbid_unknown_fields=True):
    input: Decimal
    output: Decimal
    cached_input: Decimal | None = None
    provider: str = ""


class _File(msgspec.Struct, forbid_unknown_fields=True):
    as_of: str = ""
    currency: str = "USD"
    fallback: dict[str, Any] | None = None
    models: dict[str, dict[str, Any]] = msgspec.field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Price:
    """One model's prices, in pico-dollars per token (exact integers).

    Attributes:
        input: Uncached prompt token.
        output: Completion token.
        cached_input: Prompt token read from the provider's cache.
        provider: Informational.
    """

    input: int
    output: int
    cached_input: int
    provider: str = ""

    def cost_nanos(self, input_tokens: int, output_tokens: int, cached_tokens: int) -> int:
        """Cost of one call in nano-dollars (``cached_tokens`` are part of ``input_tokens``)."""
        cached = min(cached_tokens, input_tokens)
        pico = (
            (input_tokens - cached) * self.input
            + cached * self.cached_input
            + output_tokens * self.output
        )
        return (pico + 500) // 1000


@dataclass(frozen=True, slots=True)
class ModelPrice:
    """The price that applies to a model name.

    Attributes:
        price: The prices.
        entry: The prices-file entry that matched ("" for the fallback).
        fallback: True if the model is unknown and was priced by the fallback.
    """

    price: Price
    entry: str
    fallback: bool


@dataclass(frozen=True, slots=True)
class Priced:
    """A call's cost: nano-dollars and whether the fallback priced it."""

    nanos: int
    fallback: bool


@dataclass(frozen=True, slots=True)
class Prices:
    """A resolved price table.

    Attributes:
        models: Prices by model name.
        fallback: Prices of models not in :attr:`models`.
        as_of: When the prices were taken.
        sources: Files they came from, defaults first.
    """

    models: dict[str, Price]
    fallback: Price
    as_of: str
    sources: tuple[str, ...]

    def lookup(self, model: str) -> ModelPrice:
        """Price of ``model``: exact name, else the longest entry that is a prefix of it
        followed by ``-``, ``@``, ``:`` or ``.`` (dated or tagged variants), else the fallback."""
        found = self.models.get(model)
        if found is not None:
            return ModelPrice(found, model, False)
        best = ""
        for name in self.models:
            if (
                len(name) > len(best)
                and model.startswith(name)
                and _SUFFIX.match(model, len(name)) is not None
            ):
                best = name
        if best:
            return ModelPrice(self.models[best], best, False)
        return ModelPrice(self.fallback, "", True)

    def cost(
        self, model: str, input_tokens: int, output_tokens: int, cached_tokens: int = 0
    ) -> Priced:
        """Cost of one call of ``model``."""
        match = self.lookup(model)
        return Priced(
            match.price.cost_nanos(input_tokens, output_tokens, cached_tokens), match.fallback
        )


def shipped_prices_text() -> str:
    """The default prices file shipped with Signalbox."""
    return resources.files("services.cost").joinpath("prices.toml").read_text("utf-8")


def _line_of(text: str, path: list[str]) -> int | None:
    """Best-effort 1-based line of a field path (``models``, ``<name>``, ``input``) in TOML text."""
    lines = text.splitlines()
    start = 0
    if path and path[0] in ("models", "fallback"):
        header = (
            re.compile(r"^\s*\[\s*fallback\s*\]")
            if path[0] == "fallback"
            else re.compile(
                r"^\s*\[\s*models\s*\.\s*(\"|')?" + re.escape(path[1]) + r"(\"|')?\s*\]"
            )
            if len(path) > 1
            else re.compile(r"^\s*\[\s*models")
        )
        for i, line in enumerate(lines):
            if header.match(line):
                start = i
                break
        else:
            return None
    field = path[-1] if path and path[-1] not in ("models", "fallback") else None
    if field is None or (path[0] == "models" and len(path) == 2):
        return start + 1
    key = re.compile(r"^\s*(\"|')?" + re.escape(field) + r"(\"|')?\s*=")
    for i in range(start, len(lines)):
        if i > start and lines[i].lstrip().startswith("[") and path[0] in ("models", "fallback"):
            break
        if key.match(lines[i]):
            return i + 1
    return start + 1


def _error(source: str, text: str, message: str, path: list[str]) -> ConfigError:
    line = _line_of(text, path)
    dotted = ".".join(path) or "(file)"
    where = f"{source}:{line}" if line else source
    return ConfigError(
        f"{where}: invalid prices file at {dotted}: {message}",
        details={"file": source, "line": line, "field": dotted},
    )


def _msgspec_path(message: str) -> tuple[str, list[str]]:
    """Split msgspec's ``<message> - at `$.a.b``` into the message and ``["a", "b"]``;
    a missing or unknown field's name is appended to the path."""
    match = re.search(r" - at `\$(.*)`$", message)
    path = [p for p in match.group(1).split(".") if p] if match else []
    text = message[: match.start()] if match else message
    named = re.search(r"(?:unknown|missing required) field `([^`]*)`", text)
    if named:
        path.append(named.group(1))
    return text, path


def _convert_price(value: Any, source: str, text: str, path: list[str]) -> _Price:
    try:
        return msgspec.convert(value, _Price)
    except msgspec.ValidationError as exc:
        message, sub = _msgspec_path(str(exc))
        raise _error(source, text, message, [*path, *sub]) from exc


def _to_price(raw: _Price, source: str, text: str, path: list[str]) -> Price:
    def pico(value: Decimal, field: str) -> int:
        if not value.is_finite() or value < 0:
            raise _error(source, text, "a price must be a finite number >= 0", [*path, field])
        scaled = (value * _PICO_PER_USD_PER_MILLION).quantize(Decimal(1), ROUND_HALF_EVEN)
        return int(scaled)

    input_ = pico(raw.input, "input")
    cached = pico(raw.cached_input, "cached_input") if raw.cached_input is not None else input_
    return Price(input_, pico(raw.output, "output"), cached, raw.provider)


def parse_prices(
    text: str, source: str = "<prices>"
) -> tuple[_File, dict[str, Price], Price | None]:
    """Parse and validate one prices file.

    Returns:
        The raw file, its models' prices, its fallback (None if absent).

    Raises:
        ConfigError: not TOML, or a field is missing, unknown, of the wrong
            type or negative; the message names the file, line and field.
    """
    try:
        data: dict[str, Any] = tomllib.loads(text, parse_float=Decimal)
    except tomllib.TOMLDecodeError as exc:
        line = re.search(r"line (\d+)", str(exc))
        raise ConfigError(
            f"{source}{':' + line.group(1) if line else ''}: not valid TOML: {exc}",
            details={"file": source, "line": int(line.group(1)) if line else None, "field": ""},
        ) from exc
    try:
        raw = msgspec.convert(data, _File)
    except msgspec.ValidationError as exc:
        message, path = _msgspec_path(str(exc))
        raise _error(source, text, message, path) from exc
    if raw.currency != "USD":
        raise _error(source, text, "only USD prices are supported", ["currency"])
    models = {}
    for name, value in raw.models.items():
        path = ["models", name]
        models[name] = _to_price(_convert_price(value, source, text, path), source, text, path)
    fallback = None
    if raw.fallback is not None:
        path = ["fallback"]
        fallback = _to_price(_convert_price(raw.fallback, source, text, path), source, text, path)
    return raw, models, fallback


def load_prices(override: Path | None = None) -> Prices:
    """The shipped prices, with ``override``'s entries merged over them.

    Raises:
        ConfigError: a file is unreadable or invalid (file, line and field named).
    """
    shipped = shipped_prices_text()
    raw, models, fallback = parse_prices(shipped, "services/cost/prices.toml")
    if fallback is None:  # pragma: no cover - the shipped file has one
        raise ConfigError("the shipped prices file has no [fallback] section")
    as_of = raw.as_of
    sources: tuple[str, ...] = ("services/cost/prices.toml",)
    if override is not None:
        try:
            text = Path(override).read_text("utf-8")
        except OSError as exc:
            raise ConfigError(
                f"cannot read the prices file {override} ({exc.strerror or exc}); fix "
                "SIGNALBOX_PRICES_PATH or unset it to use the shipped prices",
                details={"file": str(override), "line": None, "field": ""},
            ) from exc
        over, over_models, over_fallback = parse_prices(text, str(override))
        models = {**models, **over_models}
        fallback = over_fallback or fallback
        as_of = over.as_of or as_of
        sources = (*sources, str(override))
    return Prices(models=models, fallback=fallback, as_of=as_of, sources=sources)
