"""The Cedar engine behind the policy service's :class:`~services.policy.decider.Decider`.

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
:meth:`CedarDecider.swap` replaces it as a whole (the hook for hot reload).

:class:`CedarDecider` evaluates requests against the active set. Entities
are built from registry records and cached: one entity set per agent
(the agent and its capabilities), rebuilt only when that agent's record
changes (its name, version and registration time), and one combined set per
(principal, resource) pair, evicted oldest first. Nothing is parsed per
request except the small context record. Cedar evaluates every policy of the
set it is given, so each request is evaluated against the slice of the set
whose scope can match it (a policy scoped to ``principal == Agent::"a"`` is
left out for every other principal; scopes Signalbox cannot rule out are
kept): the cost of a decision follows the policies that apply, not the size
of the fleet's rule book. Slices are compiled once per (principal, action,
resource) and cached with the set. Cedar's answers are memoized too,
keyed by everything they depend on: policy set, action, the records'
identities, resource, and what the slice's policies can observe of the
context (:class:`ContextProjection`). A slice that never reads
``context.time`` is answered the same at every second, and one that only
compares ``context.estimated_tokens`` with constants (``> 10000``) the same
for every estimate on the same side of each constant; so fleet traffic with
distinct estimates and an advancing clock costs a dictionary lookup per
request, and Cedar evaluates the first request of each kind.

Outcomes (``Decision.reason_code``):

* ``allowed``: a permit matched and no forbid did (policy ids: the permits);
* ``forbidden``: a forbid matched (ids: those forbids);
* ``needs_approval``: the only forbids that matched are annotated
  ``@effect("needs_approval")`` and the set without them allows the request
  (ids: those forbids);
* ``default_deny``: no permit matched (id ``default-deny``: Cedar denies by
  default);
* fail closed, before or instead of Cedar (no policy ids):
  ``unknown_agent``, ``unknown_action``, ``missing_entity``,
  ``malformed_context``, ``evaluation_error`` (including any error Cedar
  reports while evaluating, even when its answer was Allow: a forbid that
  failed to evaluate must not turn into an allow).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Final, Literal

import cedarpy
import msgspec
from cedarpy import _internal as _cedar_native

from broker.errors import ConfigError
from schemas import AgentRecord, Decision, Effect, PolicyFiles
from services.policy.decider import (
    ACTIONS,
    DEFAULT_DENY_ID,
    AccessRequest,
    CallRequest,
    ReasonCode,
    RequestContext,
    UseRequest,
)

__all__ = [
    "LABEL_FILE",
    "NAMESPACE",
    "POLICY_SUFFIX",
    "SCHEMA_FILE",
    "CedarAnswer",
    "CedarDecider",
    "CedarPolicies",
    "ContextProjection",
    "PolicyInfo",
    "PolicySlice",
    "agent_entity",
    "authorize",
    "capability_entity",
    "read_policy_dir",
    "shipped_policy_dir",
]

log = logging.getLogger(__name__)

NAMESPACE: Final = "Signalbox"
SCHEMA_FILE: Final = "schema.cedarschema"
LABEL_FILE: Final = "label.txt"
POLICY_SUFFIX: Final = ".cedar"
_APPROVAL: Final = "needs_approval"
_LABEL = re.compile(r"^[A-Za-z0-9._-]{1,64}\Z")


def shipped_policy_dir() -> Path:
    """The policy set shipped with Signalbox (the default of ``SIGNALBOX_POLICY_DIR``).

    Installed from a wheel it sits inside the package
    (``services/policy/shipped``, copied there from the repository's
    ``policies/`` by the build); in a source checkout or an editable install
    it is the repository's ``policies/`` itself.

    Raises:
        ConfigError: neither is there (a broken installation).
    """
    here = Path(__file__).resolve().parent
    candidates = (here / "shipped", here.parents[1] / "policies")
    for candidate in candidates:
        if (candidate / SCHEMA_FILE).is_file():
            return candidate
    raise ConfigError(
        "the policies shipped with Signalbox are missing (looked in "
        f"{', '.join(str(c) for c in candidates)}); reinstall Signalbox or set "
        "SIGNALBOX_POLICY_DIR",
        details={"looked_in": [str(c) for c in candidates]},
    )


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
        self.approval_ids = frozenset(i for i, p in self.policies.items() if p.needs_approval)
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
        if label and not _LABEL.match(label):
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
        static: dict[str, Any] = {}
        for name in sorted(files):
            _load_file(name, files[name], parsed_schema, infos, static, errors)
        if errors:
            listing = "\n".join(f"  - {e}" for e in errors)
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
            bodies=static,
        )

    def slice(self, principal: Uid, action: Uid, resource: Uid) -> PolicySlice:
        """The policies whose scope can match this request (compiled once, then cached)."""
        key = (principal, action, resource)
        found = self._slices.get(key)
        if found is None:
            ids = tuple(
                i
                for i, body in self._bodies.items()
                if _admits(body.get("principal"), principal)
                and _admits_action(body.get("action"), action)
                and _admits(body.get("resource"), resource)
            )
            projection = ContextProjection.of(self._bodies[i] for i in ids)
            found = PolicySlice(self, ids, self._compiled_set(ids), projection)
            if len(self._slices) >= self.slice_cache_size:
                del self._slices[next(iter(self._slices))]  # the oldest
            self._slices[key] = found
        return found

    def _compiled_set(self, ids: tuple[str, ...]) -> cedarpy.PolicySet:
        """The compiled set of exactly these policies (shared by every slice holding them)."""
        found = self._compiled.get(ids)
        if found is None:
            found = _compile({i: self._bodies[i] for i in ids})
            if len(self._compiled) >= self.slice_cache_size:
                del self._compiled[next(iter(self._compiled))]
            self._compiled[ids] = found
        return found


#: A Cedar entity uid as (type, id), e.g. ("Signalbox::Agent", "loan-origination").
Uid = tuple[str, str]

#: Comparisons whose outcome for ``value OP constant`` only depends on where
#: ``value`` falls among the constants (and whether it equals one).
_ORDERING: Final = frozenset({"<", "<=", ">", ">=", "==", "!="})


@dataclass(frozen=True, slots=True)
class ContextProjection:
    """What a slice of policies can observe of a request's context: the memo's key.

    Built from the policies' JSON form. Per context attribute:

    * not read by any policy: left out of the key;
    * read only in comparisons with integer constants (``context.x > 10000``,
      ``5 <= context.x``, ``==``, ``!=``): keyed by its position among those
      constants, ``(bisect_left(constants, value), value in constants)``,
      which decides every such comparison;
    * read any other way (arithmetic, ``contains``, ``has``...): keyed by its
      value.

    A policy that uses ``context`` as a whole (anything but ``context.attr``)
    makes the key the whole context.

    Attributes:
        whole: Key on the whole context.
        attrs: ``(attribute, constants)`` in name order; ``constants`` is
            None when the attribute is keyed by its value.
    """

    whole: bool
    attrs: tuple[tuple[str, tuple[int, ...] | None], ...]

    @classmethod
    def of(cls, bodies: Iterable[Any]) -> ContextProjection:
        """The projection for policies in Cedar's JSON form."""
        uses: dict[str, set[int] | None] = {}
        whole = False
        for body in bodies:
            for cond in body.get("conditions", ()):
                whole |= _observe(cond.get("body"), uses)
        attrs = tuple(
            (name, None if cuts is None else tuple(sorted(cuts)))
            for name, cuts in sorted(uses.items())
        )
        return cls(whole=whole, attrs=attrs)

    def key(self, context: Mapping[str, Any]) -> tuple[Any, ...]:
        """The part of ``context`` the policies' answer can depend on."""
        if self.whole:
            return ("whole", _ctx(context))
        out: list[Any] = []
        for name, cuts in self.attrs:
            value = context[name]
            if cuts is not None and type(value) is int:
                at = bisect_left(cuts, value)
                out.append((at, at < len(cuts) and cuts[at] == value))
            else:
                out.append(_hashable(value))
        return tuple(out)


