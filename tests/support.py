"""Helpers the tests import (``from support import ...``): waiting, enrolling, Cedar rules,
reading the audit trail, raw clients, the services of a running stack, the CLI.

Fixtures live in the conftest files (``tests/conftest.py`` for the shared
ones); tests never import a conftest. pytest imports every ``conftest.py``
of a folder without ``__init__.py`` under the one module name ``conftest``,
so ``from support import x`` gets whichever conftest was loaded last. This
module has a name of its own; ``tests/`` is on ``sys.path`` because the
top conftest is there.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import functools
import inspect
import json
import os
import shutil
import tempfile
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import nats
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from broker.agent import Agent
from broker.codec import decode as _decode
from broker.connection import Client
from broker.runtime.jetstream import AUDIT_STREAM
from broker.settings import Settings
from broker.subjects import Subjects, inbox_prefix
from schemas import AgentBinding, AuditEvent
from services.cost.service import CostService
from services.policy.cedar.policy_set import compose_example
from services.policy.service import PolicyService
from services.registry.credentials import CredentialStore
from services.registry.service import RegistryService
from services.runner import Stack

if TYPE_CHECKING:
    from typer.testing import Result

T = TypeVar("T")

# -- what the fixtures hand out (tests/conftest.py) ------------------------------------------

#: ``service_nc``: ``await service_nc(name=..., **options)`` connects as a service.
ServiceConnector = Callable[..., Awaitable[Client]]
#: ``make_stack``: ``await make_stack(allow=..., services=..., **settings)``.
StackFactory = Callable[..., Awaitable[Stack]]
#: ``make_agent``: ``make_agent(name, team=..., **agent_options)`` (not started).
AgentFactory = Callable[..., Agent]


# -- waiting ---------------------------------------------------------------------------------


async def eventually(
    check: Callable[[], T | Awaitable[T]],
    what: str | Callable[[], str],
    *,
    timeout: float = 20.0,
    interval: float = 0.02,
) -> T:
    """Poll ``check`` (sync or async) until it returns something true, and return that.

    Args:
        check: Asked every ``interval`` seconds.
        what: What is awaited, for the failure: ``AssertionError("timed out
            after 20 s waiting for <what>")``. A callable is asked at the
            failure, so the message can say what was seen instead.
        timeout: Seconds before failing.
        interval: Seconds between two checks.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        result = check()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return result  # type: ignore[return-value]
        if loop.time() > deadline:
            described = what() if callable(what) else what
            raise AssertionError(f"timed out after {timeout:g} s waiting for {described}")
        await asyncio.sleep(interval)


# -- identity --------------------------------------------------------------------------------


def enroll(settings: Settings, name: str, ttl: float = 3600.0, **attributes: Any) -> str:
    """Issue a credential for agent ``name`` straight into the registry's store.

    ``attributes`` (``team``, ``owner``, ``namespace``, ``region``,
    ``projects``, ``tags``) are bound to the agent, as ``signalbox agents
    enroll NAME --team ...`` does, unless it is bound already; none binds
    nothing, so the agent may then register only without them.
    """
    store = CredentialStore(settings.resolved_database_url)
    binding = AgentBinding(agent=name, bound_by="test", **attributes)
    try:
        return store.issue(name, ttl, created_by="test", binding=binding).token
    finally:
        store.close()


# -- policies and agents ---------------------------------------------------------------------

Rule = tuple[str, str, Sequence[str]]


def cedar_policies(rules: Sequence[Rule]) -> str:
    """A Cedar policy file from ``(caller, target, capabilities)`` triples.

    Each triple becomes ``@id("<caller>-<target>")``, a permit for ``caller``
    to call those capabilities of ``target``; ``"*"`` stands for any agent or
    any capability.
    """
    out = []
    for caller, target, caps in rules:
        principal = "principal"
        if caller != "*":
            principal += f" == Signalbox::Agent::{json.dumps(caller)}"
        conditions = []
        if target != "*":
            conditions.append(f"resource.owner == Signalbox::Agent::{json.dumps(target)}")
        if "*" not in caps:
            conditions.append(f"{json.dumps(list(caps))}.contains(resource.name)")
        when = f" when {{ {' && '.join(conditions)} }}" if conditions else ""
        out.append(
            f"@id({json.dumps(f'{caller}-{target}')})\n"
            f'permit ({principal}, action == Signalbox::Action::"call", resource){when};\n'
        )
    return "".join(out)


async def echo_pair(make: AgentFactory, *, team: str = "team-1") -> tuple[Agent, Agent]:
    """Agent ``a`` and agent ``b`` (of ``team``) serving ``echo``, both started."""
    b = make("b", team=team)

    @b.capability("echo")
    async def echo(req: dict[str, Any]) -> dict[str, Any]:
        return req

    a = make("a")
    await b.start()
    await a.start()
    return a, b


# -- the services of a running stack ---------------------------------------------------------


def policy_of(stack: Stack) -> PolicyService:
    """The policy service of a running stack."""
    service = stack.services["policy"]
    assert isinstance(service, PolicyService)
    return service


def cost_of(stack: Stack) -> CostService:
    """The cost service of a running stack."""
    service = stack.services["cost"]
    assert isinstance(service, CostService)
    return service


def registry_of(stack: Stack) -> RegistryService:
    """The registry service of a running stack."""
    service = stack.services["registry"]
    assert isinstance(service, RegistryService)
    return service


# -- the audit trail -------------------------------------------------------------------------


class AuditTrail:
    """Reads the chained ``SB_AUDIT`` stream with an ephemeral JetStream pull consumer."""

    def __init__(self, url: str, prefix: str = "sb", **options: Any) -> None:
        self.url = url
        self.options = options
        self.subjects = Subjects(prefix)
        self.records: list[AuditEvent] = []
        self._nc: Any = None
        self._sub: Any = None

    async def _fetch(self) -> None:
        if self._nc is None:
            self._nc = await nats.connect(self.url, **self.options)
        js = self._nc.jetstream()
        if self._sub is None:
            try:
                self._sub = await js.pull_subscribe(
                    self.subjects.audit_log_all,
                    stream=AUDIT_STREAM,
                    config=ConsumerConfig(
                        ack_policy=AckPolicy.NONE,
                        deliver_policy=DeliverPolicy.ALL,
                        inactive_threshold=60.0,
                    ),
                )
            except nats.js.errors.NotFoundError:
                return  # the stream does not exist yet
        try:
            msgs = await self._sub.fetch(1024, timeout=0.2)
        except TimeoutError:  # nats-py raises its own or asyncio's, by timing
            return
        self.records.extend(_decode(m.data, AuditEvent) for m in msgs)

    async def wait_for(
        self,
        predicate: Callable[[AuditEvent], bool],
        *,
        count: int = 1,
        timeout: float = 20.0,
    ) -> list[AuditEvent]:
        """Poll until at least ``count`` chained records match; returns the matches."""

        async def matches() -> list[AuditEvent] | None:
            await self._fetch()
            found = [r for r in self.records if predicate(r)]
            return found if len(found) >= count else None

        def seen() -> str:
            found = [r for r in self.records if predicate(r)]
            return (
                f"{count} matching audit records; found {len(found)} among "
                f"{len(self.records)}: {[(r.kind, r.actor, r.data) for r in self.records]}"
            )

        # A fetch waits up to 0.2 s for records itself.
        return await eventually(matches, seen, timeout=timeout, interval=0.01)

    async def settle(self) -> list[AuditEvent]:
        """Everything chained so far (reads until a fetch comes back empty)."""
        before = -1
        while before != len(self.records):
            before = len(self.records)
            await self._fetch()
        return list(self.records)

    async def close(self) -> None:
        """Close the connection."""
        if self._nc is not None:
            await self._nc.close()


# -- raw clients -----------------------------------------------------------------------------


class RawAgent:
    """A plain nats-py connection holding an agent's credential; collects server errors."""

    def __init__(self) -> None:
        self.errors: list[Exception] = []
        self.nc: Client | None = None

    async def connect(self, url: str, name: str, token: str | None, **options: Any) -> Client:
        """Connect as agent ``name`` (its inbox prefix) with ``token``; no reconnects."""

        async def on_error(exc: Exception) -> None:
            self.errors.append(exc)

        kwargs: dict[str, Any] = {
            "servers": [url],
            "inbox_prefix": inbox_prefix(name),
            "error_cb": on_error,
            "allow_reconnect": False,
            "connect_timeout": 3,
            **options,
        }
        if token is not None:
            kwargs["token"] = token
        self.nc = await nats.connect(**kwargs)
        return self.nc

    def violations(self) -> list[str]:
        """The permission violations the server reported so far."""
        return [str(e) for e in self.errors if "permissions violation" in str(e).lower()]

    async def violation(self, action: Callable[[Client], Awaitable[Any]], needle: str) -> None:
        """Run ``action``; the server must report a permissions violation naming ``needle``."""
        assert self.nc is not None
        before = len(self.violations())
        await action(self.nc)
        await eventually(
            # nats-py lower-cases the server's message.
            lambda: any(needle.lower() in v.lower() for v in self.violations()[before:]),
            lambda: f"a permissions violation for {needle!r}; errors: {self.errors}",
            timeout=5,
        )


async def ask(
    nc: Client,
    subject: str,
    data: bytes,
    *,
    inbox: str,
    timeout: float = 5.0,
    headers: dict[str, str] | None = None,
) -> Any:
    """Request ``subject`` with a reply subject under ``inbox`` (a service connection may
    subscribe anywhere, so one connection can ask as any agent, operator or service:
    endpoints answer only into the sender's own reply space). Returns the reply ``Msg``."""
    sub = await nc.subscribe(f"{inbox}.{os.urandom(8).hex()}", max_msgs=1)
    try:
        await nc.publish(subject, data, reply=sub.subject, headers=headers)
        return await sub.next_msg(timeout=timeout)
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()


# -- the CLI ---------------------------------------------------------------------------------


async def ainvoke(args: Sequence[str]) -> Result:
    """Run ``signalbox ARGS`` in-process, in a worker thread: the CLI runs an event loop of
    its own, beside the test's."""
    from typer.testing import CliRunner

    from services.cli.main import app

    return await asyncio.to_thread(CliRunner().invoke, app, list(args))


@functools.cache
def lending_policy_dir() -> Path:
    """The default policy set plus the lending example (the demo's, the README's): who of
    the lending desk may call whom, and model use for registered agents. Composed once
    per test session (``signalbox policy export DIR --example lending`` writes the same)."""
    folder = Path(tempfile.mkdtemp(prefix="sb-lending-policies-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return compose_example(folder, "lending")
