"""Fixtures of the CLI tests."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _cli_operator(cli_operator: None) -> None:
    """Every test here runs the CLI as an operator of its server (tests/conftest.py)."""
