"""The ``signalbox`` command line.

::

    signalbox up [--nats-url URL] [--data-dir DIR] [--port N]    run the control plane
    signalbox demo [--data-dir DIR]                             scripted demo, real agents
    signalbox agents list [--team T] [--capability C] [--json]  (services/cli/agents_cmds.py)
    signalbox agents show NAME [--version V] [--json]            one agent, its bound attributes
    signalbox agents enroll NAME [--ttl 7d] [--note N] [--team T] [--owner O] [--namespace N]
                                 [--region R] [--project P]... [--tag K]...
                                                                issue a credential, bind attributes
    signalbox agents bind NAME [--team T] ... [--clear-projects] [--clear-tags] [--reason R]
                                                                change bound attributes
    signalbox agents revoke NAME [--credential ID]              revoke and disconnect
    signalbox agents credentials [NAME] [--all] [--json]        list credentials
    signalbox audit tail [--kind K] [--agent A] [--last N] [--count N] [--json]
                                                                (services/cli/audit_tail.py)
    signalbox audit verify [--since 2h|ISO] [--complete] [--json] (services/cli/audit_cmds.py)
    signalbox audit replay --since 2h [--until T] [--agent A] [--kind K] [--trace T] [--format F]
    signalbox audit report --tag T --since 24h [--json]
    signalbox policy validate|apply|show|diff|history|rollback        (services/cli/policy_cmds.py)
    signalbox trace TRACE_ID [--since 24h] [--json]              (services/cli/trace_cmds.py)
    signalbox identity init [--secrets-dir DIR] [--server-config FILE]
                                                                (services/cli/identity_cmds.py)
    signalbox status [--service S]... [--json]                  (services/cli/status_cmds.py)
    signalbox probe [SERVICE]... [--ready]                      this host's health files
    signalbox version

Exit status: 0 on success, 1 on any error (one line on stderr saying what to do
next; never a traceback for an expected failure such as a server that cannot
be reached, a refused request or a bad argument).
"""

from __future__ import annotations

import asyncio
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.panel import Panel
from rich.table import Table
from typer.core import TyperGroup

from broker.errors import SignalboxError
from broker.runtime.identity import (
    resolve_secrets_dir,
)
from services.cli.agents_cmds import agents_app
from services.cli.approvals_cmds import approvals_app
from services.cli.audit_cmds import audit_app
from services.cli.audit_tail import audit_tail
from services.cli.breakers_cmds import breakers_app
from services.cli.budgets_cmds import budgets_app
from services.cli.common import (
    DEFAULT_NATS_URL,
    connect_operator,
    load_settings,
    parse_duration,
    run,
)
from services.cli.cost_cmds import cost_app
from services.cli.identity_cmds import identity_app
from services.cli.operators_cmds import operators_app
from services.cli.policy_cmds import policy_app
from services.cli.rollout_cmds import rollback, rollout_app
from services.cli.status_cmds import probe_command, status_command
from services.cli.trace_cmds import trace_command

if TYPE_CHECKING:
    from services.runner import Stack

__all__ = ["app", "parse_duration"]

T = TypeVar("T")


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
app.add_typer(agents_app, name="agents")
app.add_typer(identity_app, name="identity")
audit_app.command("tail")(audit_tail)
app.add_typer(audit_app, name="audit")
app.add_typer(policy_app, name="policy")
app.add_typer(approvals_app, name="approvals")
app.add_typer(cost_app, name="cost")
app.command("trace")(trace_command)
app.add_typer(budgets_app, name="budgets")
app.add_typer(rollout_app, name="rollout")
app.command("rollback")(rollback)
app.add_typer(breakers_app, name="breakers")
app.add_typer(operators_app, name="operators")
app.command("status")(status_command)
app.command("probe")(probe_command)

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
            help="Data folder: JetStream store, SQLite database (default: $SIGNALBOX_DATA_DIR "
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

    settings = load_settings(nats_url=nats_url, data_dir=data_dir, nats_port=port)
    configure_logging(settings.log_level)
    console = Console()

    async def main() -> None:
        if settings.nats_url:
            # The services reconnect forever by design; fail fast instead when
            # the server is not there at all at start-up.
            hint = "check that server is running, or drop --nats-url for an embedded one"
            await (await connect_operator(settings.nats_url, settings, hint=hint)).close()
        stack = Stack(settings)
        await stack.start()
        try:
            console.print(_up_panel(stack))
            signalled = asyncio.ensure_future(wait_for_signal())
            waiting: set[asyncio.Future[Any]] = {signalled}
            if stack.failed is not None:
                waiting.add(stack.failed)
            await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            signalled.cancel()
            if stack.failed is not None and stack.failed.done():
                # Exit non-zero: a process supervisor (systemd, Kubernetes) restarts us.
                raise SignalboxError(
                    f"{stack.failed.result()}; Signalbox stopped",
                    details={"restarts": stack.server_restarts},
                )
            console.print("[dim]stopping…[/]")
        finally:
            await stack.stop()

    run(main(), interrupted=0)
    console.print("Signalbox stopped.")


def _up_panel(stack: Stack) -> Panel:
    s = stack.settings
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    where = "embedded nats-server" if stack.server is not None else "external server"
    grid.add_row("NATS", f"{s.nats_url}  ({where})")
    grid.add_row("data dir", str(s.data_dir.resolve()))
    policy = stack.services.get("policy")
    version = getattr(getattr(policy, "decider", None), "version", "")
    policies = s.policy_dir or "shipped policies"
    grid.add_row("policies", f"{policies}" + (f"  (version {version})" if version else ""))
    if stack.server is not None:
        grid.add_row(
            "identity",
            f"enforced by the server; secrets in {resolve_secrets_dir(s).resolve()} (0600)",
        )
    grid.add_row("services", ", ".join(stack.services))
    flag = "" if s.nats_url == DEFAULT_NATS_URL else f" --nats-url {s.nats_url}"
    grid.add_row("try", f"signalbox agents list{flag}  ·  signalbox audit tail{flag}")
    grid.add_row("agents", f"signalbox agents enroll <name>{flag}  (a credential per agent)")
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
    code = run(run_demo(Console(), data_dir))
    raise typer.Exit(code)
