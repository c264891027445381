"""One value carries a model use: the AuthzRequest is what is authorized, and what the usage
report is derived from, whichever way the SDK was given it (the request, or its fields)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytest
from nats.aio.client import Client
from support import lending_policy_dir

from broker import Agent, InvalidInput
from broker.modelcall import ModelCall, authz_request
from broker.subjects import Subjects
from schemas import AgentManifest, AuthzRequest, Decision, UsageReport

if TYPE_CHECKING:
    from support import AgentFactory, StackFactory

USE = AuthzRequest(
    action="use_model", resource="gpt-4o", provider="openai", region="eu-west-1",
    estimated_tokens=1_200, max_output_tokens=800, project="onboarding",
    data_tags=("pii",), on_behalf_of=("portal", "alice"),
)  # fmt: skip


class FakeAgent:
    """A ModelUser that records what it was asked, and allows everything (no budget)."""

    def __init__(self) -> None:
        self.asked: list[tuple[AuthzRequest, float]] = []
        self.reports: list[UsageReport] = []

    @property
    def name(self) -> str:
        return "fake"

    @property
    def nc(self) -> Client:
        raise AssertionError("nothing reserved: no renewal goes out")

    @property
    def subjects(self) -> Subjects:
        return Subjects("sb")

    async def authorize(self, request: AuthzRequest, /, *, timeout: float = 2.0) -> Decision:
        self.asked.append((request, timeout))
        return Decision(effect="allow", reason_code="allowed")

    async def report_usage(self, report: UsageReport | None = None, **fields: Any) -> str:
        assert report is not None
        self.reports.append(report)
        return report.id


def test_keywords_build_the_same_value_as_the_request() -> None:
    built = authz_request(
        "use_model", "gpt-4o", provider="openai", region="eu-west-1", estimated_tokens=1_200,
        max_output_tokens=800, project="onboarding", data_tags=["pii"],
        on_behalf_of=iter(["portal", "alice"]),
    )  # fmt: skip
    assert built == USE  # any iterable given for a sequence field becomes a tuple
    assert authz_request("use_tool", "web-search") == AuthzRequest(
        action="use_tool", resource="web-search"
    )
    with pytest.raises(TypeError, match="estimate_tokens"):
        authz_request("use_model", "gpt-4o", estimate_tokens=10)  # a typo is not dropped


async def test_the_model_call_authorizes_its_request_and_reports_usage_derived_from_it() -> None:
    agent = FakeAgent()
    async with ModelCall(agent, USE, timeout=3.0) as call:
        call.record(input_tokens=900, output_tokens=120, cached_tokens=100)
        call.record(output_tokens=30, tool_calls=1)
    assert agent.asked == [(USE, 3.0)]  # the very value, not a copy rebuilt from attributes
    assert call.request is USE
    [report] = agent.reports
    assert report is call.report and report.id == call.report_id
    assert (report.agent, report.model, report.provider, report.project, report.on_behalf_of) == (
        "fake", "gpt-4o", "openai", "onboarding", ("portal", "alice"),
    )  # fmt: skip
    assert (report.input_tokens, report.output_tokens, report.cached_tokens) == (900, 150, 100)
    assert report.tool_calls == 1 and report.latency_ms >= 0 and report.reservation_id == ""


def test_a_model_call_is_a_use_model_request_only() -> None:
    tool = AuthzRequest(action="use_tool", resource="web-search")
    with pytest.raises(InvalidInput, match="use_tool"):
        ModelCall(FakeAgent(), tool)


def test_the_agent_builds_a_model_call_from_keywords_or_takes_the_request() -> None:
    manifest = AgentManifest(name="onboarding", version="1.0.0", owner="o", team="t")
    agent = Agent(manifest, nats_url="nats://127.0.0.1:4222")  # not started: nothing is sent
    by_keywords = agent.model_call(
        "gpt-4o", provider="openai", region="eu-west-1", estimated_tokens=1_200,
        max_output_tokens=800, project="onboarding", data_tags=("pii",),
        on_behalf_of=("portal", "alice"), timeout=4.0,
    )  # fmt: skip
    assert by_keywords.request == USE and by_keywords.timeout == 4.0
    assert agent.model_call(USE).request is USE
    with pytest.raises(TypeError, match="not both"):
        agent.model_call(USE, region="us-east-1")
    with pytest.raises(TypeError):
        agent.model_call("gpt-4o", estimate_tokens=10)
    with pytest.raises(InvalidInput):
        agent.model_call(AuthzRequest(action="use_tool", resource="web-search"))


@pytest.mark.nats
async def test_authorize_decides_the_request_or_its_keywords_alike(
    make_stack: StackFactory, make_agent: AgentFactory
) -> None:
    # The lending example allows model use by a plain agent; unknown actions are denied.
    await make_stack(services=["tracing", "registry", "policy"], policy_dir=lending_policy_dir())
    agent = make_agent("asker", heartbeat_interval=0)
    await agent.start()
    ask = AuthzRequest(action="use_model", resource="gpt-4o", region="us-east-1",
                       estimated_tokens=10)  # fmt: skip
    given = await agent.authorize(ask, timeout=5)
    built = await agent.authorize("use_model", "gpt-4o", region="us-east-1",
                                  estimated_tokens=10, timeout=5)  # fmt: skip
    assert given.effect == built.effect == "allow"
    assert given.policy_ids == built.policy_ids and given.reason_code == built.reason_code
    with pytest.raises(TypeError, match="not both"):
        await agent.authorize(ask, region="eu-west-1")  # type: ignore[call-overload]
    odd = await agent.authorize(AuthzRequest(action="use_gpu", resource="h100"), timeout=5)
    assert (odd.effect, odd.reason_code) == ("deny", "unknown_action")
