"""Caller-side errors never count against a target's breaker.

A caller must not be able to pause another agent: neither by sending it
payloads it cannot decode (the target answers ``bad_request``), nor by
calling a slow target with deadlines too short for it (``timeout`` under the
caller's own deadline). Genuine failures still trip the breaker: timeouts
under deadlines of at least ``SIGNALBOX_BREAKER_MIN_TIMEOUT`` (or the whole
``SIGNALBOX_CALL_TIMEOUT``, if lower). Real agents on the real server, as in
tests/services/policy/test_breakers.py.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import msgspec
import pytest
from nats.aio.client import Client
from support import eventually, policy_of

from broker import Agent
from broker.connection import connect
from broker.errors import (
    BadRequest,
    CallDenied,
    CallTimeout,
    IdentityMismatch,
    InvalidInput,
    SignalboxError,
)
from broker.runtime.identity import operator_connect_options
from broker.settings import Settings
from broker.subjects import Subjects
from schemas import Breaker, TripBreaker
from services.cli.client import admin_request
from services.policy.guards import TARGET_ERRORS, ErrorRate, Guards
from services.policy.service import PolicyService

if TYPE_CHECKING:
    from support import AgentFactory, StackFactory


SUBJECTS = Subjects("sb")


class Score(msgspec.Struct):
    applicant: str
    income: int


async def slow_pair(make_agent: AgentFactory, seconds: float) -> Agent:
    """``b`` answers ``slow`` after ``seconds``; returns the started caller ``a``."""
    b = make_agent("b")

    @b.capability("slow")
    async def slow(req: dict[str, Any]) -> dict[str, Any]:
        await asyncio.sleep(seconds)
        return req

    a = make_agent("a")
    await b.start()
    await a.start()
    return a


def _closed(policy: PolicyService) -> bool:
    assert policy.breakers is not None
    found = policy.breakers.get("agent.b")
    return found is None or found.state == "closed"


@pytest.fixture
async def operator(settings: Settings) -> AsyncIterator[Client]:
    assert settings.nats_url is not None
    nc = await connect(
        settings.nats_url, name="test-operator", **operator_connect_options(settings)
    )
    yield nc
    await nc.close()


# -- the detector --------------------------------------------------------------------------


def _caller_fault_codes() -> set[str]:
    """Every error code that says the caller (not the target) was at fault."""
    out: set[str] = set()
    todo: list[type[SignalboxError]] = [InvalidInput, BadRequest, IdentityMismatch, CallDenied]
    while todo:
        cls = todo.pop()
        out.add(cls.code)
        todo.extend(cls.__subclasses__())
    return out


def test_no_caller_fault_code_counts_against_a_target() -> None:
    codes = _caller_fault_codes()
    assert {"bad_request", "schema_error", "invalid_input", "payload_too_large",
            "identity_mismatch", "denied", "breaker_open"} <= codes  # fmt: skip
    assert not codes & TARGET_ERRORS
    errors = ErrorRate(threshold=0.1, window=60, min_calls=5)
    for code in codes:
        assert not errors.counts(code, math.inf), code
        assert errors.verdict(code, math.inf) is False, code


def test_a_timeout_counts_only_under_a_deadline_the_target_deserved() -> None:
    guards = Guards(Settings())  # defaults: SIGNALBOX_BREAKER_MIN_TIMEOUT=5, CALL_TIMEOUT=10
    assert guards.errors.min_timeout == 5.0
    assert not guards.errors.counts("outcome_unknown", 1.0)
    assert guards.errors.verdict("outcome_unknown", 1.0) is None  # inconclusive, not a success
    assert guards.errors.counts("outcome_unknown", 5.0)
    assert guards.errors.verdict("outcome_unknown", 5.0)
    assert guards.errors.counts("remote_error", 0.1)  # an answer is an answer at any deadline
    # A caller that allowed the whole SIGNALBOX_CALL_TIMEOUT always counts.
    short = Guards(Settings(call_timeout=2.0))
    assert short.errors.min_timeout == 2.0 and short.errors.counts("outcome_unknown", 2.0)
    assert Guards(Settings(breaker_min_timeout=0.5)).errors.counts("outcome_unknown", 0.5)


# -- end to end ------------------------------------------------------------------------------


@pytest.mark.parametrize("deadline", [0.2, 1.0])
async def test_short_caller_deadlines_to_a_slow_target_never_open_its_breaker(
    deadline: float, make_stack: StackFactory, make_agent: AgentFactory
) -> None:
    policy = policy_of(await make_stack(allow=[("a", "b", ["slow"])], breaker_error_min_calls=6))
    a = await slow_pair(make_agent, seconds=deadline + 1.0)
    results = await asyncio.gather(
        *(a.call("b", "slow", {"i": i}, timeout=deadline) for i in range(30)),
        return_exceptions=True,
    )
    assert all(isinstance(r, CallTimeout) for r in results), results
    await eventually(  # every outcome reached the detector
        lambda: policy.stats.timeouts >= 30,
        "the policy service to count 30 timeouts",
    )
    await asyncio.sleep(0.2)  # a trip would be under way by now (it runs in the background)
    assert _closed(policy)
    assert policy.stats.breaker_trips == 0


async def test_undecodable_payloads_never_open_the_targets_breaker(
    make_stack: StackFactory, make_agent: AgentFactory
) -> None:
    policy = policy_of(await make_stack(allow=[("a", "b", ["score"])], breaker_error_min_calls=6))
    b = make_agent("b")

    @b.capability("score")
    async def score(req: Score) -> int:
        return req.income // 1000

    a = make_agent("a")
    await b.start()
    await a.start()
    garbage = [
        b'{"applicant": "\xff\xfe", "income": 1}',  # invalid UTF-8 in a string
        b'{"applicant": "x", "inco',  # truncated
        b'{"applicant": "x", "income": "lots"}',  # a wrong type
    ]
    results = await asyncio.gather(
        *(a.call("b", "score", garbage[i % 3], timeout=5) for i in range(30)),
        return_exceptions=True,
    )
    assert all(isinstance(r, BadRequest) for r in results), results
    await eventually(lambda: policy.stats.errors >= 30, "the policy service to count 30 errors")
    await asyncio.sleep(0.2)
    assert _closed(policy)
    assert policy.stats.breaker_trips == 0
    assert await a.call("b", "score", Score("x", 70_000)) == 70  # b serves on


@pytest.mark.parametrize(
    "overrides",
    [{"breaker_min_timeout": 0.5}, {"call_timeout": 1.0}],
    ids=["deadline-over-min-timeout", "whole-call-timeout"],
)
async def test_genuine_timeouts_under_long_deadlines_still_trip(
    overrides: dict[str, float], make_stack: StackFactory, make_agent: AgentFactory
) -> None:
    policy = policy_of(
        await make_stack(allow=[("a", "b", ["slow"])], breaker_error_min_calls=6, **overrides)
    )
    a = await slow_pair(make_agent, seconds=3.0)
    results = await asyncio.gather(
        *(a.call("b", "slow", {"i": i}, timeout=1.0) for i in range(8)),
        return_exceptions=True,
    )
    assert all(isinstance(r, CallTimeout) for r in results), results
    await eventually(lambda: not _closed(policy), "b's breaker to trip")
    assert policy.breakers is not None
    tripped = policy.breakers.get("agent.b")
    assert tripped is not None and tripped.reason == "error_rate"
    assert tripped.figures["errors"] >= 6


async def test_a_probe_timed_out_by_its_callers_short_deadline_tests_nothing(
    make_stack: StackFactory, make_agent: AgentFactory, operator: Client
) -> None:
    """The half-open probe is released, not counted as a success: the breaker stays open."""
    policy = policy_of(await make_stack(allow=[("a", "b", ["slow"])]))
    a = await slow_pair(make_agent, seconds=1.0)
    tripped = await admin_request(
        operator, SUBJECTS, "trip", TripBreaker(key="agent.b", text="drill", cooldown=0.3),
        Breaker, service="breakers",
    )  # fmt: skip
    await eventually(lambda: not _closed(policy), "b's breaker to be open")
    assert tripped.until is not None
    await asyncio.sleep(max(0.0, tripped.until - time.time()) + 0.05)
    with pytest.raises(CallTimeout):
        await a.call("b", "slow", {"i": 0}, timeout=0.2)  # the probe
    assert policy.breakers is not None
    await eventually(
        lambda: policy.breakers.get("agent.b").probe is None,  # type: ignore[union-attr]
        "b's probe to be released",
    )
    after = policy.breakers.get("agent.b")
    assert after is not None
    assert (after.state, after.trips) == ("open", 1)  # released: neither closed nor re-opened
