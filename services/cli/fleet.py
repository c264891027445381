"""Declarative fleet configuration: the control plane's state in the fleet file's terms,
the plan that makes it match a file, and applying that plan.

Nothing here writes to the control plane by itself: the state is read through
the operators' list and show endpoints, and every change goes through the
admin endpoint an operator's command uses (``sb.admin.<service>.<op>``), which
validates it, records who asked and audits it. The file's model:
:mod:`services.cli.fleet_file`; the commands (``signalbox apply``,
``signalbox export``): :mod:`services.cli.fleet_cmds`.

What each section means to the control plane (``docs/decisions.md``, 40):

* ``[[bindings]]``: ``agents bind`` with every attribute (one left out is
  bound empty). Only enrolled agents have a binding, and applying issues no
  credential: a binding of an agent never enrolled blocks the plan.
* ``[[budgets]]``: ``budgets set`` with every field; ``--prune`` removes the
  budgets the file does not list (``budgets remove``).
* ``[[routes]]``: ``rollout set`` (a canary) or ``rollout promote`` (no
  canary). Deprecations stay ``rollout deprecate``'s; no endpoint removes a
  route, so ``--prune`` keeps (and lists) routes the file does not name.
* ``[[breakers]]``: breakers an operator holds open until reset (reason
  ``manual``, no cool-down). Breakers that trip on their own, and manual ones
  with a cool-down, are incidents, not configuration: never exported, never
  reset by ``--prune``; a listed breaker that is open for another reason is
  tripped again by hand (held until reset from then on).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import msgspec
from nats.aio.client import Client

from broker.errors import NotFound, SignalboxError
from broker.subjects import Subjects
from schemas import (
    AgentBinding,
    BindAgent,
    Bound,
    Breaker,
    BreakerList,
    BudgetList,
    BudgetStatus,
    CredentialList,
    GetBinding,
    ListBreakers,
    ListBudgets,
    ListCredentials,
    PromoteRollout,
    RemoveBudget,
    ResetBreaker,
    RolloutStatus,
    RolloutStatusRequest,
    Route,
    RouteGuard,
    SetBudget,
    SetRollout,
    TripBreaker,
)
from services.cli.client import admin_request, list_agents
from services.cli.common import clock
from services.cli.fleet_file import (
    SECTIONS,
    BindingEntry,
    BreakerEntry,
    BudgetEntry,
    Entry,
    FleetFile,
    GuardEntry,
    RouteEntry,
    toml_value,
)

__all__ = [
    "Change",
    "FieldChange",
    "FleetState",
    "Request",
    "apply_changes",
    "plan",
    "read_state",
]

Kind = Literal["binding", "budget", "route", "breaker"]
#: ``keep``: in the control plane, not in the file, and no endpoint removes it
#: (``--prune`` only); ``blocked``: the file asks for what no endpoint can do.
Action = Literal["create", "update", "unchanged", "delete", "keep", "blocked"]
Status = Literal["planned", "applied", "failed", "unchanged", "skipped"]

# -- the control plane's state, in the file's terms ------------------------------------------


@dataclass(frozen=True)
class FleetState:
    """What the control plane holds now.

    Attributes:
        fleet: Its budgets, routes, bindings and held manual breakers.
        complete: Every route and binding was read (for ``--prune`` and
            ``export``), not only those the file names.
        unreadable_budgets: ``scope.name.window`` -> why its record cannot be read.
        breakers: The breakers open now (any reason), by key (``team.risk``).
        never_enrolled: Agents the file binds that were never enrolled.
    """

    fleet: FleetFile
    complete: bool = False
    unreadable_budgets: Mapping[str, str] = field(default_factory=dict)
    breakers: Mapping[str, Breaker] = field(default_factory=dict)
    never_enrolled: frozenset[str] = frozenset()


def _held(breaker: Breaker) -> bool:
    """An operator's breaker held open until reset: the only kind a fleet file declares."""
    return breaker.state == "open" and breaker.reason == "manual" and breaker.until is None


