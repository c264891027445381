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

While the block runs, the reservation is kept alive: a background task asks
the cost service to renew it (``sb.cost.renew.<agent>``) as soon as the call
starts, then whenever the answer says (a third of
``SIGNALBOX_BUDGET_RESERVATION_TTL`` after each renewal), up to the
reservation's longest life (``SIGNALBOX_BUDGET_RESERVATION_MAX_LIFETIME``).
So a call longer than the TTL keeps its budget held and nobody else can
reserve that room meanwhile. A renewal that fails (the reservation expired,
the cost service does not answer) logs one WARNING and the call goes on: the
money is being spent either way, and usage no live reservation covers is
charged and flagged as overspend by the cost service when it passes a limit.

One value carries the model use: the :class:`~schemas.AuthzRequest` the call
is authorized with (``ModelCall.request``; its fields are documented there,
and :func:`authz_request` builds it from keywords in one place). The policy
service decides it, the cost service prices its reservation from it, and the
settling usage report takes its model, provider, project and delegation
chain from it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from types import TracebackType
from typing import Any, Protocol

import msgspec
from nats.aio.client import Client

from broker.diagnostics import cancel_and_wait
from broker.errors import (
    BudgetExceeded,
    CallDenied,
    CallTimeout,
    ControlPlaneUnavailable,
    InvalidInput,
    UsageNotRecorded,
)
from broker.ids import new_id
from broker.replies import request
from broker.subjects import Subjects
from schemas import AuthzRequest, Decision, RenewReservation, ReservationRenewed, UsageReport

__all__ = ["ModelCall", "ModelUser", "authz_request"]

log = logging.getLogger(__name__)

#: Shortest pause between two renewals of one reservation (seconds).
_MIN_RENEW_GAP = 0.01
#: Longest pause before retrying a renewal the cost service did not answer (seconds).
_MAX_RETRY_GAP = 5.0


def authz_request(action: str, resource: str, **fields: Any) -> AuthzRequest:
    """The :class:`~schemas.AuthzRequest` of ``action`` on ``resource`` with its other fields
    (``provider=``, ``region=``, ``estimated_tokens=``...: see that class) given as keywords.

    The one place the SDK's keyword conveniences (``Agent.authorize("use_model",
    "gpt-4o", region=...)``, ``Agent.model_call("gpt-4o", ...)``) become the value.

    Raises:
        TypeError: a keyword is not a field of :class:`~schemas.AuthzRequest`.
    """
    for sequence in ("data_tags", "on_behalf_of"):  # any iterable given: a tuple on the value
        if sequence in fields:
            fields[sequence] = tuple(fields[sequence])
    return AuthzRequest(action=action, resource=resource, **fields)


class ModelUser(Protocol):
    """What a :class:`ModelCall` needs of its agent (``broker.Agent`` is one): its name,
    connection and subjects, and its authorization and usage-report calls."""

    @property
    def name(self) -> str:
        """The agent's name."""
        ...

    @property
    def nc(self) -> Client:
        """The agent's NATS connection."""
        ...

    @property
    def subjects(self) -> Subjects:
        """Subject builder of the agent's prefix."""
        ...

    async def authorize(self, request: AuthzRequest, /, *, timeout: float = 2.0) -> Decision:
        """Decide (and reserve the budget of) a model use."""
        ...

    async def report_usage(self, report: UsageReport | None = None, **fields: Any) -> str:
        """Report usage (settling the reservation); returns the report id."""
        ...


