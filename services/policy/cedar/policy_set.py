"""Cedar policy sets: reading a folder, parsing and validating it against its schema.

A policy set is a folder (the shipped one is the repository's ``policies/``)::

    schema.cedarschema   Cedar schema, namespace Signalbox (required)
    *.cedar              policies; every one carries a unique @id("...")
    label.txt            optional one-line label of the set

:class:`CedarPolicies` loads such a set once: it parses the schema and every
file, validates every policy against the schema, checks the ids and
annotations, and compiles it. Any problem raises
:class:`~broker.errors.ConfigError` carrying Cedar's own messages; nothing
half-loaded is ever used. The set's :attr:`~CedarPolicies.version` is its
label plus a content digest, so two replicas report the same version exactly
when they evaluate the same text. A loaded set is immutable:
:meth:`~services.policy.cedar.decider.CedarDecider.swap` replaces it as a
whole (the hook for hot reload). Its slices (the policies that can apply to
one request, :mod:`services.policy.cedar.slicing`) are compiled once and
cached with it.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Final, Literal

import cedarpy

from broker.errors import ConfigError
from schemas import PolicyFiles
from services.policy.cedar.entities import Uid
from services.policy.cedar.slicing import ContextProjection, PolicySlice, applicable_policy_ids
from services.policy.decider import DEFAULT_DENY_ID

__all__ = [
    "LABEL_FILE",
    "POLICY_SUFFIX",
    "SCHEMA_FILE",
    "CedarPolicies",
    "PolicyInfo",
    "compose_example",
    "example_names",
    "read_policy_dir",
    "shipped_policy_dir",
]

SCHEMA_FILE: Final = "schema.cedarschema"
LABEL_FILE: Final = "label.txt"
POLICY_SUFFIX: Final = ".cedar"
_NEEDS_APPROVAL: Final = "needs_approval"
_LABEL_PATTERN = re.compile(r"^[A-Za-z0-9._-]{1,64}\Z")


def shipped_policy_dir() -> Path:
    """The policy set shipped with Signalbox (the default of ``SIGNALBOX_POLICY_DIR``).

    Installed from a wheel it sits inside the package
    (``services/policy/shipped``, copied there from the repository's
    ``policies/`` by the build); in a source checkout or an editable install
    it is the repository's ``policies/`` itself.

    Raises:
        ConfigError: neither is there (a broken installation).
    """
    policy_package = Path(__file__).resolve().parents[1]  # services/policy
    candidates = (policy_package / "shipped", policy_package.parents[1] / "policies")
    for candidate in candidates:
        if (candidate / SCHEMA_FILE).is_file():
            return candidate
    raise ConfigError(
        "the policies shipped with Signalbox are missing (looked in "
        f"{', '.join(str(candidate) for candidate in candidates)}); reinstall Signalbox or set "
        "SIGNALBOX_POLICY_DIR",
        details={"looked_in": [str(candidate) for candidate in candidates]},
    )


def example_names() -> list[str]:
    """The example sets shipped beside the default one (``policies/examples/<name>``)."""
    folder = shipped_policy_dir() / "examples"
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def compose_example(target: Path, name: str) -> Path:
    """Write the default set plus example ``name``'s files into ``target``; returns it.

    An example holds only what it adds to the default set (its ``.cedar``
    files and label); a file of the same name replaces the default's.

    Raises:
        ConfigError: no such example.
    """
    names = example_names()
    if name not in names:
        raise ConfigError(
            f"no example policy set {name!r}; the shipped examples: {', '.join(names) or 'none'}",
            details={"example": name, "examples": names},
        )
    shipped = shipped_policy_dir()
    target.mkdir(parents=True, exist_ok=True)
    for source in (shipped, shipped / "examples" / name):
        for entry in sorted(source.iterdir()):
            wanted = entry.suffix in (POLICY_SUFFIX, ".cedarschema") or entry.name == LABEL_FILE
            if entry.is_file() and wanted and not entry.name.startswith("."):
                (target / entry.name).write_text(entry.read_text(encoding="utf-8"))
    return target


def read_policy_dir(path: Path, *, label: str | None = None) -> PolicyFiles:
    """Read a policy folder (the layout :meth:`CedarPolicies.from_dir` loads) as a candidate.

    Args:
        path: The folder.
        label: Label of the set; default: the folder's ``label.txt``, if any.

    Raises:
        ConfigError: no such folder, or no schema in it.
    """
    if not path.is_dir():
        raise ConfigError(
            f"policy folder {path} does not exist; set SIGNALBOX_POLICY_DIR to (or pass) a "
            f"folder holding {SCHEMA_FILE} and *.cedar files",
            details={"source": str(path)},
        )
    schema_path = path / SCHEMA_FILE
    if not schema_path.is_file():
        raise ConfigError(
            f"{path}: no {SCHEMA_FILE}; every policy folder needs the Cedar schema "
            "(copy the shipped one from policies/)",
            details={"source": str(path)},
        )
    files = {
        entry.name: entry.read_text(encoding="utf-8")
        for entry in sorted(path.iterdir())
        if entry.suffix == POLICY_SUFFIX and entry.is_file() and not entry.name.startswith(".")
    }
    if label is None:
        label_path = path / LABEL_FILE
        label = label_path.read_text(encoding="utf-8").strip() if label_path.is_file() else ""
    return PolicyFiles(files=files, schema=schema_path.read_text(encoding="utf-8"), label=label)


@dataclass(frozen=True, slots=True)
class PolicyInfo:
    """One policy of a loaded set.

    Attributes:
        id: Its ``@id``.
        effect: ``permit`` or ``forbid``.
        source: File it came from.
        description: Its ``@description`` ("" if none).
        needs_approval: A forbid annotated ``@effect("needs_approval")``.
    """

    id: str
    effect: Literal["permit", "forbid"]
    source: str
    description: str = ""
    needs_approval: bool = False


class CedarPolicies:
    """A validated, compiled, immutable Cedar policy set (build with :meth:`from_dir`).

    Attributes:
        label: Human label ("" if none).
        digest: SHA-256 (hex) of the schema and the policy files (names and text).
        schema: The parsed Cedar schema.
        schema_text: Its source.
        files: Policy file name -> text.
        policies: ``@id`` -> :class:`PolicyInfo`, in file order.
        approval_ids: Ids of the ``@effect("needs_approval")`` forbids.
        cedar: Every policy, compiled; Cedar's policy ids are the ``@id`` values.
    """

    __slots__ = (
        "_bodies",
        "_compiled",
        "_slices",
        "_version",
        "approval_ids",
        "cedar",
        "digest",
        "files",
        "label",
        "policies",
        "schema",
        "schema_text",
    )

    #: Slices kept per set (one per principal, action and resource seen).
    slice_cache_size: ClassVar[int] = 16_384

    def __init__(
        self,
        *,
        label: str,
        digest: str,
        schema: cedarpy.Schema,
        schema_text: str,
        files: Mapping[str, str],
        policies: Mapping[str, PolicyInfo],
        bodies: Mapping[str, Any],
    ) -> None:
        self.label = label
        self.digest = digest
        self._version = f"{label}@{digest[:12]}" if label else digest[:12]
        self.schema = schema
        self.schema_text = schema_text
        self.files = dict(files)
        self.policies = dict(policies)
        self.approval_ids = frozenset(
            policy_id for policy_id, info in self.policies.items() if info.needs_approval
        )
        self._bodies = dict(bodies)  # @id -> the policy in Cedar's JSON format
        self.cedar = _compile(self._bodies)
        self._compiled: dict[tuple[str, ...], cedarpy.PolicySet] = {(): _compile({})}
        self._slices: dict[tuple[Uid, Uid, Uid], PolicySlice] = {}

    @property
    def version(self) -> str:
        """``<label>@<digest[:12]>``, or the digest prefix alone when unlabelled."""
        return self._version

    def __repr__(self) -> str:
        return f"CedarPolicies(version={self.version!r}, policies={len(self.policies)})"

    @classmethod
    def from_dir(cls, path: Path, *, label: str | None = None) -> CedarPolicies:
        """Load the set in folder ``path`` (see the module docstring for its layout).

        Args:
            path: The folder.
            label: Label of the set; default: the folder's ``label.txt``, if any.

        Raises:
            ConfigError: no such folder, no schema, or an invalid set (the
                message and ``details["errors"]`` carry Cedar's messages).
        """
        read = read_policy_dir(path, label=label)
        return cls.from_texts(dict(read.files), read.schema, label=read.label, source=str(path))

    @classmethod
    def from_texts(
        cls,
        files: Mapping[str, str],
        schema: str,
        *,
        label: str = "",
        source: str = "<policies>",
    ) -> CedarPolicies:
        """Load a set from its texts (file name -> Cedar policies, and the schema).

        Raises:
            ConfigError: an invalid schema, label or policy set, with Cedar's messages.
        """
        if label and not _LABEL_PATTERN.match(label):
            raise ConfigError(
                f"{source}: label {label[:80]!r} must be 1-64 characters from A-Z, a-z, "
                "0-9, '.', '_' and '-'",
                details={"source": source, "label": label[:80]},
            )
        try:
            parsed_schema = cedarpy.Schema.from_str(schema)
        except ValueError as exc:
            raise ConfigError(
                f"{source}: {SCHEMA_FILE} is not a valid Cedar schema: {exc}",
                details={"source": source, "errors": [f"{SCHEMA_FILE}: {exc}"]},
            ) from exc
        errors: list[str] = []
        infos: dict[str, PolicyInfo] = {}
        bodies: dict[str, Any] = {}
        for name in sorted(files):
            _load_file(name, files[name], parsed_schema, infos, bodies, errors)
        if errors:
            listing = "\n".join(f"  - {error}" for error in errors)
            raise ConfigError(
                f"{source}: invalid policy set ({len(errors)} problem"
                f"{'s' if len(errors) > 1 else ''}); nothing was loaded:\n{listing}",
                details={"source": source, "errors": errors},
            )
        digest = hashlib.sha256(
            json.dumps({"schema": schema, "files": sorted(files.items())}).encode()
        ).hexdigest()
        return cls(
            label=label,
            digest=digest,
            schema=parsed_schema,
            schema_text=schema,
            files=files,
            policies=infos,
            bodies=bodies,
        )

    def slice(self, principal: Uid, action: Uid, resource: Uid) -> PolicySlice:
        """The policies whose scope can match this request (compiled once, then cached)."""
        key = (principal, action, resource)
        found = self._slices.get(key)
        if found is None:
            ids = applicable_policy_ids(self._bodies, principal, action, resource)
            projection = ContextProjection.of(self._bodies[policy_id] for policy_id in ids)
            found = PolicySlice(self, ids, self.compiled_set(ids), projection)
            if len(self._slices) >= self.slice_cache_size:
                del self._slices[next(iter(self._slices))]  # the oldest
            self._slices[key] = found
        return found

    def compiled_set(self, ids: tuple[str, ...]) -> cedarpy.PolicySet:
        """The compiled set of exactly these policies (shared by every slice holding them)."""
        found = self._compiled.get(ids)
        if found is None:
            found = _compile({policy_id: self._bodies[policy_id] for policy_id in ids})
            if len(self._compiled) >= self.slice_cache_size:
                del self._compiled[next(iter(self._compiled))]
            self._compiled[ids] = found
        return found


def _compile(bodies: Mapping[str, Any]) -> cedarpy.PolicySet:
    # Cedar's JSON policy format keys each policy by its id: ours are the @id values.
    policy_set_json = {"staticPolicies": dict(bodies), "templates": {}, "templateLinks": []}
    return cedarpy.PolicySet.from_json_str(json.dumps(policy_set_json))


def _load_file(
    name: str,
    text: str,
    schema: cedarpy.Schema,
    infos: dict[str, PolicyInfo],
    bodies: dict[str, Any],
    errors: list[str],
) -> None:
    """Parse and validate one policy file, adding its policies or its problems."""
    try:
        parsed = json.loads(cedarpy.policies_to_json_str(text))
    except ValueError as exc:
        errors.append(f"{name}: {exc}")
        return
    if parsed.get("templates"):
        errors.append(
            f"{name}: templates (?principal / ?resource slots) are not supported; "
            "write static policies"
        )
    result = cedarpy.validate_policies(text, schema)
    id_annotations = result.id_annotations_by_policy_id
    for error in result.errors:
        cedar_id = error.policy_id
        shown = id_annotations.get(cedar_id) or cedar_id
        message = error.error.replace(f"`{cedar_id}`", f"`{shown}`") if cedar_id else error.error
        errors.append(f"{name}: {message}")
    for position, body in enumerate(parsed.get("staticPolicies", {}).values(), start=1):
        annotations: dict[str, str] = body.get("annotations") or {}
        policy_id = annotations.get("id", "")
        where = f"{name}: policy #{position}"
        if not policy_id:
            errors.append(f'{where} has no @id("...") annotation; every policy needs one')
            continue
        if policy_id == DEFAULT_DENY_ID:
            errors.append(f"{where}: @id({policy_id!r}) is reserved for Cedar's default deny")
            continue
        if policy_id in infos:
            errors.append(
                f"{where}: @id({policy_id!r}) is already used in {infos[policy_id].source}"
            )
            continue
        effect = body.get("effect")
        effect_annotation = annotations.get("effect")
        if effect_annotation is not None and (
            effect_annotation != _NEEDS_APPROVAL or effect != "forbid"
        ):
            errors.append(
                f"{where} (@id({policy_id!r})): @effect({effect_annotation!r}) is not supported; "
                f"the only effect annotation is @effect({_NEEDS_APPROVAL!r}), on a forbid"
            )
            continue
        infos[policy_id] = PolicyInfo(
            id=policy_id,
            effect="forbid" if effect == "forbid" else "permit",
            source=name,
            description=annotations.get("description", ""),
            needs_approval=effect_annotation == _NEEDS_APPROVAL,
        )
        bodies[policy_id] = body
