"""Signalbox settings: the only place configuration is read (``SIGNALBOX_`` env vars).

Build a :class:`Settings` once at the entry point (CLI, ``python -m services.x``,
tests) and pass it down; nothing reads the environment at import time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["Settings"]


class Settings(BaseSettings):
    """Every ``SIGNALBOX_*`` setting.

    Example:
        ``Settings(nats_url="nats://10.0.0.5:4222")`` or ``SIGNALBOX_NATS_URL=...``.
    """

    model_config = SettingsConfigDict(env_prefix="SIGNALBOX_", extra="ignore", frozen=True)

    nats_url: str | None = Field(
        default=None,
        description="NATS URL(s), comma-separated; unset: `signalbox up` embeds a server.",
    )
    data_dir: Path = Field(
        default=Path(".signalbox"),
        description="Where the embedded server keeps JetStream data, plus config and files.",
    )
    subject_prefix: str = Field(default="sb", description="First token of every Signalbox subject.")
    database_url: str | None = Field(
        default=None,
        description="SQL store URL; unset means SQLite at <data_dir>/signalbox.db.",
    )
    prices_path: Path | None = Field(
        default=None,
        description="TOML file of model prices merged over the shipped defaults "
        "(services/cost/prices.toml); unset: the shipped prices only.",
    )
    nats_host: str = Field(default="127.0.0.1", description="Embedded server listen address.")
    nats_port: int = Field(
        default=4222,
        ge=-1,
        le=65535,
        description="Embedded server port (0 or -1: pick a free one).",
    )
    nats_sync_always: bool = Field(
        default=True,
        description="fsync every JetStream write (sync_interval: always) in generated configs.",
    )
    nats_max_payload: int = Field(
        default=1024 * 1024, gt=0, description="Server max_payload in bytes (embedded server)."
    )
    connect_timeout: float = Field(
        default=30.0,
        gt=0,
        description="Seconds a service waits at start for NATS to answer, and then for "
        "JetStream to settle (a cluster electing its meta leader), before failing.",
    )
    server_start_timeout: float = Field(
        default=15.0, gt=0, description="Seconds to wait for the embedded server to be ready."
    )
    server_restart_attempts: int = Field(
        default=5,
        ge=0,
        description="Restarts of a dead embedded nats-server (same store, same port) within "
        "server_restart_window seconds; one more death and `signalbox up` exits non-zero so a "
        "process supervisor acts (0: exit at the first death).",
    )
    server_restart_window: float = Field(
        default=600.0, gt=0, description="Seconds over which server_restart_attempts count."
    )
    refusal_summary_window: float = Field(
        default=10.0,
        gt=0,
        description="Seconds over which a service summarizes refused requests (a reply "
        "subject outside the sender's reply space, unreadable subjects or headers) per sender "
        "and reason: the first is audited at once, the rest as one record with their count, "
        "so a flood cannot fill the audit trail.",
    )
    shutdown_timeout: float = Field(
        default=15.0,
        gt=0,
        description="Longest seconds one service may take to stop; after that it is abandoned "
        "(and the place it was stuck is logged) so shutdown always ends.",
    )
    max_call_bytes: int = Field(
        default=256 * 1024,
        gt=0,
        description="Largest call payload policy forwards; larger gets payload_too_large.",
    )
    call_timeout: float = Field(
        default=10.0, gt=0, description="Default and maximum seconds a mediated call may take."
    )
    approval_timeout: float = Field(
        default=300.0,
        gt=0,
        description="Longest seconds a call needing human approval stays parked (it also "
        "waits no longer than its caller's timeout); no decision by then: approval_expired.",
    )
    policy_dir: Path | None = Field(
        default=None,
        description="Cedar policy folder (schema.cedarschema, *.cedar) the policy service "
        "loads; unset: the policies shipped with Signalbox.",
    )
    audit_max_age_days: float = Field(
        default=365.0, gt=0, description="Retention of the SB_AUDIT stream, in days."
    )
    audit_replicas: int = Field(
        default=1, ge=1, le=5, description="JetStream replicas of SB_AUDIT (3 on a cluster)."
    )
    heartbeat_interval: float = Field(
        default=5.0, gt=0, description="Seconds between agent heartbeats (SDK default)."
    )
    heartbeat_stale_missed: int = Field(
        default=3, ge=1, description="Missed heartbeats after which an agent is stale."
    )
    heartbeat_down_missed: int = Field(
        default=6, ge=1, description="Missed heartbeats after which an agent is down."
    )
    heartbeat_flush_interval: float = Field(
        default=1.0,
        gt=0,
        description="Seconds between the registry's batched writes of heartbeats to the SQL "
        "store (answered from memory at once; written and shared with replicas per batch).",
    )
    budget_reservation_ttl: float = Field(
        default=600.0,
        gt=0,
        description="Seconds a budget reservation of an authorized model call is held; "
        "unsettled by a usage report by then, it is released.",
    )
    budget_reserve_timeout: float = Field(
        default=2.0,
        gt=0,
        description="Seconds the policy service waits for the cost service to reserve a "
        "model call's budget; no answer means deny (budget_unavailable).",
    )
    budget_reservation_max_lifetime: float = Field(
        default=3600.0,
        gt=0,
        description="Longest seconds a budget reservation lives, however often the model call "
        "holding it renews it (each renewal: at most budget_reservation_ttl from now), so a "
        "stuck agent cannot hold budget forever.",
    )
    default_token_estimate: int = Field(
        default=1000,
        gt=0,
        le=10**12,
        description="Tokens a call or model/tool use is assumed to need when it carries no "
        "estimate (for a call, at least its payload in tokens, 4 bytes each); policies see it "
        "as context.estimated_tokens, with context.estimated_tokens_known false.",
    )
    breaker_rate_factor: float = Field(
        default=10.0,
        gt=1,
        description="A call-rate anomaly trips an agent's breaker when its rate over the short "
        "window is at least this many times its trailing baseline.",
    )
    breaker_rate_window: float = Field(
        default=10.0, gt=0, description="Seconds of the short window of the call-rate detector."
    )
    breaker_rate_baseline: float = Field(
        default=600.0,
        gt=0,
        description="Seconds of the trailing baseline of the call-rate detector (must exceed "
        "the short window).",
    )
    breaker_rate_min: float = Field(
        default=5.0,
        ge=0,
        description="Calls per second (per policy replica) below which no rate anomaly trips.",
    )
    breaker_rate_min_history: float = Field(
        default=120.0,
        ge=0,
        description="Seconds a policy replica must have seen an agent before its rate can trip "
        "(a cold start has no baseline).",
    )
    breaker_error_rate: float = Field(
        default=0.5,
        gt=0,
        lt=1,
        description="Share of a target's calls failing on its side above which its breaker trips.",
    )
    breaker_error_window: float = Field(
        default=60.0, gt=0, description="Seconds of call outcomes the error-rate detector weighs."
    )
    breaker_error_min_calls: int = Field(
        default=20,
        ge=1,
        description="Calls to a target (per policy replica and window) before its error rate "
        "can trip.",
    )
    write_ahead: bool = Field(
        default=True,
        description="Forward a call (and answer an allowed model use) only after its decision "
        "record is stored in JetStream: no call runs without a durable decision. Off: the "
        "record is batched and may be lost if the policy service dies (measured cost in "
        "bench/calls.py).",
    )
    write_ahead_timeout: float = Field(
        default=2.0,
        gt=0,
        description="Longest a call waits for its decision record to be stored before it is "
        "refused unrun (audit_unavailable); also capped by the call's own deadline.",
    )
    breaker_min_timeout: float = Field(
        default=5.0,
        gt=0,
        description="A timeout counts against the target's error rate only when the caller "
        "allowed at least this many seconds (or SIGNALBOX_CALL_TIMEOUT, if lower): a caller's "
        "own short deadline is not the target's failure.",
    )
    breaker_cooldown: float = Field(
        default=30.0,
        gt=0,
        description="Seconds an automatically tripped breaker stays open before one probe call "
        "may pass.",
    )
    breaker_cooldown_max: float = Field(
        default=600.0,
        gt=0,
        description="Cap of a breaker's cool-down, which doubles after each failed probe.",
    )
    breaker_loop_max_depth: int = Field(
        default=16, ge=1, description="Most hops a call chain may have (deeper: call_loop)."
    )
    breaker_loop_max_visits: int = Field(
        default=3,
        ge=1,
        description="Most times one agent may appear in a call chain (more: call_loop).",
    )
    unrouted_versions: Literal["established", "any"] = Field(
        default="established",
        description="Where a call with no route and no pin goes when its target has several "
        "registered versions: `established` (the first registered; a new version takes no "
        "traffic until `signalbox rollout set` routes to it) or `any` (any instance).",
    )
    rollout_guard_interval: float = Field(
        default=1.0,
        gt=0,
        description="Seconds between a policy replica's publications of its per-version call "
        "figures and its checks of canary guards.",
    )
    rollout_stats_slot: float = Field(
        default=5.0,
        gt=0,
        description="Seconds per slot of the per-version call figures (windows are slot-aligned; "
        "72 slots are kept).",
    )
    secrets_dir: Path | None = Field(
        default=None,
        description="Secrets of the deployment (issuer key, static users' passwords, 0600 files); "
        "unset: <data_dir>/secrets, generated by `signalbox up` on first start.",
    )
    nats_user: str | None = Field(
        default=None,
        description="NATS user of services and the CLI; unset: the role's user and its "
        "password file in the secrets dir.",
    )
    nats_password: SecretStr | None = Field(
        default=None, description="Password of SIGNALBOX_NATS_USER."
    )
    agent_credential: SecretStr | None = Field(
        default=None,
        description="An agent's credential (from `signalbox agents enroll`), used by the SDK.",
    )
    operator_credential: SecretStr | None = Field(
        default=None,
        description="A named operator's credential (from `signalbox operators add`), used by "
        "the CLI instead of the shared bootstrap operator.",
    )
    operator_credential_ttl: float = Field(
        default=90 * 86400.0,
        gt=0,
        description="Default lifetime (s) of an operator credential.",
    )
    agent_credential_ttl: float = Field(
        default=7 * 86400.0,
        gt=0,
        description="Default lifetime in seconds of an enrolled agent credential.",
    )
    auth_session_ttl: float = Field(
        default=900.0,
        gt=0,
        description="Lifetime in seconds of the user JWT the server gets for an agent "
        "connection; at expiry the client reconnects and its credential is checked again.",
    )
    auth_fail_burst: int = Field(
        default=10,
        ge=1,
        description="Failed agent authentications from one source (an address, or an address "
        "and a credential id) within SIGNALBOX_AUTH_FAIL_WINDOW after which the auth callout "
        "refuses that source at once, without checking, for a window (doubling per repeat).",
    )
    auth_fail_window: float = Field(
        default=60.0,
        gt=0,
        description="Seconds of the auth callout's failure window: failures are counted per "
        "source in it, a source's first block lasts it, and each source's failures are audited "
        "as its first one plus one summary per window.",
    )
    auth_fail_backoff_max: float = Field(
        default=600.0,
        gt=0,
        description="Longest seconds the auth callout refuses a source without checking (the "
        "block doubles each time the source is blocked again).",
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        default="INFO", description="Log level of services."
    )
    # -- OpenTelemetry traces (broker.telemetry) ------------------------------------------
    otel_exporter: Literal["none", "console", "otlp"] = Field(
        default="none",
        description="Where spans go: none (trace ids are still made and propagated, nothing "
        "is recorded), console (stdout), otlp (SIGNALBOX_OTEL_ENDPOINT).",
    )
    otel_protocol: Literal["http/protobuf", "grpc"] = Field(
        default="http/protobuf", description="OTLP protocol of SIGNALBOX_OTEL_ENDPOINT."
    )
    otel_endpoint: str | None = Field(
        default=None,
        validate_default=True,
        description="OTLP collector URL (http://host:4318 for http/protobuf, /v1/traces "
        "appended when the URL has no path; http://host:4317 for grpc); required for otlp.",
    )
    otel_service_name: str = Field(
        default="signalbox", min_length=1, description="service.name of exported spans."
    )

    @field_validator("otel_endpoint")
    @classmethod
    def _otlp_has_endpoint(cls, value: str | None, info: ValidationInfo) -> str | None:
        if info.data.get("otel_exporter") == "otlp" and not (value or "").strip():
            raise ValueError(
                "SIGNALBOX_OTEL_EXPORTER=otlp needs the collector's URL in "
                "SIGNALBOX_OTEL_ENDPOINT (e.g. http://127.0.0.1:4318)"
            )
        return value

    @field_validator("subject_prefix")
    @classmethod
    def _prefix_is_token(cls, value: str) -> str:
        from broker.subjects import validate_token

        return validate_token(value, what="subject prefix")

    @property
    def stale_after(self) -> float:
        """Seconds without a heartbeat after which an agent is stale."""
        return self.heartbeat_interval * self.heartbeat_stale_missed

    @property
    def down_after(self) -> float:
        """Seconds without a heartbeat after which an agent is down."""
        return self.heartbeat_interval * max(
            self.heartbeat_down_missed, self.heartbeat_stale_missed
        )

    @property
    def resolved_database_url(self) -> str:
        """The SQL store URL actually used."""
        return self.database_url or f"sqlite:///{(self.data_dir / 'signalbox.db').resolve()}"
