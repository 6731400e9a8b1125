"""``keygate check-config`` refuses what cannot work, and ``keygate serve`` refuses it too.

Each case runs the real command on a file: check-config exits 2 with exactly the lines
shown (one per problem, naming the option or the variable), and serve exits 2 with the
same lines instead of starting.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.cli.running import run, serving
from tests.procs import free_port, write_config

SCOPE_RULE = "must match ^[A-Za-z0-9_.:*-]{1,128}$"
UPSTREAMS = {"llm": {"url": "http://127.0.0.1:9"}}


def _route(**fields: Any) -> dict[str, Any]:
    return {"name": "r", "path": "/r", "upstream": "llm", **fields}


def _file(tmp_path: Path, redis_url: str, key_prefix: str, **raw: Any) -> Path:
    """A config on loopback ports and the session's server, plus ``raw``."""
    base: dict[str, Any] = {
        "listen": f"127.0.0.1:{free_port()}",
        "admin_listen": f"127.0.0.1:{free_port()}",
        "redis": {"url": redis_url, "key_prefix": key_prefix},
        "upstreams": UPSTREAMS,
        "log": {"level": "warning"},
    }
    return write_config(tmp_path / "gateway.yaml", {**base, **raw})


def _refused(path: Path, expected: list[str], env: dict[str, str] | None = None) -> None:
    """check-config and serve both exit 2 with exactly ``expected`` on stderr."""
    checked = run("check-config", str(path), cwd=path.parent, env=env)
    assert (checked.code, checked.out) == (2, ""), checked
    assert checked.err.splitlines() == expected
    served = run("serve", "-c", str(path), cwd=path.parent, env=env)
    assert (served.code, served.out) == (2, ""), served
    assert served.err.splitlines() == expected


CASES: dict[str, tuple[dict[str, Any], list[str]]] = {
    "route scope with a space": (
        {"routes": [_route(scopes=["chat invoke"])]},
        [f"routes[0].scopes[0]: 'chat invoke' is not a scope a key can hold ({SCOPE_RULE})"],
    ),
    "empty route scope": (
        {"routes": [_route(scopes=["chat:invoke", ""])]},
        [f"routes[0].scopes[1]: '' is not a scope a key can hold ({SCOPE_RULE})"],
    ),
    "per-method route scope": (
        {"routes": [_route(scopes={"POST": ["files:write", "files/write"]})]},
        [f"routes[0].scopes.POST[1]: 'files/write' is not a scope a key can hold ({SCOPE_RULE})"],
    ),
    "route under a dialect": (
        {
            "routes": [_route(path=None, prefix="/v1/")],
            "dialects": {"konpro": {"enabled": True}},
        },
        [
            "routes[0]: dialects.konpro takes GET /v1/api-keys from this route (r): set "
            "yield_to_dialects: true on the route, or move (dialects.konpro.path) or disable "
            "the dialect"
        ],
    ),
    "route under several endpoints of a dialect": (
        {
            "routes": [_route(name="api", path=None, prefix="/api/v1/keys")],
            "dialects": {"openrouter": {"enabled": True}},
        },
        [
            "routes[0]: dialects.openrouter takes GET /api/v1/keys, POST /api/v1/keys, "
            "GET /api/v1/keys/{hash}, PATCH /api/v1/keys/{hash}, DELETE /api/v1/keys/{hash} "
            "from this route (api): set yield_to_dialects: true on the route, or move "
            "(dialects.openrouter.path) or disable the dialect"
        ],
    ),
}


@pytest.mark.parametrize(("raw", "expected"), CASES.values(), ids=CASES.keys())
def test_a_config_that_cannot_work_is_refused(
    tmp_path: Path, redis_url: str, key_prefix: str, raw: dict[str, Any], expected: list[str]
) -> None:
    _refused(_file(tmp_path, redis_url, key_prefix, **raw), expected)