def _route_entry(route: Route) -> RouteEntry:
    others = [v for v in route.weights if v != route.stable]
    if not others:
        return RouteEntry(agent=route.target, stable=route.stable)  # sticky means nothing
    if len(others) > 1:
        raise SignalboxError(
            f"the route of {route.target} splits calls over {len(route.weights)} versions; "
            "a fleet file holds a stable version and one canary: set it with `signalbox "
            f"rollout set {route.target} ...` first",
            details={"target": route.target},
        )
    canary = others[0]
    guard = route.guard
    return RouteEntry(
        agent=route.target, stable=route.stable, canary=canary, weight=route.weights[canary],
        sticky=route.sticky,
        guard=GuardEntry(**msgspec.structs.asdict(guard)) if guard is not None else None,
    )  # fmt: skip


def _binding_entry(binding: AgentBinding) -> BindingEntry:
    return BindingEntry(
        agent=binding.agent, team=binding.team, owner=binding.owner,
        namespace=binding.namespace, region=binding.region, projects=binding.projects,
        tags=binding.tags,
    )  # fmt: skip


async def read_state(
    nc: Client, subjects: Subjects, wanted: FleetFile, *, complete: bool
) -> FleetState:
    """Read budgets, breakers, and the routes and bindings of the agents ``wanted`` names
    (``complete``: of every registered or enrolled agent too) through the operators'
    endpoints.

    Raises:
        SignalboxError: a service did not answer, or refused (typed by its code).
    """

    async def ask(service: str, op: str, body: Any, returns: type[Any]) -> Any:
        return await admin_request(nc, subjects, op, body, returns, service=service)

    budgets: BudgetList = await ask("budgets", "list", ListBudgets(), BudgetList)
    listed: BreakerList = await ask("breakers", "list", ListBreakers(), BreakerList)
    route_names = {r.agent for r in wanted.routes}
    binding_names = {b.agent for b in wanted.bindings}
    if complete:
        registered = {r.manifest.name for r in await list_agents(nc, subjects)}
        enrolled: CredentialList = await ask(
            "registry", "credentials", ListCredentials(include_inactive=True), CredentialList
        )
        route_names |= registered
        binding_names |= registered | {c.agent for c in enrolled.items}
    routes = []
    for name in sorted(route_names):
        status: RolloutStatus = await ask(
            "rollout", "status", RolloutStatusRequest(target=name, window=1.0), RolloutStatus
        )
        if status.route is not None:
            routes.append(_route_entry(status.route))
    bindings, never = [], set()
    for name in sorted(binding_names):
        try:
            found = await ask("registry", "binding", GetBinding(name=name), AgentBinding)
            bindings.append(_binding_entry(found))
        except NotFound:
            never.add(name)
    seen: dict[str, BudgetEntry] = {}
    for s in budgets.budgets:
        b = s.budget
        seen.setdefault(
            b.key,
            BudgetEntry(
                scope=b.scope,
                name=b.name,
                window=b.window,
                limit_usd=b.limit_usd,
                soft_ratio=b.soft_ratio,
            ),
        )
    open_now = {b.key: b for b in listed.breakers}
    held = [
        BreakerEntry(target=b.key.replace(".", ":", 1), reason=b.text)
        for b in open_now.values() if _held(b)
    ]  # fmt: skip
    fleet = FleetFile(
        bindings=tuple(bindings), budgets=tuple(seen[k] for k in sorted(seen)),
        routes=tuple(routes), breakers=tuple(sorted(held, key=lambda b: b.target)),
    )  # fmt: skip
    return FleetState(
        fleet=fleet, complete=complete, unreadable_budgets=dict(budgets.unreadable),
        breakers=open_now, never_enrolled=frozenset(never),
    )  # fmt: skip


# -- the plan --------------------------------------------------------------------------------


@dataclass(frozen=True)
class FieldChange:
    """One field of an entry: its value now and in the file (TOML text, ``""``: none)."""

    field: str
    before: str
    after: str


@dataclass(frozen=True)
class Request:
    """The admin request that makes one change: ``sb.admin.<service>.<op>``."""

    service: str
    op: str
    body: Any
    returns: type[Any]


