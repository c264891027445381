"""broker.connection.SessionClient parses NATS header blocks exactly as nats-py does, faster."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from nats.aio.client import Client

from broker.connection import SessionClient

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

