"""Guard rails: the nats-py internals broker/connection.py relies on still have the shape
it relies on.

``SessionClient`` overrides private methods of ``nats.aio.client.Client`` and reads
private attributes (see its docstring for why). nats-py may change any of them in
any release; pyproject.toml pins ``nats-py>=2.16,<2.17`` for that reason. When
raising the pin, run this module first: each failure names the internal that
moved and what in broker/connection.py to revisit, instead of a connection that
silently stops dropping bad messages, reconnecting, or parsing headers.
"""

from __future__ import annotations

import importlib.metadata
import inspect
from collections.abc import AsyncIterator, Callable
from typing import Any, NoReturn

import nats
import nats.errors
import pytest
from nats.aio.client import Client
from nats.aio.subscription import Subscription
from nats.protocol.parser import Parser

from broker.connection import SessionClient, connect, sync_connection

#: Where to look when a check fails.
FIX = (
    "broker/connection.py relies on it (SessionClient); adapt SessionClient to the new "
    "nats-py, or keep the nats-py pin in pyproject.toml below this version"
)


def _version() -> str:
    return importlib.metadata.version("nats-py")


def _fail(internal: str, problem: str) -> NoReturn:
    pytest.fail(f"nats-py {_version()}: {internal} {problem}. {FIX}", pytrace=False)


def _params(fn: Callable[..., Any]) -> list[str]:
    return list(inspect.signature(fn).parameters)


# -- methods SessionClient overrides: they must exist, be coroutines, take what it takes ------

OVERRIDDEN_COROUTINES = {
    # name: the parameters SessionClient's override takes (and passes on to super())
    "_process_msg": ["self", "sid", "subject", "reply", "data", "headers"],
    "_read_loop": ["self"],
    "_process_err": ["self", "err_msg"],
}


@pytest.mark.parametrize("name", sorted(OVERRIDDEN_COROUTINES))
def test_overridden_client_coroutines_keep_their_shape(name: str) -> None:
    internal = f"Client.{name}"
    method = getattr(Client, name, None)
    if method is None:
        _fail(internal, "no longer exists: SessionClient's override is never called")
    if not inspect.iscoroutinefunction(method):
        _fail(internal, "is no longer a coroutine function (SessionClient awaits super())")
    if _params(method) != OVERRIDDEN_COROUTINES[name]:
        _fail(
            internal,
            f"now takes {_params(method)}, SessionClient's override takes "
            f"{OVERRIDDEN_COROUTINES[name]}",
        )


def test_the_header_parser_is_still_a_static_method_of_one_block() -> None:
    internal = "Client._parse_header_lines"
    raw = inspect.getattr_static(Client, "_parse_header_lines", None)
    if not isinstance(raw, staticmethod):
        _fail(internal, "is no longer a static method (SessionClient replaces it with one)")
    if _params(Client._parse_header_lines) != ["raw"]:
        _fail(internal, f"now takes {_params(Client._parse_header_lines)}, not (raw)")
    if Client._parse_header_lines(b"A: 1\r\nB:2\r\n") != {"A": "1", "B": "2"}:
        _fail(internal, "no longer returns a dict of the header block's lines")


def test_process_op_err_which_session_client_calls_to_reconnect_still_exists() -> None:
    internal = "Client._process_op_err"
    method = getattr(Client, "_process_op_err", None)
    if method is None or not inspect.iscoroutinefunction(method):
        _fail(internal, "is gone or no longer a coroutine (SessionClient awaits it to reconnect)")
    if _params(method) != ["self", "e"]:
        _fail(internal, f"now takes {_params(method)}, not (self, e)")


# -- the call sites that make the overrides take effect ------------------------------------


@pytest.mark.parametrize(
    ("owner", "call", "why"),
    [
        (Parser, "self.nc._process_msg(", "MSG/HMSG must reach SessionClient._process_msg"),
        (Parser, "self.nc._process_err(", "-ERR must reach SessionClient._process_err"),
        (Client, "self._read_loop()", "the read loop task must run SessionClient._read_loop"),
        (Client, "self._parse_header_lines(", "headers must be parsed by SessionClient's parser"),
    ],
    ids=["msg", "err", "read-loop", "headers"],
)
def test_nats_py_still_dispatches_through_the_overridden_methods(
    owner: type, call: str, why: str
) -> None:
    if call not in inspect.getsource(owner):
        _fail(f"{owner.__module__}.{owner.__name__}", f"no longer calls {call}...): {why}")


def test_connect_still_takes_the_options_connect_passes() -> None:
    taken = set(_params(Client.connect))
    wanted = {
        "servers", "name", "connect_timeout", "allow_reconnect", "max_reconnect_attempts",
        "error_cb", "disconnected_cb", "reconnected_cb", "reconnect_to_server_handler",
        "inbox_prefix",
    }  # fmt: skip
    if wanted - taken:
        _fail("Client.connect", f"no longer takes {sorted(wanted - taken)}")


def test_the_errors_session_client_raises_still_exist() -> None:
    for name in ("ProtocolError", "Error", "AuthorizationError", "NoServersError"):
        found = getattr(nats.errors, name, None)
        if not (isinstance(found, type) and issubclass(found, Exception)):
            _fail(f"nats.errors.{name}", "is gone")


# -- attributes SessionClient reads, on a live connection ------------------------------------


@pytest.fixture
async def live(nats_url: str) -> AsyncIterator[SessionClient]:
    nc = await connect(nats_url, name="test-nats-internals")
    assert isinstance(nc, SessionClient)
    yield nc
    await nc.close()


@pytest.mark.nats
async def test_a_live_client_has_the_attributes_session_client_reads(
    live: SessionClient,
) -> None:
    sub = await live.subscribe("test.internals")
    sid = getattr(sub, "_id", None)
    if not isinstance(sid, int):
        _fail("Subscription._id", "is no longer the subscription's int id (the sid)")
    subs = getattr(live, "_subs", None)
    if not isinstance(subs, dict) or subs.get(sid) is not sub:
        _fail("Client._subs", "is no longer a dict of subscriptions by sid")
    stats = getattr(live, "stats", None)
    if not isinstance(stats, dict) or not {"in_msgs", "in_bytes"} <= set(stats):
        _fail("Client.stats", "no longer counts in_msgs and in_bytes in a dict")
    options = getattr(live, "options", None)
    if not isinstance(options, dict) or options.get("allow_reconnect") is not True:
        _fail("Client.options", "no longer holds the connect options (allow_reconnect)")
    if not isinstance(type(live).is_connected, property) or not live.is_connected:
        _fail("Client.is_connected", "is no longer a property true while connected")
    assert isinstance(sub, Subscription)
    await sub.unsubscribe()
    if sid in live._subs:
        _fail("Client._subs", "keeps a subscription after unsubscribe")


@pytest.mark.nats
async def test_messages_reach_the_overridden_process_msg(live: SessionClient) -> None:
    """End to end: a raw subscription (served from SessionClient._process_msg only) gets a
    published message with its header block."""
    got: list[tuple[bytes, bytes, bytes]] = []
    sub = await live.subscribe_raw("test.internals.raw", lambda *m: got.append(m))
    try:
        await live.publish("test.internals.raw", b"payload", headers={"X-Test": "1"})
        await sync_connection(live)  # the echo comes back after the message
        if not got:
            _fail("the parser's MSG dispatch", "did not reach SessionClient._process_msg")
        [(reply, data, headers)] = got
        assert (reply, data) == (b"", b"payload") and b"X-Test: 1" in headers
    finally:
        await sub.unsubscribe()
