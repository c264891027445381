"""Detectors that trip circuit breakers: call-rate anomalies, target error rates, call loops.

Pure logic (no I/O), fed by the policy service on every decision and call
outcome, with an injectable clock (monotonic seconds) so they are tested
without waiting. Each returns the figures that justify a trip, or None; the
service trips the breaker (:class:`broker.runtime.breakers.BreakerBoard`).

* :class:`RateAnomaly`: an agent's rate of calls and authorization requests
  over a short window (``SIGNALBOX_BREAKER_RATE_WINDOW``) is at least
  ``SIGNALBOX_BREAKER_RATE_FACTOR`` (10) times its trailing baseline over a
  long window (``SIGNALBOX_BREAKER_RATE_BASELINE``, excluding the short one).
  Guards against false trips: a minimum absolute rate
  (``SIGNALBOX_BREAKER_RATE_MIN``), a minimum history since this replica
  first saw the agent (``SIGNALBOX_BREAKER_RATE_MIN_HISTORY``: a cold start
  has no baseline), and a minimum number of calls in the baseline
  (``min_baseline_calls``: a quiet agent's first burst is not an anomaly of
  anything; its budget is what stops it).
* :class:`ErrorRate`: the share of a target's calls that failed *on the
  target's side* over ``SIGNALBOX_BREAKER_ERROR_WINDOW`` is above
  ``SIGNALBOX_BREAKER_ERROR_RATE`` with at least
  ``SIGNALBOX_BREAKER_ERROR_MIN_CALLS`` calls. Counted (:data:`TARGET_ERRORS`):
  ``remote_error`` (its handler raised), ``timeout`` (it did not answer in
  time; only for calls whose caller allowed at least
  ``SIGNALBOX_BREAKER_MIN_TIMEOUT`` seconds, or ``SIGNALBOX_CALL_TIMEOUT`` if
  that is lower: otherwise a caller could trip any slow target with its own
  short deadlines), ``target_unavailable`` (no instance serves it) and
  ``internal``. Not counted: the caller's faults (``bad_request``: the
  target could not decode the input; ``schema_error``, ``invalid_input``,
  ``payload_too_large`` and the rest of :class:`broker.errors.InvalidInput`'s
  codes; ``identity_mismatch``): counting them would let any caller trip any
  target by sending garbage; the target's own typed answers (``conflict``,
  ``not_found``, ``denied``...: business outcomes, not failures), and policy
  denials or breaker refusals (the target never saw those calls). A probe
  call that timed out under a short caller deadline tested nothing: its
  claim is released, the breaker neither closes nor re-opens.
* :func:`check_loop`: the chain of a call (the ``Sb-Chain`` header: the
  agents whose handlers led to this call, outermost first; see
  :mod:`broker.agent`) plus caller and target is deeper than
  ``SIGNALBOX_BREAKER_LOOP_MAX_DEPTH`` hops or names one agent more than
  ``SIGNALBOX_BREAKER_LOOP_MAX_VISITS`` times. The header is sent by the SDK,
  so a malicious agent could strip it; the rate detector still catches a
  runaway loop, and the budget breaker its spend.

Policy replicas form a queue group, so each sees a share of every agent's
traffic: rates and counts here are per replica. Ratios (rate over baseline,
errors over calls) stay meaningful because the share is steady; absolute
minimums (``RATE_MIN``, ``ERROR_MIN_CALLS``) apply per replica, i.e. roughly
times the number of replicas fleet-wide.
"""

from __future__ import annotations

import collections
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from broker.errors import ConfigError, InvalidInput
from broker.settings import Settings
from broker.subjects import is_valid_token

__all__ = [
    "MAX_CHAIN",
    "TARGET_ERRORS",
    "ErrorRate",
    "Guards",
    "Loop",
    "RateAnomaly",
    "check_loop",
    "format_chain",
    "parse_chain",
]

Clock = Callable[[], float]

