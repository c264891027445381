"""Versioned policy sets in the JetStream KV bucket ``sb_policies``.

Layout of the bucket (values are msgspec JSON of :mod:`schemas.policy` types)::

    set.<n>   PolicySetRecord   version n: every policy file (name -> text), the
                                schema, label, digest, policy ids, who and when.
                                Written once (``create``), never changed: every
                                version is kept, for history and rollback.
    active    ActivePolicy      pointer {version, digest, previous, who, when,
                                reason}: the version every replica evaluates.
    shadow    ActivePolicy      optional pointer to a stored version every
                                replica evaluates *beside* the active one on
                                live traffic, auditing each disagreement
                                (kind ``shadow``) without changing outcomes.

Versions are numbered 1, 2, ... in the order they were stored. Applying a
set validates it (Cedar parses and validates every policy against the
schema), stores it as the next ``set.<n>``, then moves ``active`` with a
compare-and-set on the pointer's revision: of two concurrent applies, one
moves the pointer and the other fails with ``conflict`` (its version is
withdrawn, nothing is overwritten silently). A rollback moves the pointer to
an earlier version (re-validated first). Every policy-service replica
watches ``active`` and swaps the new set in as soon as the pointer moves;
a replica validates the set again when loading it and keeps its current set
if that fails (so an invalid set never becomes active anywhere).

The first replica to start on an empty bucket stores the set of its
``SIGNALBOX_POLICY_DIR`` (default: the shipped policies) as version 1 and
points ``active`` at it; from then on the bucket, not the folder, decides.

An ``active`` pointer that cannot be read (not JSON, invalid UTF-8, a wrong
tag or field) is reported by :meth:`PolicyStore.pointer` with the reason,
never raised: a replica keeps the last set it loaded (at a cold start, its
folder's set) and raises an alarm, and ``apply`` or ``rollback --to N``
rewrites the pointer with a compare-and-set on its revision.
"""

from __future__ import annotations

import contextlib
import difflib
import time
from collections.abc import Mapping
from typing import Literal

import msgspec
from nats.js import JetStreamContext
from nats.js.errors import (
    KeyNotFoundError,
    KeyWrongLastSequenceError,
)
from nats.js.kv import KeyValue

from broker.codec import decode
from broker.errors import ConfigError, Conflict, InvalidInput, NotFound, SchemaError
from broker.runtime.jetstream import KV_POLICIES, bucket_keys
from schemas import (
    ActivePolicy,
    FileDiff,
    PolicyDiff,
    PolicyFiles,
    PolicySetRecord,
    PolicyVersionInfo,
)
from services.policy.cedar.policy_set import SCHEMA_FILE, CedarPolicies

__all__ = [
    "ACTIVE_KEY",
    "SHADOW_KEY",
    "PolicyStore",
    "diff_sets",
    "parse_candidate",
    "policies_of",
    "set_key",
    "unreadable_pointer",
]

#: Key of the pointer to the active version.
ACTIVE_KEY = "active"
#: Key of the pointer to the shadow version (absent: no shadow set).
SHADOW_KEY = "shadow"
_SET_PREFIX = "set."


def set_key(version: int) -> str:
    """Key of stored version ``version``."""
    return f"{_SET_PREFIX}{version}"


def unreadable_pointer(reason: str) -> str:
    """What an operator is told about an ``active`` pointer that cannot be read."""
    return (
        f"the active-policy pointer $KV.{KV_POLICIES}.{ACTIVE_KEY} cannot be read ({reason}); "
        "rewrite it with `signalbox policy rollback --to N` (a stored version, see "
        "`signalbox policy history`) or `signalbox policy apply DIR`"
    )


def parse_candidate(candidate: PolicyFiles, *, source: str = "candidate") -> CedarPolicies:
    """Parse and validate a candidate set.

    Raises:
        InvalidInput: an invalid set; ``details["errors"]`` holds Cedar's messages.
    """
    try:
        return CedarPolicies.from_texts(
            candidate.files, candidate.schema, label=candidate.label, source=source
        )
    except ConfigError as err:
        raise InvalidInput(
            f"{err.message}\nThe active policy set stays as it was; fix the policies "
            "above and run `signalbox policy validate DIR` until it passes",
            details={"errors": list(err.details.get("errors", [err.message]))},
        ) from err


def policies_of(record: PolicySetRecord) -> CedarPolicies:
    """Parse and validate a stored version, checking it is what its digest says.

    Raises:
        ConfigError: the stored set is invalid (Cedar's messages) or altered.
    """
    source = f"sb_policies {set_key(record.version)}"
    policies = CedarPolicies.from_texts(
        record.files, record.schema, label=record.label, source=source
    )
    if policies.digest != record.digest:
        raise ConfigError(
            f"{source}: its texts do not match its digest (stored {record.digest[:12]}, "
            f"computed {policies.digest[:12]}); it was altered outside Signalbox",
            details={"source": source},
        )
    return policies


