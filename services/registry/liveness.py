"""Health from heartbeat times: the cut-offs of one instant, in Python and in SQL.

A version is ``healthy`` while its last heartbeat is within ``stale_after``
seconds, ``stale`` until ``down_after``, then ``down``. :class:`Cutoffs`
labels records; :func:`health_condition` filters on the same comparisons in
SQL, so a filter and the labels of what it returns always agree.
"""

from __future__ import annotations

from typing import Final

from sqlalchemy import ColumnElement, and_, bindparam

from schemas import Health
from services.registry.tables import AGENT_VERSIONS

__all__ = ["NO_CUTOFF", "Cutoffs", "health_condition"]

#: A heartbeat time every heartbeat is at or after (no cut-off).
NO_CUTOFF: Final = float("-inf")


class Cutoffs:
    """Heartbeat times separating healthy, stale and down at one instant."""

    __slots__ = ("down", "stale")

    def __init__(self, now: float, stale_after: float, down_after: float) -> None:
        self.stale = now - stale_after
        self.down = now - down_after

    def health(self, last_heartbeat: float) -> Health:
        """Health of a version whose last heartbeat was at ``last_heartbeat``."""
        # The same comparisons as health_condition, so filters and labels agree.
        if last_heartbeat >= self.stale:
            return "healthy"
        if last_heartbeat >= self.down:
            return "stale"
        return "down"


def health_condition(health: Health) -> ColumnElement[bool]:
    """SQL condition on a version's heartbeat time for ``health``.

    The cut-offs are the bound parameters ``p_stale`` and ``p_down``
    (:attr:`Cutoffs.stale`, :attr:`Cutoffs.down`).
    """
    lh = AGENT_VERSIONS.c.last_heartbeat
    if health == "healthy":
        return lh >= bindparam("p_stale")
    if health == "stale":
        return and_(lh < bindparam("p_stale"), lh >= bindparam("p_down"))
    return lh < bindparam("p_down")
