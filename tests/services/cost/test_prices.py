"""Prices: the shipped file, an operator's override, the fallback, and clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from broker.errors import ConfigError
from services.cost.prices import NANOS_PER_USD, load_prices, parse_prices, shipped_prices_text


def test_the_shipped_prices_cover_widely_used_models() -> None:
    prices = load_prices()
    assert prices.as_of
    for model in (
        "gpt-4o",
        "gpt-4o-mini",
        "gpt-4.1",
        "o3",
        "o4-mini",
        "claude-sonnet-4",
        "claude-3-5-haiku",
        "claude-opus-4",
        "gemini-1.5-pro",
        "gemini-2.5-flash",
        "mistral-large",
        "mistral-small",
        "llama-3.3-70b",
    ):
        match = prices.lookup(model)
        assert not match.fallback, model
        assert match.price.input > 0 and match.price.output > 0, model
    assert "as of" in shipped_prices_text().lower() or "as_of" in shipped_prices_text()


def test_dated_variants_match_the_longest_entry_and_unknown_models_the_fallback() -> None:
    prices = load_prices()
    assert prices.lookup("gpt-4o-2024-08-06").entry == "gpt-4o"
    assert prices.lookup("gpt-4o-mini-2024-07-18").entry == "gpt-4o-mini"
    assert prices.lookup("claude-sonnet-4-20250514").entry == "claude-sonnet-4"
    unknown = prices.lookup("my-own-model")
    assert unknown.fallback and unknown.entry == "" and unknown.price == prices.fallback
    # A prefix that is not followed by a separator is another model.
    assert prices.lookup("o3x").fallback


def test_cost_is_exact_and_cached_tokens_are_part_of_the_input() -> None:
    prices = load_prices()
    # gpt-4o: $2.50 in, $10 out, $1.25 cached, per million tokens.
    priced = prices.cost("gpt-4o", 1_000_000, 1_000_000, 400_000)
    assert priced.nanos == (600_000 * 2.5 + 400_000 * 1.25 + 1_000_000 * 10) * 1000
    assert not priced.fallback
    # More cached than input tokens cannot make a negative uncached count.
    assert prices.cost("gpt-4o", 10, 0, 50).nanos == round(10 * 1.25 * 1000)
    # One token of gpt-4o-mini cached input: $0.075 per million, i.e. 0.075 nano-dollars.
    assert prices.cost("gpt-4o-mini", 1_000_000, 0, 1_000_000).nanos == 75_000_000
    fallback = prices.cost("brand-new-model", 1_000_000, 0)
    assert fallback.fallback
    assert fallback.nanos == prices.fallback.input * 1_000_000 // 1000
    assert NANOS_PER_USD == 10**9


def test_an_override_file_replaces_entries_adds_models_and_the_fallback(tmp_path: Path) -> None:
    override = tmp_path / "prices.toml"
    override.write_text(
        'as_of = "2026-01-01"\n'
        "[fallback]\ninput = 1\noutput = 2\n"
        '[models."gpt-4o"]\ninput = 5\noutput = 20\n'
        '[models."in-house-7b"]\nprovider = "us"\ninput = 0.01\noutput = 0.02\n'
    )
    prices = load_prices(override)
    assert prices.as_of == "2026-01-01"
    assert prices.sources[-1] == str(override)
    gpt = prices.lookup("gpt-4o").price
    assert (gpt.input, gpt.output, gpt.cached_input) == (5_000_000, 20_000_000, 5_000_000)
    assert prices.lookup("in-house-7b").price.provider == "us"
    assert not prices.lookup("claude-sonnet-4").fallback  # shipped entries are kept
    assert prices.fallback.input == 1_000_000 and prices.fallback.output == 2_000_000
    assert prices.cost("whatever", 1_000_000, 1_000_000).nanos == 3 * NANOS_PER_USD


@pytest.mark.parametrize(
    ("text", "line", "field", "needle"),
    [
        ('[models."x"]\ninput = 1\noutput = "lots"\n', 3, "models.x.output", "decimal"),
        ('[models."x"]\ninput = 1\n', 1, "models.x.output", "missing required field"),
        ('[models."x"]\ninput = 1\noutput = 2\nbogus = 3\n', 4, "models.x.bogus", "unknown"),
        ('[models."x"]\ninput = -1\noutput = 2\n', 2, "models.x.input", ">= 0"),
        ("[fallback]\ninput = 1\n", 1, "fallback.output", "missing required field"),
        ('currency = "EUR"\n', 1, "currency", "only USD"),
        ("as_of = \n", 1, "", "not valid TOML"),
    ],
)
def test_a_bad_prices_file_names_its_file_line_and_field(
    tmp_path: Path, text: str, line: int, field: str, needle: str
) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_prices(path)
    err = caught.value
    assert err.details["file"] == str(path)
    assert err.details["line"] == line
    assert err.details["field"] == field
    assert needle in err.message
    assert err.message.startswith(f"{path}:{line}")


def test_a_missing_override_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="SIGNALBOX_PRICES_PATH"):
        load_prices(tmp_path / "nope.toml")


def test_the_shipped_file_parses_on_its_own() -> None:
    raw, models, fallback = parse_prices(shipped_prices_text())
    assert fallback is not None and raw.currency == "USD" and len(models) >= 15
