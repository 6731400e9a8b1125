"""``keygate prices MODEL``: what a model's tokens cost and where the price came from."""

from __future__ import annotations

import argparse
import os
import sys
from decimal import Decimal
from typing import Any

from .source import load_config


def add_command(commands: Any, common: argparse.ArgumentParser) -> None:
    command = commands.add_parser(
        "prices",
        parents=[common],
        help="what a model's tokens cost (config prices, else genai-prices) and where from",
    )
    command.add_argument("model", metavar="MODEL", help="the model name, as an answer names it")
    command.add_argument(
        "--provider",
        metavar="P",
        help="the catalogue's provider, as a route's cost.provider (default: found from "
        "the model name)",
    )
    command.set_defaults(run=_prices)


def _prices(args: argparse.Namespace) -> int:
    """Print the model's per-million prices and their source; exit 1 when it has none."""
    # genai-prices and its catalogue load only for `prices`, not for every CLI command.
    from gateway.policies.prices import CONFIG_SOURCE, PriceBook

    loaded = load_config(args.config)
    price = PriceBook(loaded.settings.prices).price_of(args.model, args.provider)
    if price is None:
        where = f" for provider {args.provider}" if args.provider else ""
        print(
            f"keygate: model {args.model} has no price{where} "
            "(neither in the config's prices nor in genai-prices)",
            file=sys.stderr,
        )
        return 1
    print(f"model:       {args.model}")
    source = price.source
    if source == CONFIG_SOURCE and loaded.source.path is not None:
        source += f" in {os.path.abspath(loaded.source.path)}"
    print(f"source:      {source}")
    print(f"input:       {_money(price.input)} per million tokens")
    print(f"output:      {_money(price.output)} per million tokens")
    print(f"cache read:  {_money(price.cache_read)} per million tokens")
    print(f"cache write: {_money(price.cache_write)} per million tokens")
    if price.tiered:
        print("tiered:      yes: a request with more input tokens pays more (base prices shown)")
    return 0


def _money(amount: Decimal) -> str:
    # Credits, as many decimals as the price has (0.075 stays 0.075, 3 prints 3).
    return f"{amount.normalize():f}"
