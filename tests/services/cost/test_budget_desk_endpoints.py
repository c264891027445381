"""The cost service includes its budget desk: every budget endpoint served once, typed.

Checks the composition without a server (as ``tests/services/policy/test_desks.py``
does for the policy service): the subjects, request types, audiences and
handlers the cost service answers, in the order they are subscribed; and that
the renewal endpoint's agent is the one its subject names.
"""

from __future__ import annotations

from pathlib import Path

from broker.runtime.service import Service
from broker.settings import Settings
from broker.subjects import Audience
from schemas import (
    CostByVersionRequest,
    CostReportRequest,
    HealthRequest,
    ListBudgets,
    RemoveBudget,
    RenewReservation,
    ReserveBudget,
    SetBudget,
    ShowBudget,
)
from services.cost.service import CostService

EXPECTED = [
    ("sb.admin.cost.status", HealthRequest, Audience.OPERATOR),
    ("sb.admin.cost.report", CostReportRequest, Audience.OPERATOR),
    ("sb.cost.versions", CostByVersionRequest, Audience.SERVICE),
    ("sb.cost.reserve", ReserveBudget, Audience.SERVICE),
    ("sb.cost.renew.*", RenewReservation, Audience.AGENT),
    ("sb.admin.budgets.set", SetBudget, Audience.OPERATOR),
    ("sb.admin.budgets.remove", RemoveBudget, Audience.OPERATOR),
    ("sb.admin.budgets.list", ListBudgets, Audience.OPERATOR),
    ("sb.admin.budgets.show", ShowBudget, Audience.OPERATOR),
]


def test_the_budget_desk_endpoints_are_served_once_with_their_handlers(tmp_path: Path) -> None:
    cost = CostService(Settings(nats_url="nats://127.0.0.1:4222", data_dir=tmp_path))
    served = [(ep.subject, ep.request_type, ep.audience) for ep in cost._endpoints]
    assert served == EXPECTED
    handlers = {ep.subject: ep.fn for ep in cost._endpoints}
    for spec in cost.budgets.endpoints():
        assert handlers[spec.subject] == spec.handler, spec.subject


def test_requesting_agent_is_empty_outside_an_agent_scoped_request() -> None:
    # Set only while an AGENT-audience endpoint's request is handled (from its subject).
    assert Service.requesting_agent() == ""
