"""Cedar entities built from registry records and requests, and their cache.

An agent's entities are the agent (:func:`agent_entity`) and its
capabilities (:func:`capability_entity`), in Cedar's JSON entity format,
parsed against the policy set's schema. :class:`EntityCache` keeps one
entity set per agent, rebuilt only when that agent's record changes (its
name, version and registration time), and one combined set per
(principal, resource) pair, evicted oldest first: nothing but the small
context record is built per request.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Final

import cedarpy

from schemas import AgentRecord
from services.policy.decider import ACTIONS, UseRequest

__all__ = [
    "ACTION_UIDS",
    "NAMESPACE",
    "AgentEntities",
    "EntityCache",
    "EntityError",
    "RecordKey",
    "Uid",
    "agent_entity",
    "capability_entity",
    "entity_uid",
    "record_key",
    "resource_kind",
    "uid_of",
]

NAMESPACE: Final = "Signalbox"

#: A Cedar entity uid as (type, id), e.g. ("Signalbox::Agent", "loan-origination").
Uid = tuple[str, str]

#: What identifies a registry record's version: (name, version, registered_at).
RecordKey = tuple[str, str, float]


def entity_uid(kind: str, entity_id: str) -> dict[str, str]:
    """The uid of entity ``entity_id`` of type ``Signalbox::<kind>`` (JSON entity format)."""
    return {"type": f"{NAMESPACE}::{kind}", "id": entity_id}


def uid_of(uid: dict[str, str]) -> Uid:
    """A uid in JSON entity format as a :data:`Uid` tuple."""
    return (uid["type"], uid["id"])


#: Each action of the schema's uid (JSON entity format).
ACTION_UIDS: Final = {action: entity_uid("Action", action) for action in ACTIONS}


def resource_kind(action: str) -> str:
    """The entity type of a use request's resource: ``Model`` or ``Tool``."""
    return "Model" if action == "use_model" else "Tool"


def _tags(text: str) -> list[str]:
    return sorted({tag.strip() for tag in text.split(",") if tag.strip()})


def agent_entity(record: AgentRecord) -> dict[str, Any]:
    """The Cedar ``Agent`` entity of a registry record (JSON entity format).

    ``namespace`` and ``tags`` come from the manifest's metadata keys
    ``namespace`` (default ``default``) and ``tags`` (comma-separated).
    The record is the registry's stored one, so team, owner, region,
    namespace and tags are the values an operator bound to the agent
    (:mod:`services.registry.binding`), never what the agent declared.
    """
    manifest = record.manifest
    return {
        "uid": entity_uid("Agent", manifest.name),
        "attrs": {
            "name": manifest.name,
            "version": manifest.version,
            "team": manifest.team,
            "namespace": manifest.metadata.get("namespace", "").strip() or "default",
            "owner": manifest.owner,
            "region": manifest.region,
            "tags": _tags(manifest.metadata.get("tags", "")),
        },
        "parents": [],
    }


def capability_entity(record: AgentRecord, capability: str) -> dict[str, Any]:
    """The Cedar ``Capability`` entity ``"<agent>/<capability>"`` of a registered agent.

    Raises:
        KeyError: the agent has no such capability.
    """
    manifest = record.manifest
    for declared in manifest.capabilities:
        if declared.name == capability:
            return {
                "uid": entity_uid("Capability", f"{manifest.name}/{declared.name}"),
                "attrs": {
                    "name": declared.name,
                    "owner": {"__entity": entity_uid("Agent", manifest.name)},
                    "tags": sorted(set(declared.tags)),
                },
                "parents": [],
            }
    raise KeyError(capability)


def record_key(record: AgentRecord) -> RecordKey:
    """What identifies this version of an agent's record (its entities change with it)."""
    return (record.manifest.name, record.manifest.version, record.registered_at)


@dataclass(frozen=True, slots=True)
class AgentEntities:
    """One agent's cached entities: itself and its capabilities.

    Attributes:
        key: The record they were built from (:func:`record_key`).
        agent_json: The agent's entity alone, as JSON (to combine with others).
        entities: The agent and its capabilities, parsed.
        capabilities: Names of its capabilities.
    """

    key: RecordKey
    agent_json: str
    entities: cedarpy.Entities
    capabilities: frozenset[str]


