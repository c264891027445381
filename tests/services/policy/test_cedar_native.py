"""The decider's direct call into cedarpy's extension answers exactly as cedarpy's public API.

``services.policy.cedar.engine.authorize`` skips cedarpy's Python wrapper (see the
module's docstring); these tests pin that it means the same thing, so a cedarpy
upgrade that changes the extension's interface fails here, loudly.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path
from typing import Any

import cedarpy
import pytest

from services.policy.cedar.engine import authorize

POLICIES = """
@id("a-may-call") permit (
  principal == Signalbox::Agent::"a", action == Signalbox::Action::"call", resource);
@id("anyone-may-read") permit (principal, action == Signalbox::Action::"read", resource);
@id("no-pii-for-b") forbid (principal == Signalbox::Agent::"b", action, resource)
  when { context.data_tags.contains("pii") };
@id("no-big") forbid (principal, action, resource) when { context.estimated_tokens > 10000 };
@id("overflow") forbid (principal, action, resource)
  when { context.estimated_tokens * 100000000000 > 5 && context.on_behalf_of.contains("x") };
@id("by-team") permit (principal, action == Signalbox::Action::"call", resource)
  when { principal.team == "risk" };
"""

ENTITIES = [
    {"uid": {"type": "Signalbox::Agent", "id": "a"}, "attrs": {"team": "web"}, "parents": []},
    {"uid": {"type": "Signalbox::Agent", "id": "b"}, "attrs": {"team": "risk"}, "parents": []},
    {"uid": {"type": "Signalbox::Agent", "id": "c"}, "attrs": {"team": "ops"}, "parents": []},
    {"uid": {"type": "Signalbox::Capability", "id": "t/score"}, "attrs": {}, "parents": []},
]


def _request(principal: str, action: str, **context: Any) -> dict[str, Any]:
    return {
        "principal": {"type": "Signalbox::Agent", "id": principal},
        "action": {"type": "Signalbox::Action", "id": action},
        "resource": {"type": "Signalbox::Capability", "id": "t/score"},
        "context": {
            "estimated_tokens": 1,
            "data_tags": [],
            "on_behalf_of": [],
            "time": 1_790_000_000,
            **context,
        },
    }


CASES = {
    "allowed by one permit": _request("a", "call"),
    "allowed by an attribute": _request("b", "call"),
    "allowed for anyone": _request("c", "read"),
    "denied by default": _request("c", "call"),
    "forbidden by a context set": _request("b", "call", data_tags=["pii", "eu"]),
    "forbidden by a number": _request("a", "call", estimated_tokens=20_000),
    "an evaluation error": _request("a", "call", estimated_tokens=10**12, on_behalf_of=["x"]),
    "an unknown principal": _request("nobody", "call"),
    "odd strings": _request("a", "call", data_tags=['quote"', "new\nline", "ünï"]),
}


@pytest.mark.parametrize("case", CASES)
def test_the_native_call_answers_as_the_public_api(case: str) -> None:
    policies = cedarpy.PolicySet.from_str(POLICIES)
    entities = cedarpy.Entities.from_json_str(json.dumps(ENTITIES))
    request = CASES[case]
    public = cedarpy.is_authorized(request, policies, entities)
    native = authorize(request, policies, entities)
    assert native.allowed == public.allowed
    assert native.decision == public.decision.value
    assert sorted(native.reasons) == sorted(public.diagnostics.reasons)
    assert [str(e) for e in native.errors] == [str(e) for e in public.diagnostics.errors]


def test_the_cases_cover_every_kind_of_answer() -> None:
    """Guards the table above: it must keep exercising allow, forbid, default deny and errors."""
    policies = cedarpy.PolicySet.from_str(POLICIES)
    entities = cedarpy.Entities.from_json_str(json.dumps(ENTITIES))
    answers = {case: authorize(r, policies, entities) for case, r in CASES.items()}
    # (Policies parsed from text get ids policy0, policy1...: the third is the pii forbid.)
    assert answers["allowed by one permit"].reasons == ["policy0"]
    assert answers["forbidden by a context set"].reasons == ["policy2"]
    assert not answers["denied by default"].allowed and answers["denied by default"].reasons == []
    assert answers["an evaluation error"].errors
    assert not answers["forbidden by a number"].allowed


def _touches_cedarpy_internals(source: str) -> bool:
    """Whether a module imports cedarpy's private extension or reads a private handle of it."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("cedarpy"):
            if node.module == "cedarpy._internal" or any(a.name == "_internal" for a in node.names):
                return True
        elif isinstance(node, ast.Import):
            if any(a.name.startswith("cedarpy._internal") for a in node.names):
                return True
        elif isinstance(node, ast.Attribute) and node.attr in ("_internal", "_inner"):
            return True
    return False


def test_only_the_engine_module_touches_cedarpys_private_extension() -> None:
    """The private-API use measured in services/policy/cedar/engine.py stays in that one module."""
    root = Path(__file__).resolve().parents[3]
    touching = sorted(
        path.relative_to(root).as_posix()
        for package in ("broker", "schemas", "services")
        for path in (root / package).rglob("*.py")
        if _touches_cedarpy_internals(path.read_text(encoding="utf-8"))
    )
    assert touching == ["services/policy/cedar/engine.py"]
