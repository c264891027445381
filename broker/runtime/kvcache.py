"""A local, always-current copy of a JetStream KV bucket.

Services read shared state (agents, later policies, breakers and routes)
from memory on every request; a KV watch keeps that memory current within
milliseconds of a change on any replica.

A value that does not decode is never silently skipped: the key leaves the
readable copy (a stale older value is not kept either), is listed in
:attr:`KVCache.unreadable` with the reason until a readable value or a
delete replaces it, is logged as an ERROR and reported to ``on_unreadable``.
Whoever reads the cache decides what an unreadable key means for them (a
budget: refuse the model calls it governs, see :mod:`broker.runtime.budgets`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from nats.js.kv import KV_DEL, KV_PURGE, KeyValue

from broker.codec import decode
from broker.diagnostics import cancel_and_wait
from broker.errors import SchemaError

__all__ = ["KVCache"]

log = logging.getLogger(__name__)

T = TypeVar("T")


class KVCache(Generic[T]):
    """Watches every key of ``kv``, decoding values as ``type_``.

    Args:
        kv: The bucket.
        type_: Wire type of the values.
        on_change: Called with ``(key, value or None)`` after each change.
        on_unreadable: Called with ``(key, reason)`` when a key's new value does
            not decode (once per stored revision).
    """

    def __init__(
        self,
        kv: KeyValue,
        type_: type[T],
        *,
        on_change: Callable[[str, T | None], None] | None = None,
        on_unreadable: Callable[[str, str], None] | None = None,
    ) -> None:
        self._kv = kv
        self._type = type_
        self._on_change = on_change
        self._on_unreadable = on_unreadable
        self._data: dict[str, T] = {}
        #: Keys whose current value does not decode, with the reason.
        self.unreadable: dict[str, str] = {}
        self._ready = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.revision = 0

    async def start(self, timeout: float = 10.0) -> None:
        """Start watching; returns once the current contents are loaded."""
        watcher = await self._kv.watchall()
        self._task = asyncio.ensure_future(self._run(watcher))
        await asyncio.wait_for(self._ready.wait(), timeout)

    async def _run(self, watcher: KeyValue.KeyWatcher) -> None:
        try:
            async for entry in watcher:
                if entry is None:  # end of the initial snapshot
                    self._ready.set()
                    continue
                self.revision = max(self.revision, entry.revision or 0)
                if entry.operation in (KV_DEL, KV_PURGE) or not entry.value:
                    self._data.pop(entry.key, None)
                    self.unreadable.pop(entry.key, None)
                    value: T | None = None
                else:
                    try:
                        value = decode(entry.value, self._type)
                    except SchemaError as err:
                        self._unreadable(entry.bucket, entry.key, err.message)
                        if entry.delta == 0:
                            self._ready.set()
                        continue
                    self._data[entry.key] = value
                    self.unreadable.pop(entry.key, None)
                if self._on_change is not None:
                    self._on_change(entry.key, value)
                if entry.delta == 0:
                    self._ready.set()
        finally:
            with contextlib.suppress(Exception):
                await watcher.stop()  # type: ignore[no-untyped-call]

    def _unreadable(self, bucket: str, key: str, reason: str) -> None:
        """``key``'s value in ``bucket`` does not decode: drop it, remember why, log and
        report it."""
        old = self._data.pop(key, None)
        self.unreadable[key] = reason
        log.error(
            "KV %s key %s: unreadable value (%s); its readers treat it as unreadable until "
            "it is rewritten",
            bucket,
            key,
            reason,
        )
        if old is not None and self._on_change is not None:
            self._on_change(key, None)
        if self._on_unreadable is not None:
            try:
                self._on_unreadable(key, reason)
            except Exception:  # a listener's bug must not stop the watch
                log.exception("KV %s: on_unreadable callback failed", bucket)

    async def stop(self) -> None:
        """Stop watching."""
        await cancel_and_wait(self._task, "a KV cache watch")
        self._task = None

    def get(self, key: str) -> T | None:
        """Current value of ``key`` (None if absent)."""
        return self._data.get(key)

    def __contains__(self, key: object) -> bool:
        return key in self._data

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._data))

    def __len__(self) -> int:
        return len(self._data)

    def values(self) -> list[T]:
        """Snapshot of all values."""
        return list(self._data.values())
