"""Identity enforced by the NATS server: secrets, roles, permissions and NATS JWTs.

Signalbox runs the server in *auth callout* mode (server-config flavour)::

    accounts:  SB    every agent, service and operator connection
               AUTH  the registry's auth-callout responder (user ``sb-auth``)
               SYS   the system account (user ``sb-system``: connz and kick)
    static users, bypassing the callout:
               sb-service   (SB)  the services: everything in SB
               sb-operator  (SB)  operators: admin endpoints, audit read, registry read
               sb-auth      (AUTH), sb-system (SYS)
    everybody else (agents): the server asks the registry on
               ``$SYS.REQ.USER.AUTH``; it answers with a user JWT signed by
               the callout issuer key, carrying that agent's permissions.

An agent ``A`` may only::

    publish    sb.out.A.>  sb.authz.A  sb.usage.A  sb.cost.renew.A
               sb.registry.{register,heartbeat,deregister}.A
               sb.registry.{get,list,discover}
               _INBOX.agent.A.>   (its own inbox)
               replies to requests it received (allow_responses, one reply each)
    subscribe  sb.in.A.*   sb.in.A.*.*   (calls to any / one version of A)
               _INBOX.agent.A.>   (its private inbox)

so it cannot publish as another agent, read another agent's calls or
replies, read the audit stream or call ``sb.admin.>``: the server refuses
(``Permissions Violation``), whatever the client code does.

This module holds what the server config, the connection helper and the
registry's callout share: :class:`ServerSecrets` (generated on first start,
files with mode 0600 in a 0700 folder), the permission sets per role, and
:func:`encode_jwt` / :func:`decode_jwt`, the small piece of the NATS JWT
format the callout needs (``ed25519-nkey`` signatures through ``nkeys``;
the ``nats-jwt`` package on PyPI has no auth-callout claims and pins old
dependencies, so it is not used).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import os
import secrets
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import bcrypt
import nacl.exceptions
import nacl.signing
import nkeys

from broker.errors import ConfigError, InvalidInput
from broker.settings import Settings
from broker.subjects import (
    OPERATOR_INBOX,
    SERVICE_INBOX,
    Subjects,
    inbox_prefix,
    operator_inbox,
)

__all__ = [
    "ACCOUNT",
    "AUTH_ACCOUNT",
    "AUTH_USER",
    "CALLOUT_SUBJECT",
    "CHAIN_GRACE",
    "OPERATOR_INBOX",
    "OPERATOR_READ_OPS",
    "OPERATOR_ROLES",
    "OPERATOR_TOKEN_PREFIX",
    "OPERATOR_USER",
    "SERVICE_NAMES",
    "SERVICE_USER",
    "SYSTEM_ACCOUNT",
    "SYSTEM_USER",
    "Permissions",
    "ServerSecrets",
    "agent_permissions",
    "auth_config",
    "chain_key",
    "decode_jwt",
    "encode_jwt",
    "operator_connect_options",
    "operator_name",
    "operator_permissions",
    "resolve_secrets_dir",
    "service_connect_options",
    "service_permissions",
    "service_user",
    "sign_chain",
    "verify_chain",
]

ACCOUNT = "SB"
AUTH_ACCOUNT = "AUTH"
SYSTEM_ACCOUNT = "SYS"
SERVICE_USER = "sb-service"
OPERATOR_USER = "sb-operator"
AUTH_USER = "sb-auth"
SYSTEM_USER = "sb-system"
#: Where the server sends authorization requests (in the AUTH account).
CALLOUT_SUBJECT = "$SYS.REQ.USER.AUTH"

#: The services that connect with a user of their own (least privilege:
#: :func:`service_permissions`); user ``sb-<name>``, password ``<name>.password``.
SERVICE_NAMES = ("registry", "policy", "cost", "tracing")

_FILES = {
    "issuer_seed": "issuer.nk",
    "auth_password": "auth.password",
    "service_password": "service.password",
    "system_password": "system.password",
    "operator_password": "operator.password",
    **{f"{name}_password": f"{name}.password" for name in SERVICE_NAMES},
}


def service_user(name: str) -> str:
    """The NATS user of service ``name`` (``sb-registry``...)."""
    return f"sb-{name}"


@dataclass(frozen=True, slots=True)
class ServerSecrets:
    """The secrets of one Signalbox deployment (one file each, mode 0600).

    ``issuer_seed`` signs every user JWT the callout issues (an account
    nkey seed, ``SA...``); the passwords belong to the static users.
    """

    issuer_seed: str
    auth_password: str
    service_password: str
    system_password: str
    operator_password: str
    registry_password: str
    policy_password: str
    cost_password: str
    tracing_password: str

    def password_of(self, service: str) -> str:
        """The password of service ``service``'s own user."""
        value: str = getattr(self, f"{service}_password")
        return value

    @property
    def issuer_public_key(self) -> str:
        """Public key of the callout issuer (``A...``), named in the server config."""
        return str(self.issuer().public_key.decode())

    def issuer(self) -> nkeys.KeyPair:
        """The issuer key pair (signs authorization responses and user JWTs)."""
        return nkeys.from_seed(self.issuer_seed.encode())

    @classmethod
    def generate(cls) -> ServerSecrets:
        """Fresh random secrets."""
        seed = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_ACCOUNT).decode()
        passwords = {attr: secrets.token_urlsafe(32) for attr in _FILES if attr != "issuer_seed"}
        return cls(issuer_seed=seed, **passwords)

    @classmethod
    def load(cls, folder: Path) -> ServerSecrets:
        """Read secrets written by :meth:`load_or_create`.

        Raises:
            ConfigError: a file is missing, empty or readable by others.
        """
        values: dict[str, str] = {}
        for attr, name in _FILES.items():
            values[attr] = _read_secret(folder / name)
        return cls(**values)

    @classmethod
    def load_or_create(cls, folder: Path) -> ServerSecrets:
        """Read the secrets in ``folder``, generating the missing ones (first start).

        The folder is created with mode 0700 and every file with 0600,
        written atomically (a crash never leaves a half-written secret).
        """
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(folder, 0o700)
        fresh = cls.generate()
        for attr, name in _FILES.items():
            path = folder / name
            if not path.exists():
                _write_secret(path, getattr(fresh, attr))
        return cls.load(folder)


