"""shutdown_timeout and workers: defaults, values, refusals, environment and CLI."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from gateway.config.load import ConfigError, build, load
from tests.procs import KEYGATE, clean_env

BASE = Path("/srv/keygate")


def test_defaults() -> None:
    s = load(None, environ={})
    assert (s.workers, s.shutdown_timeout) == (1, 30.0)


def test_values_and_environment() -> None:
    assert build({"shutdown_timeout": 2.5, "workers": 4}, BASE).shutdown_timeout == 2.5
    s = load(None, environ={"KEYGATE_SHUTDOWN_TIMEOUT": "7", "KEYGATE_WORKERS": "3"})
    assert (s.workers, s.shutdown_timeout) == (3, 7.0)


@pytest.mark.parametrize("value", [0, -1, "soon"])
def test_a_bad_shutdown_timeout_is_refused_by_name(value: object) -> None:
    with pytest.raises(ConfigError) as info:
        build({"shutdown_timeout": value}, BASE)
    assert len(info.value.problems) == 1
    assert info.value.problems[0].startswith("shutdown_timeout: ")


@pytest.mark.parametrize("value", ["0", "-2", "two"])
def test_serve_refuses_a_bad_workers_flag(value: str) -> None:
    done = subprocess.run(
        [*KEYGATE, "serve", "--workers", value],
        capture_output=True,
        text=True,
        timeout=60,
        env=clean_env(),
        check=False,
    )
    assert done.returncode == 2
    assert "--workers: must be a whole number >= 1" in done.stderr
