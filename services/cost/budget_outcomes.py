"""What the budget ledger (:mod:`services.cost.budgets`) tells the cost service.

A reservation is a :class:`Grant`, a renewal a :class:`Renewal`, the charging
of a metering transaction's usage a :class:`Settlement`: thresholds crossed
(:class:`BudgetAlert`, audited, a hard one trips a breaker) and usage that
took a budget past its limit with no live reservation covering it
(:class:`Overspend`, alerted, the agent stopped).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from schemas import Budget, BudgetCharge, ReservationState

__all__ = [
    "BudgetAlert",
    "Grant",
    "Overspend",
    "OverspendCause",
    "Renewal",
    "Settlement",
]


@dataclass(frozen=True, slots=True)
class BudgetAlert:
    """A threshold a transaction crossed: audit it (and trip a breaker when ``hard``)."""

    budget: Budget
    charge: BudgetCharge
    hard: bool


#: Why usage was not covered by a live reservation: the reservation it names had
#: expired (released) before the report was metered; it named none (or one that is
#: not its agent's, or already settled); it cost more than its reservation held.
OverspendCause = Literal["expired_reservation", "unreserved", "over_reservation"]


@dataclass(frozen=True, slots=True)
class Overspend:
    """A usage row whose uncovered cost took a budget past its hard limit.

    Past: the window's spent plus what other reservations still hold is above
    the limit once the row is charged (those reservations were granted against
    room this usage took, so their settlements will overrun it too).

    Attributes:
        budget: The budget overrun.
        charge: Its window right after this row was charged.
        agent: The agent whose usage report it was.
        report_id: The usage report.
        reservation_id: The reservation the report named ("" for none).
        cause: See :data:`OverspendCause`.
        cost_nanos: What the report cost.
        uncovered_nanos: The part of it no live reservation held.
    """

    budget: Budget
    charge: BudgetCharge
    agent: str
    report_id: str
    reservation_id: str
    cause: OverspendCause
    cost_nanos: int
    uncovered_nanos: int


@dataclass(slots=True)
class Settlement:
    """Outcome of :meth:`~services.cost.budgets.BudgetLedger.settle`.

    Attributes:
        alerts: Thresholds crossed (audit them; trip breakers on hard ones).
        unreserved: ``(agent, report id)`` of rows that some budget applies
            to but that settled no open reservation of their agent: charged
            all the same, and flagged.
        expired: ``(agent, report id)`` of the ``unreserved`` rows whose
            reservation (their agent's) had expired before they were metered.
        overspends: Rows whose uncovered cost took a budget past its limit,
            in the order they were charged.
    """

    alerts: list[BudgetAlert] = field(default_factory=list)
    unreserved: list[tuple[str, str]] = field(default_factory=list)
    expired: list[tuple[str, str]] = field(default_factory=list)
    overspends: list[Overspend] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Renewal:
    """Outcome of :meth:`~services.cost.budgets.BudgetLedger.renew` for a reservation of the
    asking agent.

    Attributes:
        state: ``open``, ``settled`` or ``expired`` (only an open one is renewed).
        expires_at: Its expiry after this renewal.
        renewed: This renewal moved the expiry.
        capped: The expiry is at the reservation's longest life.
    """

    state: ReservationState
    expires_at: float
    renewed: bool = False
    capped: bool = False


@dataclass(slots=True)
class Grant:
    """Outcome of :meth:`~services.cost.budgets.BudgetLedger.reserve`."""

    granted: bool
    charges: list[BudgetCharge] = field(default_factory=list)
    refused: BudgetCharge | None = None
    #: The refused budget had no room even without this call (spent >= limit).
    exhausted: bool = False
    alerts: list[BudgetAlert] = field(default_factory=list)
