"""Authorization decisions."""

from __future__ import annotations

from typing import Literal

from schemas._base import Wire

__all__ = ["Decision", "Effect"]

Effect = Literal["allow", "deny", "needs_approval"]


class Decision(Wire, frozen=True, tag="decision.v1"):
    """The outcome of authorizing one request.

    Attributes:
        effect: ``allow``, ``deny`` or ``needs_approval``.
        reasons: Why, in words an operator can act on.
        policy_ids: Ids of the rules/policies that decided.
        policy_version: Version of the active policy set.
        eval_us: Evaluation time in microseconds.
    """

    effect: Effect
    reasons: tuple[str, ...] = ()
    policy_ids: tuple[str, ...] = ()
    policy_version: str = ""
    eval_us: float = 0.0
