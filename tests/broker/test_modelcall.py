"""``Agent.model_call`` (broker/modelcall.py): authorize, keep the reservation renewed while
the block runs, settle with what was recorded, and the ways each step can fail.

A stand-in control plane on a real nats-server plays the policy service
(``sb.authz.<agent>``) and the cost service's renewals (``sb.cost.renew.<agent>``),
so every answer is the test's choice; the usage reports go to the real usage
stream. The stand-in reads everything the agent sends through one
subscription: NATS delivers one connection's messages in order, so once a
call's usage report has arrived, every renewal sent before it has too.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg
from support import eventually

from broker import Agent, BudgetExceeded, CallDenied
from broker.codec import decode, encode
from broker.connection import connect
from broker.errors import NotFound, SignalboxError
from broker.replies import error_reply
from broker.runtime.jetstream import USAGE_STREAM, ensure_stream, stream_configs
from broker.settings import Settings
from schemas import (
    AgentManifest,
    AuthzRequest,
    BudgetCharge,
    Decision,
    RenewReservation,
    ReservationRenewed,
    UsageReport,
)

pytestmark = pytest.mark.nats

MODEL = "gpt-4o"
ALLOW = Decision(
    effect="allow", reason_code="allowed", policy_ids=("models",), reservation_id="r-1",
    reserved_usd=0.1,
)  # fmt: skip
ALLOW_UNBUDGETED = Decision(effect="allow", reason_code="allowed", policy_ids=("models",))

#: An answer to a renewal: the cost service's, its error, or None (it does not answer).
Renewal = ReservationRenewed | SignalboxError | None


def renewed(renew_in: float, **fields: object) -> ReservationRenewed:
    return ReservationRenewed(
        reservation_id="r-1", state="open", renewed=True, expires_at=time.time() + 30,
        renew_in=renew_in, **fields,  # type: ignore[arg-type]
    )  # fmt: skip


class StandIn:
    """The policy and cost services as one agent's model calls see them.

    ``decisions`` and ``renewals`` are the answers, in order; the last one repeats.
    """

    def __init__(self, nc: Client, agent: str) -> None:
        self.nc = nc
        self.agent = agent
        self.decisions: list[Decision] = [ALLOW]
        self.renewals: list[Renewal] = [renewed(60.0)]
        self.asked: list[AuthzRequest] = []
        self.renew_asks: list[RenewReservation] = []
        self.reports: list[UsageReport] = []

    async def start(self) -> None:
        await self.nc.subscribe("sb.>", cb=self._on_msg)
        await self.nc.flush()

    @staticmethod
    def _next(answers: list[Renewal] | list[Decision]) -> object:
        return answers.pop(0) if len(answers) > 1 else answers[0]

    async def _on_msg(self, msg: Msg) -> None:
        if msg.subject == f"sb.authz.{self.agent}":
            self.asked.append(decode(msg.data, AuthzRequest))
            await msg.respond(encode(self._next(self.decisions)))
        elif msg.subject == f"sb.cost.renew.{self.agent}":
            self.renew_asks.append(decode(msg.data, RenewReservation))
            answer = self._next(self.renewals)
            if isinstance(answer, SignalboxError):
                data, headers = error_reply(answer)
                await self.nc.publish(msg.reply, data, headers=headers)
            elif answer is not None:
                await msg.respond(encode(answer))
        elif msg.subject == f"sb.usage.{self.agent}":
            self.reports.append(decode(msg.data, UsageReport))

    async def settled(self, count: int = 1) -> UsageReport:
        """The ``count``-th usage report, once it has arrived."""
        await eventually(lambda: len(self.reports) >= count, f"usage report {count}", timeout=10)
        return self.reports[count - 1]


@pytest.fixture
async def usage_stream(nats_url: str, tmp_path: Path) -> None:
    """The usage stream on the session server (reports are stored, and acknowledged)."""
    nc = await connect(nats_url, name="test-modelcall-streams")
    settings = Settings(nats_url=nats_url, data_dir=tmp_path)
    [config] = [c for c in stream_configs(settings) if c.name == USAGE_STREAM]
    await ensure_stream(nc.jetstream(), config)
    await nc.close()


@pytest.fixture
async def plane(nats_url: str, usage_stream: None) -> AsyncIterator[StandIn]:
    nc = await connect(nats_url, name="test-control-plane")
    stand_in = StandIn(nc, f"mc-{os.urandom(4).hex()}")
    await stand_in.start()
    yield stand_in
    await nc.close()


@pytest.fixture
async def agent(nats_url: str, plane: StandIn) -> AsyncIterator[Agent]:
    manifest = AgentManifest(name=plane.agent, version="1.0.0", owner="o", team="t")
    made = Agent(manifest, nats_url=nats_url, register=False, heartbeat_interval=0)
    await made.start()
    yield made
    await made.stop()


def warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "broker.modelcall" and r.levelno == logging.WARNING
    ]


# -- the call as it should go --------------------------------------------------------------


async def test_a_call_is_authorized_as_asked_renewed_at_once_and_settled_with_the_usage(
    agent: Agent, plane: StandIn
) -> None:
    async with agent.model_call(
        MODEL, provider="openai", region="eu-west-1", estimated_tokens=1_200,
        max_output_tokens=800, project="p1", data_tags=("pii",), on_behalf_of=("boss",),
    ) as call:  # fmt: skip
        assert call.decision == ALLOW
        await eventually(lambda: call.renewal is not None, "the first renewal, sent at once")
        call.record(input_tokens=700, output_tokens=100)
        call.record(output_tokens=50, cached_tokens=10, tool_calls=1)  # a second response
    report = await plane.settled()

    [asked] = plane.asked
    assert (asked.action, asked.resource, asked.provider, asked.region) == (
        "use_model", MODEL, "openai", "eu-west-1",
    )  # fmt: skip
    assert (asked.estimated_tokens, asked.max_output_tokens, asked.project) == (1_200, 800, "p1")
    assert (asked.data_tags, asked.on_behalf_of) == (("pii",), ("boss",))
    assert plane.renew_asks == [RenewReservation(reservation_id="r-1")]  # next due in 60 s
    assert call.renewal == plane.renewals[0]

    assert report.id == call.report_id and call.report is not None
    assert report.id == call.report.id
    assert (report.agent, report.model, report.provider) == (agent.name, MODEL, "openai")
    assert (report.project, report.on_behalf_of, report.reservation_id) == (
        "p1", ("boss",), "r-1",
    )  # fmt: skip
    recorded = (report.input_tokens, report.output_tokens, report.cached_tokens)
    assert recorded == (700, 150, 10) and report.tool_calls == 1
    assert report.latency_ms > 0


async def test_a_call_no_budget_applies_to_reserves_and_renews_nothing(
    agent: Agent, plane: StandIn
) -> None:
    plane.decisions = [ALLOW_UNBUDGETED]
    async with agent.model_call(MODEL, estimated_tokens=10) as call:
        call.record(input_tokens=3)
    report = await plane.settled()
    assert report.reservation_id == "" and report.input_tokens == 3
    assert plane.renew_asks == [] and call.renewal is None


async def test_renewals_keep_the_cost_services_pace_and_stop_with_the_call(
    agent: Agent, plane: StandIn
) -> None:
    plane.renewals = [renewed(0.05)]
    async with agent.model_call(MODEL, estimated_tokens=10):
        await eventually(lambda: len(plane.renew_asks) >= 3, "three renewals, 50 ms apart")
    await plane.settled()
    during = len(plane.renew_asks)
    # A renewal sent after the block ended would arrive before the next call's report.
    plane.decisions = [ALLOW_UNBUDGETED]
    async with agent.model_call(MODEL, estimated_tokens=10):
        pass
    await plane.settled(2)
    assert len(plane.renew_asks) == during
    assert {a.reservation_id for a in plane.renew_asks} == {"r-1"}


async def test_an_error_in_the_block_is_raised_and_the_usage_still_settles(
    agent: Agent, plane: StandIn
) -> None:
    class Boom(Exception):
        pass

    with pytest.raises(Boom):
        async with agent.model_call(MODEL, estimated_tokens=10) as call:
            call.record(input_tokens=9)
            raise Boom
    report = await plane.settled()
    assert (report.input_tokens, report.reservation_id) == (9, "r-1")


# -- refusals --------------------------------------------------------------------------------


@pytest.mark.parametrize("effect", ["deny", "needs_approval"])
async def test_a_refusal_raises_call_denied_before_the_block_runs(
    agent: Agent, plane: StandIn, effect: str
) -> None:
    plane.decisions = [
        Decision(effect=effect, reason_code="forbidden", reasons=("no models for mc",),  # type: ignore[arg-type]
                 policy_ids=("no-models",)),
        ALLOW_UNBUDGETED,
    ]  # fmt: skip
    ran = False
    with pytest.raises(CallDenied) as refused:
        async with agent.model_call(MODEL, estimated_tokens=10):
            ran = True
    assert not ran and not isinstance(refused.value, BudgetExceeded)
    assert "no models for mc" in refused.value.message
    assert refused.value.details["model"] == MODEL
    assert list(refused.value.details["policy_ids"]) == ["no-models"]
    # Nothing was reported for it: the next call's report is the first to arrive.
    async with agent.model_call(MODEL, estimated_tokens=10):
        pass
    await plane.settled()
    assert len(plane.reports) == 1 and len(plane.asked) == 2


async def test_a_budget_that_cannot_cover_the_call_raises_budget_exceeded(
    agent: Agent, plane: StandIn
) -> None:
    charge = BudgetCharge(key=f"agent.{agent.name}.day", limit_usd=0.1, spent_usd=0.09)
    plane.decisions = [
        Decision(effect="deny", reason_code="budget_exceeded", budget=charge,
                 reasons=(f"agent.{agent.name}.day cannot cover $0.10",)),
    ]  # fmt: skip
    with pytest.raises(BudgetExceeded) as refused:
        async with agent.model_call(MODEL, estimated_tokens=10_000):
            pytest.fail("the block ran")
    assert refused.value.details["budget"]["key"] == charge.key
    assert "cannot cover" in refused.value.message


# -- renewals that fail: one warning, and the call goes on ------------------------------------


@pytest.mark.parametrize(
    ("answer", "said"),
    [
        (ReservationRenewed(reservation_id="r-1", state="expired"), "is expired"),
        (ReservationRenewed(reservation_id="r-1", state="settled"), "is settled"),
        (renewed(0.0, capped=True), "reached its longest life"),
        (NotFound("no open reservation r-1 of this agent"), "could not be renewed (no open"),
    ],
    ids=["expired", "settled", "capped", "refused"],
)
async def test_a_renewal_that_ends_the_reservation_is_not_retried(
    agent: Agent, plane: StandIn, caplog: pytest.LogCaptureFixture, answer: Renewal, said: str
) -> None:
    caplog.set_level(logging.WARNING, logger="broker.modelcall")
    plane.renewals = [answer, renewed(0.01)]  # a second renewal would be answered, and soon
    async with agent.model_call(MODEL, estimated_tokens=10) as call:
        await eventually(lambda: warnings(caplog), "a warning about the reservation")
        call.record(output_tokens=5)
    report = await plane.settled()
    assert len(plane.renew_asks) == 1
    [warning] = warnings(caplog)
    assert said in warning and "r-1" in warning and MODEL in warning
    assert report.output_tokens == 5 and report.reservation_id == "r-1"  # settled all the same


async def test_an_unanswered_renewal_is_retried_with_one_warning(
    agent: Agent, plane: StandIn, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="broker.modelcall")
    plane.renewals = [None, None, renewed(60.0)]
    async with agent.model_call(MODEL, estimated_tokens=10, timeout=0.3) as call:
        await eventually(lambda: call.renewal is not None, "the third try answered", timeout=10)
    await plane.settled()
    assert len(plane.renew_asks) == 3
    [warning] = warnings(caplog)
    assert "could not be renewed" in warning and "retrying" in warning
