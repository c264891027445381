"""``signalbox policy``: manage the versioned Cedar policy sets without redeploying.

::

    signalbox policy validate DIR [--remote] [--json]     check a policy folder (offline)
    signalbox policy apply DIR [--label L] [--expect N]   store it as a new version, activate
    signalbox policy show [--version N] [--json]          a stored version (default: active)
    signalbox policy diff DIR | --from N --to M [--json]  per-file diff, policy ids added/removed
    signalbox policy history [--limit N] [--json]         stored versions, newest first
    signalbox policy rollback [--to N]                    re-activate an earlier version
    signalbox policy test DIR --replay-since 24h [--json] what-if: recorded decisions it changes
    signalbox policy shadow DIR | --off                   a candidate beside the active set, live

Every command but ``validate`` asks the policy service on the operator-only
subjects ``sb.admin.policy.<op>`` (see :mod:`services.policy.service`);
``validate`` parses and validates the folder locally with Cedar, so it needs
no server (``--remote`` asks the running service instead).

Shared plumbing comes from :mod:`services.cli.common`; :mod:`services.cli.main`
registers :data:`policy_app` as ``signalbox policy``.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import MofNCompleteColumn, Progress, SpinnerColumn, TextColumn
from rich.text import Text

from broker.errors import SignalboxError
from broker.settings import Settings
from broker.subjects import Subjects
from schemas import (
    ApplyPolicies,
    AuditEvent,
    DiffPolicies,
    PolicyApplied,
    PolicyDiff,
    PolicyFiles,
    PolicyHistory,
    PolicyHistoryRequest,
    PolicyShown,
    PolicyValidation,
    RollbackPolicies,
    ShadowPolicies,
    ShadowStatus,
    ShowPolicies,
    ValidatePolicies,
)
from services.cli.common import (
    JsonOption,
    NatsUrlOption,
    admin_call,
    client_url,
    clock,
    connect_operator,
    fail,
    parse_duration,
    run,
    who,
)
from services.cli.policy_tables import (
    changes_by_agent_table,
    changes_table,
    history_table,
    policy_fields,
    policy_ids_table,
)
from services.cli.render import to_json

if TYPE_CHECKING:
    from services.policy.cedar.decider import CedarDecider
    from services.policy.whatif import WhatIfReport

__all__ = ["policy_app"]

T = TypeVar("T")

policy_app = typer.Typer(
    help="Validate, apply, inspect and roll back Cedar policy sets (no redeploy).",
    no_args_is_help=True,
)

DirArgument = Annotated[
    Path,
    typer.Argument(
        help="Policy folder: schema.cedarschema, *.cedar files, optional label.txt.",
        show_default=False,
    ),
]


def _read(folder: Path, label: str | None = None) -> PolicyFiles:
    from services.policy.cedar.policy_set import read_policy_dir

    try:
        return read_policy_dir(folder, label=label)
    except SignalboxError as err:
        fail(err.message)


def _version(label: str, digest: str) -> str:
    return f"{label}@{digest[:12]}" if label else digest[:12]


# -- commands -----------------------------------------------------------------------------


@policy_app.command("validate")
def validate(
    folder: DirArgument,
    remote: Annotated[
        bool,
        typer.Option("--remote", help="Ask the running policy service instead of parsing here."),
    ] = False,
    nats_url: NatsUrlOption = None,
    json_out: JsonOption = False,
) -> None:
    """Check a policy folder against its Cedar schema; prints Cedar's messages if invalid."""
    candidate = _read(folder)
    if remote:
        result = admin_call(
            nats_url, "policy", "validate", ValidatePolicies(candidate=candidate), PolicyValidation
        )
    else:
        from services.policy.store import parse_candidate

        try:
            policies = parse_candidate(candidate, source=str(folder))
            result = PolicyValidation(
                ok=True, digest=policies.digest, policy_ids=tuple(policies.policies)
            )
        except SignalboxError as err:
            result = PolicyValidation(ok=False, errors=tuple(err.details.get("errors", [])))
    if json_out:
        typer.echo(to_json(result))
        if not result.ok:
            raise typer.Exit(1)
        return
    if not result.ok:
        err_console = Console(stderr=True, soft_wrap=True)
        err_console.print(f"[bold]{escape(str(folder))}[/] is not a valid policy set:")
        for message in result.errors:
            err_console.print(f"  [red]-[/] {escape(message)}", highlight=False)
        fail(
            f"{len(result.errors)} problem{'s' if len(result.errors) != 1 else ''} in {folder}; "
            "fix each policy named above (Cedar's message says what it expected) and re-run "
            "`signalbox policy validate`"
        )
    Console().print(
        f"[green]valid[/]: {escape(str(folder))} holds {len(result.policy_ids)} policies "
        f"({escape(', '.join(result.policy_ids))}); digest {result.digest[:12]}",
        highlight=False,
    )


