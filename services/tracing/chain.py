"""The audit hash chain: how a record's hash is computed and checked."""

from __future__ import annotations

import hashlib

import msgspec

from broker.codec import encode
from schemas import AuditEvent

__all__ = ["GENESIS", "chain", "record_hash"]

#: ``prev_hash`` of the first record.
GENESIS = "0" * 64


def record_hash(event: AuditEvent) -> str:
    """SHA-256 of the canonical JSON encoding of ``event`` with ``hash`` blanked."""
    blank = msgspec.structs.replace(event, hash="")
    return hashlib.sha256(encode(blank)).hexdigest()


def chain(event: AuditEvent, seq: int, prev_hash: str) -> AuditEvent:
    """``event`` placed at position ``seq`` after a record hashing to ``prev_hash``."""
    placed = msgspec.structs.replace(event, seq=seq, prev_hash=prev_hash, hash="")
    return msgspec.structs.replace(placed, hash=record_hash(placed))
