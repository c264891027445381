"""Shadow mode: a candidate policy set evaluated beside the active one, outcomes untouched.

``signalbox policy shadow DIR`` stores the candidate as a (non-active) version
of ``sb_policies`` and points the bucket's ``shadow`` key at it; every
policy replica watches that key. While a shadow set runs, each decision the
active set makes is also asked of the shadow set; when the effects differ,
the disagreement is audited (kind ``shadow``: both effects, both sets'
deciding policy ids and versions, what was asked) and counted. The caller
always gets the active set's answer. ``signalbox policy shadow --off``
deletes the key.

Cost: one more Cedar evaluation per decision, only while shadow mode is on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from schemas import Decision
from services.policy.cedar.decider import CedarDecider
from services.policy.cedar.policy_set import CedarPolicies
from services.policy.decider import AccessRequest, CallRequest

__all__ = ["Shadow", "disagreement"]


@dataclass(slots=True)
class Shadow:
    """The shadow set a replica evaluates (one per replica, swapped as the key changes)."""

    version: int
    decider: CedarDecider

    @classmethod
    def of(cls, version: int, policies: CedarPolicies) -> Shadow:
        """A shadow over stored version ``version``."""
        # No memo: shadow decisions are rare enough, and must see the shadow set only.
        return cls(version=version, decider=CedarDecider(policies, memo_size=0))


def disagreement(shadow: Shadow, request: AccessRequest, active: Decision) -> dict[str, Any] | None:
    """The audit data of a disagreement, or None when the shadow set agrees."""
    other = shadow.decider.decide(request)
    if other.effect == active.effect:
        return None
    if isinstance(request, CallRequest):
        asked = {
            "caller": request.caller,
            "target": request.target,
            "capability": request.capability,
            "action": "call",
        }
    else:
        asked = {"agent": request.agent, "action": request.action, "resource": request.resource}
    return {
        **asked,
        "active": {
            "effect": active.effect,
            "policy_ids": list(active.policy_ids),
            "policy_version": active.policy_version,
        },
        "shadow": {
            "effect": other.effect,
            "policy_ids": list(other.policy_ids),
            "policy_version": other.policy_version,
            "version": shadow.version,
            "reasons": list(other.reasons),
        },
    }
