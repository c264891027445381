"""Subject builders. Names that are not valid subject tokens are rejected here.

All subjects hang under one configurable prefix (default ``sb``)::

    sb.out.<caller>.<target>.<capability>   caller -> policy (request)
    sb.in.<target>.<capability>             policy -> target (request)
    sb.registry.<op>                        registry endpoints
    sb.audit.in.<kind>.<actor>              audit intake (stream SB_AUDIT_IN)
    sb.audit.log.<kind>.<actor>             chained audit (stream SB_AUDIT)
    sb.usage.<agent>                        usage reports (stream SB_USAGE)
    sb.admin.<service>.<op>                 operator-only endpoints
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from broker.errors import InvalidSubjectToken

__all__ = ["Subjects", "inbox_prefix", "is_valid_token", "validate_token"]

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


def inbox_prefix(agent: str) -> str:
    """Private inbox prefix of an agent (replies to its requests land under it)."""
    return f"_INBOX.{validate_token(agent, what='agent name')}"


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

    def inbound_of(self, target: str) -> str:
        """Every capability subject of ``target`` (its subscribe permission)."""
        return f"{self.prefix}.in.{validate_token(target, what='target')}.*"

    def registry(self, op: str) -> str:
        """Registry endpoint subject (``register``, ``get``, ``list``, ``deregister``)."""
        return f"{self.prefix}.registry.{validate_token(op, what='registry operation')}"

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

    def usage(self, agent: str) -> str:
        """Where an agent reports LLM/tool usage."""
        return f"{self.prefix}.usage.{validate_token(agent, what='agent name')}"

    @property
    def usage_all(self) -> str:
        """Filter of the usage stream."""
        return f"{self.prefix}.usage.*"

    def admin(self, service: str, op: str) -> str:
        """Operator-only endpoint of a service."""
        return f"{self.prefix}.admin.{validate_token(service)}.{validate_token(op)}"


def _safe(actor: str) -> str:
    """Actor names such as ``service:policy`` become valid tokens (``service_policy``)."""
    cleaned = re.sub(r"[^A-Za-z0-9_-]", "_", actor)[:64]
    return cleaned or "_"
