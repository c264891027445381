"""The checked-in JSON Schemas of the wire types are current, and they describe the wire.

Clients in other languages are written against ``schemas/json/``: a schema
that drifted from the msgspec types would mislead them silently.
"""

from __future__ import annotations

import json
from pathlib import Path

from schemas import AuthzRequest, jsonschema
from schemas.jsonschema import SCHEMA_DIR, render, stale, wire_types, write


def test_the_checked_in_schemas_are_current() -> None:
    out = stale()
    assert not out, f"stale wire schemas {out}: run `python -m schemas.jsonschema`"


def test_every_wire_type_has_a_schema_named_by_its_tag() -> None:
    index = json.loads((SCHEMA_DIR / "index.json").read_text())
    assert index["tag_field"] == "type"
    assert [t["type"] for t in index["types"]] == [
        str(w.__struct_config__.tag) for w in wire_types()
    ]
    assert len(wire_types()) > 50
    for entry in index["types"]:
        assert (SCHEMA_DIR / entry["file"]).is_file()


def test_a_schema_describes_its_fields_and_its_tag() -> None:
    document = json.loads((SCHEMA_DIR / "authz_request.v1.schema.json").read_text())
    body = document["$defs"]["AuthzRequest"]
    assert body["properties"]["type"] == {"enum": ["authz_request.v1"]}
    assert {"action", "resource", "region", "estimated_tokens"} <= set(body["properties"])
    assert AuthzRequest.__doc__ and body["description"].startswith("Asked on")


def test_check_finds_a_changed_a_missing_and_a_left_over_file(tmp_path: Path) -> None:
    write(tmp_path)
    assert stale(tmp_path) == []
    (tmp_path / "authz_request.v1.schema.json").write_text("{}")
    (tmp_path / "decision.v1.schema.json").unlink()
    (tmp_path / "gone.v1.schema.json").write_text("{}")
    assert stale(tmp_path) == [
        "authz_request.v1.schema.json", "decision.v1.schema.json", "gone.v1.schema.json"
    ]  # fmt: skip
    assert jsonschema.main([str(tmp_path), "--check"]) == 1
    write(tmp_path)
    assert stale(tmp_path) == [] and len(list(tmp_path.glob("*.json"))) == len(render())
