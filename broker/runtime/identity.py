"""Identity enforced by the NATS server: roles, secrets and credentials.

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

What each role may do, and the server config's auth blocks, are
:mod:`broker.runtime.permissions`; the NATS JWTs the callout signs,
:mod:`broker.runtime.natsjwt`.

This module holds what the server config, the connection helpers and the
registry's callout share: the account and user names,
:class:`ServerSecrets` (generated on first start, files with mode 0600 in a
0700 folder), the connect options of services and operators, named
operators' credentials, and the signing of delegation chains.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nkeys

from broker.errors import ConfigError
from broker.settings import Settings
from broker.subjects import (
    OPERATOR_INBOX,
    SERVICE_INBOX,
    operator_inbox,
)

__all__ = [
    "ACCOUNT",
    "AUTH_ACCOUNT",
    "AUTH_USER",
    "CALLOUT_SUBJECT",
    "CHAIN_GRACE",
    "OPERATOR_INBOX",
    "OPERATOR_TOKEN_PREFIX",
    "OPERATOR_USER",
    "SERVICE_NAMES",
    "SERVICE_USER",
    "SYSTEM_ACCOUNT",
    "SYSTEM_USER",
    "ServerSecrets",
    "chain_key",
    "operator_connect_options",
    "operator_name",
    "resolve_secrets_dir",
    "service_connect_options",
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
#: :func:`broker.runtime.permissions.service_permissions`); user ``sb-<name>``,
#: password ``<name>.password``.
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
