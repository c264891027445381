"""The cost service's budgets: reservations before spend, renewals, definitions, alerts.

Definitions live in the KV bucket ``sb_budgets``; operators set them on
``sb.admin.budgets.<op>``. The policy service asks ``sb.cost.reserve``
(services only) when it allows a model call some budget applies to: the
call's worst-case cost is reserved on every applicable budget under a row
lock (:class:`~services.cost.budgets.BudgetLedger`), or refused naming the
budget, its limit, spent and reserved amounts. Usage reports settle their
reservation in the metering transaction (:mod:`services.cost.metering`);
reservations left unsettled are released at expiry
(``SIGNALBOX_BUDGET_RESERVATION_TTL``). While a model call runs, the SDK
renews its reservation on ``sb.cost.renew.<agent>`` (the agent the subject
names, and only its own open reservation: each renewal moves the expiry to at
most the TTL from now, never past ``SIGNALBOX_BUDGET_RESERVATION_MAX_LIFETIME``
after it was made). Crossing a soft threshold or exhausting a budget is
audited (kind ``budget``).

An exhausted agent or team budget trips that agent's or team's breaker until
the window ends. Usage that no live reservation covers and that takes a
budget past its limit is an overspend: charged (the money was spent),
audited as an ``alert`` (event ``overspend``: the budget, its limit, spent
and reserved amounts, the report and the agent), counted, and the agent's
breaker is tripped until an operator resets it, so no configuration lets
spend pass a limit silently.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import msgspec
from nats.js.errors import KeyNotFoundError
from nats.js.kv import KeyValue

from broker.diagnostics import cancel_and_wait
from broker.errors import NotFound, SignalboxError
from broker.ids import new_id
from broker.money import usd
from broker.runtime.breakers import BreakerBoard, breaker_key
from broker.runtime.budgets import applicable_keys, unreadable_budget, unreadable_keys
from broker.runtime.desk import EndpointSpec, declare_endpoint
from broker.runtime.jetstream import KV_BREAKERS, KV_BUDGETS
from broker.runtime.kvcache import KVCache
from broker.runtime.service import ServiceHost
from broker.subjects import Audience
from schemas import (
    Budget,
    BudgetList,
    BudgetStatus,
    ListBudgets,
    RemoveBudget,
    RenewReservation,
    Reservation,
    ReservationRenewed,
    ReserveBudget,
    SetBudget,
    ShowBudget,
    UsageReport,
)
from services.cost.budget_definitions import write_budget
from services.cost.budget_outcomes import BudgetAlert, Overspend
from services.cost.prices import NANOS_PER_USD, Prices
from services.cost.store import UsageStore

__all__ = ["BudgetDesk", "new_budget_stats"]

log = logging.getLogger(__name__)

_PERIODIC = {"day": "daily", "month": "monthly"}

#: The SDK renews a reservation when a third of the TTL has passed since it last did.
_RENEW_AT = 1 / 3


def new_budget_stats() -> dict[str, int]:
    """The budget counters of a cost replica, at zero (see :attr:`BudgetDesk.stats`)."""
    return {
        "reserved": 0, "refused": 0, "expired": 0, "soft_alerts": 0, "exhausted": 0,
        "unreadable": 0, "renewed": 0, "renewals_refused": 0, "overspent": 0,
    }  # fmt: skip


_CAUSES = {
    "expired_reservation": "its reservation had expired before the report was metered (the "
    "model call outlived SIGNALBOX_BUDGET_RESERVATION_TTL without renewing it)",
    "unreserved": "it settled no reservation of its own",
    "over_reservation": "it cost more than its reservation held",
}


def _overspend_text(over: Overspend) -> str:
    """Why ``over`` is an overspend, in words an operator can act on."""
    c = over.charge
    state = "exhausted and overspent" if c.spent_usd >= c.limit_usd else "overspent"
    return (
        f"budget {over.budget.key} {state} by {over.agent}: usage report {over.report_id} "
        f"cost {usd(over.cost_nanos / NANOS_PER_USD)}, {usd(over.uncovered_nanos / NANOS_PER_USD)} "
        f"of it held by no live reservation ({_CAUSES[over.cause]}), leaving "
        f"{usd(c.spent_usd)} spent + {usd(c.reserved_usd)} reserved of {usd(c.limit_usd)}"
    )


class BudgetDesk:
    """Reserves, renews and settles budgets' alerts; answers ``sb.admin.budgets.<op>``.

    Built with the service (it declares its endpoints, :meth:`endpoints`), bound
    to the store and prices at :meth:`start`.

    Args:
        service: The cost service it lives in (settings, subjects, audit, operator,
            the agent of the request being handled).
        team: The team an agent is bound to now (``""``: unknown agent).
        project: A project named for an agent if it is bound to it, else ``""``.
        stats: The service's budget counters (:func:`new_budget_stats`): reservations
            granted / refused / expired, renewals (refused), budget alerts audited,
            unreadable records and overspends alerted, by this replica.

    Attributes:
        breakers: The breakers it trips when an agent's or a team's budget is exhausted
            or overspent (after :meth:`start`, None after :meth:`stop`).
    """

    def __init__(
        self,
        service: ServiceHost,
        *,
        team: Callable[[str], str],
        project: Callable[[str, str], str],
        stats: dict[str, int],
    ) -> None:
        self.service = service
        self._team = team
        self._project = project
        self.stats = stats
        self._store: UsageStore | None = None
        self._prices: Prices | None = None
        self._kv: KeyValue | None = None
        self._cache: KVCache[Budget] | None = None
        self.breakers: BreakerBoard | None = None
        self._expiry: asyncio.Task[None] | None = None

    def endpoints(self) -> Sequence[EndpointSpec[Any]]:
        """``sb.cost.reserve`` (services), ``sb.cost.renew.<agent>`` (that agent) and
        ``sb.admin.budgets.{set,remove,list,show}`` (operators)."""
        s = self.service.subjects
        return [
            declare_endpoint(
                s.cost_reserve, ReserveBudget, self.reserve, audience=Audience.SERVICE
            ),
            # Agent-scoped: the subject's last token is the agent (requesting_agent()).
            declare_endpoint(
                s.cost_renew_wildcard, RenewReservation, self.renew, audience=Audience.AGENT
            ),
            declare_endpoint(s.admin("budgets", "set"), SetBudget, self.set_budget),
            declare_endpoint(s.admin("budgets", "remove"), RemoveBudget, self.remove_budget),
            declare_endpoint(s.admin("budgets", "list"), ListBudgets, self.list_budgets),
            declare_endpoint(s.admin("budgets", "show"), ShowBudget, self.show_budget),
        ]  # fmt: skip

    async def start(self, store: UsageStore, prices: Prices) -> None:
        """Watch the budget definitions and the breakers; release expired reservations.

        Args:
            store: The cost store (its :attr:`~services.cost.store.UsageStore.ledger`).
            prices: The prices a reservation's worst case is costed with.
        """
        self._store, self._prices = store, prices
        self._kv = await self.service.js.key_value(KV_BUDGETS)
        self._cache = KVCache(self._kv, Budget, on_unreadable=self._unreadable)
        await self._cache.start()
        self.breakers = BreakerBoard(
            await self.service.js.key_value(KV_BREAKERS), self.service.audit, self.service.actor
        )
        await self.breakers.start()
        self._expiry = asyncio.ensure_future(self._expire_reservations())

    @property
    def store(self) -> UsageStore:
        """The cost store (after start)."""
        assert self._store is not None, "budget desk not started"
        return self._store

    @property
    def prices(self) -> Prices:
        """The prices in use (after start)."""
        assert self._prices is not None, "budget desk not started"
        return self._prices

    @property
    def kv(self) -> KeyValue:
        """The ``sb_budgets`` bucket (after start)."""
        assert self._kv is not None, "budget desk not started"
        return self._kv

    async def stop(self) -> None:
        """Stop the expiry loop and the watches."""
        await cancel_and_wait(self._expiry, "the reservation expiry loop")
        self._expiry = None
        if self._cache is not None:
            await self._cache.stop()
            self._cache = None
        if self.breakers is not None:
            await self.breakers.stop()
            self.breakers = None

    @property
    def cache(self) -> KVCache[Budget]:
        """The budget definitions (``sb_budgets``, watched; after start)."""
        assert self._cache is not None, "service not started"
        return self._cache

    def lookup(self) -> KVCache[Budget] | None:
        """The definitions to settle usage against (None: started with none, or stopped)."""
        return self._cache if self._cache is not None and len(self._cache) else None

    async def settled(
        self, alerts: list[BudgetAlert], overspends: list[tuple[UsageReport, Overspend]]
    ) -> None:
        """Act on a committed metering transaction's thresholds and overspends."""
        # Breakers before records: an exhausted budget's, then those of the agents
        # whose usage overran a limit (held until reset: the last word on them).
        for alert in alerts:
            if alert.hard:
                await self.trip_exhausted(alert)
        await self._overspent(overspends)
        for alert in alerts:
            await self.alert(alert, actor=self.service.actor, trip=False)

    # -- reservations ------------------------------------------------------------------

    async def reserve(self, request: ReserveBudget) -> Reservation:
        """``sb.cost.reserve``: reserve a model call's worst-case cost on every applicable budget.

        Nothing applies: granted with no id (nothing to settle). Refused: no
        amount is held anywhere, the refusal names the budget, and it is
        audited (kind ``budget``). The request's ``project`` counts only if
        it is bound to the agent (its usage report could not charge it either).
        """
        cache = self.cache
        team = self._team(request.agent)
        project = self._project(request.agent, request.project)
        bad = unreadable_keys(
            cache.unreadable, agent=request.agent, team=team, project=project,
            on_behalf_of=request.on_behalf_of,
        )  # fmt: skip
        if bad:  # fail closed: the policy service turns this into a deny
            raise unreadable_budget(*bad[0])
        budgets = applicable_keys(
            cache,
            agent=request.agent,
            team=team,
            project=project,
            on_behalf_of=request.on_behalf_of,
        )
        # Worst case: without a cap on the completion, every token is priced as output.
        if request.output_tokens:
            priced = self.prices.cost(request.model, request.input_tokens, request.output_tokens)
        else:
            priced = self.prices.cost(request.model, 0, request.input_tokens)
        amount = priced.nanos / NANOS_PER_USD
        if not budgets:
            return Reservation(granted=True, amount_usd=amount, priced_by_fallback=priced.fallback)
        now = time.time()
        reservation_id = new_id()
        expires_at = now + self.service.settings.budget_reservation_ttl
        grant = await asyncio.to_thread(
            self.store.ledger.reserve,
            budgets,
            reservation_id=reservation_id,
            agent=request.agent,
            amount_nanos=priced.nanos,
            now=now,
            expires_at=expires_at,
            trace_id=request.trace_id,
        )
        for alert in grant.alerts:
            await self.alert(alert, actor=request.agent, trace_id=request.trace_id)
        if not grant.granted:
            self.stats["refused"] += 1
            assert grant.refused is not None
            await self.service.audit.emit(
                "budget",
                actor=request.agent,
                subject=self.service.subjects.cost_reserve,
                trace_id=request.trace_id,
                data={
                    "event": "refused", "agent": request.agent, "model": request.model,
                    "amount_usd": amount, "budget": msgspec.to_builtins(grant.refused),
                    "exhausted": grant.exhausted,
                },
            )  # fmt: skip
            return Reservation(
                granted=False, amount_usd=amount, refused=grant.refused,
                priced_by_fallback=priced.fallback,
            )  # fmt: skip
        self.stats["reserved"] += 1
        return Reservation(
            granted=True, id=reservation_id, amount_usd=amount, expires_at=expires_at,
            charges=tuple(grant.charges), priced_by_fallback=priced.fallback,
        )  # fmt: skip

    async def renew(self, request: RenewReservation) -> ReservationRenewed:
        """``sb.cost.renew.<agent>``: keep the reservation of ``agent``'s model call in progress.

        ``agent`` is the one the subject names (:meth:`ServiceHost.requesting_agent`:
        only that agent may publish it), never a body field.

        Only ``agent``'s own open reservation is renewed, to at most
        ``SIGNALBOX_BUDGET_RESERVATION_TTL`` from now and never past
        ``SIGNALBOX_BUDGET_RESERVATION_MAX_LIFETIME`` after it was made; a
        settled or expired one is answered as it is (nothing renewed).

        Raises:
            NotFound: ``agent`` has no reservation with that id (another
                agent's is not touched, nor said to exist).
        """
        agent = self.service.requesting_agent()
        ttl = self.service.settings.budget_reservation_ttl
        now = time.time()
        outcome = None
        if agent:
            outcome = await asyncio.to_thread(
                self.store.ledger.renew, request.reservation_id, agent=agent, now=now, ttl=ttl,
                max_lifetime=self.service.settings.budget_reservation_max_lifetime,
            )  # fmt: skip
        if outcome is None:
            self.stats["renewals_refused"] += 1
            raise NotFound(
                f"{agent or 'this sender'} has no budget reservation {request.reservation_id}; "
                "an agent renews only the reservation of its own model call in progress",
                details={"reservation_id": request.reservation_id, "agent": agent},
            )
        if outcome.renewed:
            self.stats["renewed"] += 1
        open_ = outcome.state == "open"
        renew_in = 0.0
        if open_ and not outcome.capped:
            # When a third of the TTL has passed since the expiry was last moved.
            renew_in = max(0.0, outcome.expires_at - now - ttl * (1 - _RENEW_AT))
        return ReservationRenewed(
            reservation_id=request.reservation_id, state=outcome.state,
            renewed=outcome.renewed, expires_at=outcome.expires_at, renew_in=renew_in,
            capped=open_ and outcome.capped,
        )  # fmt: skip

    # -- alerts and breakers -----------------------------------------------------------

    async def _overspent(self, found: list[tuple[UsageReport, Overspend]]) -> None:
        """Usage that took a budget past its limit with no live reservation covering it:
        trip each such agent's breaker (until an operator resets it), then audit every
        overspend as an ``alert`` and count it. The usage itself stays charged."""
        if not found:
            return
        last: dict[str, Overspend] = {}
        for _, over in found:
            last[over.agent] = over  # charged in order: the last is the furthest over
        for agent, over in last.items():
            await self._trip_overspender(agent, over)
        for report, over in found:
            self.stats["overspent"] += 1
            c = over.charge
            log.warning(
                "cost: overspend: %s's usage report %s took budget %s to %s spent + %s "
                "reserved of %s (%s); its breaker is tripped until reset",
                over.agent, over.report_id, over.budget.key, usd(c.spent_usd),
                usd(c.reserved_usd), usd(c.limit_usd), over.cause,
            )  # fmt: skip
            await self.service.audit.emit(
                "alert",
                actor=over.agent,
                subject=f"$KV.{KV_BUDGETS}.{over.budget.key}",
                trace_id=report.trace_id,
                event_id=f"overspend-{over.agent}-{over.report_id}-{over.budget.key}",
                data={
                    "event": "overspend", "budget": over.budget.key, "scope": over.budget.scope,
                    "name": over.budget.name, "window": over.budget.window,
                    "limit_usd": c.limit_usd, "spent_usd": c.spent_usd,
                    "reserved_usd": c.reserved_usd,
                    "over_usd": max(0.0, c.spent_usd + c.reserved_usd - c.limit_usd),
                    "window_start": c.window_start, "window_end": c.window_end,
                    "agent": over.agent, "report": over.report_id,
                    "reservation_id": over.reservation_id, "cause": over.cause,
                    "model": report.model, "cost_usd": over.cost_nanos / NANOS_PER_USD,
                    "uncovered_usd": over.uncovered_nanos / NANOS_PER_USD,
                    "text": _overspend_text(over),
                    "effect": "charged (the money was spent); the breaker agent."
                    f"{over.agent} is tripped: its model use and calls are refused until an "
                    "operator resets it",
                    "fix": f"signalbox breakers reset agent:{over.agent}",
                },
            )  # fmt: skip

    async def _trip_overspender(self, agent: str, over: Overspend) -> None:
        """Open ``agent``'s breaker until an operator resets it (reason ``budget``)."""
        if self.breakers is None:
            return
        c = over.charge
        try:
            await self.breakers.trip(
                breaker_key("agent", agent),
                "budget",
                f"{_overspend_text(over)}; its model use is refused until an operator resets "
                f"this breaker (`signalbox breakers reset agent:{agent}`)",
                figures={"limit_usd": c.limit_usd, "spent_usd": c.spent_usd,
                         "reserved_usd": c.reserved_usd,
                         "uncovered_usd": over.uncovered_nanos / NANOS_PER_USD},
                cooldown=None,
            )  # fmt: skip
        except SignalboxError as err:  # the alert is audited all the same
            log.error("cost: could not trip the breaker of overspending %s: %s", agent, err.message)

    def _unreadable(self, key: str, reason: str) -> None:
        """A stored budget cannot be read: audit it (kind ``alert``); calls it governs fail."""
        self.stats["unreadable"] += 1
        err = unreadable_budget(key, reason)
        self.service.audit.alert_unreadable(
            KV_BUDGETS, key, reason,
            effect="model calls this budget governs are refused (budget_unreadable)",
            fix=err.details["fix"],
        )  # fmt: skip

    async def alert(
        self, alert: BudgetAlert, *, actor: str, trace_id: str = "", trip: bool = True
    ) -> None:
        """Audit a crossed threshold (soft: an alert; hard: the budget is exhausted).

        An exhausted agent or team budget also trips that agent's or team's
        breaker until the window ends (every policy replica then refuses its
        calls at once, not only its model calls); at the end one probe call
        passes and closes it. A project has no breaker: its calls are refused
        at reservation. ``trip=False``: the caller tripped it already
        (:meth:`trip_exhausted`).
        """
        self.stats["exhausted" if alert.hard else "soft_alerts"] += 1
        event = "exhausted" if alert.hard else "soft_threshold"
        log.warning(
            "cost: budget %s %s: spent %s + reserved %s of %s",
            alert.budget.key, event.replace("_", " "), usd(alert.charge.spent_usd),
            usd(alert.charge.reserved_usd), usd(alert.charge.limit_usd),
        )  # fmt: skip
        if alert.hard and trip:
            await self.trip_exhausted(alert)
        await self.service.audit.emit(
            "budget",
            actor=actor,
            subject=f"$KV.{KV_BUDGETS}.{alert.budget.key}",
            trace_id=trace_id,
            data={
                "event": event, "budget": msgspec.to_builtins(alert.budget),
                "charge": msgspec.to_builtins(alert.charge),
                "soft_ratio": alert.budget.soft_ratio,
            },
        )  # fmt: skip

    async def trip_exhausted(self, alert: BudgetAlert) -> None:
        """Trip the breaker of an exhausted agent or team budget until its window ends."""
        budget = alert.budget
        if alert.hard and budget.scope != "project" and self.breakers is not None:
            charge = alert.charge
            try:
                await self.breakers.trip(
                    breaker_key(budget.scope, budget.name),
                    "budget",
                    f"{_PERIODIC[budget.window]} budget {budget.key} exhausted: "
                    f"{usd(charge.spent_usd)} spent of {usd(charge.limit_usd)}; it resets at "
                    "the end of the window, or raise it with "
                    f"`signalbox budgets set {budget.scope}:{budget.name}`",
                    figures={"limit_usd": charge.limit_usd, "spent_usd": charge.spent_usd,
                             "reserved_usd": charge.reserved_usd},
                    cooldown=max(1.0, charge.window_end - time.time()),
                )  # fmt: skip
            except SignalboxError as err:  # audited either way; refusals still hold
                log.error("cost: could not trip the breaker of %s: %s", budget.key, err.message)

    async def _expire_reservations(self) -> None:
        """Release reservations nobody settled, every few seconds (every replica; row-locked)."""
        interval = min(5.0, max(0.05, self.service.settings.budget_reservation_ttl / 4))
        while True:
            await asyncio.sleep(interval)
            try:
                released = await asyncio.to_thread(self.store.ledger.expire, time.time())
            except Exception:
                log.exception("cost: releasing expired reservations failed; will retry")
                continue
            if released:
                self.stats["expired"] += released
                log.info("cost: released %d expired budget reservations", released)

    # -- definitions (sb.admin.budgets.<op>) -------------------------------------------

    async def set_budget(self, request: SetBudget) -> BudgetStatus:
        """``set``: create or change a budget (audited with the previous definition).

        Only the fields the request gives change; the rest keep the stored
        budget's values (a new budget gets the defaults). Merged and written
        under compare-and-set (:func:`~services.cost.budget_definitions.write_budget`).
        """
        written = await write_budget(
            self.kv, request, set_by=self.service.operator(request.requested_by)
        )
        budget, previous = written.budget, written.previous
        await self.service.audit.emit(
            "admin",
            actor=budget.set_by,
            subject=self.service.subjects.admin("budgets", "set"),
            data={
                "op": "budget_set", "budget": msgspec.to_builtins(budget),
                "previous": msgspec.to_builtins(previous) if previous else None,
                "given": list(written.given),
            },
        )  # fmt: skip
        status = (await asyncio.to_thread(self.store.ledger.status, budget, time.time()))[0]
        if status.spent_usd < budget.limit_usd:
            await self._release_breaker(budget, f"budget {budget.key} set to "
                                        f"{usd(budget.limit_usd)} by {budget.set_by}")  # fmt: skip
        return status

    async def _release_breaker(self, budget: Budget, text: str) -> None:
        """Close the scope's breaker if an exhausted budget tripped it and no longer holds."""
        if budget.scope == "project" or self.breakers is None:
            return
        key = breaker_key(budget.scope, budget.name)
        breaker = self.breakers.get(key)
        if breaker is None or breaker.state == "closed" or breaker.reason != "budget":
            return
        with contextlib.suppress(SignalboxError):  # lost a race: someone else reset it
            await self.breakers.reset(key, by=budget.set_by or self.service.actor, text=text)

    async def remove_budget(self, request: RemoveBudget) -> BudgetStatus:
        """``remove``: delete a budget's definition (its windows stay in the store)."""
        key = f"{request.scope}.{request.name}.{request.window}"
        budget = self.cache.get(key)
        if budget is None:
            raise NotFound(
                f"no {request.window} budget for {request.scope} {request.name}; "
                "`signalbox budgets list` shows the budgets",
                details={"key": key},
            )
        with contextlib.suppress(KeyNotFoundError):
            await self.kv.delete(key)
        who = self.service.operator(request.requested_by)
        await self._release_breaker(budget, f"budget {key} removed by {who}")
        await self.service.audit.emit(
            "admin",
            actor=who,
            subject=self.service.subjects.admin("budgets", "remove"),
            data={"op": "budget_removed", "budget": msgspec.to_builtins(budget)},
        )
        return (await asyncio.to_thread(self.store.ledger.status, budget, time.time()))[0]

    async def list_budgets(self, request: ListBudgets) -> BudgetList:
        """``list``: every budget (or one scope's) in its current window."""
        now = time.time()
        budgets = sorted(
            (b for b in self.cache.values()
             if request.scope is None or b.scope == request.scope),
            key=lambda b: b.key,
        )  # fmt: skip
        rows = [(await asyncio.to_thread(self.store.ledger.status, b, now))[0] for b in budgets]
        unreadable = {
            k: why for k, why in sorted(self.cache.unreadable.items())
            if request.scope is None or k.startswith(f"{request.scope}.")
        }  # fmt: skip
        return BudgetList(budgets=tuple(rows), unreadable=unreadable)

    async def show_budget(self, request: ShowBudget) -> BudgetList:
        """``show``: one scope/name's budgets, current and past windows."""
        now = time.time()
        rows: list[BudgetStatus] = []
        for window in ("day", "month"):
            budget = self.cache.get(f"{request.scope}.{request.name}.{window}")
            if budget is not None:
                rows.extend(
                    await asyncio.to_thread(self.store.ledger.status, budget, now, request.windows)
                )
        if not rows:
            raise NotFound(
                f"no budget for {request.scope} {request.name}; set one with "
                f"`signalbox budgets set {request.scope}:{request.name} --limit USD`",
                details={"scope": request.scope, "name": request.name},
            )
        return BudgetList(budgets=tuple(rows))
