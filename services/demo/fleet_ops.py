"""Demo steps of fleet operations: a canary rolled back on its own, a runaway agent stopped.

Called by :mod:`services.demo.scenario` with the running stack, an operator
connection and the lending desk's agents. Each step returns whether what the
demo claims actually happened (the demo exits 1 otherwise).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

import msgspec
from nats.aio.client import Client
from rich.console import Console

from broker import Agent
from broker.errors import BreakerOpen, SignalboxError
from broker.money import usd
from broker.subjects import Subjects
from schemas import (
    BreakerList,
    BudgetStatus,
    CostReport,
    CostReportRequest,
    ListBreakers,
    RolloutStatus,
    RolloutStatusRequest,
    RouteGuard,
    SetBudget,
    SetRollout,
)
from services.cli.breakers_cmds import breakers_table
from services.cli.client import admin_request
from services.cli.cost_cmds import cost_table
from services.cli.rollout_cmds import rollout_view
from services.demo.agents import demo_manifest

__all__ = [
    "PORTAL",
    "RECOMMENDER",
    "Screener",
    "build_recommenders",
    "show_canary",
    "show_runaway",
]

#: The agent rolled out in the canary step, and the one calling it.
RECOMMENDER, PORTAL = "recommender", "web-portal"
STABLE, CANARY = "1.0.0", "2.0.0"


class Offer(msgspec.Struct, frozen=True, kw_only=True):
    """Which product to offer a customer."""

    customer: str
    product: str
    version: str


class OfferRequest(msgspec.Struct, frozen=True, kw_only=True):
    """Ask recommender for an offer."""

    customer: str


def build_recommenders(
    nats_url: str, credentials: dict[str, str], subject_prefix: str
) -> list[Agent]:
    """web-portal, recommender 1.0.0, and 2.0.0 whose new feature-store lookup times out
    every third call (``credentials`` by agent name)."""
    made = [
        Agent(
            demo_manifest(PORTAL, "The customers' web portal"),
            nats_url=nats_url, subject_prefix=subject_prefix, credential=credentials[PORTAL],
        )
    ]  # fmt: skip
    for version in (STABLE, CANARY):
        agent = Agent(
            demo_manifest(
                RECOMMENDER, "Suggests the next product to offer a customer", version=version
            ),
            nats_url=nats_url, subject_prefix=subject_prefix,
            credential=credentials[RECOMMENDER], heartbeat_interval=1.0,
        )  # fmt: skip
        agent.capability("suggest")(_suggester(version))
        made.append(agent)
    return made


def _suggester(version: str) -> Callable[[OfferRequest], Awaitable[Offer]]:
    calls = 0

    async def suggest(req: OfferRequest) -> Offer:
        """The next product to offer this customer."""
        nonlocal calls
        calls += 1
        if version == CANARY and calls % 3 == 0:
            raise TimeoutError("feature store lookup timed out")
        product = ("credit card", "savings account", "mortgage")[len(req.customer) % 3]
        return Offer(customer=req.customer, product=product, version=version)

    return suggest


async def show_canary(
    console: Console, nc: Client, subjects: Subjects, portal: Agent, *, calls: int = 240
) -> bool:
    """Route 20% of recommender's calls to 2.0.0, watch the guard roll it back."""

    async def rollout(op: str, body: msgspec.Struct) -> RolloutStatus:
        return await admin_request(nc, subjects, op, body, RolloutStatus, service="rollout")

    status = await rollout(
        "set",
        SetRollout(
            target=RECOMMENDER, weights={CANARY: 20}, stable=STABLE, sticky=True,
            guard=RouteGuard(max_error_rate=0.05, min_calls=15, window=60), requested_by="demo",
        ),
    )  # fmt: skip
    console.print("[bold]Before[/] · `signalbox rollout status recommender`")
    console.print(rollout_view(status))
    served = {STABLE: 0, CANARY: 0}
    # 2.0.0's failures are the story here, not news: keep their tracebacks out of it.
    sdk_log = logging.getLogger("broker.serving")
    level = sdk_log.level
    sdk_log.setLevel(logging.CRITICAL)
    try:
        failed = await _offers(portal, calls, served)
    finally:
        sdk_log.setLevel(level)
    # Until every replica has published its figures of the last calls (and the route moved).
    deadline = time.monotonic() + 5
    after = await rollout("status", RolloutStatusRequest(target=RECOMMENDER, window=60))
    while time.monotonic() < deadline and (
        after.route is None
        or after.route.canary
        or sum(v.calls for v in after.versions) < calls
    ):
        await asyncio.sleep(0.1)
        after = await rollout("status", RolloutStatusRequest(target=RECOMMENDER, window=60))
    console.print(
        f"web-portal asked for {calls} offers: {served[STABLE]} answered by {STABLE}, "
        f"{served[CANARY]} by {CANARY}, {failed} failed (on {CANARY}, before the guard "
        "sent its share back to 1.0.0; no call failed after that)."
    )
    console.print("[bold]After[/] · `signalbox rollout status recommender`")
    console.print(rollout_view(after))
    route = after.route
    return bool(
        route is not None
        and route.weights.get(CANARY, 0) == 0
        and route.reason.startswith("auto-rollback")
        and failed > 0
    )


