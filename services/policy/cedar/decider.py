"""The Cedar decider: the policy service's :class:`~services.policy.decider.Decider`.

:class:`CedarDecider` evaluates requests against the active policy set
(:class:`~services.policy.cedar.policy_set.CedarPolicies`). Entities are
built from registry records and cached
(:class:`~services.policy.cedar.entities.EntityCache`); nothing is parsed
per request except the small context record. Each request is evaluated
against the slice of the set that can apply to it
(:mod:`services.policy.cedar.slicing`). Cedar's answers are memoized too,
keyed by everything they depend on: policy set, action, the records'
identities, resource, and what the slice's policies can observe of the
context (:class:`~services.policy.cedar.slicing.ContextProjection`). So
fleet traffic with distinct estimates and an advancing clock costs a
dictionary lookup per request, and Cedar evaluates the first request of
each kind.

Outcomes (``Decision.reason_code``):

* ``allowed``: a permit matched and no forbid did (policy ids: the permits);
* ``forbidden``: a forbid matched (ids: those forbids);
* ``needs_approval``: the only forbids that matched are annotated
  ``@effect("needs_approval")`` and the set without them allows the request
  (ids: those forbids);
* ``default_deny``: no permit matched (id ``default-deny``: Cedar denies by
  default);
* fail closed, before or instead of Cedar (no policy ids):
  ``unknown_agent``, ``unknown_action``, ``missing_entity``,
  ``malformed_context``, ``evaluation_error`` (including any error Cedar
  reports while evaluating, even when its answer was Allow: a forbid that
  failed to evaluate must not turn into an allow).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cedarpy
import msgspec

from schemas import Decision, Effect
from services.policy.cedar import engine
from services.policy.cedar.entities import (
    ACTION_UIDS,
    EntityCache,
    EntityError,
    entity_uid,
    record_key,
    resource_kind,
    uid_of,
)
from services.policy.cedar.policy_set import CedarPolicies
from services.policy.cedar.slicing import PolicySlice
from services.policy.decider import (
    DEFAULT_DENY_ID,
    AccessRequest,
    CallRequest,
    ReasonCode,
    RequestContext,
    UseRequest,
)

__all__ = ["CedarDecider"]

log = logging.getLogger(__name__)


class CedarDecider:
    """Decides calls and model/tool uses with Cedar (see the module docstring).

    Args:
        policies: The active policy set.
        clock: Unix time of a decision when the request carries none.
        cache_size: Combined entity sets kept (principal/resource pairs).
        memo_size: Cedar answers kept (see the module docstring); 0: none.
    """

    def __init__(
        self,
        policies: CedarPolicies,
        *,
        clock: Callable[[], float] = time.time,
        cache_size: int = 4096,
        memo_size: int = 16384,
    ) -> None:
        self._policies = policies
        self._clock = clock
        self._entities = EntityCache(cache_size)
        self._memo_size = max(0, memo_size)
        self._memo: dict[tuple[Any, ...], Decision] = {}
        #: Requests Cedar evaluated (memo misses), for tests and benches.
        self.evaluations = 0

    @classmethod
    def from_dir(cls, path: Path, *, label: str | None = None) -> CedarDecider:
        """A decider over the set in folder ``path`` (see :meth:`CedarPolicies.from_dir`)."""
        return cls(CedarPolicies.from_dir(path, label=label))

    @property
    def version(self) -> str:
        """Version of the active policy set."""
        return self._policies.version

    @property
    def policies(self) -> CedarPolicies:
        """The active policy set."""
        return self._policies

    @property
    def builds(self) -> int:
        """Entity sets built so far (cache misses), for tests and benches."""
        return self._entities.builds

    def swap(self, policies: CedarPolicies) -> None:
        """Make ``policies`` the active set, at once, for every later decision.

        Cached entities are kept unless the schema changed (they were
        validated against it).
        """
        if policies.schema_text != self._policies.schema_text:
            self._entities.clear()
        self._memo.clear()
        self._policies = policies

    def decide(self, request: AccessRequest) -> Decision:
        """Allow, deny or ask for approval (never raises: anything unexpected denies)."""
        start = time.perf_counter()
        policies = self._policies  # one set for the whole decision, even across a swap
        try:
            if isinstance(request, CallRequest):
                return self._decide_call(policies, request, start)
            return self._decide_use(policies, request, start)
        except Exception as exc:
            log.exception("policy: unexpected error while deciding %r", request)
            return _deny(
                policies,
                start,
                "evaluation_error",
                f"the request could not be evaluated ({type(exc).__name__}: {exc}), "
                "so it is denied",
            )

    # -- per kind of request ---------------------------------------------------------------

    def _decide_call(self, policies: CedarPolicies, call: CallRequest, start: float) -> Decision:
        caller = call.caller_record
        if caller is None or caller.manifest.name != call.caller:
            return _deny(
                policies,
                start,
                "unknown_agent",
                f"caller {call.caller!r} is not registered; register it before it calls",
            )
        target = call.target_record
        if target is None or target.manifest.name != call.target:
            return _deny(
                policies, start, "missing_entity", f"target {call.target!r} is not registered"
            )
        problem = call.context.problem()
        if problem:
            return _deny(policies, start, "malformed_context", f"malformed context: {problem}")
        try:
            target_entities = self._entities.agent(policies.schema, target)
            if call.capability not in target_entities.capabilities:
                return _deny(
                    policies,
                    start,
                    "missing_entity",
                    f"{call.target} has no capability {call.capability!r}",
                )
            context = self._context(call.context)
            cedar_request = {
                "principal": entity_uid("Agent", call.caller),
                "action": ACTION_UIDS["call"],
                "resource": entity_uid("Capability", f"{call.target}/{call.capability}"),
                "context": context,
            }
            applicable = _slice(policies, cedar_request)
            context_key = applicable.context.key(context)
            memo_key = (
                policies,
                "call",
                record_key(caller),
                target_entities.key,
                call.capability,
                context_key,
            )
            known = self._memo.get(memo_key)
            if known is not None:
                return _with_eval_time(known, start)
            entities = self._entities.for_call(policies.schema, caller, target_entities)
        except EntityError as exc:
            return _deny(policies, start, "evaluation_error", str(exc))
        described = f"{call.caller} to call {call.target}.{call.capability}"
        return self._evaluate(
            policies, applicable, memo_key, cedar_request, entities, start, described
        )

    def _decide_use(self, policies: CedarPolicies, use: UseRequest, start: float) -> Decision:
        agent = use.agent_record
        if agent is None or agent.manifest.name != use.agent:
            return _deny(
                policies,
                start,
                "unknown_agent",
                f"agent {use.agent!r} is not registered; register it before it asks",
            )
        if use.action not in ("use_model", "use_tool"):
            return _deny(
                policies,
                start,
                "unknown_action",
                f"unknown action {use.action[:64]!r}; an agent may ask about use_model or use_tool",
            )
        kind = resource_kind(use.action)
        if not use.resource:
            return _deny(policies, start, "missing_entity", f"{use.action} names no {kind.lower()}")
        if not 0 <= use.price_per_1k_tokens <= 1_000_000:
            return _deny(
                policies,
                start,
                "malformed_context",
                "price per 1,000 tokens must be 0-1,000,000 USD",
            )
        problem = use.context.problem()
        if problem:
            return _deny(policies, start, "malformed_context", f"malformed context: {problem}")
        context = self._context(use.context)
        cedar_request = {
            "principal": entity_uid("Agent", use.agent),
            "action": ACTION_UIDS[use.action],
            "resource": entity_uid(kind, use.resource),
            "context": context,
        }
        applicable = _slice(policies, cedar_request)
        resource = (use.resource, use.provider, use.region, use.price_per_1k_tokens)
        memo_key = (
            policies,
            use.action,
            record_key(agent),
            resource,
            applicable.context.key(context),
        )
        known = self._memo.get(memo_key)
        if known is not None:
            return _with_eval_time(known, start)
        try:
            entities = self._entities.for_use(policies.schema, agent, use)
        except EntityError as exc:
            return _deny(policies, start, "evaluation_error", str(exc))
        described = f"{use.agent} to use {kind.lower()} {use.resource}"
        return self._evaluate(
            policies, applicable, memo_key, cedar_request, entities, start, described
        )

    def _evaluate(
        self,
        policies: CedarPolicies,
        applicable: PolicySlice,
        memo_key: tuple[Any, ...],
        cedar_request: dict[str, Any],
        entities: cedarpy.Entities,
        start: float,
        described: str,
    ) -> Decision:
        self.evaluations += 1
        decision = _evaluate(policies, applicable, cedar_request, entities, start, described)
        if self._memo_size and decision.reason_code != "evaluation_error":
            if len(self._memo) >= self._memo_size:
                del self._memo[next(iter(self._memo))]  # the oldest
            self._memo[memo_key] = decision
        return decision

    def _context(self, context: RequestContext) -> dict[str, Any]:
        return {
            "estimated_tokens": context.estimated_tokens,
            "estimated_tokens_known": context.estimated_tokens_known,
            "data_tags": list(context.data_tags),
            "on_behalf_of": list(context.on_behalf_of),
            "time": int(self._clock() if context.time is None else context.time),
        }


def _slice(policies: CedarPolicies, cedar_request: dict[str, Any]) -> PolicySlice:
    return policies.slice(
        uid_of(cedar_request["principal"]),
        uid_of(cedar_request["action"]),
        uid_of(cedar_request["resource"]),
    )


def _with_eval_time(decision: Decision, start: float) -> Decision:
    """A memoized decision with this request's own evaluation time."""
    return msgspec.structs.replace(decision, eval_us=(time.perf_counter() - start) * 1e6)


