"""What an LLM model's tokens cost: the operator's ``prices`` overrides, else the
genai-prices catalogue (read offline from the snapshot bundled with the package; keygate
never fetches newer prices).

Prices are credits per million tokens (credits are USD on an LLM route, as the catalogue
states them); costs are integer micro-units, rounded half up once.

How a ``TokenUsage`` maps onto genai-prices' ``Usage``: both count totals, so the fields
pass through unchanged. genai-prices' ``input_tokens`` includes ``cache_read_tokens`` and
``cache_write_tokens`` (they are its descendants: a priced descendant is taken out of its
parent's count, an unpriced one stays in it at the parent's price), and ``output_tokens``
includes ``output_reasoning_tokens`` in the same way. So ``input -> input_tokens``,
``cache_read -> cache_read_tokens``, ``cache_write -> cache_write_tokens``,
``output -> output_tokens``, ``reasoning -> output_reasoning_tokens``.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import ROUND_CEILING, ROUND_HALF_UP, Decimal
from importlib.metadata import version

from genai_prices import data_snapshot
from genai_prices import types as catalogue

from gateway.config.model import ModelPriceOverride
from gateway.policies.llm_usage import TokenUsage

CONFIG_SOURCE = "config prices"
PRICE_CACHE_SIZE = 1024  # (model, provider) lookups kept; upstreams name few models
_ZERO = Decimal(0)
# A price per thousand requests, in micro-units per request.
_MICRO_PER_KREQUEST = Decimal(1000)


@dataclass(frozen=True, slots=True)
class _Tiered:
    """A price that depends on the request's input tokens: past a tier's start (strictly),
    that tier's price applies to every token (the catalogue's "cliff" model)."""

    base: Decimal
    tiers: tuple[tuple[int, Decimal], ...]  # (start, price), ascending

    def at(self, input_tokens: int) -> Decimal:
        for start, price in reversed(self.tiers):
            if input_tokens > start:
                return price
        return self.base

    def dearest(self) -> Decimal:
        return max((self.base, *(price for _, price in self.tiers)))


_Rate = Decimal | _Tiered


@dataclass(frozen=True, slots=True)
class _Rates:
    """Per-million prices of the usage keys keygate reports (None: the key is not priced on
    its own, so its tokens count at the parent's price), and a per-request fee."""

    input: _Rate | None
    output: _Rate | None
    cache_read: _Rate | None
    cache_write: _Rate | None
    reasoning: _Rate | None
    request_micro: Decimal  # micro-units charged per request


@dataclass(frozen=True, slots=True)
class ModelPrice:
    """One model's price and where it came from.

    ``input``, ``output``, ``cache_read``, ``cache_write``: credits per million tokens, for
    display (a tiered catalogue price shows its base; ``tiered`` says so; a cache price the
    catalogue does not state shows the input price it is charged at).
    """

    source: str  # "config prices" or "genai-prices 0.2.3: provider openai, model gpt-4o-mini"
    input: Decimal
    output: Decimal
    cache_read: Decimal
    cache_write: Decimal
    tiered: bool = False
    # Every price set the model has (a catalogue model's prices may change by date or time of
    # day); the model whose prices are resolved per request when there is more than one.
    _rates: tuple[tuple[object, _Rates], ...] = field(default=(), compare=False, repr=False)
    _model: catalogue.ModelInfo | None = field(default=None, compare=False, repr=False)


class PriceBook:
    """The price of a model: an override from config (exact model name) wins, else the
    catalogue's match for (model, provider). Lookups are cached (bounded).

    Building a book loads the catalogue (about 0.2 s, once per process), so that the first
    request does not pay for it.
    """

    def __init__(self, overrides: Mapping[str, ModelPriceOverride]) -> None:
        self._overrides = {name: _override_price(price) for name, price in overrides.items()}
        providers = data_snapshot.get_snapshot().providers
        self._lookup = functools.lru_cache(maxsize=PRICE_CACHE_SIZE)(
            functools.partial(_catalogue_price, providers)
        )

    def price_of(self, model: str, provider: str | None) -> ModelPrice | None:
        """The model's price, or None when neither config nor the catalogue has one."""
        override = self._overrides.get(model)
        if override is not None:
            return override
        return self._lookup(model, provider)

    def cost_micro(self, price: ModelPrice, usage: TokenUsage) -> int:
        """``cost_micro(price, usage)``."""
        return cost_micro(price, usage)

    def worst_case_micro(self, price: ModelPrice, input_tokens: int, output_tokens: int) -> int:
        """``worst_case_micro(price, input_tokens, output_tokens)``."""
        return worst_case_micro(price, input_tokens, output_tokens)


def cost_micro(price: ModelPrice, usage: TokenUsage) -> int:
    """What ``usage`` costs at ``price``, in micro-units, rounded half up once.

    For a catalogue price this equals genai-prices' ``calc_price`` total for the same usage
    (mapped as the module docstring says) at this moment, times 1e6, rounded half up.
    Override prices: input less cache reads and writes at ``input``, cache reads at
    ``cache_read``, cache writes at ``cache_write``, output (reasoning included) at
    ``output``.
    """
    rates = _current_rates(price)
    tokens = usage.input
    input_left = tokens
    if rates.cache_read is not None:
        input_left -= usage.cache_read
    if rates.cache_write is not None:
        input_left -= usage.cache_write
    output_left = usage.output
    if rates.reasoning is not None:
        output_left -= usage.reasoning
    # A per-million price times tokens is micro-units: the 1e6 factors cancel.
    total = (
        _times(rates.input, max(input_left, 0), tokens)
        + _times(rates.cache_read, usage.cache_read, tokens)
        + _times(rates.cache_write, usage.cache_write, tokens)
        + _times(rates.output, max(output_left, 0), tokens)
        + _times(rates.reasoning, usage.reasoning, tokens)
        + rates.request_micro
    )
    return int(total.to_integral_value(rounding=ROUND_HALF_UP))


def worst_case_micro(price: ModelPrice, input_tokens: int, output_tokens: int) -> int:
    """An upper bound, in micro-units, of what at most ``input_tokens`` in and
    ``output_tokens`` out can cost at ``price``: every input token at the dearest input-side
    price (input, cache read or cache write, at its dearest tier), every output token at the
    dearest output-side price, plus any per-request fee; over every price set the model has
    (by date or time of day). Rounded up."""
    worst = _ZERO
    for _, rates in price._rates:
        input_side = max(
            _dearest(rates.input), _dearest(rates.cache_read), _dearest(rates.cache_write)
        )
        output_side = max(_dearest(rates.output), _dearest(rates.reasoning))
        cost = input_side * input_tokens + output_side * output_tokens + rates.request_micro
        worst = max(worst, cost)
    return int(worst.to_integral_value(rounding=ROUND_CEILING))


def _times(rate: _Rate | None, count: int, input_tokens: int) -> Decimal:
    if rate is None or not count:
        return _ZERO
    per_million = rate.at(input_tokens) if isinstance(rate, _Tiered) else rate
    return per_million * count


def _dearest(rate: _Rate | None) -> Decimal:
    if rate is None:
        return _ZERO
    return rate.dearest() if isinstance(rate, _Tiered) else rate


def _current_rates(price: ModelPrice) -> _Rates:
    return _rates_now(price._rates, price._model)


def _rates_now(
    sets: tuple[tuple[object, _Rates], ...], model: catalogue.ModelInfo | None
) -> _Rates:
    """The price set in force now: the one genai-prices' ``get_prices`` picks."""
    if len(sets) == 1 or model is None:
        return sets[0][1]
    resolved = model.get_prices(datetime.now(tz=UTC))
    for prices, rates in sets:
        if prices is resolved:
            return rates
    return sets[0][1]  # unreachable: get_prices returns one of the model's sets


def _override_price(price: ModelPriceOverride) -> ModelPrice:
    input_mtok = _decimal(price.input_mtok)
    output_mtok = _decimal(price.output_mtok)
    cache_read = input_mtok if price.cache_read_mtok is None else _decimal(price.cache_read_mtok)
    cache_write = input_mtok if price.cache_write_mtok is None else _decimal(price.cache_write_mtok)
    rates = _Rates(input_mtok, output_mtok, cache_read, cache_write, None, _ZERO)
    return ModelPrice(
        CONFIG_SOURCE, input_mtok, output_mtok, cache_read, cache_write, _rates=((None, rates),)
    )


def _decimal(number: float) -> Decimal:
    # The shortest repr is what the config spelled; Decimal(0.1) would keep binary noise.
    return Decimal(repr(number))


def _catalogue_price(
    providers: list[catalogue.Provider], model: str, provider_id: str | None
) -> ModelPrice | None:
    """The catalogue's price for ``model``, matched as genai-prices' ``calc_price`` matches
    it (without growing genai-prices' own unbounded lookup caches)."""
    found = _match(providers, model.lower(), provider_id)
    if found is None:
        return None
    provider, info = found
    sets = (
        [info.prices]
        if isinstance(info.prices, catalogue.ModelPrice)
        else [conditional.prices for conditional in info.prices]
    )
    rates = tuple((prices, _rates_of(prices)) for prices in sets)
    if not rates or all(r.input is None and r.output is None for _, r in rates):
        return None  # priced per image, per second...: not by tokens
    shown = _rates_now(rates, info)
    base_input = _base(shown.input)
    return ModelPrice(
        f"genai-prices {version('genai-prices')}: provider {provider.id}, model {info.id}",
        base_input,
        _base(shown.output),
        base_input if shown.cache_read is None else _base(shown.cache_read),
        base_input if shown.cache_write is None else _base(shown.cache_write),
        tiered=any(
            isinstance(rate, _Tiered)
            for _, r in rates
            for rate in (r.input, r.output, r.cache_read, r.cache_write, r.reasoning)
        ),
        _rates=rates,
        _model=info if len(rates) > 1 else None,
    )


def _match(
    providers: list[catalogue.Provider], model_ref: str, provider_id: str | None
) -> tuple[catalogue.Provider, catalogue.ModelInfo] | None:
    # As genai-prices: a LiteLLM-style "provider/model" names its provider.
    if provider_id and provider_id.lower() == "litellm" and "/" in model_ref:
        named, rest = model_ref.split("/", 1)
        if named and data_snapshot.find_provider_by_id(providers, named):
            provider_id, model_ref = named, rest
    provider: catalogue.Provider | None = None
    if provider_id is not None:
        provider = data_snapshot.find_provider_by_id(providers, provider_id)
    else:
        provider = next(
            (
                p
                for p in providers
                if p.model_match is not None and p.model_match.is_match(model_ref)
            ),
            None,
        )
    if provider is None:
        return None
    info = provider.find_model(model_ref, all_providers=providers)
    return None if info is None else (provider, info)


def _rates_of(prices: catalogue.ModelPrice) -> _Rates:
    request_fee = _rate(getattr(prices, "requests_kcount", None))
    return _Rates(
        input=_rate(prices.input_mtok),
        output=_rate(prices.output_mtok),
        cache_read=_rate(prices.cache_read_mtok),
        cache_write=_rate(prices.cache_write_mtok),
        reasoning=_rate(getattr(prices, "output_reasoning_mtok", None)),
        request_micro=_ZERO if request_fee is None else _dearest(request_fee) * _MICRO_PER_KREQUEST,
    )


def _rate(value: object) -> _Rate | None:
    if isinstance(value, Decimal):
        return value
    if isinstance(value, catalogue.TieredPrices):
        return _Tiered(value.base, tuple((tier.start, tier.price) for tier in value.tiers))
    return None


def _base(rate: _Rate | None) -> Decimal:
    if rate is None:
        return _ZERO
    return rate.base if isinstance(rate, _Tiered) else rate
