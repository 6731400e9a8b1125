"""The price book: genai-prices' catalogue priced to the micro-unit, config overrides win.

Every catalogue charge is checked against genai-prices' own ``calc_price`` for the same
usage (real bundled data, no copy of any price here except in the override cases).
"""

from __future__ import annotations

import random
from decimal import ROUND_HALF_UP, Decimal

import genai_prices
import pytest
from genai_prices import data_snapshot

from gateway.config.model import ModelPriceOverride
from gateway.policies.llm_usage import TokenUsage
from gateway.policies.prices import PriceBook, cost_micro, worst_case_micro


def catalogue_micro(usage: TokenUsage, provider: str | None) -> int:
    """genai-prices' own price for ``usage``, in micro-units rounded half up once."""
    priced = genai_prices.calc_price(
        genai_prices.Usage(
            input_tokens=usage.input,
            output_tokens=usage.output,
            cache_read_tokens=usage.cache_read,
            cache_write_tokens=usage.cache_write,
            output_reasoning_tokens=usage.reasoning,
        ),
        usage.model,
        provider_id=provider,
    )
    return int((priced.total_price * 1_000_000).to_integral_value(rounding=ROUND_HALF_UP))


CASES = [
    ("gpt-4o-mini", "openai", TokenUsage("gpt-4o-mini", 1200, 300, cache_read=1000)),
    ("gpt-4o-mini", None, TokenUsage("gpt-4o-mini-2024-07-18", 7, 3)),
    ("o3-mini", "openai", TokenUsage("o3-mini-2025-01-31", 5000, 2400, 1024, reasoning=1800)),
    ("embeddings", "openai", TokenUsage("text-embedding-3-small", 8191, 0)),
    (
        "claude-3-5-haiku",
        "anthropic",
        TokenUsage("claude-3-5-haiku-20241022", 3000, 450, cache_read=1500, cache_write=700),
    ),
    (
        "claude-sonnet-4",
        "anthropic",
        TokenUsage("claude-sonnet-4-20250514", 25, 15),
    ),
    # Past the 200k-token tier every token pays the dearer price.
    ("sonnet-4-5 base tier", "anthropic", TokenUsage("claude-sonnet-4-5", 200_000, 1000, 5000)),
    ("sonnet-4-5 top tier", "anthropic", TokenUsage("claude-sonnet-4-5", 200_001, 1000, 5000)),
]


@pytest.mark.parametrize(("name", "provider", "usage"), CASES, ids=[c[0] for c in CASES])
def test_catalogue_charge_equals_genai_prices(
    name: str, provider: str | None, usage: TokenUsage
) -> None:
    price = PriceBook({}).price_of(usage.model, provider)
    assert price is not None
    assert price.source.startswith(f"genai-prices {genai_prices.__version__}: provider ")
    assert cost_micro(price, usage) == catalogue_micro(usage, provider)


def test_gpt_4o_mini_costs_what_its_price_list_says() -> None:
    price = PriceBook({}).price_of("gpt-4o-mini-2024-07-18", "openai")
    assert price is not None
    assert (
        price.source
        == f"genai-prices {genai_prices.__version__}: provider openai, model gpt-4o-mini"
    )
    assert (price.input, price.output, price.cache_read) == (
        Decimal("0.15"),
        Decimal("0.6"),
        Decimal("0.075"),
    )
    # 200 fresh input at 0.15, 1000 cached at 0.075, 300 output at 0.6 (per million):
    # 30 + 75 + 180 micro-units.
    usage = TokenUsage("gpt-4o-mini-2024-07-18", 1200, 300, cache_read=1000)
    assert cost_micro(price, usage) == 285


@pytest.mark.parametrize("provider", ["openai", "anthropic", "deepseek", "google"])
def test_every_catalogue_model_of_a_provider_prices_as_genai_prices(provider: str) -> None:
    """Differential: each model of the provider (dated and time-of-day prices, tiers,
    per-request fees included) against calc_price over varied usages."""
    book = PriceBook({})
    rng = random.Random(provider)
    models = next(p for p in data_snapshot.get_snapshot().providers if p.id == provider).models
    checked = 0
    for model in models:
        price = book.price_of(model.id, provider)
        if price is None:
            continue
        for _ in range(10):
            total_in = rng.choice([0, 1, 999, 128_000, 200_001, 1_000_001])
            cache_read = rng.randint(0, total_in)
            cache_write = rng.randint(0, total_in - cache_read)
            total_out = rng.choice([0, 1, 4097, 65_536])
            usage = TokenUsage(
                model.id,
                total_in,
                total_out,
                cache_read,
                cache_write,
                reasoning=rng.randint(0, total_out),
            )
            assert cost_micro(price, usage) == catalogue_micro(usage, provider), usage
            assert cost_micro(price, usage) <= worst_case_micro(price, total_in, total_out)
            checked += 1
    assert checked >= 50


