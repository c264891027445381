"""Wire types: frozen, tagged, versioned; decoding is strict about tags and types."""

from __future__ import annotations

import string

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import schemas
from broker.codec import decode, encode
from broker.errors import SchemaError
from schemas import (
    SCHEMA_VERSION,
    AgentManifest,
    AuditEvent,
    Capability,
    ErrorReply,
    GetAgent,
    UsageReport,
    Wire,
)

names = st.text(alphabet=string.ascii_letters + string.digits + "_-", min_size=1, max_size=64)
versions = st.builds(lambda a, b, c: f"{a}.{b}.{c}", *(st.integers(0, 999) for _ in range(3)))
short = st.text(max_size=40)
capabilities = st.builds(
    Capability,
    name=names,
    description=short,
    input_schema=st.none() | st.just({"type": "object"}),
    tags=st.lists(short, max_size=3).map(tuple),
)
manifests = st.builds(
    AgentManifest,
    name=names,
    version=versions,
    owner=short,
    team=short,
    description=short,
    region=short,
    capabilities=st.lists(capabilities, max_size=3).map(tuple),
    models=st.lists(short, max_size=3).map(tuple),
    metadata=st.dictionaries(short, short, max_size=3),
)


@settings(database=None, deadline=None, max_examples=60)
@given(manifests)
def test_agent_manifest_round_trips_through_the_codec(manifest: AgentManifest) -> None:
    assert decode(encode(manifest), AgentManifest) == manifest


def _wire_types() -> list[type[Wire]]:
    return [getattr(schemas, n) for n in schemas.__all__ if _is_wire(getattr(schemas, n))]


def _is_wire(obj: object) -> bool:
    return isinstance(obj, type) and issubclass(obj, Wire) and obj is not Wire


@pytest.mark.parametrize("cls", _wire_types(), ids=lambda c: c.__name__)
def test_every_wire_type_is_frozen_and_tagged_with_the_schema_version(cls: type[Wire]) -> None:
    config = cls.__struct_config__
    assert config.frozen
    assert config.tag_field == "type"
    assert isinstance(config.tag, str)
    assert config.tag.endswith(f".v{SCHEMA_VERSION}")


def test_wire_tags_are_unique() -> None:
    tags = [c.__struct_config__.tag for c in _wire_types()]
    assert len(tags) == len(set(tags))


def test_wire_structs_cannot_be_mutated() -> None:
    event = AuditEvent(id="1", time=1.0, kind="call", actor="a")
    with pytest.raises(AttributeError):
        event.kind = "decision"  # type: ignore[misc]


def test_encoding_carries_the_tag() -> None:
    assert msgspec.json.decode(encode(ErrorReply(code="x", message="m")))["type"] == "error.v1"


def test_unknown_fields_are_ignored_for_forward_compatibility() -> None:
    body = b'{"type": "get_agent.v1", "name": "a", "added_in_v1_5": true}'
    assert decode(body, GetAgent) == GetAgent(name="a")


@pytest.mark.parametrize("name", ["a.b", "a b", "", "x" * 65, "a\n", "a*", ">"])
def test_manifest_names_must_be_subject_tokens(name: str) -> None:
    body = msgspec.json.encode(
        {"type": "agent_manifest.v1", "name": name, "version": "1.0.0", "owner": "o", "team": "t"}
    )
    with pytest.raises(SchemaError) as info:
        decode(body, AgentManifest)
    assert info.value.details["path"] == "$.name"


@pytest.mark.parametrize("version", ["1", "1.0", "v1.0.0", "1.0.0\n", "1.0.0 "])
def test_manifest_versions_must_be_semver(version: str) -> None:
    body = msgspec.json.encode({"name": "a", "version": version, "owner": "o", "team": "t"})
    with pytest.raises(SchemaError) as info:
        decode(body, AgentManifest)
    assert info.value.details["path"] == "$.version"


def test_usage_counts_cannot_be_negative() -> None:
    body = msgspec.json.encode({"id": "r", "agent": "a", "time": 1.0, "input_tokens": -1})
    with pytest.raises(SchemaError) as info:
        decode(body, UsageReport)
    assert info.value.details["path"] == "$.input_tokens"


def test_capability_schemas_in_a_manifest_are_valid_json_schema_documents() -> None:
    schema = msgspec.json.schema(AgentManifest)
    assert schema["$ref"].endswith("/AgentManifest")
    name_pattern = schema["$defs"]["AgentManifest"]["properties"]["name"]["pattern"]
    # The pattern is exported to JSON Schema: it must not use Python-only syntax.
    assert "\\Z" not in name_pattern
