"""What each role may do on the NATS server, and the server config that enforces it.

Roles and accounts are described in :mod:`broker.runtime.identity`. An agent
``A`` may only::

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

:func:`agent_permissions` and :func:`operator_permissions` go into the user
JWTs the registry's auth callout issues; :func:`service_permissions` and
:func:`auth_config` into the server config (static users, accounts, the
auth-callout block).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import bcrypt

from broker.errors import InvalidInput
from broker.runtime.identity import (
    ACCOUNT,
    AUTH_ACCOUNT,
    AUTH_USER,
    OPERATOR_USER,
    SERVICE_NAMES,
    SERVICE_USER,
    SYSTEM_ACCOUNT,
    SYSTEM_USER,
    ServerSecrets,
    service_user,
)
from broker.subjects import (
    OPERATOR_INBOX,
    SERVICE_INBOX,
    Subjects,
    inbox_prefix,
    operator_inbox,
)

__all__ = [
    "OPERATOR_READ_OPS",
    "OPERATOR_ROLES",
    "Permissions",
    "agent_permissions",
    "auth_config",
    "operator_permissions",
    "service_permissions",
]


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


def operator_permissions(subjects: Subjects, name: str = "", role: str = "admin") -> Permissions:
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
            f"{p}.registry.>",
            f"{p}.admin.registry.>",
            f"{p}.admin.operators.>",
            "$SRV.>",
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
