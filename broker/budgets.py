"""Which budgets a model call charges: shared by the policy service (does any
budget apply, so must the call reserve?) and the cost service (reserve and
settle on exactly those).

Budget definitions are :class:`schemas.Budget` values in the KV bucket
``sb_budgets`` under ``<scope>.<name>.<window>``; both services watch it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

from schemas import Budget

__all__ = ["BudgetLookup", "applicable_keys"]


class BudgetLookup(Protocol):
    """Budget definitions by key (a dict, or the watched ``sb_budgets`` cache)."""

    def get(self, key: str, /) -> Budget | None:
        """The budget stored under ``key``, or None."""


def applicable_keys(
    budgets: BudgetLookup,
    *,
    agent: str,
    team: str,
    project: str,
    on_behalf_of: Iterable[str],
) -> list[Budget]:
    """The budgets a model call of ``agent`` charges, in key order.

    The agent's own, its team's, the project's, and the agent budgets of
    every agent in the delegation chain (a parent task pays for the calls
    made on its behalf).
    """
    owners = [("agent", agent)]
    if team:
        owners.append(("team", team))
    if project:
        owners.append(("project", project))
    owners.extend(("agent", parent) for parent in on_behalf_of if parent and parent != agent)
    found: dict[str, Budget] = {}
    for scope, name in owners:
        for window in ("day", "month"):
            budget = budgets.get(f"{scope}.{name}.{window}")
            if budget is not None:
                found[budget.key] = budget
    return [found[k] for k in sorted(found)]
