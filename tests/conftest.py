"""Shared fixtures: a real nats-server from the wheel, settings, a running stack."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from broker.server import EmbeddedServer
from broker.settings import Settings
from services.runner import Stack


@pytest.fixture(autouse=True)
def _clean_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests never see the developer's SIGNALBOX_* settings (the database URL excepted)."""
    for key in list(os.environ):
        if key.startswith("SIGNALBOX_") and key != "SIGNALBOX_DATABASE_URL":
            monkeypatch.delenv(key)


@pytest.fixture(scope="session")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedServer]:
    """One real nats-server (JetStream, random port, temp store) for the session."""
    server = EmbeddedServer(tmp_path_factory.mktemp("nats"), port=0, sync_always=False)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def nats_url(nats_server: EmbeddedServer) -> str:
    """URL of the session server."""
    return nats_server.url


@pytest.fixture
def fresh_server(tmp_path: Path) -> Iterator[EmbeddedServer]:
    """A server of its own, for tests that need empty streams or kill it."""
    server = EmbeddedServer(tmp_path / "nats", port=0, sync_always=False)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def settings(fresh_server: EmbeddedServer, tmp_path: Path) -> Settings:
    """Settings pointing at a fresh server, with a temp data dir."""
    return Settings(nats_url=fresh_server.url, data_dir=tmp_path / "data", call_timeout=5.0)


@pytest.fixture
async def stack(settings: Settings) -> AsyncIterator[Stack]:
    """All four services running against a fresh server."""
    async with Stack(settings) as running:
        yield running
