"""Floods of similar events, per key: windowed summaries and back-off.

Two small building blocks with an injected clock, no tasks and no sleeps
(their owner drives them, so they are cheap on a hot path and testable with
a fake clock):

* :class:`Summarizer` turns a flood of events per key into at most two
  records per key and window: the first event of a window at once, and,
  when the window closes, one summary of it (how many events, how many per
  label, the first event's payload). A window opens at a key's first event
  and lasts ``window`` seconds; the next event after it opens a new one.
  The owner calls :meth:`Summarizer.flush_due` now and then (and
  :meth:`Summarizer.flush_all` when it stops, so no count is lost) and
  records what they return.
* :class:`Backoff` counts failures per key: ``burst`` failures within
  ``window`` seconds block the key for ``window`` seconds, doubling each
  time the key is blocked again before it has been forgiven, up to
  ``max_block``. While a key is blocked its attempts can be refused
  without doing the work they ask for.

Both keep at most ``max_keys`` keys. Beyond that, a :class:`Summarizer`
aggregates new keys into the single key :data:`OTHER_SOURCES` (its records
say ``overflow``); a :class:`Backoff` does not track them (they are counted
in :attr:`Backoff.untracked`: failing open keeps legitimate newcomers in
when a very wide flood fills the table).

Example (the registry's auth callout; a service summarizing rejections)::

    summaries: Summarizer[dict[str, str]] = Summarizer(60.0)
    for emit in summaries.note(source, {"credential": cred_id}, label="wrong_secret"):
        await audit(emit)            # the first at once; nothing while flooded
    ...
    for emit in summaries.flush_due():   # periodically: windows that closed
        await audit(emit)            # emit.count, emit.counts, emit.payload
"""

from __future__ import annotations

import collections
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Generic, Literal, TypeVar

__all__ = ["OTHER_SOURCES", "Backoff", "Emit", "Summarizer"]

#: The key under which a :class:`Summarizer` aggregates keys beyond its cap.
OTHER_SOURCES = "(other sources)"

P = TypeVar("P")

Clock = Callable[[], float]


@dataclass(frozen=True, slots=True)
class Emit(Generic[P]):
    """Something to record: the first event of a key's window, or the window's summary.

    Attributes:
        kind: ``first`` (the window's first event, returned by
            :meth:`Summarizer.note`) or ``summary`` (a closed window that
            had more events than its first).
        key: The key (:data:`OTHER_SOURCES` when ``overflow``).
        payload: The window's first event's payload (in a summary too).
        label: The first event's label.
        count: Events in the window so far (1 for ``first``).
        counts: Events by label.
        started: Clock time of the window's first event.
        ends: Clock time the window closes.
        overflow: The events are of keys beyond the cap, aggregated.
    """

    kind: Literal["first", "summary"]
    key: str
    payload: P
    label: str
    count: int
    counts: Mapping[str, int]
    started: float
    ends: float
    overflow: bool = False

    @property
    def suppressed(self) -> int:
        """Events of the window not recorded on their own (all but the first)."""
        return self.count - 1


@dataclass(slots=True)
class _Window(Generic[P]):
    key: str
    payload: P
    label: str
    started: float
    ends: float
    overflow: bool
    count: int = 1
    counts: collections.Counter[str] = field(default_factory=collections.Counter)

    def emit(self, kind: Literal["first", "summary"]) -> Emit[P]:
        return Emit(
            kind=kind,
            key=self.key,
            payload=self.payload,
            label=self.label,
            count=self.count,
            counts=dict(self.counts),
            started=self.started,
            ends=self.ends,
            overflow=self.overflow,
        )


