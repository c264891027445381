"""Plumbing every ``signalbox`` command group shares (one place, imported by all of them).

Settings from the environment, one-line failures, running a coroutine on
uvloop, connecting as an operator, calling an operator-only endpoint, the
``--nats-url`` / ``--json`` options, durations, times.
"""

from __future__ import annotations

import getpass
import re
from collections.abc import Coroutine
from datetime import datetime
from typing import Annotated, Any, NoReturn, TypeVar

import nats.errors
import typer
import uvloop
from nats.aio.client import Client
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape

from broker.connection import connect
from broker.errors import AuthenticationFailed, SignalboxError
from broker.runtime.identity import operator_connect_options, operator_name
from broker.settings import Settings
from broker.subjects import Subjects
from services.cli.client import admin_request

__all__ = [
    "CONNECT_TIMEOUT",
    "DEFAULT_NATS_URL",
    "JsonOption",
    "NatsUrlOption",
    "admin_call",
    "client_url",
    "clock",
    "connect_operator",
    "fail",
    "load_settings",
    "parse_duration",
    "run",
    "who",
]

T = TypeVar("T")

#: Where client commands look when neither --nats-url nor SIGNALBOX_NATS_URL is
#: given: the address `signalbox up` listens on by default.
DEFAULT_NATS_URL = "nats://127.0.0.1:4222"

#: Seconds client commands try to reach NATS before giving up.
CONNECT_TIMEOUT = 3.0

NatsUrlOption = Annotated[
    str | None,
    typer.Option(
        "--nats-url",
        help=f"NATS URL (default: $SIGNALBOX_NATS_URL, else {DEFAULT_NATS_URL})",
        show_default=False,
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Machine-readable JSON output.")]


def fail(message: str) -> NoReturn:
    """Print one ``error:`` line on stderr and exit 1."""
    Console(stderr=True, soft_wrap=True).print(
        f"[bold red]error:[/] {escape(message)}", highlight=False
    )
    raise typer.Exit(1)


def load_settings(**overrides: Any) -> Settings:
    """Settings from ``SIGNALBOX_*`` env vars, overridden by the flags that were given."""
    given = {k: v for k, v in overrides.items() if v is not None}
    try:
        return Settings(**given)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or "settings"
        fail(
            f"invalid setting {field} ({first['msg']}); fix the flag or "
            f"SIGNALBOX_{field.upper()} and retry"
        )


def client_url(flag: str | None) -> tuple[str, Settings]:
    """The NATS URL a client command uses (flag, else settings, else the default) and settings."""
    settings = load_settings()
    return flag or settings.nats_url or DEFAULT_NATS_URL, settings


def run(main: Coroutine[Any, Any, T], *, interrupted: int = 130) -> T:
    """Run ``main`` on uvloop; expected errors become one line and exit 1."""
    try:
        return uvloop.run(main)
    except SignalboxError as err:
        fail(err.message)
    except KeyboardInterrupt:
        raise typer.Exit(interrupted) from None


async def connect_operator(
    url: str,
    settings: Settings,
    *,
    hint: str = "start it with `signalbox up` or pass --nats-url",
) -> Client:
    """Connect as an operator (credentials from the secrets folder or SIGNALBOX_NATS_USER)."""
    try:
        options = operator_connect_options(settings)
        nc = await connect(url, name="signalbox-cli", connect_timeout=CONNECT_TIMEOUT, **options)
    except AuthenticationFailed as exc:
        if settings.operator_credential is not None:
            raise SignalboxError(
                f"NATS at {url} refused SIGNALBOX_OPERATOR_CREDENTIAL (revoked, expired or "
                "mistyped): ask an admin for a new one (`signalbox operators add NAME`)",
                details={"url": url},
            ) from exc
        raise SignalboxError(
            f"NATS at {url} refused the operator credentials; run the command where "
            "`signalbox up` keeps its data (or set SIGNALBOX_DATA_DIR / SIGNALBOX_SECRETS_DIR "
            "to that folder), or set SIGNALBOX_NATS_USER and SIGNALBOX_NATS_PASSWORD",
            details={"url": url},
        ) from exc
    except (OSError, nats.errors.Error) as exc:
        raise SignalboxError(
            f"cannot reach NATS at {url}; {hint}", details={"url": url, "error": repr(exc)}
        ) from exc
    if settings.operator_credential is not None:
        # Read by services.cli.client.operator_of: the subjects this operator may use.
        nc.sb_operator = operator_name(settings.operator_credential.get_secret_value())  # type: ignore[attr-defined]
    return nc


def admin_call(nats_url: str | None, service: str, op: str, request: Any, returns: type[T]) -> T:
    """Ask ``sb.admin.<service>.<op>`` as an operator and decode the reply (errors exit 1)."""
    url, settings = client_url(nats_url)

    async def main() -> T:
        nc = await connect_operator(url, settings)
        try:
            return await admin_request(
                nc, Subjects(settings.subject_prefix), op, request, returns, service=service
            )
        finally:
            await nc.close()

    return run(main())


def who() -> str:
    """The operator's login name (kept in audit records), or "" where there is none."""
    try:
        return getpass.getuser()[:128]
    except (KeyError, OSError):  # no login name (a bare container)
        return ""


def parse_duration(text: str) -> float:
    """Seconds in ``90``, ``90s``, ``30m``, ``12h``, ``7d`` or ``2w``.

    Raises:
        typer.BadParameter: anything else.
    """
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*", text)
    if match is None or float(match.group(1)) <= 0:
        raise typer.BadParameter(f"{text!r} is not a duration: use e.g. 3600, 30m, 12h, 7d")
    return float(match.group(1)) * _UNITS[match.group(2) or "s"]


_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 7 * 86400.0}


def clock(t: float) -> str:
    """Local date and time of a Unix time, to the second ("" for 0)."""
    return datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M:%S") if t else ""
