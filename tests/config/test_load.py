"""gateway.yaml and KEYGATE_* overrides: what loads, what is refused, and how it is reported.

Every refusal is checked by its exact line (path, then reason), and that no other line came
with it, because the lines are what an operator reads. Loader calls pass an explicit
``environ`` so the machine's own KEYGATE_* variables cannot change the outcome.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.config.load import ConfigError, build, load
from gateway.config.model import (
    Address,
    CostRule,
    Dialect,
    RateLimit,
    ResourceRule,
    Route,
    Settings,
    Timeouts,
    Upstream,
)

CONFIG = Path(__file__).resolve().parents[2] / "config"
SHIPPED = sorted([CONFIG / "gateway.yaml", CONFIG / "demo.yaml", *CONFIG.glob("examples/*.yaml")])
BASE = Path("/srv/keygate")
UPSTREAMS = {"llm": {"url": "http://127.0.0.1:9000"}}


def problems(raw: dict[Any, Any]) -> list[str]:
    with pytest.raises(ConfigError) as info:
        build(raw, BASE)
    return info.value.problems


def route(**fields: Any) -> dict[str, Any]:
    """A config with one valid route plus ``fields``; a field set to None is left out."""
    spec = {"name": "r", "path": "/r", "upstream": "llm", **fields}
    return {"upstreams": UPSTREAMS, "routes": [{k: v for k, v in spec.items() if v is not None}]}


def write(tmp_path: Path, text: str | bytes, name: str = "gateway.yaml") -> Path:
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


# --- the shipped files -------------------------------------------------------------------


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(CONFIG)))
def test_shipped_config_loads(path: Path) -> None:
    assert isinstance(load(path, environ={}), Settings)


def test_shipped_examples_exist() -> None:
    assert CONFIG / "examples" / "external-redis.yaml" in SHIPPED


def test_gateway_yaml_has_the_design_shape() -> None:
    s = load(CONFIG / "gateway.yaml", environ={})
    assert s.listen == Address("0.0.0.0", 8080)  # noqa: S104
    assert s.admin_listen == Address("127.0.0.1", 8081)
    assert s.redis.url == "embedded"
    assert s.upstreams["llm"].url == "http://127.0.0.1:9000"
    assert s.upstreams["llm"].timeouts == Timeouts(connect=2, read=60, total=300)
    chat = next(r for r in s.routes if r.name == "chat")
    assert chat.path == "/v1/chat/completions"
    assert (chat.upstream, chat.methods, chat.scopes) == ("llm", ("POST",), {"*": ("chat:invoke",)})
    assert chat.resource is not None and chat.resource.json == "model"
    assert chat.cost == CostRule(json="usage.total_tokens", per_unit=0.000002)
    assert (chat.reserve, chat.error_format) == (0.01, "openai")
    prefixed = [r for r in s.routes if r.prefix is not None]
    assert prefixed and prefixed[0].strip_prefix
    assert len(prefixed[0].scopes) > 1  # scopes per method
    assert not any(d.enabled for d in s.dialects.values())  # opt-in: they manage keys


def _fields(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def test_gateway_yaml_sets_every_option_the_loader_accepts() -> None:
    raw = yaml.safe_load((CONFIG / "gateway.yaml").read_text(encoding="utf-8"))
    s = load(CONFIG / "gateway.yaml", environ={})
    assert set(raw) == _fields(Settings)
    for section in ("redis", "keys", "admin", "metrics", "log"):
        assert set(raw[section]) == _fields(type(getattr(s, section))), section
    for upstream in raw["upstreams"].values():
        assert set(upstream) == _fields(Upstream) - {"name"}
        assert set(upstream["timeouts"]) == _fields(Timeouts)
    routes = raw["routes"]
    # reserve: auto sets reserve_auto; unpriced_reserve is read into reserve.
    assert set().union(*routes) == _fields(Route) - {"reserve_auto"} | {"unpriced_reserve"}
    assert set().union(*(r["cost"] for r in routes if "cost" in r)) == _fields(CostRule)
    assert set().union(*(r["resource"] for r in routes if "resource" in r)) == _fields(ResourceRule)
    assert set().union(*(r["rate_limit"] for r in routes if "rate_limit" in r)) == _fields(
        RateLimit
    )
    assert set(raw["dialects"]) == set(s.dialects)
    for dialect in raw["dialects"].values():
        assert set(dialect) == _fields(Dialect)


def test_gateway_yaml_states_the_defaults() -> None:
    documented = load(CONFIG / "gateway.yaml", environ={})
    defaults = load(None, environ={})
    # The same relative data_dir: next to the file, or (no file) in the working directory.
    assert documented.redis.data_dir == CONFIG / ".keygate"
    assert defaults.redis.data_dir == Path.cwd() / ".keygate"
    documented = dataclasses.replace(
        documented, redis=dataclasses.replace(documented.redis, data_dir=defaults.redis.data_dir)
    )
    for name in ("listen", "admin_listen", "workers", "redis", "keys", "admin", "metrics", "log"):
        assert getattr(documented, name) == getattr(defaults, name), name
    assert {n: d.enabled for n, d in documented.dialects.items()} == {
        n: d.enabled for n, d in defaults.dialects.items()
    }


def test_demo_yaml_is_a_local_embedded_setup() -> None:
    s = load(CONFIG / "demo.yaml", environ={})
    assert s.redis.embedded
    assert s.redis.data_dir.name == ".keygate-demo"
    assert s.admin_listen == Address("127.0.0.1", 8081)
    assert [u.url for u in s.upstreams.values()] == ["http://127.0.0.1:9000"]
    assert len(s.routes) == 1


def test_external_redis_example_uses_its_own_prefix_and_fails_closed() -> None:
    s = load(CONFIG / "examples" / "external-redis.yaml", environ={})
    assert s.redis.url == "redis://127.0.0.1:6379/0"
    assert s.redis.key_prefix not in ("", "kg:")
    assert s.redis.on_error == "fail_closed"


# --- defaults ----------------------------------------------------------------------------


def test_defaults_without_a_file() -> None:
    s = load(None, environ={})
    assert s.listen == Address("0.0.0.0", 8080)  # noqa: S104
    assert s.admin_listen == Address("127.0.0.1", 8081)
    assert s.workers == 1
    assert s.redis.url == "embedded" and s.redis.embedded
    assert s.redis.key_prefix == "kg:"
    assert s.redis.on_error == "fail_closed"
    assert s.keys.sources == ("bearer", "api_key_scheme", "x-api-key")
    assert s.keys.secret_prefix == "kg_"
    assert s.keys.hide_credentials is True
    assert set(s.dialects) == {"langflow", "flowise", "openrouter", "baseten", "konpro"}
    assert not any(d.enabled or d.path is not None for d in s.dialects.values())
    assert (s.upstreams, s.routes) == ({}, ())
    assert (s.log.format, s.log.level) == ("json", "info")
    assert (s.metrics.per_key, s.metrics.per_key_max) == (False, 1000)


def test_empty_file_and_null_sections_mean_defaults(tmp_path: Path) -> None:
    assert load(write(tmp_path, "# nothing\n"), environ={}) == build({}, tmp_path)
    nulls = dict.fromkeys(("redis", "keys", "admin", "metrics", "log", "dialects"))
    assert build({**nulls, "upstreams": None, "routes": None}, BASE) == build({}, BASE)


def test_relative_data_dir_resolves_against_the_base(tmp_path: Path) -> None:
    assert build({"redis": {"data_dir": "d"}}, tmp_path).redis.data_dir == tmp_path / "d"
    assert build({"redis": {"data_dir": "/var/kg"}}, tmp_path).redis.data_dir == Path("/var/kg")


def test_ipv6_addresses_are_accepted() -> None:
    s = build({"listen": "[::]:8080", "admin_listen": "[::1]:9091"}, BASE)
    assert (s.listen, s.admin_listen) == (Address("::", 8080), Address("::1", 9091))
    assert str(s.admin_listen) == "[::1]:9091"


def test_a_full_route_is_read_as_written() -> None:
    s = build(
        route(
            path=None,
            prefix="/files/",
            methods=["get", "PUT"],
            scopes={"get": ["files:read"], "*": ["files:any"]},
            strip_prefix=True,
            rewrite="/storage/",
            resource={"path_segment": 1},
            cost={"header": "X-Usage-Cost", "per_unit": 2},
            reserve=1,
            charge_failed=True,
            lease_seconds=2.5,
            on_expiry="refund",
            byok=True,
            rate_limit={"requests": 10, "period_seconds": 1.5},
            sources=["x-api-key"],
            websocket=True,
        ),
        BASE,
    )
    assert s.routes[0] == Route(
        name="r",
        upstream="llm",
        prefix="/files/",
        methods=("GET", "PUT"),
        scopes={"GET": ("files:read",), "*": ("files:any",)},
        strip_prefix=True,
        rewrite="/storage/",
        resource=ResourceRule(path_segment=1),
        cost=CostRule(header="X-Usage-Cost", per_unit=2.0),
        reserve=1.0,
        charge_failed=True,
        lease_seconds=2.5,
        on_expiry="refund",
        byok=True,
        rate_limit=RateLimit(10, 1.5),
        sources=("x-api-key",),
        websocket=True,
    )


# --- one rule, one line ------------------------------------------------------------------

RULES: dict[str, tuple[dict[Any, Any], list[str]]] = {
    # unknown options, everywhere
    "unknown top-level option": ({"listn": "x"}, ["listn: unknown option"]),
    "non-string top-level key": ({1: "x"}, ["1: unknown option"]),
    "unknown section option": ({"redis": {"uri": "x"}}, ["redis.uri: unknown option"]),
    "unknown keys option": ({"keys": {"header": "x"}}, ["keys.header: unknown option"]),
    "unknown upstream option": (
        {"upstreams": {"llm": {"url": "http://a", "retries": 3}}},
        ["upstreams.llm.retries: unknown option"],
    ),
    "unknown timeout": (
        {"upstreams": {"llm": {"url": "http://a", "timeouts": {"idle": 3}}}},
        ["upstreams.llm.timeouts.idle: unknown option"],
    ),
    "unknown route option": (route(timeout=3), ["routes[0].timeout: unknown option"]),
    "unknown cost option": (
        route(cost={"fixed": 1, "currency": "usd"}),
        ["routes[0].cost.currency: unknown option"],
    ),
    "unknown dialect": ({"dialects": {"openai": {}}}, ["dialects.openai: unknown option"]),
    "unknown dialect option": (
        {"dialects": {"langflow": {"enabled": True, "auth": "x"}}},
        ["dialects.langflow.auth: unknown option"],
    ),
    # wrong types
    "workers not an integer": ({"workers": "two"}, ["workers: must be an integer"]),
    "workers a float": ({"workers": 2.0}, ["workers: must be an integer"]),
    "workers a boolean": ({"workers": True}, ["workers: must be an integer"]),
    "number a boolean": (
        route(reserve=True, cost={"fixed": 1}),
        ["routes[0].reserve: must be a number"],
    ),
    "reserve without a cost": (
        route(reserve=1),
        ["routes[0].reserve: needs a cost rule: this route charges nothing"],
    ),
    "charge_failed without a cost": (
        route(charge_failed=True),
        ["routes[0].charge_failed: needs a cost rule: this route charges nothing"],
    ),
    "number a string": (
        {"redis": {"connect_timeout": "1s"}},
        ["redis.connect_timeout: must be a number"],
    ),
    "boolean a string": (
        {"keys": {"hide_credentials": "yes"}},
        ["keys.hide_credentials: must be true or false"],
    ),
    "string a number": ({"redis": {"url": 6379}}, ["redis.url: must be a string"]),
    "listen a number": ({"listen": 8080}, ["listen: must be a string"]),
    "section a list": ({"redis": ["url"]}, ["redis: must be a mapping"]),
    "section a string": ({"log": "debug"}, ["log: must be a mapping"]),
    "upstreams a list": ({"upstreams": []}, ["upstreams: must be a mapping of name to upstream"]),
    "upstream a string": (
        {"upstreams": {"llm": "http://a"}},
        ["upstreams.llm: must be a mapping"],
    ),
    "timeouts a list": (
        {"upstreams": {"llm": {"url": "http://a", "timeouts": [1, 2]}}},
        ["upstreams.llm.timeouts: must be a mapping"],
    ),
    "routes a mapping": ({"routes": {"chat": {}}}, ["routes: must be a list"]),
    "routes false": ({"routes": False}, ["routes: must be a list"]),
    "route a string": ({"routes": ["chat"]}, ["routes[0]: must be a mapping"]),
    "methods a string": (route(methods="POST"), ["routes[0].methods: must be a list of strings"]),
    "dialect a boolean": (
        {"dialects": {"flowise": False}},
        ["dialects.flowise: must be a mapping"],
    ),
    "dialect enabled a string": (
        {"dialects": {"flowise": {"enabled": "no"}}},
        ["dialects.flowise.enabled: must be true or false"],
    ),
    # numbers out of range
    "workers zero": ({"workers": 0}, ["workers: must be an integer >= 1"]),
    "workers negative": ({"workers": -2}, ["workers: must be an integer >= 1"]),
    "timeout zero": (
        {"redis": {"connect_timeout": 0}},
        ["redis.connect_timeout: must be a finite number > 0"],
    ),
    "timeout negative": (
        {"redis": {"socket_timeout": -1.5}},
        ["redis.socket_timeout: must be a finite number > 0"],
    ),
    "upstream timeout nan": (
        {"upstreams": {"llm": {"url": "http://a", "timeouts": {"read": float("nan")}}}},
        ["upstreams.llm.timeouts.read: must be a finite number > 0"],
    ),
    "upstream timeout inf": (
        {"upstreams": {"llm": {"url": "http://a", "timeouts": {"total": float("inf")}}}},
        ["upstreams.llm.timeouts.total: must be a finite number > 0"],
    ),
    "upstream timeout huge integer": (
        {"upstreams": {"llm": {"url": "http://a", "timeouts": {"connect": 10**400}}}},
        ["upstreams.llm.timeouts.connect: must be a finite number > 0"],
    ),
    "reserve negative": (
        route(reserve=-0.5, cost={"fixed": 1}),
        ["routes[0].reserve: must be a finite number >= 0"],
    ),
    "reservation lease zero": (
        {"reservations": {"lease_seconds": 0}},
        ["reservations.lease_seconds: must be a finite number > 0"],
    ),
    "reservation expiry unknown": (
        {"reservations": {"on_expiry": "forgive"}},
        ["reservations.on_expiry: must be one of charge, refund (got 'forgive')"],
    ),
    "route lease without a cost": (
        route(lease_seconds=5),
        ["routes[0].lease_seconds: needs a cost rule: this route charges nothing"],
    ),
    "reserve huge negative integer": (
        route(reserve=-(10**400), cost={"fixed": 1}),
        ["routes[0].reserve: must be a finite number >= 0"],
    ),
    "cost nan": (
        route(cost={"fixed": float("nan")}),
        ["routes[0].cost.fixed: must be a finite number >= 0"],
    ),
    "per_unit negative": (
        route(cost={"json": "usage.total_tokens", "per_unit": -1}),
        ["routes[0].cost.per_unit: must be a finite number >= 0"],
    ),
    "pool size zero": (
        {"upstreams": {"llm": {"url": "http://a", "pool_size": 0}}},
        ["upstreams.llm.pool_size: must be an integer >= 1"],
    ),
    "hash cache negative": (
        {"keys": {"hash_cache_size": -1}},
        ["keys.hash_cache_size: must be an integer >= 0"],
    ),
    "admin body too small": (
        {"admin": {"max_body_bytes": 100}},
        ["admin.max_body_bytes: must be an integer >= 1024"],
    ),
    "per_key_max zero": (
        {"metrics": {"per_key_max": 0}},
        ["metrics.per_key_max: must be an integer >= 1"],
    ),
    # routes
    "route with an unknown upstream": (
        route(upstream="x"),
        ["routes[0].upstream: unknown upstream 'x'"],
    ),
    "route without an upstream": (
        route(upstream=None),
        ["routes[0].upstream: unknown upstream ''"],
    ),
    "route with path and prefix": (
        route(prefix="/r/"),
        ["routes[0]: needs exactly one of path or prefix"],
    ),
    "route with neither path nor prefix": (
        route(path=None),
        ["routes[0]: needs exactly one of path or prefix"],
    ),
    "route path without a slash": (route(path="v1/chat"), ["routes[0].path: must start with '/'"]),
    "route prefix without a slash": (
        route(path=None, prefix="files/"),
        ["routes[0].prefix: must start with '/'"],
    ),
    "route without a name": (
        route(name=None),
        ["routes[0].name: must be 1-64 characters of A-Z a-z 0-9 _ . -"],
    ),
    "route name with a space": (
        route(name="my route"),
        ["routes[0].name: must be 1-64 characters of A-Z a-z 0-9 _ . -"],
    ),
    "unknown method": (
        route(methods=["POST", "FETCH"]),
        ["routes[0].methods[1]: unknown method 'FETCH'"],
    ),
    "scopes a string": (
        route(scopes="chat:invoke"),
        ["routes[0].scopes: must be a list of scopes or a mapping of method to scopes"],
    ),
    "scopes a list of non-strings": (
        route(scopes=[1, 2]),
        ["routes[0].scopes: must be a list of scopes or a mapping of method to scopes"],
    ),
    "scopes for an unknown method": (
        route(scopes={"FETCH": ["a"]}),
        ["routes[0].scopes.FETCH: unknown method 'FETCH'"],
    ),
    "scopes of a method not a list": (
        route(scopes={"POST": "chat:invoke"}),
        ["routes[0].scopes.POST: must be a list of strings"],
    ),
    "cost with nothing": (
        route(cost={}),
        ["routes[0].cost: needs exactly one of fixed, header, json, llm"],
    ),
    "cost with only per_unit": (
        route(cost={"per_unit": 2}),
        ["routes[0].cost: needs exactly one of fixed, header, json, llm"],
    ),
    "cost with two": (
        route(cost={"fixed": 1, "header": "X-Cost"}),
        ["routes[0].cost: needs exactly one of fixed, header, json, llm"],
    ),
    "cost with an empty field": (
        route(cost={"json": ""}),
        ["routes[0].cost: needs exactly one of fixed, header, json, llm"],
    ),
    "cost a number": (route(cost=0.002), ["routes[0].cost: must be a mapping"]),
    "resource with nothing": (
        route(resource={"max_body_bytes": 10}),
        ["routes[0].resource: needs exactly one of json, query, path_segment, header"],
    ),
    "resource with two": (
        route(resource={"json": "model", "query": "model"}),
        ["routes[0].resource: needs exactly one of json, query, path_segment, header"],
    ),
    "resource with an empty field": (
        route(resource={"query": ""}),
        ["routes[0].resource: needs exactly one of json, query, path_segment, header"],
    ),
    "resource segment negative": (
        route(resource={"path_segment": -1}),
        ["routes[0].resource.path_segment: must be an integer >= 0"],
    ),
    "rate limit without period": (
        route(rate_limit={"requests": 10}),
        ["routes[0].rate_limit: needs requests and period_seconds"],
    ),
    "rate limit with null requests": (
        route(rate_limit={"requests": None, "period_seconds": 60}),
        ["routes[0].rate_limit: needs requests and period_seconds"],
    ),
    "rate limit zero requests": (
        route(rate_limit={"requests": 0, "period_seconds": 60}),
        ["routes[0].rate_limit.requests: must be an integer >= 1"],
    ),
    "rate limit fractional requests": (
        route(rate_limit={"requests": 1.5, "period_seconds": 60}),
        ["routes[0].rate_limit.requests: must be an integer"],
    ),
    "rate limit zero period": (
        route(rate_limit={"requests": 5, "period_seconds": 0}),
        ["routes[0].rate_limit.period_seconds: must be a finite number > 0"],
    ),
    "rate limit a number": (route(rate_limit=100), ["routes[0].rate_limit: must be a mapping"]),
    "unknown error format": (
        route(error_format="json"),
        ["routes[0].error_format: must be one of problem, openai, anthropic (got 'json')"],
    ),
    "unknown route source": (
        route(sources=["cookie"]),
        ["routes[0].sources[0]: unknown source 'cookie'"],
    ),
    "duplicate route names": (
        {
            "upstreams": UPSTREAMS,
            "routes": [
                {"name": "chat", "path": "/a", "upstream": "llm"},
                {"name": "chat", "path": "/b", "upstream": "llm"},
            ],
        },
        ["routes[1].name: duplicate route name 'chat'"],
    ),
    # keys
    "unknown credential source": (
        {"keys": {"sources": ["bearer", "cookie"]}},
        [
            "keys.sources[1]: unknown source 'cookie' "
            "(one of bearer, api_key_scheme, x-api-key, query)"
        ],
    ),
    "sources a string": (
        {"keys": {"sources": "bearer"}},
        ["keys.sources: must be a list of strings"],
    ),
    "secret prefix with a colon": (
        {"keys": {"secret_prefix": "kg:"}},
        ["keys.secret_prefix: must be 1-16 characters of A-Z a-z 0-9 _ -"],
    ),
    "secret prefix empty": (
        {"keys": {"secret_prefix": ""}},
        ["keys.secret_prefix: must be 1-16 characters of A-Z a-z 0-9 _ -"],
    ),
    # listeners
    "listen without a port": (
        {"listen": "0.0.0.0"},  # noqa: S104
        ["listen: must be host:port or [ipv6]:port (got '0.0.0.0')"],
    ),
    "listen without a host": (
        {"listen": ":8080"},
        ["listen: must be host:port or [ipv6]:port (got ':8080')"],
    ),
    "listen port too large": (
        {"listen": "0.0.0.0:70000"},
        ["listen: must be host:port or [ipv6]:port (got '0.0.0.0:70000')"],
    ),
    "listen port not a number": (
        {"admin_listen": "localhost:http"},
        ["admin_listen: must be host:port or [ipv6]:port (got 'localhost:http')"],
    ),
    "listen a URL": (
        {"listen": "http://0.0.0.0:8080"},
        ["listen: must be host:port or [ipv6]:port (got 'http://0.0.0.0:8080')"],
    ),
    "listen unbracketed ipv6": (
        {"listen": "::1:8080"},
        ["listen: must be host:port or [ipv6]:port (got '::1:8080')"],
    ),
    "listen non-ascii digits": (
        {"listen": "localhost:8²"},
        ["listen: must be host:port or [ipv6]:port (got 'localhost:8²')"],
    ),
    # redis
    "redis url scheme": (
        {"redis": {"url": "http://127.0.0.1:6379"}},
        [
            "redis.url: must be 'embedded' or a redis://, rediss://, unix://, redis+sentinel:// or "
            "redis+cluster:// URL "
            "(got 'http://127.0.0.1:6379')"
        ],
    ),
    "redis url not a url": (
        {"redis": {"url": "localhost:6379"}},
        [
            "redis.url: must be 'embedded' or a redis://, rediss://, unix://, redis+sentinel:// or "
            "redis+cluster:// URL "
            "(got 'localhost:6379')"
        ],
    ),
    "redis url unbalanced bracket": (
        {"redis": {"url": "redis://[::1:6379"}},
        [
            "redis.url: must be 'embedded' or a redis://, rediss://, unix://, redis+sentinel:// or "
            "redis+cluster:// URL "
            "(got 'redis://[::1:6379')"
        ],
    ),
    "key prefix with braces": (
        {"redis": {"key_prefix": "kg:{x}:"}},
        ["redis.key_prefix: must be non-empty and hold no '{' or '}' (they are hash tags)"],
    ),
    "key prefix with one brace": (
        {"redis": {"key_prefix": "kg{"}},
        ["redis.key_prefix: must be non-empty and hold no '{' or '}' (they are hash tags)"],
    ),
    "key prefix empty": (
        {"redis": {"key_prefix": ""}},
        ["redis.key_prefix: must be non-empty and hold no '{' or '}' (they are hash tags)"],
    ),
    "unknown on_error": (
        {"redis": {"on_error": "open"}},
        ["redis.on_error: must be one of fail_closed, fail_open (got 'open')"],
    ),
    # upstreams
    "upstream url scheme": (
        {"upstreams": {"llm": {"url": "ftp://files"}}},
        ["upstreams.llm.url: must be an http:// or https:// URL (got 'ftp://files')"],
    ),
    "upstream url without host": (
        {"upstreams": {"llm": {"url": "http://"}}},
        ["upstreams.llm.url: must be an http:// or https:// URL (got 'http://')"],
    ),
    "upstream without url": (
        {"upstreams": {"llm": {"pool_size": 5}}},
        ["upstreams.llm.url: must be an http:// or https:// URL (got '')"],
    ),
    "upstream url unbalanced bracket": (
        {"upstreams": {"llm": {"url": "http://[::1:9000"}}},
        ["upstreams.llm.url: must be an http:// or https:// URL (got 'http://[::1:9000')"],
    ),
    "upstream name not a string": (
        {"upstreams": {1: {"url": "http://a"}}},
        ["upstreams.1: the name must be 1-64 characters of A-Z a-z 0-9 _ . -"],
    ),
    # dialects, log
    "dialect path without a slash": (
        {"dialects": {"konpro": {"path": "keys"}}},
        ["dialects.konpro.path: must start with '/'"],
    ),
    "unknown log level": (
        {"log": {"level": "verbose"}},
        ["log.level: must be one of debug, info, warning, error (got 'verbose')"],
    ),
    "log level in capitals": (
        {"log": {"level": "INFO"}},
        ["log.level: must be one of debug, info, warning, error (got 'INFO')"],
    ),
    "unknown log format": (
        {"log": {"format": "logfmt"}},
        ["log.format: must be one of json, text (got 'logfmt')"],
    ),
}


@pytest.mark.parametrize(("raw", "expected"), RULES.values(), ids=RULES.keys())
def test_each_rule_reports_its_own_line(raw: dict[Any, Any], expected: list[str]) -> None:
    assert problems(raw) == expected


def test_unknown_upstream_names_the_route_by_index() -> None:
    raw = {
        "upstreams": {"llm": {"url": "http://a"}},
        "routes": [
            {"name": "a", "path": "/a", "upstream": "llm"},
            {"name": "b", "path": "/b", "upstream": "llm"},
            {"name": "c", "path": "/c", "upstream": "llm2"},
        ],
    }
    assert problems(raw) == ["routes[2].upstream: unknown upstream 'llm2'"]


def test_a_password_in_a_refused_url_is_not_printed() -> None:
    lines = problems(
        {
            "redis": {"url": "http://:hunter2@cache:6379"},
            "upstreams": {"llm": {"url": "ftp://me:hunter2@files"}},
        }
    )
    assert len(lines) == 2
    assert all("hunter2" not in line and ":***@" in line for line in lines), lines


def test_several_problems_in_one_file_are_all_reported(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
listen: 0.0.0.0
workers: 0
redis:
  url: http://cache
  key_prefix: "kg:{a}:"
keys:
  sources: [bearer, cookie]
upstreams:
  llm: {url: http://127.0.0.1:9000}
routes:
  - {name: chat, path: /v1/chat, upstream: llm2}
  - {name: chat, path: /v1/x, prefix: /v1/, upstream: llm, methods: [FETCH]}
log: {level: verbose, colour: true}
""",
    )
    with pytest.raises(ConfigError) as info:
        load(path, environ={})
    assert sorted(info.value.problems) == sorted(
        [
            "log.colour: unknown option",
            "listen: must be host:port or [ipv6]:port (got '0.0.0.0')",
            "workers: must be an integer >= 1",
            "redis.url: must be 'embedded' or a redis://, rediss://, unix://, redis+sentinel:// or "
            "redis+cluster:// URL "
            "(got 'http://cache')",
            "redis.key_prefix: must be non-empty and hold no '{' or '}' (they are hash tags)",
            "keys.sources[1]: unknown source 'cookie' "
            "(one of bearer, api_key_scheme, x-api-key, query)",
            "routes[0].upstream: unknown upstream 'llm2'",
            "routes[1]: needs exactly one of path or prefix",
            "routes[1].methods[0]: unknown method 'FETCH'",
            "routes[1].name: duplicate route name 'chat'",
            "log.level: must be one of debug, info, warning, error (got 'verbose')",
        ]
    )
    assert str(info.value) == "\n".join(info.value.problems)


