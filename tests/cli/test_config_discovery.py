"""Which config file keygate reads, and that it says so.

keygate looks for ``--config``/``-c`` (before or after the subcommand), then
``$KEYGATE_CONFIG``, then ``./gateway.yaml``, then ``./config/gateway.yaml``; with none of
them it runs on defaults and says that it found none, where it looked, and which store it
uses. Every case runs the real command.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.config.reader import redact_url
from tests.cli.running import run, serving
from tests.procs import free_port, http_get, write_config

LOOKED_FOR = "no config file found (looked for gateway.yaml and config/gateway.yaml in {})"


def _config(path: Path, redis_url: str, key_prefix: str, routes: int) -> Path:
    """A config on the session's server whose route count tells it apart from the others."""
    path.parent.mkdir(parents=True, exist_ok=True)
    raw: dict[str, Any] = {
        "redis": {"url": redis_url, "key_prefix": key_prefix},
        "upstreams": {"llm": {"url": "http://127.0.0.1:9"}},
        "routes": [{"name": f"r{i}", "path": f"/r{i}", "upstream": "llm"} for i in range(routes)],
        "log": {"level": "warning"},
    }
    return write_config(path, raw)


@pytest.fixture
def configs(tmp_path: Path, redis_url: str, key_prefix: str, redis: object) -> dict[str, Path]:
    """./gateway.yaml (1 route), ./config/gateway.yaml (2), other.yaml (3), given.yaml (4)."""
    return {
        name: _config(tmp_path / name, redis_url, key_prefix, routes)
        for name, routes in (
            ("gateway.yaml", 1),
            ("config/gateway.yaml", 2),
            ("other.yaml", 3),
            ("given.yaml", 4),
        )
    }


def _routes_checked(result: Any) -> int:
    """The route count in check-config's ``PATH: ok (N upstreams, M routes; ...)``."""
    assert result.code == 0, result
    return int(result.out.split(" upstreams, ")[1].split(" routes")[0])


def test_discovery_order(tmp_path: Path, configs: dict[str, Path]) -> None:
    env = {"KEYGATE_CONFIG": str(configs["other.yaml"])}
    given = str(configs["given.yaml"])
    assert _routes_checked(run("check-config", "-c", given, cwd=tmp_path, env=env)) == 4
    assert _routes_checked(run("check-config", cwd=tmp_path, env=env)) == 3
    assert _routes_checked(run("check-config", cwd=tmp_path)) == 1
    configs["gateway.yaml"].unlink()
    checked = run("check-config", cwd=tmp_path)
    assert _routes_checked(checked) == 2
    assert checked.out.startswith("config/gateway.yaml: ok (1 upstreams, 2 routes; key store: ")
    configs["config/gateway.yaml"].unlink()
    defaults = run("check-config", cwd=tmp_path)
    assert defaults.code == 0, defaults
    assert defaults.err == f"keygate: {LOOKED_FOR.format(tmp_path)}; running on defaults\n"
    assert defaults.out == (
        "defaults: ok (0 upstreams, 0 routes; "
        f"key store: embedded Redis in {tmp_path / '.keygate'}, key prefix kg:)\n"
    )


def test_keys_commands_say_which_file_they_read(
    tmp_path: Path, configs: dict[str, Path], key_prefix: str
) -> None:
    listed = run("keys", "list", cwd=tmp_path)
    assert (listed.code, listed.out) == (0, "no keys\n"), listed
    assert listed.err == (
        f"keygate: config {configs['gateway.yaml']} (found in the working directory): 1 routes; "
        f"key store: {_store_of(configs['gateway.yaml'])}, key prefix {key_prefix}\n"
    )
    env = {"KEYGATE_CONFIG": str(configs["other.yaml"])}
    listed = run("keys", "list", cwd=tmp_path, env=env)
    other = configs["other.yaml"]
    assert listed.err.startswith(f"keygate: config {other} (from $KEYGATE_CONFIG): 3 routes; ")


def _store_of(config: Path) -> str:
    return redact_url(yaml.safe_load(config.read_text())["redis"]["url"])


@pytest.mark.parametrize(
    "args",
    [
        ["-c", "{}", "check-config"],
        ["check-config", "-c", "{}"],
        ["check-config", "{}"],
        ["--config", "{}", "keys", "list"],
        ["keys", "list", "--config", "{}"],
    ],
    ids=lambda args: " ".join(args),
)
def test_config_before_or_after_the_subcommand(
    tmp_path: Path, configs: dict[str, Path], args: list[str]
) -> None:
    given = str(configs["given.yaml"])
    result = run(*(given if a == "{}" else a for a in args), cwd=tmp_path)
    assert result.code == 0, result
    if "check-config" in args:
        assert _routes_checked(result) == 4
    else:
        assert result.err.startswith(f"keygate: config {given} (from --config): 4 routes; ")


def test_serve_takes_config_before_the_subcommand(tmp_path: Path, configs: dict[str, Path]) -> None:
    admin_port = free_port()
    config = configs["given.yaml"]
    text = config.read_text() + f"listen: 127.0.0.1:{free_port()}\n"
    config.write_text(text + f"admin_listen: 127.0.0.1:{admin_port}\n")
    with serving("-c", str(config), "serve", cwd=tmp_path, admin_port=admin_port):
        assert http_get(admin_port, "/openapi.json")[0] == 200


def test_config_given_twice_differently_is_refused(
    tmp_path: Path, configs: dict[str, Path]
) -> None:
    one, two = str(configs["given.yaml"]), str(configs["other.yaml"])
    result = run("-c", one, "check-config", "-c", two, cwd=tmp_path)
    assert result.code == 2 and result.out == ""
    assert result.err == f"keygate: --config given twice ({one} and {two}): give it once\n"


def test_demo_takes_no_config(tmp_path: Path, configs: dict[str, Path]) -> None:
    result = run("-c", str(configs["given.yaml"]), "demo", cwd=tmp_path)
    assert (result.code, result.out) == (2, "")
    assert result.err == "keygate: demo takes no --config\n"


def test_serve_outside_the_repository_says_it_runs_on_defaults(
    tmp_path: Path, redis_url: str, key_prefix: str, redis: object
) -> None:
    admin_port = free_port()
    env = {
        "KEYGATE_LISTEN": f"127.0.0.1:{free_port()}",
        "KEYGATE_ADMIN_LISTEN": f"127.0.0.1:{admin_port}",
        "KEYGATE_REDIS_URL": redis_url,
        "KEYGATE_REDIS_KEY_PREFIX": key_prefix,
        "KEYGATE_LOG_FORMAT": "text",
    }
    with serving("serve", cwd=tmp_path, admin_port=admin_port, env=env) as serve:
        log = serve.stderr
    expected = (
        f"{LOOKED_FOR.format(tmp_path)}; running on defaults: 0 routes, 0 upstreams; "
        f"key store: {redact_url(redis_url)}, key prefix {key_prefix}"
    )
    assert expected in log, log
    assert "WARNING" in next(line for line in log.splitlines() if expected in line)
