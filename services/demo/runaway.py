"""Demo step of a runaway agent: its team's budget refuses its model calls, then its breaker
trips.

fraud-detection asks a model once per screening; after a prompt regression,
fifteen times at once. Two guards meet it, in this order every run:

* team risk's daily budget (:data:`BUDGET_USD`) has room for the normal
  traffic and a few calls more, so the runaway's first fan-out reaches it:
  every model call reserves its worst-case cost before it is made, and the
  reservations that do not fit are refused (``BudgetExceeded``, naming the
  budget). The rate detector cannot trip first: that needs five times the
  baseline within a second, more calls than the budget lets through;
* the refused retries keep coming, and the policy service's rate detector
  trips fraud-detection's breaker (fleet-wide): its callers then fail fast.

Called by :mod:`services.demo.scenario`; returns whether both happened.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from nats.aio.client import Client
from rich.console import Console
from rich.padding import Padding
from rich.text import Text

from broker import Agent
from broker.errors import BreakerOpen, BudgetExceeded, CallDenied, SignalboxError
from broker.money import usd
from broker.subjects import Subjects
from schemas import (
    BreakerList,
    BudgetStatus,
    CostReport,
    CostReportRequest,
    ListBreakers,
    SetBudget,
)
from services.cli.client import admin_request

__all__ = ["BUDGET_USD", "NORMAL_SCREENINGS", "Screener", "show_runaway"]

#: Team risk's daily budget: the normal traffic's model calls (about $0.0058 at the
#: prices file's gpt-4o-mini rate) and a few more; the runaway's first fan-out needs
#: fifteen worst-case reservations at once, more than is left.
BUDGET_USD = 0.0075
#: Screenings before the regression, one model call each, about five a second: the
#: rate detector's baseline (it needs at least 10 calls in the 3 s before a trip).
NORMAL_SCREENINGS = 20
#: Model calls per screening after the prompt regression.
RUNAWAY_FAN_OUT = 15


class Screener:
    """fraud-detection's model use: one LLM call per screening, or, after the
    prompt regression, a retry loop of fifteen.

    ``screen`` is what the demo's ``fraud-detection.check`` handler calls.
    """

    MODEL = "gpt-4o-mini"

    def __init__(self) -> None:
        #: 0 until the runaway step (the desk's earlier steps use no model).
        self.calls_per_check = 0
        #: Model calls made (authorized, reserved, settled).
        self.model_calls = 0
        #: The worst-case cost reserved for one call (0 until one was made).
        self.reserved_usd = 0.0
        #: The first refusal of a model call by a budget, and how many were refused.
        self.budget_refusal: BudgetExceeded | None = None
        self.budget_refused = 0
        #: Model calls refused otherwise (an open breaker).
        self.denied = 0

    async def screen(self, agent: Agent) -> None:
        """Ask the model (authorize + reserve, then settle) ``calls_per_check`` times.

        The regressed prompt's retries go out at once (a fan-out), as an
        agent framework's parallel tool calls would.
        """
        if self.calls_per_check:
            await asyncio.gather(*(self._ask(agent) for _ in range(self.calls_per_check)))

    async def _ask(self, agent: Agent) -> None:
        """One model call; a refusal (breaker, budget) raises ``CallDenied`` to the handler."""
        try:
            async with agent.model_call(
                self.MODEL, provider="openai", estimated_tokens=1_500,
                max_output_tokens=300, project="lending-demo",
            ) as call:  # fmt: skip
                call.record(input_tokens=1_200, output_tokens=180)
        except BudgetExceeded as refused:
            self.budget_refused += 1
            self.budget_refusal = self.budget_refusal or refused
            raise
        except CallDenied:
            self.denied += 1
            raise
        if call.decision is not None:
            self.reserved_usd = call.decision.reserved_usd
        self.model_calls += 1


async def show_runaway(
    console: Console,
    nc: Client,
    subjects: Subjects,
    screen: Screener,
    check: Callable[[int], Awaitable[object]],
) -> bool:
    """Normal traffic, then fraud-detection calls its model 15x as often: its team's budget
    refuses the calls past it, its breaker trips on the rate of its retries."""
    budget = await _set_budget(nc, subjects, BUDGET_USD)
    if budget.spent_usd or budget.reserved_usd:
        # A kept data folder (--data-dir) run again the same day: this run's room on top.
        budget = await _set_budget(
            nc, subjects, BUDGET_USD + budget.spent_usd + budget.reserved_usd
        )
    screen.calls_per_check = 1
    started = time.monotonic()
    # About five screenings a second, one model call each: the detector needs a
    # baseline of at least 10 calls in the 3 s before the regression, or the
    # runaway's own first calls become its baseline and it trips late or not at
    # all; and the regression's fifteen-fold fan-out still runs at 5x this rate
    # (the demo's factor) on a slow, busy machine.
    for screened in range(NORMAL_SCREENINGS):
        await check(screened)
        await asyncio.sleep(0.2)
    normal_for = time.monotonic() - started
    before = screen.model_calls
    console.print(
        f"Budget {budget.budget.key}: {usd(budget.budget.limit_usd)} a day. Normal: "
        f"{NORMAL_SCREENINGS} applications screened in {normal_for:.1f} s, {before} model "
        f"calls ({before / normal_for:.1f}/s), each reserving up to {usd(screen.reserved_usd)}."
    )
    screen.calls_per_check = RUNAWAY_FAN_OUT  # the prompt regression
    screened = NORMAL_SCREENINGS
    fast_fails = 0
    started = time.monotonic()
    while time.monotonic() - started < 5.0:
        try:
            await check(screened)
        except BreakerOpen:
            fast_fails += 1
            if fast_fails >= 3:
                break
        except SignalboxError:
            pass  # a screening whose model calls were refused (by the budget, the breaker)
        screened += 1
    runaway_for = time.monotonic() - started
    budget_ok = _show_budget_refusal(console, screen, screen.model_calls - before)
    breakers = await admin_request(
        nc, subjects, "list", ListBreakers(), BreakerList, service="breakers"
    )
    tripped = [b for b in breakers.breakers if b.key == "agent.fraud-detection"]
    refused = screen.budget_refused + screen.denied
    console.print(
        f"fraud-detection kept retrying ({refused} model calls refused in {runaway_for:.1f} s)"
        + (
            "; the rate detector tripped its breaker (`signalbox breakers list`):"
            if tripped
            else ", and no breaker tripped."
        )
    )
    for b in tripped:
        line = Text.assemble((f"{b.key} {b.state}", "bold red"), f" ({b.reason}): {b.text}")
        console.print(Padding(line, (0, 0, 0, 2)))
    console.print(
        f"Its callers now fail fast ({fast_fails} refused at once, no time-out); its model "
        "calls are refused by the breaker before the budget is asked."
    )
    # The chargeback view, once the meter has caught up with every usage report.
    report = await _metered(nc, subjects, screen.model_calls)
    teams = "; ".join(
        f"{row.key or '(unattributed)'} {usd(row.cost_usd)} for {row.reports} model calls"
        for row in report.rows
    )
    console.print(f"Cost by team (`signalbox cost report --by team`): {teams or 'none'}.")
    return bool(
        budget_ok
        and tripped
        and tripped[0].reason == "rate_anomaly"
        and tripped[0].state != "closed"
        and fast_fails > 0
    )


def _show_budget_refusal(console: Console, screen: Screener, made: int) -> bool:
    """How many model calls the runaway made before the budget refused one, and the refusal."""
    refusal = screen.budget_refusal
    if refusal is None:
        console.print(
            f"After the regression: {made} more model calls and [bold red]no budget "
            "refusal[/]: the breaker, not the budget, stopped the runaway."
        )
        return False
    console.print(
        f"After the regression: {made} more model calls, then the budget refused the "
        f"rest ({type(refusal).__name__}):"
    )
    reasons = refusal.details.get("reasons") or (refusal.message,)
    console.print(Padding(Text(str(reasons[-1]), style="red"), (0, 0, 0, 2)))
    return True


async def _set_budget(nc: Client, subjects: Subjects, limit_usd: float) -> BudgetStatus:
    """Team risk's daily budget set to ``limit_usd``; where it stands."""
    return await admin_request(
        nc, subjects, "set",
        SetBudget(scope="team", name="risk", window="day", limit_usd=limit_usd,
                  requested_by="demo"),
        BudgetStatus, service="budgets",
    )  # fmt: skip


async def _metered(nc: Client, subjects: Subjects, reports: int) -> CostReport:
    deadline = time.monotonic() + 10
    while True:
        report = await admin_request(
            nc, subjects, "report", CostReportRequest(by="team"), CostReport, service="cost"
        )
        if report.total.reports >= reports or time.monotonic() > deadline:
            return report
        await asyncio.sleep(0.1)
