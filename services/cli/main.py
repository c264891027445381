"""The ``signalbox`` command line.

::

    signalbox up [--nats-url URL] [--data-dir DIR] [--port N]    run the control plane
    signalbox demo [--data-dir DIR]                             scripted demo, real agents
    signalbox agents list [--team T] [--capability C] [--json]  registered agents
    signalbox audit tail [--kind K] [--agent A] [--last N] [--count N] [--json]
    signalbox version

Exit status: 0 on success, 1 on any error (one line on stderr saying what to do
next; never a traceback for an expected failure such as a server that cannot
be reached, a refused request or a bad argument).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Coroutine
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn, TypeVar

import msgspec
import nats.errors
import typer
import uvloop
from nats.aio.client import Client
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape
from rich.panel import Panel
from rich.table import Table
from typer.core import TyperGroup

from broker.connection import connect
from broker.errors import SchemaError, SignalboxError
from broker.settings import Settings
from broker.subjects import Subjects, validate_token
from schemas import AgentRecord, DiscoverAgents, DiscoverResult, GetAgent
from services.cli.client import list_agents, registry_request
from services.cli.render import agent_panel, agents_table, audit_header, audit_line, to_json
from services.tracing.reader import audit_filter, follow, start_of_last

if TYPE_CHECKING:
    from services.runner import Stack

__all__ = ["DEFAULT_NATS_URL", "app"]

T = TypeVar("T")

#: Where client commands look when neither --nats-url nor SIGNALBOX_NATS_URL is
#: given: the address `signalbox up` listens on by default.
DEFAULT_NATS_URL = "nats://127.0.0.1:4222"

#: Seconds client commands try to reach NATS before giving up.
CONNECT_TIMEOUT = 3.0


class _Group(TyperGroup):
    """Exit 1 (not click's 2) on usage errors: every failure has the same status."""

    def main(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().main(*args, **kwargs)
        except SystemExit as exc:
            if exc.code == 2:
                raise SystemExit(1) from None
            raise


app = typer.Typer(
    name="signalbox",
    cls=_Group,
    help="Signalbox: a control plane for fleets of AI agents, on NATS.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)
agents_app = typer.Typer(help="Inspect registered agents.", no_args_is_help=True)
audit_app = typer.Typer(help="Read the hash-chained audit trail.", no_args_is_help=True)
app.add_typer(agents_app, name="agents")
app.add_typer(audit_app, name="audit")

NatsUrlOption = Annotated[
    str | None,
    typer.Option(
        "--nats-url",
        help=f"NATS URL (default: $SIGNALBOX_NATS_URL, else {DEFAULT_NATS_URL})",
        show_default=False,
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Machine-readable JSON output.")]


# -- shared plumbing ----------------------------------------------------------------------


def _fail(message: str) -> NoReturn:
    """Print one ``error:`` line on stderr and exit 1."""
    Console(stderr=True, soft_wrap=True).print(
        f"[bold red]error:[/] {escape(message)}", highlight=False
    )
    raise typer.Exit(1)


def _settings(**overrides: Any) -> Settings:
    """Settings from ``SIGNALBOX_*`` env vars, overridden by the flags that were given."""
    given = {k: v for k, v in overrides.items() if v is not None}
    try:
        return Settings(**given)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or "settings"
        _fail(
            f"invalid setting {field} ({first['msg']}); fix the flag or "
            f"SIGNALBOX_{field.upper()} and retry"
        )


def _client_url(flag: str | None) -> tuple[str, Settings]:
    settings = _settings()
    return flag or settings.nats_url or DEFAULT_NATS_URL, settings


def _run(main: Coroutine[Any, Any, T], *, interrupted: int = 130) -> T:
    """Run ``main`` on uvloop; expected errors become one line and exit 1."""
    try:
        return uvloop.run(main)
    except SignalboxError as err:
        _fail(err.message)
    except KeyboardInterrupt:
        raise typer.Exit(interrupted) from None


async def _connect(
    url: str, *, hint: str = "start it with `signalbox up` or pass --nats-url"
) -> Client:
    try:
        return await connect(url, name="signalbox-cli", connect_timeout=CONNECT_TIMEOUT)
    except (OSError, nats.errors.Error) as exc:
        raise SignalboxError(
            f"cannot reach NATS at {url}; {hint}", details={"url": url, "error": repr(exc)}
        ) from exc


# -- commands -----------------------------------------------------------------------------


@app.command()
def version() -> None:
    """Print the installed Signalbox version."""
    try:
        number = metadata.version("signalbox")
    except metadata.PackageNotFoundError:  # running from a source tree, not installed
        number = "0+unknown"
    typer.echo(f"signalbox {number}")


@app.command()
def up(
    nats_url: Annotated[
        str | None,
        typer.Option(
            "--nats-url",
            help="Use this NATS server instead of starting the embedded one "
            "(default: $SIGNALBOX_NATS_URL, else embedded)",
            show_default=False,
        ),
    ] = None,
    data_dir: Annotated[
        Path | None,
        typer.Option(
            "--data-dir",
            help="Data folder: JetStream store, allow-list (default: $SIGNALBOX_DATA_DIR "
            "or .signalbox)",
            show_default=False,
        ),
    ] = None,
    port: Annotated[
        int | None,
        typer.Option(
            "--port",
            help="Embedded server port, 0 for a free one (default: $SIGNALBOX_NATS_PORT or 4222)",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Run the control plane (embedded nats-server and all four services) until Ctrl-C."""
    # Imported here: the services (FastStream...) are heavy, and `version` or
    # `audit tail` should start fast.
    from services.runner import Stack, configure_logging, wait_for_signal

    settings = _settings(nats_url=nats_url, data_dir=data_dir, nats_port=port)
    configure_logging(settings.log_level)
    console = Console()

    async def main() -> None:
        if settings.nats_url:
            # The services reconnect forever by design; fail fast instead when
            # the server is not there at all at start-up.
            hint = "check that server is running, or drop --nats-url for an embedded one"
            await (await _connect(settings.nats_url, hint=hint)).close()
        stack = Stack(settings)
        await stack.start()
        try:
            console.print(_up_panel(stack))
            await wait_for_signal()
            console.print("[dim]stopping…[/]")
        finally:
            await stack.stop()

    _run(main(), interrupted=0)
    console.print("Signalbox stopped.")


def _up_panel(stack: Stack) -> Panel:
    s = stack.settings
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    where = "embedded nats-server" if stack.server is not None else "external server"
    grid.add_row("NATS", f"{s.nats_url}  ({where})")
    grid.add_row("data dir", str(s.data_dir.resolve()))
    allowlist = s.resolved_allowlist_path
    if allowlist.exists():
        grid.add_row("allow-list", str(allowlist.resolve()))
    else:
        grid.add_row(
            "allow-list",
            f"{allowlist} [yellow](missing: every call is denied until you create it; "
            "format in services/policy/decider.py)[/]",
        )
    grid.add_row("services", ", ".join(stack.services))
    flag = "" if s.nats_url == DEFAULT_NATS_URL else f" --nats-url {s.nats_url}"
    grid.add_row("try", f"signalbox agents list{flag}  ·  signalbox audit tail{flag}")
    return Panel(grid, title="Signalbox is up · Ctrl-C to stop", border_style="green")


@app.command()
def demo(
    data_dir: Annotated[
        Path | None,
        typer.Option(
            "--data-dir",
            help="Keep the demo's data here (default: a temporary folder, removed afterwards)",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Start a throwaway control plane and run four real agents through a lending scenario."""
    from services.demo.scenario import run_demo
    from services.runner import configure_logging

    configure_logging("WARNING")
    code = _run(run_demo(Console(), data_dir))
    raise typer.Exit(code)


@agents_app.command("list")
def agents_list(
    nats_url: NatsUrlOption = None,
    team: Annotated[str | None, typer.Option("--team", help="Only this team's agents.")] = None,
    capability: Annotated[
        str | None, typer.Option("--capability", help="Only agents offering this capability.")
    ] = None,
    json_out: JsonOption = False,
) -> None:
    """List registered agents (asks the registry service)."""
    url, settings = _client_url(nats_url)
    subjects = Subjects(settings.subject_prefix)

    async def main() -> tuple[Any, ...]:
        nc = await _connect(url)
        try:
            return await list_agents(nc, subjects, team=team, capability=capability)
        finally:
            await nc.close()

    records = _run(main())
    if json_out:
        typer.echo(to_json(list(records)))
        return
    console = Console()
    if not records:
        wanted = " matching the filters" if team or capability else ""
        console.print(f"No agents registered{wanted} at {url}.")
        return
    console.print(agents_table(records))


async def _registry(url: str, subjects: Subjects, op: str, request: Any, returns: type[T]) -> T:
    nc = await _connect(url)
    try:
        return await registry_request(nc, subjects, op, request, returns)
    finally:
        await nc.close()


@agents_app.command("show")
def agents_show(
    name: Annotated[str, typer.Argument(help="Agent name.")],
    version: Annotated[
        str | None, typer.Option("--version", help="This version (default: the highest).")
    ] = None,
    nats_url: NatsUrlOption = None,
    json_out: JsonOption = False,
) -> None:
    """Show one agent version: manifest, health, capabilities."""
    url, settings = _client_url(nats_url)
    subjects = Subjects(settings.subject_prefix)
    try:
        request = GetAgent(name=name, version=version)
        validate_token(name, what="agent name")
    except SignalboxError as err:
        _fail(err.message)
    record = _run(_registry(url, subjects, "get", request, AgentRecord))
    if json_out:
        typer.echo(to_json(record))
        return
    Console().print(
        Panel(agent_panel(record), title=f"{record.manifest.name} {record.manifest.version}")
    )


@agents_app.command("discover")
def agents_discover(
    capability: Annotated[
        str | None, typer.Option("--capability", help="Offers this capability.")
    ] = None,
    tag: Annotated[
        str | None, typer.Option("--tag", help="Has a capability with this tag (pii...).")
    ] = None,
    team: Annotated[str | None, typer.Option("--team", help="Owning team.")] = None,
    owner: Annotated[str | None, typer.Option("--owner", help="Owner.")] = None,
    region: Annotated[str | None, typer.Option("--region", help="Region.")] = None,
    versions: Annotated[
        str | None,
        typer.Option("--versions", help="npm-style semver range: '^1.2', '>=1.0.0 <2', '1.x'."),
    ] = None,
    health: Annotated[str | None, typer.Option("--health", help="healthy, stale or down.")] = None,
    all_versions: Annotated[
        bool, typer.Option("--all-versions", help="Every matching version, not just the highest.")
    ] = False,
    limit: Annotated[int, typer.Option("--limit", min=1, max=1000, help="Page size.")] = 50,
    cursor: Annotated[str, typer.Option("--cursor", help="Next page (from a previous run).")] = "",
    nats_url: NatsUrlOption = None,
    json_out: JsonOption = False,
) -> None:
    """Find agents by capability, tag, team, owner, region, version range and health."""
    url, settings = _client_url(nats_url)
    subjects = Subjects(settings.subject_prefix)
    fields = {
        "capability": capability,
        "tag": tag,
        "team": team,
        "owner": owner,
        "region": region,
        "versions": versions,
        "health": health,
    }
    try:
        query = msgspec.convert(
            {
                **{k: v for k, v in fields.items() if v is not None},
                "all_versions": all_versions,
                "limit": limit,
                "cursor": cursor,
                "type": "discover_agents.v1",
            },
            DiscoverAgents,
        )
    except msgspec.ValidationError as exc:
        _fail(f"{exc}; see `signalbox agents discover --help`")
    result = _run(_registry(url, subjects, "discover", query, DiscoverResult))
    if json_out:
        typer.echo(to_json(result))
        return
    console = Console()
    if not result.agents:
        console.print(f"No agents match at {url}.")
        return
    shown = f"{len(result.agents)} of {result.total}"
    console.print(agents_table(result.agents, title=f"Discovered agents ({shown})"))
    if result.next_cursor:
        console.print(f"More: add --cursor {result.next_cursor}", style="dim")


@audit_app.command("tail")
def audit_tail(
    nats_url: NatsUrlOption = None,
    kind: Annotated[
        str | None,
        typer.Option(
            "--kind", help="Only this kind: call, decision, rejected, registry, usage, admin."
        ),
    ] = None,
    agent: Annotated[
        str | None, typer.Option("--agent", help="Only records whose actor is this agent.")
    ] = None,
    last: Annotated[
        int, typer.Option("--last", min=0, help="Start with the last N matching records.")
    ] = 10,
    count: Annotated[
        int | None,
        typer.Option("--count", min=1, help="Exit after printing N records (default: follow)."),
    ] = None,
    json_out: JsonOption = False,
) -> None:
    """Print audit records: the last N, then new ones as they are chained, until Ctrl-C."""
    url, settings = _client_url(nats_url)
    subjects = Subjects(settings.subject_prefix)
    try:
        subject = audit_filter(subjects, kind=kind, actor=agent)
    except SignalboxError as err:
        _fail(err.message)
    console = Console(soft_wrap=True)
    status = Console(stderr=True, soft_wrap=True)

    def warn(seq: int, err: SchemaError) -> None:
        status.print(f"[yellow]warning:[/] audit record {seq} is unreadable: {escape(err.message)}")

    async def main() -> None:
        nc = await _connect(url)
        try:
            js = nc.jetstream()
            start = await start_of_last(js, subject, last)
            status.print(
                f"[dim]{subject} at {url} from record {start}"
                + ("" if count else "; Ctrl-C to stop")
                + "[/]"
            )
            if not json_out:
                console.print(audit_header())
            printed = 0
            async with contextlib.aclosing(
                follow(js, subject, start_seq=start, on_error=warn)
            ) as records:
                async for event in records:
                    if json_out:
                        sys.stdout.write(to_json(event) + "\n")
                        sys.stdout.flush()
                    else:
                        console.print(audit_line(event))
                    printed += 1
                    if count is not None and printed >= count:
                        break
        finally:
            await nc.close()

    _run(main(), interrupted=0)