def _context_attr(node: Any) -> str | None:
    """``name`` if ``node`` is ``context.name``."""
    if isinstance(node, dict) and len(node) == 1 and "." in node:
        access = node["."]
        if isinstance(access, dict) and access.get("left") == {"Var": "context"}:
            attr = access.get("attr")
            return attr if isinstance(attr, str) else None
    return None


def _int_constant(node: Any) -> int | None:
    if isinstance(node, dict) and len(node) == 1 and "Value" in node:
        value = node["Value"]
        if type(value) is int:
            return value
    return None


def _observe(node: Any, uses: dict[str, set[int] | None]) -> bool:
    """Record in ``uses`` how ``node``'s subtree reads the context; True if it reads it whole."""
    if isinstance(node, dict):
        if node == {"Var": "context"}:
            return True  # the context itself, not one attribute of it
        name = _context_attr(node)
        if name is not None:  # read some way other than compared with a constant
            uses[name] = None
            return False
        if len(node) == 1:
            ((op, operands),) = node.items()
            if op in _ORDERING and isinstance(operands, dict):
                left, right = operands.get("left"), operands.get("right")
                for side, other in ((left, right), (right, left)):
                    attr, constant = _context_attr(side), _int_constant(other)
                    if attr is not None and constant is not None:
                        cuts = uses.get(attr, set())
                        if cuts is not None:
                            cuts.add(constant)
                            uses[attr] = cuts
                        return False
        children: Iterable[Any] = node.values()
    elif isinstance(node, list):
        children = node
    else:
        return False
    whole = False
    for child in children:  # every child, not any(): each records its reads
        whole |= _observe(child, uses)
    return whole


