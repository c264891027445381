"""Settings come from arguments or SIGNALBOX_ env vars, validated, never at import time."""

from __future__ import annotations

from pathlib import Path

import pydantic
import pytest

from broker.settings import Settings


def test_defaults_describe_an_embedded_local_setup() -> None:
    s = Settings()
    assert s.nats_url is None
    assert s.subject_prefix == "sb"
    assert s.nats_sync_always is True
    assert s.policy_dir is None  # the default set (permits nothing)
    assert s.resolved_database_url.startswith("sqlite:///")
    assert s.resolved_database_url.endswith("signalbox.db")


def test_signalbox_env_vars_are_read(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SIGNALBOX_NATS_URL", "nats://10.0.0.5:4222,nats://10.0.0.6:4222")
    monkeypatch.setenv("SIGNALBOX_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("SIGNALBOX_SUBJECT_PREFIX", "acme")
    monkeypatch.setenv("SIGNALBOX_CALL_TIMEOUT", "2.5")
    monkeypatch.setenv("SIGNALBOX_MAX_CALL_BYTES", "1024")
    monkeypatch.setenv("SIGNALBOX_NATS_SYNC_ALWAYS", "false")
    monkeypatch.setenv("SIGNALBOX_LOG_LEVEL", "DEBUG")
    s = Settings()
    assert s.nats_url == "nats://10.0.0.5:4222,nats://10.0.0.6:4222"
    assert s.data_dir == tmp_path
    assert s.subject_prefix == "acme"
    assert s.call_timeout == 2.5
    assert s.max_call_bytes == 1024
    assert s.nats_sync_always is False
    assert s.log_level == "DEBUG"


def test_arguments_win_over_env_vars(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SIGNALBOX_CALL_TIMEOUT", "2.5")
    assert Settings(call_timeout=7).call_timeout == 7


def test_variables_without_the_prefix_are_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NATS_URL", "nats://elsewhere:4222")
    monkeypatch.setenv("CALL_TIMEOUT", "1")
    s = Settings()
    assert s.nats_url is None
    assert s.call_timeout == 10.0


@pytest.mark.parametrize("prefix", ["sb.x", "", "sb*", "s b", ">", "sb\n"])
def test_an_invalid_subject_prefix_is_rejected(prefix: str) -> None:
    with pytest.raises(pydantic.ValidationError) as info:
        Settings(subject_prefix=prefix)
    assert "subject prefix" in str(info.value)


def test_an_invalid_prefix_from_the_environment_is_rejected(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SIGNALBOX_SUBJECT_PREFIX", "a.b")
    with pytest.raises(pydantic.ValidationError):
        Settings()


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("call_timeout", 0),
        ("max_call_bytes", -1),
        ("nats_port", 70000),
        ("audit_replicas", 0),
        ("log_level", "LOUD"),
    ],
)
def test_out_of_range_values_are_rejected(field: str, value: object) -> None:
    with pytest.raises(pydantic.ValidationError):
        Settings(**{field: value})  # type: ignore[arg-type]


def test_settings_are_immutable_once_built() -> None:
    s = Settings()
    with pytest.raises(pydantic.ValidationError):
        s.call_timeout = 1  # type: ignore[misc]


def test_explicit_paths_win_over_the_data_dir(tmp_path: Path) -> None:
    s = Settings(
        data_dir=tmp_path,
        policy_dir=tmp_path / "policies",
        database_url="postgresql+psycopg://u:p@h/db",
    )
    assert s.policy_dir == tmp_path / "policies"
    assert s.resolved_database_url == "postgresql+psycopg://u:p@h/db"
