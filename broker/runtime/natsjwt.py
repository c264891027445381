"""NATS JWTs: the small piece of the format the registry's auth callout needs.

:func:`encode_jwt` / :func:`decode_jwt` sign and check ``ed25519-nkey``
JWTs through ``nkeys`` (the ``nats-jwt`` package on PyPI has no
auth-callout claims and pins old dependencies, so it is not used). The
issuer key is the deployment's (:meth:`broker.runtime.identity.ServerSecrets.issuer`).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import time
from collections.abc import Mapping, Sequence
from typing import Any

import nacl.exceptions
import nacl.signing
import nkeys

from broker.errors import InvalidInput

__all__ = ["decode_jwt", "encode_jwt"]


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


_HEADER = _b64(json.dumps({"typ": "JWT", "alg": "ed25519-nkey"}).encode())


def encode_jwt(claims: Mapping[str, Any], issuer: nkeys.KeyPair) -> str:
    """A NATS JWT (``ed25519-nkey``) of ``claims`` signed by ``issuer``.

    ``iss`` is set to the issuer's public key, ``iat`` defaults to now and
    ``jti`` is the base32 SHA-256 of the claims, as the Go library does.
    """
    body = {"iat": int(time.time()), **claims, "iss": issuer.public_key.decode(), "jti": ""}
    digest = hashlib.sha256(json.dumps(body, separators=(",", ":")).encode()).digest()
    body["jti"] = base64.b32encode(digest).decode().rstrip("=")
    signing_input = f"{_HEADER}.{_b64(json.dumps(body, separators=(',', ':')).encode())}"
    return f"{signing_input}.{_b64(issuer.sign(signing_input.encode()))}"


def _verify_key(public_key: str) -> nacl.signing.VerifyKey:
    """Ed25519 verify key of an nkey public key (base32: prefix byte, 32 key bytes, CRC16)."""
    raw = base64.b32decode(public_key + "=" * (-len(public_key) % 8))
    if len(raw) != 35 or not nkeys.valid_public_prefix_byte(raw[0]):
        raise ValueError(f"not an nkey public key: {public_key!r}")
    if nkeys.crc16_checksum(raw[:33]) != raw[33:]:
        raise ValueError(f"bad checksum in nkey public key {public_key!r}")
    return nacl.signing.VerifyKey(raw[1:33])


def decode_jwt(token: str, *, trusted_issuers: Sequence[str] | None = None) -> dict[str, Any]:
    """Claims of a NATS JWT after checking its signature against its ``iss`` key.

    Args:
        token: ``header.claims.signature``.
        trusted_issuers: If given, ``iss`` must be one of these public keys.

    Raises:
        InvalidInput: malformed, wrong algorithm, bad signature, untrusted
            issuer or expired.
    """
    try:
        header_b64, claims_b64, sig_b64 = token.split(".")
        header = json.loads(_unb64(header_b64))
        claims = json.loads(_unb64(claims_b64))
        signature = _unb64(sig_b64)
    except (ValueError, binascii.Error, UnicodeDecodeError) as exc:
        raise InvalidInput(f"malformed JWT: {exc}") from exc
    if not isinstance(header, dict) or header.get("alg") != "ed25519-nkey":
        raise InvalidInput("unsupported JWT algorithm (want ed25519-nkey)")
    if not isinstance(claims, dict) or not isinstance(claims.get("iss"), str):
        raise InvalidInput("JWT claims have no issuer")
    issuer: str = claims["iss"]
    if trusted_issuers is not None and issuer not in trusted_issuers:
        raise InvalidInput(f"JWT issuer {issuer} is not trusted")
    try:
        _verify_key(issuer).verify(f"{header_b64}.{claims_b64}".encode(), signature)
    except (ValueError, binascii.Error, nacl.exceptions.CryptoError) as exc:
        raise InvalidInput("JWT signature does not verify") from exc
    exp = claims.get("exp")
    if isinstance(exp, int | float) and exp and exp < time.time():
        raise InvalidInput("JWT expired")
    return claims
