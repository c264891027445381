"""compose.yaml, the NATS cluster configs and the service image, checked without Docker.

Docker cannot run here, so these tests parse ``compose.yaml`` and the
``deploy/nats/*.conf`` files it mounts and check that they fit together:
every service runs a real module against NATS nodes the file defines, every
``SIGNALBOX_*`` variable is a real setting, and the cluster's names, routes
and JetStream settings are consistent. The node configs are also checked by
the real ``nats-server`` (``-t``), and started as a local 3-node cluster that
the services run against.
"""

from __future__ import annotations

import importlib.util
import re
import shlex
import socket
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import nats
import pytest
import yaml

from broker.jetstream import AUDIT_STREAM
from broker.server import find_server_binary
from broker.settings import Settings
from services.runner import Stack

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "compose.yaml"
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
SERVICES = ("registry", "policy", "cost", "tracing")
CLUSTER_NAME = "signalbox"

# --------------------------------------------------------------------------
# A small parser for the nats-server config format (the subset we write:
# `key: value` / `key = value`, `{}` blocks, `[]` arrays, `#` and `//`
# comments, quoted or bare values). Anything else is a parse error, and the
# real server checks the same files with `-t` below.
# --------------------------------------------------------------------------

_BARE_VALUE_END = frozenset(" \t\r\n,;]}")
_KEY_END = frozenset(" \t\r\n:={")


class ConfError(ValueError):
    """The text is outside the config subset this parser knows."""


class _ConfParser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def _peek(self) -> str:
        if self.pos >= len(self.text):
            raise ConfError("unexpected end of config")
        return self.text[self.pos]

    def _skip(self) -> None:
        """Skip blanks, separators and comments."""
        while self.pos < len(self.text):
            char = self.text[self.pos]
            if char in " \t\r\n,;":
                self.pos += 1
            elif char == "#" or self.text.startswith("//", self.pos):
                end = self.text.find("\n", self.pos)
                self.pos = len(self.text) if end < 0 else end
            else:
                return

    def _inline_blanks(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos] in " \t":
            self.pos += 1

    def mapping(self, close: str | None) -> dict[str, Any]:
        out: dict[str, Any] = {}
        while True:
            self._skip()
            if self.pos >= len(self.text):
                if close is None:
                    return out
                raise ConfError(f"missing {close!r}")
            if self._peek() == close:
                self.pos += 1
                return out
            if self._peek() in "\"'}]":
                raise ConfError(f"unexpected {self._peek()!r} at offset {self.pos}")
            start = self.pos
            while self.pos < len(self.text) and self.text[self.pos] not in _KEY_END:
                self.pos += 1
            key = self.text[start : self.pos]
            if key == "include":
                raise ConfError("include is not supported here")
            self._inline_blanks()
            if self._peek() in ":=":
                self.pos += 1
                self._inline_blanks()
            if key in out:
                raise ConfError(f"duplicate key {key!r}")
            out[key] = self.value()

    def value(self) -> Any:
        char = self._peek()
        if char == "{":
            self.pos += 1
            return self.mapping("}")
        if char == "[":
            self.pos += 1
            items: list[Any] = []
            while True:
                self._skip()
                if self._peek() == "]":
                    self.pos += 1
                    return items
                items.append(self.value())
        if char in "\"'":
            end = self.text.find(char, self.pos + 1)
            if end < 0:
                raise ConfError("unterminated string")
            text = self.text[self.pos + 1 : end]
            self.pos = end + 1
            return text
        start = self.pos
        while self.pos < len(self.text) and self.text[self.pos] not in _BARE_VALUE_END:
            self.pos += 1
        word = self.text[start : self.pos]
        if not word:
            raise ConfError(f"missing value at offset {start}")
        if re.fullmatch(r"-?\d+", word):
            return int(word)
        if word.lower() in ("true", "false", "yes", "no", "on", "off"):
            return word.lower() in ("true", "yes", "on")
        return word


