"""An agent process's life: serve until told to stop, then stop without losing a call.

Kubernetes (and systemd, Docker, Nomad) stop a process with SIGTERM, then
SIGKILL after a grace period (30 s by default). :func:`serve` starts the
agents, waits for SIGTERM or SIGINT and then stops each one cleanly: no new
calls, leave the registry, finish the running calls (up to
``drain_timeout``), send their replies, disconnect. :func:`run` does the same
from synchronous code::

    import broker
    broker.run(agent)            # or: await agent.run_forever()
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Sequence
from typing import Protocol

__all__ = ["STOP_SIGNALS", "Servable", "run", "serve"]

#: What stops an agent process by default.
STOP_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGINT)


class Servable(Protocol):
    """What :func:`serve` runs (``broker.Agent`` is one)."""

    async def start(self) -> None:
        """Connect, register, serve."""
        ...

    async def stop(self, drain_timeout: float = 10.0, *, leave: bool = False) -> None:
        """Take no more calls, finish the running ones, disconnect."""
        ...


async def serve(
    *agents: Servable,
    drain_timeout: float = 25.0,
    signals: Sequence[signal.Signals] = STOP_SIGNALS,
) -> None:
    """Start ``agents``, serve until one of ``signals`` arrives, then stop them all cleanly.

    Args:
        agents: The agents of this process.
        drain_timeout: How long running calls may take to finish after the
            signal (calls still running then are cancelled).
        signals: What ends serving.
    """
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    installed: list[signal.Signals] = []
    try:
        for sig in signals:
            loop.add_signal_handler(sig, stopping.set)
            installed.append(sig)
        started: list[Servable] = []
        try:
            for agent in agents:
                await agent.start()
                started.append(agent)
            await stopping.wait()
        finally:
            # All at once: each drains its own calls within the same grace period.
            await asyncio.gather(
                *(a.stop(drain_timeout, leave=True) for a in reversed(started)),
                return_exceptions=True,
            )
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)


def run(
    *agents: Servable,
    drain_timeout: float = 25.0,
    signals: Sequence[signal.Signals] = STOP_SIGNALS,
) -> None:
    """:func:`serve` from synchronous code (a script's or a container's entry point)."""
    asyncio.run(serve(*agents, drain_timeout=drain_timeout, signals=signals))