def _write_secret(path: Path, value: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, value.encode() + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _read_secret(path: Path) -> str:
    try:
        mode = path.stat().st_mode & 0o777
        value = path.read_text().strip()
    except FileNotFoundError as exc:
        raise ConfigError(
            f"secret {path} is missing: run `signalbox up` once to generate the secrets, "
            "or point SIGNALBOX_SECRETS_DIR at the folder that holds them",
            details={"path": str(path)},
        ) from exc
    if mode & 0o077:
        raise ConfigError(
            f"secret {path} is readable by other users (mode {mode:o}); run `chmod 600 {path}`",
            details={"path": str(path), "mode": f"{mode:o}"},
        )
    if not value:
        raise ConfigError(f"secret {path} is empty", details={"path": str(path)})
    return value


def resolve_secrets_dir(settings: Settings) -> Path:
    """The folder holding the deployment's secrets (``<data_dir>/secrets`` by default)."""
    return settings.secrets_dir or settings.data_dir / "secrets"


def _role_options(settings: Settings, user: str, attr: str) -> dict[str, Any]:
    if settings.nats_user:
        password = settings.nats_password.get_secret_value() if settings.nats_password else ""
        return {"user": settings.nats_user, "password": password}
    folder = resolve_secrets_dir(settings)
    path = folder / _FILES[attr]
    if not path.exists():
        return {}  # an open server (no identity configured): connect without credentials
    return {"user": user, "password": _read_secret(path)}


def service_connect_options(settings: Settings, service: str | None = None) -> dict[str, Any]:
    """nats-py connect options of a service, and the services' inbox prefix (endpoints
    answer services only under it).

    Credentials: ``SIGNALBOX_NATS_USER``/``_PASSWORD`` if set; else service
    ``service``'s own least-privilege user (``sb-<service>``) when its password
    file exists; else the full-rights ``sb-service`` user (maintenance, tests,
    benches); else none (an open server).
    """
    options: dict[str, Any] = {}
    if service is not None and not settings.nats_user:
        path = resolve_secrets_dir(settings) / _FILES.get(f"{service}_password", "")
        if path.name and path.exists():
            options = {"user": service_user(service), "password": _read_secret(path)}
    if not options:
        options = _role_options(settings, SERVICE_USER, "service_password")
    return {**options, "inbox_prefix": SERVICE_INBOX}


# -- delegation chains ------------------------------------------------------------------
#
# When the policy service forwards a call to B it tells B on whose behalf it
# runs (``Sb-Chain``: the agents whose handlers led to the call) and signs
# that, for B, with a key only services hold (``Sb-Chain-Sig``). B's SDK sends
# both back with what it does while serving the call (nested calls, model
# authorizations), and the policy service believes the chain only if the
# signature verifies. So an agent cannot charge another agent's budget, or
# trip another agent's loop breaker, by naming it.

#: A signed chain stays valid this long after the call's deadline (a handler
#: may finish its model call a little late).
CHAIN_GRACE = 60.0


def chain_key(settings: Settings) -> bytes | None:
    """The services' key for signing delegation chains (None without service credentials).

    Derived from the ``sb-service`` password (or ``SIGNALBOX_NATS_PASSWORD``),
    which every service replica has and no agent does.
    """
    password = service_connect_options(settings).get("password")
    if not password:
        return None
    return hashlib.sha256(b"signalbox delegation chain v1\0" + str(password).encode()).digest()


def sign_chain(key: bytes, target: str, chain: str, expires: float, trace_id: str) -> str:
    """``Sb-Chain-Sig`` for ``chain`` as forwarded to ``target`` in trace ``trace_id``:
    ``<expires>.<mac>``. Bound to the trace, it also vouches for the trace: what
    ``target`` does while serving the call may continue it (``broker.telemetry``)."""
    stamp = f"{expires:.3f}"
    return f"{stamp}.{_chain_mac(key, target, chain, trace_id, stamp)}"


def _chain_mac(key: bytes, target: str, chain: str, trace_id: str, stamp: str) -> str:
    # hmac.digest: OpenSSL's one-shot HMAC, a third of hmac.new()'s cost (once per call).
    message = f"{target}\n{chain}\n{trace_id}\n{stamp}".encode()
    return hmac.digest(key, message, "sha256").hex()[:32]


def verify_chain(
    key: bytes | None, target: str, chain: str, signature: str, now: float, trace_id: str
) -> bool:
    """True if ``signature`` is the services' unexpired signature of ``chain`` for ``target``
    in trace ``trace_id``."""
    if key is None or not chain or not signature:
        return False
    stamp, _, mac = signature.rpartition(".")
    try:
        expires = float(stamp)
    except ValueError:
        return False
    if expires < now:
        return False
    return hmac.compare_digest(_chain_mac(key, target, chain, trace_id, stamp), mac)


def operator_connect_options(settings: Settings) -> dict[str, Any]:
    """nats-py connect options of an operator (the CLI), like :func:`service_connect_options`.

    With ``SIGNALBOX_OPERATOR_CREDENTIAL`` (a named operator's ``sbo1.…``
    token, `signalbox operators add`): that token, checked by the auth
    callout, and the operator's own inbox. Otherwise the shared bootstrap
    operator: ``SIGNALBOX_NATS_USER``/``_PASSWORD`` or ``sb-operator``'s
    password from the secrets folder.
    """
    if settings.operator_credential is not None:
        token = settings.operator_credential.get_secret_value()
        return {"token": token, "inbox_prefix": operator_inbox(operator_name(token))}
    # The operators' inbox whoever the user is: admin endpoints answer only under it.
    return {**_role_options(settings, OPERATOR_USER, "operator_password"),
            "inbox_prefix": OPERATOR_INBOX}  # fmt: skip


#: Prefix of a named operator's credential ``sbo1.<name>.<id>.<secret>``.
OPERATOR_TOKEN_PREFIX = "sbo1"


def operator_name(token: str) -> str:
    """The operator a ``sbo1.<name>.<id>.<secret>`` credential names.

    Raises:
        ConfigError: not such a credential.
    """
    parts = token.strip().split(".")
    if len(parts) != 4 or parts[0] != OPERATOR_TOKEN_PREFIX or not parts[1]:
        raise ConfigError(
            "SIGNALBOX_OPERATOR_CREDENTIAL is not an operator credential (sbo1.<name>.<id>."
            "<secret>, from `signalbox operators add NAME`)"
        )
    return parts[1]


# -- permissions ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Permissions:
    """Subjects a role may publish and subscribe to (allow lists; everything else is denied)."""

    publish: tuple[str, ...]
    subscribe: tuple[str, ...]
    allow_responses: bool = True

    def server_block(self) -> dict[str, Any]:
        """The ``permissions`` block of a static user in the server config."""
        block: dict[str, Any] = {
            "publish": {"allow": list(self.publish)},
            "subscribe": {"allow": list(self.subscribe)},
        }
        if self.allow_responses:
            block["allow_responses"] = {"max": 1}
        return block

    def jwt_claims(self) -> dict[str, Any]:
        """The permission claims of a user JWT."""
        claims: dict[str, Any] = {
            "pub": {"allow": list(self.publish)},
            "sub": {"allow": list(self.subscribe)},
        }
        if self.allow_responses:
            claims["resp"] = {"max": 1, "ttl": 0}
        return claims


def agent_permissions(subjects: Subjects, agent: str) -> Permissions:
    """What the server lets agent ``agent`` do (see the module docstring)."""
    return Permissions(
        publish=(
            subjects.out_of(agent),
            subjects.authz(agent),
            subjects.usage(agent),
            # Keeps the budget reservation of its model call in progress (its own only).
            subjects.cost_renew(agent),
            *subjects.registry_of(agent),
            # Its own inbox: harmless, and how a client checks the server has
            # processed its subscriptions (broker.connection.sync_connection).
            f"{inbox_prefix(agent)}.>",
        ),
        subscribe=(
            subjects.inbound_of(agent),
            # Routed calls to one version (sb.in.A.<capability>.<version>).
            f"{subjects.inbound_of(agent)}.*",
            f"{inbox_prefix(agent)}.>",
        ),
    )


#: Streams and buckets operators may read (never write) through the JetStream API.
_OPERATOR_READ_STREAMS = ("SB_AUDIT", "SB_USAGE", "KV_sb_agents")


#: Admin operations that change nothing: all a ``viewer`` operator may ask.
OPERATOR_READ_OPS: frozenset[tuple[str, str]] = frozenset(
    {
        ("registry", "get"), ("registry", "list"), ("registry", "discover"),
        ("registry", "credentials"), ("registry", "binding"),
        ("operators", "list"),
        ("policy", "validate"), ("policy", "show"), ("policy", "history"), ("policy", "diff"),
        ("approvals", "list"), ("breakers", "list"), ("rollout", "status"),
        ("cost", "report"), ("budgets", "list"), ("budgets", "show"),
        *((service, "status") for service in ("registry", "policy", "cost", "tracing")),
    }
)  # fmt: skip
#: Operator roles: ``admin`` may ask every admin operation, ``viewer`` only
#: :data:`OPERATOR_READ_OPS`.
OPERATOR_ROLES = ("admin", "viewer")


def operator_permissions(
    subjects: Subjects, name: str = "", role: str = "admin"
) -> Permissions:
    """Operators: admin endpoints, registry reads, micro discovery, read-only JetStream.

    The shared bootstrap operator (``name`` empty: the static user
    ``sb-operator``) asks on ``sb.admin.<service>.<op>`` and reads the
    registry on ``sb.registry.<op>``. A named operator (``signalbox operators
    add``, through the auth callout) may publish only
    ``sb.admin.<service>.<op>.<name>`` (every operation for ``admin``, the
    read-only ones for ``viewer``) and subscribe only its own inbox
    ``_INBOX.operator.<name>``: the subject is its authenticated identity,
    the audit actor of what it asks.
    """
    p = subjects.prefix
    js_read: list[str] = ["$JS.API.INFO", "$JS.API.STREAM.NAMES", "$JS.API.STREAM.LIST"]
    for stream in _OPERATOR_READ_STREAMS:
        js_read += [
            f"$JS.API.STREAM.INFO.{stream}",
            f"$JS.API.CONSUMER.CREATE.{stream}",
            f"$JS.API.CONSUMER.CREATE.{stream}.>",
            f"$JS.API.CONSUMER.INFO.{stream}.*",
            f"$JS.API.CONSUMER.DELETE.{stream}.*",
            f"$JS.API.CONSUMER.MSG.NEXT.{stream}.*",
            f"$JS.API.STREAM.MSG.GET.{stream}",
            f"$JS.API.DIRECT.GET.{stream}",
            f"$JS.API.DIRECT.GET.{stream}.>",
            f"$JS.ACK.{stream}.>",
            "$JS.FC.>",
        ]
    js = tuple(dict.fromkeys(js_read))
    # The approval requests feed (`signalbox approvals`, dashboards).
    feed = f"{p}.approvals.requested"
    if not name:
        return Permissions(
            publish=(
                f"{p}.admin.*.*",
                *(f"{p}.registry.{op}" for op in ("get", "list", "discover")),
                "$SRV.>",
                *js,
            ),
            subscribe=(f"{OPERATOR_INBOX}.>", feed),
            allow_responses=False,
        )
    if role not in OPERATOR_ROLES:
        raise InvalidInput(f"unknown operator role {role!r}; use one of {OPERATOR_ROLES}")
    admin = (
        (f"{p}.admin.*.*.{name}",)
        if role == "admin"
        else tuple(f"{p}.admin.{svc}.{op}.{name}" for svc, op in sorted(OPERATOR_READ_OPS))
    )
    return Permissions(
        publish=(*admin, "$SRV.>", *js),
        subscribe=(f"{operator_inbox(name)}.>", feed),
        allow_responses=False,
    )


_SERVICE = Permissions(publish=(">",), subscribe=(">",), allow_responses=False)

#: JetStream API every service uses: create/update/inspect streams and buckets
#: (each replica ensures them at start), consumers, direct and message gets,
#: acks and flow control. Never delete or purge a stream.
_JS_COMMON = (
    "$JS.API.INFO",
    "$JS.API.STREAM.NAMES",
    "$JS.API.STREAM.LIST",
    "$JS.API.STREAM.INFO.*",
    "$JS.API.STREAM.CREATE.*",
    "$JS.API.STREAM.UPDATE.*",
    "$JS.API.STREAM.MSG.GET.*",
    "$JS.API.DIRECT.GET.>",
    "$JS.API.CONSUMER.>",
    "$JS.ACK.>",
    "$JS.FC.>",
)


def service_permissions(subjects: Subjects, service: str) -> Permissions:
    """Least privilege for service ``service`` (one of :data:`SERVICE_NAMES`).

    Every service may publish replies into inboxes (``_INBOX.>``: agents',
    operators' and services'; which one is checked per request), audit
    events, and the JetStream API of :data:`_JS_COMMON`; beyond that only
    the KV buckets it owns and the subjects it sends on. So a reply check a
    service missed still cannot write another service's KV bucket, an admin
    subject or an agent's call subject, delete a stream, or read agents'
    calls (only the policy service subscribes ``sb.out.>``/``sb.in.>``).
    """
    p = subjects.prefix
    own_kv = {
        "registry": ("sb_agents",),
        "policy": ("sb_policies", "sb_approvals", "sb_routes", "sb_rollout_stats", "sb_breakers"),
        "cost": ("sb_budgets", "sb_breakers"),
        "tracing": (),
    }[service]
    publish = {
        "registry": (f"{p}.registry.changed",),
        "policy": (
            f"{p}.in.>",
            f"{p}.approvals.requested",
            f"{p}.cost.reserve",
            f"{p}.cost.versions",
            *(f"{p}.registry.{op}" for op in ("get", "list", "discover")),
            # `rollout deprecate --archive`: the registry drops the version.
            f"{p}.admin.registry.deregister",
        ),
        "cost": (),
        "tracing": (f"{p}.audit.log.>",),
    }[service]
    subscribe = {
        "registry": (
            f"{p}.registry.>", f"{p}.admin.registry.>", f"{p}.admin.operators.>", "$SRV.>"
        ),
        "policy": (
            f"{p}.out.>",
            f"{p}.authz.*",
            *(f"{p}.admin.{desk}.>" for desk in ("policy", "approvals", "breakers", "rollout")),
        ),
        "cost": (f"{p}.cost.>", f"{p}.admin.cost.>", f"{p}.admin.budgets.>"),
        "tracing": (f"{p}.admin.tracing.>",),
    }[service]
    return Permissions(
        publish=(
            "_INBOX.>",
            f"{p}.audit.in.>",
            *_JS_COMMON,
            *(f"$KV.{bucket}.>" for bucket in own_kv),
            *publish,
        ),
        subscribe=(f"{SERVICE_INBOX}.>", *subscribe),
        allow_responses=False,
    )


def _bcrypt(password: str) -> str:
    # The passwords are 256-bit random secrets, never guessable: bcrypt only
    # keeps them out of the config file in plain text. The server pays the
    # cost on every connect, so keep it low (6: ~4 ms).
    return bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=6)).decode()