def _hashable(value: Any) -> Any:
    if isinstance(value, list | tuple | set | frozenset):
        return ("set", tuple(sorted(map(repr, value))))
    if isinstance(value, dict):
        return ("record", tuple(sorted((k, _hashable(v)) for k, v in value.items())))
    return value


@dataclass(frozen=True, slots=True)
class PolicySlice:
    """The policies of a set that can apply to one (principal, action, resource).

    Attributes:
        ids: Their ``@id`` values.
        cedar: Them, compiled.
    """

    policies: CedarPolicies
    ids: tuple[str, ...]
    cedar: cedarpy.PolicySet
    context: ContextProjection

    def without_approvals(self) -> cedarpy.PolicySet:
        """The slice minus its ``@effect("needs_approval")`` forbids."""
        approval = self.policies.approval_ids
        return self.policies._compiled_set(tuple(i for i in self.ids if i not in approval))


def _admits(scope: Any, uid: Uid) -> bool:
    """Whether a principal or resource scope can match ``uid`` (True when unsure)."""
    if not isinstance(scope, dict):
        return True
    op = scope.get("op")
    if op == "==":
        entity = scope.get("entity")
        if isinstance(entity, dict) and "type" in entity and "id" in entity:
            return (entity["type"], entity["id"]) == uid
        return True
    if op == "is" and "in" not in scope:
        return bool(scope.get("entity_type") == uid[0])
    return True  # All, `in` (a hierarchy), `is ... in`: kept


def _admits_action(scope: Any, action: Uid) -> bool:
    """Whether an action scope can match ``action`` (True when unsure)."""
    if not isinstance(scope, dict):
        return True
    op = scope.get("op")
    if op == "==":
        return _admits(scope, action)
    if op == "in":
        listed = scope.get("entities") or [scope.get("entity")]
        uids = [(e.get("type"), e.get("id")) for e in listed if isinstance(e, dict)]
        if action in uids:
            return True
        # Only concrete actions listed (no group that could contain this one): ruled out.
        known = {(f"{NAMESPACE}::Action", a) for a in ACTIONS}
        return not (len(uids) == len(listed) and all(u in known for u in uids))
    return True


def _compile(static: Mapping[str, Any]) -> cedarpy.PolicySet:
    # Cedar's JSON policy format keys each policy by its id: ours are the @id values.
    doc = {"staticPolicies": dict(static), "templates": {}, "templateLinks": []}
    return cedarpy.PolicySet.from_json_str(json.dumps(doc))


