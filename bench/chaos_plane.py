"""The chaos bench's control planes: nats-server(s) and services as real processes
(``bench/chaos.py``)."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from broker import (
    Agent,
)
from broker.connection import connect
from broker.runtime.identity import (
    ServerSecrets,
    operator_connect_options,
    service_connect_options,
)
from broker.runtime.permissions import auth_config
from broker.runtime.server import EmbeddedServer, pick_ports
from broker.settings import Settings
from broker.subjects import Subjects
from schemas import AgentBinding, AgentManifest

__all__ = [
    "CALLER",
    "CALL_RETRIES",
    "CALL_TIMEOUT",
    "CAPABILITY",
    "CHAOS_RULES",
    "MODEL",
    "REPORTER",
    "ROOT",
    "SERVED",
    "SPENDER",
    "TARGET",
    "Deployment",
    "Log",
    "Plane",
    "ServiceProc",
    "UpProcess",
    "child_env",
    "quiet",
    "write_policies",
]

ROOT = Path(__file__).resolve().parents[1]

Log = Callable[[str], None]


def quiet(_line: str) -> None:
    pass


CALLER = "chaos-caller"
TARGET = "chaos-target"
CAPABILITY = "work"
SPENDER = "chaos-spender"
REPORTER = "chaos-reporter"
MODEL = "gpt-4o"  # shipped prices: $2.50 per million input tokens, $10 per million output
#: A model call's estimate: worst case 1,000 x $2.50/M + 1,000 x $10/M = $0.0125 reserved.
EST_INPUT, MAX_OUTPUT = 1_000, 1_000

#: The chaos agents' permits, beside the shipped set (which permits no call, and no
#: model use unless a permit names who may).
CHAOS_RULES = (
    '@id("chaos-caller-may-call-the-target")\n'
    f'permit (principal == Signalbox::Agent::"{CALLER}", action == Signalbox::Action::"call", '
    f'resource == Signalbox::Capability::"{TARGET}/{CAPABILITY}");\n'
    '@id("chaos-spender-may-use-the-model")\n'
    f'permit (principal == Signalbox::Agent::"{SPENDER}", '
    f'action == Signalbox::Action::"use_model", resource == Signalbox::Model::"{MODEL}");\n'
)

#: Seconds one attempt of a call waits (below SIGNALBOX_BREAKER_MIN_TIMEOUT: a kill's
#: timeouts are not held against the target).
CALL_TIMEOUT = 3.0
#: Failed attempts are retried (same idempotency key) this many times.
CALL_RETRIES = 3
#: Answers that count as served (a correct refusal is an answer, not an outage).
SERVED = frozenset({"ok", "budget_exceeded"})


# -- processes -----------------------------------------------------------------------------


def _die_with_parent() -> None:
    """In a child before exec: SIGKILL when the thread that started it dies (Linux)."""
    if sys.platform == "linux":
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)


def child_env(**settings: str) -> dict[str, str]:
    """This environment without any ``SIGNALBOX_*`` variable, plus ``settings`` (as
    ``SIGNALBOX_<NAME>``)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIGNALBOX_")}
    env.update({f"SIGNALBOX_{k.upper()}": v for k, v in settings.items()})
    return env


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


class ServiceProc:
    """One service as its own process: ``python -m services.<name> --nats-url --data-dir``.

    Each life logs to ``<log_dir>/<name>-<replica>.<life>.log``; ready once that log
    says ``<name> service started``.
    """

    def __init__(
        self, name: str, replica: int, url: str, data_dir: Path, env: Mapping[str, str]
    ) -> None:
        self.name = name
        self.replica = replica
        self.url = url
        self.data_dir = data_dir
        self.env = dict(env)
        self.proc: subprocess.Popen[bytes] | None = None
        self.lives = 0
        self.log_path = data_dir

    @property
    def label(self) -> str:
        """``policy-1``..."""
        return f"{self.name}-{self.replica}"

    def spawn(self) -> None:
        """Start a new life."""
        self.lives += 1
        logs = self.data_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        self.log_path = logs / f"{self.label}.{self.lives}.log"
        with self.log_path.open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", f"services.{self.name}",
                 "--nats-url", self.url, "--data-dir", str(self.data_dir)],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=self.env,
                cwd=ROOT, start_new_session=True, preexec_fn=_die_with_parent,
            )  # fmt: skip

    async def ready(self, timeout: float = 60.0) -> None:
        """Wait until this life logged that it started.

        Raises:
            RuntimeError: it exited or was not ready in time (with its log's tail).
        """
        needle = f"{self.name} service started".encode()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.log_path.exists() and needle in self.log_path.read_bytes():
                return
            if self.proc is None or self.proc.poll() is not None:
                break
            await asyncio.sleep(0.05)
        why = "exited" if self.proc is None or self.proc.poll() is not None else "is not ready"
        raise RuntimeError(f"{self.label} {why}; {self.log_path}:\n{_tail(self.log_path)}")

    def kill(self) -> int:
        """kill -9 (and reap); the pid it had."""
        assert self.proc is not None
        pid = self.proc.pid
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        self.proc.wait(10)
        self.proc = None
        return pid

    def terminate(self) -> None:
        """Ask it to stop (SIGTERM)."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)

    def reap(self, timeout: float = 15.0) -> None:
        """Wait for it to exit after :meth:`terminate`; kill -9 past ``timeout``."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait(5)


