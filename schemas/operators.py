"""Named operators: credentials with a role, issued and revoked by an admin operator
(``sb.admin.operators.*``, served by the registry)."""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from schemas._base import Wire
from schemas.identity import credential_status
from schemas.registry import Name, ShortText

__all__ = [
    "AddOperator",
    "ListOperators",
    "OperatorAdded",
    "OperatorInfo",
    "OperatorList",
    "OperatorRevoked",
    "OperatorRole",
    "RevokeOperator",
]

#: ``admin`` may ask every admin operation; ``viewer`` only the read-only ones
#: (``broker.runtime.permissions.OPERATOR_READ_OPS``).
OperatorRole = Literal["admin", "viewer"]


class AddOperator(Wire, frozen=True, tag="add_operator.v1"):
    """Issue a credential for operator ``name`` (``sb.admin.operators.add``).

    Attributes:
        name: The operator's name: its identity in every audit record.
        role: ``admin`` or ``viewer``.
        ttl: Lifetime in seconds; 0: ``SIGNALBOX_OPERATOR_CREDENTIAL_TTL``.
        note: Free text kept with the credential.
    """

    name: Name
    role: OperatorRole = "viewer"
    ttl: Annotated[float, msgspec.Meta(ge=0, le=366 * 86400)] = 0.0
    note: ShortText = ""


class OperatorInfo(Wire, frozen=True, tag="operator_info.v1"):
    """An operator credential as operators see it (never its secret)."""

    id: str
    name: str
    role: str
    created_at: float
    expires_at: float
    revoked_at: float | None = None
    created_by: str = ""
    note: str = ""

    def status(self, now: float) -> str:
        """``active``, ``expired`` or ``revoked`` at time ``now``."""
        return credential_status(self.revoked_at, self.expires_at, now)


class OperatorAdded(Wire, frozen=True, tag="operator_added.v1"):
    """A fresh operator credential; ``token`` is shown this once and never stored
    (``SIGNALBOX_OPERATOR_CREDENTIAL``)."""

    operator: OperatorInfo
    token: str


class ListOperators(Wire, frozen=True, tag="list_operators.v1"):
    """Operator credentials (``sb.admin.operators.list``); active ones only unless
    ``include_inactive``."""

    include_inactive: bool = False


class OperatorList(Wire, frozen=True, tag="operator_list.v1"):
    """Operator credentials, newest first."""

    operators: tuple[OperatorInfo, ...] = ()


class RevokeOperator(Wire, frozen=True, tag="revoke_operator.v1"):
    """Revoke operator ``name``'s credentials (or one) and close its connections."""

    name: Name
    credential: str | None = None
    reason: ShortText = ""


class OperatorRevoked(Wire, frozen=True, tag="operator_revoked.v1"):
    """What a revocation did."""

    name: str
    credentials: tuple[str, ...] = ()
    disconnected: int = 0
