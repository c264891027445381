"""``signalbox trace <trace-id>`` against a real stack: the causal tree of a nested call,
as text and as JSON, and clear failures for an unknown or malformed trace id."""

from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING, Any

import pytest
from support import ainvoke

from broker.agent import CallContext
from broker.settings import Settings

if TYPE_CHECKING:
    from support import AgentFactory, AuditTrail, StackFactory

USE_MODELS = """
@id("any-model")
permit (principal, action == Signalbox::Action::"use_model", resource);
"""


@pytest.fixture(autouse=True)
def _wide_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")  # one tree node per line


@pytest.fixture
async def traced_call(
    make_stack: StackFactory, make_agent: AgentFactory, audit_trail: AuditTrail
) -> str:
    """a calls b.work; b's handler asks to use a model and calls c.leaf. The trace id."""
    from support import cedar_policies

    await make_stack(rules=cedar_policies([("a", "b", ["*"]), ("b", "c", ["*"])]) + USE_MODELS)
    a, b, c = make_agent("a"), make_agent("b"), make_agent("c")

    @c.capability("leaf")
    async def leaf(req: dict[str, Any]) -> dict[str, Any]:
        return {"leaf": True}

    @b.capability("work")
    async def work(req: dict[str, Any], ctx: CallContext) -> str:
        await b.authorize("use_model", "gpt-4o", provider="openai", region="eu-west-1")
        await b.call("c", "leaf", {})
        return ctx.meta.trace_id

    for agent in (c, b, a):
        await agent.start()
    trace_id: str = await a.call("b", "work", {})
    await audit_trail.wait_for(lambda r: r.kind == "call" and r.trace_id == trace_id, count=2)
    return trace_id


async def test_trace_prints_the_causal_tree(traced_call: str, settings: Settings) -> None:
    url = settings.nats_url
    assert url is not None
    result = await ainvoke(["trace", traced_call, "--nats-url", url])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert traced_call in lines[0] and "5 audit records" in lines[0]

    def at(pattern: str) -> tuple[int, int]:
        """(line number, indentation) of the one line matching ``pattern``."""
        found = [(i, len(line) - len(line.lstrip(" │├└─"))) for i, line in enumerate(lines)
                 if re.search(pattern, line)]  # fmt: skip
        assert len(found) == 1, (pattern, lines)
        return found[0]

    decision = at(r"decision a allow → b\.work")
    delivery = at(r"delivery ok b\.work \d+\.\d ms")
    authz = at(
        r"b, serving that call: authz b allow use_model gpt-4o @ eu-west-1 \(openai\) "
        r"\[any-model\]"
    )
    nested = at(r"b, serving that call: decision b allow → c\.leaf")
    inner = at(r"delivery ok c\.leaf")
    # caller → decision → delivery → (authz, nested decision → its delivery)
    assert decision[0] < delivery[0] < authz[0] < nested[0] < inner[0]
    assert decision[1] < delivery[1] < authz[1] == nested[1] < inner[1]


async def test_trace_json_is_the_same_tree(traced_call: str, settings: Settings) -> None:
    url = settings.nats_url
    assert url is not None
    result = await ainvoke(["trace", traced_call.upper(), "--json", "--nats-url", url])
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert out["trace_id"] == traced_call and out["records"] == 5
    [root] = out["spans"]
    assert (root["kind"], root["actor"], root["outcome"]) == ("decision", "a", "allow")
    [delivery] = root["children"]
    assert (delivery["kind"], delivery["outcome"]) == ("call", "ok")
    assert delivery["parent_span_id"] == root["span_id"]
    assert delivery["duration_ms"] > 0
    inside = {(c["kind"], c["records"][0]["data"].get("action", "call")) for c in
              delivery["children"]}  # fmt: skip
    assert inside == {("decision", "use_model"), ("decision", "call")}
    assert all(c["via_span_id"] == delivery["span_id"] for c in delivery["children"])
    [nested] = [c for c in delivery["children"] if "target" in c["records"][0]["data"]]
    [inner] = nested["children"]
    assert inner["records"][0]["data"]["target"] == "c"


async def test_unknown_and_malformed_trace_ids_say_what_to_do(
    traced_call: str, settings: Settings
) -> None:
    url = settings.nats_url
    assert url is not None
    unknown = await ainvoke(["trace", "f" * 32, "--nats-url", url])
    assert unknown.exit_code == 1
    assert f"no audit record of trace {'f' * 32}" in unknown.output
    assert "--since 7d" in unknown.output and "Traceback" not in unknown.output
    for bad in ("xyz", "0" * 32, traced_call[:-1]):
        malformed = await ainvoke(["trace", bad, "--nats-url", url])
        assert malformed.exit_code == 1
        assert "is not a W3C trace id" in malformed.output
    bad_since = await ainvoke(["trace", traced_call, "--since", "yesterday", "--nats-url", url])
    assert bad_since.exit_code == 1
