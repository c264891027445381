"""``signalbox status`` and ``signalbox probe``: is the control plane healthy?

::

    signalbox status [--service NAME ...] [--wait 1] [--json]   every replica, over NATS
    signalbox probe [NAME ...] [--ready] [--data-dir DIR]        this host's processes

``status`` asks every replica of every service (``sb.admin.<service>.status``,
no queue group, so all answer) and prints one row each: ready or not, up
since, audit events waiting and when JetStream last stored one, consumer
lag; then each problem, saying what to do. It exits 1 when a service has no
replica answering or a replica is not ready, so scripts and CI can gate on it.

``probe`` needs neither NATS nor credentials: it reads the health report
each service process writes every 2 s (``<data dir>/health/<service>.json``,
:mod:`broker.runtime.health`): alive = a fresh report from a live process; with
``--ready``, also ready. It is the liveness / readiness probe of a container
orchestrator (an ``exec`` probe; see ``deploy/``).

:mod:`services.cli.main` registers :func:`status_command` and :func:`probe_command`.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Annotated

import msgspec
import typer
from nats.aio.client import Client
from nats.aio.msg import Msg
from rich.console import Console
from rich.markup import escape
from rich.text import Text

from broker.codec import decode, encode
from broker.replies import error_from_reply, is_error
from broker.runtime.health import health_path, probe
from broker.runtime.identity import SERVICE_NAMES
from broker.subjects import Subjects
from schemas import HealthRequest, ServiceHealth
from services.cli.client import operator_of
from services.cli.common import (
    JsonOption,
    NatsUrlOption,
    client_url,
    connect_operator,
    fail,
    load_settings,
    run,
)
from services.cli.render import CliTable, Column, Fit

__all__ = ["gather_health", "probe_command", "status_command"]


async def gather_health(
    nc: Client, subjects: Subjects, services: tuple[str, ...], wait: float
) -> tuple[list[ServiceHealth], list[str]]:
    """Every replica's report that arrives within ``wait`` seconds, and the error replies."""
    inbox = nc.new_inbox()
    reports: list[ServiceHealth] = []
    errors: list[str] = []

    async def collect(msg: Msg) -> None:
        if is_error(msg.headers):
            errors.append(error_from_reply(msg.data, msg.headers).message)
            return
        try:
            reports.append(decode(msg.data, ServiceHealth))
        except Exception as exc:  # a newer replica's report: say so, keep the others
            errors.append(f"an unreadable health report ({exc})")

    sub = await nc.subscribe(inbox, cb=collect)
    try:
        operator = operator_of(nc)
        for service in services:
            subject = subjects.admin(service, "status", operator)
            await nc.publish(subject, encode(HealthRequest()), reply=inbox)
        await nc.flush()
        await asyncio.sleep(wait)
    finally:
        await sub.unsubscribe()
    order = {name: i for i, name in enumerate(services)}
    reports.sort(key=lambda h: (order.get(h.service, len(order)), h.host, h.instance))
    return reports, errors


def _ago(seconds: float) -> str:
    seconds = max(seconds, 0.0)
    if seconds < 60:
        return f"{seconds:.1f}s"
    if seconds < 3600:
        return f"{seconds // 60:.0f}m{seconds % 60:02.0f}s"
    if seconds < 86400:
        return f"{seconds // 3600:.0f}h{seconds % 3600 // 60:02.0f}m"
    return f"{seconds // 86400:.0f}d{seconds % 86400 // 3600:02.0f}h"


def _audit(h: ServiceHealth) -> str:
    if not h.audit_last_ack:
        return f"{h.audit_pending:,} waiting"
    return f"{h.audit_pending:,} waiting, last stored {_ago(h.time - h.audit_last_ack)} ago"


def _lag(h: ServiceHealth) -> str:
    if not h.consumers:
        return "-"
    return ", ".join(f"{c.pending + c.ack_pending:,}" for c in h.consumers)