@policy_app.command("apply")
def apply(
    folder: DirArgument,
    label: Annotated[
        str | None,
        typer.Option("--label", help="Label of the new version (default: the folder's label.txt)."),
    ] = None,
    expect: Annotated[
        int,
        typer.Option(
            "--expect", min=0, help="Apply only if version N is still the active one (0: any)."
        ),
    ] = 0,
    nats_url: NatsUrlOption = None,
    json_out: JsonOption = False,
) -> None:
    """Validate a policy folder, store it as a new version and make it active everywhere."""
    request = ApplyPolicies(
        candidate=_read(folder, label), requested_by=who(), expected_active=expect
    )
    result = admin_call(nats_url, "policy", "apply", request, PolicyApplied)
    if json_out:
        typer.echo(to_json(result))
        return
    name = _version(result.label, result.digest)
    if result.unchanged:
        Console().print(f"unchanged: {escape(str(folder))} is already active as version "
                        f"{result.version} ({escape(name)})", highlight=False)  # fmt: skip
        return
    Console().print(
        f"[green]applied[/] {escape(str(folder))} as version {result.version} ({escape(name)}), "
        f"was version {result.previous}; every policy-service replica switches to it now",
        highlight=False,
    )


@policy_app.command("rollback")
def rollback(
    to: Annotated[
        int,
        typer.Option("--to", min=0, help="Version to activate (default: the one active before)."),
    ] = 0,
    nats_url: NatsUrlOption = None,
    json_out: JsonOption = False,
) -> None:
    """Make an earlier version active again (re-validated first; audited)."""
    result = admin_call(
        nats_url, "policy", "rollback", RollbackPolicies(to=to, requested_by=who()), PolicyApplied
    )
    if json_out:
        typer.echo(to_json(result))
        return
    name = escape(_version(result.label, result.digest))
    if result.unchanged:
        Console().print(f"unchanged: version {result.version} ({name}) is already active")
        return
    Console().print(
        f"[green]rolled back[/] to version {result.version} ({name}), was version "
        f"{result.previous}",
        highlight=False,
    )


@policy_app.command("show")
def show(
    version: Annotated[
        int, typer.Option("--version", min=0, help="This version (default: the active one).")
    ] = 0,
    nats_url: NatsUrlOption = None,
    json_out: JsonOption = False,
) -> None:
    """Show a stored version: metadata, policy ids and every file."""
    shown = admin_call(nats_url, "policy", "show", ShowPolicies(version=version), PolicyShown)
    if json_out:
        typer.echo(to_json(shown))
        return
    r = shown.record
    console = Console()
    console.print(policy_fields(shown))
    for name, text in [("schema.cedarschema", r.schema), *sorted(r.files.items())]:
        console.rule(escape(name))
        console.print(text, markup=False, highlight=False)


