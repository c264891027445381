"""Idempotent serving: a call retried with the same idempotency key runs at most once.

A caller that got :class:`~broker.errors.OutcomeUnknown` cannot know whether
its call ran. Retrying blindly may run it twice; retrying with the same
``idempotency_key`` (``Agent.call(..., idempotency_key=...)``, sent as
``Sb-Idempotency-Key``) is safe: the target's SDK keeps, per caller and key,
the first run's answer for ``window`` seconds and returns it to every retry;
a retry that arrives while the first run is still going waits for it (until
its own deadline, then answers :class:`~broker.errors.CallInProgress`).

The caller is the one the policy service names (``Sb-Caller``, which only it
can send): an agent cannot read or poison another caller's answers by
guessing its keys. Bounded: at most ``max_entries`` answers and ``max_bytes``
of them are kept, oldest dropped first (a retry after that runs again), and
the cache is per agent instance: a retry taken by another instance of the
same agent runs there (docs/decisions.md).
"""

from __future__ import annotations

import asyncio
import collections
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

from broker.errors import CallInProgress, InvalidInput
from broker.replies import H_CALLER, H_IDEMPOTENCY_KEY, error_reply

__all__ = ["DedupStats", "Deduplicator", "validate_idempotency_key"]

Answer = tuple[bytes, dict[str, str] | None]

_KEY = re.compile(r"[A-Za-z0-9._:\-]{1,128}")

#: Seconds before a waiting retry's deadline at which it answers ``call_in_progress``
#: (so the answer reaches the caller before the policy service gives up on it).
_MARGIN = 0.05


def validate_idempotency_key(key: str) -> str:
    """``key`` if it is a valid idempotency key (1-128 of ``A-Z a-z 0-9 . _ : -``).

    Raises:
        InvalidInput: anything else.
    """
    if not _KEY.fullmatch(key):
        raise InvalidInput(
            "an idempotency key is 1 to 128 characters of A-Z a-z 0-9 . _ : - "
            "(a UUID or a hash of what makes the request unique)",
            details={"field": "idempotency_key", "length": len(key)},
        )
    return key


@dataclass
class DedupStats:
    """Counters of one :class:`Deduplicator`."""

    runs: int = 0
    replayed: int = 0
    waited: int = 0
    in_progress: int = 0
    evicted: int = 0


@dataclass(slots=True)
class _Entry:
    answer: asyncio.Future[Answer]
    expires: float = float("inf")
    size: int = 0


class Deduplicator:
    """The answers of keyed calls, per caller and key, for ``window`` seconds.

    Args:
        window: Seconds an answer is kept after the run that made it.
        max_entries: Answers kept at most (oldest dropped first).
        max_bytes: Bytes of answers kept at most (oldest dropped first).
    """

    def __init__(
        self, window: float = 600.0, max_entries: int = 10_000, max_bytes: int = 64 << 20
    ) -> None:
        self.window = window
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.stats = DedupStats()
        self._entries: collections.OrderedDict[tuple[str, str], _Entry] = collections.OrderedDict()
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    @staticmethod
    def key_of(headers: Mapping[str, str]) -> tuple[str, str] | None:
        """``(caller, key)`` of a forwarded call, or None (no key, or not a valid one)."""
        key = headers.get(H_IDEMPOTENCY_KEY, "")
        caller = headers.get(H_CALLER, "")
        if not key or not caller or not _KEY.fullmatch(key):
            return None
        return caller, key

    async def run(
        self, key: tuple[str, str], deadline: float, work: Callable[[], Awaitable[Answer]]
    ) -> Answer:
        """The answer of ``work`` for ``key``: run now if it is new, else the first run's.

        Args:
            key: ``(caller, idempotency key)``.
            deadline: Unix time the caller stops waiting (0: none), for a retry
                that has to wait for a first run still going.
            work: Runs the call; returns its answer (body, headers).
        """
        self._expire(time.time())
        entry = self._entries.get(key)
        if entry is not None:
            return await self._replay(key, entry, deadline)
        entry = _Entry(asyncio.get_running_loop().create_future())
        self._entries[key] = entry
        self.stats.runs += 1
        try:
            answer = await work()
        except BaseException:
            # Interrupted (the agent is stopping): forget it; waiting retries are told
            # it is still in progress, a later one runs it.
            if self._entries.get(key) is entry:
                del self._entries[key]
            entry.answer.cancel()
            raise
        entry.answer.set_result(answer)
        if self._entries.get(key) is entry:
            entry.expires = time.time() + self.window
            entry.size = len(answer[0]) + len(key[0]) + len(key[1])
            self._bytes += entry.size
            self._entries.move_to_end(key)
            self._shrink()
        return answer

    async def _replay(self, key: tuple[str, str], entry: _Entry, deadline: float) -> Answer:
        if entry.answer.done() and not entry.answer.cancelled():
            self.stats.replayed += 1
            return entry.answer.result()
        wait = max(deadline - time.time() - _MARGIN, 0.0) if deadline else None
        try:
            answer = await asyncio.wait_for(asyncio.shield(entry.answer), wait)
        except TimeoutError:
            return self._in_progress(key)
        except asyncio.CancelledError:
            if not entry.answer.cancelled():
                raise  # this retry itself is being cancelled
            return self._in_progress(key)  # the first run was interrupted
        self.stats.waited += 1
        return answer

    def _in_progress(self, key: tuple[str, str]) -> Answer:
        self.stats.in_progress += 1
        return error_reply(
            CallInProgress(
                f"a call with idempotency key {key[1]!r} is still running; not run again. "
                "Retry later with the same key for its result",
                details={"idempotency_key": key[1]},
            )
        )

    def _expire(self, now: float) -> None:
        while self._entries:
            key, entry = next(iter(self._entries.items()))
            if entry.expires > now:
                # Running entries (expires = inf) sit among finished ones: stop at the
                # first one not expired; the size bound keeps the rest in check.
                break
            self._drop(key, entry)

    def _shrink(self) -> None:
        while self._entries and (
            len(self._entries) > self.max_entries or self._bytes > self.max_bytes
        ):
            for key, entry in self._entries.items():
                if entry.answer.done():
                    self._drop(key, entry)
                    self.stats.evicted += 1
                    break
            else:
                return  # only running calls left

    def _drop(self, key: tuple[str, str], entry: _Entry) -> None:
        del self._entries[key]
        self._bytes -= entry.size