def write_policies(folder: Path) -> Path:
    """The shipped Cedar policies plus a permit for the chaos caller; the folder."""
    from services.policy.cedar.policy_set import shipped_policy_dir

    if folder.exists():
        shutil.rmtree(folder)
    shutil.copytree(shipped_policy_dir(), folder)
    (folder / "chaos.cedar").write_text(CHAOS_RULES)
    return folder


def _healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as reply:
            return bool(reply.status == 200)
    except (urllib.error.URLError, OSError):
        return False


class Plane:
    """What the load and the checks need of a running control plane (a server or three,
    the services): its URL, data dir (secrets, SQLite database), credentials."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.data_dir = root / "data"
        self.url = ""

    @property
    def settings(self) -> Settings:
        """Settings of a client of this plane (secrets and database in the data dir,
        whatever ``SIGNALBOX_*`` variables this process has)."""
        return Settings(
            nats_url=self.url, data_dir=self.data_dir, secrets_dir=self.data_dir / "secrets",
            database_url=f"sqlite:///{(self.data_dir / 'signalbox.db').resolve()}",
            nats_user=None, nats_password=None, operator_credential=None, subject_prefix="sb",
        )  # fmt: skip

    async def connect(self, name: str = "chaos-check", *, operator: bool = False) -> Any:
        """A service-user connection (reads every stream), or an operator's (admin requests)."""
        options = (operator_connect_options if operator else service_connect_options)(self.settings)
        return await connect(self.url, name=name, **options)

    def enroll(self, name: str, team: str) -> str:
        """A credential for agent ``name`` of ``team``, straight into the registry's store."""
        from services.registry.credentials import CredentialStore

        store = CredentialStore(self.settings.resolved_database_url)
        binding = AgentBinding(agent=name, bound_by="chaos", team=team, owner=team)
        try:
            return store.issue(name, 3600.0, created_by="chaos", binding=binding).token
        finally:
            store.close()

    def agent(self, name: str, team: str, **kwargs: Any) -> Agent:
        """An agent of this plane (not started)."""
        manifest = AgentManifest(name=name, version="1.0.0", owner=team, team=team)
        return Agent(manifest, nats_url=self.url, credential=self.enroll(name, team), **kwargs)