@dataclass
class Change:
    """One line of the plan and, once applied, what happened.

    Attributes:
        kind: ``binding``, ``budget``, ``route`` or ``breaker``.
        name: What it is (``team:risk (day)``, an agent, ``team:legacy``).
        action: ``create``, ``update``, ``unchanged``, ``delete``, ``keep``, ``blocked``.
        fields: The fields that change (all of them for a create or delete).
        note: Why, where the fields do not say it.
        request: What applying it sends (None: nothing to send).
        status: ``planned``, ``applied``, ``failed``, ``unchanged`` or ``skipped``.
        error: Why it failed.
    """

    kind: Kind
    name: str
    action: Action
    fields: tuple[FieldChange, ...] = ()
    note: str = ""
    request: Request | None = None
    status: Status = "planned"
    error: str = ""

    def to_builtins(self) -> dict[str, Any]:
        """For ``--json``."""
        return {
            "kind": self.kind, "name": self.name, "action": self.action,
            "fields": [{"field": f.field, "before": f.before, "after": f.after}
                       for f in self.fields],
            "note": self.note, "status": self.status, "error": self.error,
        }  # fmt: skip


def _flat(entry: Entry | None) -> dict[str, str]:
    """An entry's fields as TOML text, a table's as ``table.field``."""
    if entry is None:
        return {}
    flat: dict[str, str] = {}
    for key, value in msgspec.to_builtins(entry).items():
        if value is None:  # an optional key left out
            continue
        if isinstance(value, dict):
            flat.update({f"{key}.{k}": toml_value(v) for k, v in value.items()})
        else:
            flat[key] = toml_value(value)
    return flat


#: The fields that name an entry (its key, shown as the change's name, never changed).
_NAMING = frozenset({"scope", "name", "window", "agent", "target"})


def _diff(before: Entry | None, after: Entry | None) -> tuple[FieldChange, ...]:
    old, new = _flat(before), _flat(after)
    names = [*new, *(k for k in old if k not in new)]
    return tuple(
        FieldChange(n, old.get(n, ""), new.get(n, ""))
        for n in names
        if old.get(n) != new.get(n) and n not in _NAMING
    )


def plan(desired: FleetFile, state: FleetState, *, prune: bool, by: str) -> list[Change]:
    """The changes that make the control plane match ``desired``, section by section
    (bindings, budgets, routes, breakers), each in file order, then what ``prune``
    removes. ``by``: the operator's login, sent as ``requested_by``.
    """
    changes: list[Change] = []
    for section in SECTIONS:
        kind: Kind = section[:-1]  # type: ignore[assignment]
        current = {e.key: e for e in getattr(state.fleet, section)}
        for entry in getattr(desired, section):
            changes.append(_change(kind, entry, current.get(entry.key), state, by))
        if not prune:
            continue
        wanted = {e.key for e in getattr(desired, section)}
        for key, entry in current.items():
            if key not in wanted:
                changes.append(_removal(kind, entry, by))
        if kind == "budget":
            listed = {_kv_key(b) for b in desired.budgets}
            for key, why in sorted(state.unreadable_budgets.items()):
                if key not in listed:
                    changes.append(_unreadable_removal(key, why, by))
    return changes


def _unreadable_removal(key: str, why: str, by: str) -> Change:
    """``--prune`` removes an unreadable budget record the file does not list."""
    scope, name, window = key.split(".")
    body = msgspec.convert(
        {"type": "remove_budget.v1", "scope": scope, "name": name, "window": window,
         "requested_by": by},
        RemoveBudget,
    )  # fmt: skip
    return Change(
        "budget",
        f"{scope}:{name} ({window})",
        "delete",
        note=f"unreadable record ({why})",
        request=Request("budgets", "remove", body, BudgetStatus),
    )


def _kv_key(budget: BudgetEntry) -> str:
    return f"{budget.scope}.{budget.name}.{budget.window}"


