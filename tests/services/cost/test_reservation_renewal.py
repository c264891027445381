"""Reservations live as long as the model call; usage no live reservation covers is never
silently over a limit (issue 14, F7/6).

The finding: with the reservation TTL shorter than a model call, 32 concurrent loops
spent 149% of a hard budget (a reservation expired while its call ran, freed room,
others reserved it, then the late usage settled over the limit). Now the SDK renews a
reservation while its ``model_call`` block runs, and usage that still overruns a limit
without a live reservation is charged, alerted and stops the agent (its breaker).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING, Any

import pytest
from nats.aio.client import Client

from broker import Agent, BudgetExceeded, CallDenied
from broker.connection import connect
from broker.errors import NotFound
from broker.replies import request
from broker.runtime.identity import operator_connect_options
from broker.settings import Settings
from schemas import (
    Budget,
    BudgetList,
    BudgetStatus,
    RenewReservation,
    ReservationRenewed,
    SetBudget,
    ShowBudget,
)
from services.cost.budget_outcomes import Overspend
from services.cost.prices import NANOS_PER_USD, load_prices
from services.cost.store import UsageStore
from services.runner import Stack

if TYPE_CHECKING:
    from support import AgentFactory, AuditTrail, StackFactory

from support import cost_of, eventually, lending_policy_dir, policy_of

# gpt-4o: $10 per million output tokens; with no output cap every estimated token is
# priced as output, so 1,000 estimated tokens reserve $0.01.
MODEL = "gpt-4o"
#: Seconds a reservation is held unless renewed (short, so calls outlive it).
TTL = 1.0

# -- the ledger (SQLite, and PostgreSQL when configured) ------------------------------------

NOON = dt.datetime(2026, 3, 14, 12, tzinfo=dt.UTC).timestamp()
CENT = NANOS_PER_USD // 100


@pytest.fixture
def store(database_url: str) -> Iterator[UsageStore]:
    s = UsageStore(database_url, load_prices(None))
    s.create_schema()
    yield s
    s.close()


def _budget(limit: float, scope: str = "team", name: str = "risk") -> Budget:
    return Budget(scope=scope, name=name, window="day", limit_usd=limit)  # type: ignore[arg-type]


def _reserve(store: UsageStore, budget: Budget, rid: str, cents: int, *, agent: str = "a",
             now: float = NOON, ttl: float = 60.0) -> bool:  # fmt: skip
    grant = store.ledger.reserve(
        [budget], reservation_id=rid, agent=agent, amount_nanos=cents * CENT, now=now,
        expires_at=now + ttl,
    )  # fmt: skip
    return grant.granted


def _usage(rid: str, cents: int, *, agent: str = "a", report: str = "", t: float = NOON,
           team: str = "risk") -> dict[str, Any]:  # fmt: skip
    return {
        "agent": agent, "id": report or f"r-{rid}", "time": t, "hour": 0, "day": 0,
        "team": team, "project": "", "model": MODEL, "provider": "", "input_tokens": 1,
        "output_tokens": 1, "cached_tokens": 0, "tool_calls": 0, "latency_ms": 0.0,
        "cost_nanos": cents * CENT, "priced_by_fallback": False, "trace_id": "",
        "on_behalf_of": "", "received_at": t, "reservation_id": rid, "batch": "",
        "agent_version": "",
    }  # fmt: skip


def _row(store: UsageStore, rid: str) -> dict[str, Any]:
    row = store.ledger.reservation(rid)
    assert row is not None
    return row


def test_a_renewal_extends_by_at_most_the_ttl_and_never_past_the_longest_life(
    store: UsageStore,
) -> None:
    budget = _budget(1.0)
    assert _reserve(store, budget, "r", 10, ttl=60)

    def renew(at: float, agent: str = "a") -> Any:
        return store.ledger.renew("r", agent=agent, now=at, ttl=60, max_lifetime=300)

    early = renew(NOON + 1)  # asked long before it is due: nothing written
    assert early is not None and (early.state, early.renewed) == ("open", False)
    assert early.expires_at == NOON + 60 == _row(store, "r")["expires_at"]
    due = renew(NOON + 20)
    assert due is not None and due.renewed and not due.capped
    assert due.expires_at == NOON + 80 == _row(store, "r")["expires_at"]
    at = NOON + 20
    while not (outcome := renew(at)).capped:  # a call that never ends
        assert outcome.expires_at <= at + 60
        at += 20
    assert outcome.expires_at == NOON + 300 == _row(store, "r")["expires_at"]
    assert at <= NOON + 300
    later = renew(NOON + 299)
    assert later is not None and later.capped and not later.renewed
    assert later.expires_at == NOON + 300
    # Once released, the reservation stays released; settled ones too.
    assert store.ledger.expire(NOON + 301) == 1
    gone = renew(NOON + 301)
    assert gone is not None and (gone.state, gone.renewed) == ("expired", False)
    assert _row(store, "r")["expires_at"] == NOON + 300


def test_only_the_agent_that_reserved_renews_and_only_while_open(store: UsageStore) -> None:
    budget = _budget(1.0)
    assert _reserve(store, budget, "mine", 10, agent="a")
    before = _row(store, "mine")
    assert store.ledger.renew("mine", agent="b", now=NOON + 30, ttl=60, max_lifetime=3600) is None
    assert store.ledger.renew("nope", agent="a", now=NOON + 30, ttl=60, max_lifetime=3600) is None
    assert _row(store, "mine") == before
    store.record([_usage("mine", 5)], {budget.key: budget})
    settled = store.ledger.renew("mine", agent="a", now=NOON + 30, ttl=60, max_lifetime=3600)
    assert settled is not None and (settled.state, settled.renewed) == ("settled", False)
    assert _row(store, "mine")["expires_at"] == before["expires_at"]


def test_an_expired_reservation_settled_late_over_the_limit_is_an_overspend(
    store: UsageStore,
) -> None:
    """The finding, in the ledger: a reservation expires while its call runs, another
    agent reserves the freed room, then the late report lands."""
    budget = _budget(0.03)
    budgets = {budget.key: budget}
    assert _reserve(store, budget, "slow", 2, agent="a", ttl=1)
    assert not _reserve(store, budget, "blocked", 2, agent="b")  # held: no room
    assert store.ledger.expire(NOON + 2) == 1  # released while a's call still runs
    assert _reserve(store, budget, "b1", 2, agent="b", now=NOON + 2)
    late = _usage("slow", 2, agent="a", t=NOON + 3)
    on_time = _usage("b1", 2, agent="b", t=NOON + 4)
    store.record([late, on_time], budgets)
    # The money was spent: both are charged, the ledger is true.
    [status] = store.ledger.status(budget, NOON)
    assert status.spent_usd == pytest.approx(0.04) and status.reserved_usd == 0
    # The late one is flagged: it took room another reservation held.
    assert late["unreserved"] and late["reservation_expired"]
    [over] = late["overspends"]
    assert isinstance(over, Overspend)
    assert (over.agent, over.report_id, over.reservation_id) == ("a", "r-slow", "slow")
    assert (over.cause, over.budget.key) == ("expired_reservation", "team.risk.day")
    assert over.charge.limit_usd == 0.03
    assert over.charge.spent_usd + over.charge.reserved_usd == pytest.approx(0.04)
    assert over.uncovered_nanos == over.cost_nanos == 2 * CENT
    # b's reservation was granted against room it had: its settlement is no overspend.
    assert not on_time["unreserved"] and "overspends" not in on_time
    assert _row(store, "slow")["report_id"] == "r-slow"  # the late report, kept
    assert _row(store, "slow")["state"] == "expired"


def test_late_usage_that_fits_the_free_room_is_flagged_but_no_overspend(
    store: UsageStore,
) -> None:
    budget = _budget(1.0)
    assert _reserve(store, budget, "slow", 20, ttl=1)
    assert store.ledger.expire(NOON + 2) == 1
    late = _usage("slow", 10, t=NOON + 3)
    store.record([late], {budget.key: budget})
    assert late["unreserved"] and late["reservation_expired"]
    assert "overspends" not in late


def test_usage_beyond_its_reservation_or_without_one_over_the_limit_is_an_overspend(
    store: UsageStore,
) -> None:
    budget = _budget(0.25, scope="agent", name="a")
    budgets = {budget.key: budget}
    assert _reserve(store, budget, "small", 10)
    greedy = _usage("small", 30)  # cost three times what it reserved
    store.record([greedy], budgets)
    [over] = greedy["overspends"]
    assert (over.cause, over.uncovered_nanos, over.cost_nanos) == (
        "over_reservation", 20 * CENT, 30 * CENT,
    )  # fmt: skip
    unreserved = _usage("", 5, report="bare")
    store.record([unreserved], budgets)
    [bare] = unreserved["overspends"]
    assert bare.cause == "unreserved" and bare.charge.spent_usd == pytest.approx(0.35)
    # Within the limit, nothing is an overspend, reserved or not.
    fine = _budget(10.0, scope="agent", name="c")
    row = _usage("", 5, agent="c", report="fine")
    store.record([row], {fine.key: fine})
    assert row["unreserved"] and "overspends" not in row


# -- end to end -------------------------------------------------------------------------


@pytest.fixture
def settings(settings: Settings, database_url: str) -> Settings:
    """A short TTL (calls here outlive it), on SQLite and on PostgreSQL (when configured)."""
    return settings.model_copy(update={"database_url": database_url, "budget_reservation_ttl": TTL})


async def _stack(make_stack: StackFactory, **overrides: Any) -> Stack:
    return await make_stack(
        policy_dir=lending_policy_dir(), services=["tracing", "registry", "policy", "cost"],
        **overrides,
    )  # fmt: skip


@pytest.fixture
async def stack(make_stack: StackFactory) -> Stack:
    return await _stack(make_stack)


@pytest.fixture
async def operator(settings: Settings) -> AsyncIterator[Client]:
    options = operator_connect_options(settings)
    nc = await connect(settings.nats_url, name="test-operator", **options)
    yield nc
    await nc.close()


async def _set(operator: Client, stack: Stack, scope: str, name: str, limit: float) -> None:
    status = await request(
        operator, "sb.admin.budgets.set",
        SetBudget(scope=scope, name=name, window="day", limit_usd=limit),  # type: ignore[arg-type]
        BudgetStatus,
    )  # fmt: skip
    key = f"{scope}.{name}.day"
    policy = policy_of(stack)
    await eventually(
        lambda: (
            policy.budgets is not None
            and policy.budgets.get(key) == status.budget
            and cost_of(stack).budgets.cache.get(key) == status.budget
        ),
        "policy and cost to see the budget",
    )


async def _agent(make_agent: AgentFactory, stack: Stack, name: str, team: str) -> Agent:
    agent = make_agent(name, team=team, heartbeat_interval=0)
    await agent.start()
    await eventually(
        lambda: cost_of(stack)._team(name) == team,
        "the cost service to know the agent's team",
    )
    return agent


async def _reservation(stack: Stack, rid: str) -> dict[str, Any]:
    row = await asyncio.to_thread(cost_of(stack).store.ledger.reservation, rid)
    assert row is not None
    return row


async def _status(operator: Client, scope: str, name: str) -> BudgetStatus:
    shown = await request(
        operator,
        "sb.admin.budgets.show",
        ShowBudget(scope=scope, name=name),
        BudgetList,  # type: ignore[arg-type]
    )
    return shown.budgets[0]


async def test_model_calls_longer_than_the_ttl_keep_their_reservations(
    stack: Stack, operator: Client, make_agent: AgentFactory
) -> None:
    """Eight loops race for a $0.03 team budget with $0.01 calls that each run three
    TTLs: three calls get a reservation and keep it to the end; everyone else is
    refused meanwhile, and spend ends at the limit, not above it."""
    await _set(operator, stack, "team", "risk", 0.03)
    agents = [await _agent(make_agent, stack, f"looper-{i}", "risk") for i in range(2)]
    granted: list[str] = []
    refused = 0
    done = asyncio.Event()

    async def loop(agent: Agent) -> None:
        nonlocal refused
        while not done.is_set():
            try:
                async with agent.model_call(MODEL, estimated_tokens=1_000, timeout=10) as call:
                    assert call.decision is not None
                    granted.append(call.decision.reservation_id)
                    await asyncio.sleep(3 * TTL)  # the model takes its time
                    call.record(output_tokens=1_000)  # $0.01: what was reserved
                if len(granted) >= 3:
                    done.set()
            except (BudgetExceeded, CallDenied):  # no room (or the budget's breaker)
                refused += 1
                await asyncio.sleep(0.1)

    await asyncio.wait_for(asyncio.gather(*(loop(a) for a in agents for _ in range(4))), 45)
    cost = cost_of(stack)

    async def all_settled() -> bool:
        rows = [await _reservation(stack, rid) for rid in granted]
        return all(r["state"] == "settled" for r in rows)

    await eventually(all_settled, "every granted reservation settled (none expired)")
    status = await _status(operator, "team", "risk")
    assert status.spent_usd == pytest.approx(0.03)
    assert status.spent_usd <= 0.03 + 1e-12
    assert len(granted) == 3
    assert refused > 0  # others asked while the calls ran, and were refused
    assert cost.budget_stats["renewed"] > 0
    assert cost.budget_stats["overspent"] == 0
    assert policy_of(stack).breakers.get("agent.looper-0") is None  # type: ignore[union-attr]


async def test_another_agent_cannot_renew_someone_elses_reservation(
    make_stack: StackFactory, operator: Client, make_agent: AgentFactory
) -> None:
    stack = await _stack(make_stack, budget_reservation_ttl=60.0)  # nothing expires here
    await _set(operator, stack, "team", "ops", 1.0)
    owner = await _agent(make_agent, stack, "owner", "ops")
    thief = await _agent(make_agent, stack, "thief", "ops")
    decision = await owner.authorize("use_model", MODEL, estimated_tokens=1_000)
    rid = decision.reservation_id
    assert rid
    before = await _reservation(stack, rid)
    ask = RenewReservation(reservation_id=rid)
    with pytest.raises(NotFound) as stolen:
        await request(thief.nc, thief.subjects.cost_renew("thief"), ask, ReservationRenewed)
    with pytest.raises(NotFound) as unknown:
        await request(
            thief.nc, thief.subjects.cost_renew("thief"),
            RenewReservation(reservation_id="0" * 32), ReservationRenewed,
        )  # fmt: skip
    # Someone else's reservation looks exactly like one that does not exist.
    assert stolen.value.message.replace(rid, "X") == unknown.value.message.replace("0" * 32, "X")
    assert await _reservation(stack, rid) == before
    assert cost_of(stack).budget_stats["renewals_refused"] == 2
    # Its owner may (asked this early, it is not due: nothing is written).
    mine = await request(owner.nc, owner.subjects.cost_renew("owner"), ask, ReservationRenewed)
    assert (mine.state, mine.renewed, mine.capped) == ("open", False, False)
    assert mine.expires_at == before["expires_at"] and 0 < mine.renew_in <= 60


async def test_late_usage_of_an_expired_reservation_over_the_limit_alerts_and_stops_the_agent(
    stack: Stack, operator: Client, make_agent: AgentFactory, audit_trail: AuditTrail
) -> None:
    """Renewal off (a bare ``authorize``, no ``model_call``): the reservation expires,
    someone else reserves the room, the late usage still gets charged but is flagged as
    overspend, audited as an alert, and the agent's breaker holds until reset."""
    await _set(operator, stack, "team", "ops", 0.03)
    slow = await _agent(make_agent, stack, "slow", "ops")
    other = await _agent(make_agent, stack, "other", "ops")
    decision = await slow.authorize("use_model", MODEL, estimated_tokens=2_000)  # $0.02
    rid = decision.reservation_id
    assert rid

    async def expired() -> bool:
        return bool((await _reservation(stack, rid))["state"] == "expired")

    await eventually(expired, "the unrenewed reservation released")
    assert (await other.authorize("use_model", MODEL, estimated_tokens=2_000)).effect == "allow"
    report_id = await slow.report_usage(
        model=MODEL,
        output_tokens=4_000,
        reservation_id=rid,  # $0.04: more than the limit
    )
    [alert] = await audit_trail.wait_for(
        lambda r: r.kind == "alert" and r.data.get("event") == "overspend"
    )
    data = alert.data
    assert alert.actor == "slow"
    assert (data["budget"], data["limit_usd"], data["agent"], data["report"]) == (
        "team.ops.day", 0.03, "slow", report_id,
    )  # fmt: skip
    assert (data["cause"], data["reservation_id"]) == ("expired_reservation", rid)
    assert data["spent_usd"] == pytest.approx(0.04)
    assert "signalbox breakers reset agent:slow" in data["fix"]
    cost = cost_of(stack)
    assert cost.budget_stats["overspent"] == 1
    # The ledger is true: the money was spent.
    assert (await _status(operator, "team", "ops")).spent_usd == pytest.approx(0.04)
    # The agent is stopped until an operator resets its breaker (no cool-down).
    policy = policy_of(stack)
    assert policy.breakers is not None

    def tripped() -> Any:
        breaker = policy.breakers.get("agent.slow") if policy.breakers else None
        return breaker is not None and breaker.state == "open" and breaker.until is None

    await eventually(tripped, "slow's breaker open until reset")
    breaker = policy.breakers.get("agent.slow")
    assert breaker is not None and breaker.reason == "budget" and "overspent" in breaker.text
    with pytest.raises(CallDenied) as refused:
        async with slow.model_call(MODEL, estimated_tokens=10):
            raise AssertionError("the block must not run")
    assert refused.value.details["reason_code"] == "breaker_open"
    # The late usage is also on record as unreserved, saying its reservation had expired.
    [unreserved] = await audit_trail.wait_for(
        lambda r: r.kind == "budget" and r.data.get("event") == "unreserved"
    )
    assert unreserved.data["reservation_expired"] is True


async def test_a_failed_renewal_warns_once_and_the_call_goes_on(
    stack: Stack, operator: Client, make_agent: AgentFactory, caplog: pytest.LogCaptureFixture
) -> None:
    await _set(operator, stack, "agent", "steady", 1.0)
    steady = await _agent(make_agent, stack, "steady", "risk")
    caplog.set_level(logging.WARNING, logger="broker.modelcall")
    async with steady.model_call(MODEL, estimated_tokens=1_000) as call:
        await eventually(lambda: call.renewal is not None, "the first renewal answered")
        await cost_of(stack).stop()  # the cost service goes away mid-call
        await eventually(
            lambda: any("could not be renewed" in r.getMessage() for r in caplog.records),
            "a warning about the renewal",
        )
        await asyncio.sleep(0.5)  # more renewals fail meanwhile: still one warning
        answer = "the model's answer"
        call.record(output_tokens=100)
    assert answer == "the model's answer" and call.report_id  # reported all the same
    warnings = [r for r in caplog.records if r.name == "broker.modelcall"]
    assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING
    assert call.decision is not None and call.decision.reservation_id in warnings[0].getMessage()