@policy_app.command("export")
def export(
    folder: Annotated[
        Path, typer.Argument(help="Folder to write the set into.", show_default=False)
    ],
    version: Annotated[
        int, typer.Option("--version", min=0, help="This stored version (default: the active one).")
    ] = 0,
    example: Annotated[
        str | None,
        typer.Option(
            "--example",
            help="Write a shipped example instead (the default set plus its files; no server "
            "needed): lending",
            show_default=False,
        ),
    ] = None,
    force: Annotated[
        bool, typer.Option("--force", help="Overwrite a folder that already has policies.")
    ] = False,
    nats_url: NatsUrlOption = None,
    json_out: JsonOption = False,
) -> None:
    """Write a policy set to a folder, to edit and `policy apply` again.

    By default the active set of the running control plane (or `--version N`);
    with `--example NAME` a shipped example, which needs no server. A wheel
    install has no policies/ folder to copy: start from this.
    """
    from services.policy.cedar.policy_set import LABEL_FILE, SCHEMA_FILE, compose_example

    if folder.exists() and any(folder.glob("*.ced*")) and not force:
        fail(f"{folder} already holds policies; pick an empty folder or pass --force")
    for stale in folder.glob("*.cedar") if folder.is_dir() else ():
        stale.unlink()  # with --force the folder becomes exactly the set written
    if example is not None:
        try:
            compose_example(folder, example)
        except SignalboxError as err:
            fail(err.message)
        source = f"example {example!r}"
    else:
        shown = admin_call(nats_url, "policy", "show", ShowPolicies(version=version), PolicyShown)
        record = shown.record
        try:
            folder.mkdir(parents=True, exist_ok=True)
            (folder / SCHEMA_FILE).write_text(record.schema)
            for name, text in record.files.items():
                (folder / name).write_text(text)
            (folder / LABEL_FILE).write_text(record.label + "\n")
        except OSError as exc:
            fail(f"cannot write {folder}: {exc}")
        source = f"version {record.version} ({_version(record.label, record.digest)})"
    files = sorted(p.name for p in folder.iterdir() if p.is_file())
    if json_out:
        typer.echo(json.dumps({"folder": str(folder), "source": source, "files": files}))
        return
    console = Console(soft_wrap=True)
    console.print(f"wrote {source} to {folder}: {', '.join(files)}", markup=False)
    console.print(
        f"edit it, then: signalbox policy validate {folder} && signalbox policy apply {folder}",
        markup=False,
    )


@policy_app.command("history")
def history(
    limit: Annotated[int, typer.Option("--limit", min=1, help="Newest N versions.")] = 100,
    nats_url: NatsUrlOption = None,
    json_out: JsonOption = False,
) -> None:
    """Stored versions, newest first; the active one is marked."""
    result = admin_call(
        nats_url, "policy", "history", PolicyHistoryRequest(limit=limit), PolicyHistory
    )
    if json_out:
        typer.echo(to_json(result))
        return
    Console().print(history_table(result))


@policy_app.command("diff")
def diff(
    folder: Annotated[
        Path | None,
        typer.Argument(
            help="Candidate folder to compare with --from (default: the active set).",
            show_default=False,
        ),
    ] = None,
    from_version: Annotated[
        int, typer.Option("--from", min=0, help="Old side (default: the active version).")
    ] = 0,
    to_version: Annotated[int, typer.Option("--to", min=0, help="New side: a stored version.")] = 0,
    nats_url: NatsUrlOption = None,
    json_out: JsonOption = False,
) -> None:
    """Per-file unified diff of two versions, or of a folder against a version."""
    if folder is not None and to_version:
        fail("give either a folder or --to N as the new side, not both")
    if folder is None and not to_version:
        fail("nothing to compare: give a policy folder, or --from N --to M")
    candidate = _read(folder) if folder is not None else None
    request = DiffPolicies(from_version=from_version, to_version=to_version, candidate=candidate)
    result = admin_call(nats_url, "policy", "diff", request, PolicyDiff)
    if json_out:
        typer.echo(to_json(result))
        return
    console = Console()
    if not result.files:
        console.print(f"no differences between {result.from_name} and {result.to_name}")
        return
    styles = {"+": "green", "-": "red", "@": "cyan"}
    for change in result.files:
        console.rule(f"{escape(change.name)} ({change.change})")
        for line in change.diff.splitlines():
            console.print(Text(line, style=styles.get(line[:1], "")), highlight=False)
    console.print(policy_ids_table(result))


