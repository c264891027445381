"""Operator-side requests to the control plane (used by the CLI and the demo)."""

from __future__ import annotations

from typing import Any, TypeVar

from nats.aio.client import Client

from broker.replies import request
from broker.subjects import Subjects
from schemas import AgentList, AgentRecord, ListAgents

__all__ = ["admin_request", "list_agents", "operator_of", "registry_request"]

T = TypeVar("T")


def operator_of(nc: Client) -> str:
    """The named operator ``nc`` is connected as (``""``: the bootstrap operator).

    A named operator's credential lets it publish only admin subjects ending
    in its own name (``sb.admin.<service>.<op>.<name>``), including its
    registry reads; :func:`services.cli.common.connect_operator` records the
    name on the connection.
    """
    return str(getattr(nc, "sb_operator", ""))


async def registry_request(
    nc: Client,
    subjects: Subjects,
    op: str,
    body: Any,
    returns: type[T],
    *,
    timeout: float = 5.0,
) -> T:
    """Send ``body`` to ``sb.registry.<op>`` and decode the reply as ``returns``.

    Raises:
        ControlPlaneUnavailable: no registry service answers.
        CallTimeout: the registry did not answer within ``timeout``.
        SignalboxError: the registry's structured error reply, typed by its code.
    """
    operator = operator_of(nc)
    return await request(
        nc,
        subjects.admin("registry", op, operator) if operator else subjects.registry(op),
        body,
        returns,
        timeout=timeout,
        hint="start Signalbox with `signalbox up` (no registry service answers)",
    )


async def admin_request(
    nc: Client,
    subjects: Subjects,
    op: str,
    body: Any,
    returns: type[T],
    *,
    service: str = "registry",
    timeout: float = 5.0,
) -> T:
    """Send ``body`` to the operator-only ``sb.admin.<service>.<op>`` and decode the reply.

    Raises:
        ControlPlaneUnavailable: the service is not running.
        SignalboxError: the service's structured error reply, typed by its code.
    """
    return await request(
        nc,
        subjects.admin(service, op, operator_of(nc)),
        body,
        returns,
        timeout=timeout,
        hint=f"start Signalbox with `signalbox up` (no {service} service answers)",
    )


async def list_agents(
    nc: Client,
    subjects: Subjects,
    *,
    team: str | None = None,
    capability: str | None = None,
    all_versions: bool = False,
    timeout: float = 5.0,
) -> tuple[AgentRecord, ...]:
    """Ask the registry for the registered agents (``sb.registry.list``): each one's highest
    version, or with ``all_versions`` every registered version."""
    request = ListAgents(
        team=team or None, capability=capability or None, all_versions=all_versions
    )
    listed = await registry_request(nc, subjects, "list", request, AgentList, timeout=timeout)
    return listed.agents
