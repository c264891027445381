"""The wire types as JSON Schema files, for clients outside the Python SDK.

A TypeScript, Go or Rust client can be written against these: one file per
wire type, named by its tag (``authz_request.v1.schema.json``), generated from
the msgspec types themselves (so they say exactly what the services accept),
plus ``index.json`` listing every type with its tag and file. Every body is
a JSON object whose ``type`` field is the tag.

The files are checked in under ``schemas/json/`` (and ship in the wheel);
``tests/test_wire_schemas.py`` fails when they are not current. Regenerate::

    python -m schemas.jsonschema            # writes schemas/json/
    python -m schemas.jsonschema --check    # exit 1 if anything is stale
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import msgspec

import schemas
from schemas._base import SCHEMA_VERSION, Wire

__all__ = ["SCHEMA_DIR", "render", "stale", "wire_types", "write"]

#: Where the generated files live (inside the package, so a wheel has them too).
SCHEMA_DIR = Path(__file__).resolve().parent / "json"


def wire_types() -> list[type[Wire]]:
    """Every wire type :mod:`schemas` exports, sorted by tag."""
    found = [
        obj
        for name in schemas.__all__
        if isinstance(obj := getattr(schemas, name), type)
        and issubclass(obj, Wire)
        and obj is not Wire
    ]
    return sorted(found, key=lambda t: str(t.__struct_config__.tag))


def _dump(document: Any) -> str:
    return json.dumps(document, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def render() -> dict[str, str]:
    """File name → contents of every schema file and of ``index.json``."""
    files: dict[str, str] = {}
    index: list[dict[str, str]] = []
    for wire in wire_types():
        tag = str(wire.__struct_config__.tag)
        file = f"{tag}.schema.json"
        document = {
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "$id": f"https://signalbox.dev/schemas/{file}",
            **msgspec.json.schema(wire),
        }
        files[file] = _dump(document)
        summary = (wire.__doc__ or "").strip().splitlines()[0] if wire.__doc__ else ""
        index.append({"type": tag, "name": wire.__name__, "file": file, "summary": summary})
    files["index.json"] = _dump(
        {"schema_version": SCHEMA_VERSION, "tag_field": "type", "types": index}
    )
    return files


def write(folder: Path = SCHEMA_DIR) -> list[str]:
    """Write the files into ``folder`` (removing schema files no type has any more).

    Returns:
        The names written or removed because they differed.
    """
    folder.mkdir(parents=True, exist_ok=True)
    changed = stale(folder)
    wanted = render()
    for old in folder.glob("*.json"):
        if old.name not in wanted:
            old.unlink()
    for name, text in wanted.items():
        path = folder / name
        if not path.exists() or path.read_text() != text:
            path.write_text(text)
    return changed


def stale(folder: Path = SCHEMA_DIR) -> list[str]:
    """Names of the files in ``folder`` that are missing, different or left over."""
    wanted = render()
    present = {p.name: p.read_text() for p in folder.glob("*.json")} if folder.is_dir() else {}
    return sorted(
        {n for n, text in wanted.items() if present.get(n) != text} | (set(present) - set(wanted))
    )


def main(argv: list[str] | None = None) -> int:
    """``python -m schemas.jsonschema [--check] [DIR]``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("folder", nargs="?", type=Path, default=SCHEMA_DIR)
    parser.add_argument("--check", action="store_true", help="only check; exit 1 if stale")
    args = parser.parse_args(argv)
    if args.check:
        out = stale(args.folder)
        if out:
            print(f"stale wire schemas in {args.folder}: {', '.join(out)}", file=sys.stderr)
            print("regenerate them: python -m schemas.jsonschema", file=sys.stderr)
            return 1
        print(f"{len(render())} wire schema files in {args.folder} are current")
        return 0
    changed = write(args.folder)
    print(f"wrote {args.folder}: {len(render())} files, {len(changed)} changed")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
