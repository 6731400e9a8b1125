"""log.access and log.access_format: defaults, values, refusals, environment overrides."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from gateway.config.load import ConfigError, build, load

BASE = Path("/srv/keygate")


def test_the_access_log_is_on_and_automatic_by_default() -> None:
    s = load(None, environ={})
    assert (s.log.access, s.log.access_format) == (True, "auto")


@pytest.mark.parametrize("fmt", ["auto", "json", "text"])
def test_each_access_format_is_read(fmt: str) -> None:
    s = build({"log": {"access": False, "access_format": fmt}}, BASE)
    assert (s.log.access, s.log.access_format) == (False, fmt)


REFUSED: dict[str, tuple[dict[str, Any], list[str]]] = {
    "access not a boolean": (
        {"log": {"access": "yes please"}},
        ["log.access: must be true or false"],
    ),
    "unknown access format": (
        {"log": {"access_format": "logfmt"}},
        ["log.access_format: must be one of auto, json, text (got 'logfmt')"],
    ),
    "access format in capitals": (
        {"log": {"access_format": "JSON"}},
        ["log.access_format: must be one of auto, json, text (got 'JSON')"],
    ),
}


@pytest.mark.parametrize(("raw", "expected"), REFUSED.values(), ids=REFUSED.keys())
def test_bad_access_options_report_their_line(raw: dict[str, Any], expected: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        build(raw, BASE)
    assert info.value.problems == expected


def test_environment_overrides_the_access_options() -> None:
    s = load(None, environ={"KEYGATE_LOG_ACCESS": "false", "KEYGATE_LOG_ACCESS_FORMAT": "text"})
    assert (s.log.access, s.log.access_format) == (False, "text")


def test_an_access_format_from_the_environment_is_validated() -> None:
    with pytest.raises(ConfigError) as info:
        load(None, environ={"KEYGATE_LOG_ACCESS_FORMAT": "yes"})
    assert info.value.problems == [
        "KEYGATE_LOG_ACCESS_FORMAT: must be one of auto, json, text (got 'yes')"
    ]