def _load_file(
    name: str,
    text: str,
    schema: cedarpy.Schema,
    infos: dict[str, PolicyInfo],
    static: dict[str, Any],
    errors: list[str],
) -> None:
    """Parse and validate one policy file, adding its policies or its problems."""
    try:
        est = json.loads(cedarpy.policies_to_json_str(text))
    except ValueError as exc:
        errors.append(f"{name}: {exc}")
        return
    if est.get("templates"):
        errors.append(
            f"{name}: templates (?principal / ?resource slots) are not supported; "
            "write static policies"
        )
    result = cedarpy.validate_policies(text, schema)
    names = result.id_annotations_by_policy_id
    for err in result.errors:
        pid = err.policy_id
        shown = names.get(pid) or pid
        message = err.error.replace(f"`{pid}`", f"`{shown}`") if pid else err.error
        errors.append(f"{name}: {message}")
    for position, body in enumerate(est.get("staticPolicies", {}).values(), start=1):
        annotations: dict[str, str] = body.get("annotations") or {}
        pid = annotations.get("id", "")
        where = f"{name}: policy #{position}"
        if not pid:
            errors.append(f'{where} has no @id("...") annotation; every policy needs one')
            continue
        if pid == DEFAULT_DENY_ID:
            errors.append(f"{where}: @id({pid!r}) is reserved for Cedar's default deny")
            continue
        if pid in infos:
            errors.append(f"{where}: @id({pid!r}) is already used in {infos[pid].source}")
            continue
        effect = body.get("effect")
        extra = annotations.get("effect")
        if extra is not None and (extra != _APPROVAL or effect != "forbid"):
            errors.append(
                f"{where} (@id({pid!r})): @effect({extra!r}) is not supported; the only "
                f"effect annotation is @effect({_APPROVAL!r}), on a forbid"
            )
            continue
        infos[pid] = PolicyInfo(
            id=pid,
            effect="forbid" if effect == "forbid" else "permit",
            source=name,
            description=annotations.get("description", ""),
            needs_approval=extra == _APPROVAL,
        )
        static[pid] = body


# -- entities ------------------------------------------------------------------------------


def _uid(kind: str, id_: str) -> dict[str, str]:
    return {"type": f"{NAMESPACE}::{kind}", "id": id_}


def _tags(text: str) -> list[str]:
    return sorted({t.strip() for t in text.split(",") if t.strip()})


def agent_entity(record: AgentRecord) -> dict[str, Any]:
    """The Cedar ``Agent`` entity of a registry record (JSON entity format).

    ``namespace`` and ``tags`` come from the manifest's metadata keys
    ``namespace`` (default ``default``) and ``tags`` (comma-separated).
    The record is the registry's stored one, so team, owner, region,
    namespace and tags are the values an operator bound to the agent
    (:mod:`services.registry.binding`), never what the agent declared.
    """
    m = record.manifest
    return {
        "uid": _uid("Agent", m.name),
        "attrs": {
            "name": m.name,
            "version": m.version,
            "team": m.team,
            "namespace": m.metadata.get("namespace", "").strip() or "default",
            "owner": m.owner,
            "region": m.region,
            "tags": _tags(m.metadata.get("tags", "")),
        },
        "parents": [],
    }


def capability_entity(record: AgentRecord, capability: str) -> dict[str, Any]:
    """The Cedar ``Capability`` entity ``"<agent>/<capability>"`` of a registered agent.

    Raises:
        KeyError: the agent has no such capability.
    """
    m = record.manifest
    for cap in m.capabilities:
        if cap.name == capability:
            return {
                "uid": _uid("Capability", f"{m.name}/{cap.name}"),
                "attrs": {
                    "name": cap.name,
                    "owner": {"__entity": _uid("Agent", m.name)},
                    "tags": sorted(set(cap.tags)),
                },
                "parents": [],
            }
    raise KeyError(capability)


RecordKey = tuple[str, str, float]


def _key(record: AgentRecord) -> RecordKey:
    return (record.manifest.name, record.manifest.version, record.registered_at)


@dataclass(frozen=True, slots=True)
class _AgentEntities:
    """One agent's cached entities: itself and its capabilities."""

    key: RecordKey
    agent_json: str
    entities: cedarpy.Entities
    capabilities: frozenset[str]


_ACTION_UIDS = {action: _uid("Action", action) for action in ACTIONS}


