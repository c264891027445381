"""Subject builders. Names that are not valid subject tokens are rejected here.

All subjects hang under one configurable prefix (default ``sb``)::

    sb.out.<caller>.<target>.<capability>   caller -> policy (request)
    sb.in.<target>.<capability>             policy -> target (request)
    sb.in.<target>.<capability>.<version>   policy -> one version of target (routed)
    sb.registry.<op>.<agent>                registry endpoints an agent asks as itself
                                            (register, heartbeat, deregister,
                                            and the reads get, list, discover)
    sb.registry.<op>                        read-only registry endpoints for
                                            operators and services
    sb.registry.changed                     registry replicas' change feed
    sb.audit.in.<kind>.<actor>              audit intake (stream SB_AUDIT_IN)
    sb.audit.log.<kind>.<actor>             chained audit (stream SB_AUDIT)
    sb.authz.<agent>                        agent -> policy: may I use this model/tool?
    sb.usage.<agent>                        usage reports (stream SB_USAGE)
    sb.cost.reserve                         policy -> cost: reserve a model call's budget
    sb.cost.versions                        policy -> cost: spend per agent version
    sb.cost.renew.<agent>                   agent -> cost: keep a model call's reservation
    sb.admin.<service>.<op>                 operator-only endpoints (bootstrap operator)
    sb.admin.<service>.<op>.<operator>      the same, for a named operator
"""

from __future__ import annotations

import enum
import functools
import re
from dataclasses import dataclass
from typing import Final

from broker.errors import InvalidInput, InvalidSubjectToken

__all__ = [
    "AGENT_INBOX_ROOT",
    "AGENT_REGISTRY_OPS",
    "MAX_SUBJECT_BYTES",
    "OPERATOR_INBOX",
    "REGISTRY_READ_OPS",
    "SERVICE_INBOX",
    "USAGE_DUPLICATE_WINDOW",
    "Audience",
    "Subjects",
    "inbox_prefix",
    "is_valid_token",
    "operator_inbox",
    "reply_fault",
    "subject_fault",
    "validate_token",
    "version_token",
]

#: Registry operations on one agent's own entry: their subjects end in the agent's name.
AGENT_REGISTRY_OPS: Final = ("register", "heartbeat", "deregister")
#: Read-only registry operations (any agent may ask about any other, as itself).
REGISTRY_READ_OPS: Final = ("get", "list", "discover")

#: Root of every agent's private inbox (``_INBOX.agent.<name>``).
AGENT_INBOX_ROOT: Final = "_INBOX.agent"
#: Operators' inboxes (the CLI connects with this inbox prefix).
OPERATOR_INBOX: Final = "_INBOX.operator"
#: Services' inboxes (every service connection uses this inbox prefix).
SERVICE_INBOX: Final = "_INBOX.service"
#: A usage report resent with the same id (``Nats-Msg-Id``) within this many
#: seconds is stored once by the ``SB_USAGE`` stream (the SDK retries within half of it).
USAGE_DUPLICATE_WINDOW: Final = 600.0
#: Longest subject or reply subject any Signalbox process accepts off the wire.
#: Ours stay under 200 bytes (an agent's inbox with a 64-byte name is ~110).
MAX_SUBJECT_BYTES: Final = 512

# Conservative token alphabet: safe in subjects, KV keys, stream and consumer
# names, and file names; no wildcards, dots or whitespace.
_TOKEN = re.compile(r"^[A-Za-z0-9_-]{1,64}\Z")


def is_valid_token(name: str) -> bool:
    """True if ``name`` may be used as one subject token."""
    return bool(_TOKEN.match(name))


def validate_token(name: str, *, what: str = "name") -> str:
    """Return ``name`` if it is a valid subject token, else raise.

    Raises:
        InvalidSubjectToken: ``name`` is empty, too long, or has characters
            outside ``[A-Za-z0-9_-]`` (dots, wildcards and spaces included).
    """
    if not isinstance(name, str) or not _TOKEN.match(name):
        raise InvalidSubjectToken(
            f"{what} {name!r} is not a valid subject token: use 1-64 characters "
            "from A-Z, a-z, 0-9, '_' and '-'",
            details={"name": str(name), "what": what},
        )
    return name