def parse_nats_conf(text: str) -> dict[str, Any]:
    """Parse a nats-server config (the subset described above) into a dict."""
    return _ConfParser(text).mapping(None)


def test_conf_parser_reads_the_format() -> None:
    conf = parse_nats_conf(
        "# comment\nserver_name = a\nport: 4222 // trailing\n"
        'jetstream {\n  store_dir: "/x y"\n  sync_interval: always\n}\n'
        "cluster {\n  routes: [\n    nats-route://b:6222, nats-route://c:6222\n  ]\n}\n"
        "debug: false\n"
    )
    assert conf == {
        "server_name": "a",
        "port": 4222,
        "jetstream": {"store_dir": "/x y", "sync_interval": "always"},
        "cluster": {"routes": ["nats-route://b:6222", "nats-route://c:6222"]},
        "debug": False,
    }
    with pytest.raises(ConfError):
        parse_nats_conf("a: 1\na: 2\n")
    with pytest.raises(ConfError):
        parse_nats_conf("cluster {\n  name: x\n")


# --------------------------------------------------------------------------
# compose.yaml, normalised
# --------------------------------------------------------------------------


def _host_port(address: str, default_port: int) -> tuple[str, int]:
    """``0.0.0.0:4222`` / ``4222`` / ``host`` -> (host, port)."""
    text = str(address)
    if re.fullmatch(r"\d+", text):
        return "0.0.0.0", int(text)
    host, _, port = text.rpartition(":")
    if not host:
        return text, default_port
    return host, int(port)


@dataclass(frozen=True)
class Node:
    """One NATS node of the compose file, with its parsed config."""

    service: str
    config_file: Path
    conf: dict[str, Any]
    volumes: tuple[str, ...]

    @property
    def client_port(self) -> int:
        if "listen" in self.conf:
            return _host_port(self.conf["listen"], 4222)[1]
        return int(self.conf.get("port", 4222))

    @property
    def cluster_port(self) -> int:
        return _host_port(self.conf["cluster"]["listen"], 6222)[1]

    @property
    def monitor_port(self) -> int:
        if "http" in self.conf:
            return _host_port(self.conf["http"], 8222)[1]
        return int(self.conf["http_port"])


def _command(service: dict[str, Any]) -> list[str]:
    command = service.get("command", [])
    return shlex.split(command) if isinstance(command, str) else [str(c) for c in command]


def _environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        return dict(item.split("=", 1) for item in env)
    return {key: "" if value is None else str(value) for key, value in env.items()}


def _config_path(command: list[str]) -> str:
    for flag in ("-c", "--config", "-config"):
        if flag in command:
            return command[command.index(flag) + 1]
    raise AssertionError(f"no --config in {command}")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    doc = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(doc, dict)
    return doc


@pytest.fixture(scope="module")
def nodes(compose: dict[str, Any]) -> dict[str, Node]:
    """The NATS nodes (services on a ``nats`` image) and their mounted configs."""
    found: dict[str, Node] = {}
    for name, service in compose["services"].items():
        if str(service.get("image", "")).split(":")[0] not in ("nats", "docker.io/library/nats"):
            continue
        inside = _config_path(_command(service))
        volumes = tuple(str(v) for v in service.get("volumes", []))
        mounts = [v.split(":") for v in volumes]
        sources = [m[0] for m in mounts if len(m) >= 2 and m[1] == inside]
        assert len(sources) == 1, f"{name}: {inside} is not mounted from exactly one file"
        mount = next(m for m in mounts if m[1] == inside)
        assert mount[2:] == ["ro"], f"{name}: mount its config read-only"
        config_file = (COMPOSE.parent / sources[0]).resolve()
        assert config_file.is_file(), f"{name}: {sources[0]} does not exist"
        conf = parse_nats_conf(config_file.read_text())
        found[name] = Node(name, config_file, conf, volumes)
    return found


