"""One mediated call is one connected OpenTelemetry trace, from the caller's SDK to the
target and back, nested calls, authorizations and usage reports included; the audit
records carry the same trace and span ids, so the audit trail alone rebuilds the tree.

Spans are collected with the SDK's ``InMemorySpanExporter`` from a provider shared
by the services and agents of the test (one process, as ``signalbox up`` runs).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec
import pytest
from msgspec import UNSET
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, TracerProvider
from support import Rule, cedar_policies, enroll

from broker import telemetry
from broker.agent import Agent, CallContext
from broker.codec import decode, encode
from broker.errors import CallDenied
from broker.runtime import otel
from broker.settings import Settings
from schemas import AgentManifest, AuditEvent
from services.cli.trace_cmds import build_tree
from services.policy.cedar.policy_set import LABEL_FILE, SCHEMA_FILE, shipped_policy_dir
from services.runner import Stack
from services.tracing.chain import GENESIS, chain, record_hash
from services.tracing.verify import verify

if TYPE_CHECKING:
    from support import AuditTrail

#: Model use allowed for every agent (the shipped schema's action and resource).
USE_MODELS = """
@id("any-model")
permit (principal, action == Signalbox::Action::"use_model", resource);
"""


def _policy_dir(settings: Settings, allow: Sequence[Rule], extra: str = "") -> Path:
    folder = settings.data_dir / "trace-policies"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / SCHEMA_FILE).write_text((shipped_policy_dir() / SCHEMA_FILE).read_text())
    (folder / LABEL_FILE).write_text("trace-tests\n")
    (folder / "rules.cedar").write_text(cedar_policies(allow) + extra)
    return folder


class Traced:
    """A stack and agents sharing one recording tracer provider."""

    def __init__(self, settings: Settings, provider: TracerProvider) -> None:
        self.settings = settings
        self.provider = provider
        self.agents: list[Agent] = []

    def agent(self, name: str, team: str = "team-1") -> Agent:
        assert self.settings.nats_url is not None
        agent = Agent(
            AgentManifest(name=name, version="2.1.0", owner="owner-1", team=team),
            nats_url=self.settings.nats_url,
            credential=enroll(self.settings, name, owner="owner-1", team=team),
            tracer_provider=self.provider,
            heartbeat_interval=0,
        )
        self.agents.append(agent)
        return agent


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
async def traced(settings: Settings, exporter: InMemorySpanExporter) -> AsyncIterator[Traced]:
    provider = otel.tracer_provider(settings, exporter=exporter)
    rules: list[Rule] = [("a", "b", ["*"]), ("b", "c", ["*"])]
    current = settings.model_copy(update={"policy_dir": _policy_dir(settings, rules, USE_MODELS)})
    stack = Stack(current, tracer_provider=provider)
    await stack.start()
    env = Traced(settings, provider)
    yield env
    for agent in reversed(env.agents):
        await agent.stop()
    await stack.stop()


def _hex(span: ReadableSpan) -> str:
    assert span.context is not None
    return f"{span.context.span_id:016x}"


def _trace(span: ReadableSpan) -> str:
    assert span.context is not None
    return f"{span.context.trace_id:032x}"


def _parent(span: ReadableSpan) -> str:
    return f"{span.parent.span_id:016x}" if span.parent is not None else ""


def _one(
    spans: Sequence[ReadableSpan], name: str, kind: SpanKind | None = None, **attrs: Any
) -> ReadableSpan:
    found = [
        s
        for s in spans
        if s.name == name
        and (kind is None or s.kind == kind)
        and all((s.attributes or {}).get(k) == v for k, v in attrs.items())
    ]
    assert len(found) == 1, [(s.name, dict(s.attributes or {})) for s in spans]
    return found[0]


async def test_one_mediated_call_is_one_connected_trace(
    traced: Traced, exporter: InMemorySpanExporter, audit_trail: AuditTrail
) -> None:
    a, b = traced.agent("a", team="lending"), traced.agent("b", team="risk")

    @b.capability("echo")
    async def echo(req: dict[str, Any]) -> dict[str, Any]:
        return req

    await b.start()
    await a.start()
    assert await a.call("b", "echo", {"x": 1}) == {"x": 1}
    # The outcome record is emitted after the policy ends its delivery and reply spans.
    [outcome] = await audit_trail.wait_for(lambda r: r.kind == "call")
    [decided] = await audit_trail.wait_for(lambda r: r.kind == "decision")
    spans = exporter.get_finished_spans()

    call = _one(spans, "sb.call")
    decision = _one(spans, "sb.decision")
    delivery = _one(spans, "sb.delivery")
    serve = _one(spans, "sb.serve")
    reply = _one(spans, "sb.reply")
    hops = [call, decision, delivery, serve, reply]
    assert {_trace(s) for s in hops} == {_trace(call)}
    assert call.parent is None
    assert _parent(decision) == _hex(call)
    assert _parent(delivery) == _hex(decision)
    assert _parent(serve) == _hex(delivery)
    assert _parent(reply) == _hex(delivery)
    assert [s.kind for s in hops] == [
        SpanKind.CLIENT, SpanKind.SERVER, SpanKind.CLIENT, SpanKind.SERVER, SpanKind.PRODUCER
    ]  # fmt: skip
    # Who, what and the decision, on the spans.
    assert call.attributes is not None and decision.attributes is not None
    assert call.attributes["signalbox.agent.name"] == "a"
    assert call.attributes["signalbox.agent.team"] == "lending"
    assert call.attributes["signalbox.capability"] == "echo"
    assert decision.attributes["signalbox.decision.effect"] == "allow"
    assert (
        decision.attributes["signalbox.decision.reason"] == decided.data["decision"]["reason_code"]
    )
    assert decision.attributes["signalbox.caller.version"] == "2.1.0"
    assert decision.attributes["signalbox.target.team"] == "risk"
    assert serve.attributes is not None and serve.attributes["signalbox.agent.name"] == "b"
    assert serve.attributes["signalbox.caller"] == "a"
    # The audit records sit on those spans.
    assert decided.trace_id == outcome.trace_id == _trace(call)
    assert (decided.span_id, decided.parent_span_id) == (_hex(decision), _hex(call))
    assert (outcome.span_id, outcome.parent_span_id) == (_hex(delivery), _hex(decision))
    assert not decided.via_span_id


async def test_nested_call_authz_and_usage_in_a_handler_stay_in_the_trace(
    traced: Traced, exporter: InMemorySpanExporter, audit_trail: AuditTrail
) -> None:
    a, b, c = traced.agent("a"), traced.agent("b"), traced.agent("c")

    @c.capability("leaf")
    async def leaf(req: dict[str, Any]) -> dict[str, Any]:
        return {"leaf": True}

    @b.capability("work")
    async def work(req: dict[str, Any], ctx: CallContext) -> dict[str, Any]:
        decision = await b.authorize("use_model", "gpt-4o", provider="openai")
        await b.report_usage(model="gpt-4o", provider="openai", input_tokens=120, output_tokens=30)
        inner = await b.call("c", "leaf", {})
        with contextlib.suppress(CallDenied):
            await b.call("a", "ping", {})  # no rule: denied, still in the trace
        return {"effect": decision.effect, "inner": inner, "trace": ctx.meta.trace_id}

    @a.capability("ping")
    async def ping(req: dict[str, Any]) -> dict[str, Any]:
        return {}

    for agent in (c, b, a):
        await agent.start()
    result = await a.call("b", "work", {}, timeout=5.0)
    assert result["effect"] == "allow" and result["inner"] == {"leaf": True}
    [usage] = await audit_trail.wait_for(lambda r: r.kind == "usage")
    await audit_trail.wait_for(lambda r: r.kind == "call", count=2)
    spans = exporter.get_finished_spans()

    root = _one(spans, "sb.call", **{"signalbox.agent.name": "a"})
    trace_id = _trace(root)
    assert result["trace"] == trace_id  # CallMeta.trace_id, from the forwarded traceparent
    assert {_trace(s) for s in spans if s.name.startswith("sb.")} == {trace_id}
    serve_b = _one(spans, "sb.serve", **{"signalbox.agent.name": "b"})
    # Everything b does inside its handler is a child of its server span...
    nested = _one(spans, "sb.call", **{"signalbox.agent.name": "b", "signalbox.target": "c"})
    authz = _one(spans, "sb.authz", SpanKind.CLIENT)
    produced = _one(spans, "sb.usage", SpanKind.PRODUCER)
    for child in (nested, authz, produced):
        assert child.kind != SpanKind.SERVER
    assert {_parent(nested), _parent(authz), _parent(produced)} == {_hex(serve_b)}
    # ... and the services' spans continue from those.
    policy_authz = [s for s in spans if s.name == "sb.authz" and s.kind == SpanKind.SERVER]
    assert [_parent(s) for s in policy_authz] == [_hex(authz)]
    assert policy_authz[0].attributes is not None
    assert policy_authz[0].attributes["signalbox.decision.effect"] == "allow"
    consumed = [s for s in spans if s.name == "sb.usage" and s.kind == SpanKind.CONSUMER]
    assert [_parent(s) for s in consumed] == [_hex(produced)]
    assert consumed[0].attributes is not None
    assert consumed[0].attributes["gen_ai.usage.input_tokens"] == 120
    assert consumed[0].attributes["signalbox.cost.usd"] > 0
    serve_c = _one(spans, "sb.serve", **{"signalbox.agent.name": "c"})
    inner_decision = [s for s in spans if s.name == "sb.decision" and _parent(s) == _hex(nested)]
    assert len(inner_decision) == 1
    inner_delivery = _one(spans, "sb.delivery", **{"signalbox.target": "c"})
    assert _parent(serve_c) == _hex(inner_delivery)
    assert _parent(inner_delivery) == _hex(inner_decision[0])

    # The usage report is charged to the trace; the audit records name the delivery
    # to b as the hop they happened under, so the trail alone links them.
    outer_delivery = _one(spans, "sb.delivery", **{"signalbox.target": "b"})
    assert usage.trace_id == trace_id
    assert usage.parent_span_id == _hex(produced)
    assert usage.via_span_id == _hex(outer_delivery)
    records = [r for r in await audit_trail.settle() if r.trace_id == trace_id]
    inner = [r for r in records if r.kind == "decision" and r.actor == "b"]
    assert len(inner) == 3  # authz, the call to c, the denied call to a
    assert {r.via_span_id for r in inner} == {_hex(outer_delivery)}
    roots = build_tree(records)
    assert len(roots) == 1 and roots[0].record.kind == "decision"
    [delivery_node] = roots[0].children
    assert delivery_node.span_id == _hex(outer_delivery)
    kinds = sorted((n.record.kind, n.outcome) for n in delivery_node.children)
    assert kinds == [("decision", "allow"), ("decision", "allow"), ("decision", "deny"),
                     ("usage", "usage")]  # fmt: skip
    assert all(n.linked_via for n in delivery_node.children)


async def test_without_an_exporter_ids_still_propagate_to_the_audit_trail(
    settings: Settings, audit_trail: AuditTrail
) -> None:
    # exporter "none" (the default): nothing is recorded, every hop still has ids.
    assert settings.otel_exporter == "none"
    current = settings.model_copy(
        update={"policy_dir": _policy_dir(settings, [("a", "b", ["*"]), ("b", "c", ["*"])])}
    )
    async with Stack(current) as stack:
        assert stack.tracer_provider is telemetry.ID_ONLY
        env = Traced(settings, telemetry.ID_ONLY)
        a, b, c = env.agent("a"), env.agent("b"), env.agent("c")

        @c.capability("leaf")
        async def leaf(req: dict[str, Any]) -> dict[str, Any]:
            return {}

        @b.capability("work")
        async def work(req: dict[str, Any], ctx: CallContext) -> str:
            await b.call("c", "leaf", {})
            return ctx.meta.trace_id

        try:
            for agent in (c, b, a):
                await agent.start()
            trace_id = await a.call("b", "work", {})
            calls = await audit_trail.wait_for(lambda r: r.kind == "call", count=2)
        finally:
            for agent in (a, b, c):
                await agent.stop()
    assert len(trace_id) == 32
    records = [r for r in audit_trail.records if r.kind in ("call", "decision")]
    assert {r.trace_id for r in records} == {trace_id}
    assert all(r.span_id and len(r.span_id) == 16 for r in records)
    outer = next(r for r in calls if r.data["target"] == "b")
    inner_decision = next(r for r in records if r.kind == "decision" and r.actor == "b")
    assert inner_decision.via_span_id == outer.span_id
    [root] = build_tree(records)
    assert [n.span_id for n in root.children] == [outer.span_id]


def test_a_record_chained_before_span_ids_existed_still_verifies() -> None:
    # Exactly what the sequencer stored before the envelope had span ids.
    old = {
        "type": "audit_event.v1", "id": "e-1", "time": 1700000000.25, "kind": "decision",
        "actor": "loan-origination", "subject": "sb.out.loan-origination.credit-check.score",
        "trace_id": "4bf92f3577b34da6a3ce929d0e0e4736", "policy_version": "v1",
        "data": {"call_id": "c-1", "decision": {"effect": "allow"}},
        "seq": 1, "prev_hash": GENESIS, "hash": "",
    }  # fmt: skip
    blank = json.dumps(old, separators=(",", ":")).encode()
    digest = hashlib.sha256(blank).hexdigest()
    stored = blank.replace(b'"hash":""', f'"hash":"{digest}"'.encode())
    record = decode(stored, AuditEvent)
    assert record.span_id is UNSET and not record.parent_span_id and not record.via_span_id
    assert encode(record) == stored  # re-encodes byte for byte
    assert record_hash(record) == digest
    assert verify([(1, record, stored)]).ok
    assert verify([(1, record)]).ok  # the re-encoding path
    tampered = msgspec.structs.replace(record, span_id="00f067aa0ba902b7")
    assert verify([(1, tampered)]).problem is not None


def test_span_ids_are_part_of_the_hash() -> None:
    event = AuditEvent(id="e-2", time=1.0, kind="call", actor="a", span_id="00f067aa0ba902b7")
    placed = chain(event, 1, GENESIS)
    assert b'"span_id":"00f067aa0ba902b7"' in encode(placed)
    assert verify([(1, placed)]).ok
    moved = msgspec.structs.replace(placed, parent_span_id="b7ad6b7169203331")
    assert verify([(1, moved)]).problem is not None
