"""The agent SDK end to end through the real control plane (policy, registry, tracing)."""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

import msgspec
import pytest

from broker import (
    Agent,
    AuthenticationFailed,
    CallContext,
    CallDenied,
    CallTimeout,
    Conflict,
    ControlPlaneUnavailable,
    InvalidSubjectToken,
    RemoteError,
)
from broker.codec import decode, encode
from broker.replies import H_CALL_ID, H_CALLER, H_DEADLINE
from broker.telemetry import owned_trace_id
from schemas import AgentManifest, AgentRecord, GetAgent

if TYPE_CHECKING:
    from support import AgentFactory, AuditTrail, StackFactory


class Applicant(msgspec.Struct):
    name: str
    income: int


class Score(msgspec.Struct):
    applicant: str
    score: int


class Seen(msgspec.Struct):
    caller: str
    target: str
    capability: str
    call_id: str
    trace_id: str
    deadline: float
    remaining: float
    headers: dict[str, str]


TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def _serve_everything(b: Agent) -> None:
    @b.capability("score", description="Score an applicant.", tags=("pii",))
    async def score(req: Applicant) -> Score:
        return Score(applicant=req.name, score=req.income // 1000)

    @b.capability()
    async def echo_dict(req: dict[str, Any]) -> dict[str, Any]:
        return {"got": req, "keys": sorted(req)}

    @b.capability("reverse")
    async def reverse(data: bytes) -> bytes:
        return data[::-1]

    @b.capability("whoami")
    async def whoami(req: dict[str, Any], ctx: CallContext) -> Seen:
        return Seen(
            caller=ctx.meta.caller,
            target=ctx.meta.target,
            capability=ctx.meta.capability,
            call_id=ctx.meta.call_id,
            trace_id=ctx.meta.trace_id,
            deadline=ctx.meta.deadline,
            remaining=ctx.remaining,
            headers=dict(ctx.headers),
        )


@pytest.fixture
async def pair(make_stack: StackFactory, make_agent: AgentFactory) -> tuple[Agent, Agent]:
    """``a`` may call everything ``b`` serves; both running."""
    await make_stack(allow=[("a", "b", ["*"])])
    b = make_agent("b")
    _serve_everything(b)
    a = make_agent("a")
    await b.start()
    await a.start()
    return a, b


async def test_typed_struct_in_and_out(pair: tuple[Agent, Agent]) -> None:
    a, _ = pair
    result = await a.call("b", "score", Applicant(name="ada", income=72_000), returns=Score)
    assert result == Score(applicant="ada", score=72)


async def test_dict_payloads_decode_as_builtins(pair: tuple[Agent, Agent]) -> None:
    a, _ = pair
    # The handler declares a Struct input; a matching dict is accepted too.
    assert await a.call("b", "score", {"name": "bo", "income": 3000}) == {
        "applicant": "bo",
        "score": 3,
    }
    assert await a.call("b", "echo-dict", {"z": 1, "a": [1, 2]}) == {
        "got": {"z": 1, "a": [1, 2]},
        "keys": ["a", "z"],
    }


async def test_bytes_payloads_travel_untouched(pair: tuple[Agent, Agent]) -> None:
    a, _ = pair
    raw = bytes(range(256))
    assert await a.call("b", "reverse", raw, returns=bytes) == raw[::-1]
    assert await a.call("b", "reverse", b"", returns=bytes) == b""


async def test_handler_context_sees_caller_call_id_and_deadline(
    pair: tuple[Agent, Agent], audit_trail: AuditTrail
) -> None:
    a, _ = pair
    before = time.time()
    seen = await a.call(
        "b", "whoami", {}, returns=Seen, timeout=3.0, headers={"traceparent": TRACEPARENT}
    )
    assert (seen.caller, seen.target, seen.capability) == ("a", "b", "whoami")
    assert len(seen.call_id) == 32
    # The application's trace is the origin of one the caller owns (broker.telemetry).
    owned = owned_trace_id("a", "4bf92f3577b34da6a3ce929d0e0e4736")
    assert seen.trace_id == owned
    assert before < seen.deadline <= time.time() + 3.0
    assert 0 < seen.remaining <= 3.0
    assert seen.headers[H_CALL_ID] == seen.call_id
    assert seen.headers[H_CALLER] == "a"
    assert seen.headers["traceparent"].split("-")[1] == owned
    # The same call id and trace id correlate the decision and call audit records.
    decision, call = await asyncio.gather(
        audit_trail.wait_for(lambda r: r.kind == "decision" and r.data["capability"] == "whoami"),
        audit_trail.wait_for(lambda r: r.kind == "call" and r.data["capability"] == "whoami"),
    )
    assert decision[0].data["call_id"] == seen.call_id == call[0].data["call_id"]
    assert decision[0].trace_id == call[0].trace_id == seen.trace_id


async def test_a_context_without_a_deadline_has_unlimited_time() -> None:
    from schemas import CallMeta

    ctx = CallContext(meta=CallMeta(call_id="c", caller="a", target="b", capability="x"))
    assert ctx.remaining == float("inf")


async def test_one_agent_serves_several_capabilities_concurrently(
    pair: tuple[Agent, Agent],
) -> None:
    a, _ = pair
    results = await asyncio.gather(
        *(a.call("b", "score", Applicant(name=f"p{i}", income=i * 1000), returns=Score)
          for i in range(20)),
        a.call("b", "reverse", b"abc", returns=bytes),
        a.call("b", "echo-dict", {"k": "v"}),
    )  # fmt: skip
    assert [r.score for r in results[:20]] == list(range(20))
    assert results[20] == b"cba"
    assert results[21]["got"] == {"k": "v"}


async def test_registration_publishes_capabilities_with_json_schemas(
    pair: tuple[Agent, Agent],
) -> None:
    a, b = pair
    assert b.registration is not None and b.registration.created
    reply = await a.nc.request(
        a.subjects.registry_for("get", "a"), encode(GetAgent(name="b")), timeout=5
    )
    record = decode(reply.data, AgentRecord)
    caps = {c.name: c for c in record.manifest.capabilities}
    assert set(caps) == {"score", "echo-dict", "reverse", "whoami"}
    assert caps["score"].description == "Score an applicant."
    assert caps["score"].tags == ("pii",)
    assert caps["score"].input_schema == msgspec.json.schema(Applicant)
    assert caps["score"].output_schema == msgspec.json.schema(Score)
    assert caps["reverse"].input_schema is None  # raw bytes: no schema
    assert caps["echo-dict"].input_schema == {"type": "object"}


async def test_restarting_an_agent_re_registers_without_a_new_record(
    make_stack: StackFactory, make_agent: AgentFactory
) -> None:
    await make_stack()
    first = make_agent("same")
    await first.start()
    await first.stop()
    second = make_agent("same")
    await second.start()
    assert first.registration is not None and first.registration.created
    assert second.registration is not None and not second.registration.created


async def test_handler_errors_reach_the_caller_with_their_code(
    make_stack: StackFactory, make_agent: AgentFactory
) -> None:
    await make_stack(allow=[("a", "b", ["*"])])
    b = make_agent("b")

    @b.capability()
    async def explode(req: dict[str, Any]) -> None:
        raise ZeroDivisionError("boom")

    @b.capability()
    async def refuse(req: dict[str, Any]) -> None:
        raise CallDenied("b refuses", details={"why": "policy of b"})

    @b.capability()
    async def clash(req: dict[str, Any]) -> None:
        # An InvalidInput subclass raised by the handler keeps its own code:
        # only decoding the request is the caller's bad_request.
        raise Conflict("already booked", details={"slot": 3})

    @b.capability()
    async def fine(req: dict[str, Any]) -> str:
        return "ok"

    a = make_agent("a")
    await b.start()
    await a.start()
    with pytest.raises(RemoteError) as info:
        await a.call("b", "explode", {})
    assert info.value.details == {"trace_id": info.value.trace_id, "exception": "ZeroDivisionError"}
    assert "boom" in info.value.message
    with pytest.raises(CallDenied) as denied:
        await a.call("b", "refuse", {})
    assert denied.value.details == {"trace_id": denied.value.trace_id, "why": "policy of b"}
    with pytest.raises(Conflict) as conflict:
        await a.call("b", "clash", {})
    assert conflict.value.details == {"trace_id": conflict.value.trace_id, "slot": 3}
    assert await a.call("b", "fine", {}) == "ok"  # the agent keeps serving


async def test_stop_lets_a_running_call_finish(
    make_stack: StackFactory, make_agent: AgentFactory
) -> None:
    await make_stack(allow=[("a", "slow", ["*"])])
    slow = make_agent("slow")
    started, finished = asyncio.Event(), asyncio.Event()

    @slow.capability()
    async def work(req: dict[str, Any]) -> str:
        started.set()
        await asyncio.sleep(0.3)
        finished.set()
        return "done"

    a = make_agent("a")
    await slow.start()
    await a.start()
    call = asyncio.ensure_future(a.call("slow", "work", {}, timeout=10))
    await started.wait()
    assert not finished.is_set()
    await slow.stop()  # drains: returns once the in-flight handler has replied
    assert finished.is_set()
    assert await call == "done"


async def test_stop_cancels_handlers_that_outlive_the_drain_timeout(
    make_stack: StackFactory, make_agent: AgentFactory
) -> None:
    await make_stack(allow=[("a", "stuck", ["*"])])
    stuck = make_agent("stuck")
    started, cancelled = asyncio.Event(), asyncio.Event()

    @stuck.capability()
    async def hang(req: dict[str, Any]) -> str:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return "never"

    a = make_agent("a")
    await stuck.start()
    await a.start()
    call = asyncio.ensure_future(a.call("stuck", "hang", {}, timeout=0.3))
    await started.wait()
    await stuck.stop(drain_timeout=0.05)
    assert cancelled.is_set()
    with pytest.raises(CallTimeout):
        await call


async def test_calls_without_a_policy_service_say_the_control_plane_is_down(
    make_stack: StackFactory, make_agent: AgentFactory
) -> None:
    await make_stack(services=["registry"])
    a = make_agent("a")
    await a.start()
    with pytest.raises(ControlPlaneUnavailable) as info:
        await a.call("b", "x", {})
    assert "signalbox up" in info.value.message


async def test_starting_without_a_registry_fails_and_leaves_no_connection(
    make_stack: StackFactory, make_agent: AgentFactory
) -> None:
    # The registry answers the server's auth callout: without it no agent
    # gets in, and the error says where to look.
    await make_stack(services=["policy"])
    a = make_agent("a")
    with pytest.raises(AuthenticationFailed, match="registry"):
        await a.start()
    with pytest.raises(RuntimeError, match="not started"):
        _ = a.nc


async def test_an_agent_that_is_not_registered_can_still_serve_and_connect(
    make_stack: StackFactory, make_agent: AgentFactory
) -> None:
    await make_stack(services=["registry", "policy"])
    a = make_agent("a", register=False)
    await a.start()
    assert a.registration is None
    assert a.nc.is_connected


def test_agent_names_and_capability_names_must_be_subject_tokens(nats_url: str) -> None:
    with pytest.raises(InvalidSubjectToken):
        Agent(AgentManifest(name="a.b", version="1.0.0", owner="o", team="t"), nats_url=nats_url)
    agent = Agent(AgentManifest(name="a", version="1.0.0", owner="o", team="t"),
                  nats_url=nats_url)  # fmt: skip
    with pytest.raises(InvalidSubjectToken):

        @agent.capability("has.dot")
        async def bad(req: bytes) -> bytes:
            return req


def test_a_handler_must_take_the_payload(nats_url: str) -> None:
    agent = Agent(AgentManifest(name="a", version="1.0.0", owner="o", team="t"),
                  nats_url=nats_url)  # fmt: skip
    with pytest.raises(TypeError, match="must take the input payload"):

        @agent.capability("nothing")
        async def nothing() -> None:
            return None


async def test_calling_a_bad_target_name_fails_before_sending(
    pair: tuple[Agent, Agent],
) -> None:
    a, _ = pair
    with pytest.raises(InvalidSubjectToken):
        await a.call("b.>", "score", {})
    with pytest.raises(InvalidSubjectToken):
        await a.call("b", "*", {})


async def test_using_an_agent_before_start_explains_what_to_do(nats_url: str) -> None:
    agent = Agent(AgentManifest(name="a", version="1.0.0", owner="o", team="t"),
                  nats_url=nats_url)  # fmt: skip
    with pytest.raises(RuntimeError, match="async with agent"):
        await agent.call("b", "x", {})
    await agent.stop()  # stopping an agent that never started is a no-op


async def test_the_manifest_merges_declared_and_served_capabilities(nats_url: str) -> None:
    from schemas import Capability

    manifest = AgentManifest(
        name="m", version="1.0.0", owner="o", team="t",
        capabilities=(Capability(name="declared"), Capability(name="served", description="old")),
    )  # fmt: skip
    agent = Agent(manifest, nats_url=nats_url)

    @agent.capability("served")
    async def served(req: bytes) -> bytes:
        """New description."""
        return req

    caps = {c.name: c for c in agent.full_manifest().capabilities}
    assert set(caps) == {"declared", "served"}
    assert caps["served"].description == "New description."
    assert H_DEADLINE  # header names are public constants