class _EntityError(Exception):
    """Entities could not be built (they do not match the schema)."""


# -- the decider ---------------------------------------------------------------------------


class CedarDecider:
    """Decides calls and model/tool uses with Cedar (see the module docstring).

    Args:
        policies: The active policy set.
        clock: Unix time of a decision when the request carries none.
        cache_size: Combined entity sets kept (principal/resource pairs).
        memo_size: Cedar answers kept (see the module docstring); 0: none.
    """

    def __init__(
        self,
        policies: CedarPolicies,
        *,
        clock: Callable[[], float] = time.time,
        cache_size: int = 4096,
        memo_size: int = 16384,
    ) -> None:
        self._policies = policies
        self._clock = clock
        self._cache_size = max(1, cache_size)
        self._memo_size = max(0, memo_size)
        self._agents: dict[str, _AgentEntities] = {}
        self._pairs: dict[tuple[Any, ...], cedarpy.Entities] = {}
        self._memo: dict[tuple[Any, ...], Decision] = {}
        #: Entity sets built so far (cache misses), for tests and benches.
        self.builds = 0
        #: Requests Cedar evaluated (memo misses), for tests and benches.
        self.evaluations = 0

    @classmethod
    def from_dir(cls, path: Path, *, label: str | None = None) -> CedarDecider:
        """A decider over the set in folder ``path`` (see :meth:`CedarPolicies.from_dir`)."""
        return cls(CedarPolicies.from_dir(path, label=label))

    @property
    def version(self) -> str:
        """Version of the active policy set."""
        return self._policies.version

    @property
    def policies(self) -> CedarPolicies:
        """The active policy set."""
        return self._policies

    def swap(self, policies: CedarPolicies) -> None:
        """Make ``policies`` the active set, at once, for every later decision.

        Cached entities are kept unless the schema changed (they were
        validated against it).
        """
        if policies.schema_text != self._policies.schema_text:
            self._agents.clear()
            self._pairs.clear()
        self._memo.clear()
        self._policies = policies

    def decide(self, request: AccessRequest) -> Decision:
        """Allow, deny or ask for approval (never raises: anything unexpected denies)."""
        start = time.perf_counter()
        policies = self._policies  # one set for the whole decision, even across a swap
        try:
            if isinstance(request, CallRequest):
                return self._decide_call(policies, request, start)
            return self._decide_use(policies, request, start)
        except Exception as exc:
            log.exception("policy: unexpected error while deciding %r", request)
            return _deny(
                policies,
                start,
                "evaluation_error",
                f"the request could not be evaluated ({type(exc).__name__}: {exc}), "
                "so it is denied",
            )

    # -- per kind of request ---------------------------------------------------------------

    def _decide_call(self, p: CedarPolicies, r: CallRequest, start: float) -> Decision:
        caller = r.caller_record
        if caller is None or caller.manifest.name != r.caller:
            return _deny(
                p,
                start,
                "unknown_agent",
                f"caller {r.caller!r} is not registered; register it before it calls",
            )
        target = r.target_record
        if target is None or target.manifest.name != r.target:
            return _deny(p, start, "missing_entity", f"target {r.target!r} is not registered")
        problem = r.context.problem()
        if problem:
            return _deny(p, start, "malformed_context", f"malformed context: {problem}")
        try:
            target_entities = self._agent(p, target)
            if r.capability not in target_entities.capabilities:
                return _deny(
                    p, start, "missing_entity", f"{r.target} has no capability {r.capability!r}"
                )
            context = self._context(r.context)
            request = {
                "principal": _uid("Agent", r.caller),
                "action": _ACTION_UIDS["call"],
                "resource": _uid("Capability", f"{r.target}/{r.capability}"),
                "context": context,
            }
            applicable = self._slice(p, request)
            seen = applicable.context.key(context)
            memo_key = (p, "call", _key(caller), target_entities.key, r.capability, seen)
            known = self._memo.get(memo_key)
            if known is not None:
                return _timed(known, start)
            entities = self._call_entities(p, caller, target_entities)
        except _EntityError as exc:
            return _deny(p, start, "evaluation_error", str(exc))
        what = f"{r.caller} to call {r.target}.{r.capability}"
        return self._evaluate(p, applicable, memo_key, request, entities, start, what)

    def _decide_use(self, p: CedarPolicies, r: UseRequest, start: float) -> Decision:
        agent = r.agent_record
        if agent is None or agent.manifest.name != r.agent:
            return _deny(
                p,
                start,
                "unknown_agent",
                f"agent {r.agent!r} is not registered; register it before it asks",
            )
        if r.action not in ("use_model", "use_tool"):
            return _deny(
                p,
                start,
                "unknown_action",
                f"unknown action {r.action[:64]!r}; an agent may ask about use_model or use_tool",
            )
        kind = _kind(r.action)
        if not r.resource:
            return _deny(p, start, "missing_entity", f"{r.action} names no {kind.lower()}")
        if not 0 <= r.price_per_1k_tokens <= 1_000_000:
            return _deny(
                p, start, "malformed_context", "price per 1,000 tokens must be 0-1,000,000 USD"
            )
        problem = r.context.problem()
        if problem:
            return _deny(p, start, "malformed_context", f"malformed context: {problem}")
        context = self._context(r.context)
        request = {
            "principal": _uid("Agent", r.agent),
            "action": _ACTION_UIDS[r.action],
            "resource": _uid(kind, r.resource),
            "context": context,
        }
        applicable = self._slice(p, request)
        resource = (r.resource, r.provider, r.region, r.price_per_1k_tokens)
        memo_key = (p, r.action, _key(agent), resource, applicable.context.key(context))
        known = self._memo.get(memo_key)
        if known is not None:
            return _timed(known, start)
        try:
            entities = self._use_entities(p, agent, r)
        except _EntityError as exc:
            return _deny(p, start, "evaluation_error", str(exc))
        what = f"{r.agent} to use {kind.lower()} {r.resource}"
        return self._evaluate(p, applicable, memo_key, request, entities, start, what)

    @staticmethod
    def _slice(p: CedarPolicies, request: dict[str, Any]) -> PolicySlice:
        return p.slice(
            _as_uid(request["principal"]), _as_uid(request["action"]), _as_uid(request["resource"])
        )

    def _evaluate(
        self,
        p: CedarPolicies,
        applicable: PolicySlice,
        memo_key: tuple[Any, ...],
        request: dict[str, Any],
        entities: cedarpy.Entities,
        start: float,
        what: str,
    ) -> Decision:
        self.evaluations += 1
        decision = _evaluate(p, applicable, request, entities, start, what)
        if self._memo_size and decision.reason_code != "evaluation_error":
            if len(self._memo) >= self._memo_size:
                del self._memo[next(iter(self._memo))]  # the oldest
            self._memo[memo_key] = decision
        return decision

    # -- entities, cached ------------------------------------------------------------------

    def _agent(self, p: CedarPolicies, record: AgentRecord) -> _AgentEntities:
        """The agent's own entity set, rebuilt only when its record changed."""
        key = _key(record)
        cached = self._agents.get(key[0])
        if cached is not None and cached.key == key:
            return cached
        agent = agent_entity(record)
        caps = [capability_entity(record, c.name) for c in record.manifest.capabilities]
        entities = self._parse(p, json.dumps([agent, *caps]), None, record.manifest.name)
        built = _AgentEntities(
            key=key,
            agent_json=json.dumps([agent]),
            entities=entities,
            capabilities=frozenset(c.name for c in record.manifest.capabilities),
        )
        self._agents[key[0]] = built
        return built

    def _call_entities(
        self, p: CedarPolicies, caller: AgentRecord, target: _AgentEntities
    ) -> cedarpy.Entities:
        if caller.manifest.name == target.key[0]:
            return target.entities
        own = self._agent(p, caller)
        pair = ("call", own.key, target.key)
        found = self._pairs.get(pair)
        if found is None:
            found = self._parse(p, own.agent_json, target.entities, caller.manifest.name)
            self._remember(pair, found)
        return found

    def _use_entities(
        self, p: CedarPolicies, agent: AgentRecord, r: UseRequest
    ) -> cedarpy.Entities:
        own = self._agent(p, agent)
        pair = (r.action, own.key, r.resource, r.provider, r.region, r.price_per_1k_tokens)
        found = self._pairs.get(pair)
        if found is None:
            attrs: dict[str, Any] = {"provider": r.provider, "region": r.region}
            if r.action == "use_model":
                price = f"{r.price_per_1k_tokens:.4f}"
                attrs["price_per_1k_tokens"] = {"__extn": {"fn": "decimal", "arg": price}}
            resource = {"uid": _uid(_kind(r.action), r.resource), "attrs": attrs, "parents": []}
            found = self._parse(p, json.dumps([resource]), own.entities, r.resource)
            self._remember(pair, found)
        return found

    def _parse(
        self, p: CedarPolicies, text: str, base: cedarpy.Entities | None, what: str
    ) -> cedarpy.Entities:
        self.builds += 1
        try:
            if base is None:
                return cedarpy.Entities.from_json_str(text, p.schema)
            return base.with_added_json_str(text, p.schema)
        except ValueError as exc:
            raise _EntityError(
                f"the entities of {what!r} do not match the policy set's schema ({exc}); "
                "denied until the schema or the registration is fixed"
            ) from exc

    def _remember(self, key: tuple[Any, ...], entities: cedarpy.Entities) -> None:
        if len(self._pairs) >= self._cache_size:
            del self._pairs[next(iter(self._pairs))]  # the oldest
        self._pairs[key] = entities

    def _context(self, ctx: RequestContext) -> dict[str, Any]:
        return {
            "estimated_tokens": ctx.estimated_tokens,
            "estimated_tokens_known": ctx.estimated_tokens_known,
            "data_tags": list(ctx.data_tags),
            "on_behalf_of": list(ctx.on_behalf_of),
            "time": int(self._clock() if ctx.time is None else ctx.time),
        }


