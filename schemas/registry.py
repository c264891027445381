"""Agent manifests and registry requests."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

from schemas._base import Wire

__all__ = [
    "AgentInstance",
    "AgentList",
    "AgentManifest",
    "AgentRecord",
    "Capability",
    "DeregisterAgent",
    "DiscoverAgents",
    "DiscoverResult",
    "GetAgent",
    "Health",
    "Heartbeat",
    "InstanceStats",
    "ListAgents",
    "Registered",
    "RegistryChange",
]

#: Liveness from heartbeats: ``healthy`` within the heartbeat interval times
#: the stale threshold, ``stale`` until the down threshold, then ``down``.
Health = Literal["healthy", "stale", "down"]

#: A NATS subject token as used for agent and capability names. ``$(?!\n)``
#: because Python's ``$`` also matches before a final newline (a name ending
#: in "\n" would break the NATS protocol line); unlike ``\Z`` it stays a valid
#: JSON Schema (ECMAScript) pattern.
Name = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_-]{1,64}$(?!\n)")]
Version = Annotated[
    str, msgspec.Meta(pattern=r"^[0-9]+\.[0-9]+\.[0-9]+([-+][0-9A-Za-z.-]+)?$(?!\n)")
]
ShortText = Annotated[str, msgspec.Meta(max_length=256)]
LongText = Annotated[str, msgspec.Meta(max_length=4096)]


class Capability(Wire, frozen=True, tag="capability.v1"):
    """One capability an agent serves on ``sb.in.<agent>.<name>``.

    Attributes:
        name: Subject token naming the capability.
        description: What it does, for discovery.
        input_schema: JSON Schema of the request payload (informational).
        output_schema: JSON Schema of the reply payload (informational).
        tags: Data-classification tags such as ``pii`` or ``pci-dss``.
    """

    name: Name
    description: LongText = ""
    input_schema: dict[str, Any] | None = None
    output_schema: dict[str, Any] | None = None
    tags: tuple[ShortText, ...] = ()


class AgentManifest(Wire, frozen=True, tag="agent_manifest.v1"):
    """Everything the control plane knows about one version of an agent."""

    name: Name
    version: Version
    owner: ShortText
    team: ShortText
    description: LongText = ""
    region: ShortText = ""
    project: ShortText = ""
    capabilities: tuple[Capability, ...] = ()
    models: tuple[ShortText, ...] = ()
    tools: tuple[ShortText, ...] = ()
    metadata: dict[str, str] = msgspec.field(default_factory=dict)


class Registered(Wire, frozen=True, tag="registered.v1"):
    """Registry's reply to a successful registration."""

    name: str
    version: str
    registered_at: float
    created: bool


class AgentRecord(Wire, frozen=True, tag="agent_record.v1"):
    """A registered agent version as stored and mirrored in the ``sb_agents`` bucket.

    Attributes:
        manifest: The registered manifest.
        registered_at: Unix time of the (latest) registration.
        status: ``deregistered`` only in the reply to a deregistration.
        last_heartbeat: Unix time of the last heartbeat from any instance.
        health: Computed by the registry when it answers (``down`` in KV copies).
        instances: Instances that sent a heartbeat within the stale threshold.
        established_version: In the ``sb_agents`` KV copy of an agent with several
            registered versions: the first of them registered (still registered),
            which calls with no route and no pin go to, so a new version takes no
            traffic until an operator routes to it (``SIGNALBOX_UNROUTED_VERSIONS``).
            Empty with a single version, and outside the KV copy.
    """

    manifest: AgentManifest
    registered_at: float
    status: Literal["active", "deregistered"] = "active"
    last_heartbeat: float = 0.0
    health: Health = "down"
    instances: int = 0
    established_version: str = ""


class GetAgent(Wire, frozen=True, tag="get_agent.v1"):
    """Ask the registry for one agent (latest version unless ``version`` is set)."""

    name: Name
    version: str | None = None


