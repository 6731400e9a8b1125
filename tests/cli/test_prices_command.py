"""``keygate prices MODEL``: the real command prints a model's prices and their source."""

from __future__ import annotations

from pathlib import Path

import genai_prices

from tests.cli.running import run
from tests.procs import write_config

CATALOGUE = f"genai-prices {genai_prices.__version__}"


def test_a_catalogue_model_prints_its_prices_and_source(tmp_path: Path) -> None:
    done = run("prices", "gpt-4o-mini-2024-07-18", "--provider", "openai", cwd=tmp_path)
    assert done.code == 0, done.err
    assert done.out.splitlines() == [
        "model:       gpt-4o-mini-2024-07-18",
        f"source:      {CATALOGUE}: provider openai, model gpt-4o-mini",
        "input:       0.15 per million tokens",
        "output:      0.6 per million tokens",
        "cache read:  0.075 per million tokens",
        "cache write: 0.15 per million tokens",
    ]


def test_the_provider_is_found_from_the_model_name(tmp_path: Path) -> None:
    done = run("prices", "claude-3-5-haiku-20241022", cwd=tmp_path)
    assert done.code == 0, done.err
    assert f"source:      {CATALOGUE}: provider anthropic, model claude-3-5-haiku" in done.out
    assert "cache write: 1 per million tokens" in done.out


def test_a_tiered_price_says_so(tmp_path: Path) -> None:
    done = run("prices", "claude-sonnet-4-5", "--provider", "anthropic", cwd=tmp_path)
    assert done.code == 0, done.err
    assert "input:       3 per million tokens" in done.out
    assert "tiered:      yes" in done.out


def test_an_override_in_the_config_wins(tmp_path: Path) -> None:
    config = write_config(
        tmp_path / "prices.yaml",
        {
            "prices": {
                "gpt-4o-mini": {"input_mtok": 0.5, "output_mtok": 1.5, "cache_read_mtok": 0.25},
                "my-finetune": {"input_mtok": 2, "output_mtok": 8},
            }
        },
    )
    done = run(
        "prices", "gpt-4o-mini", "--provider", "openai", "--config", str(config), cwd=tmp_path
    )
    assert done.code == 0, done.err
    assert done.out.splitlines() == [
        "model:       gpt-4o-mini",
        f"source:      config prices in {config}",
        "input:       0.5 per million tokens",
        "output:      1.5 per million tokens",
        "cache read:  0.25 per million tokens",
        "cache write: 0.5 per million tokens",
    ]
    # The same file found in the working directory; a model only the config prices.
    write_config(
        tmp_path / "gateway.yaml", {"prices": {"my-finetune": {"input_mtok": 2, "output_mtok": 8}}}
    )
    done = run("prices", "my-finetune", cwd=tmp_path)
    assert done.code == 0, done.err
    assert f"source:      config prices in {tmp_path / 'gateway.yaml'}" in done.out
    assert "output:      8 per million tokens" in done.out


def test_an_unknown_model_is_one_line_on_stderr_and_exit_1(tmp_path: Path) -> None:
    done = run("prices", "no-such-model-7b", cwd=tmp_path)
    assert done.code == 1
    assert done.out == ""
    assert done.err == (
        "keygate: model no-such-model-7b has no price "
        "(neither in the config's prices nor in genai-prices)\n"
    )
    done = run("prices", "gpt-4o-mini", "--provider", "nosuch", cwd=tmp_path)
    assert done.code == 1
    assert done.err.splitlines() == [
        "keygate: model gpt-4o-mini has no price for provider nosuch "
        "(neither in the config's prices nor in genai-prices)"
    ]