class Summarizer(Generic[P]):
    """Per key: the first event of each window at once, the rest as one summary.

    Memory is bounded by ``max_keys`` windows (plus one for
    :data:`OTHER_SOURCES`); a window is kept until it closes and is flushed
    (or, when its key has a new event, replaced).

    Args:
        window: Seconds a window lasts, from its first event.
        max_keys: Most keys with an open window; events of further keys are
            aggregated under :data:`OTHER_SOURCES` (``overflow``).
        clock: Monotonic seconds (``time.monotonic``; a fake one in tests).

    Raises:
        ValueError: ``window`` is not positive or ``max_keys`` is below 1.
    """

    def __init__(
        self, window: float, *, max_keys: int = 10_000, clock: Clock = time.monotonic
    ) -> None:
        if not window > 0 or not math.isfinite(window):
            raise ValueError(f"window must be a positive number of seconds, not {window!r}")
        if max_keys < 1:
            raise ValueError(f"max_keys must be at least 1, not {max_keys!r}")
        self.window = window
        self.max_keys = max_keys
        self._clock = clock
        # Insertion order is opening order, so (equal lengths, a monotonic
        # clock) the windows that close first are at the front.
        self._open: collections.OrderedDict[str, _Window[P]] = collections.OrderedDict()
        self._other: _Window[P] | None = None

    def __len__(self) -> int:
        """Keys with an open window (:data:`OTHER_SOURCES` included)."""
        return len(self._open) + (self._other is not None)

    def note(self, key: str, payload: P, label: str = "") -> list[Emit[P]]:
        """Count one event of ``key``; returns what to record now.

        That is the event itself (kind ``first``) if it opens a window of its
        key, preceded by the summary of the key's previous window if that one
        closed with more than one event and was not flushed yet; nothing if
        the event falls in an open window (it is counted in its summary).
        ``payload`` is kept only for a window's first event.
        """
        now = self._clock()
        out: list[Emit[P]] = []
        current = self._open.get(key)
        if current is not None:
            if now < current.ends:
                current.count += 1
                current.counts[label] += 1
                return out
            del self._open[key]
            if current.count > 1:
                out.append(current.emit("summary"))
        elif len(self._open) >= self.max_keys:
            out += self._close_due(now)
        if len(self._open) < self.max_keys:
            opened = self._new(key, payload, label, now, overflow=False)
            self._open[key] = opened
            out.append(opened.emit("first"))
            return out
        other = self._other
        if other is not None and now < other.ends:
            other.count += 1
            other.counts[label] += 1
            return out
        if other is not None and other.count > 1:
            out.append(other.emit("summary"))
        self._other = self._new(OTHER_SOURCES, payload, label, now, overflow=True)
        out.append(self._other.emit("first"))
        return out

    def flush_due(self) -> list[Emit[P]]:
        """Summaries of the windows closed by now (those with more than one event).

        Closed windows are forgotten. Call it periodically (a fraction of
        ``window``): a summary is due once its window has closed.
        """
        return self._close_due(self._clock())

    def flush_all(self) -> list[Emit[P]]:
        """Summaries of every window, closed or not, with more than one event; forgets all.

        For shutdown: the counts of the last windows are not lost.
        """
        windows = list(self._open.values())
        if self._other is not None:
            windows.append(self._other)
        self._open.clear()
        self._other = None
        return [w.emit("summary") for w in windows if w.count > 1]

    def next_due(self) -> float | None:
        """Clock time the earliest open window closes (None: no open window)."""
        ends = [w.ends for w in (next(iter(self._open.values()), None), self._other) if w]
        return min(ends) if ends else None

    def _new(self, key: str, payload: P, label: str, now: float, *, overflow: bool) -> _Window[P]:
        window = _Window(key, payload, label, now, now + self.window, overflow)
        window.counts[label] = 1
        return window

    def _close_due(self, now: float) -> list[Emit[P]]:
        out: list[Emit[P]] = []
        while self._open:
            first = next(iter(self._open.values()))
            if now < first.ends:
                break
            del self._open[first.key]
            if first.count > 1:
                out.append(first.emit("summary"))
        if self._other is not None and now >= self._other.ends:
            if self._other.count > 1:
                out.append(self._other.emit("summary"))
            self._other = None
        return out


@dataclass(slots=True)
class _Failures:
    window_start: float
    failures: int = 0
    level: int = 0
    blocked_until: float = -math.inf
    last_block: float = 0.0
    last_failure: float = -math.inf


