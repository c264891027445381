"""``signalbox agents``: list, show, discover, enroll, bind, revoke, credentials.

:mod:`services.cli.main` registers :data:`agents_app` as ``signalbox agents``.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, TypeVar

import msgspec
import typer
from rich.console import Console
from rich.markup import escape
from rich.text import Text

from broker.errors import NotFound, SignalboxError
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
from services.cli.client import admin_request, list_agents, registry_request
from services.cli.common import (
    JsonOption,
    NatsUrlOption,
    admin_call,
    client_url,
    connect_operator,
    fail,
    parse_duration,
    run,
    who,
)
from services.cli.render import (
    Fields,
    Fit,
    agent_fields,
    agents_table,
    binding_fields,
    credentials_table,
    print_secret,
    to_json,
)

__all__ = ["agents_app", "print_enrolled"]

T = TypeVar("T")

agents_app = typer.Typer(help="Inspect registered agents.", no_args_is_help=True)


@agents_app.command("list")
def agents_list(
    nats_url: NatsUrlOption = None,
    team: Annotated[str | None, typer.Option("--team", help="Only this team's agents.")] = None,
    capability: Annotated[
        str | None, typer.Option("--capability", help="Only agents offering this capability.")
    ] = None,
    latest: Annotated[
        bool, typer.Option("--latest", help="Only each agent's highest version.")
    ] = False,
    json_out: JsonOption = False,
) -> None:
    """List registered agents, every registered version (asks the registry service).

    During a rollout each serving version is a row of its own, with its health
    and instances; `--latest` shows each agent's highest version only.
    """
    url, settings = client_url(nats_url)
    subjects = Subjects(settings.subject_prefix)

    async def main() -> tuple[Any, ...]:
        nc = await connect_operator(url, settings)
        try:
            return await list_agents(
                nc, subjects, team=team, capability=capability, all_versions=not latest
            )
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
    console.print(agent_fields(record))
    console.print()
    if binding is None:
        console.print(
            f"{name} was never enrolled: its attributes are the ones it declared "
            "(`signalbox agents enroll` binds them)."
        )
        return
    console.print(binding_fields(binding, title="Bound by operators"))


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
    print_enrolled(Console(), enrolled)


def print_enrolled(console: Console, enrolled: Enrolled) -> None:
    """What ``agents enroll`` prints: the credential, its token alone on the line after the
    fields (no width cuts it), then the bound attributes."""
    cred = enrolled.credential
    fields = Fields(Text("Agent credential · shown once, store it now", style="bold green"))
    fields.add("agent", cred.agent)
    fields.add("credential id", cred.id)
    fields.add("expires", time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(cred.expires_at)))
    fields.add(
        "token",
        "on the next line, alone: give it to the agent as SIGNALBOX_AGENT_CREDENTIAL "
        "(or Agent(..., credential=...))",
        Fit.WRAP,
    )
    console.print(fields)
    # The secret goes on a line of its own, outside the fields: no width cuts it.
    print_secret(console, enrolled.token)
    if enrolled.binding is not None:
        console.print()
        console.print(binding_fields(enrolled.binding, title="Bound by operators"))


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
    console.print(binding_fields(bound.binding, previous=bound.previous, title=f"{name}: bound"))
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