# --- reading the file --------------------------------------------------------------------


def test_invalid_yaml_names_the_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, "workers: 1\nredis:\n  url: [embedded\nlog: {}\n")
    with pytest.raises(ConfigError) as info:
        load(path, environ={})
    [line] = info.value.problems
    assert line.startswith(f"{path}:4: not valid YAML (")
    assert "\n" not in line


@pytest.mark.parametrize(
    ("content", "line"),
    [
        pytest.param(b"workers: 1\nlog:\n  level: \x07\n", 3, id="control character"),
        pytest.param(b"workers: 1\n\xff\xfe\n", 2, id="not UTF-8"),
        pytest.param(b"? [a, b]\n: 1\n", 1, id="unhashable key"),
    ],
)
def test_unreadable_yaml_is_one_line_with_its_line_number(
    tmp_path: Path, content: bytes, line: int
) -> None:
    path = write(tmp_path, content)
    with pytest.raises(ConfigError) as info:
        load(path, environ={})
    [problem] = info.value.problems
    assert problem.startswith(f"{path}:{line}: not valid YAML (")
    assert "\n" not in problem


@pytest.mark.parametrize(
    "content",
    [
        pytest.param("workers: " + "9" * 5000 + "\n", id="5000-digit integer"),
        pytest.param("a: " + "[" * 20000 + "]" * 20000 + "\n", id="20000-deep nesting"),
    ],
)
def test_pathological_yaml_is_a_problem_not_a_crash(tmp_path: Path, content: str) -> None:
    path = write(tmp_path, content)
    with pytest.raises(ConfigError) as info:
        load(path, environ={})
    [problem] = info.value.problems
    assert problem.startswith(f"{path}: not valid YAML (")


