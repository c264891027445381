"""Shutdown steps are bounded, and a stuck one says where it was stuck."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import pytest

from broker.diagnostics import await_chain, cancel_and_wait, finish_within


async def _deepest(gate: asyncio.Event) -> None:
    await gate.wait()


async def _middle(gate: asyncio.Event) -> None:
    await _deepest(gate)


async def test_await_chain_names_every_coroutine_down_to_the_future() -> None:
    gate = asyncio.Event()
    task = asyncio.create_task(_middle(gate))
    await asyncio.sleep(0)
    chain = await_chain(task)
    assert [line.rsplit(" in ", 1)[1] for line in chain[:3]] == ["_middle", "_deepest", "wait"]
    assert chain[-1].startswith("awaiting <Future pending")
    gate.set()
    await task


async def test_await_chain_follows_an_async_generator_driven_by_anext() -> None:
    gate = asyncio.Event()

    async def fixture_like() -> AsyncIterator[None]:
        yield None
        await _deepest(gate)

    agen = fixture_like()
    await agen.__anext__()
    task = asyncio.ensure_future(agen.__anext__())
    await asyncio.sleep(0)
    names = [line.rsplit(" in ", 1)[1] for line in await_chain(task) if " in " in line]
    assert names[:2] == ["fixture_like", "_deepest"]
    gate.set()
    with pytest.raises(StopAsyncIteration):
        await task


async def test_a_step_that_hangs_is_abandoned_and_logged_with_its_place(
    caplog: pytest.LogCaptureFixture,
) -> None:
    gate = asyncio.Event()
    with caplog.at_level(logging.ERROR, logger="broker.diagnostics"):
        assert await finish_within(_middle(gate), 0.05, "stopping stuck") is False
    (record,) = caplog.records
    assert "stopping stuck did not finish within 0.1 s" in record.getMessage()
    assert "in _deepest" in record.getMessage()


async def test_a_step_that_finishes_or_fails_does_not_hold_shutdown(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def ok() -> None:
        await asyncio.sleep(0)

    async def boom() -> None:
        raise RuntimeError("nope")

    assert await finish_within(ok(), 1.0, "ok") is True
    with caplog.at_level(logging.ERROR, logger="broker.diagnostics"):
        assert await finish_within(boom(), 1.0, "stopping boom") is False
    assert "stopping boom failed" in caplog.text and "nope" in caplog.text


async def test_a_task_that_loses_its_cancel_is_cancelled_again_until_it_ends() -> None:
    """The Python 3.11 ``wait_for`` race, made deterministic: the loop swallows
    the first cancel (as ``wait_for`` does when its future completes at the same
    time) and goes back to sleep; a plain ``cancel(); await task`` hangs here."""
    swallowed = 0

    async def periodic() -> None:
        nonlocal swallowed
        while True:
            try:
                await asyncio.sleep(0.01)
            except asyncio.CancelledError:
                if swallowed:
                    raise
                swallowed += 1
                asyncio.current_task().uncancel()  # type: ignore[union-attr]

    task = asyncio.create_task(periodic())
    await asyncio.sleep(0.02)
    await cancel_and_wait(task, "periodic", timeout=5.0)
    assert task.cancelled() and swallowed == 1


async def test_a_task_that_never_ends_is_left_behind_and_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    release = asyncio.Event()

    async def stubborn() -> None:
        while not release.is_set():
            try:
                await release.wait()
            except asyncio.CancelledError:
                continue

    task = asyncio.create_task(stubborn())
    await asyncio.sleep(0)
    with caplog.at_level(logging.ERROR, logger="broker.diagnostics"):
        await cancel_and_wait(task, "stubborn loop", timeout=0.3)
    assert not task.done()
    assert "stubborn loop did not end within 0.3 s" in caplog.text and "in stubborn" in caplog.text
    release.set()  # a real one would be left running; this test cleans up after itself
    await task