def test_three_node_cluster(nodes: dict[str, Node]) -> None:
    assert len(nodes) == 3
    names = [node.conf["server_name"] for node in nodes.values()]
    assert len(set(names)) == 3, f"server names must be unique: {names}"
    # Each node's server name is its compose host name, so logs, routes and
    # monitoring all say the same thing.
    assert sorted(names) == sorted(nodes)
    assert len({node.config_file for node in nodes.values()}) == 3


def test_cluster_routes_are_consistent(nodes: dict[str, Node]) -> None:
    expected = {(name, node.cluster_port) for name, node in nodes.items()}
    for name, node in nodes.items():
        cluster = node.conf["cluster"]
        assert cluster["name"] == CLUSTER_NAME, name
        routes = set()
        for route in cluster["routes"]:
            url = urlsplit(route)
            assert url.scheme == "nats-route", f"{name}: {route}"
            assert url.hostname is not None
            assert url.port is not None
            routes.add((url.hostname, url.port))
        assert len(routes) == len(cluster["routes"]), f"{name}: duplicate routes"
        # Every other node must be reachable; listing itself is harmless.
        assert expected - {(name, node.cluster_port)} <= routes, f"{name}: missing routes"
        assert routes <= expected, f"{name}: routes to nodes not in the cluster"


def test_jetstream_fsyncs_every_write_on_a_named_volume(
    compose: dict[str, Any], nodes: dict[str, Node]
) -> None:
    named_volumes = set(compose.get("volumes") or {})
    for name, node in nodes.items():
        jetstream = node.conf["jetstream"]
        assert jetstream.get("enabled", True) is True, name
        assert jetstream["sync_interval"] == "always", name
        store_dir = PurePosixPath(jetstream["store_dir"])
        on_named_volume = [
            volume
            for volume in node.volumes
            if volume.split(":")[0] in named_volumes
            and store_dir.is_relative_to(volume.split(":")[1])
        ]
        assert on_named_volume, f"{name}: store_dir {store_dir} is not on a named volume"