@pytest.mark.parametrize("content", ["- listen: 0.0.0.0:8080\n", "42\n", "false\n", "[]\n"])
def test_top_level_must_be_a_mapping(tmp_path: Path, content: str) -> None:
    path = write(tmp_path, content)
    with pytest.raises(ConfigError) as info:
        load(path, environ={})
    assert info.value.problems == [f"{path}: the top level must be a mapping"]


def test_a_missing_file_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load(path, environ={})
    assert info.value.problems == [f"{path}: cannot read (No such file or directory)"]


def test_a_directory_is_reported(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, environ={})
    assert info.value.problems == [f"{tmp_path}: cannot read (Is a directory)"]


# --- KEYGATE_* overrides -----------------------------------------------------------------

FILE = """\
listen: 0.0.0.0:8080
redis:
  url: embedded
  key_prefix: "file:"
  connect_timeout: 3
keys:
  sources: [bearer, x-api-key]
log:
  level: info
"""


def test_environment_overrides_the_file(tmp_path: Path) -> None:
    s = load(
        write(tmp_path, FILE),
        environ={
            "KEYGATE_REDIS_URL": "redis://127.0.0.1:6379/2",
            "KEYGATE_LISTEN": "127.0.0.1:9090",
            "KEYGATE_ADMIN_LISTEN": "[::1]:9091",
            "KEYGATE_WORKERS": "4",
            "KEYGATE_LOG_LEVEL": "debug",
            "KEYGATE_KEYS_SOURCES": "[bearer]",
            "KEYGATE_REDIS_KEY_PREFIX": "env:",
            "KEYGATE_METRICS_PER_KEY": "true",
            "KEYGATE_KEYS_HASH_CACHE_SIZE": "10",
        },
    )
    assert s.redis.url == "redis://127.0.0.1:6379/2"
    assert s.listen == Address("127.0.0.1", 9090)
    assert s.admin_listen == Address("::1", 9091)
    assert s.workers == 4
    assert s.log.level == "debug"
    assert s.keys.sources == ("bearer",)
    assert s.redis.key_prefix == "env:"
    assert s.metrics.per_key is True
    assert s.keys.hash_cache_size == 10
    assert s.redis.connect_timeout == 3.0  # the file's other options in the section stay


