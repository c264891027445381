"""Budgets on the ``sb.authz`` path: an allowed model use reserves its worst-case cost first.

The cost service holds the counters (``sb.cost.reserve``); the policy
service watches the budget definitions (``sb_budgets``) and asks only when a
budget applies to the use, so unbudgeted agents pay nothing. Fails closed:
no estimate, a refusal, no answer or an unreadable budget record turns the
allow into a deny that says why.

Such a deny is the budget's, not the policies': it carries no ``policy_ids``
and only the budget's reason (the permit that allowed the use is not why it
was refused). What the decision record needs to explain itself (the budget:
scope, name, window, limit, spent, what the call needed; the permit, as
``allowed_by``) comes back beside the decision (:class:`BudgetVerdict`).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import msgspec

from broker.errors import SignalboxError
from broker.money import usd
from broker.replies import request as request_reply
from broker.runtime.budgets import applicable_keys, unreadable_budget, unreadable_keys
from broker.runtime.desk import ServiceHost
from broker.runtime.jetstream import KV_BUDGETS
from broker.runtime.kvcache import KVCache
from schemas import AgentRecord, AuthzRequest, Budget, Decision, Reservation, ReserveBudget
from services.policy.stats import PolicyStats

__all__ = ["BudgetCheck", "BudgetVerdict"]


class BudgetVerdict(NamedTuple):
    """What :meth:`BudgetCheck.reserve` decided, and what its decision record should say.

    Attributes:
        decision: The decision (the allow, with its reservation, or the budget's deny).
        record: Fields for the decision record's ``data``: ``budget`` (the budget that
            refused: ``key``, ``scope``, ``name``, ``window``, ``limit_usd``,
            ``spent_usd``, ``reserved_usd``, ``needed_usd``; or the unreadable one and
            why), ``budgets`` (the keys charged, or that apply), ``allowed_by`` (the
            policies that allowed the use before the budget refused it).
    """

    decision: Decision
    record: dict[str, Any]


class BudgetCheck:
    """Reserves an allowed model use's worst-case cost when a budget applies to it.

    Args:
        host: The service it lives in (connection, JetStream, settings, subjects).
        stats: The service's counters (``budget_refused``, ``budget_unavailable``,
            ``budget_unreadable``).
    """

    def __init__(self, host: ServiceHost, stats: PolicyStats) -> None:
        self._host = host
        self._stats = stats
        #: Budget definitions (``sb_budgets``): does a model call need a reservation?
        self.budgets: KVCache[Budget] | None = None

    async def start(self) -> None:
        """Load and watch the budget definitions."""
        self.budgets = KVCache(await self._host.js.key_value(KV_BUDGETS), Budget)
        await self.budgets.start()

    async def stop(self) -> None:
        """Stop watching."""
        if self.budgets is not None:
            await self.budgets.stop()

    async def reserve(
        self,
        agent: str,
        record: AgentRecord | None,
        request: AuthzRequest,
        decision: Decision,
        trace_id: str,
        parents: tuple[str, ...] = (),
    ) -> BudgetVerdict:
        """Reserve an allowed model call's worst-case cost if any budget applies to it.

        ``parents`` are the agents the call is made for, from the signed
        delegation chain of the call the agent is serving (never from the
        request's own ``on_behalf_of``, which any agent could fill with any
        name): their budgets are charged too.

        The cost service holds the counters (``sb.cost.reserve``); this
        replica only asks when a budget applies (its watched ``sb_budgets``
        copy says so), so unbudgeted agents pay nothing. Fails closed: no
        estimate, a refusal, or no answer turns the allow into a deny that
        says why. So does an unreadable budget record among the ones the call
        would be charged to (``budget_unreadable``): never skipped as absent.
        """
        assert self.budgets is not None
        team = record.manifest.team if record is not None else ""
        if self.budgets.unreadable:
            bad = unreadable_keys(
                self.budgets.unreadable, agent=agent, team=team, project=request.project,
                on_behalf_of=parents,
            )  # fmt: skip
            if bad:
                self._stats.budget_unreadable += 1
                key, why = bad[0]
                err = unreadable_budget(key, why)
                return _budget_denial(
                    decision, "budget_unreadable", err.message,
                    budget={**_named(key), "unreadable": why},
                )  # fmt: skip
        applicable = (
            applicable_keys(
                self.budgets, agent=agent, team=team, project=request.project,
                on_behalf_of=parents,
            )
            if len(self.budgets)
            else []
        )  # fmt: skip
        if not applicable:
            return BudgetVerdict(decision, {})
        keys = [b.key for b in applicable]
        if not request.estimated_tokens:
            return _budget_denial(
                decision, "estimate_required",
                f"{agent} has a budget: authorize model calls with estimated_tokens (and "
                "max_output_tokens) so their worst-case cost can be reserved before the call",
                budgets=keys,
            )  # fmt: skip
        ask = ReserveBudget(
            agent=agent, model=request.resource, input_tokens=request.estimated_tokens,
            output_tokens=request.max_output_tokens, project=request.project,
            on_behalf_of=parents, trace_id=trace_id,
        )  # fmt: skip
        host = self._host
        try:
            reservation = await request_reply(
                host.nc, host.subjects.cost_reserve, ask, Reservation,
                timeout=host.settings.budget_reserve_timeout,
                hint="no cost service is answering budget reservations",
            )  # fmt: skip
        except SignalboxError as err:
            self._stats.budget_unavailable += 1
            return _budget_denial(
                decision, "budget_unavailable",
                f"the budget of {agent} could not be checked ({err.message}); model calls "
                "of budgeted agents are refused until the cost service answers",
                budgets=keys,
            )  # fmt: skip
        if not reservation.granted:
            self._stats.budget_refused += 1
            b = reservation.refused
            assert b is not None
            denied = _budget_denial(
                decision, "budget_exceeded",
                f"budget {b.key} would be exceeded: limit {usd(b.limit_usd)}, spent "
                f"{usd(b.spent_usd)}, reserved {usd(b.reserved_usd)}, this call needs up "
                f"to {usd(reservation.amount_usd)}; raise it with `signalbox budgets set` "
                "or wait for the window to end",
                budget={
                    **_named(b.key), "limit_usd": b.limit_usd, "spent_usd": b.spent_usd,
                    "reserved_usd": b.reserved_usd, "needed_usd": reservation.amount_usd,
                },
            )  # fmt: skip
            return denied._replace(decision=msgspec.structs.replace(denied.decision, budget=b))
        granted = msgspec.structs.replace(
            decision, reservation_id=reservation.id, reserved_usd=reservation.amount_usd
        )
        return BudgetVerdict(granted, {"budgets": [c.key for c in reservation.charges]})


def _named(key: str) -> dict[str, str]:
    """A budget key (``<scope>.<name>.<window>``) and its parts, for a decision record."""
    scope, _, rest = key.partition(".")
    name, _, window = rest.rpartition(".")
    return {"key": key, "scope": scope, "name": name, "window": window}


def _budget_denial(decision: Decision, code: str, reason: str, **record: Any) -> BudgetVerdict:
    """``decision`` (an allow) turned into a deny by a budget guard.

    The deny is the budget's: no ``policy_ids``, only the budget's reason (the
    permit's ids and reasons would read as why it was refused). The permit is
    kept in the record's ``allowed_by``, with the ``record`` fields given.
    """
    denied = msgspec.structs.replace(
        decision, effect="deny", reason_code=code, reasons=(reason,), policy_ids=()
    )
    return BudgetVerdict(denied, {**record, "allowed_by": list(decision.policy_ids)})
