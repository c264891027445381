"""Public API surfaces: ``broker`` and ``schemas`` export what they define, once, in order."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from types import ModuleType

import pytest

import broker
import broker.errors
import schemas
from schemas import Wire

PACKAGES = [broker, schemas]


def _isort_key(name: str) -> tuple[int, str]:
    # The order ruff's RUF022 keeps: CONSTANTS, then Classes, then functions.
    if name.isupper():
        return (0, name)
    if name[:1].isupper():
        return (1, name)
    return (2, name)


@pytest.mark.parametrize("package", PACKAGES, ids=lambda p: p.__name__)
def test_all_has_no_duplicates_and_is_sorted(package: ModuleType) -> None:
    names = list(package.__all__)
    assert len(names) == len(set(names))
    assert names == sorted(names, key=_isort_key)


@pytest.mark.parametrize("package", PACKAGES, ids=lambda p: p.__name__)
def test_every_exported_name_is_importable(package: ModuleType) -> None:
    namespace: dict[str, object] = {}
    exec(f"from {package.__name__} import *", namespace)
    for name in package.__all__:
        assert getattr(package, name) is namespace[name], name


@pytest.mark.parametrize("package", PACKAGES, ids=lambda p: p.__name__)
def test_every_submodule_declares_all_with_real_names(package: ModuleType) -> None:
    # Subpackages too (broker.runtime and its modules).
    for info in pkgutil.walk_packages(package.__path__, prefix=f"{package.__name__}."):
        module = importlib.import_module(info.name)
        exported = getattr(module, "__all__", None)
        assert exported is not None, f"{module.__name__} has no __all__"
        assert len(exported) == len(set(exported)), module.__name__
        for name in exported:
            assert hasattr(module, name), f"{module.__name__}.__all__ names missing {name}"


def test_schemas_exports_every_wire_type() -> None:
    defined = set()
    for info in pkgutil.iter_modules(schemas.__path__):
        module = importlib.import_module(f"schemas.{info.name}")
        for name, obj in vars(module).items():
            if inspect.isclass(obj) and issubclass(obj, Wire) and obj.__module__ == module.__name__:
                defined.add(name)
    assert defined <= set(schemas.__all__)
    assert "Wire" in defined


def test_broker_exports_the_whole_error_tree() -> None:
    errors = {n for n in broker.errors.__all__ if n != "code_to_error"}
    assert errors <= set(broker.__all__)


def test_broker_exports_the_sdk_and_the_error_tree_only() -> None:
    """``broker`` is the agent SDK: the control plane's plumbing is ``broker.runtime``'s."""
    for name in ("Agent", "CallContext", "ModelCall", "Settings", "Subjects", "connect",
                 "encode", "decode", "validate_token"):  # fmt: skip
        assert name in broker.__all__, name
    errors = {n for n in broker.errors.__all__ if n[:1].isupper()}
    assert errors <= set(broker.__all__), sorted(errors - set(broker.__all__))
    plumbing = {"EmbeddedServer", "AuditEmitter", "Service", "PullWorker", "KVCache"}
    assert not plumbing & set(broker.__all__), sorted(plumbing & set(broker.__all__))
    sdk = {"Agent", "CallContext", "ModelCall", "Settings", "Subjects", "connect", "encode",
           "decode", "run", "serve", "validate_token"}  # fmt: skip
    assert set(broker.__all__) == sdk | errors, sorted(set(broker.__all__) - sdk - errors)
