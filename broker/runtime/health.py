"""Service health: one report per replica, over NATS and in a file for probes.

Every service replica answers ``sb.admin.<service>.status`` (all replicas,
no queue group: ``signalbox status`` gathers them) with a
:class:`~schemas.ServiceHealth`: connected, ready, audit events waiting and
when JetStream last stored one, each JetStream consumer's lag, and the
problems that make it not ready, each saying what to do.

The same report is written every :data:`INTERVAL` seconds to
``<data dir>/health/<service>.json`` so a container orchestrator can probe
the process without network or credentials (``signalbox probe``: alive =
a fresh report from a live process; ready = also ``ready``). A clean stop
removes the file.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import Sequence
from pathlib import Path

import msgspec

from broker.runtime.audit import AuditEmitter
from broker.runtime.consumer import PullWorker
from schemas import ConsumerHealth, ServiceHealth

__all__ = [
    "AUDIT_STUCK",
    "INTERVAL",
    "LAG_LIMIT",
    "STALE_AFTER",
    "build_health",
    "health_path",
    "probe",
    "read_health",
    "remove_health",
    "write_health",
]

#: Seconds between two reports written to the health file.
INTERVAL = 2.0
#: A health file older than this: the process is hung or gone.
STALE_AFTER = 10.0
#: Audit events waiting with no acknowledgement for this long: not ready.
AUDIT_STUCK = 30.0
#: Messages a consumer may lag behind before its service is not ready.
LAG_LIMIT = 100_000

_HOST = socket.gethostname()


def health_path(data_dir: Path, service: str) -> Path:
    """Where ``service`` writes its health report."""
    return data_dir / "health" / f"{service}.json"


async def build_health(
    service: str,
    *,
    instance: str,
    started_at: float,
    connected: bool,
    started: bool,
    audit: AuditEmitter | None,
    workers: Sequence[PullWorker] = (),
    problems: Sequence[str] = (),
    rejected: int = 0,
) -> ServiceHealth:
    """One replica's report; ``problems`` are the service's own (not ready if any)."""
    found = list(problems)
    now = time.time()
    if not connected:
        found.append("not connected to NATS; it reconnects by itself (check the server)")
    if not started:
        found.append("not started (starting or stopping)")
    pending = audit.pending if audit is not None else 0
    last_ack = audit.last_ack if audit is not None else 0.0
    if pending and last_ack and now - last_ack > AUDIT_STUCK:
        found.append(
            f"{pending} audit events not stored for {now - last_ack:.0f}s "
            "(is JetStream up? `signalbox status` on the server)"
        )
    consumers: list[ConsumerHealth] = []
    for worker in workers:
        try:
            lag = await worker.health()
        except Exception as exc:  # the server did not answer: part of the report
            found.append(f"consumer {worker.durable}: no information ({type(exc).__name__})")
            continue
        consumers.append(lag)
        if lag.pending > LAG_LIMIT:
            found.append(
                f"consumer {worker.durable} is {lag.pending:,} messages behind "
                f"{worker.stream}; add replicas or check the database"
            )
    return ServiceHealth(
        service=service, instance=instance, host=_HOST, pid=os.getpid(),
        started_at=started_at, time=now, connected=connected, ready=not found,
        problems=tuple(found), audit_pending=pending, audit_last_ack=last_ack,
        consumers=tuple(consumers), rejected=rejected,
    )  # fmt: skip


def write_health(path: Path, health: ServiceHealth) -> None:
    """Replace the health file atomically (a probe never reads half a report)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(msgspec.json.encode(health))
    os.replace(tmp, path)


def remove_health(path: Path, instance: str) -> None:
    """Remove the health file if it is still this instance's (a clean stop)."""
    with contextlib.suppress(OSError, msgspec.DecodeError):
        if read_health(path).instance == instance:
            path.unlink()


def read_health(path: Path) -> ServiceHealth:
    """The report in ``path``.

    Raises:
        OSError: no such file.
        msgspec.DecodeError: not a report.
    """
    return msgspec.json.decode(path.read_bytes(), type=ServiceHealth)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process: it exists
    return True


def probe(path: Path, *, ready: bool, now: float | None = None) -> tuple[bool, str]:
    """Liveness (``ready=False``) or readiness of the service whose report is ``path``.

    Returns:
        Whether it passes, and one line saying why.
    """
    now = time.time() if now is None else now
    try:
        health = read_health(path)
    except OSError:
        return False, f"no health report at {path} (not started, or stopped)"
    except msgspec.DecodeError as exc:
        return False, f"unreadable health report at {path}: {exc}"
    age = now - health.time
    if age > STALE_AFTER:
        return False, f"{health.service}: last report {age:.0f}s old (hung or gone)"
    if not _alive(health.pid):
        return False, f"{health.service}: process {health.pid} is gone"
    if ready and not health.ready:
        return False, f"{health.service}: not ready: " + "; ".join(health.problems)
    return True, f"{health.service}: {'ready' if health.ready else 'alive, not ready'}"
