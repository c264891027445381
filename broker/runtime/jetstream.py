"""Stream and KV bucket definitions, created idempotently.

``ensure_streams`` and ``ensure_buckets`` may run from every replica of every
service at every start: creating what exists is a no-op, and a definition that
changed (retention, replicas...) is updated in place.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from nats.js.api import (
    DiscardPolicy,
    KeyValueConfig,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import (
    BadRequestError,
    BucketNotFoundError,
    NotFoundError,
    ServerError,
    ServiceUnavailableError,
)
from nats.js.kv import KeyValue
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    RetryError,
    retry_if_exception_type,
    stop_after_delay,
    wait_exponential,
)

from broker.errors import JetStreamUnavailable
from broker.settings import Settings
from broker.subjects import USAGE_DUPLICATE_WINDOW, Subjects

__all__ = [
    "AUDIT_INTAKE_STREAM",
    "AUDIT_STREAM",
    "KV_AGENTS",
    "KV_APPROVALS",
    "KV_BREAKERS",
    "KV_BUDGETS",
    "KV_POLICIES",
    "KV_ROLLOUT_STATS",
    "KV_ROUTES",
    "SETTLING_ERRORS",
    "USAGE_STREAM",
    "approvals_bucket_config",
    "bucket_configs",
    "bucket_keys",
    "ensure_bucket",
    "ensure_buckets",
    "ensure_stream",
    "ensure_streams",
    "stream_configs",
    "while_jetstream_settles",
]

log = logging.getLogger(__name__)

AUDIT_STREAM = "SB_AUDIT"
AUDIT_INTAKE_STREAM = "SB_AUDIT_IN"
USAGE_STREAM = "SB_USAGE"
KV_AGENTS = "sb_agents"
#: Versioned policy sets (layout: :mod:`services.policy.store`).
KV_POLICIES = "sb_policies"
#: Human approval requests of parked calls (layout: :mod:`services.policy.approvals`).
KV_APPROVALS = "sb_approvals"
#: Budget definitions, key ``<scope>.<name>.<window>`` (:class:`schemas.Budget`);
#: the amounts spent and reserved live in the cost service's SQL store.
KV_BUDGETS = "sb_budgets"
#: Version routes per agent name (:class:`schemas.Route`, :mod:`services.policy.routes`).
KV_ROUTES = "sb_routes"
#: Policy replicas' recent per-version call outcomes (:class:`schemas.VersionStats`).
KV_ROLLOUT_STATS = "sb_rollout_stats"
#: Circuit breakers, key ``<scope>.<name>`` (:class:`schemas.Breaker`;
#: :mod:`broker.runtime.breakers`).
KV_BREAKERS = "sb_breakers"

_DAY = 86_400.0


def stream_configs(settings: Settings) -> list[StreamConfig]:
    """Every stream Signalbox uses, derived from settings."""
    subjects = Subjects(settings.subject_prefix)
    return [
        # Emitters publish here; the tracing service (the single sequencer)
        # moves each event into the hash chain and acks it. Work-queue
        # retention: once chained, the intake copy is gone.
        StreamConfig(
            name=AUDIT_INTAKE_STREAM,
            subjects=[subjects.audit_intake_all],
            retention=RetentionPolicy.WORK_QUEUE,
            storage=StorageType.FILE,
            num_replicas=settings.audit_replicas,
            duplicate_window=600.0,
            max_age=7 * _DAY,
            description="Audit events waiting to be chained by the tracing service",
        ),
        StreamConfig(
            name=AUDIT_STREAM,
            subjects=[subjects.audit_log_all],
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            num_replicas=settings.audit_replicas,
            duplicate_window=600.0,
            max_age=settings.audit_max_age_days * _DAY,
            discard=DiscardPolicy.OLD,
            deny_delete=True,
            # The sequencer writes each chained batch all-or-nothing (ADR-50).
            allow_atomic=True,
            description="Hash-chained audit trail (tamper-evident)",
        ),
        StreamConfig(
            name=USAGE_STREAM,
            subjects=[subjects.usage_all],
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            num_replicas=settings.audit_replicas,
            duplicate_window=USAGE_DUPLICATE_WINDOW,
            max_age=90 * _DAY,
            description="LLM and tool usage reports",
        ),
    ]


def bucket_configs(settings: Settings) -> list[KeyValueConfig]:
    """Every KV bucket Signalbox uses."""
    return [
        KeyValueConfig(
            bucket=KV_AGENTS,
            history=5,
            storage=StorageType.FILE,
            replicas=settings.audit_replicas,
            description="Registered agents (mirror of the registry)",
        ),
        KeyValueConfig(
            bucket=KV_POLICIES,
            # Every version is its own key (set.<n>), kept forever; the
            # history of the `active` pointer is kept too, for the record.
            history=64,
            storage=StorageType.FILE,
            replicas=settings.audit_replicas,
            description="Versioned Cedar policy sets and the active pointer",
        ),
        approvals_bucket_config(settings),
        KeyValueConfig(
            bucket=KV_BUDGETS,
            history=16,  # earlier limits stay readable, for the record
            storage=StorageType.FILE,
            replicas=settings.audit_replicas,
            description="Budget definitions (spend counters live in SQL)",
        ),
        KeyValueConfig(
            bucket=KV_ROUTES,
            history=16,  # earlier routes stay readable, for the record
            storage=StorageType.FILE,
            replicas=settings.audit_replicas,
            description="Version routes (canary weights) per agent name",
        ),
        KeyValueConfig(
            bucket=KV_ROLLOUT_STATS,
            history=1,
            # A replica that stopped publishing ages out.
            ttl=6 * 3600.0,
            storage=StorageType.MEMORY,
            replicas=settings.audit_replicas,
            description="Per-version call outcomes of each policy replica (rollout guards)",
        ),
        KeyValueConfig(
            bucket=KV_BREAKERS,
            history=16,  # recent transitions stay readable; the audit trail has them all
            storage=StorageType.FILE,
            replicas=settings.audit_replicas,
            description="Circuit breakers per agent and team (closed, open, half-open)",
        ),
    ]


def approvals_bucket_config(settings: Settings) -> KeyValueConfig:
    """The KV bucket of human approval requests."""
    return KeyValueConfig(
        bucket=KV_APPROVALS,
        # One key per request; each carries its own expiry (expires_at).
        # The bucket TTL only clears out old, decided requests.
        history=5,
        ttl=7 * _DAY,
        storage=StorageType.FILE,
        replicas=settings.audit_replicas,
        description="Human approval requests of parked calls",
    )


async def ensure_stream(js: JetStreamContext, config: StreamConfig) -> None:
    """Create ``config``'s stream, or update it if it exists with another config."""
    assert config.name
    try:
        info = await js.stream_info(config.name)
    except NotFoundError:
        try:
            await js.add_stream(config)
            log.info("created stream %s", config.name)
            return
        except BadRequestError:
            # Lost a creation race with another replica: fall through to compare.
            info = await js.stream_info(config.name)
    current = info.config
    wanted = {
        "subjects": config.subjects,
        "max_age": config.max_age,
        "num_replicas": config.num_replicas,
        "duplicate_window": config.duplicate_window,
        "allow_atomic": config.allow_atomic,
    }
    if any(getattr(current, k) != v for k, v in wanted.items()):
        await js.update_stream(config)
        log.info("updated stream %s", config.name)


