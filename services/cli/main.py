"""The ``signalbox`` command line.

::

    signalbox up [--nats-url URL] [--data-dir DIR] [--port N]    run the control plane
    signalbox demo [--data-dir DIR]                             scripted demo, real agents
    signalbox agents list [--team T] [--capability C] [--json]  registered agents
    signalbox agents show NAME [--version V] [--json]            one agent, its bound attributes
    signalbox agents enroll NAME [--ttl 7d] [--note N] [--team T] [--owner O] [--namespace N]
                                 [--region R] [--project P]... [--tag K]...
                                                                issue a credential, bind attributes
    signalbox agents bind NAME [--team T] ... [--clear-projects] [--clear-tags] [--reason R]
                                                                change bound attributes
    signalbox agents revoke NAME [--credential ID]              revoke and disconnect
    signalbox agents credentials [NAME] [--all] [--json]        list credentials
    signalbox audit tail [--kind K] [--agent A] [--last N] [--count N] [--json]
    signalbox audit verify [--since 2h|ISO] [--json]             (services/cli/audit_cmds.py)
    signalbox audit replay --since 2h [--until T] [--agent A] [--kind K] [--trace T] [--format F]
    signalbox audit report --tag T --since 24h [--json]
    signalbox policy validate|apply|show|diff|history|rollback        (services/cli/policy_cmds.py)
    signalbox trace TRACE_ID [--since 24h] [--json]              (services/cli/trace_cmds.py)
    signalbox identity init [--secrets-dir DIR] [--server-config FILE]
    signalbox version

Exit status: 0 on success, 1 on any error (one line on stderr saying what to do
next; never a traceback for an expected failure such as a server that cannot
be reached, a refused request or a bad argument).
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import msgspec
import typer
from rich.console import Console
from rich.markup import escape
from rich.panel import Panel
from rich.table import Table
from typer.core import TyperGroup

from broker.errors import NotFound, SchemaError, SignalboxError
from broker.identity import (
    ServerSecrets,
    auth_config,
    resolve_secrets_dir,
)
from broker.server import render_blocks
from broker.settings import Settings
from broker.subjects import Subjects, validate_token
from schemas import (
    AgentBinding,
    AgentRecord,
    BindAgent,
    Bound,
    CredentialList,
    DiscoverAgents,
    DiscoverResult,
    EnrollAgent,
    Enrolled,
    GetAgent,
    GetBinding,
    ListCredentials,
    RevokeAgent,
    Revoked,
)
from services.cli.approvals_cmds import approvals_app
from services.cli.audit_cmds import audit_app
from services.cli.breakers_cmds import breakers_app
from services.cli.budgets_cmds import budgets_app
from services.cli.client import admin_request, list_agents, registry_request
from services.cli.common import (
    DEFAULT_NATS_URL,
    JsonOption,
    NatsUrlOption,
    admin_call,
    client_url,
    connect_operator,
    fail,
    load_settings,
    parse_duration,
    run,
    who,
)
from services.cli.cost_cmds import cost_app
from services.cli.operators_cmds import operators_app
from services.cli.policy_cmds import policy_app
from services.cli.render import (
    agent_panel,
    agents_table,
    audit_header,
    audit_line,
    binding_grid,
    credentials_table,
    to_json,
)
from services.cli.rollout_cmds import rollback, rollout_app
from services.cli.status_cmds import probe_command, status_command
from services.cli.trace_cmds import trace_command
from services.tracing.reader import audit_filter, follow, start_of_last

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
agents_app = typer.Typer(help="Inspect registered agents.", no_args_is_help=True)
identity_app = typer.Typer(
    help="Secrets and server configuration of server-enforced identity.", no_args_is_help=True
)
app.add_typer(agents_app, name="agents")
app.add_typer(identity_app, name="identity")
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
    url, settings = client_url(nats_url)
    subjects = Subjects(settings.subject_prefix)

    async def main() -> tuple[Any, ...]:
        nc = await connect_operator(url, settings)
        try:
            return await list_agents(nc, subjects, team=team, capability=capability)
        finally:
            await nc.close()

    records = run(main())
    if json_out:
        typer.echo(to_json(list(records)))
        return
    console = Console()
    if not records:
        wanted = " matching the filters" if team or capability else ""
        console.print(f"No agents registered{wanted} at {url}.")
        return
    console.print(agents_table(records))


async def _registry(url: str, settings: Settings, op: str, request: Any, returns: type[T]) -> T:
    nc = await connect_operator(url, settings)
    try:
        return await registry_request(nc, Subjects(settings.subject_prefix), op, request, returns)
    finally:
        await nc.close()


async def _record_and_binding(
    url: str, settings: Settings, request: GetAgent
) -> tuple[AgentRecord, AgentBinding | None]:
    """One agent version and its bound attributes (None: never enrolled)."""
    nc = await connect_operator(url, settings)
    subjects = Subjects(settings.subject_prefix)
    try:
        record = await registry_request(nc, subjects, "get", request, AgentRecord)
        try:
            binding = await admin_request(
                nc, subjects, "binding", GetBinding(name=request.name), AgentBinding,
                service="registry",
            )  # fmt: skip
        except NotFound:
            binding = None
        return record, binding
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
    """Show one agent version: manifest, health, capabilities (with their data tags), and
    the attributes an operator bound to the agent (team, owner, namespace, region, projects,
    tags; `--json`: under the key "binding", null if it was never enrolled)."""
    url, settings = client_url(nats_url)
    try:
        request = GetAgent(name=name, version=version)
        validate_token(name, what="agent name")
    except SignalboxError as err:
        fail(err.message)
    record, binding = run(_record_and_binding(url, settings, request))
    if json_out:
        doc = msgspec.to_builtins(record)
        doc["binding"] = msgspec.to_builtins(binding) if binding is not None else None
        typer.echo(to_json(doc))
        return
    console = Console()
    console.print(
        Panel(agent_panel(record), title=f"{record.manifest.name} {record.manifest.version}")
    )
    if binding is None:
        console.print(
            f"{name} was never enrolled: its attributes are the ones it declared "
            "(`signalbox agents enroll` binds them)."
        )
        return
    console.print(Panel(binding_grid(binding), title="Bound by operators"))


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
    url, settings = client_url(nats_url)
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
        fail(f"{exc}; see `signalbox agents discover --help`")
    result = run(_registry(url, settings, "discover", query, DiscoverResult))
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


AgentName = Annotated[str, typer.Argument(help="Agent name.")]


def _agent_name(name: str) -> str:
    try:
        return validate_token(name, what="agent name")
    except SignalboxError as err:
        fail(err.message)


TeamOption = Annotated[str | None, typer.Option("--team", help="Bind this team.")]
OwnerOption = Annotated[str | None, typer.Option("--owner", help="Bind this owner.")]
NamespaceOption = Annotated[
    str | None, typer.Option("--namespace", help="Bind this Cedar namespace (finance...).")
]
RegionOption = Annotated[
    str | None, typer.Option("--region", help="Bind this data-residency region (eu...).")
]
ProjectOption = Annotated[
    list[str] | None,
    typer.Option("--project", help="Bind this project (repeatable; replaces the bound ones)."),
]
TagOption = Annotated[
    list[str] | None,
    typer.Option(
        "--tag", help="Bind this principal tag, e.g. data-residency:eu (repeatable; replaces)."
    ),
]


def _attributes(
    team: str | None,
    owner: str | None,
    namespace: str | None,
    region: str | None,
    projects: list[str] | None,
    tags: list[str] | None,
) -> dict[str, Any]:
    """The attribute fields of an enroll or bind request (only the options given)."""
    fields: dict[str, Any] = {
        "team": team, "owner": owner, "namespace": namespace, "region": region,
        "projects": projects, "tags": tags,
    }  # fmt: skip
    return {k: v for k, v in fields.items() if v is not None}


def _request(doc: dict[str, Any], kind: type[T]) -> T:
    """``doc`` as a wire request, or exit 1 naming the bad option."""
    try:
        return msgspec.convert(doc, kind)
    except msgspec.ValidationError as exc:
        fail(
            f"{exc}; projects and tags are single values without commas or surrounding "
            "spaces (repeat --project / --tag for several)"
        )


@agents_app.command("enroll")
def agents_enroll(
    name: AgentName,
    ttl: Annotated[
        str | None,
        typer.Option(
            "--ttl",
            help="Lifetime: 3600, 30m, 12h, 7d... (default: $SIGNALBOX_AGENT_CREDENTIAL_TTL, 7d)",
            show_default=False,
        ),
    ] = None,
    note: Annotated[str, typer.Option("--note", help="Kept with the credential.")] = "",
    team: TeamOption = None,
    owner: OwnerOption = None,
    namespace: NamespaceOption = None,
    region: RegionOption = None,
    project: ProjectOption = None,
    tag: TagOption = None,
    nats_url: NatsUrlOption = None,
    json_out: JsonOption = False,
) -> None:
    """Issue a credential for an agent; it is shown once: hand it to the agent.

    --team, --owner, --namespace, --region, --project and --tag bind the agent's
    governance attributes: the registry stores them in its manifest whatever it
    declares, and refuses a manifest declaring others. Enrolling again keeps the
    bound attributes unless options are given (then only those change).
    """
    request = _request(
        {
            "type": "enroll_agent.v1", "name": _agent_name(name),
            "ttl": parse_duration(ttl) if ttl else 0.0, "note": note, "requested_by": who(),
            **_attributes(team, owner, namespace, region, project, tag),
        },
        EnrollAgent,
    )  # fmt: skip
    enrolled = admin_call(nats_url, "registry", "enroll", request, Enrolled)
    if json_out:
        typer.echo(to_json(enrolled))
        return
    cred = enrolled.credential
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    grid.add_row("agent", cred.agent)
    grid.add_row("credential id", cred.id)
    grid.add_row("expires", time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(cred.expires_at)))
    grid.add_row("token", enrolled.token)
    grid.add_row(
        "use",
        f"SIGNALBOX_AGENT_CREDENTIAL='{enrolled.token}' (or Agent(..., credential=...))",
    )
    console = Console(soft_wrap=True)
    console.print(
        Panel(grid, title="Agent credential · shown once, store it now", border_style="green")
    )
    if enrolled.binding is not None:
        console.print(Panel(binding_grid(enrolled.binding), title="Bound by operators"))


@agents_app.command("bind")
def agents_bind(
    name: AgentName,
    team: TeamOption = None,
    owner: OwnerOption = None,
    namespace: NamespaceOption = None,
    region: RegionOption = None,
    project: ProjectOption = None,
    tag: TagOption = None,
    clear_projects: Annotated[
        bool, typer.Option("--clear-projects", help="Bind no project.")
    ] = False,
    clear_tags: Annotated[bool, typer.Option("--clear-tags", help="Bind no tag.")] = False,
    reason: Annotated[str, typer.Option("--reason", help="Kept in the audit trail.")] = "",
    nats_url: NatsUrlOption = None,
    json_out: JsonOption = False,
) -> None:
    """Change an enrolled agent's bound attributes: only the options given change.

    Its registered versions are rewritten at once (policies, budgets and discovery
    see the new values); audited with the values before and after.
    """
    if clear_projects and project:
        fail("give --project or --clear-projects, not both")
    if clear_tags and tag:
        fail("give --tag or --clear-tags, not both")
    fields = _attributes(
        team, owner, namespace, region, [] if clear_projects else project, [] if clear_tags else tag
    )
    if not fields:
        fail(
            "nothing to change: give at least one of --team, --owner, --namespace, --region, "
            "--project, --tag, --clear-projects, --clear-tags"
        )
    request = _request(
        {"type": "bind_agent.v1", "name": _agent_name(name), "reason": reason,
         "requested_by": who(), **fields},
        BindAgent,
    )  # fmt: skip
    bound = admin_call(nats_url, "registry", "bind", request, Bound)
    if json_out:
        typer.echo(to_json(bound))
        return
    console = Console()
    console.print(
        Panel(binding_grid(bound.binding, previous=bound.previous), title=f"{name}: bound")
    )
    changed = ", ".join(bound.changed) or "nothing (the values were already bound)"
    console.print(
        f"Changed: {changed}; {bound.versions} registered version(s) of {name} rewritten."
    )


@agents_app.command("revoke")
def agents_revoke(
    name: AgentName,
    credential: Annotated[
        str | None,
        typer.Option("--credential", help="Only this credential id (default: all of the agent's)."),
    ] = None,
    reason: Annotated[str, typer.Option("--reason", help="Kept in the audit trail.")] = "",
    nats_url: NatsUrlOption = None,
    json_out: JsonOption = False,
) -> None:
    """Revoke an agent's credentials and disconnect it now; it cannot reconnect with them."""
    try:
        request = msgspec.convert(
            {"type": "revoke_agent.v1", "name": _agent_name(name), "credential": credential,
             "reason": reason},
            RevokeAgent,
        )  # fmt: skip
    except msgspec.ValidationError as exc:
        fail(f"{exc}; credential ids look like `abcdefgh23456789` (see `agents credentials`)")
    revoked = admin_call(nats_url, "registry", "revoke", request, Revoked)
    if json_out:
        typer.echo(to_json(revoked))
        return
    if not revoked.credentials:
        Console().print(f"{name} had no active credential to revoke.")
        return
    Console().print(
        f"Revoked {len(revoked.credentials)} credential(s) of [bold]{escape(name)}[/] "
        f"({', '.join(revoked.credentials)}); closed {revoked.disconnected} live connection(s)."
    )


