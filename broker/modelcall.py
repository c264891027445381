"""``Agent.model_call``: authorize, reserve the budget, make the call, settle with actual usage.

::

    async with agent.model_call("gpt-4o", provider="openai", region="eu-west-1",
                                estimated_tokens=1_200, max_output_tokens=800) as call:
        reply = await openai_client.chat.completions.create(...)
        call.record(input_tokens=reply.usage.prompt_tokens,
                    output_tokens=reply.usage.completion_tokens)

On entry the policy service decides the model use (Cedar, breakers) and,
when a budget applies to the agent, the cost service reserves the call's
worst-case cost; a refusal raises before any money is spent
(:class:`~broker.errors.BudgetExceeded` for a budget, otherwise
:class:`~broker.errors.CallDenied`). On exit, whatever happened in the block,
a usage report with what was :meth:`ModelCall.record`-ed settles the
reservation: the worst case is replaced by the actual cost (nothing recorded
releases it). If the report cannot be sent, the reservation expires on its own.
"""

from __future__ import annotations

import logging
import time
from types import TracebackType
from typing import TYPE_CHECKING

import msgspec

from broker.audit import new_id
from broker.errors import BudgetExceeded, CallDenied, UsageNotRecorded
from schemas import Decision, UsageReport

if TYPE_CHECKING:
    from broker.agent import Agent

__all__ = ["ModelCall"]

log = logging.getLogger(__name__)


class ModelCall:
    """One authorized, budgeted model call (use through :meth:`broker.Agent.model_call`).

    Attributes:
        decision: The policy decision (after entry); ``decision.reservation_id``
            and ``decision.reserved_usd`` say what was reserved.
        report_id: Id of the settling usage report (after exit).
    """

    def __init__(
        self,
        agent: Agent,
        model: str,
        *,
        provider: str = "",
        region: str = "",
        estimated_tokens: int | None = None,
        max_output_tokens: int = 0,
        project: str = "",
        data_tags: tuple[str, ...] = (),
        on_behalf_of: tuple[str, ...] = (),
        timeout: float = 5.0,
    ) -> None:
        self._agent = agent
        self.model = model
        self.provider = provider
        self.region = region
        self.estimated_tokens = estimated_tokens
        self.max_output_tokens = max_output_tokens
        self.project = project
        self.data_tags = tuple(data_tags)
        self.on_behalf_of = tuple(on_behalf_of)
        self.timeout = timeout
        self.decision: Decision | None = None
        self.report_id = ""
        #: The usage report sent on exit (resend it if UsageNotRecorded was raised).
        self.report: UsageReport | None = None
        self.input_tokens = 0
        self.output_tokens = 0
        self.cached_tokens = 0
        self.tool_calls = 0
        self._started = 0.0

    def record(
        self,
        *,
        input_tokens: int = 0,
        output_tokens: int = 0,
        cached_tokens: int = 0,
        tool_calls: int = 0,
    ) -> None:
        """Add what the provider reported (call it once per response, e.g. per stream)."""
        self.input_tokens += input_tokens
        self.output_tokens += output_tokens
        self.cached_tokens += cached_tokens
        self.tool_calls += tool_calls

    async def __aenter__(self) -> ModelCall:
        decision = await self._agent.authorize(
            "use_model",
            self.model,
            provider=self.provider,
            region=self.region,
            estimated_tokens=self.estimated_tokens,
            max_output_tokens=self.max_output_tokens,
            project=self.project,
            data_tags=self.data_tags,
            on_behalf_of=self.on_behalf_of,
            timeout=self.timeout,
        )
        self.decision = decision
        if decision.effect != "allow":
            details = msgspec.to_builtins(decision)
            details["model"] = self.model
            error = BudgetExceeded if decision.reason_code == "budget_exceeded" else CallDenied
            raise error(
                f"{self._agent.name} may not use {self.model} now: "
                + "; ".join(decision.reasons or (decision.reason_code,)),
                details=details,
            )
        self._started = time.perf_counter()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self.decision is not None
        report = UsageReport(
            id=new_id(),
            agent=self._agent.name,
            time=time.time(),
            model=self.model,
            provider=self.provider,
            input_tokens=self.input_tokens,
            output_tokens=self.output_tokens,
            cached_tokens=self.cached_tokens,
            tool_calls=self.tool_calls,
            latency_ms=(time.perf_counter() - self._started) * 1000,
            project=self.project,
            on_behalf_of=self.on_behalf_of,
            reservation_id=self.decision.reservation_id,
        )
        self.report = report
        try:
            self.report_id = await self._agent.report_usage(report)
        except Exception as failed:
            if isinstance(failed, UsageNotRecorded) and failed.report is not None:
                self.report = failed.report  # as sent (trace id and version filled in)
            if exc is None:
                # The model call happened and its result is the caller's already:
                # UsageNotRecorded (with the report, retried until the SDK's deadline)
                # says only that its usage still has to be sent.
                raise
            # Never mask the block's own error; the reservation expires unsettled.
            log.warning(
                "%s: could not report the usage of a failed %s call; its reservation "
                "will expire",
                self._agent.name,
                self.model,
                exc_info=True,
            )