async def ensure_bucket(js: JetStreamContext, config: KeyValueConfig) -> KeyValue:
    """Create ``config``'s KV bucket if missing and return it."""
    try:
        return await js.key_value(config.bucket)
    except BucketNotFoundError:
        try:
            return await js.create_key_value(config)
        except BadRequestError:
            return await js.key_value(config.bucket)


async def bucket_keys(js: JetStreamContext, bucket: str, prefix: str = "") -> list[str]:
    """Keys of ``bucket`` (starting with ``prefix``) that hold a message, sorted.

    One ``STREAM.INFO`` request with a subjects filter: the server's own
    answer. nats-py's ``KeyValue.keys()`` instead reads a watcher until it
    signals "caught up", which it can do before delivering anything under
    load, so a listing came back empty now and then (``policy history``
    showed no versions in a CI run). A deleted key still has its delete
    marker and may be listed: its ``get`` raises ``KeyNotFoundError``.
    """
    base = f"$KV.{bucket}."
    info = await js.stream_info(f"KV_{bucket}", subjects_filter=f"{base}{prefix}>")
    return sorted(subject[len(base) :] for subject in (info.state.subjects or {}))


#: What JetStream answers (or fails to) while it settles: a cluster that has just
#: formed or lost a node has no meta leader for a few seconds (requests time out or
#: find no responder), or no peers yet to place a replicated stream on (500/503).
#: Each of these passes on its own; anything else (a 400, a config the server
#: refuses) is a real error and is raised at once.
SETTLING_ERRORS: tuple[type[BaseException], ...] = (
    NatsTimeoutError,
    NoRespondersError,
    ServiceUnavailableError,
    ServerError,
)