def auth_config(secrets_: ServerSecrets, subjects: Subjects) -> dict[str, Any]:
    """The accounts, static users and auth-callout blocks of a server config.

    Passwords appear only as bcrypt hashes. The result is JSON-compatible
    (the NATS config format accepts JSON).
    """

    def user(name: str, password: str, perms: Permissions | None = None) -> dict[str, Any]:
        entry: dict[str, Any] = {"user": name, "password": _bcrypt(password)}
        if perms is not None:
            entry["permissions"] = perms.server_block()
        return entry

    return {
        "accounts": {
            ACCOUNT: {
                "jetstream": "enabled",
                "users": [
                    user(SERVICE_USER, secrets_.service_password, _SERVICE),
                    *(
                        user(
                            service_user(name),
                            secrets_.password_of(name),
                            service_permissions(subjects, name),
                        )
                        for name in SERVICE_NAMES
                    ),
                    user(OPERATOR_USER, secrets_.operator_password, operator_permissions(subjects)),
                ],
            },
            AUTH_ACCOUNT: {"users": [user(AUTH_USER, secrets_.auth_password)]},
            SYSTEM_ACCOUNT: {"users": [user(SYSTEM_USER, secrets_.system_password)]},
        },
        "system_account": SYSTEM_ACCOUNT,
        "authorization": {
            "auth_callout": {
                "issuer": secrets_.issuer_public_key,
                "account": AUTH_ACCOUNT,
                "auth_users": [
                    *(AUTH_USER, SERVICE_USER, OPERATOR_USER, SYSTEM_USER),
                    *(service_user(name) for name in SERVICE_NAMES),
                ],
            }
        },
    }


# -- NATS JWTs ------------------------------------------------------------------------


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