def _deny(policies: CedarPolicies, start: float, code: ReasonCode, reason: str) -> Decision:
    return Decision(
        effect="deny",
        reasons=(reason,),
        policy_ids=(),
        policy_version=policies.version,
        eval_us=(time.perf_counter() - start) * 1e6,
        reason_code=code,
    )


def _policy_reason(policies: CedarPolicies, verb: str, policy_id: str) -> str:
    """Why a matched policy decided: ``<verb> by policy '<id>': <its description>``."""
    info = policies.policies.get(policy_id)
    described = f": {info.description}" if info is not None and info.description else ""
    return f"{verb} by policy {policy_id!r}{described}"


def _evaluate(
    policies: CedarPolicies,
    applicable: PolicySlice,
    cedar_request: dict[str, Any],
    entities: cedarpy.Entities,
    start: float,
    described: str,
) -> Decision:
    """Ask Cedar, then turn its answer into a Decision (see the module docstring)."""
    if not applicable.ids:  # nothing can permit it: Cedar would deny by default
        return Decision(
            effect="deny",
            reasons=(f"no rule allows {described} (deny by default)",),
            policy_ids=(DEFAULT_DENY_ID,),
            policy_version=policies.version,
            eval_us=(time.perf_counter() - start) * 1e6,
            reason_code="default_deny",
        )
    answer = engine.authorize(cedar_request, applicable.cedar, entities)
    if answer.errors:
        return _deny(policies, start, "evaluation_error", _evaluation_errors_reason(answer.errors))
    matched = tuple(sorted(answer.reasons))  # Cedar lists them in no fixed order
    code: ReasonCode
    effect: Effect
    if answer.allowed:
        code, effect, ids = "allowed", "allow", matched
        reasons = tuple(_policy_reason(policies, "allowed", policy_id) for policy_id in ids)
    elif not matched:
        code, effect, ids = "default_deny", "deny", (DEFAULT_DENY_ID,)
        reasons = (f"no rule allows {described} (deny by default)",)
    elif hard_forbids := tuple(
        policy_id for policy_id in matched if policy_id not in policies.approval_ids
    ):
        code, effect, ids = "forbidden", "deny", hard_forbids
        reasons = tuple(_policy_reason(policies, "forbidden", policy_id) for policy_id in ids)
    else:
        # Only approval forbids matched: would the rest of the set allow it?
        rest = engine.authorize(cedar_request, applicable.without_approvals(), entities)
        if rest.errors:
            return _deny(
                policies, start, "evaluation_error", _evaluation_errors_reason(rest.errors)
            )
        if rest.allowed:
            code, effect, ids = "needs_approval", "needs_approval", matched
            reasons = tuple(
                _policy_reason(policies, "needs human approval, required", policy_id)
                for policy_id in ids
            )
        else:
            code, effect, ids = "default_deny", "deny", (DEFAULT_DENY_ID,)
            reasons = (f"no rule allows {described} (deny by default)",)
    return Decision(
        effect=effect,
        reasons=reasons,
        policy_ids=ids,
        policy_version=policies.version,
        eval_us=(time.perf_counter() - start) * 1e6,
        reason_code=code,
    )


def _evaluation_errors_reason(errors: list[Any]) -> str:
    """The reason of a decision Cedar could not evaluate (its first five errors)."""
    shown = "; ".join(
        error if isinstance(error, str) else json.dumps(error) for error in errors[:5]
    )
    return "Cedar could not evaluate the request, so it is denied: " + shown