@functools.lru_cache(maxsize=4096)
def version_token(version: str) -> str:
    """A version as one subject token: ``.`` becomes ``_`` and ``+`` becomes ``__``.

    Semantic versions never contain ``_``, so two versions never share a token.

    Raises:
        InvalidSubjectToken: the version has characters no token may carry.
    """
    return validate_token(version.replace(".", "_").replace("+", "__"), what="version")


class Audience(enum.Flag):
    """Who may send a request to an endpoint, hence where its reply may go.

    The NATS server's permissions decide who can publish a subject; the
    audience of an endpoint restates that so the service can check the
    reply subject before doing any work (a reply is published with the
    service's rights, so a reply subject naming ``$KV.>``, an admin subject
    or another agent's inbox would make the service act for the sender).
    """

    #: The agent named by the subject's last token (``sb.registry.get.<agent>``).
    AGENT = enum.auto()
    #: An operator (``sb.admin.>``): replies under :data:`OPERATOR_INBOX`.
    OPERATOR = enum.auto()
    #: Another service (``sb.cost.reserve``): replies under :data:`SERVICE_INBOX`.
    SERVICE = enum.auto()


_AGENT, _OPERATOR, _SERVICE = Audience.AGENT.value, Audience.OPERATOR.value, Audience.SERVICE.value

# Printable ASCII without space: what a subject may hold here (NATS itself
# passes any bytes but whitespace, invalid UTF-8 and control characters included).
_SUBJECT = re.compile(r"[!-~]+\Z")


def subject_fault(subject: str) -> str | None:
    """Why ``subject`` is not a well-formed literal subject, or None if it is.

    Well-formed: 1 to :data:`MAX_SUBJECT_BYTES` printable ASCII characters,
    tokens separated by single dots, no wildcard tokens.
    """
    if not subject:
        return "empty subject"
    if len(subject) > MAX_SUBJECT_BYTES:
        return f"subject longer than {MAX_SUBJECT_BYTES} bytes"
    if (
        _SUBJECT.match(subject)
        and "*" not in subject
        and ">" not in subject
        and ".." not in subject
        and subject[0] != "."
        and subject[-1] != "."
    ):
        return None  # the usual case, quickly (it runs on every mediated call)
    if not _SUBJECT.match(subject):
        return "subject with characters outside printable ASCII"
    for token in subject.split("."):
        if not token:
            return "subject with an empty token"
        if token in ("*", ">"):
            return "subject with a wildcard token"
    return None


def operator_inbox(operator: str) -> str:
    """Private inbox prefix of a named operator (``_INBOX.operator.<name>``)."""
    return f"{OPERATOR_INBOX}.{validate_token(operator, what='operator name')}"


def reply_fault(reply: str, audience: Audience, agent: str = "", operator: str = "") -> str | None:
    """Why a request's ``reply`` subject is not one its sender may name, or None.

    The sender's reply space is: an agent's own inbox
    (``_INBOX.agent.<agent>.…``) when the endpoint's audience includes
    :attr:`Audience.AGENT` and the subject named ``agent``; the operators'
    inbox; the services' inbox. Anything else (no reply, another agent's
    inbox, ``$KV.…``, an admin or call subject) is refused before any work.

    Args:
        reply: The request's reply subject.
        audience: Who may send this request (the endpoint's declaration).
        agent: The agent the request's subject names (``""``: none).
        operator: The named operator the request's subject names: its reply
            must be under its own inbox (``""``: the bootstrap operator, any
            operator inbox).
    """
    if not reply:
        return "no reply subject: use request-reply"
    fault = subject_fault(reply)
    if fault is not None:
        return f"malformed reply subject ({fault})"
    bits = audience.value  # int tests: Flag's own `in` costs ~0.2 µs each
    if bits & _AGENT and agent and reply.startswith(f"{AGENT_INBOX_ROOT}.{agent}."):
        return None
    operators = f"{OPERATOR_INBOX}.{operator}." if operator else f"{OPERATOR_INBOX}."
    if bits & _OPERATOR and reply.startswith(operators):
        return None
    if bits & _SERVICE and reply.startswith(f"{SERVICE_INBOX}."):
        return None
    spaces = []
    if Audience.AGENT in audience and agent:
        spaces.append(f"{AGENT_INBOX_ROOT}.{agent}.>")
    if Audience.OPERATOR in audience:
        spaces.append(f"{operators}>")
    if Audience.SERVICE in audience:
        spaces.append(f"{SERVICE_INBOX}.>")
    return f"reply subject outside the sender's reply space ({' or '.join(spaces) or 'none'})"


