"""The policy service is composed of desks: each declares its endpoints, the service includes them.

Checks the composition without a server: every admin operation the policy
service answered before it was split into desks is still served, once, with
its request type and its desk's handler, in the same order; and
:meth:`Service.include` gives a desk's endpoints the same defaults as
:meth:`Service.endpoint`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from broker.codec import decode
from broker.runtime.desk import EndpointSpec, declare_endpoint
from broker.runtime.service import Service
from broker.settings import Settings
from broker.subjects import Audience
from schemas import (
    ApplyPolicies,
    Breaker,
    BreakerList,
    DecideApproval,
    DeprecateVersion,
    DiffPolicies,
    HealthRequest,
    ListApprovals,
    ListBreakers,
    PolicyHistoryRequest,
    PromoteRollout,
    ResetBreaker,
    RollbackPolicies,
    RollbackRollout,
    RolloutStatusRequest,
    SetRollout,
    ShadowPolicies,
    ShowPolicies,
    TripBreaker,
    ValidatePolicies,
)
from services.policy.service import PolicyService

#: The policy service's admin surface, in the order it is subscribed.
EXPECTED = [
    ("policy.status", HealthRequest),
    ("rollout.set", SetRollout),
    ("rollout.promote", PromoteRollout),
    ("rollout.rollback", RollbackRollout),
    ("rollout.deprecate", DeprecateVersion),
    ("rollout.status", RolloutStatusRequest),
    ("policy.validate", ValidatePolicies),
    ("policy.apply", ApplyPolicies),
    ("policy.rollback", RollbackPolicies),
    ("policy.show", ShowPolicies),
    ("policy.history", PolicyHistoryRequest),
    ("policy.diff", DiffPolicies),
    ("policy.shadow", ShadowPolicies),
    ("approvals.list", ListApprovals),
    ("approvals.approve", DecideApproval),
    ("approvals.deny", DecideApproval),
    ("breakers.list", ListBreakers),
    ("breakers.trip", TripBreaker),
    ("breakers.reset", ResetBreaker),
]


def _settings(tmp_path: Path) -> Settings:
    return Settings(nats_url="nats://127.0.0.1:4222", data_dir=tmp_path)


def test_every_desk_endpoint_is_served_once_with_its_type_and_handler(tmp_path: Path) -> None:
    policy = PolicyService(_settings(tmp_path))
    admin = f"{policy.subjects.prefix}.admin."
    served = [(ep.subject.removeprefix(admin), ep.request_type) for ep in policy._endpoints]
    assert served == EXPECTED
    handlers = {ep.subject: ep.fn for ep in policy._endpoints}
    desks = (policy.routes, policy.policy_sets, policy.approvals, policy.breaker_gate)
    for desk in desks:
        for spec in desk.endpoints():
            assert handlers[spec.subject] == spec.handler, spec.subject
    assert all(ep.audience == Audience.OPERATOR for ep in policy._endpoints)
    assert {ep.queue for ep in policy._endpoints[1:]} == {"sb-policy"}


class _Desk:
    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    async def list_breakers(self, request: ListBreakers) -> BreakerList:
        return BreakerList(breakers=())

    async def reset(self, request: ResetBreaker) -> Breaker:
        raise AssertionError("not called")

    def endpoints(self) -> Sequence[EndpointSpec[Any]]:
        return (
            declare_endpoint(f"{self.prefix}.admin.demo.list", ListBreakers, self.list_breakers),
            declare_endpoint(
                f"{self.prefix}.demo.reset",
                ResetBreaker,
                self.reset,
                audience=Audience.SERVICE,
                queue="",
            ),
        )


async def test_include_declares_a_desks_endpoints_as_endpoint_would(tmp_path: Path) -> None:
    service = Service(_settings(tmp_path))
    desk = _Desk(service.subjects.prefix)
    service.include(desk)
    listed, reset = service._endpoints[-2:]
    assert (listed.request_type, listed.audience, listed.queue) == (
        ListBreakers, Audience.OPERATOR, "sb-service",
    )  # fmt: skip
    assert (reset.request_type, reset.audience, reset.queue) == (ResetBreaker, Audience.SERVICE, "")
    body, headers = await service.handle(b"{}", listed.subject, ListBreakers, listed.fn)
    assert headers == {} and decode(body, BreakerList) == BreakerList(breakers=())


def test_include_refuses_a_desk_without_an_audience_where_endpoint_would(tmp_path: Path) -> None:
    service = Service(_settings(tmp_path))

    class Unclear(_Desk):
        def endpoints(self) -> Sequence[EndpointSpec[Any]]:
            return (declare_endpoint("elsewhere.list", ListBreakers, self.list_breakers),)

    with pytest.raises(ValueError, match="say who may send it"):
        service.include(Unclear(service.subjects.prefix))
