"""Delegation chains (``Sb-Chain``) the policy service signs, and the traces they vouch for.

The policy service forwards each call with the chain of agents it is made
for, signed for the target in the delivery's trace
(:func:`broker.runtime.identity.sign_chain`). An agent sends that chain back
with what it does while serving the call; :class:`DelegationChains` tells
whether a chain it sends is one this service signed for it, and which trace
context its call or authorization may continue.
"""

from __future__ import annotations

import time

from nats.aio.msg import Msg
from opentelemetry import context as otel_context
from opentelemetry.trace import Span

from broker.replies import H_CHAIN, H_CHAIN_SIG
from broker.runtime.identity import CHAIN_GRACE, chain_key, sign_chain, verify_chain
from broker.settings import Settings
from broker.subjects import Subjects
from broker.telemetry import hex_ids, trusted_parent
from services.policy.stats import PolicyStats

__all__ = ["DelegationChains"]


class DelegationChains:
    """Signs the chains this service forwards and verifies those agents send back.

    Args:
        settings: Settings (the signing key, :func:`broker.runtime.identity.chain_key`).
        subjects: Subjects (who sent a call or authorization).
        stats: The service's counters (``unsigned_chains``, ``moved_traces``).
    """

    def __init__(self, settings: Settings, subjects: Subjects, stats: PolicyStats) -> None:
        self._subjects = subjects
        self._stats = stats
        #: Signs the delegation chains this service forwards (broker.runtime.identity).
        self._key = chain_key(settings)

    def signature(self, target: str, chain: str, timeout: float, span: Span, trace_id: str) -> str:
        """``Sb-Chain-Sig`` of ``chain`` forwarded to ``target`` for ``timeout`` seconds
        ("" without a signing key)."""
        if self._key is None:
            return ""
        # Bound to the delivery's trace: it vouches for the trace too (what the
        # target does while serving this call may continue it).
        return sign_chain(
            self._key, target, chain, time.time() + timeout + CHAIN_GRACE,
            hex_ids(span)[0] or trace_id,
        )  # fmt: skip

    def verified(self, receiver: str, headers: dict[str, str] | None, trace_id: str) -> str:
        """The ``Sb-Chain`` in ``headers`` if this service signed it for ``receiver`` in trace
        ``trace_id``, else "".

        An agent sends back the chain it was given with what it does while
        serving a call; one it made up (or kept past its expiry, or carried
        into another trace) counts as none: it can neither charge another
        agent's budget nor trip another agent's loop breaker by naming it.
        """
        if not headers:
            return ""
        chain = headers.get(H_CHAIN, "")
        if chain and verify_chain(
            self._key, receiver, chain, headers.get(H_CHAIN_SIG, ""), time.time(), trace_id
        ):
            return chain
        if chain:
            self._stats.unsigned_chains += 1
        return ""

    def caller_trace(self, msg: Msg) -> otel_context.Context:
        """The trace context an agent's call or authorization may continue: its own trace,
        or one this service vouched for (a chain signed for it in that trace); any other
        ``traceparent`` it names is moved into a trace it owns (``broker.telemetry``)."""
        sender = self._subjects.sender_of(msg.subject) or ""  # sb.out.<caller>.…, sb.authz.<agent>
        headers = msg.headers
        chain = headers.get(H_CHAIN, "") if headers else ""
        now = time.time()

        def vouched(trace_id: str) -> bool:
            assert headers is not None
            signature = headers.get(H_CHAIN_SIG, "")
            return verify_chain(self._key, sender, chain, signature, now, trace_id)

        context, claimed = trusted_parent(headers, sender, vouched if chain else None)
        if claimed:
            self._stats.moved_traces += 1
        return context
