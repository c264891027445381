"""Agent credentials and bound attributes: enrollment, binding, listing and revocation
(operator-only endpoints)."""

from __future__ import annotations

from typing import Annotated

import msgspec

from schemas._base import Wire
from schemas.registry import Name, ShortText

__all__ = [
    "BINDING_FIELDS",
    "AgentBinding",
    "BindAgent",
    "Bound",
    "CredentialInfo",
    "CredentialList",
    "EnrollAgent",
    "Enrolled",
    "GetBinding",
    "ListCredentials",
    "RevokeAgent",
    "Revoked",
    "credential_status",
]

#: Credential id: the public half of a credential, safe to show and log.
CredentialId = Annotated[str, msgspec.Meta(pattern=r"^[a-z2-7]{16}$(?!\n)")]

#: One project or principal tag: tags and projects travel comma-joined in
#: manifest metadata, so no commas, and no surrounding whitespace.
AttributeValue = Annotated[
    str, msgspec.Meta(max_length=256, pattern=r"^[^,\s](?:[^,\r\n]*[^,\s])?$(?!\n)")
]
AttributeValues = Annotated[tuple[AttributeValue, ...], msgspec.Meta(max_length=64)]

#: The attributes an operator binds to an agent, in display order.
BINDING_FIELDS = ("team", "owner", "namespace", "region", "projects", "tags")


class AgentBinding(Wire, frozen=True, tag="agent_binding.v1"):
    """The governance attributes an operator bound to an agent (never set by the agent).

    The registry stores the agent's registered manifests with these values
    (``team``, ``owner``, ``region``; ``project`` = one of ``projects``;
    metadata ``namespace``, ``tags`` and ``projects``), so Cedar policies,
    budgets, breakers and cost attribution see them, whatever the agent
    declares; a manifest declaring another value is refused
    (``attribute_mismatch``).

    Attributes:
        agent: The agent's name.
        team: Owning team (team budgets and breakers, discovery).
        owner: Owner; also who the agent name belongs to in the registry.
        namespace: Cedar ``principal.namespace`` (empty: ``default``).
        region: Data residency region of the agent.
        projects: Projects its usage may be charged to (the first is the
            manifest's ``project``); a usage report naming another is not
            charged to it.
        tags: Cedar ``principal.tags`` (``data-residency:eu``...).
        bound_at: Unix time of the last change.
        bound_by: Who made it (``operator:<login>``).
    """

    agent: str
    team: str = ""
    owner: str = ""
    namespace: str = ""
    region: str = ""
    projects: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()
    bound_at: float = 0.0
    bound_by: str = ""


class EnrollAgent(Wire, frozen=True, tag="enroll_agent.v1"):
    """Issue a credential for agent ``name`` (``sb.admin.registry.enroll``).

    The attribute fields bind the agent's governance attributes (see
    :class:`AgentBinding`); ``None`` leaves an attribute as it is bound
    already (nothing, for a new agent), so enrolling again only for a new
    credential keeps the binding.

    Attributes:
        name: The agent the credential will authenticate as.
        ttl: Lifetime in seconds; 0 means the registry's default
            (``SIGNALBOX_AGENT_CREDENTIAL_TTL``).
        note: Free text kept with the credential (who it is for, a ticket).
        team: Bind this team.
        owner: Bind this owner.
        namespace: Bind this Cedar namespace.
        region: Bind this data-residency region.
        projects: Bind these projects (replacing the bound ones).
        tags: Bind these principal tags (replacing the bound ones).
        requested_by: Who asks (the operator's login; audited).
    """

    name: Name
    ttl: Annotated[float, msgspec.Meta(ge=0, le=366 * 86400)] = 0.0
    note: ShortText = ""
    team: ShortText | None = None
    owner: ShortText | None = None
    namespace: ShortText | None = None
    region: ShortText | None = None
    projects: AttributeValues | None = None
    tags: AttributeValues | None = None
    requested_by: ShortText = ""


def credential_status(revoked_at: float | None, expires_at: float, now: float) -> str:
    """``active``, ``expired`` or ``revoked`` at time ``now`` (agents' and operators'
    credentials)."""
    if revoked_at is not None:
        return "revoked"
    return "expired" if expires_at <= now else "active"


class CredentialInfo(Wire, frozen=True, tag="credential_info.v1"):
    """A credential as operators see it (never its secret)."""

    id: str
    agent: str
    created_at: float
    expires_at: float
    revoked_at: float | None = None
    created_by: str = ""
    note: str = ""

    def status(self, now: float) -> str:
        """``active``, ``expired`` or ``revoked`` at time ``now``."""
        return credential_status(self.revoked_at, self.expires_at, now)


class Enrolled(Wire, frozen=True, tag="enrolled.v1"):
    """A freshly issued credential. ``token`` is shown this once and never stored.

    Give ``token`` to the agent (``SIGNALBOX_AGENT_CREDENTIAL`` or
    ``Agent(credential=...)``).
    """

    credential: CredentialInfo
    token: str
    binding: AgentBinding | None = None


class BindAgent(Wire, frozen=True, tag="bind_agent.v1"):
    """Change an agent's bound attributes (``sb.admin.registry.bind``, operators only).

    A partial update: only the attributes given (not ``None``) change; ``""``
    or ``()`` clears one. The agent's registered versions are rewritten with
    the new values at once (policies, budgets and discovery see them), and
    the change is audited (kind ``admin``) with the binding before and after.

    Attributes:
        name: The agent (enrolled already).
        reason: Kept in the audit event.
        requested_by: Who asks (the operator's login; audited).
    """

    name: Name
    team: ShortText | None = None
    owner: ShortText | None = None
    namespace: ShortText | None = None
    region: ShortText | None = None
    projects: AttributeValues | None = None
    tags: AttributeValues | None = None
    reason: ShortText = ""
    requested_by: ShortText = ""


class Bound(Wire, frozen=True, tag="bound.v1"):
    """What a binding change did.

    Attributes:
        binding: The binding now in force.
        previous: The binding before (None: the agent had none).
        changed: The attributes whose value changed.
        versions: Registered versions of the agent rewritten with it.
    """

    binding: AgentBinding
    previous: AgentBinding | None = None
    changed: tuple[str, ...] = ()
    versions: int = 0


class GetBinding(Wire, frozen=True, tag="get_binding.v1"):
    """Ask for an agent's bound attributes (``sb.admin.registry.binding``, operators only)."""

    name: Name


class ListCredentials(Wire, frozen=True, tag="list_credentials.v1"):
    """List credentials (``sb.admin.registry.credentials``), of one agent or all."""

    name: Name | None = None
    include_inactive: bool = False


class CredentialList(Wire, frozen=True, tag="credential_list.v1"):
    """Credentials, newest first."""

    items: tuple[CredentialInfo, ...] = ()


class RevokeAgent(Wire, frozen=True, tag="revoke_agent.v1"):
    """Revoke an agent's credentials and disconnect it (``sb.admin.registry.revoke``).

    Attributes:
        name: The agent.
        credential: Revoke only this credential id (default: all of the agent's).
        reason: Kept in the audit event.
    """

    name: Name
    credential: CredentialId | None = None
    reason: ShortText = ""


class Revoked(Wire, frozen=True, tag="revoked.v1"):
    """What a revocation did."""

    agent: str
    credentials: tuple[str, ...] = ()
    disconnected: int = 0
