"""``signalbox identity nats-context``: standard NATS tooling works for operators.

The context it writes is what the ``nats`` CLI (and nats.js tooling) reads:
the server, the operator's credentials and the operator's inbox prefix.
Here a plain nats-py connection made from nothing but that file discovers
the agents with ``$SRV.PING`` exactly as ``nats micro ls`` does; the same
credentials with the tools' default ``_INBOX.<nuid>`` inbox are refused,
which is why the prefix must be in the context (nobody's rights widened).
"""

from __future__ import annotations

import asyncio
import json
import os
import stat
from pathlib import Path
from typing import TYPE_CHECKING, Any

import nats
from nats.aio.msg import Msg
from support import echo_pair, eventually
from typer.testing import CliRunner

from broker.settings import Settings
from services.cli.main import app

if TYPE_CHECKING:
    from support import AgentFactory, StackFactory

runner = CliRunner()


async def _connect(context: dict[str, str], errors: list[Exception], *, prefix: bool) -> Any:
    async def on_error(exc: Exception) -> None:
        errors.append(exc)

    options: dict[str, Any] = {"servers": [context["url"]], "error_cb": on_error,
                               "allow_reconnect": False}  # fmt: skip
    if context["user"]:
        options |= {"user": context["user"], "password": context["password"]}
    if context["token"]:
        options["token"] = context["token"]
    if prefix:
        options["inbox_prefix"] = context["inbox_prefix"]
    return await nats.connect(**options)


async def test_a_nats_context_discovers_agents_with_the_operators_inbox(
    make_stack: StackFactory, make_agent: AgentFactory, settings: Settings, tmp_path: Path
) -> None:
    await make_stack()
    await echo_pair(make_agent)
    assert settings.nats_url
    folder = tmp_path / "nats" / "context"
    result = await asyncio.to_thread(
        runner.invoke, app,
        ["identity", "nats-context", "ops", "--dir", str(folder), "--select",
         "--nats-url", settings.nats_url],
        terminal_width=80,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    path = folder / "ops.json"
    assert str(path) in result.output.replace("\n", "") and "micro ls" in result.output
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600  # it holds the operator's password
    assert (tmp_path / "nats" / "context.txt").read_text() == "ops"
    context = json.loads(path.read_text())
    assert context["url"] == settings.nats_url
    assert context["inbox_prefix"] == "_INBOX.operator"

    # What `nats --context ops micro ls` does: $SRV.PING, answers into a new inbox.
    errors: list[Exception] = []
    nc = await _connect(context, errors, prefix=True)
    try:
        answers: list[Msg] = []
        inbox = nc.new_inbox()
        assert inbox.startswith("_INBOX.operator.")

        async def collect(msg: Msg) -> None:
            answers.append(msg)

        sub = await nc.subscribe(inbox, cb=collect)
        await nc.publish("$SRV.PING", b"", reply=inbox)
        names = lambda: {json.loads(m.data)["name"] for m in answers}  # noqa: E731
        await eventually(lambda: {"b"} <= names(), "b's $SRV.PING answer")
        await sub.unsubscribe()
        assert not errors, errors
    finally:
        await nc.close()

    # The same credentials with the default inbox: refused, no discovery.
    refused: list[Exception] = []
    nc = await _connect(context, refused, prefix=False)
    try:
        sub = await nc.subscribe(nc.new_inbox())
        await nc.flush()
        await eventually(
            lambda: any("permissions violation" in str(e) for e in refused),
            "the server's refusal of the default _INBOX",
        )
        await sub.unsubscribe()
    finally:
        await nc.close()


def test_nats_context_refuses_a_path_as_its_name(tmp_path: Path) -> None:
    result = runner.invoke(app, ["identity", "nats-context", "../evil", "--dir", str(tmp_path)])
    assert result.exit_code != 0
    assert "invalid context name" in result.output
    assert not list(tmp_path.iterdir())
