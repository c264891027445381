"""Services connect with Signalbox's client class, like the SDK and the CLI."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from nats.aio.msg import Msg

from broker.connection import SessionClient
from broker.settings import Settings

if TYPE_CHECKING:
    from support import StackFactory


async def test_services_run_on_the_session_client_and_read_headers_with_it(
    make_stack: StackFactory, settings: Settings
) -> None:
    stack = await make_stack(services=["registry"])
    service = stack.services["registry"]
    assert isinstance(service.nc, SessionClient)
    # A message with headers, read by the service's connection: same dict as nats-py's.
    got: asyncio.Future[Msg] = asyncio.get_running_loop().create_future()

    async def seen(msg: Msg) -> None:
        if not got.done():
            got.set_result(msg)

    # (Under the services' inbox: the registry's user may use little else.)
    subject = service.nc.new_inbox()
    sub = await service.nc.subscribe(subject, cb=seen)
    await service.nc.publish(subject, b"x", headers={"Nats-Msg-Id": "a", "K": " v "})
    msg = await asyncio.wait_for(got, 5)
    await sub.unsubscribe()
    assert msg.headers == {"Nats-Msg-Id": "a", "K": "v"}
