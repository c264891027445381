"""Shared fixtures: a real nats-server from the wheel, settings, a running stack."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from broker.agent import Agent
from broker.codec import decode as _decode
from broker.connection import Client, connect
from broker.diagnostics import await_chain
from broker.runtime.identity import ServerSecrets, auth_config, service_connect_options
from broker.runtime.jetstream import AUDIT_STREAM
from broker.runtime.server import EmbeddedServer
from broker.settings import Settings
from broker.subjects import Subjects, inbox_prefix
from schemas import AgentBinding, AgentManifest, AuditEvent
from services.policy.cedar import LABEL_FILE, SCHEMA_FILE, shipped_policy_dir
from services.policy.service import PolicyService
from services.registry.credentials import CredentialStore
from services.runner import Stack

# -- a watchdog for hangs -----------------------------------------------------------------
#
# pytest-timeout prints the threads' stacks, which for an asyncio test only
# shows the event loop idling in epoll. What hangs is a task awaiting
# something; this dumps every task's await chain (coroutine by coroutine)
# shortly before the timeout fires, so a hang in CI says where it is.

WATCHDOG_AFTER = 45.0
_loops: list[asyncio.AbstractEventLoop] = []


def _dump_tasks(phase: str, nodeid: str) -> None:
    out = [f"=== watchdog: {nodeid} still in {phase} after {WATCHDOG_AFTER:.0f} s; tasks:"]
    for loop in list(_loops):
        try:
            tasks = list(asyncio.all_tasks(loop))
        except RuntimeError:  # the loop changed its task set under us: try once more
            tasks = list(asyncio.all_tasks(loop))
        for task in tasks:
            out.append(f"  {task.get_name()}:")
            out.extend(f"    {line}" for line in await_chain(task))
    print("\n".join(out), file=sys.stderr, flush=True)


@contextlib.contextmanager
def _watchdog(phase: str, item: pytest.Item) -> Iterator[None]:
    timer = threading.Timer(WATCHDOG_AFTER, _dump_tasks, (phase, item.nodeid))
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    with _watchdog("call", item):
        yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item: pytest.Item) -> Iterator[None]:
    with _watchdog("teardown", item):
        yield
    _loops.clear()


@pytest.fixture(autouse=True)
async def _watch_loop() -> None:
    """Remember the test's event loop for the watchdog."""
    _loops.append(asyncio.get_running_loop())


@pytest.fixture(autouse=True)
def _clean_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests never see the developer's or CI's SIGNALBOX_* settings.

    ``SIGNALBOX_DATABASE_URL`` included: ``Settings()`` would otherwise put
    every stack test on that one shared database. The store tests get it
    through :func:`postgres_url` instead.
    """
    for key in list(os.environ):
        if key.startswith("SIGNALBOX_"):
            monkeypatch.delenv(key)


@pytest.fixture(scope="session")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedServer]:
    """One real nats-server (JetStream, random port, temp store) for the session.

    An *open* server (no identity): for tests of plumbing that does not care
    who connects (codec, streams, the audit emitter). Everything that runs
    services or agents uses :func:`fresh_server`, which enforces identity
    as ``signalbox up`` does.
    """
    server = EmbeddedServer(tmp_path_factory.mktemp("nats"), port=0, sync_always=False)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def nats_url(nats_server: EmbeddedServer) -> str:
    """URL of the session server."""
    return nats_server.url


@pytest.fixture
def server_secrets(tmp_path: Path) -> ServerSecrets:
    """The test deployment's secrets, where :func:`settings` looks for them."""
    return ServerSecrets.load_or_create(tmp_path / "data" / "secrets")


@pytest.fixture
def fresh_server(tmp_path: Path, server_secrets: ServerSecrets) -> Iterator[EmbeddedServer]:
    """A server of its own with identity enforced (auth callout to the registry),
    as ``signalbox up`` runs it; for tests that need empty streams or kill it."""
    server = EmbeddedServer(
        tmp_path / "nats",
        port=0,
        sync_always=False,
        auth=auth_config(server_secrets, Subjects("sb")),
    )
    server.start()
    yield server
    server.stop()


