"""NATS micro (service API, ADR-32) discovery answered on behalf of registered agents.

Existing NATS tooling (``nats micro ls|info|stats|ping``, nats.go's and
nats.py's micro packages) finds services by requesting ``$SRV.PING``,
``$SRV.INFO`` and ``$SRV.STATS``, optionally narrowed to
``$SRV.<VERB>.<name>`` and ``$SRV.<VERB>.<name>.<id>``, and collecting one
reply per service instance until a timeout.

Agents do not answer these themselves: their credentials may only subscribe
to ``sb.in.<self>.>`` and their inbox, never ``$SRV.>``. The registry answers
for them instead, publishing one reply per running agent instance (or one per
registered version that has no live instance), exactly as each instance of a
micro service would. Registry replicas share the queue group
:data:`QUEUE_GROUP`, so each request is answered by one replica only and no
agent is listed twice.

Wiring into a service::

    self.micro = MicroResponder(self.nc, self.micro_view)   # on start
    await self.micro.start()
    ...
    await self.micro.stop()                                  # on stop

where ``micro_view`` is an ``async`` callable returning
``instances_from_records(records, instances, self.subjects)``.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from broker.connection import sync_connection
from broker.subjects import Subjects
from schemas import AgentInstance, AgentRecord

__all__ = [
    "API_PREFIX",
    "INFO_RESPONSE_TYPE",
    "PING_RESPONSE_TYPE",
    "QUEUE_GROUP",
    "STATS_RESPONSE_TYPE",
    "MicroEndpoint",
    "MicroInstance",
    "MicroResponder",
    "encode_info",
    "encode_ping",
    "encode_stats",
    "instances_from_records",
    "rfc3339",
    "stable_id",
]

log = logging.getLogger(__name__)

#: Root of the micro control subjects.
API_PREFIX = "$SRV"
#: Shared by every registry replica, so one replica answers each request.
QUEUE_GROUP = "sb-registry-micro"
PING_RESPONSE_TYPE = "io.nats.micro.v1.ping_response"
INFO_RESPONSE_TYPE = "io.nats.micro.v1.info_response"
STATS_RESPONSE_TYPE = "io.nats.micro.v1.stats_response"

_VERBS = frozenset({"PING", "INFO", "STATS"})

#: The semver.org pattern micro clients validate ``version`` against. Signalbox's
#: manifest pattern is looser (it accepts ``01.2.3``); the nats CLI rejects a
#: whole listing if one reply fails validation, so such versions are left out.
_MICRO_SEMVER = re.compile(
    r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)"
    r"(?:-((?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*)(?:\.(?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*))*))?"
    r"(?:\+([0-9a-zA-Z-]+(?:\.[0-9a-zA-Z-]+)*))?\Z"
)

#: Length of the id given to a registered version with no running instance
#: (the length of a NUID, which is what micro services use as ids).
_STABLE_ID_LEN = 22


@dataclass(frozen=True, slots=True)
class MicroEndpoint:
    """One endpoint as the micro protocol describes it: an agent capability.

    Attributes:
        name: Endpoint name (the capability name).
        subject: Subject the endpoint listens on (``sb.in.<agent>.<capability>``).
        queue_group: Queue group of the listeners (``agent-<name>``).
        metadata: Free string metadata (capability tags, description).
    """

    name: str
    subject: str
    queue_group: str
    metadata: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class MicroInstance:
    """One micro service instance: a running agent instance, or a registered version.

    Counters are per instance (Signalbox does not count per capability).

    Attributes:
        name: Service name (the agent name).
        id: Instance id, unique among instances of ``name``.
        version: Agent version (semver).
        description: Agent description.
        metadata: Service metadata (team, owner, region, project...).
        endpoints: One per capability.
        started: Unix time the instance started.
        requests: Requests handled.
        errors: Requests that failed.
        processing_time_ns: Total handling time in nanoseconds.
        last_error: Text of the latest error.
    """

    name: str
    id: str
    version: str
    description: str
    metadata: dict[str, str]
    endpoints: tuple[MicroEndpoint, ...]
    started: float
    requests: int = 0
    errors: int = 0
    processing_time_ns: int = 0
    last_error: str = ""


# -- wire format ---------------------------------------------------------------------------
# Field names and types follow nats.go's micro package (the reference implementation)
# and the io.nats.micro.v1 JSON schemas the nats CLI validates replies against:
# metadata is always an object (the ping schema rejects null), every endpoint of a
# stats reply carries a ``data`` object (nats.py's parser requires the key, the schema
# requires an object when present), durations are integer nanoseconds.


class _Ping(msgspec.Struct, frozen=True, tag_field="type", tag=PING_RESPONSE_TYPE):
    name: str
    id: str
    version: str
    metadata: dict[str, str]


class _EndpointInfo(msgspec.Struct, frozen=True):
    name: str
    subject: str
    queue_group: str
    metadata: dict[str, str]


class _Info(msgspec.Struct, frozen=True, tag_field="type", tag=INFO_RESPONSE_TYPE):
    name: str
    id: str
    version: str
    metadata: dict[str, str]
    description: str
    endpoints: list[_EndpointInfo]


class _EndpointStats(msgspec.Struct, frozen=True):
    name: str
    subject: str
    queue_group: str
    num_requests: int
    num_errors: int
    last_error: str
    processing_time: int
    average_processing_time: int
    data: dict[str, Any]


class _Stats(msgspec.Struct, frozen=True, tag_field="type", tag=STATS_RESPONSE_TYPE):
    name: str
    id: str
    version: str
    metadata: dict[str, str]
    started: str
    endpoints: list[_EndpointStats]


_encoder = msgspec.json.Encoder()


def rfc3339(ts: float) -> str:
    """Unix time as RFC 3339 in UTC with microseconds (``2024-05-01T12:00:00.123456Z``).

    Exactly six fractional digits: Go's ``time.Time`` accepts any RFC 3339
    fraction, while nats.py's ``ServiceStats.from_dict`` parses ``%S.%fZ``,
    which needs a fraction of at most six digits.
    """
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def stable_id(name: str, version: str) -> str:
    """Id of a registered version with no running instance: same answer on every replica."""
    return hashlib.sha256(f"{name}\x00{version}".encode()).hexdigest()[:_STABLE_ID_LEN]


def encode_ping(inst: MicroInstance) -> bytes:
    """The ``io.nats.micro.v1.ping_response`` of one instance."""
    return _encoder.encode(
        _Ping(name=inst.name, id=inst.id, version=inst.version, metadata=inst.metadata)
    )


def encode_info(inst: MicroInstance) -> bytes:
    """The ``io.nats.micro.v1.info_response`` of one instance."""
    return _encoder.encode(
        _Info(
            name=inst.name,
            id=inst.id,
            version=inst.version,
            metadata=inst.metadata,
            description=inst.description,
            endpoints=[
                _EndpointInfo(
                    name=e.name, subject=e.subject, queue_group=e.queue_group, metadata=e.metadata
                )
                for e in inst.endpoints
            ],
        )
    )


def encode_stats(inst: MicroInstance) -> bytes:
    """The ``io.nats.micro.v1.stats_response`` of one instance.

    The protocol counts per endpoint, Signalbox per instance: the instance's
    totals go on its first endpoint (flagged ``data: {"scope": "instance"}``)
    and the others report zero, so sums over endpoints, which is what
    ``nats micro stats`` totals, stay right.
    """
    endpoints: list[_EndpointStats] = []
    for i, e in enumerate(inst.endpoints):
        first = i == 0
        requests = inst.requests if first else 0
        errors = inst.errors if first else 0
        total_ns = inst.processing_time_ns if first else 0
        endpoints.append(
            _EndpointStats(
                name=e.name,
                subject=e.subject,
                queue_group=e.queue_group,
                num_requests=requests,
                num_errors=errors,
                last_error=inst.last_error if first else "",
                processing_time=total_ns,
                # As nats.go computes it: total time over handled requests.
                average_processing_time=total_ns // requests if requests else 0,
                data={"scope": "instance"} if first else {},
            )
        )
    return _encoder.encode(
        _Stats(
            name=inst.name,
            id=inst.id,
            version=inst.version,
            metadata=inst.metadata,
            started=rfc3339(inst.started),
            endpoints=endpoints,
        )
    )


_ENCODERS: dict[str, Callable[[MicroInstance], bytes]] = {
    "PING": encode_ping,
    "INFO": encode_info,
    "STATS": encode_stats,
}


# -- the view ------------------------------------------------------------------------------


def instances_from_records(
    records: Sequence[AgentRecord],
    instances: Sequence[AgentInstance],
    subjects: Subjects,
) -> list[MicroInstance]:
    """The micro view of the registry: what ``$SRV.PING`` and friends list.

    Every active agent version is one micro service (name = agent name,
    version = agent version); each capability is an endpoint on
    ``sb.in.<agent>.<capability>`` in queue group ``agent-<name>`` (what the
    SDK subscribes with). A version with live instances yields one
    :class:`MicroInstance` per instance, with that instance's id and
    counters; a version with none yields one with a stable id derived from
    name and version, and zero counters, so registered-but-idle agents are
    still visible.

    Versions that are not strict semver (``01.2.3``) are left out: micro
    clients reject them, and the nats CLI drops a whole listing over one.

    Args:
        records: Registered agent versions (deregistered ones are skipped).
        instances: Live instances; those of an unregistered version are skipped.
        subjects: Builds the capability subjects under the configured prefix.

    Returns:
        Instances ordered by agent name, then version, then id.
    """
    by_version: dict[tuple[str, str], list[AgentInstance]] = {}
    for inst in instances:
        by_version.setdefault((inst.name, inst.version), []).append(inst)

    out: list[MicroInstance] = []
    seen: set[tuple[str, str]] = set()
    for record in records:
        m = record.manifest
        key = (m.name, m.version)
        if record.status != "active" or key in seen:
            continue
        seen.add(key)
        if not _MICRO_SEMVER.match(m.version):
            log.debug("micro view: %s %s is not strict semver; not listed", m.name, m.version)
            continue
        metadata = {
            **m.metadata,
            # Signalbox's own fields win over free metadata of the same name.
            "team": m.team,
            "owner": m.owner,
            "region": m.region,
            "project": m.project,
        }
        queue_group = f"agent-{m.name}"
        endpoints = tuple(
            MicroEndpoint(
                name=cap.name,
                subject=subjects.inbound(m.name, cap.name),
                queue_group=queue_group,
                metadata={"tags": ",".join(cap.tags), "description": cap.description},
            )
            for cap in m.capabilities
        )
        live = sorted(by_version.get(key, ()), key=lambda i: i.instance)
        if not live:
            out.append(
                MicroInstance(
                    name=m.name,
                    id=stable_id(m.name, m.version),
                    version=m.version,
                    description=m.description,
                    metadata=metadata,
                    endpoints=endpoints,
                    started=record.registered_at,
                )
            )
            continue
        for inst in live:
            s = inst.stats
            out.append(
                MicroInstance(
                    name=m.name,
                    id=inst.instance,
                    version=m.version,
                    description=m.description,
                    metadata=metadata,
                    endpoints=endpoints,
                    # An instance that has not reported a start time: its first
                    # sign of life is the best estimate.
                    started=s.started or inst.last_heartbeat or record.registered_at,
                    requests=s.requests,
                    errors=s.errors,
                    processing_time_ns=s.processing_time_ns,
                    last_error=s.last_error,
                )
            )
    out.sort(key=lambda i: (i.name, i.version, i.id))
    return out


# -- the responder -------------------------------------------------------------------------


class MicroResponder:
    """Answers ``$SRV.PING|INFO|STATS[.<name>[.<id>]]`` for the instances ``source`` lists.

    One queue subscription on ``$SRV.>`` (group :data:`QUEUE_GROUP`); each
    request is answered with one reply message per matching instance. An
    unknown name or id gets no reply at all, as with micro services
    themselves. Requests with another verb, too many tokens or no reply
    subject are dropped and counted in :attr:`ignored`.

    Args:
        nc: Connected client (the registry's own connection).
        source: Returns the current view, usually via :func:`instances_from_records`.
        source_timeout: Seconds to wait for ``source``; on timeout nothing is answered.
        refuse: Called with each request before any work; returns True if it was
            refused (e.g. its reply subject is outside the sender's reply space),
            and then nothing is answered.
    """

    def __init__(
        self,
        nc: Client,
        source: Callable[[], Awaitable[Sequence[MicroInstance]]],
        *,
        source_timeout: float = 5.0,
        refuse: Callable[[Msg], bool] | None = None,
    ) -> None:
        self.nc = nc
        self.source = source
        self.source_timeout = source_timeout
        self.refuse = refuse
        #: Requests dropped as malformed (unknown verb, too many tokens, no reply subject).
        self.ignored = 0
        #: Requests answered (with zero or more replies).
        self.handled = 0
        #: Requests for which ``source`` failed (nothing was answered).
        self.failed = 0
        self._sub: Subscription | None = None

    async def start(self) -> None:
        """Subscribe; idempotent. The subscription is live on the server on return."""
        if self._sub is not None:
            return
        self._sub = await self.nc.subscribe(
            f"{API_PREFIX}.>", queue=QUEUE_GROUP, cb=self._on_request
        )
        await sync_connection(self.nc)

    async def stop(self) -> None:
        """Unsubscribe, letting a request already being answered finish."""
        sub, self._sub = self._sub, None
        if sub is None:
            return
        try:
            await sub.drain()  # type: ignore[no-untyped-call]  # untyped in nats-py
        except Exception as exc:  # the connection may already be closed or draining
            log.debug("micro responder: drain failed: %r", exc)

    @staticmethod
    def parse(subject: str) -> tuple[str, str | None, str | None] | None:
        """``$SRV.<VERB>[.<name>[.<id>]]`` -> ``(verb, name, id)``; None if malformed."""
        tokens = subject.split(".")
        if len(tokens) < 2 or len(tokens) > 4 or tokens[0] != API_PREFIX:
            return None
        verb = tokens[1]
        if verb not in _VERBS:
            return None
        name = tokens[2] if len(tokens) > 2 else None
        inst_id = tokens[3] if len(tokens) > 3 else None
        return verb, name, inst_id

    async def answer(self, verb: str, name: str | None, inst_id: str | None) -> list[bytes]:
        """The reply bodies for one request (empty when nothing matches or ``source`` fails)."""
        try:
            async with asyncio.timeout(self.source_timeout):
                view = await self.source()
            encode = _ENCODERS[verb]
            return [
                encode(inst)
                for inst in view
                if (name is None or inst.name == name) and (inst_id is None or inst.id == inst_id)
            ]
        except Exception:
            # A broken view must not kill the subscription: answer nothing, so the
            # requester sees what it would see with no services, and keep serving.
            self.failed += 1
            log.exception("micro responder: cannot build the view for $SRV.%s", verb)
            return []

    async def _on_request(self, msg: Msg) -> None:
        parsed = self.parse(msg.subject)
        if parsed is None or not msg.reply:
            self.ignored += 1
            return
        if self.refuse is not None and self.refuse(msg):
            return
        bodies = await self.answer(*parsed)
        for body in bodies:
            await self.nc.publish(msg.reply, body)
        self.handled += 1
