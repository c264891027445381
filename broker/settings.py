"""Signalbox settings: the only place configuration is read (``SIGNALBOX_`` env vars).

Build a :class:`Settings` once at the entry point (CLI, ``python -m services.x``,
tests) and pass it down; nothing reads the environment at import time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
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
        default=30.0, gt=0, description="Seconds a service waits for NATS at start before failing."
    )
    server_start_timeout: float = Field(
        default=15.0, gt=0, description="Seconds to wait for the embedded server to be ready."
    )
    max_call_bytes: int = Field(
        default=256 * 1024,
        gt=0,
        description="Largest call payload policy forwards; larger gets payload_too_large.",
    )
    call_timeout: float = Field(
        default=10.0, gt=0, description="Default and maximum seconds a mediated call may take."
    )
    allowlist_path: Path | None = Field(
        default=None,
        description="Allow-list file (YAML) for call decisions; unset: <data_dir>/allowlist.yaml.",
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
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        default="INFO", description="Log level of services."
    )

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
    def resolved_allowlist_path(self) -> Path:
        """The allow-list file actually used."""
        return self.allowlist_path or self.data_dir / "allowlist.yaml"

    @property
    def resolved_database_url(self) -> str:
        """The SQL store URL actually used."""
        return self.database_url or f"sqlite:///{(self.data_dir / 'signalbox.db').resolve()}"