class ModelCall:
    """One authorized, budgeted model call (use through :meth:`broker.Agent.model_call`).

    Args:
        agent: The agent making the call.
        request: The model use (``action`` ``use_model``) to authorize.
        timeout: Seconds to wait for the decision, and for each renewal.

    Attributes:
        request: The :class:`~schemas.AuthzRequest` the call is authorized
            with; the settling usage report is derived from it.
        decision: The policy decision (after entry); ``decision.reservation_id``
            and ``decision.reserved_usd`` say what was reserved.
        report_id: Id of the settling usage report (after exit).
        renewal: The cost service's latest answer to a renewal of the
            reservation (None: none yet, or nothing reserved).
    """

    def __init__(self, agent: ModelUser, request: AuthzRequest, *, timeout: float = 5.0) -> None:
        if request.action != "use_model":
            raise InvalidInput(
                f"a model call authorizes use_model, not {request.action!r} "
                "(ask Agent.authorize for other actions)",
                details={"action": request.action, "resource": request.resource},
            )
        self._agent = agent
        self.request = request
        self.timeout = timeout
        self.decision: Decision | None = None
        self.report_id = ""
        #: The usage report sent on exit (resend it if UsageNotRecorded was raised).
        self.report: UsageReport | None = None
        self.input_tokens = 0
        self.output_tokens = 0
        self.cached_tokens = 0
        self.tool_calls = 0
        self.renewal: ReservationRenewed | None = None
        self._started = 0.0
        self._renewer: asyncio.Task[None] | None = None
        self._warned = False

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
        decision = await self._agent.authorize(self.request, timeout=self.timeout)
        self.decision = decision
        if decision.effect != "allow":
            details = msgspec.to_builtins(decision)
            details["model"] = self.request.resource
            del details["trace_id"]  # with_trace() names it, in the message too
            error = BudgetExceeded if decision.reason_code == "budget_exceeded" else CallDenied
            raise error(
                f"{self._agent.name} may not use {self.request.resource} now: "
                + "; ".join(decision.reasons or (decision.reason_code,)),
                details=details,
            ).with_trace(decision.trace_id)
        self._started = time.perf_counter()
        if decision.reservation_id:
            self._renewer = asyncio.ensure_future(self._keep_reserved(decision.reservation_id))
        return self

    async def _keep_reserved(self, reservation_id: str) -> None:
        """Renew the reservation until cancelled (on exit), or until it cannot be renewed.

        The first renewal goes at once: its answer says when the next one is
        due (the agent does not know the cost service's TTL, nor its clock).
        """
        agent = self._agent
        subject = agent.subjects.cost_renew(agent.name)
        ask = RenewReservation(reservation_id=reservation_id)
        gap = 0.0
        interval = 0.0  # the last gap the cost service asked for (0: none yet)
        while True:
            await asyncio.sleep(gap)
            try:
                answer = await request(
                    agent.nc, subject, ask, ReservationRenewed, timeout=self.timeout,
                    hint="no cost service is answering reservation renewals",
                )  # fmt: skip
            except (CallTimeout, ControlPlaneUnavailable) as err:
                # Maybe back soon: try again before the reservation would expire.
                self._warn(f"could not be renewed ({err.message}); retrying")
                gap = min(interval / 2 if interval else 1.0, _MAX_RETRY_GAP)
                continue
            except Exception as err:  # refused (not ours, unreadable): nothing more to do
                self._warn(f"could not be renewed ({getattr(err, 'message', err)})")
                return
            self.renewal = answer
            if answer.state != "open":
                self._warn(
                    f"is {answer.state}: its budget is no longer held while the call runs "
                    "(usage past a limit will be charged as overspend)"
                )
                return
            if answer.capped:
                self._warn(
                    "reached its longest life (SIGNALBOX_BUDGET_RESERVATION_MAX_LIFETIME) and "
                    "will not be renewed again; it expires at "
                    f"{answer.expires_at:.0f} (cost service clock)"
                )
                return
            interval = answer.renew_in
            gap = max(_MIN_RENEW_GAP, answer.renew_in)

    def _warn(self, what: str) -> None:
        """One WARNING per call about its reservation; the call itself goes on."""
        if self._warned:
            return
        self._warned = True
        assert self.decision is not None
        log.warning(
            "%s: the budget reservation %s of its %s call %s",
            self._agent.name,
            self.decision.reservation_id,
            self.request.resource,
            what,
        )

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self.decision is not None
        await cancel_and_wait(self._renewer, f"{self._agent.name}'s reservation renewals")
        self._renewer = None
        report = self._settling_report(self.decision.reservation_id)
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
                "%s: could not report the usage of a failed %s call; its reservation will expire",
                self._agent.name,
                self.request.resource,
                exc_info=True,
            )

    def _settling_report(self, reservation_id: str) -> UsageReport:
        """The usage report of this call: what was recorded, for the model use it was
        authorized as (its model, provider, project and delegation chain)."""
        use = self.request
        return UsageReport(
            id=new_id(),
            agent=self._agent.name,
            time=time.time(),
            model=use.resource,
            provider=use.provider,
            input_tokens=self.input_tokens,
            output_tokens=self.output_tokens,
            cached_tokens=self.cached_tokens,
            tool_calls=self.tool_calls,
            latency_ms=(time.perf_counter() - self._started) * 1000,
            project=use.project,
            on_behalf_of=use.on_behalf_of,
            reservation_id=reservation_id,
        )