def _kind(action: str) -> str:
    return "Model" if action == "use_model" else "Tool"


def _ctx(context: Mapping[str, Any]) -> tuple[Any, ...]:
    """The context as a memo key (its sets as sorted tuples)."""
    return (
        context["estimated_tokens"],
        context["estimated_tokens_known"],
        tuple(sorted(context["data_tags"])),
        tuple(sorted(context["on_behalf_of"])),
        context["time"],
    )


def _timed(decision: Decision, start: float) -> Decision:
    """A memoized decision with this request's own evaluation time."""
    return msgspec.structs.replace(decision, eval_us=(time.perf_counter() - start) * 1e6)


def _deny(p: CedarPolicies, start: float, code: ReasonCode, reason: str) -> Decision:
    return Decision(
        effect="deny",
        reasons=(reason,),
        policy_ids=(),
        policy_version=p.version,
        eval_us=(time.perf_counter() - start) * 1e6,
        reason_code=code,
    )


def _why(p: CedarPolicies, verb: str, pid: str) -> str:
    info = p.policies.get(pid)
    described = f": {info.description}" if info is not None and info.description else ""
    return f"{verb} by policy {pid!r}{described}"


def _as_uid(uid: dict[str, str]) -> Uid:
    return (uid["type"], uid["id"])


