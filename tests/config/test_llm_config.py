"""An LLM route's config: the cost rule, prices, reserve: auto and its modes; what is
refused, each by its exact line."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from gateway.config.load import ConfigError, build
from gateway.config.model import CostRule, ModelPriceOverride

BASE = Path("/srv/keygate")
UPSTREAMS = {"llm": {"url": "http://127.0.0.1:9000"}}


def config(**fields: Any) -> dict[str, Any]:
    top = fields.pop("top", {})
    spec = {"name": "chat", "path": "/v1/chat/completions", "upstream": "llm", **fields}
    return {"upstreams": UPSTREAMS, "routes": [spec], **top}


def problems(raw: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as info:
        build(raw, BASE)
    return info.value.problems


def test_an_llm_route_with_prices_and_reserve_auto_loads() -> None:
    settings = build(
        config(
            cost={"llm": "openai", "provider": "openai"},
            reserve="auto",
            reserve_mode="remaining",
            max_output_tokens=1024,
            top={"prices": {"my-finetune": {"input_mtok": 0.5, "output_mtok": 1.5}}},
        ),
        BASE,
    )
    route = settings.routes[0]
    assert route.cost == CostRule(llm="openai", provider="openai")
    assert (route.reserve_auto, route.reserve_mode, route.max_output_tokens) == (
        True,
        "remaining",
        1024,
    )
    assert settings.prices == {"my-finetune": ModelPriceOverride(0.5, 1.5)}


def test_unpriced_allow_needs_a_reservation_so_nothing_settles_at_zero_by_accident() -> None:
    assert problems(config(cost={"llm": "openai", "unpriced": "allow"})) == [
        "routes[0].reserve: required with unpriced: allow: a request for a model with no "
        "price is charged its reservation, never 0 by accident"
    ]
    assert problems(config(cost={"llm": "openai", "unpriced": "allow"}, reserve="auto")) == [
        "routes[0].unpriced_reserve: required with reserve: auto and unpriced: allow: what a "
        "request for a model with no price reserves (and is charged)"
    ]
    route = build(
        config(
            cost={"llm": "anthropic", "unpriced": "allow"}, reserve="auto", unpriced_reserve=0.2
        ),
        BASE,
    ).routes[0]
    assert (route.reserve_auto, route.reserve) == (True, 0.2)


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        (
            {"cost": {"llm": "gemini"}},
            "routes[0].cost.llm: must be one of openai, anthropic (got 'gemini')",
        ),
        (
            {"cost": {"llm": "openai", "per_unit": 2}},
            "routes[0].cost.per_unit: an LLM cost rule is priced per model (prices), not per unit",
        ),
        (
            {"cost": {"json": "usage.total_tokens", "provider": "openai"}},
            "routes[0].cost.provider: applies to an LLM cost rule only (llm: ...)",
        ),
        (
            {"cost": {"json": "usage.total_tokens"}, "reserve": "auto"},
            "routes[0].reserve: auto needs an LLM cost rule (cost: {llm: ...})",
        ),
        (
            {"cost": {"fixed": 1}, "max_output_tokens": 10},
            "routes[0].max_output_tokens: applies to an LLM route only (cost: {llm: ...})",
        ),
        (
            {"cost": {"llm": "openai"}, "reserve_mode": "hopeful"},
            "routes[0].reserve_mode: must be one of worst_case, remaining (got 'hopeful')",
        ),
        (
            {"cost": {"llm": "openai", "json": "usage.total_tokens"}},
            "routes[0].cost: needs exactly one of fixed, header, json, llm",
        ),
    ],
)
def test_bad_llm_route_options_are_named(fields: dict[str, Any], expected: str) -> None:
    assert problems(config(**fields)) == [expected]


def test_bad_prices_are_named() -> None:
    assert problems(
        config(
            cost={"llm": "openai"},
            top={
                "prices": {
                    "a": {"input_mtok": 1},
                    "b": {"input_mtok": -1, "output_mtok": 1, "cached": 1},
                    "c": 3,
                }
            },
        )
    ) == [
        "prices.a.output_mtok: required: credits per million tokens",
        "prices.b.cached: unknown option",
        "prices.b.input_mtok: must be a finite number >= 0",
        "prices.c: must be a mapping (input_mtok, output_mtok, ...)",
    ]
