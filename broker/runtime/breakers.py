"""Fleet-wide circuit breakers over the JetStream KV bucket ``sb_breakers``.

A :class:`BreakerBoard` keeps every breaker in memory (loaded at start, kept
current by a KV watch, so a trip on any replica of any service reaches every
other within milliseconds) and makes every transition a compare-and-set on
the key's KV revision, so concurrent replicas never clobber each other::

             trip()                   cool-down over: claim()
    closed ----------> open ------------------------------> half_open
      ^                 ^  <-- settle(ok=False): cool-down x2 --  |
      |                 |  <-- settle(ok=None): probe released -- |
      +---- reset() ----+------------ settle(ok=True) ------------+

* :meth:`BreakerBoard.check` is the hot path (every decision of the policy
  service): a dict lookup, no I/O, ``()`` when nothing is open.
* :meth:`BreakerBoard.trip` opens a breaker (the policy service's detectors,
  the cost service on an exhausted budget, an operator): for ``cooldown``
  seconds, or until :meth:`BreakerBoard.reset` when ``cooldown`` is None.
* When the cool-down is over, exactly one call fleet-wide passes as the
  probe: the replica that sees it first :meth:`~BreakerBoard.claim` s it
  with a compare-and-set (the losers refuse their calls) and
  :meth:`~BreakerBoard.settle` s it with the probe's outcome. A claim whose
  replica died is taken over after ``probe_timeout``.

Every change is an audit event (kind ``breaker``) emitted by whoever made
it, with the record before and after.

A stored record that cannot be read (not JSON, invalid UTF-8, a wrong tag or
field, or the record of another key) fails closed: the board holds that
breaker ``open`` with reason ``unreadable`` and the decode error in its text
(so ``signalbox breakers list`` shows it and refused callers are told), logs
an ERROR and audits an ``alert`` (once per stored revision, by every board
that sees it). :meth:`BreakerBoard.reset` then writes a clean, closed record
(audited as usual), and so does a :meth:`~BreakerBoard.trip`.

Example (the cost service on an exhausted budget)::

    board = BreakerBoard(await js.key_value(KV_BREAKERS), audit, "service:cost")
    await board.start()
    await board.trip(breaker_key("team", "risk"), "budget",
                     "daily budget team.risk.day exhausted (US$100.00 spent)",
                     figures={"limit_usd": 100.0, "spent_usd": 100.4},
                     cooldown=None, by="service:cost")
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import random
import time
from collections.abc import Callable
from typing import Any

import msgspec
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KV_DEL, KV_PURGE, KeyValue

from broker.codec import decode, encode
from broker.diagnostics import cancel_and_wait
from broker.errors import BreakerOpen, Conflict, InvalidInput, NotFound, SchemaError
from broker.runtime.audit import AuditEmitter
from broker.runtime.jetstream import KV_BREAKERS
from broker.subjects import validate_token
from schemas import Breaker, BreakerProbe, BreakerReason, BreakerScope

__all__ = ["BreakerBoard", "breaker_key", "breaker_open", "split_key"]

log = logging.getLogger(__name__)

_SCOPES: tuple[BreakerScope, ...] = ("agent", "team")
#: Compare-and-set attempts before a transition gives up (``conflict``); the
#: losers of a race back off a random few milliseconds, growing per attempt.
_ATTEMPTS = 64
_BACKOFF = 0.002
_NOTHING: tuple[Breaker, ...] = ()


def breaker_key(scope: BreakerScope, name: str) -> str:
    """The KV key of ``scope``'s breaker for ``name`` (``agent.fraud-detection``).

    Raises:
        InvalidInput: unknown scope.
        InvalidSubjectToken: ``name`` is not a valid subject token.
    """
    if scope not in _SCOPES:
        raise InvalidInput(
            f"breaker scope must be agent or team, not {scope!r}", details={"scope": scope}
        )
    return f"{scope}.{validate_token(name, what=f'{scope} name')}"


def split_key(key: str) -> tuple[BreakerScope, str]:
    """Scope and name of a breaker key.

    Raises:
        InvalidInput: not ``agent.<name>`` or ``team.<name>``.
    """
    scope, _, name = key.partition(".")
    if scope not in _SCOPES:
        raise InvalidInput(
            f"breaker key {key!r} must be agent.<name> or team.<name>", details={"key": key}
        )
    breaker_key(scope, name)
    return scope, name


def _iso(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.UTC).isoformat(timespec="seconds")


def breaker_open(breaker: Breaker) -> BreakerOpen:
    """The error a call refused by ``breaker`` gets: which, why, since, until, what to do."""
    target = f"{breaker.scope}:{breaker.name}"
    if breaker.until is None:
        until = "until an operator resets it"
    elif breaker.state == "half_open":
        until = "while one probe call tests whether the cause is gone"
    else:
        until = f"until {_iso(breaker.until)} (then one probe call may pass)"
    text = f": {breaker.text}" if breaker.text else ""
    return BreakerOpen(
        f"circuit breaker {breaker.key} is {breaker.state.replace('_', '-')} "
        f"({breaker.reason}{text}) since {_iso(breaker.since)}, {until}; "
        f"calls are refused at once. Fix the cause, then `signalbox breakers reset {target}`",
        details={
            "breaker": breaker.key,
            "scope": breaker.scope,
            "name": breaker.name,
            "state": breaker.state,
            "reason_code": "breaker_open",
            "reason": breaker.reason,
            "text": breaker.text,
            "figures": dict(breaker.figures),
            "since": breaker.since,
            "until": breaker.until,
            "trips": breaker.trips,
            "tripped_by": breaker.tripped_by,
            "reset": f"signalbox breakers reset {target}",
        },
    )


class BreakerBoard:
    """The breakers of the fleet, in memory, with compare-and-set transitions.

    Args:
        kv: The ``sb_breakers`` bucket.
        audit: Where transitions are audited (kind ``breaker``).
        actor: Default audit actor of this board's changes (``service:policy``).
        probe_timeout: Seconds after which a probe claim nobody settled
            (its replica died) may be claimed again.
        max_cooldown: Cap of the cool-down, which doubles after each failed probe.
        clock: Wall clock (Unix seconds); shared by every replica's records.
        on_change: Called with ``(before, after)`` for every change applied to
            memory (this board's writes and the watch's), e.g. to reset
            detectors when a breaker closes.
    """

    def __init__(
        self,
        kv: KeyValue,
        audit: AuditEmitter,
        actor: str,
        *,
        probe_timeout: float = 30.0,
        max_cooldown: float = 3600.0,
        clock: Callable[[], float] = time.time,
        on_change: Callable[[Breaker | None, Breaker | None], None] | None = None,
    ) -> None:
        self.kv = kv
        self.audit = audit
        self.actor = actor
        self.probe_timeout = probe_timeout
        self.max_cooldown = max_cooldown
        self.clock = clock
        self.on_change = on_change
        #: Transitions made by this board, by kind.
        self.stats: dict[str, int] = {
            "trips": 0, "resets": 0, "probes": 0, "closed": 0, "reopened": 0,
            "released": 0, "lost_races": 0,
        }  # fmt: skip
        self._records: dict[str, tuple[Breaker, int]] = {}
        # Only breakers that are not closed: what the hot path looks at.
        self._blocking: dict[str, Breaker] = {}
        self._ready = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    # -- watching --------------------------------------------------------------

    async def start(self, timeout: float = 10.0) -> None:
        """Load every breaker and keep watching; returns once the contents are loaded."""
        if self._task is not None:
            return
        watcher = await self.kv.watchall()
        self._task = asyncio.ensure_future(self._watch(watcher))
        await asyncio.wait_for(self._ready.wait(), timeout)

    async def stop(self) -> None:
        """Stop watching."""
        await cancel_and_wait(self._task, "the breaker watch")
        self._task = None

    async def _watch(self, watcher: KeyValue.KeyWatcher) -> None:
        try:
            async for entry in watcher:
                if entry is None:  # end of the initial snapshot
                    self._ready.set()
                    continue
                revision = entry.revision or 0
                if entry.operation in (KV_DEL, KV_PURGE) or not entry.value:
                    self._forget(entry.key, revision)
                else:
                    breaker, problem = self._parse(entry.key, entry.value)
                    if problem:
                        self._alarm(entry.key, problem, revision)
                    self._apply(entry.key, breaker, revision)
                if entry.delta == 0:
                    self._ready.set()
        finally:
            with contextlib.suppress(Exception):
                await watcher.stop()  # type: ignore[no-untyped-call]

    def _parse(self, key: str, value: bytes) -> tuple[Breaker | None, str]:
        """The breaker stored under ``key`` and ""; or, when the record cannot be read,
        the fail-closed stand-in (:meth:`_unreadable`) and why."""
        try:
            breaker = decode(value, Breaker)
        except SchemaError as err:
            problem = err.message
        else:
            if breaker.key == key:
                return breaker, ""
            problem = f"the record under {key} is the record of {breaker.key}"
        return self._unreadable(key, problem), problem

    def _unreadable(self, key: str, problem: str) -> Breaker | None:
        """Fail closed: the breaker ``key`` held open until reset (None: not a breaker key)."""
        try:
            scope, name = split_key(key)
        except InvalidInput:
            return None  # no agent or team is named by it: nothing to hold open
        return Breaker(
            key=key, scope=scope, name=name, state="open", reason="unreadable",
            text=f"its stored record in {KV_BREAKERS} cannot be read ({problem[:300]}); "
            "calls are refused until an operator resets it",
            since=self.clock(), tripped_by=f"$KV.{KV_BREAKERS}",
            changed_by=f"$KV.{KV_BREAKERS}", changed_at=self.clock(),
        )  # fmt: skip

    def _alarm(self, key: str, problem: str, revision: int) -> None:
        """Log and audit (kind ``alert``) an unreadable record, once per stored revision."""
        current = self._records.get(key)
        if current is not None and current[1] >= revision:
            return  # already seen
        log.error(
            "%s key %s: unreadable breaker record (%s); held open (fail closed) until "
            "`signalbox breakers reset` rewrites it",
            KV_BREAKERS,
            key,
            problem,
        )
        scope, _, name = key.partition(".")
        self.audit.alert_unreadable(
            KV_BREAKERS, key, problem,
            effect="breaker held open: calls of and to it are refused (fail closed)",
            fix=f"signalbox breakers reset {scope}:{name}",
        )  # fmt: skip

    def _apply(self, key: str, breaker: Breaker | None, revision: int) -> None:
        current = self._records.get(key)
        if current is not None and current[1] >= revision:
            return  # already applied (our own write, seen again through the watch)
        if breaker is None:
            return
        self._records[key] = (breaker, revision)
        if breaker.state == "closed":
            self._blocking.pop(key, None)
        else:
            self._blocking[key] = breaker
        self._changed(current[0] if current is not None else None, breaker)

    def _changed(self, old: Breaker | None, new: Breaker | None) -> None:
        if self.on_change is not None:
            try:
                self.on_change(old, new)
            except Exception:  # a listener's bug must not stop the watch
                log.exception("breaker on_change callback failed")

    def _forget(self, key: str, revision: int) -> None:
        current = self._records.get(key)
        if current is not None and current[1] >= revision:
            return
        self._records.pop(key, None)
        self._blocking.pop(key, None)
        if current is not None:
            self._changed(current[0], None)

    # -- reading (no I/O) ------------------------------------------------------

    def any_open(self) -> bool:
        """Whether any breaker is not closed (False: every call passes, nothing to look up)."""
        return bool(self._blocking)

    def check(self, *keys: str) -> tuple[Breaker, ...]:
        """The breakers among ``keys`` that are not closed (``()``: let the call pass).

        The hot path: dictionary lookups only. A returned ``open`` breaker
        whose cool-down is over (:meth:`probe_due`) may let this call pass as
        its probe: :meth:`claim` it.
        """
        blocking = self._blocking
        if not blocking:
            return _NOTHING
        return tuple(b for k in keys if (b := blocking.get(k)) is not None)

    def get(self, key: str) -> Breaker | None:
        """The breaker stored under ``key`` (closed ones included), or None."""
        found = self._records.get(key)
        return found[0] if found is not None else None

    def breakers(self, *, include_closed: bool = False) -> list[Breaker]:
        """Every breaker that is not closed (``include_closed``: every one), by key."""
        return [
            b
            for k, (b, _) in sorted(self._records.items())
            if include_closed or b.state != "closed"
        ]

    def probe_due(self, breaker: Breaker) -> bool:
        """Whether a call may now try to :meth:`claim` ``breaker``'s probe."""
        now = self.clock()
        if breaker.state == "open":
            return breaker.until is not None and now >= breaker.until
        if breaker.state == "half_open":
            probe = breaker.probe
            return probe is None or now - probe.claimed_at >= self.probe_timeout
        return False

    # -- transitions (compare-and-set on the KV revision) ----------------------

    async def trip(
        self,
        key: str,
        reason: BreakerReason,
        text: str,
        figures: dict[str, float] | None = None,
        cooldown: float | None = None,
        by: str = "",
    ) -> Breaker:
        """Open the breaker ``key`` (``agent.<name>`` or ``team.<name>``).

        Tripping an already open breaker updates its reason, text and
        figures but never shortens it: it stays open until the later of the
        two ends (None, until reset, wins).

        Args:
            key: :func:`breaker_key`.
            reason: ``budget``, ``rate_anomaly``, ``error_rate``, ``call_loop``
                or ``manual``.
            text: Why, for the refused callers and the operators.
            figures: The numbers that tripped it.
            cooldown: Seconds until one probe may pass; None: until :meth:`reset`.
            by: Audit actor (default: the board's).

        Returns:
            The breaker as stored.
        """
        scope, name = split_key(key)
        who = by or self.actor
        values = {k: float(v) for k, v in (figures or {}).items()}
        if cooldown is not None and cooldown <= 0:
            raise InvalidInput("cooldown must be positive (None: until reset)", details={})

        def change(old: Breaker | None, now: float) -> Breaker:
            until = None if cooldown is None else now + cooldown
            length = cooldown or 0.0
            if old is not None and old.state != "closed":
                if until is None or old.until is None:
                    until, length = None, 0.0
                else:
                    until, length = max(until, old.until), max(length, old.cooldown)
                return msgspec.structs.replace(
                    old, state="open", reason=reason, text=text, figures=values, until=until,
                    cooldown=length, tripped_by=who, trips=old.trips + 1, probe=None,
                    changed_by=who, changed_at=now,
                )  # fmt: skip
            return Breaker(
                key=key, scope=scope, name=name, state="open", reason=reason, text=text,
                figures=values, since=now, until=until, cooldown=length,
                tripped_by=who, trips=(old.trips if old else 0) + 1, changed_by=who,
                changed_at=now,
            )  # fmt: skip

        new = await self._transition(key, change, "trip", who)
        assert new is not None
        self.stats["trips"] += 1
        return new

    async def reset(self, key: str, by: str = "", text: str = "") -> Breaker:
        """Close the breaker ``key``, whatever tripped it (a closed one stays as it is).

        Raises:
            NotFound: there is no breaker ``key``.
        """
        split_key(key)
        who = by or self.actor

        def change(old: Breaker | None, now: float) -> Breaker | None:
            if old is None:
                raise NotFound(
                    f"there is no breaker {key}; `signalbox breakers list --all` shows them",
                    details={"key": key},
                )
            if old.state == "closed":
                return None
            return msgspec.structs.replace(
                old, state="closed", until=None, probe=None, changed_by=who, changed_at=now,
                text=old.text if not text else f"{old.text} (reset: {text})",
            )  # fmt: skip

        new = await self._transition(key, change, "reset", who)
        if new is not None:
            self.stats["resets"] += 1
            return new
        current = self.get(key)
        assert current is not None
        return current

    async def claim(self, key: str, call_id: str, by: str = "") -> Breaker | None:
        """Claim the one probe of ``key`` for ``call_id`` (compare-and-set).

        Returns:
            The ``half_open`` breaker when this call is the probe (let it
            pass, then :meth:`settle`); None when the probe is not due or
            another call (on any replica) claimed it first: refuse the call.
        """
        who = by or self.actor

        def change(old: Breaker | None, now: float) -> Breaker | None:
            if old is None or old.state == "closed" or not self.probe_due(old):
                return None
            probe = BreakerProbe(claimed_by=who, claimed_at=now, call_id=call_id)
            return msgspec.structs.replace(
                old, state="half_open", probe=probe, changed_by=who, changed_at=now
            )

        new = await self._transition(key, change, "probe", who, retry=False)
        if new is not None:
            self.stats["probes"] += 1
        return new

    async def settle(
        self,
        key: str,
        call_id: str,
        ok: bool | None,
        *,
        by: str = "",
        figures: dict[str, float] | None = None,
    ) -> Breaker | None:
        """Apply the outcome of the probe ``call_id`` claimed on ``key``.

        Args:
            ok: True closes the breaker; False re-opens it with the cool-down
                doubled (up to ``max_cooldown``); None releases the claim (the
                call never tested the cause, e.g. the policy denied it), so
                the next call may probe.
            figures: Replace the breaker's figures (e.g. the rate at the probe).

        Returns:
            The breaker as stored, or None when the probe is no longer ours
            (an operator reset it, or the claim timed out and was taken over).
        """
        who = by or self.actor

        def change(old: Breaker | None, now: float) -> Breaker | None:
            if (
                old is None
                or old.state != "half_open"
                or old.probe is None
                or old.probe.call_id != call_id
            ):
                return None
            if ok is None:
                return msgspec.structs.replace(old, state="open", probe=None,
                                               changed_by=who, changed_at=now)  # fmt: skip
            if ok:
                return msgspec.structs.replace(
                    old, state="closed", until=None, probe=None, changed_by=who, changed_at=now
                )
            cooldown = min(old.cooldown * 2 or 1.0, self.max_cooldown)
            return msgspec.structs.replace(
                old, state="open", until=now + cooldown, cooldown=cooldown, probe=None,
                trips=old.trips + 1, figures=dict(figures) if figures else old.figures,
                changed_by=who, changed_at=now,
            )  # fmt: skip

        op = "release" if ok is None else "close" if ok else "reopen"
        new = await self._transition(key, change, op, who)
        if new is not None:
            self.stats["released" if ok is None else "closed" if ok else "reopened"] += 1
        return new

    async def _transition(
        self,
        key: str,
        change: Callable[[Breaker | None, float], Breaker | None],
        op: str,
        who: str,
        *,
        retry: bool = True,
    ) -> Breaker | None:
        """Read ``key``, compute its next record, write it only if nobody wrote in between.

        ``change`` returns None for "no transition". A lost race re-reads and
        re-evaluates (``retry``) or returns None.
        """
        for attempt in range(_ATTEMPTS):
            if attempt:
                await asyncio.sleep(random.uniform(0, _BACKOFF * min(attempt, 10)))
            old, revision = await self._read(key)
            now = self.clock()
            new = change(old, now)
            if new is None:
                return None
            try:
                if revision == 0:
                    written = await self.kv.create(key, encode(new))
                else:
                    written = await self.kv.update(key, encode(new), last=revision)
            except KeyWrongLastSequenceError:
                self.stats["lost_races"] += 1
                if not retry:
                    return None
                continue
            self._apply(key, new, written)
            await self._audit(op, key, old, new, who)
            return new
        raise Conflict(
            f"breaker {key} kept changing under {_ATTEMPTS} attempts to {op} it; retry",
            details={"key": key, "op": op},
        )

    async def _read(self, key: str) -> tuple[Breaker | None, int]:
        try:
            entry = await self.kv.get(key)
        except KeyNotFoundError:  # KeyDeletedError included
            return None, 0
        if not entry.value:
            return None, entry.revision or 0
        return self._parse(key, entry.value)[0], entry.revision or 0

    async def _audit(self, op: str, key: str, old: Breaker | None, new: Breaker, who: str) -> None:
        data: dict[str, Any] = {
            "op": op,
            "key": key,
            "from": old.state if old is not None else "closed",
            "to": new.state,
            "breaker": msgspec.to_builtins(new),
        }
        await self.audit.emit("breaker", actor=who, subject=f"$KV.{KV_BREAKERS}.{key}",
                              data=data)  # fmt: skip
        log.info("breaker %s: %s -> %s (%s by %s)", key, data["from"], new.state, op, who)