def _evaluate(
    p: CedarPolicies,
    applicable: PolicySlice,
    request: dict[str, Any],
    entities: cedarpy.Entities,
    start: float,
    describe: str,
) -> Decision:
    """Ask Cedar, then turn its answer into a Decision (see the module docstring)."""
    if not applicable.ids:  # nothing can permit it: Cedar would deny by default
        return Decision(
            effect="deny",
            reasons=(f"no rule allows {describe} (deny by default)",),
            policy_ids=(DEFAULT_DENY_ID,),
            policy_version=p.version,
            eval_us=(time.perf_counter() - start) * 1e6,
            reason_code="default_deny",
        )
    result = authorize(request, applicable.cedar, entities)
    if result.errors:
        return _deny(p, start, "evaluation_error", _errors(result.errors))
    matched = tuple(sorted(result.reasons))  # Cedar lists them in no fixed order
    code: ReasonCode
    effect: Effect
    if result.allowed:
        code, effect, ids = "allowed", "allow", matched
        reasons = tuple(_why(p, "allowed", i) for i in ids)
    elif not matched:
        code, effect, ids = "default_deny", "deny", (DEFAULT_DENY_ID,)
        reasons = (f"no rule allows {describe} (deny by default)",)
    elif hard := tuple(i for i in matched if i not in p.approval_ids):
        code, effect, ids = "forbidden", "deny", hard
        reasons = tuple(_why(p, "forbidden", i) for i in ids)
    else:
        # Only approval forbids matched: would the rest of the set allow it?
        rest = authorize(request, applicable.without_approvals(), entities)
        if rest.errors:
            return _deny(p, start, "evaluation_error", _errors(rest.errors))
        if rest.allowed:
            code, effect, ids = "needs_approval", "needs_approval", matched
            reasons = tuple(_why(p, "needs human approval, required", i) for i in ids)
        else:
            code, effect, ids = "default_deny", "deny", (DEFAULT_DENY_ID,)
            reasons = (f"no rule allows {describe} (deny by default)",)
    return Decision(
        effect=effect,
        reasons=reasons,
        policy_ids=ids,
        policy_version=p.version,
        eval_us=(time.perf_counter() - start) * 1e6,
        reason_code=code,
    )


