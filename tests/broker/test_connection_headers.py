"""broker.connection.SessionClient parses NATS header blocks exactly as nats-py does, faster."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from nats.aio.client import Client

from broker.connection import SessionClient, connect, parse_status, sync_connection

_NAME = st.text(
    st.characters(min_codepoint=0, max_codepoint=0x2FFF, exclude_characters="\r\n:"),
    max_size=12,
)
_VALUE = st.binary(max_size=40).map(lambda b: b.replace(b"\r\n", b" "))


@given(st.lists(st.tuples(_NAME, _VALUE, st.sampled_from([b": ", b":", b":\t", b""])),
                max_size=8))  # fmt: skip
def test_same_headers_as_nats_py(lines: list[tuple[str, bytes, bytes]]) -> None:
    raw = b"".join(n.encode("utf-8", "surrogatepass") + sep + v + b"\r\n" for n, v, sep in lines)
    assert SessionClient._parse_header_lines(raw) == Client._parse_header_lines(raw)


def test_known_shapes() -> None:
    raw = (
        b"Nats-Msg-Id: abc\r\ntraceparent:00-x\r\nBad Name: x\r\n\xff\xfe: y\r\n"
        b"Sb-Error:\tdenied \r\nno-colon\r\n\r\n"
    )
    assert SessionClient._parse_header_lines(raw) == {
        "Nats-Msg-Id": "abc", "traceparent": "00-x", "Sb-Error": "denied",
    }  # fmt: skip


# -- raw subscriptions ------------------------------------------------------------------


async def test_a_raw_subscription_gets_reply_data_and_the_header_block_as_sent(
    nats_url: str,
) -> None:
    nc = await connect(nats_url, name="raw-reader")
    try:
        assert isinstance(nc, SessionClient)
        got: list[tuple[bytes, bytes, bytes]] = []
        sub = await nc.subscribe_raw("t.raw", lambda r, d, h: got.append((r, d, h)))
        await nc.publish("t.raw", b"plain")
        await nc.publish("t.raw", b"with", reply="back.here", headers={"K": "v", "Id": "1"})
        await sync_connection(nc)
        assert got[0] == (b"", b"plain", b"")
        reply, data, block = got[1]
        assert (reply, data) == (b"back.here", b"with")
        assert block.startswith(b"NATS/1.0\r\n") and parse_status(block) is None
        assert SessionClient._parse_header_lines(block[len(b"NATS/1.0\r\n") :]) == {
            "K": "v",
            "Id": "1",
        }
        # Other subscriptions of the connection still get nats-py's messages.
        normal = await nc.subscribe("t.normal")
        await nc.publish("t.normal", b"x", headers={"A": "b"})
        msg = await normal.next_msg(timeout=5)
        assert (msg.data, msg.headers) == (b"x", {"A": "b"})
        # Unsubscribed: nothing more, and the handler is forgotten.
        await sub.unsubscribe()
        await nc.publish("t.raw", b"late")
        await sync_connection(nc)
        assert len(got) == 2
    finally:
        await nc.close()


@pytest.mark.parametrize(
    ("block", "expected"),
    [
        (b"NATS/1.0 100 Idle Heartbeat\r\nNats-Last-Consumer: 7\r\nNats-Last-Stream: 9\r\n\r\n",
         ("100", "Idle Heartbeat", {"Nats-Last-Consumer": "7", "Nats-Last-Stream": "9"})),
        (b"NATS/1.0 100 FlowControl Request\r\n\r\n", ("100", "FlowControl Request", {})),
        (b"NATS/1.0 503\r\n\r\n", ("503", "", {})),
        (b"NATS/1.0 409 Consumer Deleted\r\n\r\n", ("409", "Consumer Deleted", {})),
    ],
)  # fmt: skip
def test_status_blocks_are_read(block: bytes, expected: tuple[str, str, dict[str, str]]) -> None:
    status = parse_status(block)
    assert status is not None
    assert (status.code, status.description, status.headers) == expected


def test_plain_header_blocks_and_nothing_are_not_statuses() -> None:
    assert parse_status(b"NATS/1.0\r\nStatus: 100\r\n\r\n") is None
    assert parse_status(b"") is None


async def test_a_raw_handler_that_raises_loses_its_message_not_the_connection(
    nats_url: str,
) -> None:
    nc = await connect(nats_url, name="raw-reader")
    try:
        assert isinstance(nc, SessionClient)
        got: list[bytes] = []

        def handler(_reply: bytes, data: bytes, _headers: bytes) -> None:
            if data == b"boom":
                raise ValueError("a handler bug")
            got.append(data)

        await nc.subscribe_raw("t.raw.boom", handler)
        for body in (b"one", b"boom", b"two"):
            await nc.publish("t.raw.boom", body)
        await sync_connection(nc)
        assert got == [b"one", b"two"] and nc.is_connected
    finally:
        await nc.close()
