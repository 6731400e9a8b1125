"""Relative paths in a config file are relative to that file's directory, wherever keygate
is started; relative paths in KEYGATE_* variables, and without a file, to the working
directory. Every path option is covered, so none can be left behind."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.config.env import PATH_OPTIONS
from gateway.config.load import load
from gateway.config.model import Settings

FILES = {
    "data_dir": "state",
    "tls_ca_file": "ca.pem",
    "tls_cert_file": "c.pem",
    "tls_key_file": "k.pem",
}


def _paths(settings: Settings) -> dict[str, Path | None]:
    return {key: getattr(settings.redis, key) for key in FILES}


def test_every_path_option_is_covered() -> None:
    assert {f"redis.{key}" for key in FILES} == PATH_OPTIONS


def test_relative_paths_in_a_file_resolve_against_its_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    etc, elsewhere = tmp_path / "etc", tmp_path / "elsewhere"
    etc.mkdir()
    elsewhere.mkdir()
    config = etc / "gateway.yaml"
    lines = "".join(f"  {key}: {value}\n" for key, value in FILES.items())
    config.write_text(f"redis:\n  url: rediss://cache:6380/0\n{lines}")
    expected = {key: etc / value for key, value in FILES.items()}
    for cwd, given in (
        (tmp_path, config),
        (elsewhere, config),
        (elsewhere, Path("..", "etc", "gateway.yaml")),
        (etc, Path("gateway.yaml")),
    ):
        monkeypatch.chdir(cwd)
        assert _paths(load(given, environ={})) == expected, (cwd, given)


def test_the_default_data_dir_is_next_to_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "etc").mkdir()
    config = tmp_path / "etc" / "gateway.yaml"
    config.write_text("workers: 1\n")
    monkeypatch.chdir(tmp_path)
    assert load(config, environ={}).redis.data_dir == tmp_path / "etc" / ".keygate"
    assert load(None, environ={}).redis.data_dir == tmp_path / ".keygate"


def test_absolute_paths_stay(tmp_path: Path) -> None:
    config = tmp_path / "gateway.yaml"
    config.write_text("redis: {data_dir: /var/lib/keygate, tls_ca_file: /etc/ssl/ca.pem}\n")
    redis = load(config, environ={}).redis
    assert redis.data_dir == Path("/var/lib/keygate")
    assert redis.tls_ca_file == Path("/etc/ssl/ca.pem")


def test_relative_paths_in_variables_resolve_against_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "etc").mkdir()
    config = tmp_path / "etc" / "gateway.yaml"
    config.write_text("redis: {data_dir: state}\n")
    monkeypatch.chdir(tmp_path)
    environ = {f"KEYGATE_REDIS_{key.upper()}": value for key, value in FILES.items()}
    paths = _paths(load(config, environ=environ))
    assert paths == {key: tmp_path / value for key, value in FILES.items()}
    absolute = load(config, environ={"KEYGATE_REDIS_DATA_DIR": "/var/lib/keygate"})
    assert absolute.redis.data_dir == Path("/var/lib/keygate")
