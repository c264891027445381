"""Identity plumbing: secrets on disk, NATS JWTs, permissions, the generated server config."""

from __future__ import annotations

import stat
import time
from pathlib import Path

import nats
import nats.errors
import pytest

from broker.connection import connect, is_auth_error
from broker.errors import AuthenticationFailed, ConfigError, InvalidInput
from broker.runtime.identity import (
    OPERATOR_INBOX,
    OPERATOR_USER,
    SERVICE_USER,
    ServerSecrets,
    operator_connect_options,
    service_connect_options,
)
from broker.runtime.natsjwt import decode_jwt, encode_jwt
from broker.runtime.permissions import agent_permissions, auth_config
from broker.runtime.server import EmbeddedServer
from broker.settings import Settings
from broker.subjects import Subjects


def test_secrets_are_generated_once_with_private_modes(tmp_path: Path) -> None:
    folder = tmp_path / "secrets"
    first = ServerSecrets.load_or_create(folder)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    files = sorted(folder.iterdir())
    assert len(files) == 9  # issuer, auth, service, system, operator + one per service
    assert all(stat.S_IMODE(f.stat().st_mode) == 0o600 for f in files)
    assert ServerSecrets.load_or_create(folder) == first  # stable across restarts
    assert first.issuer_public_key.startswith("A")


def test_a_secret_readable_by_others_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "secrets"
    ServerSecrets.load_or_create(folder)
    (folder / "service.password").chmod(0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        ServerSecrets.load(folder)


def test_missing_secrets_say_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="signalbox up"):
        ServerSecrets.load(tmp_path / "nowhere")


def test_jwts_round_trip_and_tampering_is_detected() -> None:
    secrets = ServerSecrets.generate()
    token = encode_jwt({"sub": "UABC", "nats": {"x": 1}}, secrets.issuer())
    claims = decode_jwt(token, trusted_issuers=[secrets.issuer_public_key])
    assert claims["sub"] == "UABC" and claims["iss"] == secrets.issuer_public_key
    assert len(claims["jti"]) == 52
    header, _body, sig = token.split(".")
    other = ServerSecrets.generate()
    forged = encode_jwt({"sub": "UABC"}, other.issuer())
    with pytest.raises(InvalidInput, match="not trusted"):
        decode_jwt(forged, trusted_issuers=[secrets.issuer_public_key])
    # Claims swapped under the original signature.
    with pytest.raises(InvalidInput, match="signature"):
        decode_jwt(f"{header}.{forged.split('.')[1]}.{sig}")
    with pytest.raises(InvalidInput, match="malformed"):
        decode_jwt("not-a-jwt")
    expired = encode_jwt({"sub": "U", "exp": int(time.time()) - 5}, secrets.issuer())
    with pytest.raises(InvalidInput, match="expired"):
        decode_jwt(expired)


def test_agent_permissions_name_only_its_own_subjects() -> None:
    perms = agent_permissions(Subjects("sb"), "alice")
    assert "sb.out.alice.>" in perms.publish
    assert all("bob" not in s for s in perms.publish + perms.subscribe)
    assert not any(s.startswith(("sb.admin", "sb.audit", "$JS", "$KV")) for s in perms.publish)
    assert set(perms.subscribe) == {"sb.in.alice.*", "sb.in.alice.*.*", "_INBOX.agent.alice.>"}
    claims = perms.jwt_claims()
    assert claims["resp"] == {"max": 1, "ttl": 0}


def test_generated_config_keeps_passwords_out_and_is_private(tmp_path: Path) -> None:
    secrets = ServerSecrets.load_or_create(tmp_path / "secrets")
    server = EmbeddedServer(
        tmp_path / "nats", port=0, sync_always=False, auth=auth_config(secrets, Subjects("sb"))
    )
    server.start()
    try:
        text = server.config_path.read_text()
        for password in (secrets.service_password, secrets.operator_password):
            assert password not in text
        assert secrets.issuer_seed not in text
        assert stat.S_IMODE(server.config_path.stat().st_mode) == 0o600
    finally:
        server.stop()


async def test_roles_connect_with_their_secrets_and_nobody_else_does(tmp_path: Path) -> None:
    data = tmp_path / "data"
    secrets = ServerSecrets.load_or_create(data / "secrets")
    server = EmbeddedServer(
        tmp_path / "nats", port=0, sync_always=False, auth=auth_config(secrets, Subjects("sb"))
    )
    url = server.start()
    try:
        settings = Settings(nats_url=url, data_dir=data)
        svc = service_connect_options(settings)
        assert svc["user"] == SERVICE_USER
        nc = await connect(url, name="svc", **svc)
        await nc.close()
        op = operator_connect_options(settings)
        assert op["user"] == OPERATOR_USER and op["inbox_prefix"] == OPERATOR_INBOX
        nc = await connect(url, name="op", **op)
        await nc.close()
        # No credential at all: the callout has no responder here, and the
        # server refuses (nobody vouches for the client).
        with pytest.raises((nats.errors.Error, OSError)):
            await nats.connect(url, allow_reconnect=False, connect_timeout=4)
        with pytest.raises(AuthenticationFailed):
            await connect(url, name="bad", user=SERVICE_USER, password="wrong", connect_timeout=5)
        # Explicit user/password settings win over the secrets folder.
        explicit = Settings(
            nats_url=url, data_dir=data, nats_user=SERVICE_USER, nats_password="wrong"
        )
        assert service_connect_options(explicit)["password"] == "wrong"
        assert is_auth_error(nats.errors.AuthorizationError())
    finally:
        server.stop()


def test_an_open_server_needs_no_credentials(tmp_path: Path) -> None:
    settings = Settings(nats_url="nats://x:4222", data_dir=tmp_path)
    # No credentials; the role's inbox still (endpoints answer only under it).
    assert service_connect_options(settings) == {"inbox_prefix": "_INBOX.service"}
    assert operator_connect_options(settings) == {"inbox_prefix": "_INBOX.operator"}


def test_delegation_chains_verify_only_as_signed() -> None:
    from broker.runtime.identity import sign_chain, verify_chain

    key, other = b"k" * 32, b"o" * 32
    chain, t = "orchestrator,planner", "ab" * 16
    sig = sign_chain(key, "worker", chain, 1_000.0, t)
    assert verify_chain(key, "worker", chain, sig, 999.0, t)
    assert not verify_chain(key, "worker", chain, sig, 1_001.0, t)  # expired
    assert not verify_chain(key, "mallory", chain, sig, 999.0, t)  # for B only
    assert not verify_chain(key, "worker", "victim", sig, 999.0, t)  # another chain
    assert not verify_chain(key, "worker", chain, sig, 999.0, "cd" * 16)  # another trace
    assert not verify_chain(other, "worker", chain, sig, 999.0, t)
    assert not verify_chain(None, "worker", chain, sig, 999.0, t)
    stamp, mac = sig.split(".", 1)[0], sig.rsplit(".", 1)[1]
    later = f"{float(stamp) + 3600:.3f}.{mac}"  # stretching the expiry breaks the MAC
    assert not verify_chain(key, "worker", chain, later, 999.0, t)
    for junk in ("", "x", "abc.def", "1e99."):
        assert not verify_chain(key, "worker", chain, junk, 999.0, t)
