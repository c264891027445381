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
                                                                (services/cli/audit_replay.py)
    signalbox audit report --tag T --since 24h [--json]         (services/cli/audit_report.py)
    signalbox policy validate|apply|show|diff|history|rollback        (services/cli/policy_cmds.py)
    signalbox trace TRACE_ID [--since 24h] [--json]              (services/cli/trace_cmds.py)
    signalbox identity init [--secrets-dir DIR] [--server-config FILE]
                                                                (services/cli/identity_cmds.py)
    signalbox status [--service S]... [--json]                  (services/cli/status_cmds.py)
    signalbox probe [SERVICE]... [--ready]                      this host's health files
    signalbox apply -f FILE [--dry-run] [--prune] [--json]      (services/cli/fleet_cmds.py)
    signalbox export [-o FILE]                                  the fleet's config as a file
    signalbox version

Exit status: 0 on success, 1 on any error (one line on stderr saying what to do
next; never a traceback for an expected failure such as a server that cannot
be reached, a refused request or a bad argument).
"""

from __future__ import annotations

import asyncio
import os
import shlex
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.text import Text
from typer.core import TyperGroup

from broker.errors import SignalboxError
from broker.runtime.identity import (
    resolve_secrets_dir,
)
from broker.settings import Settings
from services.cli.agents_cmds import agents_app
from services.cli.approvals_cmds import approvals_app
from services.cli.audit_cmds import audit_app
from services.cli.audit_replay import audit_replay
from services.cli.audit_report import audit_report
from services.cli.audit_tail import audit_tail
from services.cli.breakers_cmds import breakers_app
from services.cli.budgets_cmds import budgets_app
from services.cli.common import (
    DEFAULT_NATS_URL,
    connect_operator,
    fail,
    load_settings,
    parse_duration,
    run,
)
from services.cli.cost_cmds import cost_app
from services.cli.fleet_cmds import apply_command, export_command
from services.cli.identity_cmds import identity_app
from services.cli.operators_cmds import operators_app
from services.cli.policy_cmds import policy_app
from services.cli.render import Fields, Fit
from services.cli.rollout_cmds import rollback, rollout_app
from services.cli.status_cmds import probe_command, status_command
from services.cli.trace_cmds import trace_command

if TYPE_CHECKING:
    from services.runner import Stack

__all__ = ["app", "parse_duration", "up_environment"]

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
audit_app.command("replay")(audit_replay)
audit_app.command("report")(audit_report)
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
app.command("apply")(apply_command)
app.command("export")(export_command)

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

    if port is not None and nats_url is not None:
        fail("--port sets the embedded server's port and --nats-url uses another server: "
             "give one of them")  # fmt: skip
    console = Console()
    env_url = os.environ.get("SIGNALBOX_NATS_URL")
    if port is not None and nats_url is None and env_url:
        # --port asks for the embedded server: SIGNALBOX_NATS_URL (another server,
        # maybe a shell left over from an earlier run) must not be joined instead.
        console.print(
            f"--port {port} starts the embedded server; SIGNALBOX_NATS_URL={env_url} is ignored",
            style="yellow", soft_wrap=True, markup=False, highlight=False,
        )  # fmt: skip
        settings = load_settings(data_dir=data_dir, nats_port=port).model_copy(
            update={"nats_url": None}
        )
    else:
        settings = load_settings(nats_url=nats_url, data_dir=data_dir, nats_port=port)
    configure_logging(settings.log_level)

    async def main() -> None:
        if settings.nats_url:
            # The services reconnect forever by design; fail fast instead when
            # the server is not there at all at start-up.
            hint = "check that server is running, or drop --nats-url for an embedded one"
            await (await connect_operator(settings.nats_url, settings, hint=hint)).close()
        stack = Stack(settings)
        await stack.start()
        try:
            console.print(_up_fields(stack))
            shell = up_environment(stack.settings)
            if shell:
                # One line, never wrapped or styled: it is copied into other shells.
                console.print("In another shell, first:", style="bold")
                console.print(shell, soft_wrap=True, markup=False, highlight=False)
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


def _up_fields(stack: Stack) -> Fields:
    s = stack.settings
    fields = Fields(Text("Signalbox is up · Ctrl-C to stop", style="bold green"))
    where = "embedded nats-server" if stack.server is not None else "external server"
    fields.add("NATS", f"{s.nats_url}  ({where})", Fit.WRAP)
    fields.add("data dir", str(s.data_dir.resolve()))
    policy = stack.services.get("policy")
    version = getattr(getattr(policy, "decider", None), "version", "")
    # Without SIGNALBOX_POLICY_DIR: the default set, which permits nothing until an
    # operator applies a set (decision 36); the panel says how to start one.
    policies = s.policy_dir or "default set: permits nothing until `signalbox policy apply`"
    fields.add("policies", f"{policies}" + (f"  (version {version})" if version else ""), Fit.WRAP)
    if stack.server is not None:
        fields.add("identity", "enforced by the server", Fit.WRAP)
        fields.add("secrets", f"{resolve_secrets_dir(s).resolve()}")
    fields.add("services", ", ".join(stack.services), Fit.WRAP)
    fields.add("try", "signalbox agents list  ·  signalbox audit tail", Fit.WRAP)
    fields.add("agents", "signalbox agents enroll <name>  (a credential per agent)", Fit.WRAP)
    return fields


def up_environment(settings: Settings) -> str:
    """The ``export`` that makes other shells' commands find this control plane ("" if the
    defaults do): its server's URL and its data folder (operator credentials live there)."""
    pairs = []
    if settings.nats_url and settings.nats_url != DEFAULT_NATS_URL:
        pairs.append(f"SIGNALBOX_NATS_URL={settings.nats_url}")
    if settings.data_dir.resolve() != Path(".signalbox").resolve():
        pairs.append(f"SIGNALBOX_DATA_DIR={shlex.quote(str(settings.data_dir.resolve()))}")
    return "export " + " ".join(pairs) if pairs else ""


@app.command()
def demo(
    data_dir: Annotated[
        Path | None,
        typer.Option(
            "--data-dir",
            help="Keep the demo's data and log here (default: a temporary folder, removed "
            "afterwards)",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Start a throwaway control plane and run four real agents through a lending scenario."""
    from services.demo.scenario import run_demo

    # No log handler on the terminal: run_demo sends log records to a file
    # (services/demo/logs.py) and says at the end how many, and where, so none
    # lands in the middle of its tables.
    code = run(run_demo(Console(), data_dir))
    raise typer.Exit(code)
