"""Budgets: definitions (KV ``sb_budgets``), reservations before spend, operators' views.

A budget caps what one agent, team or project may spend on models in a
calendar window (UTC day or month). Definitions are small configuration
and live in the KV bucket ``sb_budgets`` (key ``<scope>.<name>.<window>``),
watched by every policy and cost replica; the amounts spent and reserved
are counters in the cost service's SQL store, changed only inside
transactions that lock the budget's row (one writer per budget at a time).

Operators manage budgets on ``sb.admin.budgets.<op>`` (cost service)::

    set     SetBudget      -> BudgetStatus   (audited, kind admin; partial updates)
    remove  RemoveBudget   -> BudgetStatus   (audited, kind admin)
    list    ListBudgets    -> BudgetList
    show    ShowBudget     -> BudgetList     (one budget, current and past windows)

The policy service asks ``sb.cost.reserve`` (services only) when it allows a
model call of an agent some budget applies to, and the cost service answers
a :class:`Reservation`. While the call runs, the agent's SDK keeps that
reservation alive on ``sb.cost.renew.<agent>`` (:class:`RenewReservation`
-> :class:`ReservationRenewed`).
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from msgspec import UNSET, UnsetType

from schemas._base import Wire

__all__ = [
    "Budget",
    "BudgetCharge",
    "BudgetList",
    "BudgetScope",
    "BudgetStatus",
    "BudgetWindow",
    "ListBudgets",
    "RemoveBudget",
    "RenewReservation",
    "Reservation",
    "ReservationRenewed",
    "ReservationState",
    "ReserveBudget",
    "SetBudget",
    "ShowBudget",
]

#: Who a budget caps.
BudgetScope = Literal["agent", "team", "project"]
#: Calendar window (UTC) after which the spent amount starts again from zero.
BudgetWindow = Literal["day", "month"]
#: A reservation holds its amount while ``open``; ``settled`` by its usage report, or
#: ``expired`` (released) when nobody settled or renewed it in time.
ReservationState = Literal["open", "settled", "expired"]

_Name = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_-]{1,64}$(?!\n)")]
_Usd = Annotated[float, msgspec.Meta(gt=0, le=1e9)]
_Ratio = Annotated[float, msgspec.Meta(gt=0, le=1)]
_Who = Annotated[str, msgspec.Meta(max_length=128)]
_Tokens = Annotated[int, msgspec.Meta(ge=0, le=10**12)]
_Text = Annotated[str, msgspec.Meta(max_length=256)]


class Budget(Wire, frozen=True, tag="budget.v1"):
    """One budget's definition (the value stored in ``sb_budgets``).

    Attributes:
        scope: ``agent``, ``team`` or ``project``.
        name: The agent, team or project name.
        window: ``day`` or ``month`` (UTC calendar windows).
        limit_usd: Hard limit: a model call whose worst-case cost would take
            spent + reserved over it is refused before it is made.
        soft_ratio: Share of the limit at which a ``budget`` alert event is
            audited (once per window).
        set_by: Operator who set it.
        set_at: Unix time it was set.
    """

    scope: BudgetScope
    name: _Name
    window: BudgetWindow
    limit_usd: _Usd
    soft_ratio: _Ratio = 0.8
    set_by: _Who = ""
    set_at: float = 0.0

    @property
    def key(self) -> str:
        """``<scope>.<name>.<window>``: the KV key and the SQL counter key."""
        return f"{self.scope}.{self.name}.{self.window}"


class BudgetCharge(Wire, frozen=True, tag="budget_charge.v1"):
    """Where one budget stands in its current window (after a reservation, or the refusal).

    Attributes:
        key: ``<scope>.<name>.<window>``.
        limit_usd: The hard limit.
        spent_usd: Settled spend in the window.
        reserved_usd: Open reservations in the window (including this one
            when it was granted).
        window_start: Unix time the window began.
        window_end: Unix time the window ends (spend starts again from zero).
    """

    key: str
    limit_usd: float
    spent_usd: float = 0.0
    reserved_usd: float = 0.0
    window_start: float = 0.0
    window_end: float = 0.0


class ReserveBudget(Wire, frozen=True, tag="reserve_budget.v1"):
    """Policy asks the cost service to reserve a model call's worst-case cost (``sb.cost.reserve``).

    The cost service charges the agent's own budgets, its team's (from the
    registry, not from this request), the project's, and those of every
    agent in ``on_behalf_of`` (a parent task pays for its sub-calls too): the
    policy service fills it from the signed delegation chain of the call the
    agent is serving, never from what the agent declares.

    Attributes:
        agent: The agent making the model call (proven by its authz subject).
        model: Model id, priced from the prices file.
        input_tokens: Estimated prompt tokens.
        output_tokens: Most completion tokens the call may produce; 0 means
            unknown, and then every estimated token is priced as output
            (the dearer side), so the reservation stays a worst case.
        project: Project charged.
        on_behalf_of: Verified delegation chain, outermost first.
        trace_id: Trace of the call, for the audit record.
    """

    agent: _Name
    model: _Text
    input_tokens: _Tokens = 0
    output_tokens: _Tokens = 0
    project: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_-]{0,64}$(?!\n)")] = ""
    on_behalf_of: Annotated[tuple[_Text, ...], msgspec.Meta(max_length=32)] = ()
    trace_id: str = ""


class Reservation(Wire, frozen=True, tag="reservation.v1"):
    """The cost service's answer to :class:`ReserveBudget`.

    Attributes:
        granted: True if the amount is now reserved on every applicable budget.
        id: Reservation id (granted only); settle it by reporting usage with
            ``reservation_id`` set to it. Unsettled, it expires at ``expires_at``.
        amount_usd: Worst-case cost reserved (or that was refused).
        expires_at: Unix time an unsettled reservation is released.
        charges: Every budget charged, as it stands after the reservation.
        refused: The first budget that could not take the amount (refusals only).
        priced_by_fallback: The model is not in the prices file; the fallback
            price was used.
    """

    granted: bool
    id: str = ""
    amount_usd: float = 0.0
    expires_at: float = 0.0
    charges: tuple[BudgetCharge, ...] = ()
    refused: BudgetCharge | None = None
    priced_by_fallback: bool = False


class RenewReservation(Wire, frozen=True, tag="renew_reservation.v1"):
    """An agent keeps the reservation of its model call in progress (``sb.cost.renew.<agent>``).

    The SDK sends it while an ``Agent.model_call`` block runs. The asking
    agent is the subject's last token (the server binds it to the agent's
    credential), never a field: only a reservation of that agent is renewed.

    Attributes:
        reservation_id: ``Decision.reservation_id`` of the call.
    """

    reservation_id: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_-]{1,64}$(?!\n)")]


class ReservationRenewed(Wire, frozen=True, tag="reservation_renewed.v1"):
    """The cost service's answer to :class:`RenewReservation`.

    A renewal extends an open reservation to at most
    ``SIGNALBOX_BUDGET_RESERVATION_TTL`` seconds from now, and never past
    ``SIGNALBOX_BUDGET_RESERVATION_MAX_LIFETIME`` after it was made.

    Attributes:
        reservation_id: The reservation.
        state: ``open`` (it holds its amount until ``expires_at``), ``settled``
            or ``expired`` (nothing was renewed).
        renewed: True if this request moved ``expires_at`` (a renewal asked
            long before it is due leaves it as it is).
        expires_at: Unix time (the cost service's clock) the reservation is
            released unless renewed again or settled.
        renew_in: Seconds after which to renew again (0: do not; it is no
            longer open, or ``capped``).
        capped: The reservation reached its longest life and will not be
            extended again.
    """

    reservation_id: str
    state: ReservationState
    renewed: bool = False
    expires_at: float = 0.0
    renew_in: float = 0.0
    capped: bool = False


class BudgetStatus(Wire, frozen=True, tag="budget_status.v1"):
    """A budget and where it stands in one window.

    Attributes:
        budget: The definition.
        spent_usd: Settled spend in the window.
        reserved_usd: Open reservations in the window.
        remaining_usd: ``limit - spent - reserved`` (never below zero).
        window_start: Unix time the window began.
        window_end: Unix time it ends.
        soft_alerted: The soft threshold was crossed in this window.
        open_reservations: Reservations still open in this window.
    """

    budget: Budget
    spent_usd: float = 0.0
    reserved_usd: float = 0.0
    remaining_usd: float = 0.0
    window_start: float = 0.0
    window_end: float = 0.0
    soft_alerted: bool = False
    open_reservations: int = 0


class SetBudget(Wire, frozen=True, tag="set_budget.v1"):
    """Operator sets (creates or changes) a budget: only the fields it gives change.

    A field left out (``UNSET``: absent on the wire) keeps the existing
    budget's value; a new budget gets :class:`Budget`'s defaults (a soft
    threshold of 80%) and must be given ``limit_usd``. A client that sends
    every field (as every client before partial updates did) sets them all.
    The cost service merges and writes under compare-and-set on the budget's
    KV entry, so two operators changing different fields at once both land.

    Attributes:
        scope: ``agent``, ``team`` or ``project``.
        name: The agent, team or project name.
        window: ``day`` or ``month``. Left out: the owner's only budget if it
            has one, ``day`` if it has none; it must be given when the owner
            has both.
        limit_usd: Hard limit in USD per window (required for a new budget).
        soft_ratio: Share of the limit at which a ``budget`` alert is audited.
        requested_by: Operator.
    """

    scope: BudgetScope
    name: _Name
    window: BudgetWindow | UnsetType = UNSET
    limit_usd: _Usd | UnsetType = UNSET
    soft_ratio: _Ratio | UnsetType = UNSET
    requested_by: _Who = ""


class RemoveBudget(Wire, frozen=True, tag="remove_budget.v1"):
    """Operator removes a budget (its past windows stay in the store)."""

    scope: BudgetScope
    name: _Name
    window: BudgetWindow
    requested_by: _Who = ""


class ListBudgets(Wire, frozen=True, tag="list_budgets.v1"):
    """Operator lists budgets (optionally one scope) with their current windows."""

    scope: BudgetScope | None = None


class ShowBudget(Wire, frozen=True, tag="show_budget.v1"):
    """Operator shows one scope/name's budgets, current and up to ``windows`` past windows."""

    scope: BudgetScope
    name: _Name
    windows: Annotated[int, msgspec.Meta(ge=1, le=366)] = 7


class BudgetList(Wire, frozen=True, tag="budget_list.v1"):
    """Budgets and their windows, most recent window first per budget.

    Attributes:
        budgets: The readable budgets.
        unreadable: Records of ``sb_budgets`` that cannot be read, key -> why
            (the model calls they govern are refused until they are rewritten
            with ``signalbox budgets set``).
    """

    budgets: tuple[BudgetStatus, ...] = ()
    unreadable: dict[str, str] = msgspec.field(default_factory=dict)