_T = TypeVar("_T")


async def while_jetstream_settles(
    what: str, step: Callable[[], Awaitable[_T]], *, within: float
) -> _T:
    """Run ``step``, retrying it while JetStream settles, for at most ``within`` seconds.

    Services start in any order with the NATS servers (a Kubernetes rollout, a
    cluster that is electing its meta leader): a service that exits because
    its first ``STREAM.INFO`` timed out would make a supervisor restart it in a
    loop. ``step`` must be idempotent (``ensure_*`` are). After ``within``
    seconds the last error is raised as :class:`~broker.errors.JetStreamUnavailable`
    with what to check.
    """

    def _warn(state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        log.warning(
            "JetStream did not answer %s yet (%r, attempt %d); retrying for up to %gs",
            what, exc, state.attempt_number, within,
        )  # fmt: skip

    try:
        async for attempt in AsyncRetrying(
            retry=retry_if_exception_type(SETTLING_ERRORS),
            stop=stop_after_delay(within),
            wait=wait_exponential(multiplier=0.1, max=2.0),
            before_sleep=_warn,
        ):
            with attempt:
                return await step()
    except RetryError as exc:
        last = exc.last_attempt.exception()
        raise JetStreamUnavailable(
            f"JetStream did not answer {what} within {within:g}s ({last!r}); check that "
            "every NATS server runs with JetStream enabled and that a cluster has a meta "
            "leader (`nats server report jetstream`), or raise SIGNALBOX_CONNECT_TIMEOUT",
            details={"what": what, "error": repr(last)},
        ) from last
    raise AssertionError("unreachable: AsyncRetrying returns or raises")  # pragma: no cover


async def ensure_streams(
    js: JetStreamContext, settings: Settings, *, within: float | None = None
) -> None:
    """Create or update every Signalbox stream, waiting for JetStream to settle.

    ``within`` defaults to ``settings.connect_timeout``: the same bound a service
    gives the server to answer at all.
    """
    bound = settings.connect_timeout if within is None else within
    for config in stream_configs(settings):

        async def step(config: StreamConfig = config) -> None:
            await ensure_stream(js, config)

        await while_jetstream_settles(f"for stream {config.name}", step, within=bound)


async def ensure_buckets(
    js: JetStreamContext, settings: Settings, *, within: float | None = None
) -> dict[str, KeyValue]:
    """Create every Signalbox KV bucket, waiting for JetStream to settle; by name."""
    bound = settings.connect_timeout if within is None else within
    buckets: dict[str, KeyValue] = {}
    for config in bucket_configs(settings):

        async def step(config: KeyValueConfig = config) -> KeyValue:
            return await ensure_bucket(js, config)

        buckets[config.bucket] = await while_jetstream_settles(
            f"for bucket {config.bucket}", step, within=bound
        )
    return buckets
