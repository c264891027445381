"""Structured error replies: the one way every service and the SDK say "no".

An error reply is a NATS message whose header ``Sb-Error`` holds the error
code and whose body is an :class:`schemas.ErrorReply` (JSON). Successful
replies never carry ``Sb-Error``, so a raw nats-py client can tell them
apart by looking at one header.
"""

from __future__ import annotations

from typing import Any, TypeVar

import nats.errors
from nats.aio.client import Client

from broker.codec import decode, encode
from broker.errors import (
    CallTimeout,
    ControlPlaneUnavailable,
    OutcomeUnknown,
    SchemaError,
    SignalboxError,
    code_to_error,
)
from schemas import ErrorReply

__all__ = [
    "H_CALLER",
    "H_CALL_ID",
    "H_CAPABILITY",
    "H_CHAIN",
    "H_CHAIN_SIG",
    "H_DEADLINE",
    "H_ERROR",
    "H_IDEMPOTENCY_KEY",
    "H_MSG_ID",
    "H_ROUTE_KEY",
    "H_TARGET",
    "H_TARGET_VERSION",
    "H_TIMEOUT_MS",
    "H_TRACEPARENT",
    "H_TRACE_ORIGIN",
    "error_from_reply",
    "error_reply",
    "is_error",
    "mediated_request",
    "request",
]

T = TypeVar("T")

H_ERROR = "Sb-Error"
H_CALL_ID = "Sb-Call-Id"
H_CALLER = "Sb-Caller"
#: Agents whose handlers led to a call, outermost first (``a,b``): the policy
#: service forwards the incoming chain plus the caller; the SDK sends the chain
#: of the call its handler serves on with every call the handler makes (loop
#: breakers, :mod:`services.policy.guards`). Advisory: an agent could strip it.
H_CHAIN = "Sb-Chain"
#: The policy service's signature of ``Sb-Chain`` for its receiver (``broker.runtime.identity``).
H_CHAIN_SIG = "Sb-Chain-Sig"
H_TARGET = "Sb-Target"
H_CAPABILITY = "Sb-Capability"
H_DEADLINE = "Sb-Deadline"
H_TIMEOUT_MS = "Sb-Timeout-Ms"
H_TRACEPARENT = "traceparent"
#: What a trace the sender starts was derived from (``broker.telemetry.owned_trace_id``):
#: the control plane continues a sender's trace only if it owns it or the policy
#: service vouched for it (a signed chain bound to the trace).
H_TRACE_ORIGIN = "Sb-Trace-Origin"
H_MSG_ID = "Nats-Msg-Id"
#: Key a sticky version route hashes (a customer or conversation id).
H_ROUTE_KEY = "Sb-Route-Key"
#: A caller pinning the target's version.
H_TARGET_VERSION = "Sb-Target-Version"
#: The caller's key for one logical call: retries with the same key run it at most once
#: on a target instance (the SDK deduplicates by caller and key within a window).
H_IDEMPOTENCY_KEY = "Sb-Idempotency-Key"


def error_reply(err: SignalboxError | ErrorReply) -> tuple[bytes, dict[str, str]]:
    """Body and headers of the structured reply for ``err``."""
    reply = (
        err
        if isinstance(err, ErrorReply)
        else ErrorReply(code=err.code, message=err.message, details=err.details)
    )
    return encode(reply), {H_ERROR: reply.code}


def is_error(headers: dict[str, str] | None) -> bool:
    """True if a reply's headers mark it as a structured error."""
    return bool(headers) and H_ERROR in headers  # type: ignore[operator]


def error_from_reply(data: bytes, headers: dict[str, str] | None) -> SignalboxError:
    """Turn a structured error reply back into its typed exception."""
    code = (headers or {}).get(H_ERROR, "remote_error")
    try:
        reply = decode(data, ErrorReply)
    except SchemaError:
        details: dict[str, Any] = {"body": data[:200].decode("utf-8", "replace")}
        return code_to_error(code, f"error reply with an unreadable body (code {code})", details)
    return code_to_error(reply.code, reply.message, reply.details)


async def request(
    nc: Client,
    subject: str,
    body: Any,
    returns: type[T],
    *,
    timeout: float = 5.0,
    hint: str = "is `signalbox up` running?",
    headers: dict[str, str] | None = None,
) -> T:
    """Request-reply to a Signalbox service endpoint, decoding the reply as ``returns``.

    The one way clients (the SDK, the CLI, the demo) talk to service endpoints;
    ``headers`` carry e.g. the W3C trace context.

    Raises:
        ControlPlaneUnavailable: nothing answers on ``subject`` (``hint`` says what to do).
        CallTimeout: no reply within ``timeout`` seconds.
        SignalboxError: the service's structured error reply, typed by its code.
        SchemaError: the reply does not decode as ``returns``.
    """
    try:
        msg = await nc.request(subject, encode(body), timeout=timeout, headers=headers or None)
    except nats.errors.NoRespondersError as exc:
        raise ControlPlaneUnavailable(
            f"nothing answers on {subject}; {hint}", details={"subject": subject}
        ) from exc
    except nats.errors.TimeoutError as exc:
        raise CallTimeout(
            f"no reply on {subject} within {timeout:g}s; check the services' logs",
            details={"subject": subject, "timeout": timeout},
        ) from exc
    if is_error(msg.headers):
        raise error_from_reply(msg.data, msg.headers)
    return decode(msg.data, returns)


async def mediated_request(
    nc: Client,
    subject: str,
    payload: Any,
    returns: Any,
    hdrs: dict[str, str],
    timeout: float,
    *,
    target: str,
    capability: str,
    idempotency_key: str = "",
) -> Any:
    """One mediated call (``Agent.call``): its reply decoded, or the error it means.

    A refusal or failure comes back as an error reply (:func:`error_from_reply`);
    no policy service at all is :class:`ControlPlaneUnavailable` (not run); no
    answer in time is :class:`OutcomeUnknown` (it may have run: only a retry
    with the same idempotency key is safe).
    """
    try:
        msg = await nc.request(subject, encode(payload), timeout=timeout, headers=hdrs)
    except nats.errors.NoRespondersError as exc:
        raise ControlPlaneUnavailable(
            "no policy service is mediating calls; start one with `signalbox up`",
            details={"subject": subject},
        ) from exc
    except nats.errors.TimeoutError as exc:
        # Nothing came back, not even the policy service's time-out: the call
        # may have been forwarded and run. Only a keyed retry is safe.
        details: dict[str, Any] = {
            "target": target, "capability": capability, "timeout": timeout,
        }  # fmt: skip
        retry = "pass idempotency_key= to retry safely"
        if idempotency_key:
            details["idempotency_key"] = idempotency_key
            retry = f"retry with idempotency_key={idempotency_key!r} to run it at most once"
        raise OutcomeUnknown(
            f"{target}.{capability} did not answer within {timeout:g}s; it may have run: {retry}",
            details=details,
        ) from exc
    if is_error(msg.headers):
        raise error_from_reply(msg.data, msg.headers)
    return decode(msg.data, returns)