def test_a_catch_all_route_names_every_dialect_it_is_under(
    tmp_path: Path, redis_url: str, key_prefix: str
) -> None:
    dialects = {name: {"enabled": True} for name in ("langflow", "flowise", "openrouter")}
    path = _file(
        tmp_path,
        redis_url,
        key_prefix,
        routes=[_route(name="all", path=None, prefix="/")],
        dialects=dialects,
    )
    checked = run("check-config", "-c", str(path), cwd=tmp_path)
    assert checked.code == 2, checked
    lines = checked.err.splitlines()
    assert [line.split(" takes ")[0] for line in lines] == [
        "routes[0]: dialects.langflow",
        "routes[0]: dialects.flowise",
        "routes[0]: dialects.openrouter",
    ]
    assert all(line.endswith("disable the dialect") for line in lines)


def test_a_route_may_yield_to_the_dialects(tmp_path: Path, redis_url: str, key_prefix: str) -> None:
    path = _file(
        tmp_path,
        redis_url,
        key_prefix,
        routes=[_route(path=None, prefix="/", yield_to_dialects=True)],
        dialects={"konpro": {"enabled": True}, "openrouter": {"enabled": True}},
    )
    checked = run("check-config", str(path), cwd=tmp_path)
    assert checked.code == 0, checked
    assert checked.out.startswith(f"{path}: ok (1 upstreams, 1 routes; ")
    admin_port = int(yaml.safe_load(path.read_text())["admin_listen"].rsplit(":", 1)[1])
    with serving("serve", "-c", str(path), cwd=tmp_path, admin_port=admin_port) as serve:
        pass
    assert "a listing dialect serves" not in serve.stderr  # it was said, not overlooked


@pytest.mark.parametrize(
    ("listen", "admin_listen"),
    [
        ("127.0.0.1:{port}", "127.0.0.1:{port}"),
        ("0.0.0.0:{port}", "127.0.0.1:{port}"),
        ("127.0.0.1:{port}", "[::]:{port}"),
        ("localhost:{port}", "127.0.0.1:{port}"),
    ],
)
def test_listen_and_admin_listen_on_one_port_are_refused(
    tmp_path: Path, redis_url: str, key_prefix: str, listen: str, admin_listen: str
) -> None:
    port = free_port()
    listen, admin_listen = listen.format(port=port), admin_listen.format(port=port)
    path = _file(tmp_path, redis_url, key_prefix, listen=listen, admin_listen=admin_listen)
    expected = [f"admin_listen: {admin_listen} overlaps listen ({listen}): "
                "each listener needs a port of its own"]  # fmt: skip
    if listen.startswith("127.0.0.1") and admin_listen.startswith("127.0.0.1"):
        _refused(path, expected)  # serve only on loopback
    else:
        checked = run("check-config", str(path), cwd=tmp_path)
        assert (checked.code, checked.err.splitlines()) == (2, expected), checked


def test_the_metrics_listener_may_not_take_another_listeners_port(
    tmp_path: Path, redis_url: str, key_prefix: str
) -> None:
    port = free_port()
    path = _file(
        tmp_path,
        redis_url,
        key_prefix,
        admin_listen=f"127.0.0.1:{port}",
        metrics={"listen": f"0.0.0.0:{port}"},
    )
    checked = run("check-config", str(path), cwd=tmp_path)
    assert checked.code == 2, checked
    assert checked.err.splitlines() == [
        f"metrics.listen: 0.0.0.0:{port} overlaps admin_listen (127.0.0.1:{port}): "
        "each listener needs a port of its own"
    ]


def test_ports_zero_and_distinct_ports_are_fine(
    tmp_path: Path, redis_url: str, key_prefix: str
) -> None:
    path = _file(tmp_path, redis_url, key_prefix, listen="127.0.0.1:0", admin_listen="0.0.0.0:0")
    assert run("check-config", str(path), cwd=tmp_path).code == 0


# --- KEYGATE_* variables ---------------------------------------------------------------------

