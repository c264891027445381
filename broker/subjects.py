"""Subject builders. Names that are not valid subject tokens are rejected here.

All subjects hang under one configurable prefix (default ``sb``)::

    sb.out.<caller>.<target>.<capability>   caller -> policy (request)
    sb.in.<target>.<capability>             policy -> target (request)
    sb.in.<target>.<capability>.<version>   policy -> one version of target (routed)
    sb.registry.<op>.<agent>                agent-scoped registry endpoints
                                            (register, heartbeat, deregister)
    sb.registry.<op>                        read-only registry endpoints
                                            (get, list, discover)
    sb.registry.changed                     registry replicas' change feed
    sb.audit.in.<kind>.<actor>              audit intake (stream SB_AUDIT_IN)
    sb.audit.log.<kind>.<actor>             chained audit (stream SB_AUDIT)
    sb.authz.<agent>                        agent -> policy: may I use this model/tool?
    sb.usage.<agent>                        usage reports (stream SB_USAGE)
    sb.cost.reserve                         policy -> cost: reserve a model call's budget
    sb.cost.versions                        policy -> cost: spend per agent version
    sb.admin.<service>.<op>                 operator-only endpoints
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Final

from broker.errors import InvalidInput, InvalidSubjectToken

__all__ = [
    "AGENT_REGISTRY_OPS",
    "REGISTRY_READ_OPS",
    "Subjects",
    "inbox_prefix",
    "is_valid_token",
    "validate_token",
    "version_token",
]

#: Registry operations on one agent's own entry: their subjects end in the agent's name.
AGENT_REGISTRY_OPS: Final = ("register", "heartbeat", "deregister")
#: Read-only registry operations (any agent may ask about any other).
REGISTRY_READ_OPS: Final = ("get", "list", "discover")

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


def inbox_prefix(agent: str) -> str:
    """Private inbox prefix of an agent (replies to its requests land under it).

    ``_INBOX.agent.<name>``: the fixed ``agent`` token keeps agents' inboxes
    apart from nats-py's default ``_INBOX.<22-character nuid>`` inboxes of
    services, whatever an agent is named.
    """
    return f"_INBOX.agent.{validate_token(agent, what='agent name')}"


@dataclass(frozen=True, slots=True)
class Subjects:
    """Builds every Signalbox subject under one prefix."""

    prefix: str = "sb"

    def __post_init__(self) -> None:
        validate_token(self.prefix, what="subject prefix")

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
        ``heartbeat``, ``deregister``). The agent's name is in the subject so
        the NATS server can let each agent publish only under its own; the
        registry refuses a body naming another agent (``identity_mismatch``).

        Raises:
            InvalidInput: ``op`` is not agent-scoped.
            InvalidSubjectToken: ``agent`` is not a valid subject token.
        """
        if op not in AGENT_REGISTRY_OPS:
            raise InvalidInput(
                f"registry operation {op!r} is not agent-scoped; use one of "
                f"{', '.join(AGENT_REGISTRY_OPS)} (read-only operations: Subjects.registry)",
                details={"op": op},
            )
        return f"{self.prefix}.registry.{op}.{validate_token(agent, what='agent name')}"

    def registry_wildcard(self, op: str) -> str:
        """What the registry subscribes to for an agent-scoped ``op`` (``sb.registry.<op>.*``)."""
        self.registry_for(op, "_")  # validates op
        return f"{self.prefix}.registry.{op}.*"

    def registry_of(self, agent: str) -> tuple[str, ...]:
        """Every registry subject ``agent`` may publish on (its own scoped ones, the reads)."""
        return (
            *(self.registry_for(op, agent) for op in AGENT_REGISTRY_OPS),
            *(self.registry(op) for op in REGISTRY_READ_OPS),
        )

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

    def admin(self, service: str, op: str) -> str:
        """Operator-only endpoint of a service."""
        return f"{self.prefix}.admin.{validate_token(service)}.{validate_token(op)}"


def _safe(actor: str) -> str:
    """Actor names such as ``service:policy`` become valid tokens (``service_policy``)."""
    cleaned = re.sub(r"[^A-Za-z0-9_-]", "_", actor)[:64]
    return cleaned or "_"
