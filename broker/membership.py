"""An agent's membership of the fleet: registration, heartbeats, discovery, deregistration.

:class:`Membership` is the registry side of :class:`broker.agent.Agent`
(mixed into it): each method is one request to ``sb.registry.<op>.<agent>``.
What it needs of its agent is :class:`Member`.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Protocol, TypeVar

from nats.aio.client import Client

from broker.errors import NotFound, SignalboxError
from broker.replies import request
from broker.subjects import Subjects
from schemas import (
    AgentManifest,
    AgentRecord,
    DeregisterAgent,
    DiscoverAgents,
    DiscoverResult,
    Heartbeat,
    InstanceStats,
    Registered,
)

__all__ = ["Member", "Membership"]

log = logging.getLogger(__name__)

T = TypeVar("T")


class Member(Protocol):
    """What :class:`Membership` needs of its agent (``broker.Agent`` is one)."""

    manifest: AgentManifest
    subjects: Subjects
    instance_id: str
    heartbeat_interval: float

    @property
    def name(self) -> str:
        """The agent's name."""
        ...

    @property
    def nc(self) -> Client:
        """The agent's NATS connection."""
        ...

    def stats(self) -> InstanceStats:
        """This instance's counters."""
        ...

    def full_manifest(self) -> AgentManifest:
        """The manifest to register."""
        ...

    async def heartbeat(self, timeout: float = 2.0) -> AgentRecord:
        """Send one heartbeat now."""
        ...


async def _ask_registry(member: Member, op: str, body: Any, returns: type[T], timeout: float) -> T:
    return await request(
        member.nc, member.subjects.registry_for(op, member.name), body, returns, timeout=timeout
    )


class Membership:
    """Registration, heartbeats and discovery (the registry side of an agent)."""

    async def register(self: Member, timeout: float = 5.0) -> Registered:
        """Register :meth:`full_manifest` with the registry.

        Raises:
            SignalboxError: the registry refused (invalid manifest, conflict...).
            ControlPlaneUnavailable: no registry is answering.
        """
        return await _ask_registry(self, "register", self.full_manifest(), Registered, timeout)

    async def heartbeat(self: Member, timeout: float = 2.0) -> AgentRecord:
        """Send one heartbeat now; returns the registry's view of this agent.

        Raises:
            NotFound: this version is no longer registered (deregistered or revoked).
        """
        beat = Heartbeat(
            name=self.name,
            version=self.manifest.version,
            instance=self.instance_id,
            stats=self.stats(),
        )
        return await _ask_registry(self, "heartbeat", beat, AgentRecord, timeout)

    async def _heartbeats(self: Member) -> None:
        """Send a heartbeat every ``heartbeat_interval`` seconds, until this version is gone."""
        while True:
            await asyncio.sleep(self.heartbeat_interval)
            try:
                await self.heartbeat()
            except NotFound:
                # Not re-registering on our own: an operator may have revoked us.
                log.error(
                    "%s %s is no longer registered; heartbeats stop. Restart the agent "
                    "to register again (if it was not revoked on purpose)",
                    self.name,
                    self.manifest.version,
                )
                return
            except (SignalboxError, RuntimeError) as exc:
                log.debug("%s: heartbeat failed: %r", self.name, exc)

    async def discover(
        self: Member, query: DiscoverAgents | None = None, **filters: Any
    ) -> DiscoverResult:
        """Ask the registry who offers what (see :class:`schemas.DiscoverAgents`).

        Example:
            ``await agent.discover(capability="score", versions="^1")``
        """
        q = query or DiscoverAgents(**filters)
        return await _ask_registry(self, "discover", q, DiscoverResult, 5.0)

    async def deregister(
        self: Member, *, all_versions: bool = False, timeout: float = 5.0
    ) -> AgentRecord:
        """Remove this agent's version (every version with ``all_versions``) from the registry.

        Heartbeats of a deregistered version are refused (``NotFound``), so
        call it when retiring a version for good, then :meth:`stop`.

        Returns:
            The removed record (the lowest version removed, with ``all_versions``),
            status ``deregistered``.

        Raises:
            NotFound: not registered (any more).
        """
        body = DeregisterAgent(
            name=self.name, version=None if all_versions else self.manifest.version
        )
        return await _ask_registry(self, "deregister", body, AgentRecord, timeout)

    async def leave(self: Member, *, timeout: float = 5.0) -> AgentRecord:
        """Tell the registry this instance is shutting down (the version stays registered).

        Discovery, ``$SRV`` answers and the version's health stop counting
        this instance at once instead of after missed heartbeats.
        :meth:`broker.agent.Agent.stop` calls it with ``leave=True`` (as
        :meth:`~broker.agent.Agent.run_forever` does on SIGTERM).

        Returns:
            The version's record without this instance.

        Raises:
            NotFound: the version is not registered (any more).
        """
        body = DeregisterAgent(
            name=self.name, version=self.manifest.version, instance=self.instance_id
        )
        return await _ask_registry(self, "deregister", body, AgentRecord, timeout)

    async def _rpc(self: Member, subject: str, body: Any, returns: type[T], timeout: float) -> T:
        """One request to the control plane on ``subject``, answered with ``returns``."""
        return await request(self.nc, subject, body, returns, timeout=timeout)