def _change(kind: Kind, entry: Entry, now: Entry | None, state: FleetState, by: str) -> Change:
    fields = _diff(now, entry)
    action: Action = "create" if now is None else ("update" if fields else "unchanged")
    note = ""
    if isinstance(entry, BudgetEntry) and _kv_key(entry) in state.unreadable_budgets:
        why = state.unreadable_budgets[_kv_key(entry)]
        action, note = "update", f"rewrites an unreadable record ({why})"
    if isinstance(entry, BreakerEntry) and now is None:
        open_now = state.breakers.get(entry.breaker_key)
        if open_now is not None:
            action = "update"
            until = "until reset" if open_now.until is None else f"until {clock(open_now.until)}"
            note = f"open now ({open_now.reason}, {until}): held open until reset from now on"
    if isinstance(entry, BindingEntry) and entry.agent in state.never_enrolled:
        return Change(
            kind, entry.key, "blocked", fields,
            note=f"{entry.agent} was never enrolled: `signalbox agents enroll {entry.agent}` "
            "first (apply issues no credentials)", status="skipped",
        )  # fmt: skip
    if action == "unchanged":
        return Change(kind, entry.key, action, status="unchanged")
    return Change(kind, entry.key, action, fields, note, _request(entry, by))


def _request(entry: Entry, by: str) -> Request:
    """The admin request that sets ``entry`` (every field of it)."""
    if isinstance(entry, BudgetEntry):
        body: Any = SetBudget(
            scope=entry.scope, name=entry.name, window=entry.window,
            limit_usd=entry.limit_usd, soft_ratio=entry.soft_ratio, requested_by=by,
        )  # fmt: skip
        return Request("budgets", "set", body, BudgetStatus)
    if isinstance(entry, RouteEntry):
        if entry.canary is None:
            body = PromoteRollout(target=entry.agent, version=entry.stable, requested_by=by)
            return Request("rollout", "promote", body, RolloutStatus)
        guard = entry.guard
        body = SetRollout(
            target=entry.agent, weights={entry.canary: entry.weight or 0}, stable=entry.stable,
            sticky=bool(entry.sticky), requested_by=by,
            guard=RouteGuard(**msgspec.structs.asdict(guard)) if guard is not None else None,
        )  # fmt: skip
        return Request("rollout", "set", body, RolloutStatus)
    if isinstance(entry, BindingEntry):
        body = BindAgent(
            name=entry.agent, team=entry.team, owner=entry.owner, namespace=entry.namespace,
            region=entry.region, projects=entry.projects, tags=entry.tags,
            reason="signalbox apply", requested_by=by,
        )  # fmt: skip
        return Request("registry", "bind", body, Bound)
    body = TripBreaker(key=entry.breaker_key, text=entry.reason, requested_by=by)
    return Request("breakers", "trip", body, Breaker)


def _removal(kind: Kind, entry: Entry, by: str) -> Change:
    """What ``--prune`` does with ``entry``, which the file does not list."""
    fields = _diff(entry, None)
    if isinstance(entry, BudgetEntry):
        body = RemoveBudget(
            scope=entry.scope, name=entry.name, window=entry.window, requested_by=by
        )
        return Change(kind, entry.key, "delete", fields,
                      request=Request("budgets", "remove", body, BudgetStatus))  # fmt: skip
    if isinstance(entry, BreakerEntry):
        body_reset = ResetBreaker(
            key=entry.breaker_key,
            text="not in the fleet file (signalbox apply --prune)",
            requested_by=by,
        )
        return Change(kind, entry.key, "delete", fields,
                      request=Request("breakers", "reset", body_reset, Breaker))  # fmt: skip
    why = (
        "no endpoint removes a route (`signalbox rollout promote` sends every call to one version)"
        if kind == "route"
        else "a binding lasts as long as the enrollment (`signalbox agents revoke`)"
    )
    return Change(kind, entry.key, "keep", note=f"not in the file; kept: {why}", status="skipped")


# -- applying --------------------------------------------------------------------------------


async def apply_changes(nc: Client, subjects: Subjects, changes: Iterable[Change]) -> None:
    """Send each planned change's request in order; record ``applied`` or ``failed`` (and
    why) on it. A failure does not stop the others: they are independent."""
    for change in changes:
        request = change.request
        if request is None or change.status != "planned":
            continue
        try:
            await admin_request(
                nc, subjects, request.op, request.body, request.returns, service=request.service
            )
        except SignalboxError as err:
            change.status, change.error = "failed", err.message
        else:
            change.status = "applied"