#: Error codes of a relayed reply that count against the target (see the module docstring).
#: The code of a forwarded call its target did not answer in time (``OutcomeUnknown``).
TIMED_OUT: Final = "outcome_unknown"
TARGET_ERRORS: Final = frozenset({"remote_error", TIMED_OUT, "target_unavailable", "internal"})
#: Longest ``Sb-Chain`` accepted (agents); longer is a loop whatever the settings.
MAX_CHAIN: Final = 256
#: Slots per short window: rates are measured in steps of a tenth of it.
_SLOTS_PER_WINDOW: Final = 10


class _Window:
    """Counts per time slot over the newest ``n`` slots, with running totals over all
    of them and over the newest ``m`` (``m <= n``): O(1) per event."""

    __slots__ = ("first", "m", "n", "recent", "slot", "slots", "total", "width")

    def __init__(self, n: int, m: int, width: float, now: float) -> None:
        self.n, self.m, self.width = n, m, width
        self.slots = [0] * n
        self.slot = int(now // width)
        self.total = 0
        self.recent = 0
        self.first = now

    def advance(self, now: float) -> None:
        s = int(now // self.width)
        if s <= self.slot:
            return
        n, m, slots = self.n, self.m, self.slots
        if s - self.slot >= n:
            self.slots = [0] * n
            self.total = self.recent = 0
        else:
            for t in range(self.slot + 1, s + 1):
                # Slot t enters; t - m leaves the recent total, t - n (same index as t) all.
                self.recent -= slots[(t - m) % n]
                i = t % n
                self.total -= slots[i]
                slots[i] = 0
        self.slot = s

    def add(self, k: int = 1) -> None:
        self.slots[self.slot % self.n] += k
        self.total += k
        self.recent += k


class RateAnomaly:
    """Per-agent call rate against its own trailing baseline.

    Args:
        factor: Trip when the short-window rate is at least this many times the baseline.
        window: Short window, seconds.
        baseline: Long window, seconds (the baseline excludes the short window).
        min_rate: Calls per second below which nothing trips.
        min_history: Seconds an agent must have been observed before it can trip.
        min_baseline_calls: Calls the baseline must hold before it can trip.
        clock: Monotonic seconds.
    """

    def __init__(
        self,
        *,
        factor: float = 10.0,
        window: float = 10.0,
        baseline: float = 600.0,
        min_rate: float = 5.0,
        min_history: float = 120.0,
        min_baseline_calls: int = 10,
        clock: Clock = time.monotonic,
    ) -> None:
        if not (window > 0 and baseline > window and factor > 1):
            raise InvalidInput(
                "rate anomaly: need window > 0, baseline > window and factor > 1",
                details={"window": window, "baseline": baseline, "factor": factor},
            )
        self.factor = factor
        self.min_rate = min_rate
        self.min_baseline_calls = min_baseline_calls
        self.clock = clock
        self._width = window / _SLOTS_PER_WINDOW
        self._m = _SLOTS_PER_WINDOW
        self._n = max(self._m + 1, math.ceil(baseline / self._width))
        self.window = self._m * self._width
        self.baseline = self._n * self._width
        self.min_history = max(min_history, self.window + self._width)
        self._agents: dict[str, _Window] = {}

    def observe(self, agent: str, count: int = 1) -> dict[str, float] | None:
        """Record ``count`` calls of ``agent`` now; the figures of an anomaly, else None."""
        now = self.clock()
        w = self._agents.get(agent)
        if w is None:
            w = self._agents[agent] = _Window(self._n, self._m, self._width, now)
        else:
            w.advance(now)
        w.add(count)
        return self._judge(w, now)

    def anomalous(self, agent: str) -> dict[str, float] | None:
        """The figures if ``agent``'s rate is anomalous now (nothing recorded), else None."""
        w = self._agents.get(agent)
        if w is None:
            return None
        now = self.clock()
        w.advance(now)
        return self._judge(w, now)

    def _judge(self, w: _Window, now: float) -> dict[str, float] | None:
        seen = now - w.first
        if seen < self.min_history:
            return None
        rate = w.recent / self.window
        if rate < self.min_rate:
            return None
        span = min(self.baseline, seen) - self.window
        base_calls = w.total - w.recent
        if span <= 0 or base_calls < self.min_baseline_calls:
            return None
        baseline = base_calls / span
        if rate < self.factor * baseline:
            return None
        return {
            "rate": round(rate, 3),
            "baseline": round(baseline, 3),
            "ratio": round(rate / baseline, 2),
            "factor": self.factor,
            "window_s": self.window,
            "baseline_s": round(span, 3),
        }

    def forget(self, agent: str) -> None:
        """Drop ``agent``'s history."""
        self._agents.pop(agent, None)


class ErrorRate:
    """Per-target share of calls that failed on the target's side (:data:`TARGET_ERRORS`).

    Args:
        threshold: Trip when errors / calls is above this (0..1).
        window: Seconds of outcomes considered.
        min_calls: Calls in the window below which nothing trips.
        min_timeout: A timeout counts only if the call waited at least this long.
        clock: Monotonic seconds.
    """

    def __init__(
        self,
        *,
        threshold: float = 0.5,
        window: float = 60.0,
        min_calls: int = 20,
        min_timeout: float = 5.0,
        clock: Clock = time.monotonic,
    ) -> None:
        self.threshold = threshold
        self.min_calls = min_calls
        self.min_timeout = min_timeout
        self.clock = clock
        self.window = window
        self._width = window / _SLOTS_PER_WINDOW
        self._targets: dict[str, tuple[_Window, _Window]] = {}

    def counts(self, error_code: str, waited: float) -> bool:
        """Whether a reply with ``error_code`` ("" for success) counts against its target.

        Args:
            error_code: The reply's ``Sb-Error`` code.
            waited: Seconds the caller allowed the call (its timeout).
        """
        if error_code not in TARGET_ERRORS:
            return False
        return error_code != TIMED_OUT or waited >= self.min_timeout

    def verdict(self, error_code: str, waited: float) -> bool | None:
        """What a reply says about its target: True failed, False did not, None inconclusive.

        A time-out (``outcome_unknown``) under a deadline shorter than ``min_timeout`` is
        inconclusive: the caller gave up, the target may be merely slow (a
        breaker probe judged by it is released, neither closed nor re-opened).
        """
        if error_code == TIMED_OUT and waited < self.min_timeout:
            return None
        return self.counts(error_code, waited)

    def observe(
        self, target: str, error_code: str, waited: float = math.inf
    ) -> dict[str, float] | None:
        """Record one relayed outcome of ``target``; the figures if it should trip, else None.

        Args:
            target: The called agent.
            error_code: The reply's ``Sb-Error`` code ("" for success).
            waited: The call's timeout in seconds (for ``timeout`` outcomes).
        """
        now = self.clock()
        pair = self._targets.get(target)
        if pair is None:
            pair = self._targets[target] = (
                _Window(_SLOTS_PER_WINDOW, _SLOTS_PER_WINDOW, self._width, now),
                _Window(_SLOTS_PER_WINDOW, _SLOTS_PER_WINDOW, self._width, now),
            )
        calls, errors = pair
        calls.advance(now)
        calls.add()
        failed = self.counts(error_code, waited)
        if failed:
            errors.advance(now)
            errors.add()
        if not failed or calls.total < self.min_calls:
            return None
        errors.advance(now)
        share = errors.total / calls.total
        if share <= self.threshold:
            return None
        return {
            "error_rate": round(share, 4),
            "errors": float(errors.total),
            "calls": float(calls.total),
            "threshold": self.threshold,
            "window_s": self.window,
        }

    def forget(self, target: str) -> None:
        """Drop ``target``'s outcomes (after a trip: it starts afresh once closed)."""
        self._targets.pop(target, None)


@dataclass(frozen=True, slots=True)
class Loop:
    """A call chain over the limits.

    Attributes:
        agent: The agent named most often in the chain (the loop's owner).
        path: Chain, caller and target, outermost first.
        depth: Hops in ``path``.
        visits: How often ``agent`` appears in ``path``.
    """

    agent: str
    path: tuple[str, ...]
    depth: int
    visits: int

    def figures(self, max_depth: int, max_visits: int) -> dict[str, float]:
        """The figures of a ``call_loop`` trip."""
        return {
            "depth": float(self.depth),
            "max_depth": float(max_depth),
            "visits": float(self.visits),
            "max_visits": float(max_visits),
        }


def parse_chain(header: str | None) -> tuple[str, ...]:
    """The agents of an ``Sb-Chain`` header (``a,b,c``), outermost first.

    Raises:
        InvalidInput: a name is not a subject token (the header is refused).
    """
    if not header:
        return ()
    names = tuple(header.split(",", MAX_CHAIN))
    if len(names) > MAX_CHAIN:
        names = names[:MAX_CHAIN]
    for name in names:
        if not is_valid_token(name):
            raise InvalidInput(
                f"header Sb-Chain must be comma-separated agent names, got {name[:64]!r}",
                details={"header": "Sb-Chain"},
            )
    return names


def format_chain(chain: tuple[str, ...], caller: str) -> str:
    """The ``Sb-Chain`` the policy service forwards: the incoming chain plus the caller."""
    return ",".join((*chain[-(MAX_CHAIN - 1) :], caller)) if chain else caller


def check_loop(
    chain: tuple[str, ...], caller: str, target: str, *, max_depth: int, max_visits: int
) -> Loop | None:
    """The loop if ``chain`` + caller -> target is deeper than ``max_depth`` hops or names
    an agent more than ``max_visits`` times; else None."""
    path = (*chain, caller, target)
    depth = len(path) - 1
    if depth <= 1:
        return None
    counts = collections.Counter(path)
    agent, visits = counts.most_common(1)[0]
    if visits > 1 and counts[caller] == visits:
        agent = caller  # on ties, the agent making the call
    if depth > max_depth or len(chain) >= MAX_CHAIN or visits > max_visits:
        return Loop(agent=agent, path=path, depth=depth, visits=visits)
    return None


class Guards:
    """The three detectors, configured from settings (``SIGNALBOX_BREAKER_*``).

    Args:
        settings: Settings.
        clock: Monotonic seconds (tests inject their own; :meth:`use_clock`).

    Raises:
        ConfigError: the rate windows are inconsistent.
    """

    def __init__(self, settings: Settings, clock: Clock = time.monotonic) -> None:
        try:
            self.rate = RateAnomaly(
                factor=settings.breaker_rate_factor,
                window=settings.breaker_rate_window,
                baseline=settings.breaker_rate_baseline,
                min_rate=settings.breaker_rate_min,
                min_history=settings.breaker_rate_min_history,
                clock=clock,
            )
        except InvalidInput as err:
            raise ConfigError(
                "SIGNALBOX_BREAKER_RATE_BASELINE must be longer than SIGNALBOX_BREAKER_RATE_WINDOW",
                details=err.details,
            ) from err
        self.errors = ErrorRate(
            threshold=settings.breaker_error_rate,
            window=settings.breaker_error_window,
            min_calls=settings.breaker_error_min_calls,
            # A caller that allowed all the time a call may take (call_timeout) always
            # counts, or a lower call_timeout would stop timeouts from ever tripping.
            min_timeout=min(settings.breaker_min_timeout, settings.call_timeout),
            clock=clock,
        )
        self.max_depth = settings.breaker_loop_max_depth
        self.max_visits = settings.breaker_loop_max_visits
        #: Cool-down of an automatic trip (doubles after each failed probe).
        self.cooldown = settings.breaker_cooldown

    def use_clock(self, clock: Clock) -> None:
        """Make every detector read ``clock``."""
        self.rate.clock = clock
        self.errors.clock = clock

    def loop(self, chain: tuple[str, ...], caller: str, target: str) -> Loop | None:
        """:func:`check_loop` with the configured limits."""
        if not chain:
            return None
        return check_loop(
            chain, caller, target, max_depth=self.max_depth, max_visits=self.max_visits
        )