class EntityError(Exception):
    """Entities could not be built (they do not match the schema)."""


class EntityCache:
    """Entity sets per agent and per (principal, resource) pair, built once (module docstring).

    Entities are validated against the schema they are built with: clear the
    cache when the schema changes.

    Args:
        size: Combined entity sets kept (principal/resource pairs).
    """

    def __init__(self, size: int) -> None:
        self._size = max(1, size)
        self._agents: dict[str, AgentEntities] = {}
        self._combined: dict[tuple[Any, ...], cedarpy.Entities] = {}
        #: Entity sets built so far (cache misses), for tests and benches.
        self.builds = 0

    def clear(self) -> None:
        """Forget every entity set built (counts are kept)."""
        self._agents.clear()
        self._combined.clear()

    def agent(self, schema: cedarpy.Schema, record: AgentRecord) -> AgentEntities:
        """The agent's own entity set, rebuilt only when its record changed.

        Raises:
            EntityError: the record's entities do not match ``schema``.
        """
        key = record_key(record)
        cached = self._agents.get(key[0])
        if cached is not None and cached.key == key:
            return cached
        agent = agent_entity(record)
        capabilities = [
            capability_entity(record, capability.name)
            for capability in record.manifest.capabilities
        ]
        entities = self._parse(
            schema, json.dumps([agent, *capabilities]), None, record.manifest.name
        )
        built = AgentEntities(
            key=key,
            agent_json=json.dumps([agent]),
            entities=entities,
            capabilities=frozenset(capability.name for capability in record.manifest.capabilities),
        )
        self._agents[key[0]] = built
        return built

    def for_call(
        self, schema: cedarpy.Schema, caller: AgentRecord, target: AgentEntities
    ) -> cedarpy.Entities:
        """The entities of ``caller`` calling a capability of ``target``.

        Raises:
            EntityError: the caller's entities do not match ``schema``.
        """
        if caller.manifest.name == target.key[0]:
            return target.entities
        caller_entities = self.agent(schema, caller)
        cache_key = ("call", caller_entities.key, target.key)
        found = self._combined.get(cache_key)
        if found is None:
            found = self._parse(
                schema, caller_entities.agent_json, target.entities, caller.manifest.name
            )
            self._remember(cache_key, found)
        return found

    def for_use(
        self, schema: cedarpy.Schema, agent: AgentRecord, use: UseRequest
    ) -> cedarpy.Entities:
        """The entities of ``agent`` using the model or tool ``use`` names.

        Raises:
            EntityError: the agent's or the resource's entities do not match ``schema``.
        """
        agent_entities = self.agent(schema, agent)
        cache_key = (
            use.action,
            agent_entities.key,
            use.resource,
            use.provider,
            use.region,
            use.price_per_1k_tokens,
        )
        found = self._combined.get(cache_key)
        if found is None:
            attrs: dict[str, Any] = {"provider": use.provider, "region": use.region}
            if use.action == "use_model":
                price = f"{use.price_per_1k_tokens:.4f}"
                attrs["price_per_1k_tokens"] = {"__extn": {"fn": "decimal", "arg": price}}
            resource = {
                "uid": entity_uid(resource_kind(use.action), use.resource),
                "attrs": attrs,
                "parents": [],
            }
            found = self._parse(
                schema, json.dumps([resource]), agent_entities.entities, use.resource
            )
            self._remember(cache_key, found)
        return found

    def _parse(
        self, schema: cedarpy.Schema, text: str, base: cedarpy.Entities | None, owner: str
    ) -> cedarpy.Entities:
        self.builds += 1
        try:
            if base is None:
                return cedarpy.Entities.from_json_str(text, schema)
            return base.with_added_json_str(text, schema)
        except ValueError as exc:
            raise EntityError(
                f"the entities of {owner!r} do not match the policy set's schema ({exc}); "
                "denied until the schema or the registration is fixed"
            ) from exc

    def _remember(self, key: tuple[Any, ...], entities: cedarpy.Entities) -> None:
        if len(self._combined) >= self._size:
            del self._combined[next(iter(self._combined))]  # the oldest
        self._combined[key] = entities