def inbox_prefix(agent: str) -> str:
    """Private inbox prefix of an agent (replies to its requests land under it).

    ``_INBOX.agent.<name>``: the fixed ``agent`` token keeps agents' inboxes
    apart from nats-py's default ``_INBOX.<22-character nuid>`` inboxes of
    services, whatever an agent is named.
    """
    return f"{AGENT_INBOX_ROOT}.{validate_token(agent, what='agent name')}"


@dataclass(frozen=True, slots=True)
class Subjects:
    """Builds every Signalbox subject under one prefix."""

    prefix: str = "sb"

    def __post_init__(self) -> None:
        validate_token(self.prefix, what="subject prefix")

    def sender_of(self, subject: str) -> str | None:
        """The agent an agent-scoped subject names (the only one allowed to publish it),
        or None: ``sb.out.<agent>.…``, ``sb.authz.<agent>``, ``sb.usage.<agent>``,
        ``sb.registry.<op>.<agent>``, ``sb.cost.renew.<agent>``."""
        tokens = subject.split(".")
        if len(tokens) < 3 or tokens[0] != self.prefix:
            return None
        kind = tokens[1]
        if (kind, len(tokens)) in (("out", 5), ("authz", 3), ("usage", 3)):
            agent = tokens[2]
        elif len(tokens) == 4 and (
            (kind == "registry" and tokens[2] in AGENT_REGISTRY_OPS + REGISTRY_READ_OPS)
            or (kind == "cost" and tokens[2] == "renew")
        ):
            agent = tokens[3]
        else:
            return None
        return agent if is_valid_token(agent) else None

    def out(self, caller: str, target: str, capability: str) -> str:
        """Subject an agent requests to call ``target``'s ``capability``."""
        caller = validate_token(caller, what="caller")
        target = validate_token(target, what="target")
        capability = validate_token(capability, what="capability")
        return f"{self.prefix}.out.{caller}.{target}.{capability}"

    @property
    def out_wildcard(self) -> str:
        """Everything the policy service mediates."""
        return f"{self.prefix}.out.*.*.*"

    def out_of(self, caller: str) -> str:
        """Everything ``caller`` may request (its publish permission)."""
        return f"{self.prefix}.out.{validate_token(caller, what='caller')}.>"

    def inbound(self, target: str, capability: str) -> str:
        """Subject the policy service forwards allowed calls to."""
        return (
            f"{self.prefix}.in.{validate_token(target, what='target')}."
            f"{validate_token(capability, what='capability')}"
        )

    def inbound_version(self, target: str, capability: str, version: str) -> str:
        """Subject of ``capability`` of one version of ``target`` (routed calls)."""
        return f"{self.inbound(target, capability)}.{version_token(version)}"

    def inbound_versions_of(self, target: str, version: str) -> str:
        """What one version of ``target`` subscribes to for routed calls."""
        return (
            f"{self.prefix}.in.{validate_token(target, what='target')}.*.{version_token(version)}"
        )

    def inbound_of(self, target: str) -> str:
        """Every capability subject of ``target`` (its subscribe permission)."""
        return f"{self.prefix}.in.{validate_token(target, what='target')}.*"

    def registry(self, op: str) -> str:
        """Registry endpoint subject of a read-only operation (``get``, ``list``, ``discover``).

        Operations that change one agent's entry are bound to that agent's
        name: see :meth:`registry_for`.
        """
        return f"{self.prefix}.registry.{validate_token(op, what='registry operation')}"

    def registry_for(self, op: str, agent: str) -> str:
        """Agent-scoped registry subject ``sb.registry.<op>.<agent>``.

        ``op`` is one of :data:`AGENT_REGISTRY_OPS` (``register``,
        ``heartbeat``, ``deregister``) or :data:`REGISTRY_READ_OPS` (``get``,
        ``list``, ``discover``). The agent's name is in the subject so the NATS
        server can let each agent publish only under its own, and the registry
        knows who asks (its reply may only go to that agent's inbox); it
        refuses a body naming another agent (``identity_mismatch``).

        Raises:
            InvalidInput: ``op`` is not a registry operation.
            InvalidSubjectToken: ``agent`` is not a valid subject token.
        """
        if op not in AGENT_REGISTRY_OPS and op not in REGISTRY_READ_OPS:
            raise InvalidInput(
                f"unknown registry operation {op!r}; use one of "
                f"{', '.join(AGENT_REGISTRY_OPS + REGISTRY_READ_OPS)}",
                details={"op": op},
            )
        return f"{self.prefix}.registry.{op}.{validate_token(agent, what='agent name')}"

    def registry_wildcard(self, op: str) -> str:
        """What the registry subscribes to for an agent-scoped ``op`` (``sb.registry.<op>.*``)."""
        self.registry_for(op, "_")  # validates op
        return f"{self.prefix}.registry.{op}.*"

    def registry_of(self, agent: str) -> tuple[str, ...]:
        """Every registry subject ``agent`` may publish on (all under its own name)."""
        return tuple(self.registry_for(op, agent) for op in AGENT_REGISTRY_OPS + REGISTRY_READ_OPS)

    @property
    def registry_changes(self) -> str:
        """Core subject on which registry replicas tell each other what changed (services only)."""
        return f"{self.prefix}.registry.changed"

    def audit_intake(self, kind: str, actor: str) -> str:
        """Where emitters publish audit events before they are chained."""
        return f"{self.prefix}.audit.in.{validate_token(kind, what='audit kind')}.{_safe(actor)}"

    @property
    def audit_intake_all(self) -> str:
        """Filter of the intake stream."""
        return f"{self.prefix}.audit.in.>"

    def audit_log(self, kind: str, actor: str) -> str:
        """Subject of a chained audit record in ``SB_AUDIT``."""
        return f"{self.prefix}.audit.log.{validate_token(kind, what='audit kind')}.{_safe(actor)}"

    @property
    def audit_log_all(self) -> str:
        """Filter of the chained audit stream."""
        return f"{self.prefix}.audit.log.>"

    def authz(self, agent: str) -> str:
        """Where ``agent`` asks the policy service before an LLM or tool call."""
        return f"{self.prefix}.authz.{validate_token(agent, what='agent name')}"

    @property
    def authz_wildcard(self) -> str:
        """Every agent's authorization requests (the policy service subscribes here)."""
        return f"{self.prefix}.authz.*"

    def usage(self, agent: str) -> str:
        """Where an agent reports LLM/tool usage."""
        return f"{self.prefix}.usage.{validate_token(agent, what='agent name')}"

    @property
    def usage_all(self) -> str:
        """Filter of the usage stream."""
        return f"{self.prefix}.usage.*"

    @property
    def cost_reserve(self) -> str:
        """``sb.cost.reserve``: the policy service reserves budget (services only)."""
        return f"{self.prefix}.cost.reserve"

    @property
    def cost_versions(self) -> str:
        """``sb.cost.versions``: spend per version of an agent (services only)."""
        return f"{self.prefix}.cost.versions"

    def cost_renew(self, agent: str) -> str:
        """``sb.cost.renew.<agent>``: ``agent`` keeps the budget reservation of a model
        call in progress (only its own: the subject names who asks)."""
        return f"{self.prefix}.cost.renew.{validate_token(agent, what='agent name')}"

    @property
    def cost_renew_wildcard(self) -> str:
        """Every agent's reservation renewals (the cost service subscribes here)."""
        return f"{self.prefix}.cost.renew.*"

    def admin(self, service: str, op: str, operator: str = "") -> str:
        """Operator-only endpoint of a service: ``sb.admin.<service>.<op>`` for the
        bootstrap operator, ``sb.admin.<service>.<op>.<operator>`` for a named one (its
        credential lets it publish only under its own name, so the name is its identity)."""
        subject = f"{self.prefix}.admin.{validate_token(service)}.{validate_token(op)}"
        if not operator:
            return subject
        return f"{subject}.{validate_token(operator, what='operator name')}"


def _safe(actor: str) -> str:
    """Actor names such as ``service:policy`` become valid tokens (``service_policy``)."""
    cleaned = re.sub(r"[^A-Za-z0-9_-]", "_", actor)[:64]
    return cleaned or "_"
