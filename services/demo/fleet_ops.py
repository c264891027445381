"""Demo step of fleet operations: a canary rolled back on its own.

Called by :mod:`services.demo.scenario` with an operator connection and the
calling agent; returns whether what the demo claims actually happened (the
demo exits 1 otherwise). The runaway agent's step is :mod:`services.demo.runaway`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import msgspec
from nats.aio.client import Client
from rich.console import Console

from broker import Agent
from broker.errors import SignalboxError
from broker.subjects import Subjects
from schemas import (
    RolloutStatus,
    RolloutStatusRequest,
    RouteGuard,
    SetRollout,
)
from services.cli.client import admin_request
from services.cli.rollout_cmds import rollout_view
from services.demo.agents import demo_manifest

__all__ = ["PORTAL", "RECOMMENDER", "build_recommenders", "show_canary"]

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

    async def figures(least: int, *, rolled_back: bool = False) -> RolloutStatus:
        """The status once every replica has published its figures of ``least`` calls
        and, with ``rolled_back``, the route has left the canary (bounded: after 5 s,
        whatever is in)."""
        deadline = time.monotonic() + 5
        status = await rollout("status", RolloutStatusRequest(target=RECOMMENDER, window=60))
        while time.monotonic() < deadline and (
            sum(v.calls for v in status.versions) < least
            or (rolled_back and (status.route is None or status.route.canary))
        ):
            await asyncio.sleep(0.1)
            status = await rollout("status", RolloutStatusRequest(target=RECOMMENDER, window=60))
        return status

    await rollout(
        "set",
        SetRollout(
            target=RECOMMENDER, weights={CANARY: 20}, stable=STABLE, sticky=True,
            guard=RouteGuard(max_error_rate=0.05, min_calls=15, window=60), requested_by="demo",
        ),
    )  # fmt: skip
    served = {STABLE: 0, CANARY: 0}
    # The first customers' calls give 2.0.0 fewer than the guard's 15 (the split is a
    # hash of the customer: the same 8 of the first 40 every run), so "before" has
    # figures and the guard is still waiting.
    failed = await _offers(portal, range(_WARM_UP), served)
    console.print(
        f"[bold]Before[/] · after {_WARM_UP} calls · `signalbox rollout status recommender`"
    )
    console.print(rollout_view(await figures(_WARM_UP)))
    failed += await _offers(portal, range(_WARM_UP, calls), served)
    after = await figures(calls, rolled_back=True)
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


#: Calls before the "before" status: 2.0.0 gets 8 of them, under the guard's 15.
_WARM_UP = 40


async def _offers(portal: Agent, customers: range, served: dict[str, int]) -> int:
    """Ask for an offer for each of ``customers``, counting who answered; the failures."""
    failed = 0
    for i in customers:
        try:
            offer = await portal.call(
                RECOMMENDER, "suggest", OfferRequest(customer=f"customer-{i}"),
                returns=Offer, route_key=f"customer-{i}", timeout=2.0,
            )  # fmt: skip
            served[offer.version] += 1
        except SignalboxError:
            failed += 1
    return failed
