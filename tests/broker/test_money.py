"""Amounts below a cent keep their significant digits wherever they are printed."""

from __future__ import annotations

import pytest

from broker.money import usd


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (0.0005, "$0.0005"),
        (0.0003, "$0.0003"),
        (0.00034567, "$0.0003457"),
        (0.0125, "$0.0125"),
        (0.14, "$0.14"),
        (1.189, "$1.189"),
        (1.2, "$1.20"),
        (25, "$25.00"),
        (99.99, "$99.99"),
        (1234.5, "$1,234.50"),
        (1_000_000, "$1,000,000.00"),
        (0, "$0.00"),
        (-0.02, "-$0.02"),
        (1e-9, "$0.000000001"),
    ],
)
def test_usd_keeps_significant_digits(value: float, text: str) -> None:
    assert usd(value) == text


def test_the_budgets_table_keeps_a_tiny_budgets_digits() -> None:
    from rich.console import Console

    from schemas import Budget, BudgetStatus
    from services.cli.budgets_cmds import budget_table

    budget = Budget(scope="agent", name="a", window="day", limit_usd=0.0005)
    status = BudgetStatus(
        budget=budget, spent_usd=0.0003, reserved_usd=0.0, remaining_usd=0.0002,
        window_start=0.0,
    )  # fmt: skip
    console = Console(width=80, record=True)
    console.print(budget_table((status,)))
    text = console.export_text()
    assert "$0.0005" in text and "$0.0003" in text and "$0.0002" in text
