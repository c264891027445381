"""Money shown to the precision it has: ``usd(0.0005)`` is ``$0.0005``, not ``$0.00``.

One formatter for every amount Signalbox prints (errors, tables, logs,
traces): four significant digits, at least two decimals (trailing zeros past
the cents dropped), two decimals from $100 up, thousands separated.
"""

from __future__ import annotations

import math

__all__ = ["usd"]


def usd(value: float) -> str:
    """``value`` US dollars as text: ``$0.0005``, ``$0.0125``, ``$1.189``, ``$25.00``,
    ``$1,234.50``, ``-$0.02``."""
    if not math.isfinite(value):
        return f"${value}"
    sign = "-" if value < 0 else ""
    amount = abs(value)
    if amount == 0:
        return "$0.00"
    if amount >= 100:
        return f"{sign}${amount:,.2f}"
    decimals = max(2, 3 - math.floor(math.log10(amount)))
    whole, _, fraction = f"{amount:,.{decimals}f}".partition(".")
    fraction = fraction.rstrip("0").ljust(2, "0")
    return f"{sign}${whole}.{fraction}"
