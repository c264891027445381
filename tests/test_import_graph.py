"""No import cycles anywhere in the project, and services never import each other.

The graph is read from the source (every ``import``, those under
``TYPE_CHECKING`` too: a cycle hidden from the interpreter is still two
modules that cannot be understood, tested or moved apart). A desk that
needs its service takes :class:`broker.runtime.service.ServiceHost` and callbacks;
the model call takes :class:`broker.modelcall.ModelUser`.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("broker", "schemas", "services")


def _modules() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


def _graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: resolve against this module's package
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                for alias in node.names:
                    full = f"{base}.{alias.name}"
                    target = full if full in modules else base
                    if target in modules and target != name:
                        graph[name].add(target)
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name in modules and alias.name != name:
                        graph[name].add(alias.name)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, edges = work[-1]
            advanced = False
            for nxt in edges:
                if nxt not in index:
                    index[nxt] = low[nxt] = counter
                    counter += 1
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(graph[nxt]))))
                    advanced = True
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            if advanced:
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_the_project_has_no_import_cycle() -> None:
    cycles = _cycles(_graph(_modules()))
    assert not cycles, "import cycles (break them with a Protocol or a callback): " + "; ".join(
        " <-> ".join(c) for c in cycles
    )


def test_the_checker_finds_a_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert _cycles(graph) == [["a", "b", "c"]]


#: The services proper; ``services.runner``, ``services.cli`` and ``services.demo``
#: compose them (and may import them).
SERVICES = ("registry", "policy", "cost", "tracing")


def test_services_never_import_each_other() -> None:
    crossing = []
    for name, targets in _graph(_modules()).items():
        parts = name.split(".")
        if parts[0] != "services" or len(parts) < 2 or parts[1] not in SERVICES:
            continue
        for target in targets:
            other = target.split(".")
            another = other[0] == "services" and len(other) > 1 and other[1] in SERVICES
            if another and other[1] != parts[1]:
                crossing.append(f"{name} -> {target}")
    assert not crossing, crossing


def _is_sdk(name: str) -> bool:
    """The agent SDK: ``broker`` outside ``broker.runtime``, and the wire types."""
    top = name.split(".")
    return top[0] == "schemas" or (top[0] == "broker" and (len(top) < 2 or top[1] != "runtime"))


def test_the_sdk_never_imports_the_control_plane() -> None:
    """``broker`` (the SDK) and ``schemas`` import neither ``broker.runtime`` nor ``services``:
    ``pip install signalbox`` without the ``server`` extra must be enough for an agent."""
    leaks = [
        f"{name} -> {target}"
        for name, targets in _graph(_modules()).items()
        if _is_sdk(name)
        for target in targets
        if not _is_sdk(target)
    ]
    assert not leaks, leaks