@pytest.fixture
def settings(fresh_server: EmbeddedServer, tmp_path: Path) -> Settings:
    """Settings pointing at a fresh server, with a temp data dir (holding the secrets)."""
    return Settings(nats_url=fresh_server.url, data_dir=tmp_path / "data", call_timeout=5.0)


ServiceConnector = Callable[..., Awaitable[Client]]


@pytest.fixture
async def service_nc(settings: Settings) -> AsyncIterator[ServiceConnector]:
    """Connect to the fresh server as a service (``await service_nc()``); closed at teardown."""
    made: list[Client] = []

    async def make(name: str = "test-service", **options: Any) -> Client:
        assert settings.nats_url is not None
        nc = await connect(
            settings.nats_url, name=name, **{**service_connect_options(settings), **options}
        )
        made.append(nc)
        return nc

    yield make
    for nc in made:
        await nc.close()


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


@pytest.fixture
async def stack(settings: Settings) -> AsyncIterator[Stack]:
    """All four services running against a fresh server."""
    async with Stack(settings) as running:
        yield running


# -- helpers for the broker/, schemas/ and services' call-path tests ----------------------

StackFactory = Callable[..., Awaitable[Stack]]
AgentFactory = Callable[..., Agent]


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


@pytest.fixture
async def make_stack(settings: Settings) -> AsyncIterator[StackFactory]:
    """Start stacks on the fresh server: ``await make_stack(allow=..., services=..., **settings)``.

    ``allow`` lists ``(caller, target, capabilities)`` rules, turned into Cedar
    permits (:func:`cedar_policies`), or ``rules`` is the text of a whole Cedar
    policy file. They are written, with the shipped schema and the label
    ``test-rules``, to a policy folder in the data dir before the services
    start; later stacks of the test reuse that folder, and a first stack
    without rules gets an empty set (everything denied). Other keyword
    arguments override settings fields (``policy_dir=`` included).
    Every stack started is stopped at teardown, newest first.
    """
    started: list[Stack] = []

    async def make(
        *,
        allow: Sequence[Rule] | None = None,
        rules: str | None = None,
        services: Sequence[str] | None = None,
        **overrides: Any,
    ) -> Stack:
        current = settings.model_copy(update=overrides) if overrides else settings
        if allow is not None:
            rules = cedar_policies(allow)
        folder = current.data_dir / "test-policies"
        if rules is not None or not folder.exists():
            folder.mkdir(parents=True, exist_ok=True)
            schema = (shipped_policy_dir() / SCHEMA_FILE).read_text()
            (folder / SCHEMA_FILE).write_text(schema)
            (folder / LABEL_FILE).write_text("test-rules\n")
            (folder / "rules.cedar").write_text(rules or "")
        if "policy_dir" not in overrides:
            current = current.model_copy(update={"policy_dir": folder})
        stack = Stack(current, services) if services is not None else Stack(current)
        await stack.start()
        started.append(stack)
        return stack

    yield make
    for stack in reversed(started):
        await stack.stop()


@pytest.fixture
async def make_agent(settings: Settings) -> AsyncIterator[AgentFactory]:
    """Build agents on the fresh server (not started), each enrolled with a credential of
    its own (pass ``credential=`` to override); every one is stopped at teardown.

    ``owner`` and ``team`` are declared in the manifest and bound at enrollment,
    with ``namespace``, ``region``, ``projects`` and ``tags`` (bound only: the
    registry writes them into the stored manifest).
    """
    made: list[Agent] = []

    def make(
        name: str,
        *,
        owner: str = "owner-1",
        team: str = "team-1",
        namespace: str = "",
        region: str = "",
        projects: tuple[str, ...] = (),
        tags: tuple[str, ...] = (),
        **kwargs: Any,
    ) -> Agent:
        manifest = AgentManifest(name=name, version="1.0.0", owner=owner, team=team)
        assert settings.nats_url is not None
        if "credential" not in kwargs:
            kwargs["credential"] = enroll(
                settings, name, owner=owner, team=team, namespace=namespace, region=region,
                projects=projects, tags=tags,
            )  # fmt: skip
        agent = Agent(manifest, nats_url=settings.nats_url, **kwargs)
        made.append(agent)
        return agent

    yield make
    for agent in reversed(made):
        await agent.stop()


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
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            await self._fetch()
            found = [r for r in self.records if predicate(r)]
            if len(found) >= count or loop.time() > deadline:
                break
        assert len(found) >= count, (
            f"expected {count} matching audit records, found {len(found)} "
            f"among {len(self.records)}: {[(r.kind, r.actor, r.data) for r in self.records]}"
        )
        return found

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