def test_node_configs_are_valid_for_the_real_server(nodes: dict[str, Node]) -> None:
    binary = find_server_binary()
    for name, node in nodes.items():
        result = subprocess.run(
            [binary, "-c", str(node.config_file), "-t"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert result.returncode == 0, f"{name}: {result.stdout}{result.stderr}"


def test_nats_nodes_have_a_jetstream_healthcheck(
    compose: dict[str, Any], nodes: dict[str, Node]
) -> None:
    for name, node in nodes.items():
        service = compose["services"][name]
        test = service["healthcheck"]["test"]
        text = " ".join(test) if isinstance(test, list) else test
        assert f":{node.monitor_port}/healthz?js-enabled-only=true" in text, name
        assert service.get("restart") in ("always", "unless-stopped", "on-failure"), name


def test_nats_image_matches_the_tested_server(compose: dict[str, Any]) -> None:
    """The image runs the same minor version as the binary these configs are tested with."""
    version = subprocess.run(
        [find_server_binary(), "--version"], capture_output=True, text=True, check=True
    ).stdout
    found = re.search(r"v(\d+)\.(\d+)", version)
    assert found, version
    for name, service in compose["services"].items():
        image = str(service.get("image", ""))
        if image.startswith("nats:"):
            tag = image.split(":", 1)[1]
            assert tag.startswith(f"{found[1]}.{found[2]}"), f"{name}: {image} vs {version}"


# --------------------------------------------------------------------------
# The Signalbox services
# --------------------------------------------------------------------------


@pytest.mark.parametrize("name", SERVICES)
def test_service_runs_its_module(compose: dict[str, Any], name: str) -> None:
    service = compose["services"][name]
    assert _command(service) == ["python", "-m", f"services.{name}"]
    assert importlib.util.find_spec(f"services.{name}.__main__") is not None
    assert service["build"]["dockerfile"] == "deploy/Dockerfile"
    assert (COMPOSE.parent / service["build"]["context"] / "deploy/Dockerfile").is_file()
    assert service.get("restart") in ("always", "unless-stopped", "on-failure"), name


@pytest.mark.parametrize("name", SERVICES)
def test_service_nats_url_lists_the_cluster(
    compose: dict[str, Any], nodes: dict[str, Node], name: str
) -> None:
    env = _environment(compose["services"][name])
    urls = [urlsplit(u.strip()) for u in env["SIGNALBOX_NATS_URL"].split(",")]
    targets = []
    for url in urls:
        assert url.scheme == "nats", url.geturl()
        assert url.hostname in nodes, f"{url.geturl()}: not a NATS node of compose.yaml"
        assert url.port == nodes[url.hostname].client_port, url.geturl()
        targets.append(url.hostname)
    # All nodes, so the service fails over when one goes down.
    assert sorted(targets) == sorted(nodes)


@pytest.mark.parametrize("name", SERVICES)
def test_service_env_is_real_settings(
    compose: dict[str, Any], nodes: dict[str, Node], name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = _environment(compose["services"][name])
    ours = {k: v for k, v in env.items() if k.startswith("SIGNALBOX_")}
    for key, value in ours.items():
        assert key.removeprefix("SIGNALBOX_").lower() in Settings.model_fields, key
        monkeypatch.setenv(key, value)
    # The values are valid too, and the audit streams fit on the cluster.
    settings = Settings()
    assert settings.audit_replicas == len(nodes)
    assert settings.nats_url == env["SIGNALBOX_NATS_URL"]


@pytest.mark.parametrize("name", SERVICES)
def test_service_waits_for_healthy_dependencies(
    compose: dict[str, Any], nodes: dict[str, Node], name: str
) -> None:
    depends_on = compose["services"][name]["depends_on"]
    assert isinstance(depends_on, dict), "use the long form with conditions"
    for node in nodes:
        assert depends_on[node]["condition"] == "service_healthy", (name, node)
    for dependency in depends_on:
        assert "healthcheck" in compose["services"][dependency], dependency


def test_replicas(compose: dict[str, Any]) -> None:
    services = compose["services"]

    def replicas(name: str) -> int:
        return int(services[name].get("deploy", {}).get("replicas", 1))

    # The tracing service is the single sequencer of the audit hash chain.
    assert replicas("tracing") == 1
    # Policy is a queue group: replicas share the load.
    assert replicas("policy") >= 2
    for name in SERVICES:
        if replicas(name) > 1:
            assert "container_name" not in services[name], name


def test_postgres(compose: dict[str, Any]) -> None:
    postgres = compose["services"]["postgres"]
    assert str(postgres["image"]).startswith("postgres:15")
    env = _environment(postgres)
    test = postgres["healthcheck"]["test"]
    assert "pg_isready" in (" ".join(test) if isinstance(test, list) else test)
    for name in SERVICES:
        url = urlsplit(_environment(compose["services"][name])["SIGNALBOX_DATABASE_URL"])
        assert url.scheme.startswith("postgresql")
        assert url.hostname == "postgres"
        assert url.port == 5432
        assert url.username == env["POSTGRES_USER"]
        assert url.password == env["POSTGRES_PASSWORD"]
        assert url.path == f"/{env['POSTGRES_DB']}"


def test_dockerfile_installs_the_project() -> None:
    text = DOCKERFILE.read_text()
    assert re.search(r"^FROM python:3\.11-slim\b", text, re.MULTILINE)
    assert re.search(r"^RUN pip install \.(\s|$)", text, re.MULTILINE)
    copied = {
        PurePosixPath(src).as_posix()
        for line in re.findall(r"^COPY (.+)$", text, re.MULTILINE)
        for src in line.split()[:-1]
    }
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    needed = {"pyproject.toml", pyproject["project"]["readme"]}
    needed |= set(pyproject["tool"]["hatch"]["build"]["targets"]["wheel"]["packages"])
    assert needed <= copied, f"not copied into the image: {needed - copied}"
    for env_name in re.findall(r"\b(SIGNALBOX_[A-Z_]+)=", text):
        assert env_name.removeprefix("SIGNALBOX_").lower() in Settings.model_fields


# --------------------------------------------------------------------------
# The same configs, run: a local 3-node cluster with the services on it
# --------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _render(conf: dict[str, Any], indent: str = "") -> str:
    """Write a parsed config back out (every scalar quoted or numeric)."""
    lines = []
    for key, value in conf.items():
        if isinstance(value, dict):
            lines += [f"{indent}{key} {{", _render(value, indent + "  "), f"{indent}}}"]
        elif isinstance(value, list):
            items = ", ".join(f'"{item}"' for item in value)
            lines.append(f"{indent}{key}: [{items}]")
        elif isinstance(value, bool | int):
            lines.append(f"{indent}{key}: {str(value).lower()}")
        else:
            lines.append(f'{indent}{key}: "{value}"')
    return "\n".join(lines)


def _healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as reply:
            return bool(reply.status == 200)
    except (urllib.error.URLError, OSError):
        return False


@pytest.fixture
def local_cluster(nodes: dict[str, Node], tmp_path: Path) -> Iterator[str]:
    """The compose node configs, started locally: host names and ports rewritten only."""
    binary = find_server_binary()
    ports = {name: (_free_port(), _free_port(), _free_port()) for name in nodes}
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for name, node in nodes.items():
            client, route, monitor = ports[name]
            conf = dict(node.conf)
            conf["listen"] = f"127.0.0.1:{client}"
            conf["http"] = f"127.0.0.1:{monitor}"
            conf["jetstream"] = {**conf["jetstream"], "store_dir": str(tmp_path / name)}
            by_name = {f"{n}:{nodes[n].cluster_port}": f"127.0.0.1:{ports[n][1]}" for n in nodes}
            conf["cluster"] = {
                **conf["cluster"],
                "listen": f"127.0.0.1:{route}",
                "routes": [
                    f"nats-route://{by_name[r.split('://', 1)[1]]}"
                    for r in conf["cluster"]["routes"]
                ],
            }
            path = tmp_path / f"{name}.conf"
            path.write_text(_render(conf) + "\n")
            procs.append(
                subprocess.Popen(
                    [binary, "-c", str(path), "-l", str(tmp_path / f"{name}.log")],
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
        # /healthz (without js-enabled-only) is green once the node has
        # joined the JetStream meta group with a leader.
        deadline = time.monotonic() + 45
        while not all(_healthy(ports[name][2]) for name in nodes):
            for proc in procs:
                assert proc.poll() is None, "a cluster node exited; see its log in tmp_path"
            assert time.monotonic() < deadline, "the cluster did not become healthy"
            time.sleep(0.1)
        yield ",".join(f"nats://127.0.0.1:{ports[name][0]}" for name in nodes)
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


@pytest.mark.nats
@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
async def test_services_run_on_the_cluster(
    compose: dict[str, Any], local_cluster: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The services start on the cluster with compose's settings; audit streams get 3 replicas."""
    env = _environment(compose["services"]["tracing"])
    for key, value in env.items():
        if key.startswith("SIGNALBOX_") and key != "SIGNALBOX_DATABASE_URL":
            monkeypatch.setenv(key, value)
    settings = Settings(nats_url=local_cluster, data_dir=tmp_path / "data")
    assert settings.audit_replicas == 3
    async with Stack(settings):
        nc = await nats.connect(local_cluster.split(","))
        try:
            info = await nc.jetstream().stream_info(AUDIT_STREAM)
        finally:
            await nc.close()
    assert info.config.num_replicas == 3
    assert info.cluster is not None
    assert info.cluster.name == CLUSTER_NAME
    assert info.cluster.leader is not None
    assert len(info.cluster.replicas or []) == 2