ENV_CASES: dict[str, tuple[dict[str, str], list[str]]] = {
    "typo in the key": (
        {"KEYGATE_REDIS_URLL": "redis://127.0.0.1:6379/0"},
        ["KEYGATE_REDIS_URLL: no such option (did you mean KEYGATE_REDIS_URL?)"],
    ),
    "typo in the section": (
        {"KEYGATE_LOGG_LEVEL": "debug"},
        ["KEYGATE_LOGG_LEVEL: no such option (did you mean KEYGATE_LOG_LEVEL?)"],
    ),
    "no option like it": (
        {"KEYGATE_COLOUR": "blue"},
        ["KEYGATE_COLOUR: no such option (KEYGATE_<SECTION>_<KEY> sets <section>.<key>)"],
    ),
    "a file-only section": (
        {"KEYGATE_ROUTES": "[]", "KEYGATE_DIALECTS_KONPRO_ENABLED": "true"},
        [
            "KEYGATE_DIALECTS_KONPRO_ENABLED: dialects can be set in the config file only",
            "KEYGATE_ROUTES: routes can be set in the config file only",
        ],
    ),
    "a bad value names the variable": (
        {"KEYGATE_REDIS_SOCKET_TIMEOUT": "-1"},
        ["KEYGATE_REDIS_SOCKET_TIMEOUT: must be a finite number > 0"],
    ),
    "a bad item names the variable": (
        {"KEYGATE_KEYS_SOURCES": "[bearer, cookie]"},
        [
            "KEYGATE_KEYS_SOURCES[1]: unknown source 'cookie' "
            "(one of bearer, api_key_scheme, x-api-key, query)"
        ],
    ),
    "a bad top-level value names the variable": (
        {"KEYGATE_WORKERS": "two"},
        ["KEYGATE_WORKERS: must be an integer"],
    ),
}


@pytest.mark.parametrize(("env", "expected"), ENV_CASES.values(), ids=ENV_CASES.keys())
def test_a_bad_keygate_variable_is_refused_by_name(
    tmp_path: Path, redis_url: str, key_prefix: str, env: dict[str, str], expected: list[str]
) -> None:
    _refused(_file(tmp_path, redis_url, key_prefix), expected, env)


def test_variables_that_are_not_options_are_left_alone(
    tmp_path: Path, redis_url: str, key_prefix: str
) -> None:
    env = {
        # keygate's own tools and tests
        "KEYGATE_TEST_REDIS_URL": "not a url",
        "KEYGATE_TEST_REDIS": "cluster",
        "KEYGATE_FUZZ_EXAMPLES": "50",
        "KEYGATE_WORKER_OF": "1",
        # what Kubernetes sets for Services named keygate and keygate-redis
        "KEYGATE_SERVICE_HOST": "10.0.0.7",
        "KEYGATE_SERVICE_PORT": "8080",
        "KEYGATE_SERVICE_PORT_HTTP": "8080",
        "KEYGATE_PORT": "tcp://10.0.0.7:8080",
        "KEYGATE_PORT_8080_TCP": "tcp://10.0.0.7:8080",
        "KEYGATE_PORT_8080_TCP_PROTO": "tcp",
        "KEYGATE_PORT_8080_TCP_PORT": "8080",
        "KEYGATE_PORT_8080_TCP_ADDR": "10.0.0.7",
        "KEYGATE_REDIS_SERVICE_HOST": "10.0.0.8",
        "KEYGATE_REDIS_PORT": "tcp://10.0.0.8:6379",
        # not keygate's at all
        "keygate_workers": "abc",
        "REDIS_URL": "mysql://db",
    }
    path = _file(tmp_path, redis_url, key_prefix)
    checked = run("check-config", str(path), cwd=tmp_path, env=env)
    assert (checked.code, checked.err) == (0, ""), checked


def test_a_port_variable_that_is_not_from_kubernetes_is_refused(
    tmp_path: Path, redis_url: str, key_prefix: str
) -> None:
    path = _file(tmp_path, redis_url, key_prefix)
    checked = run("check-config", str(path), cwd=tmp_path, env={"KEYGATE_PORT": "9000"})
    assert checked.code == 2, checked
    assert checked.err.splitlines() == [
        "KEYGATE_PORT: no such option (KEYGATE_<SECTION>_<KEY> sets <section>.<key>)"
    ]