@agents_app.command("credentials")
def agents_credentials(
    name: Annotated[str | None, typer.Argument(help="Only this agent's.")] = None,
    all_: Annotated[
        bool, typer.Option("--all", help="Include expired and revoked credentials.")
    ] = False,
    nats_url: NatsUrlOption = None,
    json_out: JsonOption = False,
) -> None:
    """List agent credentials (ids and lifetimes; secrets are never stored or shown)."""
    request = ListCredentials(name=_agent_name(name) if name else None, include_inactive=all_)
    listed = admin_call(nats_url, "registry", "credentials", request, CredentialList)
    if json_out:
        typer.echo(to_json(listed))
        return
    if not listed.items:
        Console().print("No credentials" + (f" for {name}." if name else "."))
        return
    Console().print(credentials_table(listed.items, now=time.time()))


@identity_app.command("init")
def identity_init(
    secrets_dir: Annotated[
        Path | None,
        typer.Option(
            "--secrets-dir",
            help="Where the secrets live (default: $SIGNALBOX_SECRETS_DIR, "
            "else <data dir>/secrets)",
            show_default=False,
        ),
    ] = None,
    server_config: Annotated[
        Path | None,
        typer.Option(
            "--server-config",
            help="Also write the accounts/users/auth-callout part of a nats-server config here, "
            "for servers you run yourself (`include` it from each node's config)",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Generate the deployment's secrets (kept if present) for an external NATS server.

    `signalbox up` does this by itself for its embedded server; run this for a
    cluster you operate (compose.yaml does, in its `identity` service).
    """
    settings = load_settings(secrets_dir=secrets_dir)
    folder = resolve_secrets_dir(settings)
    try:
        secrets = ServerSecrets.load_or_create(folder)
        if server_config is not None:
            config = auth_config(secrets, Subjects(settings.subject_prefix))
            text = "# Generated by `signalbox identity init`: accounts, users, auth callout.\n"
            text += render_blocks(config)
            server_config.parent.mkdir(parents=True, exist_ok=True)
            # Bcrypt hashes and a public key only: readable by the server's user.
            server_config.write_text(text)
            server_config.chmod(0o644)
    except (SignalboxError, OSError) as exc:
        fail(f"cannot set up identity in {folder}: {exc}")
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    grid.add_row("secrets", f"{folder.resolve()} (0700; files 0600)")
    grid.add_row("issuer", secrets.issuer_public_key)
    if server_config is not None:
        grid.add_row(
            "server config",
            f"{server_config}  (`include` it from each node's config, by a path relative to "
            "that config file: nats-server resolves every include against the including "
            "file's folder)",
        )
    grid.add_row("services", f"SIGNALBOX_SECRETS_DIR={folder} (or SIGNALBOX_NATS_USER/_PASSWORD)")
    Console(soft_wrap=True).print(Panel(grid, title="Identity ready", border_style="green"))


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
    url, settings = client_url(nats_url)
    subjects = Subjects(settings.subject_prefix)
    try:
        subject = audit_filter(subjects, kind=kind, actor=agent)
    except SignalboxError as err:
        fail(err.message)
    console = Console(soft_wrap=True)
    status = Console(stderr=True, soft_wrap=True)

    def warn(seq: int, err: SchemaError) -> None:
        status.print(f"[yellow]warning:[/] audit record {seq} is unreadable: {escape(err.message)}")

    async def main() -> None:
        nc = await connect_operator(url, settings)
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

    run(main(), interrupted=0)
