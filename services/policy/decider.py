"""Call decisions behind one small interface.

:class:`Decider` is the seam: the policy service asks it about every
mediated call and never cares how it decides. This module ships the
allow-list decider (deny by default); the Cedar engine plugs in behind the
same interface.

Allow-list file (YAML)::

    version: "2026-11-25.1"          # shown in every decision and audit event
    allow:
      - id: loan-may-score           # policy id reported with the decision
        caller: loan-origination     # agent name or "*"
        target: credit-check         # agent name or "*"
        capabilities: [score]        # names, or ["*"]
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Protocol

import msgspec
import yaml

from broker.errors import ConfigError
from schemas import AgentRecord, Decision

__all__ = ["AllowList", "AllowRule", "CallRequest", "Decider"]


@dataclass(frozen=True, slots=True)
class CallRequest:
    """What a decider sees about one call."""

    caller: str
    target: str
    capability: str
    caller_record: AgentRecord | None
    target_record: AgentRecord | None


class Decider(Protocol):
    """Decides calls. Implementations must be fast (cached), pure, and fail closed."""

    @property
    def version(self) -> str:
        """Version of the active rule set."""
        ...

    def decide(self, request: CallRequest) -> Decision:
        """Allow, deny or ask for approval; never raise for a bad request, deny instead."""
        ...


Pattern = Annotated[str, msgspec.Meta(pattern=r"^(\*|[A-Za-z0-9_-]{1,64})\Z")]


class AllowRule(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One allow rule of the allow-list file."""

    id: Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
    caller: Pattern
    target: Pattern
    capabilities: tuple[Pattern, ...] = ("*",)


class _AllowFile(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    version: str = ""
    allow: tuple[AllowRule, ...] = ()


class AllowList:
    """Deny-by-default allow-list.

    Rules are indexed by (caller, target) at load, so a decision is a few
    dict lookups, whatever the number of rules.
    """

    def __init__(self, rules: tuple[AllowRule, ...] = (), version: str = "") -> None:
        self.rules = rules
        digest = hashlib.sha256(msgspec.json.encode(rules)).hexdigest()[:12]
        self._version = version or f"allowlist-{digest}"
        self._index: dict[tuple[str, str], list[AllowRule]] = {}
        for rule in rules:
            self._index.setdefault((rule.caller, rule.target), []).append(rule)

    @property
    def version(self) -> str:
        """Version of this rule set (from the file, else a content digest)."""
        return self._version

    @classmethod
    def from_yaml(cls, text: str, *, source: str = "<string>") -> AllowList:
        """Parse an allow-list document.

        Raises:
            ConfigError: not YAML, or not the documented shape (with the path).
        """
        try:
            raw = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(
                f"{source}: not valid YAML: {exc}", details={"source": source}
            ) from exc
        try:
            doc = msgspec.convert(raw, _AllowFile)
        except msgspec.ValidationError as exc:
            raise ConfigError(
                f"{source}: {exc}; see the allow-list format in services/policy/decider.py",
                details={"source": source, "error": str(exc)},
            ) from exc
        return cls(doc.allow, str(doc.version))

    @classmethod
    def from_file(cls, path: Path) -> AllowList:
        """Load ``path``; a missing file is an empty list (everything denied)."""
        if not path.exists():
            return cls((), "deny-all")
        return cls.from_yaml(path.read_text(), source=str(path))

    def decide(self, request: CallRequest) -> Decision:
        """Allow if a rule matches caller, target and capability; deny otherwise."""
        start = time.perf_counter()
        if request.caller_record is None:
            return self._deny(
                start,
                f"caller {request.caller!r} is not registered; register it before it calls",
                "unregistered-caller",
            )
        for key in (
            (request.caller, request.target),
            (request.caller, "*"),
            ("*", request.target),
            ("*", "*"),
        ):
            for rule in self._index.get(key, ()):
                if "*" in rule.capabilities or request.capability in rule.capabilities:
                    return Decision(
                        effect="allow",
                        reasons=(f"allowed by rule {rule.id!r}",),
                        policy_ids=(rule.id,),
                        policy_version=self._version,
                        eval_us=(time.perf_counter() - start) * 1e6,
                    )
        return self._deny(
            start,
            f"no rule allows {request.caller} to call {request.target}.{request.capability} "
            "(deny by default)",
            "default-deny",
        )

    def _deny(self, start: float, reason: str, policy_id: str) -> Decision:
        return Decision(
            effect="deny",
            reasons=(reason,),
            policy_ids=(policy_id,),
            policy_version=self._version,
            eval_us=(time.perf_counter() - start) * 1e6,
        )