class Backoff:
    """Per-key failure counts that block a key after ``burst`` failures in a window.

    * A key's failures are counted in windows of ``window`` seconds (from
      its first failure); the ``burst``-th failure of a window blocks the
      key for ``window`` seconds, the next block twice as long, and so on
      up to ``max_block``. Counting starts again when a block ends.
    * A key is forgiven (its doubling starts over) once it has been
      unblocked, and without failure, for as long as its last block (at
      least one window).
    * :meth:`succeeded` forgets a key's failures unless it is blocked. Key
      your failures so that a success may clear only what it proves (the
      auth callout clears a credential's own key, never the address's).

    Args:
        burst: Failures within a window that block the key.
        window: Seconds of the counting window, and of the first block.
        max_block: Longest block in seconds (default: 16 windows).
        max_keys: Most keys tracked; failures of further keys are not
            counted (:attr:`untracked`) until forgiven keys are pruned.
        clock: Monotonic seconds.

    Raises:
        ValueError: a non-positive ``burst``, ``window``, ``max_block`` or
            ``max_keys``.
    """

    def __init__(
        self,
        burst: int,
        window: float,
        *,
        max_block: float | None = None,
        max_keys: int = 10_000,
        clock: Clock = time.monotonic,
    ) -> None:
        if burst < 1:
            raise ValueError(f"burst must be at least 1, not {burst!r}")
        if not window > 0 or not math.isfinite(window):
            raise ValueError(f"window must be a positive number of seconds, not {window!r}")
        max_block = 16 * window if max_block is None else max_block
        if not max_block > 0:
            raise ValueError(f"max_block must be positive, not {max_block!r}")
        if max_keys < 1:
            raise ValueError(f"max_keys must be at least 1, not {max_keys!r}")
        self.burst = burst
        self.window = window
        self.max_block = max_block
        self.max_keys = max_keys
        self._clock = clock
        self._keys: dict[str, _Failures] = {}
        #: Failures not counted because the table was full.
        self.untracked = 0

    def __len__(self) -> int:
        """Keys tracked."""
        return len(self._keys)

    def blocked(self, key: str) -> float:
        """Seconds until ``key`` may be tried again (0.0: it is not blocked)."""
        entry = self._keys.get(key)
        if entry is None:
            return 0.0
        return max(0.0, entry.blocked_until - self._clock())

    def failed(self, key: str) -> float:
        """Count a failure of ``key``; returns the block it starts now, in seconds (or 0.0).

        A failure while the key is blocked is not counted (it returns 0.0).
        """
        now = self._clock()
        entry = self._keys.get(key)
        if entry is not None and self._forgiven(entry, now):
            entry = None
        if entry is None:
            if len(self._keys) >= self.max_keys and key not in self._keys:
                self.prune()
                if len(self._keys) >= self.max_keys:
                    self.untracked += 1
                    return 0.0
            entry = self._keys[key] = _Failures(window_start=now)
        if now < entry.blocked_until:
            return 0.0
        if now - entry.window_start >= self.window:
            entry.window_start, entry.failures = now, 0
        entry.failures += 1
        entry.last_failure = now
        if entry.failures < self.burst:
            return 0.0
        block = min(self.window * 2.0 ** min(entry.level, 62), self.max_block)
        entry.level += 1
        entry.failures = 0
        entry.blocked_until = entry.window_start = now + block
        entry.last_block = block
        return block

    def succeeded(self, key: str) -> None:
        """Forget ``key``'s failures and back-off level, unless it is blocked now."""
        entry = self._keys.get(key)
        if entry is not None and self._clock() >= entry.blocked_until:
            del self._keys[key]

    def prune(self) -> int:
        """Forget forgiven keys (call now and then to bound memory); returns how many."""
        now = self._clock()
        gone = [k for k, e in self._keys.items() if self._forgiven(e, now)]
        for key in gone:
            del self._keys[key]
        return len(gone)

    def _forgiven(self, entry: _Failures, now: float) -> bool:
        if now < entry.blocked_until:
            return False
        quiet = max(self.window, entry.last_block)
        return now - max(entry.last_failure, entry.blocked_until) >= quiet
