"""``signalbox audit tail``: audit records live from ``SB_AUDIT``.

:mod:`services.cli.main` registers :func:`audit_tail` as ``signalbox audit tail``.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from broker.errors import SchemaError, SignalboxError
from broker.subjects import Subjects
from services.cli.common import (
    JsonOption,
    NatsUrlOption,
    client_url,
    connect_operator,
    fail,
    run,
)
from services.cli.render import (
    audit_header,
    audit_line,
    to_json,
)
from services.tracing.reader import audit_filter, follow, start_of_last

__all__ = ["audit_tail"]


def audit_tail(
    nats_url: NatsUrlOption = None,
    kind: Annotated[
        str | None,
        typer.Option(
            "--kind",
            help="Only this kind: call, decision, rejected, registry, usage, admin, auth, "
            "shadow, budget, breaker, alert.",
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
