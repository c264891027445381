"""Budget definitions in ``sb_budgets``: partial updates, merged and written under compare-and-set.

``signalbox budgets set team:risk --limit 5`` changes the limit and nothing
else: a :class:`~schemas.SetBudget` field left out (``UNSET``) keeps the
stored budget's value, and a new budget gets :class:`~schemas.Budget`'s
defaults (it must be given a limit). The merge reads the entry and writes
it only if nobody wrote it in between (the KV revision: ``create`` for a new
key, ``update(last=revision)`` otherwise); a lost race re-reads and merges
again, so two operators changing different fields at once both land and
neither silently undoes the other.

A stored record that cannot be read is rewritten like a new budget (it has
no fields to keep): the limit must be given, as the unreadable-record alert
says (``signalbox budgets set ... --limit USD``).
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass
from typing import Final

import msgspec
from msgspec import UnsetType
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from broker.codec import decode, encode
from broker.errors import Conflict, InvalidInput, SignalboxError
from schemas import Budget, BudgetWindow, SetBudget

__all__ = ["BudgetWrite", "merged_budget", "write_budget"]

#: Read-merge-write attempts before giving up on a budget others keep changing.
_ATTEMPTS: Final = 20
#: Most seconds to wait (times the attempt) before re-reading after a lost race.
_BACKOFF: Final = 0.01
_WINDOWS: Final[tuple[BudgetWindow, ...]] = ("day", "month")


@dataclass(frozen=True, slots=True)
class BudgetWrite:
    """A budget as written, and the definition it replaced (None: it is new).

    Attributes:
        budget: The budget now stored.
        previous: The stored budget it replaced (None: there was none, or the
            stored record could not be read).
        given: The fields the request set (the others were kept or defaulted).
    """

    budget: Budget
    previous: Budget | None
    given: tuple[str, ...]


def _given(request: SetBudget) -> tuple[str, ...]:
    return tuple(
        f for f in ("window", "limit_usd", "soft_ratio")
        if not isinstance(getattr(request, f), UnsetType)
    )  # fmt: skip


def merged_budget(
    request: SetBudget, window: BudgetWindow, previous: Budget | None, *, set_by: str, now: float
) -> Budget:
    """The budget ``request`` leaves: its fields where given, ``previous``'s (or the
    defaults, for a new budget) elsewhere.

    Raises:
        InvalidInput: a new budget without a limit.
    """
    if previous is None:
        if isinstance(request.limit_usd, UnsetType):
            owner = f"{request.scope}:{request.name}"
            raise InvalidInput(
                f"there is no {window} budget for {request.scope} {request.name} yet: give its "
                f"limit (`signalbox budgets set {owner} --limit USD --window {window}`)",
                details={"key": f"{request.scope}.{request.name}.{window}", "path": "$.limit_usd"},
            )
        previous = Budget(
            scope=request.scope, name=request.name, window=window, limit_usd=request.limit_usd
        )
    changes: dict[str, object] = {"set_by": set_by, "set_at": now}
    if not isinstance(request.limit_usd, UnsetType):
        changes["limit_usd"] = request.limit_usd
    if not isinstance(request.soft_ratio, UnsetType):
        changes["soft_ratio"] = request.soft_ratio
    return msgspec.structs.replace(previous, **changes)


async def _read(kv: KeyValue, key: str) -> tuple[Budget | None, int, bool]:
    """The stored budget (None: absent or unreadable), its revision (0: absent), and
    whether a record is stored at all."""
    try:
        entry = await kv.get(key)
    except KeyNotFoundError:  # deleted ones included: create() recreates them
        return None, 0, False
    revision = entry.revision or 0
    if not entry.value:
        return None, revision, False
    try:
        return decode(entry.value, Budget), revision, True
    except SignalboxError:  # unreadable: rewritten whole, like a new budget
        return None, revision, True


async def _window_of(kv: KeyValue, request: SetBudget) -> BudgetWindow:
    """The window ``request`` names, or (left out) the owner's only budget's; ``day`` when
    it has none.

    Raises:
        InvalidInput: left out, and the owner has a daily and a monthly budget.
    """
    if not isinstance(request.window, UnsetType):
        return request.window
    stored: list[BudgetWindow] = []
    for window in _WINDOWS:
        if (await _read(kv, f"{request.scope}.{request.name}.{window}"))[2]:
            stored.append(window)
    if len(stored) > 1:
        owner = f"{request.scope}:{request.name}"
        raise InvalidInput(
            f"{request.scope} {request.name} has a daily and a monthly budget: say which to "
            f"change (`signalbox budgets set {owner} ... --window day|month`)",
            details={"scope": request.scope, "name": request.name, "path": "$.window"},
        )
    return stored[0] if stored else "day"


async def write_budget(kv: KeyValue, request: SetBudget, *, set_by: str) -> BudgetWrite:
    """Merge ``request`` into the stored budget and write it, unless someone wrote it in
    between (then read and merge again).

    Raises:
        InvalidInput: a new budget without a limit, or a left-out window that is ambiguous.
        Conflict: the budget kept changing under every attempt.
    """
    window = await _window_of(kv, request)
    key = f"{request.scope}.{request.name}.{window}"
    for attempt in range(_ATTEMPTS):
        if attempt:
            await asyncio.sleep(random.uniform(0, _BACKOFF * attempt))
        previous, revision, _ = await _read(kv, key)
        budget = merged_budget(request, window, previous, set_by=set_by, now=time.time())
        try:
            if revision == 0:
                await kv.create(key, encode(budget))
            else:
                await kv.update(key, encode(budget), last=revision)
        except KeyWrongLastSequenceError:
            continue  # someone wrote it since we read it: merge into theirs
        return BudgetWrite(budget, previous, _given(request))
    raise Conflict(
        f"budget {key} kept changing under {_ATTEMPTS} attempts to set it; retry",
        details={"key": key},
    )
