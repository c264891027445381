"""Agent credentials: enrollment, listing and revocation (operator-only endpoints)."""

from __future__ import annotations

from typing import Annotated

import msgspec

from schemas._base import Wire
from schemas.registry import Name, ShortText

__all__ = [
    "CredentialInfo",
    "CredentialList",
    "EnrollAgent",
    "Enrolled",
    "ListCredentials",
    "RevokeAgent",
    "Revoked",
]

#: Credential id: the public half of a credential, safe to show and log.
CredentialId = Annotated[str, msgspec.Meta(pattern=r"^[a-z2-7]{16}$(?!\n)")]


class EnrollAgent(Wire, frozen=True, tag="enroll_agent.v1"):
    """Issue a credential for agent ``name`` (``sb.admin.registry.enroll``).

    Attributes:
        name: The agent the credential will authenticate as.
        ttl: Lifetime in seconds; 0 means the registry's default
            (``SIGNALBOX_AGENT_CREDENTIAL_TTL``).
        note: Free text kept with the credential (who it is for, a ticket).
    """

    name: Name
    ttl: Annotated[float, msgspec.Meta(ge=0, le=366 * 86400)] = 0.0
    note: ShortText = ""


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
        if self.revoked_at is not None:
            return "revoked"
        return "expired" if self.expires_at <= now else "active"


class Enrolled(Wire, frozen=True, tag="enrolled.v1"):
    """A freshly issued credential. ``token`` is shown this once and never stored.

    Give ``token`` to the agent (``SIGNALBOX_AGENT_CREDENTIAL`` or
    ``Agent(credential=...)``).
    """

    credential: CredentialInfo
    token: str


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