class Screener:
    """fraud-detection's model use: one LLM call per screening, or, after the
    prompt regression, a retry loop of fifteen.

    ``screen`` is what the demo's ``fraud-detection.check`` handler calls.
    """

    MODEL = "gpt-4o-mini"

    def __init__(self) -> None:
        #: 0 until the runaway step (the desk's earlier steps use no model).
        self.calls_per_check = 0
        self.model_calls = 0

    async def screen(self, agent: Agent) -> None:
        """Ask the model (authorize + reserve, then settle) ``calls_per_check`` times.

        The regressed prompt's retries go out at once (a fan-out), as an
        agent framework's parallel tool calls would.
        """
        if self.calls_per_check:
            await asyncio.gather(*(self._ask(agent) for _ in range(self.calls_per_check)))

    async def _ask(self, agent: Agent) -> None:
        """One model call; a refusal (breaker, budget) raises ``CallDenied`` to the handler."""
        async with agent.model_call(
            self.MODEL, provider="openai", estimated_tokens=1_500,
            max_output_tokens=300, project="lending-demo",
        ) as call:  # fmt: skip
            call.record(input_tokens=1_200, output_tokens=180)
        self.model_calls += 1


async def show_runaway(
    console: Console,
    nc: Client,
    subjects: Subjects,
    loans: Agent,
    screen: Screener,
    check: Callable[[int], Awaitable[object]],
) -> bool:
    """Normal traffic, then fraud-detection calls its model 15x as often and is stopped."""
    budget = await admin_request(
        nc, subjects, "set",
        SetBudget(scope="team", name="risk", window="day", limit_usd=25.0, requested_by="demo"),
        BudgetStatus, service="budgets",
    )  # fmt: skip
    console.print(
        f"Budget of team risk: {usd(budget.budget.limit_usd)} a day, alert at "
        f"{budget.budget.soft_ratio:.0%}; every model call reserves its worst case first."
    )
    screen.calls_per_check = 1
    normal_for = 4.0
    normal_until = time.monotonic() + normal_for
    screened = 0
    # About four screenings a second, one model call each, for 4 s: the detector
    # needs a baseline of at least 10 calls in the 3 s before the regression, or
    # the runaway's own first calls become its baseline and it trips late or not
    # at all; and the regression's fifteen-fold fan-out still runs at 5x this rate
    # (the demo's factor) on a slow, busy machine.
    while time.monotonic() < normal_until:
        await check(screened)
        screened += 1
        await asyncio.sleep(0.2)
    before = screen.model_calls
    console.print(
        f"Normal: {screened} applications screened in {normal_for:g} s, {before} model calls "
        f"({before / normal_for:.1f}/s)."
    )
    screen.calls_per_check = 15  # the prompt regression
    refused_calls = 0
    stopped_at = 0.0
    started = time.monotonic()
    while time.monotonic() - started < 4.0:
        try:
            await check(screened)
        except BreakerOpen:
            refused_calls += 1
            stopped_at = stopped_at or time.monotonic() - started
            if refused_calls >= 3:
                break
        except SignalboxError:
            pass  # a screening whose model calls were refused mid-way
        screened += 1
    runaway = screen.model_calls - before
    console.print(
        f"After the regression: {runaway} model calls in "
        f"{(stopped_at or time.monotonic() - started):.1f} s before the breaker stopped "
        f"fraud-detection; its callers now fail fast ({refused_calls} refused at once, no "
        "time-out) and its own model calls are refused too."
    )
    breakers = await admin_request(
        nc, subjects, "list", ListBreakers(), BreakerList, service="breakers"
    )
    console.print("`signalbox breakers list`:")
    console.print(breakers_table(breakers.breakers, time.time()))
    for b in breakers.breakers:
        console.print(f"  {b.key} is {b.state} ({b.reason}): {b.text}")
    # The chargeback view, once the meter has caught up with every usage report.
    report = await _metered(nc, subjects, screen.model_calls)
    console.print(cost_table(report))
    tripped = [b for b in breakers.breakers if b.key == "agent.fraud-detection"]
    return bool(
        tripped and tripped[0].reason == "rate_anomaly" and tripped[0].state != "closed"
        and refused_calls > 0
    )


async def _metered(nc: Client, subjects: Subjects, reports: int) -> CostReport:
    deadline = time.monotonic() + 10
    while True:
        report = await admin_request(
            nc, subjects, "report", CostReportRequest(by="team"), CostReport, service="cost"
        )
        if report.total.reports >= reports or time.monotonic() > deadline:
            return report
        await asyncio.sleep(0.1)


async def _offers(portal: Agent, calls: int, served: dict[str, int]) -> int:
    """Ask for ``calls`` offers (one customer each), counting who answered; the failures."""
    failed = 0
    for i in range(calls):
        try:
            offer = await portal.call(
                RECOMMENDER, "suggest", OfferRequest(customer=f"customer-{i}"),
                returns=Offer, route_key=f"customer-{i}", timeout=2.0,
            )  # fmt: skip
            served[offer.version] += 1
        except SignalboxError:
            failed += 1
    return failed
