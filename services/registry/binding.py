"""Governance attributes bound to agents by operators, and applied to their manifests.

An agent's team, owner, namespace, region, projects and principal tags
decide which policies apply to it, which budgets its usage charges and
which breakers stop it, so the agent must not choose them. An operator
binds them at enrollment (``signalbox agents enroll NAME --team T ...``)
and changes them with ``signalbox agents bind`` (:class:`~schemas.BindAgent`);
the registry stores every registered manifest of the agent with the bound
values:

=====================  ====================================================
manifest field         bound value
=====================  ====================================================
``team``               ``team``
``owner``              ``owner``
``region``             ``region``
``project``            the declared project if bound, else the first bound one
``metadata.namespace`` ``namespace`` (absent when empty: Cedar's ``default``)
``metadata.tags``      ``tags``, comma-joined (Cedar ``principal.tags``)
``metadata.projects``  ``projects``, comma-joined (cost attribution)
=====================  ====================================================

A manifest that declares another non-empty value is refused
(:class:`~broker.errors.AttributeMismatch`); empty fields are filled in.
Capabilities and their data tags stay the agent's to declare.

Pure functions; the stores and the registry service call them. The cost
service reads the bound projects back with :func:`services.cost.service.bound_projects`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Final

import msgspec

from broker.errors import AttributeMismatch
from schemas import BINDING_FIELDS, AgentBinding, AgentManifest, BindAgent, EnrollAgent

__all__ = [
    "BOUND_METADATA",
    "apply_binding",
    "binding_changes",
    "binding_from_manifest",
    "changed_fields",
    "impose_binding",
    "split_values",
    "updated_binding",
]

#: Manifest metadata keys that carry bound attributes (never the agent's to set).
BOUND_METADATA: Final = ("namespace", "tags", "projects")

#: The CLI flag that sets each attribute (named in error messages).
_FLAGS: Final = {
    "team": "--team",
    "owner": "--owner",
    "namespace": "--namespace",
    "region": "--region",
    "project": "--project",
    "projects": "--project",
    "tags": "--tag",
}


def split_values(text: str) -> tuple[str, ...]:
    """The values of a comma-separated metadata entry, stripped, empty ones dropped, once each."""
    return tuple(dict.fromkeys(v.strip() for v in text.split(",") if v.strip()))


def _unique(values: Iterable[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(v.strip() for v in values if v.strip()))


def binding_changes(request: EnrollAgent | BindAgent) -> dict[str, Any]:
    """The attributes a request sets (those not ``None``), normalized."""
    changes: dict[str, Any] = {}
    for field in BINDING_FIELDS:
        value = getattr(request, field)
        if value is None:
            continue
        changes[field] = _unique(value) if isinstance(value, tuple) else value.strip()
    return changes


def updated_binding(
    binding: AgentBinding | None,
    agent: str,
    changes: Mapping[str, Any],
    *,
    by: str,
    now: float,
) -> AgentBinding:
    """``binding`` (or an empty one for ``agent``) with ``changes`` applied, stamped."""
    base = binding if binding is not None else AgentBinding(agent=agent)
    return msgspec.structs.replace(base, **changes, bound_at=now, bound_by=by)


def changed_fields(before: AgentBinding | None, after: AgentBinding) -> tuple[str, ...]:
    """The attributes whose value differs between two bindings (all set ones if no ``before``)."""
    old = before if before is not None else AgentBinding(agent=after.agent)
    return tuple(f for f in BINDING_FIELDS if getattr(old, f) != getattr(after, f))


def binding_from_manifest(manifest: AgentManifest, *, by: str, now: float) -> AgentBinding:
    """The binding a manifest registered before bindings existed implies (legacy agents)."""
    meta = manifest.metadata
    projects = split_values(meta.get("projects", ""))
    if manifest.project and manifest.project not in projects:
        projects = (manifest.project, *projects)
    return AgentBinding(
        agent=manifest.name,
        team=manifest.team,
        owner=manifest.owner,
        namespace=meta.get("namespace", "").strip(),
        region=manifest.region,
        projects=projects,
        tags=split_values(meta.get("tags", "")),
        bound_at=now,
        bound_by=by,
    )


def _shown(value: Any) -> str:
    if isinstance(value, tuple):
        return ", ".join(value) if value else "(none)"
    return repr(value) if value else "(none)"


def _mismatch(manifest: AgentManifest, field: str, path: str, declared: Any, bound: Any) -> None:
    flag = _FLAGS[field]
    if isinstance(declared, tuple):
        fix = " ".join(f"{flag} {v}" for v in declared) if declared else f"{flag} ..."
    else:
        fix = f"{flag} {declared}"
    raise AttributeMismatch(
        f"{manifest.name} declares {field} {_shown(declared)}, but its bound {field} is "
        f"{_shown(bound)}: team, owner, namespace, region, projects and tags are bound by "
        f"an operator, not declared by the agent. Leave {field} out of the manifest, or "
        f"have an operator change the binding: `signalbox agents bind {manifest.name} {fix}`",
        details={
            "agent": manifest.name,
            "field": field,
            "path": path,
            "declared": list(declared) if isinstance(declared, tuple) else declared,
            "bound": list(bound) if isinstance(bound, tuple) else bound,
        },
    )


def apply_binding(manifest: AgentManifest, binding: AgentBinding) -> AgentManifest:
    """``manifest`` as the registry stores it: the bound attributes, never the declared ones.

    Raises:
        AttributeMismatch: the manifest declares a non-empty value other than
            the bound one (``details``: ``field``, ``path``, ``declared``, ``bound``).
    """
    for field in ("team", "owner", "region"):
        declared = getattr(manifest, field)
        if declared and declared != getattr(binding, field):
            _mismatch(manifest, field, f"$.{field}", declared, getattr(binding, field))
    if manifest.project and manifest.project not in binding.projects:
        _mismatch(manifest, "project", "$.project", manifest.project, binding.projects)
    meta = manifest.metadata
    namespace = meta.get("namespace", "").strip()
    if namespace and namespace != (binding.namespace or "default"):
        _mismatch(manifest, "namespace", "$.metadata.namespace", namespace, binding.namespace)
    for key in ("tags", "projects"):
        declared_values = split_values(meta.get(key, ""))
        bound_values: tuple[str, ...] = getattr(binding, key)
        if declared_values and set(declared_values) != set(bound_values):
            _mismatch(manifest, key, f"$.metadata.{key}", declared_values, bound_values)
    return impose_binding(manifest, binding)


def impose_binding(manifest: AgentManifest, binding: AgentBinding) -> AgentManifest:
    """``manifest`` with the bound attributes written over the declared ones (no checks).

    The manifest's ``project`` stays if it is one of the bound projects, else
    becomes the first bound project (or empty).
    """
    project = manifest.project if manifest.project in binding.projects else ""
    if not project and binding.projects:
        project = binding.projects[0]
    metadata = {k: v for k, v in manifest.metadata.items() if k not in BOUND_METADATA}
    if binding.namespace:
        metadata["namespace"] = binding.namespace
    if binding.tags:
        metadata["tags"] = ",".join(binding.tags)
    if binding.projects:
        metadata["projects"] = ",".join(binding.projects)
    return msgspec.structs.replace(
        manifest,
        team=binding.team,
        owner=binding.owner,
        region=binding.region,
        project=project,
        metadata=metadata,
    )
