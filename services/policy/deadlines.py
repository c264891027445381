"""How long a mediated call may take: the caller's timeout and deadline headers, capped.

Pure functions of a call's headers and the service's ``call_timeout``; the
decision path (:meth:`PolicyService._on_call`), the relay and the approval
desk read them alike.
"""

from __future__ import annotations

import time

from broker.errors import DeadlineExceeded, InvalidInput
from broker.replies import H_DEADLINE, H_TIMEOUT_MS

__all__ = ["allowed_timeout", "remaining_timeout", "requested_timeout"]


def requested_timeout(headers: dict[str, str], call_timeout: float) -> float:
    """Seconds the caller waits (header ``Sb-Timeout-Ms``; default: ``call_timeout``).

    Raises:
        InvalidInput: a malformed or non-positive ``Sb-Timeout-Ms``.
    """
    raw = headers.get(H_TIMEOUT_MS)
    if raw is None:
        return call_timeout
    try:
        value = int(raw) / 1000
    except ValueError:
        raise InvalidInput(
            f"header {H_TIMEOUT_MS} must be an integer number of milliseconds, got {raw!r}",
            details={"header": H_TIMEOUT_MS, "value": raw[:64]},
        ) from None
    if value <= 0:
        raise InvalidInput(
            f"header {H_TIMEOUT_MS} must be positive", details={"header": H_TIMEOUT_MS}
        )
    return value


def remaining_timeout(headers: dict[str, str], call_timeout: float) -> float:
    """Seconds the call may take from now: the caller's timeout, capped by
    ``call_timeout`` and by what is left of the caller's absolute deadline.

    Raises:
        DeadlineExceeded: the caller's deadline (``Sb-Deadline``) has passed: a
            request its client held back and sent late. Refused, never forwarded.
        InvalidInput: a malformed ``Sb-Timeout-Ms`` or ``Sb-Deadline``.
    """
    timeout = min(requested_timeout(headers, call_timeout), call_timeout)
    raw = headers.get(H_DEADLINE)
    if raw is None:
        return timeout
    try:
        left = float(raw) - time.time()
    except ValueError:
        raise InvalidInput(
            f"header {H_DEADLINE} must be Unix seconds, got {raw[:64]!r}",
            details={"header": H_DEADLINE, "value": raw[:64]},
        ) from None
    if not left > 0:  # (NaN included)
        raise DeadlineExceeded(
            f"the call reached the policy service {-left:.3f}s after its deadline "
            "(held back by the caller's connection?); refused, not forwarded",
            details={"deadline": raw[:64], "late_s": round(-left, 3)},
        )
    return min(timeout, left)


def allowed_timeout(headers: dict[str, str], call_timeout: float, fallback: float) -> float:
    """Seconds the caller allowed the call (``Sb-Timeout-Ms``, capped by ``call_timeout``;
    ``fallback`` when the header is malformed)."""
    try:
        return min(requested_timeout(headers, call_timeout), call_timeout)
    except InvalidInput:
        return fallback
