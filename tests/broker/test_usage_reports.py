"""Usage reports are retried with their id and fail only as a typed error that carries them."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import pytest
from support import lending_policy_dir

from broker import SignalboxError, UsageNotRecorded
from broker.errors import ConfigError
from broker.runtime.jetstream import USAGE_STREAM, ensure_streams
from broker.settings import Settings
from schemas import UsageReport

if TYPE_CHECKING:
    from support import AgentFactory, ServiceConnector, StackFactory

pytestmark = pytest.mark.nats


async def _stored_ids(service_nc: ServiceConnector) -> list[str]:
    """Ids of every report in SB_USAGE (read with a maintenance connection)."""
    nc = await service_nc()
    js = nc.jetstream()
    info = await js.stream_info(USAGE_STREAM)
    ids = []
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        msg = await js.get_msg(USAGE_STREAM, seq)
        ids.append((msg.headers or {}).get("Nats-Msg-Id", ""))
    return ids


async def test_a_report_retried_until_the_stream_is_back_is_stored_once(
    make_stack: StackFactory,
    make_agent: AgentFactory,
    service_nc: ServiceConnector,
    settings: Settings,
) -> None:
    await make_stack(services=["tracing", "registry"])
    agent = make_agent("metered", heartbeat_interval=0, usage_retry_for=20.0)
    await agent.start()
    admin = await service_nc()
    await admin.jetstream().delete_stream(USAGE_STREAM)  # nobody stores usage now
    sending = asyncio.ensure_future(agent.report_usage(model="gpt-4o", input_tokens=12))
    await asyncio.sleep(0.3)  # a few attempts fail meanwhile (no stream answers)
    assert not sending.done()
    await ensure_streams(admin.jetstream(), settings)  # the stream is back
    report_id = await asyncio.wait_for(sending, 20)
    assert await _stored_ids(service_nc) == [report_id]
    # Resending the same report (same id) is safe: the stream keeps one.
    again = UsageReport(id=report_id, agent="metered", time=0.0, model="gpt-4o", input_tokens=12)
    assert await agent.report_usage(again) == report_id
    assert await _stored_ids(service_nc) == [report_id]


async def test_a_report_that_cannot_be_stored_raises_a_typed_error_with_the_report(
    make_stack: StackFactory, make_agent: AgentFactory, service_nc: ServiceConnector
) -> None:
    await make_stack(services=["tracing", "registry"])
    agent = make_agent("metered", heartbeat_interval=0, usage_retry_for=1.0)
    await agent.start()
    await (await service_nc()).jetstream().delete_stream(USAGE_STREAM)
    with pytest.raises(UsageNotRecorded) as info:
        await agent.report_usage(model="gpt-4o", input_tokens=7)
    err = info.value
    assert isinstance(err, SignalboxError) and err.code == "usage_not_recorded"
    assert isinstance(err.report, UsageReport) and err.report.input_tokens == 7
    assert err.details["attempts"] > 1  # retried, with the same id
    assert err.details["report_id"] == err.report.id
    assert "resend" in err.message


async def test_a_model_call_whose_usage_cannot_be_stored_says_so_with_its_report(
    make_stack: StackFactory, make_agent: AgentFactory, service_nc: ServiceConnector
) -> None:
    # The lending example allows model use (no budget: no reservation needed).
    await make_stack(services=["tracing", "registry", "policy"], policy_dir=lending_policy_dir())
    agent = make_agent("metered", heartbeat_interval=0, usage_retry_for=1.0)
    await agent.start()
    await (await service_nc()).jetstream().delete_stream(USAGE_STREAM)
    answer = ""
    with pytest.raises(UsageNotRecorded) as info:
        async with agent.model_call("gpt-4o", region="us-east-1", estimated_tokens=10) as call:
            answer = "the model's answer"  # the model call happened
            call.record(input_tokens=10, output_tokens=3)
    assert answer == "the model's answer"
    assert call.report is not None and info.value.report == call.report
    assert (call.report.input_tokens, call.report.output_tokens) == (10, 3)

    class Boom(Exception):
        pass

    with pytest.raises(Boom):  # the block's own error is never masked by the report's
        async with agent.model_call("gpt-4o", region="us-east-1", estimated_tokens=10):
            raise Boom


def test_the_retry_window_stays_inside_the_duplicate_window(make_agent: AgentFactory) -> None:
    with pytest.raises(ConfigError, match="duplicate window"):
        make_agent("metered", usage_retry_for=3600.0)