class Deployment(Plane):
    """A ``nats-server`` (identity on) or a 3-node cluster, and services as processes.

    Args:
        root: Folder for everything (stores, data dir, logs, policies).
        env: ``SIGNALBOX_*`` settings of the services (lower-case names, no prefix).
        cluster: Three clustered nodes instead of one server (R3 streams and buckets).
        sync_always: fsync every JetStream write.
    """

    def __init__(
        self,
        root: Path,
        *,
        env: Mapping[str, str] | None = None,
        cluster: bool = False,
        sync_always: bool = False,
    ) -> None:
        super().__init__(root)
        self.secrets = ServerSecrets.load_or_create(self.data_dir / "secrets")
        self.policy_dir = write_policies(root / "policies")
        self.cluster = cluster
        self.sync_always = sync_always
        wanted = {"policy_dir": str(self.policy_dir), "log_level": "INFO", **(env or {})}
        if cluster:
            wanted.setdefault("audit_replicas", "3")
        self.env = child_env(**wanted)
        self.servers: list[EmbeddedServer] = []
        self.monitor_ports: list[int] = []
        self.procs: list[ServiceProc] = []

    def start_server(self) -> None:
        """Start the server (or the three nodes, and wait for the cluster to be healthy)."""
        auth = auth_config(self.secrets, Subjects("sb"))
        if not self.cluster:
            server = EmbeddedServer(
                self.root / "nats", port=0, sync_always=self.sync_always, auth=auth
            )
            self.servers.append(server)
            self.url = server.start()
            return
        *routes, m1, m2, m3 = pick_ports(6)
        self.monitor_ports = [m1, m2, m3]
        listed = ", ".join(f'"nats-route://127.0.0.1:{p}"' for p in routes)
        for i in range(3):
            extra = (
                f'server_name: "chaos-{i + 1}"\n'
                f'http: "127.0.0.1:{self.monitor_ports[i]}"\n'
                f'cluster {{\n  name: "chaos"\n  listen: "127.0.0.1:{routes[i]}"\n'
                f"  routes: [{listed}]\n}}\n"
            )
            node = EmbeddedServer(
                self.root / f"nats-{i + 1}", port=0, sync_always=self.sync_always,
                auth=auth, extra_config=extra,
            )  # fmt: skip
            self.servers.append(node)
        self.url = ",".join(server.start() for server in self.servers)
        self.wait_cluster_healthy()

    def wait_cluster_healthy(self, timeout: float = 60.0) -> None:
        """Until every node has joined the JetStream meta group with a leader."""
        deadline = time.monotonic() + timeout
        while not all(_healthy(p) for p in self.monitor_ports):
            if time.monotonic() > deadline:
                raise RuntimeError(f"the cluster is not healthy after {timeout:g}s")
            time.sleep(0.1)

    async def start_services(self, counts: Mapping[str, int]) -> None:
        """Start ``counts[name]`` replicas of each service (in order: the tracing sequencer
        and the registry first, then the rest), each its own process."""
        first = [n for n in ("tracing", "registry") if counts.get(n)]
        rest = [n for n in counts if n not in first]
        for group in (first, rest):
            started = []
            for name in group:
                for replica in range(1, counts[name] + 1):
                    proc = ServiceProc(name, replica, self.url, self.data_dir, self.env)
                    proc.spawn()
                    self.procs.append(proc)
                    started.append(proc)
            await asyncio.gather(*(p.ready() for p in started))

    def service(self, name: str, replica: int = 1) -> ServiceProc:
        """The process of one replica."""
        return next(p for p in self.procs if p.name == name and p.replica == replica)

    async def stop_services(self, names: Iterable[str] | None = None) -> None:
        """SIGTERM (all at once), then wait for each."""
        chosen = [p for p in self.procs if names is None or p.name in set(names)]
        for proc in chosen:
            proc.terminate()
        await asyncio.gather(*(asyncio.to_thread(p.reap) for p in chosen))

    async def close(self) -> None:
        """Stop every service, then the server(s)."""
        await self.stop_services()
        for server in self.servers:
            await asyncio.to_thread(server.stop)


class UpProcess(Plane):
    """``signalbox up`` as a child process (embedded server on a free port, every service)."""

    def __init__(self, root: Path, *, env: Mapping[str, str] | None = None) -> None:
        super().__init__(root)
        self.policy_dir = write_policies(root / "policies")
        wanted = {"policy_dir": str(self.policy_dir), "log_level": "INFO", **(env or {})}
        self.env = child_env(**wanted)
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = root / "up.log"

    def spawn(self) -> None:
        """Start ``signalbox up --data-dir <root>/data --port 0``."""
        self.root.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", "from services.cli.main import app; app()", "up",
                 "--data-dir", str(self.data_dir), "--port", "0"],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=self.env,
                cwd=ROOT, start_new_session=True, preexec_fn=_die_with_parent,
            )  # fmt: skip

    def _ports(self) -> list[tuple[int, str]]:
        found = []
        for path in (self.data_dir / "nats").glob("nats-server_*.ports"):
            try:
                urls = json.loads(path.read_text())["nats"]
            except (ValueError, KeyError, OSError):
                continue
            if urls:
                found.append((int(path.stem.split("_")[1]), str(urls[0])))
        return found

    async def ready(self, timeout: float = 60.0) -> None:
        """Until every service started (the cost service starts last)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                break
            if b"cost service started" in self.log_path.read_bytes() and self._ports():
                self.url = self._ports()[0][1]
                return
            await asyncio.sleep(0.05)
        raise RuntimeError(f"signalbox up did not start; {self.log_path}:\n{_tail(self.log_path)}")

    def server_pid(self) -> int:
        """The embedded nats-server's pid now (0: none running)."""
        found = self._ports()
        return found[0][0] if found else 0

    async def server_restarted(self, old_pid: int, timeout: float = 30.0) -> None:
        """Until a server other than ``old_pid`` runs (the supervisor restarted it)."""
        deadline = time.monotonic() + timeout
        while self.server_pid() in (0, old_pid):
            if time.monotonic() > deadline:
                raise RuntimeError(f"no new server; {self.log_path}:\n{_tail(self.log_path)}")
            await asyncio.sleep(0.02)

    async def close(self) -> None:
        """SIGTERM, then wait (kill -9 after 30 s)."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.to_thread(proc.wait, 30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            await asyncio.to_thread(proc.wait, 5)
