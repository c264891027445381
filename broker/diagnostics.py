"""Shutdown that cannot hang, and saying where it would have.

A service or agent that stops must stop: an orchestrator sends SIGTERM and
waits, and a test suite tears down hundreds of stacks. nats-py's ``close()``
flushes pending writes and then waits for the socket to close; FastStream's
``broker.stop()`` waits for its subscribers' tasks. Each of these can, rarely,
wait on a peer or a task that never answers. :func:`finish_within` bounds
such a step, and when it gives up it logs *where* the step was waiting (the
chain of coroutines it was suspended in), which ``asyncio``'s own task
repr does not show.
"""

from __future__ import annotations

import asyncio
import gc
import inspect
import logging
from collections.abc import Awaitable
from typing import Any

__all__ = ["await_chain", "cancel_and_wait", "finish_within"]

log = logging.getLogger(__name__)


def await_chain(awaitable: Any) -> list[str]:
    """Where ``awaitable`` (a task, coroutine or async generator) is suspended.

    One ``file:line in function`` entry per coroutine, outermost first, down to
    the future at the bottom of the chain.
    """
    lines: list[str] = []
    current: Any = awaitable.get_coro() if isinstance(awaitable, asyncio.Task) else awaitable
    while current is not None:
        frame = getattr(current, "cr_frame", None) or getattr(current, "ag_frame", None)
        if frame is not None:
            code = frame.f_code
            lines.append(f"{code.co_filename}:{frame.f_lineno} in {code.co_name}")
        nxt = getattr(current, "cr_await", None)
        if nxt is None:
            nxt = getattr(current, "ag_await", None)
        if nxt is None and type(current).__name__ in _HIDING:
            # ``await agen.__anext__()`` hides the generator it drives (an async
            # fixture's teardown, an ``async for``), and ``await future`` the
            # future behind its iterator; the garbage collector knows both.
            nxt = next((r for r in gc.get_referents(current) if _revealed(r)), None)
        if nxt is None and isinstance(current, asyncio.Future):
            lines.append(f"awaiting {current!r}"[:300])
        current = nxt
    return lines


async def cancel_and_wait(task: asyncio.Task[Any] | None, what: str, timeout: float = 5.0) -> None:
    """Cancel a background task and wait until it has ended, for at most ``timeout`` s.

    ``task.cancel(); await task`` can wait forever on Python 3.11: when the
    task is inside ``asyncio.wait_for`` (nats-py's ``request`` is) and the
    awaited future completes in the same loop iteration as the cancel,
    ``wait_for`` returns the result and the cancellation is lost (CPython
    gh-86296, fixed in 3.12), so a periodic loop goes back to sleep for good.
    Cancelling again until the task ends delivers the cancel to the next
    ``await``. Its result or exception (the ``CancelledError`` included) is
    consumed; a task still running after ``timeout`` is logged with where it
    was stuck and left behind.
    """
    if task is None or task.done():
        if task is not None and not task.cancelled():
            task.exception()  # retrieved, so asyncio does not log it at exit
        return
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not task.done() and loop.time() < deadline:
        task.cancel()
        await asyncio.wait({task}, timeout=min(_RECANCEL, max(0.0, deadline - loop.time())))
    if not task.done():
        where = "\n  ".join(await_chain(task)) or "(unknown)"
        log.error("%s did not end within %.1f s of being cancelled; left running in:\n  %s",
                  what, timeout, where)  # fmt: skip
    elif not task.cancelled() and (exc := task.exception()) is not None:
        log.error("%s failed", what, exc_info=exc)


#: How long a cancelled task gets before it is cancelled again.
_RECANCEL = 0.1

#: Awaitables that wrap, and hide, what they wait on.
_HIDING = frozenset({"async_generator_asend", "FutureIter"})


def _revealed(referent: Any) -> bool:
    return inspect.isasyncgen(referent) or isinstance(referent, asyncio.Future)


async def finish_within(step: Awaitable[Any], timeout: float, what: str) -> bool:
    """Await ``step`` for at most ``timeout`` seconds; True if it finished.

    On time-out the step is cancelled (not awaited further: a step that
    ignores cancellation cannot hold shutdown hostage), and an error naming
    ``what`` and the place it was stuck is logged. An exception the step
    raises is logged too, not raised: shutdown goes on with the next step.
    """
    task = asyncio.ensure_future(step)
    done, _ = await asyncio.wait({task}, timeout=timeout)
    if task in done:
        if task.cancelled():
            return False
        exc = task.exception()
        if exc is not None:
            log.error("%s failed", what, exc_info=exc)
            return False
        return True
    where = "\n  ".join(await_chain(task)) or "(unknown)"
    log.error("%s did not finish within %.1f s; abandoned while waiting in:\n  %s",
              what, timeout, where)  # fmt: skip
    task.cancel()
    return False
