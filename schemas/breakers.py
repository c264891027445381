"""Circuit breakers: the records of the KV bucket ``sb_breakers`` and the operator
endpoints ``sb.admin.breakers.<op>`` (list, trip, reset).

A breaker stops an agent or a whole team fleet-wide: every policy replica
reads the bucket (watched, in memory) before every decision. It is keyed
``<scope>.<name>`` (``agent.fraud-detection``, ``team.risk``) and is
``closed`` (calls flow), ``open`` (refused with ``breaker_open`` until the
cool-down ends, or until an operator resets it) or ``half_open`` (the
cool-down ended and one probe call, claimed by one replica, is in flight;
its outcome closes the breaker or re-opens it with a doubled cool-down).
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from schemas._base import Wire

__all__ = [
    "Breaker",
    "BreakerList",
    "BreakerProbe",
    "BreakerReason",
    "BreakerScope",
    "BreakerState",
    "ListBreakers",
    "ResetBreaker",
    "TripBreaker",
]

BreakerScope = Literal["agent", "team"]
BreakerState = Literal["closed", "open", "half_open"]
#: Why a breaker tripped: a budget was exhausted (the cost service), an agent's
#: call rate jumped over its baseline, a target's error rate crossed the
#: threshold, a call chain looped, or an operator tripped it. ``unreadable``:
#: its stored record cannot be read, so it is held open (fail closed) until an
#: operator resets it, which writes a clean record.
BreakerReason = Literal["budget", "rate_anomaly", "error_rate", "call_loop", "manual", "unreadable"]

#: ``agent.<name>`` or ``team.<name>``; names are subject tokens.
BreakerKey = Annotated[str, msgspec.Meta(pattern=r"^(agent|team)\.[A-Za-z0-9_-]{1,64}$(?!\n)")]
# No control characters. ``$(?!\n)``: Python's ``$`` also matches before a final newline.
_Text = Annotated[str, msgspec.Meta(max_length=512, pattern=r"^[^\x00-\x1f\x7f]*$(?!\n)")]
_Short = Annotated[str, msgspec.Meta(max_length=128, pattern=r"^[^\x00-\x1f\x7f]*$(?!\n)")]
# Up to 30 days; None: until an operator resets it.
_Cooldown = Annotated[float, msgspec.Meta(gt=0, le=30 * 86_400)]


class BreakerProbe(Wire, frozen=True, tag="breaker_probe.v1"):
    """The one call a half-open breaker lets through, claimed by one replica.

    Attributes:
        claimed_by: Who claimed it (``service:policy``) and its instance.
        claimed_at: Unix time of the claim; a claim older than the probe
            timeout (its replica died) may be taken over.
        call_id: The probing call (or authorization request) id.
    """

    claimed_by: str
    claimed_at: float
    call_id: str = ""


class Breaker(Wire, frozen=True, tag="breaker.v1"):
    """One breaker (KV ``sb_breakers``, key :attr:`key`).

    Attributes:
        key: ``<scope>.<name>`` (``agent.fraud-detection``, ``team.risk``).
        scope: ``agent`` or ``team``.
        name: The agent's or team's name.
        state: ``closed``, ``open`` or ``half_open``.
        reason: What tripped it (``budget``, ``rate_anomaly``, ``error_rate``,
            ``call_loop``, ``manual``; ``unreadable``: the stored record could not
            be read, see :data:`BreakerReason`); kept after it closes, for the record.
        text: Why, in words an operator can act on.
        figures: The numbers that tripped it (``rate``, ``baseline``,
            ``error_rate``, ``calls``, ``depth``...).
        since: Unix time it (last) tripped.
        until: Unix time its cool-down ends (then one probe may pass);
            None: until an operator resets it.
        cooldown: Length of the current cool-down in seconds (doubles after
            each failed probe, up to a cap); 0 with ``until`` None.
        tripped_by: Who tripped it (``service:policy``, ``service:cost``,
            ``operator:<login>``).
        trips: How many times it tripped (re-opening after a failed probe counts).
        probe: The claimed probe while ``half_open``.
        changed_by: Who made the last change.
        changed_at: Unix time of the last change.
    """

    key: BreakerKey
    scope: BreakerScope
    name: str
    state: BreakerState
    reason: BreakerReason
    text: str = ""
    figures: dict[str, float] = msgspec.field(default_factory=dict)
    since: float = 0.0
    until: float | None = None
    cooldown: float = 0.0
    tripped_by: str = ""
    trips: int = 0
    probe: BreakerProbe | None = None
    changed_by: str = ""
    changed_at: float = 0.0


class ListBreakers(Wire, frozen=True, tag="list_breakers.v1"):
    """``sb.admin.breakers.list``: the breakers that are not closed (``all``: every one)."""

    all: bool = False


class BreakerList(Wire, frozen=True, tag="breaker_list.v1"):
    """Reply of ``list``: breakers by key."""

    breakers: tuple[Breaker, ...] = ()


class TripBreaker(Wire, frozen=True, tag="trip_breaker.v1"):
    """``sb.admin.breakers.trip``: open a breaker by hand (reason ``manual``).

    Attributes:
        key: ``agent.<name>`` or ``team.<name>``.
        text: Why (shown to refused callers; recorded and audited).
        cooldown: Seconds until one probe may pass; None: until reset.
        requested_by: Who asks (the operator's login; recorded and audited).
    """

    key: BreakerKey
    text: Annotated[
        str, msgspec.Meta(min_length=1, max_length=512, pattern=r"^[^\x00-\x1f\x7f]*$(?!\n)")
    ]
    cooldown: _Cooldown | None = None
    requested_by: _Short = ""


class ResetBreaker(Wire, frozen=True, tag="reset_breaker.v1"):
    """``sb.admin.breakers.reset``: close a breaker (whatever tripped it).

    Attributes:
        key: ``agent.<name>`` or ``team.<name>``.
        text: Why (recorded and audited).
        requested_by: Who asks.
    """

    key: BreakerKey
    text: _Text = ""
    requested_by: _Short = ""
