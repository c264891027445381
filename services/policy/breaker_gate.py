"""The policy service's circuit-breaker gate: breakers checked before Cedar, tripped, probed.

Fleet-wide circuit breakers (:mod:`broker.runtime.breakers`; the detectors
that trip them: :mod:`services.policy.guards`) are checked before Cedar on
every call (the caller's, its team's and the target's) and every
``sb.authz`` request (the agent's and its team's); a refusal is
``breaker_open``, audited like a denial. Operators manage them on
``sb.admin.breakers.<op>``::

    list      ListBreakers          -> BreakerList
    trip      TripBreaker           -> Breaker           (audited, kind breaker)
    reset     ResetBreaker          -> Breaker           (audited, kind breaker)
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec
from nats.aio.msg import Msg
from opentelemetry import trace

from broker.errors import InvalidInput, SignalboxError
from broker.ids import new_id
from broker.replies import error_reply
from broker.runtime.breakers import BreakerBoard, breaker_key, breaker_open
from broker.runtime.desk import EndpointSpec, ServiceHost, declare_endpoint
from broker.runtime.jetstream import KV_BREAKERS
from broker.telemetry import fail
from schemas import (
    AgentRecord,
    Breaker,
    BreakerList,
    Decision,
    ListBreakers,
    ResetBreaker,
    TripBreaker,
)
from services.policy.decider import UseRequest
from services.policy.guards import Guards, format_chain, parse_chain
from services.policy.stats import PolicyStats

__all__ = ["NO_GATE", "BreakerGate", "CallGate", "Probes", "RefuseCall", "VerifiedChain"]

log = logging.getLogger(__name__)

#: Half-open breakers a call or use probes, as (breaker key, call or request id).
Probes = tuple[tuple[str, str], ...]

#: Refuses a call before any decision: (error, the call, caller); answers, audits, counts.
RefuseCall = Callable[[SignalboxError, Msg, str], Awaitable[None]]

#: The ``Sb-Chain`` of a call if this service signed it for (receiver, headers, trace id).
VerifiedChain = Callable[[str, dict[str, str] | None, str], str]


@dataclass(frozen=True, slots=True)
class CallGate:
    """A call the breakers let pass: the ``Sb-Chain`` to forward, the probes it makes."""

    chain: str = ""
    probes: Probes = ()


#: A call that passed no gate (an approved one, forwarded later).
NO_GATE = CallGate()


class BreakerGate:
    """Gates calls and uses on the fleet's breakers, trips them, settles probes, serves
    ``sb.admin.breakers.<op>``.

    Args:
        host: The service it lives in (connection, audit, settings, operators).
        guards: The detectors that trip breakers (loops, rates, error rates).
        stats: The service's counters (``breaker_*``, ``authz_denied``).
        policy_version: The version of the policy set being evaluated (for refusals).
        verified_chain: The delegation chain a call carries, if this service signed it.
        refuse_call: Refuses a call whose chain is malformed (answered, audited, counted).
    """

    def __init__(
        self,
        host: ServiceHost,
        guards: Guards,
        stats: PolicyStats,
        *,
        policy_version: Callable[[], str],
        verified_chain: VerifiedChain,
        refuse_call: RefuseCall,
    ) -> None:
        self._host = host
        self.guards = guards
        self._stats = stats
        self._policy_version = policy_version
        self._verified_chain = verified_chain
        self._refuse_invalid = refuse_call
        self._board: BreakerBoard | None = None
        self._tripping: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        """Load and watch the breakers (``sb_breakers``)."""
        host = self._host
        self._board = BreakerBoard(
            await host.js.key_value(KV_BREAKERS), host.audit, host.actor,
            probe_timeout=host.settings.call_timeout + 5.0,
            max_cooldown=host.settings.breaker_cooldown_max, on_change=self._changed,
        )  # fmt: skip
        await self._board.start()

    async def stop(self) -> None:
        """Let breaker transitions in flight finish (bounded), stop watching."""
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=5)
        if self._board is not None:
            await self._board.stop()

    @property
    def board(self) -> BreakerBoard:
        """The fleet's circuit breakers (broker.runtime.breakers) (after start)."""
        assert self._board is not None, "policy service not started"
        return self._board

    def endpoints(self) -> Sequence[EndpointSpec[Any]]:
        """``sb.admin.breakers.<op>``."""
        admin = self._host.subjects.admin
        return (
            declare_endpoint(admin("breakers", "list"), ListBreakers, self.list_breakers),
            declare_endpoint(admin("breakers", "trip"), TripBreaker, self.trip_breaker),
            declare_endpoint(admin("breakers", "reset"), ResetBreaker, self.reset_breaker),
        )

    # -- the gate --------------------------------------------------------------------------

    async def check_call(
        self,
        msg: Msg,
        call_id: str,
        caller: str,
        caller_record: AgentRecord | None,
        target: str,
        trace_id: str,
    ) -> CallGate | None:
        """Before Cedar: feed the detectors, refuse loops, check the caller's, its team's
        and the target's breakers. None: refused (answered, audited, counted)."""
        self._observe_rate(caller)
        raw = self._verified_chain(caller, msg.headers, trace_id)
        chain: tuple[str, ...] = ()
        if raw:
            try:
                chain = parse_chain(raw)
            except InvalidInput as err:
                await self._refuse_invalid(err, msg, caller)
                return None
            loop = self.guards.loop(chain, caller, target)
            if loop is not None:
                tripped = await self.board.trip(
                    breaker_key("agent", loop.agent), "call_loop",
                    f"call chain {' -> '.join(loop.path)} revisits {loop.agent} {loop.visits} "
                    f"times over {loop.depth} hops (limits: {self.guards.max_visits} visits, "
                    f"{self.guards.max_depth} hops)",
                    loop.figures(self.guards.max_depth, self.guards.max_visits),
                    cooldown=self.guards.cooldown,
                )  # fmt: skip
                self._stats.breaker_trips += 1
                await self._refuse_call(msg, call_id, caller, target, trace_id, tripped)
                return None
        forward = format_chain(chain, caller)
        board = self.board
        if not board.any_open():
            return CallGate(chain=forward)
        team = caller_record.manifest.team if caller_record is not None else ""
        blocked = board.check(f"agent.{caller}", f"team.{team}", f"agent.{target}")
        if not blocked:
            return CallGate(chain=forward)
        admitted = await self._admit(blocked, call_id)
        if isinstance(admitted, Breaker):
            await self._refuse_call(msg, call_id, caller, target, trace_id, admitted)
            return None
        return CallGate(chain=forward, probes=admitted)

    async def check_use(self, use: UseRequest, subject: str, trace_id: str) -> Decision | Probes:
        """Before Cedar, for ``sb.authz``: the agent's and its team's breakers.

        Returns the probes this request makes, or the refusal (audited, counted;
        the record names the use refused, as every use decision does, and the breaker).
        """
        agent, record = use.agent, use.agent_record
        self._observe_rate(agent)
        board = self.board
        if not board.any_open():
            return ()
        team = record.manifest.team if record is not None else ""
        blocked = board.check(f"agent.{agent}", f"team.{team}")
        if not blocked:
            return ()
        request_id = new_id()
        admitted = await self._admit(blocked, request_id)
        if not isinstance(admitted, Breaker):
            return admitted
        self._stats.breaker_refused += 1
        self._stats.authz_denied += 1
        err = breaker_open(admitted)
        fail(trace.get_current_span(), err.code, err.message)
        decision = Decision(
            effect="deny", reasons=(err.message,), reason_code="breaker_open",
            policy_version=self._policy_version(), breaker=admitted,
        )  # fmt: skip
        await self._host.audit.emit(
            "decision", actor=agent, subject=subject, trace_id=trace_id,
            policy_version=decision.policy_version,
            data={"request_id": request_id, "agent": agent, "action": use.action,
                  "resource": use.resource, "provider": use.provider, "region": use.region,
                  "decision": msgspec.to_builtins(decision),
                  "breaker": msgspec.to_builtins(admitted)},
        )  # fmt: skip
        return decision

    async def _admit(self, blocked: tuple[Breaker, ...], call_id: str) -> Breaker | Probes:
        """Whether a call held up by ``blocked`` may pass as their probe.

        Returns the probes claimed (compare-and-set: one call fleet-wide per
        breaker), or the breaker that refuses the call (claims already made
        are released). A rate-anomaly probe is judged at once: the breaker
        closes if the agent's rate is back to normal, else re-opens.
        """
        board = self.board
        probes: list[tuple[str, str]] = []
        refusal: Breaker | None = None
        for breaker in blocked:
            if not board.probe_due(breaker):
                refusal = breaker
                break
            claimed = await board.claim(breaker.key, call_id)
            if claimed is None:  # another call (here or on another replica) probes it
                refusal = board.get(breaker.key) or breaker
                break
            self._stats.breaker_probes += 1
            if claimed.reason == "rate_anomaly" and claimed.scope == "agent":
                figures = self.guards.rate.anomalous(claimed.name)
                settled = await board.settle(claimed.key, call_id, figures is None, figures=figures)
                if figures is not None:
                    refusal = settled or claimed
                    break
                continue
            probes.append((breaker.key, call_id))
        if refusal is None:
            return tuple(probes)
        if probes:
            self.settle_probes([(key, cid, None) for key, cid in probes])
        return refusal

    async def _refuse_call(
        self, msg: Msg, call_id: str, caller: str, target: str, trace_id: str, breaker: Breaker
    ) -> None:
        """Answer ``BreakerOpen``; audit it like a denial (reason ``breaker_open``)."""
        self._stats.breaker_refused += 1
        err = breaker_open(breaker)
        fail(trace.get_current_span(), err.code, err.message)
        capability = msg.subject.rsplit(".", 1)[1]
        version = self._policy_version()
        await self._host.audit.emit(
            "decision", actor=caller, subject=msg.subject, trace_id=trace_id,
            policy_version=version,
            data={
                "call_id": call_id, "caller": caller, "target": target,
                "capability": capability,
                "decision": {"effect": "deny", "reason_code": "breaker_open",
                             "reasons": [err.message], "policy_ids": [],
                             "policy_version": version},
                "breaker": msgspec.to_builtins(breaker),
            },
        )  # fmt: skip
        body, headers = error_reply(err)
        await self._host.nc.publish(msg.reply, body, headers=headers)

    # -- detectors and probes ---------------------------------------------------------------

    def _observe_rate(self, agent: str) -> None:
        """Count one call or authorization of ``agent``; trip its breaker on an anomaly."""
        figures = self.guards.rate.observe(agent)
        if figures is not None:
            self._auto_trip(
                f"agent.{agent}", "rate_anomaly",
                f"{agent} made {figures['rate']:g} calls/s over {figures['window_s']:g}s, "
                f"{figures['ratio']:g}x its baseline of {figures['baseline']:g} calls/s "
                f"(trips at {figures['factor']:g}x)",
                figures,
            )  # fmt: skip

    def record_outcome(self, target: str, error_code: str, timeout: float, probes: Probes) -> None:
        """Feed a relayed outcome to the error-rate detector; settle the probes it made.

        ``timeout`` is what the caller allowed the call (the fairness rule of
        :mod:`services.policy.guards`).
        """
        figures = self.guards.errors.observe(target, error_code, timeout)
        if figures is not None:
            self.guards.errors.forget(target)
            self._auto_trip(
                f"agent.{target}", "error_rate",
                f"{figures['errors']:g} of {figures['calls']:g} calls to {target} failed on "
                f"its side in {figures['window_s']:g}s ({figures['error_rate']:.0%}, trips "
                f"above {figures['threshold']:.0%})",
                figures,
            )  # fmt: skip
        if probes:
            failed = self.guards.errors.verdict(error_code, timeout)
            target_ok = None if failed is None else not failed
            target_key = f"agent.{target}"
            # The target's breaker is judged by the reply (a timeout under the caller's own
            # short deadline tested nothing: released); the caller's (manual, loop, budget)
            # by the call having gone through at all.
            self.settle_probes(
                [(k, cid, target_ok if k == target_key else True) for k, cid in probes]
            )

    def _auto_trip(self, key: str, reason: Any, text: str, figures: dict[str, float]) -> None:
        """Trip ``key`` in the background (once, if it is not already open)."""
        if key in self._tripping or self.board.check(key):
            return
        self._tripping.add(key)
        self._background(self._trip(key, reason, text, figures))

    async def _trip(self, key: str, reason: Any, text: str, figures: dict[str, float]) -> None:
        try:
            await self.board.trip(key, reason, text, figures, cooldown=self.guards.cooldown)
            self._stats.breaker_trips += 1
        finally:
            self._tripping.discard(key)

    def settle_probes(self, items: list[tuple[str, str, bool | None]]) -> None:
        """Settle probes ``(key, call id, ok)`` in the background (``ok`` None: the
        probe tested nothing, the next call may probe)."""

        async def run() -> None:
            for key, call_id, ok in items:
                await self.board.settle(key, call_id, ok)

        self._background(run())

    def release_probes(self, probes: Probes) -> None:
        """Release ``probes`` unjudged (the call was not forwarded: it tested nothing)."""
        self.settle_probes([(key, cid, None) for key, cid in probes])

    def _background(self, coro: Awaitable[None]) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("policy: breaker transition failed: %r", task.exception())

    def _changed(self, old: Breaker | None, new: Breaker | None) -> None:
        """A breaker closed (on any replica): its detectors start afresh."""
        closed = new is not None and new.state == "closed" and new.scope == "agent"
        if closed and new is not None and (old is None or old.state != "closed"):
            self.guards.rate.forget(new.name)
            self.guards.errors.forget(new.name)

    # -- operators -----------------------------------------------------------------------

    async def list_breakers(self, request: ListBreakers) -> BreakerList:
        """``breakers.list``: the breakers that are not closed (``all``: every one)."""
        return BreakerList(breakers=tuple(self.board.breakers(include_closed=request.all)))

    async def trip_breaker(self, request: TripBreaker) -> Breaker:
        """``breakers.trip``: open a breaker by hand (reason ``manual``; audited)."""
        return await self.board.trip(
            request.key, "manual", request.text, cooldown=request.cooldown,
            by=self._host.operator(request.requested_by),
        )  # fmt: skip

    async def reset_breaker(self, request: ResetBreaker) -> Breaker:
        """``breakers.reset``: close a breaker, whatever tripped it (audited)."""
        return await self.board.reset(
            request.key, by=self._host.operator(request.requested_by), text=request.text
        )