@pytest.fixture
async def audit_trail(settings: Settings) -> AsyncIterator[AuditTrail]:
    """The chained audit trail of the fresh server."""
    assert settings.nats_url is not None
    trail = AuditTrail(
        settings.nats_url, settings.subject_prefix, **service_connect_options(settings)
    )
    yield trail
    await trail.close()


# -- SQL store -----------------------------------------------------------------------------


@pytest.fixture(scope="session")
def postgres_url() -> str | None:
    """``SIGNALBOX_DATABASE_URL`` as the session found it (``.ci/run`` sets it).

    Session-scoped fixtures are set up before the function-scoped
    ``_clean_environ`` hides the variable, so this still sees it.
    """
    return os.environ.get("SIGNALBOX_DATABASE_URL") or None


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(
    request: pytest.FixtureRequest, tmp_path: Path, postgres_url: str | None
) -> Iterator[str]:
    """URL of an empty SQL database: a SQLite file, and PostgreSQL when configured.

    The PostgreSQL variant needs ``SIGNALBOX_DATABASE_URL`` (``.ci/run`` starts
    a server and sets it); each test gets a schema of its own, selected
    through ``search_path`` and dropped afterwards.
    """
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'store' / 'signalbox.db'}"
        return
    base = postgres_url or ""
    if not base.startswith("postgresql"):
        pytest.skip("PostgreSQL store tests need SIGNALBOX_DATABASE_URL=postgresql+psycopg://...")
    import uuid

    from sqlalchemy import create_engine, make_url, text

    schema = f"sb_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(base)
    try:
        with admin.begin() as conn:
            conn.execute(text(f'CREATE SCHEMA "{schema}"'))
        url = make_url(base).update_query_dict({"options": f"-csearch_path={schema}"})
        yield url.render_as_string(hide_password=False)
    finally:
        with admin.begin() as conn:
            conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        admin.dispose()


# -- raw clients -----------------------------------------------------------------------


class RawAgent:
    """A plain nats-py connection holding an agent's credential; collects server errors."""

    def __init__(self) -> None:
        self.errors: list[Exception] = []
        self.nc: Client | None = None

    async def connect(self, url: str, name: str, token: str | None, **options: Any) -> Client:
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
        return [str(e) for e in self.errors if "permissions violation" in str(e).lower()]

    async def violation(self, action: Callable[[Client], Awaitable[Any]], needle: str) -> None:
        """Run ``action``; the server must report a permissions violation naming ``needle``."""
        assert self.nc is not None
        before = len(self.violations())
        await action(self.nc)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            new = self.violations()[before:]
            # nats-py lower-cases the server's message.
            if any(needle.lower() in v.lower() for v in new):
                return
            await asyncio.sleep(0.02)
        raise AssertionError(f"no permissions violation for {needle!r}; errors: {self.errors}")


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


def policy_of(stack: Stack) -> PolicyService:
    """The policy service of a running stack."""
    service = stack.services["policy"]
    assert isinstance(service, PolicyService)
    return service


# -- waiting ----------------------------------------------------------------------------


async def eventually(check: Callable[[], Any], what: str = "", timeout: float = 20.0) -> None:
    """Poll ``check`` (sync or async) until it returns something true, or fail naming ``what``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what or 'the condition'}")
        await asyncio.sleep(0.02)
