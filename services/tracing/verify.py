"""Verifying the audit hash chain: pure functions over the records of a stream.

The chain is sound when, record after record in stream order:

* the stream sequence has no gap (a deleted message leaves one);
* every record decodes and its ``hash`` is the SHA-256 of its own canonical
  encoding (:func:`services.tracing.chain.record_hash`);
* its ``seq`` is its predecessor's plus one and its ``prev_hash`` is the
  predecessor's ``hash`` (the first record links to :data:`GENESIS`, or to
  the stated anchor when verifying from the middle of the trail);
* no event id appears twice.

:class:`ChainVerifier` checks records fed one at a time and stops at the
first problem, which it names precisely (:class:`Problem`: what, at which
stream sequence); :func:`verify` runs it over any iterable. The CLI feeds it
from ``SB_AUDIT`` (``signalbox audit verify``); the tests feed it tampered
copies.

Example::

    report = verify(enumerate(records, start=1))
    if report.problem:
        print(report.problem.message)
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from broker.errors import SchemaError
from schemas import AuditEvent
from services.tracing.chain import GENESIS, record_hash

__all__ = [
    "LOOKAHEAD",
    "ChainVerifier",
    "Problem",
    "ProblemKind",
    "VerifyReport",
    "verify",
]

#: Records read past a forward jump in ``seq`` to tell a reorder from a deletion.
LOOKAHEAD = 1024

ProblemKind = Literal["modified", "missing", "reordered", "duplicate", "anchor"]


@dataclass(frozen=True, slots=True)
class Problem:
    """The first thing wrong with the chain.

    Attributes:
        kind: ``modified`` (a record's content does not match its hash, or it
            does not decode), ``missing`` (a gap in the stream or the chain, or
            a link to a hash no record has), ``reordered`` (a record stored
            before one it was chained after), ``duplicate`` (an event id
            stored twice), ``anchor`` (the first record does not start the
            chain where it should).
        seq: Stream sequence of the record where the problem shows.
        message: One sentence naming the sequence(s) involved.
        details: Machine-readable specifics (expected and found values).
    """

    kind: ProblemKind
    seq: int
    message: str
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class VerifyReport:
    """What a verification run checked, and the first problem if any.

    Attributes:
        checked: Records found sound (the faulty one, if any, is not counted).
        first_seq: Stream sequence of the first record checked (0: none).
        last_seq: Stream sequence of the last record checked.
        first_time: ``time`` of the first record checked.
        last_time: ``time`` of the last record checked.
        anchor: ``prev_hash`` the first record had to link to (:data:`GENESIS`
            for a full run, the first record's own ``prev_hash`` from a start
            time, which the run then takes on trust).
        head_hash: ``hash`` of the last sound record: compare it with a copy
            kept elsewhere to detect a rewrite of the whole tail.
        problem: The first problem, or ``None`` when the chain is sound.
    """

    checked: int = 0
    first_seq: int = 0
    last_seq: int = 0
    first_time: float = 0.0
    last_time: float = 0.0
    anchor: str = GENESIS
    head_hash: str = GENESIS
    problem: Problem | None = None

    @property
    def ok(self) -> bool:
        """No problem found."""
        return self.problem is None


class ChainVerifier:
    """Checks records fed in stream order; remembers the first problem and stops there.

    Args:
        anchor: The ``prev_hash`` the first record must carry (default
            :data:`GENESIS`, with the first record at chain position 1);
            ``None`` accepts the first record's ``prev_hash`` and ``seq`` as
            they are (verifying from the middle of the trail).
        lookahead: Records to read past a forward jump in ``seq`` before
            calling it missing records rather than a reorder.

    Call :meth:`feed` for each ``(stream sequence, record)`` until it returns
    a :class:`Problem`, then :meth:`finish`.
    """

    def __init__(self, *, anchor: str | None = GENESIS, lookahead: int = LOOKAHEAD) -> None:
        self.report = VerifyReport(anchor=anchor if anchor is not None else "")
        self._anchored = anchor is not None
        self._lookahead = lookahead
        self._next_pos = 0
        self._prev_seq = 0
        self._ids: dict[str, int] = {}
        # A forward jump under investigation: (stream seq, record) and records read since.
        self._jump: tuple[int, AuditEvent] | None = None
        self._since_jump = 0

    @property
    def problem(self) -> Problem | None:
        """The first problem found so far."""
        return self.report.problem

    def feed(
        self, pos: int, record: AuditEvent | SchemaError, raw: bytes | None = None
    ) -> Problem | None:
        """Check the record stored at stream sequence ``pos``; the first problem, once found.

        ``raw``, the stored bytes, speeds the hash check up: hashed as stored
        (``hash`` blanked) when they are the canonical encoding, which is
        what the sequencer writes; anything else falls back to re-encoding.
        """
        if self.report.problem is not None:
            return self.report.problem
        if self._jump is not None:
            return self._look_ahead(pos, record)
        problem = self._check(pos, record, raw)
        if problem is not None:
            self.report.problem = problem
        return self.report.problem

    def finish(self, last_pos: int | None = None) -> VerifyReport:
        """End of the records; ``last_pos`` is the stream's last sequence (tail deletions).

        Returns:
            The report (its ``problem`` set if anything was wrong).
        """
        rep = self.report
        if rep.problem is None and self._jump is not None:
            rep.problem = self._missing_at_jump()
        if rep.problem is None and last_pos is not None and rep.checked and last_pos > rep.last_seq:
            rep.problem = Problem(
                "missing",
                rep.last_seq + 1,
                f"records at seq {_span(rep.last_seq + 1, last_pos)} are missing: the stream "
                f"ends at seq {last_pos} but its last readable record is seq {rep.last_seq}",
                {"expected_seq": rep.last_seq + 1, "stream_last_seq": last_pos},
            )
        return rep

    # -- checks -----------------------------------------------------------------------------

    def _check(
        self, pos: int, record: AuditEvent | SchemaError, raw: bytes | None
    ) -> Problem | None:
        rep = self.report
        first = rep.checked == 0
        if not first and pos != self._next_pos:
            return Problem(
                "missing",
                pos,
                f"records at seq {_span(self._next_pos, pos - 1)} are missing: the stream "
                f"jumps from seq {self._next_pos - 1} to seq {pos}",
                {"expected_seq": self._next_pos, "found_seq": pos},
            )
        if isinstance(record, SchemaError):
            return Problem(
                "modified",
                pos,
                f"record at seq {pos} was modified: it no longer decodes ({record.message})",
                {"error": record.code, **record.details},
            )
        if not _hash_matches(record, raw):
            return Problem(
                "modified",
                pos,
                f"record at seq {pos} was modified: its content does not match its hash "
                f"{record.hash[:12]}",
                {"hash": record.hash, "computed": record_hash(record), "id": record.id},
            )
        seen = self._ids.get(record.id)
        if seen is not None:
            return Problem(
                "duplicate",
                pos,
                f"record at seq {pos} duplicates event {record.id}, already stored at seq {seen}",
                {"id": record.id, "first_seq": seen},
            )
        problem = self._check_anchor(pos, record) if first else self._check_link(pos, record)
        if problem is None and self._jump is None:  # (a jump is not accepted yet)
            self._accept(pos, record)
        return problem

    def _check_anchor(self, pos: int, record: AuditEvent) -> Problem | None:
        if not self._anchored:
            self.report.anchor = record.prev_hash
            return None
        if record.seq != 1 or record.prev_hash != self.report.anchor:
            return Problem(
                "anchor",
                pos,
                f"the first record (seq {pos}) does not start the chain: it is chained at "
                f"position {record.seq} after hash {record.prev_hash[:12]}, not at position 1 "
                f"after {self.report.anchor[:12]}; earlier records are missing (or verify "
                "with --since)",
                {"seq": record.seq, "prev_hash": record.prev_hash, "anchor": self.report.anchor},
            )
        return None

    def _check_link(self, pos: int, record: AuditEvent) -> Problem | None:
        expected = self._prev_seq + 1
        head = self.report.head_hash
        if record.seq == expected and record.prev_hash == head:
            return None
        if record.seq < expected:
            return Problem(
                "reordered",
                pos,
                f"records are out of order at seq {pos}: record {record.seq} is stored after "
                f"record {self._prev_seq}",
                {"record_seq": record.seq, "after_seq": self._prev_seq},
            )
        if record.seq > expected:
            self._jump = (pos, record)
            self._since_jump = 0
            return None
        return Problem(
            "missing",
            pos,
            f"record at seq {pos} is chained after hash {record.prev_hash[:12]}, which no "
            f"record has: record {self._prev_seq} (seq {pos - 1}, hash {head[:12]}) was "
            "replaced, or the record chained between them is missing",
            {"prev_hash": record.prev_hash, "expected_prev_hash": head},
        )

    def _look_ahead(self, pos: int, record: AuditEvent | SchemaError) -> Problem | None:
        assert self._jump is not None
        jump_pos, jumped = self._jump
        expected = self._prev_seq + 1
        self._since_jump += 1
        if isinstance(record, AuditEvent) and record.seq == expected:
            self.report.problem = Problem(
                "reordered",
                jump_pos,
                f"records are out of order at seq {jump_pos}: record {jumped.seq} is stored "
                f"before record {expected} (found at seq {pos})",
                {"record_seq": jumped.seq, "expected_seq": expected, "found_at": pos},
            )
        elif self._since_jump >= self._lookahead:
            self.report.problem = self._missing_at_jump()
        return self.report.problem

    def _missing_at_jump(self) -> Problem:
        assert self._jump is not None
        pos, record = self._jump
        expected = self._prev_seq + 1
        return Problem(
            "missing",
            pos,
            f"chain records {_span(expected, record.seq - 1)} are missing: record "
            f"{record.seq} at seq {pos} follows record {self._prev_seq}",
            {"expected_seq": expected, "record_seq": record.seq},
        )

    def _accept(self, pos: int, record: AuditEvent) -> None:
        rep = self.report
        if rep.checked == 0:
            rep.first_seq, rep.first_time = pos, record.time
        rep.checked += 1
        rep.last_seq, rep.last_time = pos, record.time
        rep.head_hash = record.hash
        self._prev_seq = record.seq
        self._next_pos = pos + 1
        self._ids[record.id] = pos


def _hash_matches(record: AuditEvent, raw: bytes | None) -> bool:
    if raw is not None and len(record.hash) == 64:
        stored = b'"hash":"' + record.hash.encode() + b'"'
        if raw.count(stored) == 1:
            blanked = raw.replace(stored, b'"hash":""')
            if hashlib.sha256(blanked).hexdigest() == record.hash:
                return True
    return record_hash(record) == record.hash


def _span(first: int, last: int) -> str:
    return str(first) if first == last else f"{first}-{last}"


def verify(
    records: Iterable[tuple[int, AuditEvent | SchemaError]]
    | Iterable[tuple[int, AuditEvent | SchemaError, bytes]],
    *,
    anchor: str | None = GENESIS,
    last_pos: int | None = None,
    lookahead: int = LOOKAHEAD,
) -> VerifyReport:
    """Verify ``(stream sequence, record)`` pairs in stream order; stops at the first problem.

    Args:
        records: ``(stream sequence, record)`` or ``(stream sequence, record,
            stored bytes)``, in stream order (a :class:`SchemaError` stands
            for one that does not decode).
        anchor: See :class:`ChainVerifier` (``None``: verifying from the middle).
        last_pos: The stream's last sequence, to detect records missing at the end.
        lookahead: See :class:`ChainVerifier`.
    """
    verifier = ChainVerifier(anchor=anchor, lookahead=lookahead)
    for item in records:
        if verifier.feed(*item) is not None:
            break
    return verifier.finish(last_pos)
