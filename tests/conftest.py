"""Shared fixtures: a real nats-server from the wheel, settings, a running stack.

Helpers the tests import (waiting, enrolling, the audit trail...) are in support.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import threading
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from support import (
    AgentFactory,
    AuditTrail,
    Rule,
    ServiceConnector,
    StackFactory,
    cedar_policies,
    enroll,
)

from broker.agent import Agent
from broker.connection import Client, connect
from broker.diagnostics import await_chain
from broker.runtime.identity import ServerSecrets, service_connect_options
from broker.runtime.permissions import auth_config
from broker.runtime.server import EmbeddedServer
from broker.settings import Settings
from broker.subjects import Subjects
from schemas import AgentManifest
from services.policy.cedar.policy_set import LABEL_FILE, SCHEMA_FILE, shipped_policy_dir
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


@pytest.fixture
def cli_operator(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The ``signalbox`` CLI run in-process (:func:`support.ainvoke`) is an operator of the
    fresh server: it reads the server's secrets where :func:`settings` keeps them."""
    monkeypatch.setenv("SIGNALBOX_SECRETS_DIR", str(tmp_path / "data" / "secrets"))


@pytest.fixture
async def stack(settings: Settings) -> AsyncIterator[Stack]:
    """All four services running against a fresh server."""
    async with Stack(settings) as running:
        yield running


# -- stacks, agents and the audit trail of the fresh server ------------------------------


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
