"""Operator-side requests to the control plane (used by the CLI and the demo)."""

from __future__ import annotations

from typing import Any, TypeVar

import nats.errors
from nats.aio.client import Client

from broker.codec import decode, encode
from broker.errors import CallTimeout, ControlPlaneUnavailable
from broker.replies import error_from_reply, is_error
from broker.subjects import Subjects
from schemas import AgentList, AgentRecord, ListAgents

__all__ = ["list_agents", "registry_request"]

T = TypeVar("T")


async def registry_request(
    nc: Client,
    subjects: Subjects,
    op: str,
    request: Any,
    returns: type[T],
    *,
    timeout: float = 5.0,
) -> T:
    """Send ``request`` to ``sb.registry.<op>`` and decode the reply as ``returns``.

    Raises:
        ControlPlaneUnavailable: no registry service answers.
        CallTimeout: the registry did not answer within ``timeout``.
        SignalboxError: the registry's structured error reply, typed by its code.
    """
    subject = subjects.registry(op)
    try:
        msg = await nc.request(subject, encode(request), timeout=timeout)
    except nats.errors.NoRespondersError as exc:
        raise ControlPlaneUnavailable(
            f"no registry service answers on {subject}; start Signalbox with `signalbox up`",
            details={"subject": subject},
        ) from exc
    except nats.errors.TimeoutError as exc:
        raise CallTimeout(
            f"the registry did not answer on {subject} within {timeout:g}s; "
            "check the services' logs (`signalbox up` output)",
            details={"subject": subject, "timeout": timeout},
        ) from exc
    if is_error(msg.headers):
        raise error_from_reply(msg.data, msg.headers)
    return decode(msg.data, returns)


async def list_agents(
    nc: Client,
    subjects: Subjects,
    *,
    team: str | None = None,
    capability: str | None = None,
    timeout: float = 5.0,
) -> tuple[AgentRecord, ...]:
    """Ask the registry for the registered agents (``sb.registry.list``)."""
    request = ListAgents(team=team or None, capability=capability or None)
    listed = await registry_request(nc, subjects, "list", request, AgentList, timeout=timeout)
    return listed.agents