@policy_app.command("test")
def test(
    folder: Annotated[Path, typer.Argument(help="Candidate policy folder.", show_default=False)],
    replay_since: Annotated[
        str,
        typer.Option(
            "--replay-since",
            help="Replay the decisions recorded since this long ago: 90m, 24h, 7d...",
        ),
    ] = "24h",
    show: Annotated[
        int, typer.Option("--show", min=0, help="List at most N changed decisions.")
    ] = 20,
    nats_url: NatsUrlOption = None,
    json_out: JsonOption = False,
) -> None:
    """What-if: which decisions recorded in the audit trail would the candidate change?

    Each recorded call or model/tool decision is rebuilt and evaluated against the
    candidate at the time it was made, with the agents as the registry knows them
    now. Nothing is applied. Exit 0 either way; the report says what would change.
    """
    try:
        window = parse_duration(replay_since)
    except typer.BadParameter as exc:
        fail(f"--replay-since: {exc}")
    files = _read(folder)
    from services.policy.cedar.decider import CedarDecider
    from services.policy.cedar.policy_set import CedarPolicies

    try:
        candidate = CedarDecider(
            CedarPolicies.from_texts(
                dict(files.files), files.schema, label=files.label, source=str(folder)
            )
        )
    except SignalboxError as err:
        fail(f"{err.message}; fix the candidate (`signalbox policy validate {folder}`)")
    url, settings = client_url(nats_url)
    since = time.time() - window
    report = run(_replay(url, settings, candidate, since))
    if json_out:
        typer.echo(json.dumps(report.as_dict()))
        return
    console = Console()
    console.print(
        f"Replayed {report.evaluated:,} decisions since {clock(since)} against "
        f"{report.candidate_version} ({report.skipped:,} other records skipped; agents as "
        "registered now)"
    )
    if not report.changes:
        console.print(Text("No decision would change.", style="green"))
        return
    console.print(changes_by_agent_table(report))
    if show:
        console.print(changes_table(report, show))


async def _replay(
    url: str, settings: Settings, candidate: CedarDecider, since: float
) -> WhatIfReport:
    """Read the decisions recorded since ``since`` and replay them against ``candidate``."""
    from services.cli.client import list_agents
    from services.policy.whatif import what_if
    from services.tracing.reader import audit_filter, scan

    subjects = Subjects(settings.subject_prefix)
    nc = await connect_operator(url, settings)
    try:
        agents = {r.manifest.name: r for r in await list_agents(nc, subjects)}
        events: list[AuditEvent] = []
        progress = Progress(
            SpinnerColumn(),
            TextColumn("reading decisions"),
            MofNCompleteColumn(),
            console=Console(stderr=True),
            transient=True,
            disable=not sys.stderr.isatty(),
        )
        with progress:
            task = progress.add_task("read", total=None)
            async for _seq, record, _raw in scan(
                nc.jetstream(), audit_filter(subjects, kind="decision"), start_time=since
            ):
                if isinstance(record, AuditEvent):
                    events.append(record)
                progress.advance(task)
        return what_if(events, candidate, agents)
    finally:
        await nc.close()


@policy_app.command("shadow")
def shadow(
    folder: Annotated[
        Path | None,
        typer.Argument(help="Candidate policy folder to run in shadow.", show_default=False),
    ] = None,
    off: Annotated[bool, typer.Option("--off", help="Stop shadow mode.")] = False,
    label: Annotated[
        str | None, typer.Option("--label", help="Label of the candidate (default: label.txt).")
    ] = None,
    nats_url: NatsUrlOption = None,
    json_out: JsonOption = False,
) -> None:
    """Evaluate a candidate beside the active set on live traffic; audit every disagreement.

    Outcomes never change: callers get the active set's answers. Disagreements are
    audit records of kind `shadow` (`signalbox audit replay --kind shadow --since 1h`).
    """
    if (folder is None) == (not off):
        fail("give a candidate folder to start shadow mode, or --off to stop it")
    candidate = _read(folder, label) if folder is not None else None
    status = admin_call(
        nats_url,
        "policy",
        "shadow",
        ShadowPolicies(candidate=candidate, requested_by=who()),
        ShadowStatus,
    )
    if json_out:
        typer.echo(to_json(status))
        return
    console = Console()
    if not status.enabled:
        console.print(f"Shadow mode is off; version {status.active_version} decides, alone.")
        return
    console.print(
        f"Shadow mode on: version {status.version} "
        f"({_version(status.label, status.digest)}) is evaluated beside active version "
        f"{status.active_version} on every replica; outcomes are unchanged.\n"
        "Disagreements: signalbox audit replay --kind shadow --since 1h"
    )