def test_environment_overrides_apply_without_a_file() -> None:
    s = load(None, environ={"KEYGATE_REDIS_URL": "unix:///run/redis.sock", "KEYGATE_WORKERS": "2"})
    assert (s.redis.url, s.workers) == ("unix:///run/redis.sock", 2)


@pytest.mark.parametrize("text", ["kg:", "app:", '"app:"', "123", "on", "null"])
def test_text_options_from_the_environment_keep_their_text(text: str) -> None:
    s = load(None, environ={"KEYGATE_REDIS_KEY_PREFIX": text})
    assert s.redis.key_prefix == text.strip('"')


ENV_RULES: dict[str, tuple[dict[str, str], list[str]]] = {
    "workers not a number": ({"KEYGATE_WORKERS": "abc"}, ["KEYGATE_WORKERS: must be an integer"]),
    "workers zero": ({"KEYGATE_WORKERS": "0"}, ["KEYGATE_WORKERS: must be an integer >= 1"]),
    "workers empty": ({"KEYGATE_WORKERS": ""}, ["KEYGATE_WORKERS: must be an integer"]),
    "workers 5000 digits": (
        {"KEYGATE_WORKERS": "9" * 5000},
        ["KEYGATE_WORKERS: must be an integer"],
    ),
    "listen a port only": (
        {"KEYGATE_LISTEN": "8080"},
        ["KEYGATE_LISTEN: must be host:port or [ipv6]:port (got '8080')"],
    ),
    "reservation expiry": (
        {"KEYGATE_RESERVATIONS_ON_EXPIRY": "never"},
        ["KEYGATE_RESERVATIONS_ON_EXPIRY: must be one of charge, refund (got 'never')"],
    ),
    "log level": (
        {"KEYGATE_LOG_LEVEL": "verbose"},
        ["KEYGATE_LOG_LEVEL: must be one of debug, info, warning, error (got 'verbose')"],
    ),
    "log level not YAML": (
        {"KEYGATE_LOG_LEVEL": "[unclosed"},
        ["KEYGATE_LOG_LEVEL: must be one of debug, info, warning, error (got '[unclosed')"],
    ),
    "redis url": (
        {"KEYGATE_REDIS_URL": "mysql://db"},
        [
            "KEYGATE_REDIS_URL: must be 'embedded' or a redis://, rediss://, unix://, "
            "redis+sentinel:// or redis+cluster:// URL (got 'mysql://db')"
        ],
    ),
    "key prefix braces": (
        {"KEYGATE_REDIS_KEY_PREFIX": "{kg}"},
        ["KEYGATE_REDIS_KEY_PREFIX: must be non-empty and hold no '{' or '}' (they are hash tags)"],
    ),
    "sources a word": (
        {"KEYGATE_KEYS_SOURCES": "bearer"},
        ["KEYGATE_KEYS_SOURCES: must be a list of strings"],
    ),
    "sources unknown": (
        {"KEYGATE_KEYS_SOURCES": "[bearer, cookie]"},
        [
            "KEYGATE_KEYS_SOURCES[1]: unknown source 'cookie' "
            "(one of bearer, api_key_scheme, x-api-key, query)"
        ],
    ),
    "sources not YAML": (
        {"KEYGATE_KEYS_SOURCES": "[bearer"},
        ["KEYGATE_KEYS_SOURCES: must be a list of strings"],
    ),
    "timeout": (
        {"KEYGATE_REDIS_SOCKET_TIMEOUT": "-1"},
        ["KEYGATE_REDIS_SOCKET_TIMEOUT: must be a finite number > 0"],
    ),
    "per_key": (
        {"KEYGATE_METRICS_PER_KEY": "maybe"},
        ["KEYGATE_METRICS_PER_KEY: must be true or false"],
    ),
}


