"""Which policies of a set can apply to a request, and what of its context they can observe.

Cedar evaluates every policy of the set it is given, so each request is
evaluated against the slice of the set whose scope can match it (a policy
scoped to ``principal == Agent::"a"`` is left out for every other principal;
scopes Signalbox cannot rule out are kept): the cost of a decision follows
the policies that apply, not the size of the fleet's rule book. Slices are
compiled once per (principal, action, resource) and cached with the set
(:meth:`~services.policy.cedar.policy_set.CedarPolicies.slice`).

A slice also knows what its policies can observe of a request's context
(:class:`ContextProjection`): the decider's memo keys Cedar's answers on
that, not on the whole context. A slice that never reads ``context.time`` is
answered the same at every second, and one that only compares
``context.estimated_tokens`` with constants (``> 10000``) the same for
every estimate on the same side of each constant.

Everything here reads policies in Cedar's JSON form (their "bodies").
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Protocol

import cedarpy

from services.policy.cedar.entities import NAMESPACE, Uid
from services.policy.decider import ACTIONS

__all__ = [
    "ContextProjection",
    "PolicySlice",
    "PolicySubsets",
    "applicable_policy_ids",
]

#: Comparisons whose outcome for ``value OP constant`` only depends on where
#: ``value`` falls among the constants (and whether it equals one).
_ORDERING_OPERATORS: Final = frozenset({"<", "<=", ">", ">=", "==", "!="})


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
            for condition in body.get("conditions", ()):
                whole |= _record_context_reads(condition.get("body"), uses)
        attrs = tuple(
            (name, None if constants is None else tuple(sorted(constants)))
            for name, constants in sorted(uses.items())
        )
        return cls(whole=whole, attrs=attrs)

    def key(self, context: Mapping[str, Any]) -> tuple[Any, ...]:
        """The part of ``context`` the policies' answer can depend on."""
        if self.whole:
            return ("whole", _whole_context_key(context))
        out: list[Any] = []
        for name, constants in self.attrs:
            value = context[name]
            if constants is not None and type(value) is int:
                position = bisect_left(constants, value)
                out.append((position, position < len(constants) and constants[position] == value))
            else:
                out.append(_hashable(value))
        return tuple(out)


def _whole_context_key(context: Mapping[str, Any]) -> tuple[Any, ...]:
    """The context as a memo key (its sets as sorted tuples)."""
    return (
        context["estimated_tokens"],
        context["estimated_tokens_known"],
        tuple(sorted(context["data_tags"])),
        tuple(sorted(context["on_behalf_of"])),
        context["time"],
    )


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


def _record_context_reads(node: Any, uses: dict[str, set[int] | None]) -> bool:
    """Record in ``uses`` how ``node``'s subtree reads the context; True if it reads it whole."""
    if isinstance(node, dict):
        if node == {"Var": "context"}:
            return True  # the context itself, not one attribute of it
        name = _context_attr(node)
        if name is not None:  # read some way other than compared with a constant
            uses[name] = None
            return False
        if len(node) == 1:
            ((operator, operands),) = node.items()
            if operator in _ORDERING_OPERATORS and isinstance(operands, dict):
                left, right = operands.get("left"), operands.get("right")
                for side, other in ((left, right), (right, left)):
                    attr, constant = _context_attr(side), _int_constant(other)
                    if attr is not None and constant is not None:
                        constants = uses.get(attr, set())
                        if constants is not None:
                            constants.add(constant)
                            uses[attr] = constants
                        return False
        children: Iterable[Any] = node.values()
    elif isinstance(node, list):
        children = node
    else:
        return False
    whole = False
    for child in children:  # every child, not any(): each records its reads
        whole |= _record_context_reads(child, uses)
    return whole


def _hashable(value: Any) -> Any:
    if isinstance(value, list | tuple | set | frozenset):
        return ("set", tuple(sorted(map(repr, value))))
    if isinstance(value, dict):
        return ("record", tuple(sorted((k, _hashable(v)) for k, v in value.items())))
    return value


class PolicySubsets(Protocol):
    """What a slice needs of its policy set (:class:`~.policy_set.CedarPolicies` is one)."""

    @property
    def approval_ids(self) -> frozenset[str]:
        """Ids of the ``@effect("needs_approval")`` forbids."""
        ...

    def compiled_set(self, ids: tuple[str, ...]) -> cedarpy.PolicySet:
        """The compiled set of exactly these policies."""
        ...


@dataclass(frozen=True, slots=True)
class PolicySlice:
    """The policies of a set that can apply to one (principal, action, resource).

    Attributes:
        policies: The set they belong to.
        ids: Their ``@id`` values.
        cedar: Them, compiled.
        context: What they can observe of a request's context.
    """

    policies: PolicySubsets
    ids: tuple[str, ...]
    cedar: cedarpy.PolicySet
    context: ContextProjection

    def without_approvals(self) -> cedarpy.PolicySet:
        """The slice minus its ``@effect("needs_approval")`` forbids."""
        approval_ids = self.policies.approval_ids
        return self.policies.compiled_set(
            tuple(policy_id for policy_id in self.ids if policy_id not in approval_ids)
        )


def applicable_policy_ids(
    bodies: Mapping[str, Any], principal: Uid, action: Uid, resource: Uid
) -> tuple[str, ...]:
    """Ids of the policies (``@id`` -> JSON form, in set order) whose scope can match."""
    return tuple(
        policy_id
        for policy_id, body in bodies.items()
        if _scope_admits(body.get("principal"), principal)
        and _action_scope_admits(body.get("action"), action)
        and _scope_admits(body.get("resource"), resource)
    )


def _scope_admits(scope: Any, uid: Uid) -> bool:
    """Whether a principal or resource scope can match ``uid`` (True when unsure)."""
    if not isinstance(scope, dict):
        return True
    operator = scope.get("op")
    if operator == "==":
        entity = scope.get("entity")
        if isinstance(entity, dict) and "type" in entity and "id" in entity:
            return (entity["type"], entity["id"]) == uid
        return True
    if operator == "is" and "in" not in scope:
        return bool(scope.get("entity_type") == uid[0])
    return True  # All, `in` (a hierarchy), `is ... in`: kept


def _action_scope_admits(scope: Any, action: Uid) -> bool:
    """Whether an action scope can match ``action`` (True when unsure)."""
    if not isinstance(scope, dict):
        return True
    operator = scope.get("op")
    if operator == "==":
        return _scope_admits(scope, action)
    if operator == "in":
        listed = scope.get("entities") or [scope.get("entity")]
        uids = [
            (entity.get("type"), entity.get("id")) for entity in listed if isinstance(entity, dict)
        ]
        if action in uids:
            return True
        # Only concrete actions listed (no group that could contain this one): ruled out.
        known = {(f"{NAMESPACE}::Action", name) for name in ACTIONS}
        return not (len(uids) == len(listed) and all(uid in known for uid in uids))
    return True
