"""Agent manifests and registry requests."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

from schemas._base import Wire

__all__ = [
    "AgentList",
    "AgentManifest",
    "AgentRecord",
    "Capability",
    "DeregisterAgent",
    "GetAgent",
    "ListAgents",
    "Registered",
]

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
    """A registered agent as stored and mirrored in the ``sb_agents`` bucket."""

    manifest: AgentManifest
    registered_at: float
    status: Literal["active", "deregistered"] = "active"


class GetAgent(Wire, frozen=True, tag="get_agent.v1"):
    """Ask the registry for one agent (latest version unless ``version`` is set)."""

    name: Name
    version: str | None = None


class DeregisterAgent(Wire, frozen=True, tag="deregister_agent.v1"):
    """Remove an agent version (all versions when ``version`` is None)."""

    name: Name
    version: str | None = None


class ListAgents(Wire, frozen=True, tag="list_agents.v1"):
    """List registered agents, optionally those offering one capability."""

    capability: str | None = None
    team: str | None = None


class AgentList(Wire, frozen=True, tag="agent_list.v1"):
    """Reply to :class:`ListAgents`."""

    agents: tuple[AgentRecord, ...]
