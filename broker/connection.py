"""Connecting to NATS: one helper with sane defaults for services, agents and the CLI."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

import nats
from nats.aio.client import Client
from nats.aio.msg import Msg
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_delay, wait_exponential

from broker.errors import ConfigError

__all__ = ["Client", "connect", "sync_connection"]

log = logging.getLogger(__name__)


async def connect(
    url: str | None,
    *,
    name: str,
    connect_timeout: float = 10.0,
    inbox_prefix: str | None = None,
    **options: Any,
) -> Client:
    """Connect to NATS, retrying the first connection for up to ``connect_timeout`` seconds.

    After the first success nats-py reconnects by itself forever; errors are
    logged (not printed) so a service's output stays readable.

    Args:
        url: ``nats://host:port`` (comma-separate several for a cluster).
        name: Connection name shown in server monitoring (``signalbox-policy``...).
        connect_timeout: Total seconds to keep trying the first connection.
        inbox_prefix: Private reply-subject prefix (agents use ``_INBOX.<name>``).
        **options: Passed to :func:`nats.connect` (credentials, TLS...).

    Raises:
        ConfigError: ``url`` is empty.
        OSError: nothing answered within ``connect_timeout``.
    """
    if not url:
        raise ConfigError(
            "no NATS URL: set SIGNALBOX_NATS_URL or pass --nats-url (or run `signalbox up`)"
        )
    servers = [u.strip() for u in url.split(",") if u.strip()]

    async def _error_cb(exc: Exception) -> None:
        log.debug("nats connection %s: %r", name, exc)

    async def _disconnected_cb() -> None:
        log.info("nats connection %s: disconnected", name)

    async def _reconnected_cb() -> None:
        log.info("nats connection %s: reconnected", name)

    kwargs: dict[str, Any] = {
        "servers": servers,
        "name": name,
        "connect_timeout": 2,
        "allow_reconnect": True,
        "max_reconnect_attempts": -1,
        "reconnect_time_wait": 0.5,
        "error_cb": _error_cb,
        "disconnected_cb": _disconnected_cb,
        "reconnected_cb": _reconnected_cb,
        **options,
    }
    if inbox_prefix:
        kwargs["inbox_prefix"] = inbox_prefix
    deadline = time.monotonic() + connect_timeout
    async for attempt in AsyncRetrying(
        stop=stop_after_delay(connect_timeout),
        wait=wait_exponential(multiplier=0.1, max=1.0),
        retry=retry_if_exception_type((OSError, nats.errors.NoServersError, TimeoutError)),
        reraise=True,
    ):
        with attempt:
            nc = Client()
            try:
                # With max_reconnect_attempts=-1 nats-py retries the *first*
                # connection forever too: bound it, or a down server hangs us.
                remaining = max(deadline - time.monotonic(), 0.1)
                await asyncio.wait_for(nc.connect(**kwargs), timeout=remaining)
            except BaseException:
                with contextlib.suppress(Exception):
                    await nc.close()
                raise
            return nc
    raise AssertionError("unreachable")  # pragma: no cover


async def sync_connection(nc: Client, timeout: float = 5.0) -> None:
    """Return once the server has processed everything ``nc`` sent before the call.

    ``Client.flush()`` is not enough in nats-py 2.16: it writes its PING straight
    to the socket while earlier SUB/PUB commands may still wait in the client's
    pending buffer, so the PONG can come back before the server has seen them
    (a subscription made then "flushed" misses a message published right after,
    about once in a hundred tries here). A message to ourselves goes through
    the same buffer, after those commands; once it arrives, they have all been
    processed.

    Raises:
        TimeoutError: the echo did not come back within ``timeout`` seconds.
    """
    echoed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def on_echo(_msg: Msg) -> None:
        if not echoed.done():
            echoed.set_result(None)

    sub = await nc.subscribe(nc.new_inbox(), cb=on_echo)
    try:
        await nc.publish(sub.subject, b"")
        async with asyncio.timeout(timeout):
            await echoed
    finally:
        await sub.unsubscribe()