class DeregisterAgent(Wire, frozen=True, tag="deregister_agent.v1"):
    """Remove an agent version (all versions when ``version`` is None), or one instance.

    Attributes:
        name: The agent.
        version: The version to remove; None removes every version.
        instance: Only this running instance of ``version`` leaves (an agent
            process shutting down: the version stays registered for its
            other instances, and its discovery, ``$SRV`` answers and health
            stop counting this one at once). Needs ``version``.
    """

    name: Name
    version: str | None = None
    instance: str | None = None


class ListAgents(Wire, frozen=True, tag="list_agents.v1"):
    """List registered agents, optionally those offering one capability.

    Attributes:
        capability: Only agents offering it.
        team: Only this team's agents.
        all_versions: Every registered version (name, then highest first), not
            only each agent's highest: what serves traffic during a rollout.
    """

    capability: str | None = None
    team: str | None = None
    all_versions: bool = False


class AgentList(Wire, frozen=True, tag="agent_list.v1"):
    """Reply to :class:`ListAgents`."""

    agents: tuple[AgentRecord, ...]


class InstanceStats(Wire, frozen=True, tag="instance_stats.v1"):
    """Counters of one running agent instance (reported in heartbeats)."""

    started: float = 0.0
    requests: Annotated[int, msgspec.Meta(ge=0)] = 0
    errors: Annotated[int, msgspec.Meta(ge=0)] = 0
    processing_time_ns: Annotated[int, msgspec.Meta(ge=0)] = 0
    last_error: ShortText = ""


class Heartbeat(Wire, frozen=True, tag="heartbeat.v1"):
    """Sent by the SDK every heartbeat interval to ``sb.registry.heartbeat``.

    Attributes:
        name: Agent name.
        version: Agent version.
        instance: Id of the running instance (unique per process).
        stats: Its counters, shown through ``$SRV.STATS``.
    """

    name: Name
    version: Version
    instance: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_-]{1,64}$(?!\n)")]
    stats: InstanceStats = InstanceStats()


class AgentInstance(Wire, frozen=True, tag="agent_instance.v1"):
    """One running instance of an agent version, as the registry knows it."""

    name: str
    version: str
    instance: str
    last_heartbeat: float
    stats: InstanceStats = InstanceStats()


class DiscoverAgents(Wire, frozen=True, tag="discover_agents.v1"):
    """Capability discovery query; every filter is optional and they combine with AND.

    Attributes:
        name: Exact agent name.
        capability: Offers this capability.
        tag: Offers a capability carrying this tag (``pii``, ``pci-dss``...).
        team: Owning team.
        owner: Owner.
        region: Region.
        versions: npm-style semver range (``^1.2``, ``>=1.0.0 <2.0.0``, ``1.x``).
        health: Only agents in this health state.
        all_versions: Every matching version, not only the highest per name.
        limit: Page size (1-1000).
        cursor: ``next_cursor`` of the previous page.
    """

    name: Name | None = None
    capability: Name | None = None
    tag: ShortText | None = None
    team: ShortText | None = None
    owner: ShortText | None = None
    region: ShortText | None = None
    versions: ShortText | None = None
    health: Health | None = None
    all_versions: bool = False
    limit: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 50
    cursor: ShortText = ""


class DiscoverResult(Wire, frozen=True, tag="discover_result.v1"):
    """One page of discovery results, ordered by name then version (highest first)."""

    agents: tuple[AgentRecord, ...]
    total: int
    next_cursor: str = ""


class RegistryChange(Wire, frozen=True, tag="registry_change.v1"):
    """What one registry replica tells the others after it changed the store.

    Published on ``sb.registry.changed`` (core NATS, services only: agents
    may not publish there).

    Attributes:
        origin: Id of the sending replica (a replica ignores its own events).
        seq: The sender's event number, 1, 2, 3...: a gap means events were lost.
        names: Agent names whose versions changed (re-read them from the store).
        beats: Heartbeats the sender has written to the store (latest wins).
        left: Instances that left (shut down cleanly): forget them, whatever
            heartbeat of theirs is held in memory.
    """

    origin: str
    seq: int
    names: tuple[str, ...] = ()
    beats: tuple[AgentInstance, ...] = ()
    left: tuple[AgentInstance, ...] = ()