def _errors(errors: list[Any]) -> str:
    shown = "; ".join(e if isinstance(e, str) else json.dumps(e) for e in errors[:5])
    return "Cedar could not evaluate the request, so it is denied: " + shown


# -- calling Cedar ------------------------------------------------------------------------
#
# ``cedarpy.is_authorized`` is a Python wrapper around the extension's
# ``is_authorized_batch``: per request it ``json.dumps`` the context, copies
# the request, ``json.loads`` the whole answer (metrics included) and wraps it
# in two objects. Measured on the shipped set with the entity and policy
# handles cached: 73 µs per call through the wrapper, 41 µs calling the
# extension with the same arguments; the difference was a third of a
# decision's cost. So the decider calls the extension itself, with the
# context encoded by msgspec and only the fields it reads decoded. This leans
# on cedarpy's private module (pinned to a minor version range in
# pyproject.toml): ``tests/services/policy/test_cedar_native.py`` checks
# answers equal to the public API's on allowed, forbidden, default-deny and
# erroring requests, so an upgrade that changes it fails loudly.


class _Diagnostics(msgspec.Struct):
    reason: list[str] = msgspec.field(default_factory=list)
    errors: list[Any] = msgspec.field(default_factory=list)


class CedarAnswer(msgspec.Struct):
    """What the decider reads of Cedar's answer to one request."""

    decision: str
    diagnostics: _Diagnostics = msgspec.field(default_factory=_Diagnostics)

    @property
    def allowed(self) -> bool:
        """Cedar's decision is Allow."""
        return self.decision == "Allow"

    @property
    def reasons(self) -> list[str]:
        """Ids of the policies that determined the decision."""
        return self.diagnostics.reason

    @property
    def errors(self) -> list[Any]:
        """Evaluation errors (a policy that errors is skipped by Cedar)."""
        return self.diagnostics.errors


_answer = msgspec.json.Decoder(CedarAnswer)
_encode_context = msgspec.json.Encoder()


def authorize(
    request: dict[str, Any], policies: cedarpy.PolicySet, entities: cedarpy.Entities
) -> CedarAnswer:
    """Cedar's answer to ``request`` (principal, action, resource as uid dicts; context a dict).

    Same semantics as ``cedarpy.is_authorized(request, policies, entities)``,
    at about half its cost (see above).
    """
    native = {**request, "context": _encode_context.encode(request["context"]).decode()}
    (raw,) = _cedar_native.is_authorized_batch([native], policies, entities._inner, None, False)
    return _answer.decode(raw)


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
        p.name: p.read_text(encoding="utf-8")
        for p in sorted(path.iterdir())
        if p.suffix == POLICY_SUFFIX and p.is_file() and not p.name.startswith(".")
    }
    if label is None:
        label_path = path / LABEL_FILE
        label = label_path.read_text(encoding="utf-8").strip() if label_path.is_file() else ""
    return PolicyFiles(files=files, schema=schema_path.read_text(encoding="utf-8"), label=label)