def test_an_override_wins_over_the_catalogue() -> None:
    book = PriceBook(
        {"gpt-4o-mini": ModelPriceOverride(input_mtok=0.5, output_mtok=1.5, cache_read_mtok=0.25)}
    )
    price = book.price_of("gpt-4o-mini", "openai")
    assert price is not None
    assert price.source == "config prices"
    assert (price.input, price.output, price.cache_read, price.cache_write) == (
        Decimal("0.5"),
        Decimal("1.5"),
        Decimal("0.25"),
        Decimal("0.5"),  # unset: the input price
    )
    # 600 fresh at 0.5 + 400 cached at 0.25 + 200 out at 1.5 = 300 + 100 + 300.
    usage = TokenUsage("gpt-4o-mini", 1000, 200, cache_read=400)
    assert cost_micro(price, usage) == 700
    # Only the exact name is overridden: a dated name still has the catalogue's price.
    dated = book.price_of("gpt-4o-mini-2024-07-18", "openai")
    assert dated is not None
    assert dated.source.startswith("genai-prices")


def test_an_override_prices_a_model_the_catalogue_lacks() -> None:
    book = PriceBook(
        {
            "my-finetune": ModelPriceOverride(
                input_mtok=0.5, output_mtok=1.5, cache_read_mtok=0.25, cache_write_mtok=0.625
            )
        }
    )
    assert PriceBook({}).price_of("my-finetune", None) is None
    price = book.price_of("my-finetune", None)
    assert price is not None
    # 1 fresh at 0.5 + 2 cached at 0.25 + 4 written at 0.625 + 3 out (1 reasoning) at 1.5
    # = 0.5 + 0.5 + 2.5 + 4.5 = 8 micro-units.
    usage = TokenUsage("my-finetune", 7, 3, cache_read=2, cache_write=4, reasoning=1)
    assert cost_micro(price, usage) == 8


def test_a_cost_rounds_half_up_once() -> None:
    price = PriceBook({"m": ModelPriceOverride(input_mtok=0.5, output_mtok=0.25)}).price_of(
        "m", None
    )
    assert price is not None
    assert cost_micro(price, TokenUsage("m", 1, 0)) == 1  # 0.5 -> 1
    assert cost_micro(price, TokenUsage("m", 1, 2)) == 1  # 0.5 + 0.5, not 1 + 1
    assert cost_micro(price, TokenUsage("m", 0, 1)) == 0  # 0.25 -> 0
    assert cost_micro(price, TokenUsage("m", 0, 0)) == 0


@pytest.mark.parametrize(
    ("model", "provider"),
    [
        ("no-such-model-anywhere", None),
        ("no-such-model-anywhere", "openai"),
        ("gpt-4o-mini", "no-such-provider"),
        ("", None),
    ],
)
def test_an_unknown_model_has_no_price(model: str, provider: str | None) -> None:
    assert PriceBook({}).price_of(model, provider) is None


def test_the_worst_case_takes_the_dearest_input_side_price() -> None:
    book = PriceBook({})
    mini = book.price_of("gpt-4o-mini", "openai")
    assert mini is not None
    # 1000 in at 0.15 and 100 out at 0.6: nothing dearer on the input side.
    assert worst_case_micro(mini, 1000, 100) == 210
    haiku = book.price_of("claude-3-5-haiku-20241022", "anthropic")
    assert haiku is not None
    # Input at its dearest, a cache write (1.6 for one hour); output 4.
    assert worst_case_micro(haiku, 1000, 100) >= 1000 * 1 + 100 * 4
    assert worst_case_micro(haiku, 1000, 100) >= cost_micro(
        haiku, TokenUsage("claude-3-5-haiku", 1000, 100, cache_write=1000)
    )
    sonnet = book.price_of("claude-sonnet-4-5", "anthropic")
    assert sonnet is not None
    for total_in in (10, 200_000, 200_001, 900_000):
        worst = worst_case_micro(sonnet, total_in, 64_000)
        assert worst >= catalogue_micro(
            TokenUsage("claude-sonnet-4-5", total_in, 64_000), "anthropic"
        )
        assert worst >= catalogue_micro(
            TokenUsage("claude-sonnet-4-5", total_in, 64_000, cache_write=total_in), "anthropic"
        )
    override = PriceBook(
        {"m": ModelPriceOverride(input_mtok=0.5, output_mtok=1.5, cache_write_mtok=0.75)}
    ).price_of("m", None)
    assert override is not None
    assert worst_case_micro(override, 3, 1) == 4  # 3 * 0.75 + 1.5 = 3.75, rounded up


def test_lookups_are_cached_per_model_and_provider() -> None:
    book = PriceBook({})
    first = book.price_of("gpt-4o-mini", "openai")
    assert first is not None
    assert book.price_of("gpt-4o-mini", "openai") is first
