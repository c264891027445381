"""Authorization requests and decisions behind one small interface.

:class:`Decider` is the seam: the policy service asks it about every
mediated call (:class:`CallRequest`) and every model or tool use an agent
asks about on ``sb.authz.<agent>`` (:class:`UseRequest`), and never cares
how it decides. The engine is Cedar (:class:`services.policy.cedar.decider.CedarDecider`).

A decider never raises for a bad request: it denies, with a reason code
(:data:`REASON_CODES`) saying why. Anything it cannot evaluate is denied
(fail closed).

Mediated calls may carry context in headers (all optional; a caller that
sends none is evaluated with no tags and an *unknown* estimate, see below)::

    Sb-Estimated-Tokens: 12000              # this one invocation, an integer >= 0
    Sb-Data-Tags: pii,pci-dss               # comma-separated
    Sb-On-Behalf-Of: user:ada,support-bot   # comma-separated, outermost first

They are the caller's own claims: policies may use them to refuse or to ask
for approval; granting on a claim is the policy author's risk.

A missing estimate (no header on a call, no ``estimated_tokens`` in an
``sb.authz`` request) is never zero tokens: the context carries
``estimated_tokens_known = False`` and, as ``estimated_tokens``, a stand-in
(:func:`unknown_estimate`): ``SIGNALBOX_DEFAULT_TOKEN_ESTIMATE``, or for a
call whose payload is larger, the payload's size in tokens (one per
:data:`BYTES_PER_TOKEN` bytes). So ``context.estimated_tokens > 10000``
still catches a call that carries 24,000 tokens of text without saying so,
and a policy can single out unknown estimates with
``!context.estimated_tokens_known``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal, Protocol, get_args

from schemas import AgentRecord, Decision

__all__ = [
    "ACTIONS",
    "BYTES_PER_TOKEN",
    "DEFAULT_DENY_ID",
    "H_DATA_TAGS",
    "H_ESTIMATED_TOKENS",
    "H_ON_BEHALF_OF",
    "MAX_ESTIMATED_TOKENS",
    "REASON_CODES",
    "AccessRequest",
    "CallRequest",
    "Decider",
    "ReasonCode",
    "RequestContext",
    "UseRequest",
    "unknown_estimate",
]

#: Actions of the Cedar schema (``Signalbox::Action::"<name>"``).
ACTIONS: Final = ("call", "use_model", "use_tool")

#: Policy id reported when no permit allowed a request (Cedar's implicit deny).
DEFAULT_DENY_ID: Final = "default-deny"

#: Why a decision came out as it did (``Decision.reason_code``).
ReasonCode = Literal[
    "allowed",  # a permit matched, no forbid did
    "needs_approval",  # only @effect("needs_approval") forbids stand in the way
    "forbidden",  # a forbid matched
    "default_deny",  # no permit matched (Cedar's deny by default)
    "unknown_agent",  # the principal is not registered
    "unknown_action",  # not one of ACTIONS
    "missing_entity",  # the resource (target, capability, model, tool) does not exist
    "malformed_context",  # context values out of range or unreadable
    "evaluation_error",  # Cedar reported an error (entities, policy evaluation)
]
REASON_CODES: Final[tuple[str, ...]] = get_args(ReasonCode)

H_ESTIMATED_TOKENS: Final = "Sb-Estimated-Tokens"
H_DATA_TAGS: Final = "Sb-Data-Tags"
H_ON_BEHALF_OF: Final = "Sb-On-Behalf-Of"

#: Largest estimate accepted (a Cedar Long holds far more; nothing real needs it).
MAX_ESTIMATED_TOKENS: Final = 10**12
#: Bytes of payload counted as one token when a call carries no estimate (the usual
#: rule of thumb for English text; JSON and code run a little denser).
BYTES_PER_TOKEN: Final = 4


def unknown_estimate(default: int, payload_bytes: int = 0) -> int:
    """The stand-in for a missing token estimate: ``default``
    (``SIGNALBOX_DEFAULT_TOKEN_ESTIMATE``), or the payload in tokens if that is more."""
    return min(MAX_ESTIMATED_TOKENS, max(default, -(-payload_bytes // BYTES_PER_TOKEN)))


_MAX_TAGS = 64
_MAX_CHAIN = 32
_MAX_TEXT = 256
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


@dataclass(frozen=True, slots=True)
class RequestContext:
    """What Cedar sees as ``context``, besides the time of the decision.

    Attributes:
        estimated_tokens: Tokens this one invocation is expected to use; when
            the request gave none, the stand-in of :func:`unknown_estimate`.
        estimated_tokens_known: False when the request gave no estimate
            (``estimated_tokens`` is then the stand-in, never 0).
        data_tags: Classification tags of the data the request carries.
        on_behalf_of: The delegation chain (agents or users), outermost first.
        time: Unix time of the request; None: the decider's clock.
        error: Set when the context could not be read (a malformed header):
            the request is denied with ``malformed_context``.
    """

    estimated_tokens: int = 0
    data_tags: tuple[str, ...] = ()
    on_behalf_of: tuple[str, ...] = ()
    time: float | None = None
    error: str = ""
    estimated_tokens_known: bool = True

    @classmethod
    def from_headers(cls, headers: Mapping[str, str], *, unknown_tokens: int = 0) -> RequestContext:
        """Read the context headers of a mediated call; never raises (see ``error``).

        Args:
            headers: The call's headers.
            unknown_tokens: ``estimated_tokens`` when there is no
                ``Sb-Estimated-Tokens`` header (:func:`unknown_estimate`);
                ``estimated_tokens_known`` is then False.
        """
        tokens, known = unknown_tokens, False
        raw = headers.get(H_ESTIMATED_TOKENS)
        if raw is not None:
            text = raw.strip()
            if not (text.isascii() and text.isdigit()) or len(text) > 20:
                return cls(
                    error=f"header {H_ESTIMATED_TOKENS} must be an integer from 0 to "
                    f"{MAX_ESTIMATED_TOKENS:,}, got {raw[:32]!r}"
                )
            tokens, known = int(text), True
        return cls(
            estimated_tokens=tokens,
            estimated_tokens_known=known,
            data_tags=_split(headers.get(H_DATA_TAGS, "")),
            on_behalf_of=_split(headers.get(H_ON_BEHALF_OF, "")),
        )

    def audit_fields(self) -> dict[str, Any]:
        """The context as decision records keep it (what a what-if replay re-evaluates)."""
        return {
            "estimated_tokens": self.estimated_tokens,
            "estimated_tokens_known": self.estimated_tokens_known,
            "data_tags": list(self.data_tags),
            "on_behalf_of": list(self.on_behalf_of),
            "error": self.error,
        }

    def problem(self) -> str:
        """Why this context cannot be evaluated ("" when it can)."""
        if self.error:
            return self.error
        tokens = self.estimated_tokens
        if type(tokens) is not int or not 0 <= tokens <= MAX_ESTIMATED_TOKENS:
            return f"estimated tokens must be an integer from 0 to {MAX_ESTIMATED_TOKENS:,}"
        if type(self.estimated_tokens_known) is not bool:
            return "estimated_tokens_known must be true or false"
        for what, values, limit in (
            ("data tags", self.data_tags, _MAX_TAGS),
            ("on-behalf-of chain", self.on_behalf_of, _MAX_CHAIN),
        ):
            if len(values) > limit:
                return f"{what}: at most {limit} entries, got {len(values)}"
            for value in values:
                if not isinstance(value, str) or not 0 < len(value) <= _MAX_TEXT:
                    return f"{what}: every entry must be text of 1-{_MAX_TEXT} characters"
                if _CONTROL.search(value):
                    return f"{what}: entries may not contain control characters"
        if self.time is not None and not 0 <= self.time < 2**62:
            return "time must be a Unix time in seconds"
        return ""


def _split(value: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in value.split(",") if part.strip())


@dataclass(frozen=True, slots=True)
class CallRequest:
    """What a decider sees about one mediated call (action ``call``).

    Attributes:
        caller: Calling agent (from the subject, which NATS permissions bind).
        target: Target agent.
        capability: Capability called.
        caller_record: The caller's registry record (None: not registered).
        target_record: The target's registry record (None: not registered).
        context: Estimated tokens, data tags, on-behalf-of chain.
    """

    caller: str
    target: str
    capability: str
    caller_record: AgentRecord | None
    target_record: AgentRecord | None
    context: RequestContext = RequestContext()

    @property
    def action(self) -> str:
        """Always ``call``."""
        return "call"


@dataclass(frozen=True, slots=True)
class UseRequest:
    """An agent asks whether it may use a model or a tool (``sb.authz.<agent>``).

    Attributes:
        agent: The asking agent (from the subject).
        agent_record: Its registry record (None: not registered).
        action: ``use_model`` or ``use_tool`` (anything else is denied).
        resource: Model or tool id (``gpt-4o``, ``web-search``).
        provider: Model or tool provider.
        region: Region of the endpoint the agent would use.
        price_per_1k_tokens: Model price in USD per 1,000 tokens.
        context: Estimated tokens, data tags, on-behalf-of chain.
    """

    agent: str
    agent_record: AgentRecord | None
    action: str
    resource: str
    provider: str = ""
    region: str = ""
    price_per_1k_tokens: float = 0.0
    context: RequestContext = RequestContext()


#: Everything a decider is asked about.
AccessRequest = CallRequest | UseRequest


class Decider(Protocol):
    """Decides requests. Implementations must be fast (cached), pure, and fail closed."""

    @property
    def version(self) -> str:
        """Version of the active policy set."""
        ...

    def decide(self, request: AccessRequest) -> Decision:
        """Allow, deny or ask for approval; never raise for a bad request, deny instead."""
        ...
