"""Which budgets a model call charges: shared by the policy service (does any
budget apply, so must the call reserve?) and the cost service (reserve and
settle on exactly those).

Budget definitions are :class:`schemas.Budget` values in the KV bucket
``sb_budgets`` under ``<scope>.<name>.<window>``; both services watch it.

A stored definition that cannot be read (not JSON, invalid UTF-8, a wrong
tag or field) is never skipped: the key still says whose budget it is, so
:func:`unreadable_keys` finds it among a call's candidate keys and
:func:`unreadable_budget` is the refusal both services give (the model calls
it governs are denied until an operator rewrites it with ``signalbox budgets
set``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Protocol

from broker.errors import ConfigError
from schemas import Budget

__all__ = [
    "BudgetLookup",
    "applicable_keys",
    "candidate_keys",
    "unreadable_budget",
    "unreadable_keys",
]


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
    found: dict[str, Budget] = {}
    for key in candidate_keys(agent=agent, team=team, project=project, on_behalf_of=on_behalf_of):
        budget = budgets.get(key)
        if budget is not None:
            found[budget.key] = budget
    return [found[k] for k in sorted(found)]


def candidate_keys(
    *, agent: str, team: str, project: str, on_behalf_of: Iterable[str]
) -> list[str]:
    """Every ``sb_budgets`` key a model call of ``agent`` could be charged to (see
    :func:`applicable_keys`), whether or not a budget is stored there."""
    owners = [("agent", agent)]
    if team:
        owners.append(("team", team))
    if project:
        owners.append(("project", project))
    owners.extend(("agent", parent) for parent in on_behalf_of if parent and parent != agent)
    return [f"{scope}.{name}.{window}" for scope, name in owners for window in ("day", "month")]


def unreadable_keys(
    unreadable: Mapping[str, str],
    *,
    agent: str,
    team: str,
    project: str,
    on_behalf_of: Iterable[str],
) -> list[tuple[str, str]]:
    """The ``(key, reason)`` of every unreadable budget record a model call of ``agent``
    would be charged to, in key order.

    ``unreadable`` maps keys to why they cannot be read
    (:attr:`broker.runtime.kvcache.KVCache.unreadable`).
    """
    if not unreadable:
        return []
    keys = candidate_keys(agent=agent, team=team, project=project, on_behalf_of=on_behalf_of)
    return sorted((k, unreadable[k]) for k in set(keys) if k in unreadable)


def unreadable_budget(key: str, reason: str) -> ConfigError:
    """The refusal of a model call governed by the unreadable budget record ``key``.

    Names the record, why it cannot be read, and the command that rewrites it.
    """
    scope, _, rest = key.partition(".")
    name, _, window = rest.rpartition(".")
    fix = f"signalbox budgets set {scope}:{name} --limit USD --window {window}"
    return ConfigError(
        f"budget record {key} in KV bucket sb_budgets is unreadable ({reason}); the model "
        f"calls it governs are refused until it is rewritten: `{fix}` (then `signalbox "
        f"budgets remove {scope}:{name} --window {window}` if it should not exist)",
        details={
            "budget": key,
            "bucket": "sb_budgets",
            "reason": reason,
            "reason_code": "budget_unreadable",
            "fix": fix,
        },
    )