def health_table(reports: list[ServiceHealth]) -> CliTable:
    """One row per replica; instance ids and hosts never cut."""
    table = CliTable(
        Column("service"),
        Column("instance"),
        Column("state"),
        Column("up"),
        Column("audit", Fit.WRAP, min_width=12),
        Column("lag", Fit.WRAP, min_width=8),
        title="Signalbox services",
    )
    for h in reports:
        state = Text("ready", "green") if h.ready else Text("NOT READY", "bold red")
        table.add_row(
            h.service, f"{h.instance}@{h.host}", state, _ago(h.time - h.started_at),
            _audit(h), _lag(h),
        )  # fmt: skip
    return table


def status_command(
    service: Annotated[
        list[str] | None,
        typer.Option(
            "--service",
            "-s",
            help="Only this service (repeatable; default: all four)",
            show_default=False,
        ),
    ] = None,
    wait: Annotated[
        float, typer.Option("--wait", help="Seconds to collect replies from replicas", min=0.1)
    ] = 1.0,
    nats_url: NatsUrlOption = None,
    json_out: JsonOption = False,
) -> None:
    """Health of every service replica: ready, audit, consumer lag, problems.

    Exits 1 when a service has no replica answering or one is not ready.
    """
    wanted = tuple(service or SERVICE_NAMES)
    unknown = [s for s in wanted if s not in SERVICE_NAMES]
    if unknown:
        raise typer.BadParameter(
            f"no service {', '.join(unknown)}; choose from {', '.join(SERVICE_NAMES)}"
        )
    url, settings = client_url(nats_url)
    subjects = Subjects(settings.subject_prefix)

    async def main() -> tuple[list[ServiceHealth], list[str]]:
        nc = await connect_operator(url, settings)
        try:
            return await gather_health(nc, subjects, wanted, wait)
        finally:
            await nc.close()

    reports, errors = run(main())
    answering = {h.service for h in reports}
    missing = [s for s in wanted if s not in answering]
    healthy = not missing and not errors and all(h.ready for h in reports)
    if json_out:
        out = {
            "ok": healthy,
            "replicas": [msgspec.to_builtins(h) for h in reports],
            "missing": missing,
            "errors": errors,
        }
        typer.echo(msgspec.json.encode(out).decode())
        if not healthy:
            raise typer.Exit(1)
        return
    console = Console(soft_wrap=True)
    if reports:
        console.print(health_table(reports))
    for h in reports:
        for problem in h.problems:
            console.print(f"[bold red]{h.service} {h.instance}:[/] {escape(problem)}")
    for name in missing:
        console.print(
            f"[bold red]{name}:[/] no replica answered within {wait:g}s; start it "
            f"(`signalbox up`, or `python -m services.{name} --nats-url {url}`)"
        )
    for error in errors:
        console.print(f"[bold red]error:[/] {escape(error)}")
    if not healthy:
        raise typer.Exit(1)
    console.print(f"[green]All {len(reports)} replicas ready.[/]")


def probe_command(
    services: Annotated[
        list[str] | None,
        typer.Argument(help="Services to probe (default: all four)", show_default=False),
    ] = None,
    ready: Annotated[
        bool, typer.Option("--ready", help="Readiness: also require each to be ready")
    ] = False,
    data_dir: Annotated[
        Path | None,
        typer.Option(
            "--data-dir",
            help="The services' data folder (default: $SIGNALBOX_DATA_DIR)",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Liveness (with --ready, readiness) of this host's service processes.

    Reads the health report each service writes every 2 s: no NATS, no
    credentials (a container's exec probe). Exits 1 if any fails.
    """
    wanted = tuple(services or SERVICE_NAMES)
    settings = load_settings(data_dir=data_dir)
    now = time.time()
    failed = False
    for name in wanted:
        if name not in SERVICE_NAMES:
            fail(f"no service {name!r}; choose from {', '.join(SERVICE_NAMES)}")
        ok, why = probe(health_path(settings.data_dir, name), ready=ready, now=now)
        typer.echo(f"{'ok  ' if ok else 'FAIL'} {why}")
        failed = failed or not ok
    if failed:
        raise typer.Exit(1)
