"""Storing an agent's usage reports on the usage stream, retried until stored or given up.

A report goes to ``sb.usage.<agent>`` (JetStream) with its id as the
message id: the stream stores one report per id within its duplicate window
(:data:`~broker.subjects.USAGE_DUPLICATE_WINDOW`), so retrying with the same
id never bills twice. :func:`publish_usage` retries transient failures for a
bounded time, then raises :class:`~broker.errors.UsageNotRecorded` carrying
the report, which the caller can resend as is.
"""

from __future__ import annotations

import nats.errors
import nats.js.errors
from nats.aio.client import Client
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_delay, wait_exponential

from broker.errors import ConfigError, UsageNotRecorded
from broker.subjects import USAGE_DUPLICATE_WINDOW
from schemas import UsageReport

__all__ = ["USAGE_RETRY_FOR", "check_retry_for", "publish_usage"]

#: Default seconds :meth:`Agent.report_usage <broker.agent.Agent.report_usage>` retries one report.
USAGE_RETRY_FOR = 30.0
# Worth another attempt: no answer (yet), nobody answering (a stream leader
# election, a reconnect), the server busy.
_TRANSIENT_PUBLISH = (
    nats.errors.TimeoutError,
    nats.errors.NoRespondersError,
    nats.errors.ConnectionReconnectingError,
    nats.errors.StaleConnectionError,
    nats.js.errors.NoStreamResponseError,
    nats.js.errors.ServiceUnavailableError,
)


def check_retry_for(retry_for: float) -> float:
    """``retry_for`` if a retried report can never be counted twice with it; else ConfigError."""
    if not 0 < retry_for <= USAGE_DUPLICATE_WINDOW / 2:
        raise ConfigError(
            f"usage_retry_for must be between 0 and {USAGE_DUPLICATE_WINDOW / 2:g} s (half the "
            "usage stream's duplicate window, so a retried report is never counted twice)"
        )
    return retry_for


async def publish_usage(
    nc: Client,
    subject: str,
    report: UsageReport,
    data: bytes,
    headers: dict[str, str],
    *,
    retry_for: float,
    agent: str,
) -> None:
    """Store one usage report (``data``, its encoding) on ``subject``, retrying with its id
    (the stream deduplicates) on transient failures for ``retry_for`` seconds.

    Raises:
        UsageNotRecorded: not stored by the deadline, or refused for good;
            it carries the report (resending it, same id, is safe).
    """
    js = nc.jetstream()
    attempts = 0
    reached = False  # an attempt may have been stored even though its ack was lost
    try:
        async for attempt in AsyncRetrying(
            stop=stop_after_delay(retry_for),
            wait=wait_exponential(multiplier=0.05, max=2.0),
            retry=retry_if_exception_type(_TRANSIENT_PUBLISH),
            reraise=True,
        ):
            with attempt:
                attempts += 1
                try:
                    await js.publish(subject, data, timeout=2.0, headers=headers)
                except nats.errors.TimeoutError:
                    reached = True
                    raise
    except Exception as exc:
        raise UsageNotRecorded(
            f"{agent}: usage report {report.id} was not recorded after {attempts} "
            f"attempt(s) ({type(exc).__name__}: {exc or 'no acknowledgement'}); "
            + (
                "it may have been stored: resend the same report (err.report, same id) "
                "within 10 minutes and it is counted once"
                if reached
                else "resend the same report (err.report) once the control plane is back"
            ),
            details={
                "report_id": report.id,
                "attempts": attempts,
                "may_be_recorded": reached,
                "error": type(exc).__name__,
            },
            report=report,
        ) from exc
