"""A service that starts before its cluster has a JetStream meta leader waits, then starts.

Real three-node clusters (the ``nats-server`` wheel) of which only one node runs at
first: it accepts clients, but JetStream has no quorum and does not answer. A CI
run showed the failure this prevents: the tracing service's first ``STREAM.INFO``
timed out on a freshly formed cluster and the process exited.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker.connection import connect
from broker.errors import JetStreamUnavailable
from broker.runtime.jetstream import AUDIT_STREAM, ensure_buckets, ensure_streams
from broker.runtime.server import EmbeddedServer, pick_ports
from broker.settings import Settings


class Cluster:
    """Three open (no auth) nodes routed to each other; started one by one."""

    def __init__(self, root: Path) -> None:
        routes = pick_ports(3)
        listed = ", ".join(f'"nats-route://127.0.0.1:{p}"' for p in routes)
        self.nodes = [
            EmbeddedServer(
                root / f"n{i + 1}",
                port=0,
                sync_always=False,
                extra_config=(
                    f'server_name: "settle-{i + 1}"\n'
                    f'cluster {{\n  name: "settle"\n  listen: "127.0.0.1:{routes[i]}"\n'
                    f"  routes: [{listed}]\n}}\n"
                ),
            )
            for i in range(3)
        ]

    def stop(self) -> None:
        for node in self.nodes:
            if node.pid is not None:
                node.stop()


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    made = Cluster(tmp_path)
    try:
        yield made
    finally:
        made.stop()


def _replicated(settings: Settings) -> Settings:
    return settings.model_copy(update={"audit_replicas": 3})


async def test_ensure_streams_waits_for_the_meta_leader_then_creates(
    cluster: Cluster, settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    url = cluster.nodes[0].start()  # one of three: clients connect, JetStream has no quorum
    nc = await connect(url, name="test-settling")
    try:
        js = nc.jetstream(timeout=1.0)
        settings = _replicated(settings)
        caplog.set_level(logging.WARNING, logger="broker.runtime.jetstream")
        ensuring = asyncio.ensure_future(ensure_streams(js, settings, within=60.0))
        # Start the rest only once the first node has said "not yet" at least once:
        # without the retry, ensure_streams has failed by then.
        for _ in range(200):
            if "did not answer" in caplog.text or ensuring.done():
                break
            await asyncio.sleep(0.05)
        assert not ensuring.done(), ensuring.exception()
        assert "retrying for up to 60s" in caplog.text
        await asyncio.gather(*(asyncio.to_thread(n.start) for n in cluster.nodes[1:]))
        await asyncio.wait_for(ensuring, 60)
        info = await js.stream_info(AUDIT_STREAM)
        assert info.config.num_replicas == 3
        buckets = await ensure_buckets(js, settings, within=60.0)
        await next(iter(buckets.values())).put("k", b"v")  # a quorum answers writes
    finally:
        await nc.close()


async def test_ensure_streams_gives_up_with_what_to_check(
    cluster: Cluster, settings: Settings
) -> None:
    url = cluster.nodes[0].start()
    nc = await connect(url, name="test-settling")
    try:
        js = nc.jetstream(timeout=0.5)
        with pytest.raises(JetStreamUnavailable) as caught:
            await ensure_streams(js, _replicated(settings), within=1.5)
        message = str(caught.value)
        assert "within 1.5s" in message
        assert "nats server report jetstream" in message
        assert "SIGNALBOX_CONNECT_TIMEOUT" in message
        assert caught.value.code == "jetstream_unavailable"
    finally:
        await nc.close()
