"""msgspec serialization: bytes pass through, decode errors carry the field path."""

from __future__ import annotations

import msgspec
import pytest

from broker.codec import decode, encode, ensure_size
from broker.errors import InvalidInput, PayloadTooLarge, SchemaError
from schemas import AgentManifest, AuditEvent, Capability, GetAgent


class Inner(msgspec.Struct):
    income: int


class Outer(msgspec.Struct):
    applicant: Inner
    items: list[Inner] = []


def test_bytes_pass_through_encode_and_decode_untouched() -> None:
    raw = b"\x00\xffnot json"
    assert encode(raw) == raw
    assert encode(bytearray(raw)) == raw
    assert encode(memoryview(raw)) == raw
    assert decode(raw, bytes) == raw


def test_structs_and_builtins_round_trip() -> None:
    value = Outer(applicant=Inner(income=5), items=[Inner(1), Inner(2)])
    assert decode(encode(value), Outer) == value
    assert decode(encode({"a": [1, 2.5, None]}), dict) == {"a": [1, 2.5, None]}


@pytest.mark.parametrize(
    ("data", "path"),
    [
        (b'{"applicant": {"income": "lots"}}', "$.applicant.income"),
        (b'{"applicant": {"income": 1}, "items": [{"income": 1}, {"income": null}]}',
         "$.items[1].income"),
        (b'{"applicant": []}', "$.applicant"),
        (b'{"applicant": {}}', "$.applicant"),
    ],
)  # fmt: skip
def test_decode_errors_name_the_nested_field(data: bytes, path: str) -> None:
    with pytest.raises(SchemaError) as info:
        decode(data, Outer)
    assert info.value.details["path"] == path
    assert "Outer" in info.value.message
    # The human-readable error excludes the path suffix (it is in details).
    assert " - at `" not in info.value.details["error"]


def test_missing_top_level_field_points_at_the_root_and_names_it() -> None:
    with pytest.raises(SchemaError) as info:
        decode(b"{}", Outer)
    assert info.value.details["path"] == "$"
    assert "applicant" in info.value.details["error"]


@pytest.mark.parametrize("data", [b"", b"{", b"not json", b'{"a": 1,}', b"\xff\xfe"])
def test_malformed_json_is_a_schema_error_at_the_root(data: bytes) -> None:
    with pytest.raises(SchemaError) as info:
        decode(data, Outer)
    assert info.value.details["path"] == "$"
    assert info.value.message.startswith("malformed JSON")
    assert isinstance(info.value, InvalidInput)


def test_unknown_tags_are_rejected_with_the_tag_path() -> None:
    body = encode(GetAgent(name="a")).replace(b"get_agent.v1", b"get_agent.v9")
    with pytest.raises(SchemaError) as info:
        decode(body, GetAgent)
    assert info.value.details["path"] == "$.type"


def test_another_types_tag_is_rejected() -> None:
    body = encode(GetAgent(name="a"))
    with pytest.raises(SchemaError) as info:
        decode(body, AgentManifest)
    assert info.value.details["path"] == "$.type"


def test_nested_wire_struct_errors_carry_the_full_path() -> None:
    manifest = AgentManifest(
        name="a", version="1.0.0", owner="o", team="t", capabilities=(Capability(name="x"),)
    )
    body = encode(manifest).replace(b'"tags":[]', b'"tags":[7]')
    with pytest.raises(SchemaError) as info:
        decode(body, AgentManifest)
    assert info.value.details["path"] == "$.capabilities[0].tags[0]"


def test_wrong_literal_value_is_rejected() -> None:
    event = AuditEvent(id="1", time=1.0, kind="call", actor="a")
    body = encode(event).replace(b'"kind":"call"', b'"kind":"gossip"')
    with pytest.raises(SchemaError) as info:
        decode(body, AuditEvent)
    assert info.value.details["path"] == "$.kind"


def test_ensure_size_rejects_only_what_is_over_the_limit() -> None:
    ensure_size(b"x" * 10, 10)
    with pytest.raises(PayloadTooLarge) as info:
        ensure_size(b"x" * 11, 10, what="call payload")
    assert info.value.details == {"size": 11, "limit": 10}
    assert info.value.message.startswith("call payload is 11 bytes")