class PolicyStore:
    """Reads and writes the ``sb_policies`` bucket (see the module docstring).

    Args:
        kv: The bucket.
        js: The JetStream context it belongs to (for listing versions).
    """

    def __init__(self, kv: KeyValue, js: JetStreamContext) -> None:
        self.kv = kv
        self.js = js

    async def active(self) -> tuple[ActivePolicy | None, int]:
        """The pointer and its revision (``(None, 0)`` before the first set).

        An unreadable pointer is ``(None, its revision)``: a compare-and-set
        on that revision (:meth:`move`) replaces it. :meth:`pointer` says why.
        """
        pointer, revision, _ = await self.pointer()
        return pointer, revision

    async def pointer(self) -> tuple[ActivePolicy | None, int, str]:
        """The pointer, its revision, and why it cannot be read ("" when it can, or is absent)."""
        try:
            entry = await self.kv.get(ACTIVE_KEY)
        except KeyNotFoundError:
            return None, 0, ""
        if not entry.value:
            return None, entry.revision or 0, ""
        try:
            return decode(entry.value, ActivePolicy), entry.revision or 0, ""
        except SchemaError as err:
            return None, entry.revision or 0, unreadable_pointer(err.message)

    async def shadow(self) -> ActivePolicy | None:
        """The shadow pointer (None: shadow mode is off)."""
        try:
            entry = await self.kv.get(SHADOW_KEY)
        except KeyNotFoundError:
            return None
        return decode(entry.value, ActivePolicy) if entry.value else None

    async def set_shadow(self, pointer: ActivePolicy | None) -> None:
        """Point ``shadow`` at a stored version, or turn shadow mode off (None)."""
        if pointer is None:
            with contextlib.suppress(KeyNotFoundError):
                await self.kv.delete(SHADOW_KEY)
            return
        await self.kv.put(SHADOW_KEY, msgspec.json.encode(pointer))

    async def get(self, version: int) -> PolicySetRecord:
        """Stored version ``version``.

        Raises:
            NotFound: there is no such version.
        """
        try:
            entry = await self.kv.get(set_key(version))
        except KeyNotFoundError:
            entry = None
        if entry is None or not entry.value:
            raise NotFound(
                f"policy set version {version} does not exist; "
                "`signalbox policy history` lists the stored versions",
                details={"version": version},
            )
        return decode(entry.value, PolicySetRecord)

    async def versions(self) -> list[int]:
        """Stored version numbers, ascending."""
        out = []
        for key in await bucket_keys(self.js, KV_POLICIES, _SET_PREFIX):
            if key.startswith(_SET_PREFIX) and key[len(_SET_PREFIX) :].isdigit():
                out.append(int(key[len(_SET_PREFIX) :]))
        return sorted(out)

    async def add(
        self, policies: CedarPolicies, created_by: str, *, version: int | None = None
    ) -> PolicySetRecord | None:
        """Store ``policies`` as a new version (the next free number, or exactly ``version``).

        Returns:
            The stored record; None when ``version`` was given and is taken.
        """
        n = version or (max(await self.versions(), default=0) + 1)
        while True:
            record = PolicySetRecord(
                version=n,
                digest=policies.digest,
                files=dict(policies.files),
                schema=policies.schema_text,
                label=policies.label,
                created_by=created_by,
                created_at=time.time(),
                policy_ids=tuple(policies.policies),
            )
            try:
                await self.kv.create(set_key(n), msgspec.json.encode(record))
                return record
            except KeyWrongLastSequenceError:
                if version is not None:
                    return None
                n += 1  # another apply took this number

    async def withdraw(self, version: int) -> None:
        """Delete a version that never became active (its apply lost a race)."""
        await self.kv.delete(set_key(version))

    async def move(self, pointer: ActivePolicy, revision: int) -> int:
        """Point ``active`` at ``pointer.version`` if it is still at ``revision``.

        Args:
            pointer: The new pointer.
            revision: Revision of the pointer it replaces (0: there was none).

        Raises:
            Conflict: the pointer moved in between (another apply or rollback).
        """
        body = msgspec.json.encode(pointer)
        try:
            if revision == 0:
                return await self.kv.create(ACTIVE_KEY, body)
            return await self.kv.update(ACTIVE_KEY, body, last=revision)
        except KeyWrongLastSequenceError:
            current, _ = await self.active()
            now = current.version if current else 0
            raise Conflict(
                f"the active policy set changed while this request ran (now version {now}, "
                f"by {current.changed_by if current else 'unknown'}); nothing was changed. "
                "Check `signalbox policy history` and retry",
                details={"active": now},
            ) from None

    async def info(self, version: int, active: int) -> PolicyVersionInfo | None:
        """Summary of one version (None if it is gone or unreadable)."""
        try:
            record = await self.get(version)
        except (NotFound, SchemaError):
            return None
        return PolicyVersionInfo(
            version=record.version,
            digest=record.digest,
            label=record.label,
            created_by=record.created_by,
            created_at=record.created_at,
            policy_ids=record.policy_ids,
            active=record.version == active,
        )


def _texts(files: Mapping[str, str], schema: str) -> dict[str, str]:
    return {SCHEMA_FILE: schema, **files}


def diff_sets(
    old: PolicySetRecord,
    new_files: Mapping[str, str],
    new_schema: str,
    new_ids: tuple[str, ...],
    *,
    to_name: str,
) -> PolicyDiff:
    """Per-file unified diff of two sets, plus the policy ids added and removed."""
    from_name = f"v{old.version}"
    before = _texts(old.files, old.schema)
    after = _texts(new_files, new_schema)
    files = []
    for name in sorted(set(before) | set(after)):
        a, b = before.get(name), after.get(name)
        if a == b:
            continue
        lines = difflib.unified_diff(
            (a or "").splitlines(keepends=True),
            (b or "").splitlines(keepends=True),
            fromfile=f"{from_name}/{name}" if a is not None else "/dev/null",
            tofile=f"{to_name}/{name}" if b is not None else "/dev/null",
        )
        text = "".join(line if line.endswith("\n") else line + "\n" for line in lines)
        change: Literal["added", "removed", "modified"] = (
            "added" if a is None else "removed" if b is None else "modified"
        )
        files.append(FileDiff(name=name, change=change, diff=text))
    old_ids, new_set = set(old.policy_ids), set(new_ids)
    return PolicyDiff(
        from_name=from_name,
        to_name=to_name,
        files=tuple(files),
        added_ids=tuple(i for i in new_ids if i not in old_ids),
        removed_ids=tuple(i for i in old.policy_ids if i not in new_set),
    )