@pytest.mark.parametrize(("environ", "expected"), ENV_RULES.values(), ids=ENV_RULES.keys())
def test_environment_overrides_are_validated(environ: dict[str, str], expected: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        load(None, environ=environ)
    assert info.value.problems == expected


def test_variables_that_are_not_options_are_ignored(tmp_path: Path) -> None:
    environ = {
        "KEYGATE_TEST_REDIS_URL": "not a url",
        "KEYGATE_CONFIG": "/elsewhere.yaml",
        "KEYGATE_SERVICE_HOST": "10.0.0.7",  # Kubernetes, for a Service named keygate
        "KEYGATE_PORT": "tcp://10.0.0.7:8080",
        "REDIS_URL": "mysql://db",
        "keygate_workers": "abc",
    }
    path = write(tmp_path, FILE)
    assert load(path, environ=environ) == load(path, environ={})


def test_keygate_variables_that_set_nothing_are_problems(tmp_path: Path) -> None:
    environ = {
        "KEYGATE_REDIS_NOPE": "1",
        "KEYGATE_ROUTES": "[oops]",
        "KEYGATE_": "x",
        "KEYGATE_WORKERS": "0",  # reported with them
    }
    with pytest.raises(ConfigError) as info:
        load(write(tmp_path, FILE), environ=environ)
    assert info.value.problems == [
        "KEYGATE_: no such option (KEYGATE_<SECTION>_<KEY> sets <section>.<key>)",
        "KEYGATE_REDIS_NOPE: no such option (KEYGATE_<SECTION>_<KEY> sets <section>.<key>)",
        "KEYGATE_ROUTES: routes can be set in the config file only",
        "KEYGATE_WORKERS: must be an integer >= 1",
    ]


def test_an_override_does_not_hide_a_malformed_section(tmp_path: Path) -> None:
    path = write(tmp_path, "redis: [embedded]\n")
    with pytest.raises(ConfigError) as info:
        load(path, environ={"KEYGATE_REDIS_URL": "redis://127.0.0.1:6379/0"})
    assert info.value.problems == ["redis: must be a mapping"]


# --- keygate check-config ----------------------------------------------------------------


def check_config(path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("KEYGATE_")}
    return subprocess.run(
        [sys.executable, "-m", "gateway", "check-config", str(path)],
        capture_output=True,
        text=True,
        env={**environ, **env},
        timeout=60,
        check=False,
    )


def test_check_config_accepts_the_documented_config() -> None:
    done = check_config(CONFIG / "gateway.yaml")
    assert done.returncode == 0, done.stderr
    assert done.stdout == (
        f"{CONFIG / 'gateway.yaml'}: ok (1 upstreams, 4 routes; "
        f"key store: embedded Redis in {CONFIG / '.keygate'}, key prefix kg:)\n"
    )
    assert done.stderr == ""


def test_check_config_lists_every_problem_without_a_traceback(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
workers: 0
upstreams:
  llm: {url: http://127.0.0.1:9000}
routes:
  - {name: chat, path: /v1/chat, upstream: llm2}
redis: {url: http://cache}
""",
    )
    done = check_config(path)
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.splitlines() == [
        "workers: must be an integer >= 1",
        "redis.url: must be 'embedded' or a redis://, rediss://, unix://, "
        "redis+sentinel:// or redis+cluster:// URL (got 'http://cache')",
        "routes[0].upstream: unknown upstream 'llm2'",
    ]
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(
    ("content", "env", "expected"),
    [
        pytest.param("redis: {url: [x\n", {}, ": not valid YAML (", id="bad YAML"),
        pytest.param(b"\xff\n", {}, ":1: not valid YAML (not UTF-8 text)", id="binary"),
        pytest.param("reserve: 1\n", {}, "reserve: unknown option", id="unknown option"),
        pytest.param(
            "workers: 1\n",
            {"KEYGATE_WORKERS": "abc"},
            "KEYGATE_WORKERS: must be an integer",
            id="env",
        ),
        pytest.param(
            "routes: [{name: r, path: /r, upstream: u, cost: {fixed: 1" + "0" * 400 + "}}]\n",
            {},
            "must be a finite number",
            id="huge number",
        ),
    ],
)
def test_check_config_refuses_with_exit_2_and_no_traceback(
    tmp_path: Path, content: str | bytes, env: dict[str, str], expected: str
) -> None:
    done = check_config(write(tmp_path, content), **env)
    assert done.returncode == 2, done.stdout
    assert expected in done.stderr
    assert "Traceback" not in done.stderr


def test_check_config_reports_a_missing_file(tmp_path: Path) -> None:
    done = check_config(tmp_path / "missing.yaml")
    assert done.returncode == 2
    assert done.stderr == f"{tmp_path / 'missing.yaml'}: cannot read (No such file or directory)\n"


@pytest.mark.parametrize(
    ("text", "line", "key"),
    [
        ("redis:\n  url: embedded\n  url: redis://127.0.0.1:6379/0\n", 3, "url"),
        ("routes: []\nlisten: 127.0.0.1:1\nroutes: []\n", 3, "routes"),
        ("upstreams:\n  llm: {url: 'http://a:1', url: 'http://b:2'}\n", 2, "url"),
    ],
)
def test_a_key_given_twice_is_a_problem_not_a_silent_override(
    tmp_path: Path, text: str, line: int, key: str
) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as error:
        load(path, environ={})
    assert error.value.problems == [f"{path}:{line}: not valid YAML (key {key!r} is given twice)"]
