"""A target agent answers every payload it cannot decode with ``bad_request``.

A raw nats-py client holding agent ``a``'s credential calls ``b`` through the
policy service with payloads no SDK would send: invalid UTF-8 inside a JSON
string, truncated JSON, 10,000 levels of nesting, wrong types, nothing at
all, a payload just under the size limit. ``b`` (the SDK) must answer each
with ``bad_request`` (never silence, never ``remote_error``), its handler must
never run, and since these are the caller's faults they must not count
against ``b``: its circuit breaker stays closed.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import msgspec
import pytest
from nats.aio.client import Client

from broker import Agent
from broker.codec import decode, encode
from broker.replies import H_ERROR
from broker.runtime.identity import operator_connect_options
from broker.settings import Settings
from schemas import BreakerList, ErrorReply, ListBreakers
from services.runner import Stack

if TYPE_CHECKING:
    from support import AgentFactory, StackFactory

from support import RawAgent, enroll, policy_of

LIMIT = 64 * 1024  # SIGNALBOX_MAX_CALL_BYTES of the stack below


class ScoreRequest(msgspec.Struct):
    applicant_id: str
    income: int


class Score(msgspec.Struct):
    score: int


DEEP = b"[" * 10_000 + b"]" * 10_000
#: Payloads ``score`` (a typed Struct) cannot decode. (Not here: invalid UTF-8 in a key or
#: value the Struct does not declare: msgspec skips unknown fields unread, so the handler
#: gets only the declared, valid fields.)
UNDECODABLE: dict[str, bytes] = {
    "invalid UTF-8 in a string": b'{"applicant_id": "\xff\xfe", "income": 1}',
    "invalid UTF-8, overlong": b'{"applicant_id": "\xc0\xaf", "income": 1}',
    "invalid UTF-8 in a key": b'{"applicant_id\xff": "x", "income": 1}',
    "a lone surrogate": b'{"applicant_id": "\\ud800", "income": 1}',
    "truncated JSON": b'{"applicant_id": "x", "inc',
    "truncated string": b'{"applicant_id": "x',
    "10,000-deep array": DEEP,
    "10,000-deep in a field": b'{"applicant_id": "x", "income": 1, "extra": ' + DEEP + b"}",
    "10,000-deep objects": b'{"a":' * 10_000 + b"1" + b"}" * 10_000,
    "wrong types": b'{"applicant_id": 5, "income": "x"}',
    "a float for an int": b'{"applicant_id": "x", "income": 1.5}',
    "a bool for an int": b'{"applicant_id": "x", "income": true}',
    "a missing field": b'{"applicant_id": "x"}',
    "null": b"null",
    "an array": b'["x", 1]',
    "a string": b'"x"',
    "empty": b"",
    "whitespace": b" \r\n\t",
    "NaN": b'{"applicant_id": "x", "income": NaN}',
    "a BOM": b'\xef\xbb\xbf{"applicant_id": "x", "income": 1}',
    "binary": bytes(range(256)),
    "two documents": b'{"applicant_id": "x", "income": 1}{}',
    "just under the limit": (b'{"applicant_id": "' + b"x" * (LIMIT - 40) + b'", "income": "1"}'),
}
#: Payloads ``anything`` (a dict of any JSON) cannot decode.
UNDECODABLE_DICT: dict[str, bytes] = {
    k: UNDECODABLE[k]
    for k in (
        "invalid UTF-8 in a string", "invalid UTF-8 in a key", "truncated JSON",
        "10,000-deep in a field", "10,000-deep objects", "null", "an array", "empty", "NaN",
        "binary", "two documents",
    )
}  # fmt: skip


@pytest.fixture
async def target(
    make_stack: StackFactory, make_agent: AgentFactory, settings: Settings
) -> AsyncIterator[tuple[Stack, Agent, RawAgent, dict[str, int]]]:
    # Error-rate breaker: 10 calls in a window are enough to judge, half failing trips.
    stack = await make_stack(
        allow=[("a", "b", ["score", "anything"])],
        max_call_bytes=LIMIT,
        breaker_error_min_calls=10,
    )
    runs = {"score": 0, "anything": 0}
    b = make_agent("b", heartbeat_interval=0)

    @b.capability("score")
    async def score(req: ScoreRequest) -> Score:
        runs["score"] += 1
        return Score(score=700 + req.income // 10_000)

    @b.capability("anything")
    async def anything(req: dict[str, Any]) -> dict[str, Any]:
        runs["anything"] += 1
        return {"keys": sorted(req)}

    await b.start()
    await make_agent("a", heartbeat_interval=0).start()  # registered: only then may it call
    raw = RawAgent()
    assert settings.nats_url is not None
    await raw.connect(settings.nats_url, "a", enroll(settings, "a"))
    yield stack, b, raw, runs
    if raw.nc is not None:
        await raw.nc.close()


async def call(nc: Client, capability: str, payload: bytes) -> tuple[str, ErrorReply | bytes]:
    msg = await nc.request(f"sb.out.a.b.{capability}", payload, timeout=5)
    code = (msg.headers or {}).get(H_ERROR, "")
    return code, decode(msg.data, ErrorReply) if code else msg.data


async def test_every_undecodable_payload_gets_bad_request_and_never_reaches_the_handler(
    target: tuple[Stack, Agent, RawAgent, dict[str, int]],
) -> None:
    _, _, raw, runs = target
    assert raw.nc is not None
    for capability, payloads in (("score", UNDECODABLE), ("anything", UNDECODABLE_DICT)):
        for what, payload in payloads.items():
            code, reply = await call(raw.nc, capability, payload)
            assert code == "bad_request", (capability, what, code, reply)
            assert isinstance(reply, ErrorReply) and reply.code == "bad_request"
            assert reply.message.startswith("bad request"), (what, reply.message)
    assert runs == {"score": 0, "anything": 0}
    # Just over the limit: refused by the policy service, never forwarded.
    code, reply = await call(raw.nc, "score", b'{"applicant_id": "' + b"x" * LIMIT + b'"}')
    assert code == "payload_too_large", reply
    # The target still serves well-formed calls.
    ok = encode(ScoreRequest(applicant_id="x", income=50_000))
    assert await call(raw.nc, "score", ok) == ("", encode(Score(score=705)))
    assert runs == {"score": 1, "anything": 0}


async def test_thirty_bad_requests_do_not_open_the_targets_breaker(
    target: tuple[Stack, Agent, RawAgent, dict[str, int]], settings: Settings
) -> None:
    """The caller's faults are not the target's failures: counting them would let any
    agent cut any other off by sending garbage."""
    stack, _, raw, runs = target
    assert raw.nc is not None
    policy = policy_of(stack)
    bad = list(UNDECODABLE.values())
    for i in range(30):
        code, _ = await call(raw.nc, "score", bad[i % len(bad)])
        assert code == "bad_request"
    # Relayed outcomes are judged as they pass; one more (good) call to be sure all
    # thirty were seen, then b must still be callable and its breaker closed.
    ok = encode(ScoreRequest(applicant_id="x", income=0))
    assert await call(raw.nc, "score", ok) == ("", encode(Score(score=700)))
    assert runs["score"] == 1
    assert policy.breakers is not None
    assert policy.breakers.get("agent.b") is None
    assert policy.stats.breaker_trips == 0
    # As `signalbox breakers list --all` shows it.
    operator = RawAgent()
    assert settings.nats_url is not None
    nc = await operator.connect(settings.nats_url, "op", None, **operator_connect_options(settings))
    try:
        reply = await nc.request(
            "sb.admin.breakers.list", encode(ListBreakers(all=True)), timeout=5
        )
        assert decode(reply.data, BreakerList).breakers == ()
    finally:
        await nc.close()
