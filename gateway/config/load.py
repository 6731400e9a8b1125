"""Read gateway.yaml plus KEYGATE_* overrides into Settings, reporting every problem.

Validation collects all problems (one line each, naming the path, e.g.
``routes[2].upstream: unknown upstream 'llm2'``) instead of stopping at the first, so an
operator fixes a file in one pass.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar, cast

import yaml

from gateway.config.env import (
    SECTION_KEYS,
    SECTIONS,
    apply_env,
    name_variables,
    unknown_variables,
)
from gateway.config.model import (
    CREDENTIAL_SOURCES,
    DEFAULT_ADMIN_LISTEN,
    DEFAULT_LISTEN,
    DEFAULT_SOURCES,
    DIALECTS,
    HTTP_METHODS,
    RESERVATION_LEASE_MARGIN,
    Address,
    AdminSettings,
    ClientSettings,
    CostRule,
    Dialect,
    KeySettings,
    LogSettings,
    MetricsSettings,
    ModelPriceOverride,
    RateLimit,
    RedisSettings,
    Reservations,
    ResourceRule,
    Route,
    Settings,
    Timeouts,
    Upstream,
)
from gateway.config.reader import Reader, parse_address, redact_url, scheme_of, split_url
from gateway.config.topology import SCHEMES, parse_target
from gateway.scope_rule import parse_scope

T = TypeVar("T")
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


class ConfigError(Exception):
    """The configuration is invalid; ``problems`` holds one line per problem."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


def _redis(r: Reader, raw: Mapping[str, Any], base: Path) -> RedisSettings:
    s = r.section(raw, "redis", "", SECTION_KEYS["redis"])
    url = r.get(s, "url", "redis", str, "embedded")
    if url != "embedded" and scheme_of(url) not in SCHEMES:
        r.fail(
            "redis.url",
            "must be 'embedded' or a redis://, rediss://, unix://, redis+sentinel:// or "
            f"redis+cluster:// URL (got {redact_url(url)!r})",
        )
    data_dir = Path(r.get(s, "data_dir", "redis", str, ".keygate"))
    prefix = r.get(s, "key_prefix", "redis", str, "kg:")
    if not prefix or "{" in prefix or "}" in prefix:
        r.fail("redis.key_prefix", "must be non-empty and hold no '{' or '}' (they are hash tags)")

    def file(key: str) -> Path | None:  # relative to the config file, as data_dir
        value = r.get(s, key, "redis", str, "")
        return base / value if value else None

    settings = RedisSettings(
        url=url,
        data_dir=data_dir if data_dir.is_absolute() else base / data_dir,
        key_prefix=prefix,
        on_error=cast(
            Any, r.choice(s, "on_error", "redis", ("fail_closed", "fail_open"), "fail_closed")
        ),
        connect_timeout=r.number(s, "connect_timeout", "redis", 1.0, open_low=True),
        socket_timeout=r.number(s, "socket_timeout", "redis", 2.0, open_low=True),
        cluster=r.get(s, "cluster", "redis", bool, False),
        username=r.get(s, "username", "redis", str, "") or None,
        password=r.get(s, "password", "redis", str, "") or None,
        tls_ca_file=file("tls_ca_file"),
        tls_cert_file=file("tls_cert_file"),
        tls_key_file=file("tls_key_file"),
        tls_check_hostname=r.get(s, "tls_check_hostname", "redis", bool, True),
        replica_acks=r.integer(s, "replica_acks", "redis", 0, low=0),
        replica_ack_timeout=r.number(s, "replica_ack_timeout", "redis", 0.5, open_low=True),
        health_check_interval=r.number(s, "health_check_interval", "redis", 15.0),
    )
    if url != "embedded" and scheme_of(url) in SCHEMES:
        try:
            parse_target(url, settings)
        except ValueError as exc:
            r.fail("redis.url", f"{exc} (got {redact_url(url)!r})")
    elif url == "embedded" and settings.cluster:
        r.fail("redis.cluster", "the embedded server is not a cluster: set redis.url")
    if settings.replica_acks and settings.replica_ack_timeout >= settings.socket_timeout:
        # A reply waits for WAIT: past socket_timeout the connection is presumed dead.
        r.fail("redis.replica_ack_timeout", "must be less than redis.socket_timeout")
    if settings.tls_key_file and not settings.tls_cert_file:
        r.fail("redis.tls_key_file", "needs redis.tls_cert_file (the certificate it belongs to)")
    return settings


def _keys(r: Reader, raw: Mapping[str, Any]) -> KeySettings:
    s = r.section(raw, "keys", "", SECTION_KEYS["keys"])
    sources = r.strings(s, "sources", "keys", DEFAULT_SOURCES)
    for i, source in enumerate(sources):
        if source not in CREDENTIAL_SOURCES:
            r.fail(
                f"keys.sources[{i}]",
                f"unknown source {source!r} (one of {', '.join(CREDENTIAL_SOURCES)})",
            )
    prefix = r.get(s, "secret_prefix", "keys", str, "kg_")
    if not re.fullmatch(r"[A-Za-z0-9_-]{1,16}", prefix):
        r.fail("keys.secret_prefix", "must be 1-16 characters of A-Z a-z 0-9 _ -")
    return KeySettings(
        secret_prefix=prefix,
        sources=sources,
        query_param=r.get(s, "query_param", "keys", str, "api_key"),
        hide_credentials=r.get(s, "hide_credentials", "keys", bool, True),
        hash_cache_size=r.integer(s, "hash_cache_size", "keys", 100_000, low=0),
    )


CLIENT_KEYS = SECTION_KEYS["client"]


def _client(r: Reader, raw: Mapping[str, Any]) -> ClientSettings:
    s = r.section(raw, "client", "", CLIENT_KEYS)
    cap: int | None = None  # auto: what the file descriptor limit leaves room for
    value = s.get("max_connections")
    if value not in (None, "auto"):
        if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
            cap = value
        else:
            r.fail("client.max_connections", f"must be auto or an integer >= 1 (got {value!r})")
    return ClientSettings(
        header_timeout=r.number(s, "header_timeout", "client", 10.0, open_low=True),
        keepalive_timeout=r.number(s, "keepalive_timeout", "client", 75.0, open_low=True),
        body_timeout=r.number(s, "body_timeout", "client", 30.0, open_low=True),
        min_upload_rate=r.integer(s, "min_upload_rate", "client", 500, low=0),
        max_connections=cap,
    )


def _upstreams(r: Reader, raw: Mapping[str, Any]) -> dict[str, Upstream]:
    section = raw.get("upstreams")
    if section is None:
        return {}
    if not isinstance(section, dict):
        r.fail("upstreams", "must be a mapping of name to upstream")
        return {}
    result: dict[str, Upstream] = {}
    for name, spec in section.items():
        path = f"upstreams.{name}"
        if not isinstance(name, str) or not _NAME.match(name):
            r.fail(path, "the name must be 1-64 characters of A-Z a-z 0-9 _ . -")
        if not isinstance(spec, dict):
            r.fail(path, "must be a mapping")
            continue
        r.unknown(
            spec,
            path,
            ("url", "timeouts", "pool_size", "max_response_head_bytes", "max_response_headers"),
        )
        url = r.get(spec, "url", path, str, "")
        parts = split_url(url)
        if parts is None or parts.scheme not in ("http", "https") or not parts.netloc:
            r.fail(f"{path}.url", f"must be an http:// or https:// URL (got {redact_url(url)!r})")
        t = r.section(spec, "timeouts", f"{path}.", ("connect", "read", "total"))
        timeouts = Timeouts(
            connect=r.number(t, "connect", f"{path}.timeouts", 2.0, open_low=True),
            read=r.number(t, "read", f"{path}.timeouts", 60.0, open_low=True),
            total=r.number(t, "total", f"{path}.timeouts", 300.0, open_low=True),
        )
        result[str(name)] = Upstream(
            str(name),
            url.rstrip("/"),
            timeouts,
            r.integer(spec, "pool_size", path, 100, low=1),
            max_response_head_bytes=r.integer(
                spec, "max_response_head_bytes", path, 65_536, low=1024
            ),
            max_response_headers=r.integer(spec, "max_response_headers", path, 100, low=1),
        )
    return result


_ROUTE_KEYS = (
    "name",
    "path",
    "prefix",
    "upstream",
    "methods",
    "scopes",
    "strip_prefix",
    "rewrite",
    "resource",
    "cost",
    "reserve",
    "reserve_mode",
    "unpriced_reserve",
    "max_output_tokens",
    "charge_failed",
    "lease_seconds",
    "on_expiry",
    "byok",
    "rate_limit",
    "error_format",
    "sources",
    "websocket",
    "yield_to_dialects",
)


def _route(
    r: Reader, spec: Mapping[str, Any], path: str, upstreams: Mapping[str, Upstream]
) -> Route | None:
    r.unknown(spec, path, _ROUTE_KEYS)
    name = r.get(spec, "name", path, str, "")
    if not _NAME.match(name):
        r.fail(f"{path}.name", "must be 1-64 characters of A-Z a-z 0-9 _ . -")
    exact, prefix = r.get(spec, "path", path, str, ""), r.get(spec, "prefix", path, str, "")
    if bool(exact) == bool(prefix):
        r.fail(path, "needs exactly one of path or prefix")
    for key, value in (("path", exact), ("prefix", prefix)):
        if value and not value.startswith("/"):
            r.fail(f"{path}.{key}", "must start with '/'")
    upstream = r.get(spec, "upstream", path, str, "")
    if upstream not in upstreams:
        r.fail(f"{path}.upstream", f"unknown upstream {upstream!r}")
    methods = tuple(m.upper() for m in r.strings(spec, "methods", path, ()))
    for i, method in enumerate(methods):
        if method not in HTTP_METHODS:
            r.fail(f"{path}.methods[{i}]", f"unknown method {method!r}")
    for key in ("reserve", "charge_failed", "lease_seconds", "on_expiry"):
        if spec.get(key) is not None and spec.get("cost") is None:
            r.fail(f"{path}.{key}", "needs a cost rule: this route charges nothing")
    cost = _one_of(
        r,
        spec,
        "cost",
        path,
        ("fixed", "header", "json", "per_unit", "llm", "provider", "unpriced"),
        ("fixed", "header", "json", "llm"),
        _cost,
    )
    llm = cost is not None and cost.llm is not None
    for key in ("reserve_mode", "unpriced_reserve", "max_output_tokens"):
        if spec.get(key) is not None and not llm:
            r.fail(f"{path}.{key}", "applies to an LLM route only (cost: {llm: ...})")
    reserve_auto = spec.get("reserve") == "auto"
    if reserve_auto and not llm:
        r.fail(f"{path}.reserve", "auto needs an LLM cost rule (cost: {llm: ...})")
    allow_unpriced = cost is not None and cost.unpriced == "allow"
    if allow_unpriced and not reserve_auto and spec.get("reserve") is None:
        r.fail(
            f"{path}.reserve",
            "required with unpriced: allow: a request for a model with no price is "
            "charged its reservation, never 0 by accident",
        )
    if allow_unpriced and reserve_auto and spec.get("unpriced_reserve") is None:
        r.fail(
            f"{path}.unpriced_reserve",
            "required with reserve: auto and unpriced: allow: what a request for a "
            "model with no price reserves (and is charged)",
        )
    return Route(
        name=name,
        upstream=upstream,
        path=exact or None,
        prefix=prefix or None,
        methods=methods,
        scopes=_scopes(r, spec.get("scopes"), f"{path}.scopes"),
        strip_prefix=r.get(spec, "strip_prefix", path, bool, False),
        rewrite=r.get(spec, "rewrite", path, str, "") or None,
        resource=_one_of(
            r,
            spec,
            "resource",
            path,
            ("json", "query", "path_segment", "header", "max_body_bytes"),
            ("json", "query", "path_segment", "header"),
            _resource,
        ),
        cost=cost,
        reserve=r.number(spec, "reserve", path, 0.0)
        if spec.get("reserve") is not None and not reserve_auto
        else (r.number(spec, "unpriced_reserve", path, 0.0) if reserve_auto else None),
        reserve_auto=reserve_auto,
        reserve_mode=cast(
            Any,
            r.choice(spec, "reserve_mode", path, ("worst_case", "remaining"), "worst_case"),
        ),
        max_output_tokens=r.integer(spec, "max_output_tokens", path, 0, low=0)
        if spec.get("max_output_tokens") is not None
        else None,
        charge_failed=r.get(spec, "charge_failed", path, bool, False),
        lease_seconds=r.number(spec, "lease_seconds", path, 1.0, open_low=True)
        if spec.get("lease_seconds") is not None
        else None,
        on_expiry=cast(Any, r.choice(spec, "on_expiry", path, ("charge", "refund"), "charge"))
        if spec.get("on_expiry") is not None
        else None,
        byok=r.get(spec, "byok", path, bool, False),
        rate_limit=_rate_limit(r, spec, path),
        error_format=cast(
            Any, r.choice(spec, "error_format", path, ("problem", "openai", "anthropic"), "problem")
        ),
        sources=_route_sources(r, spec, path),
        websocket=r.get(spec, "websocket", path, bool, False),
        yield_to_dialects=r.get(spec, "yield_to_dialects", path, bool, False),
    )


def _scopes(r: Reader, raw: Any, path: str) -> dict[str, tuple[str, ...]]:
    if raw is None:
        return {}
    if isinstance(raw, list) and all(isinstance(s, str) for s in raw):
        _holdable(r, raw, path)
        return {"*": tuple(raw)}
    if isinstance(raw, dict):
        result: dict[str, tuple[str, ...]] = {}
        for method, scopes in raw.items():
            key = str(method).upper()
            if key not in HTTP_METHODS and key != "*":
                r.fail(f"{path}.{method}", f"unknown method {method!r}")
            elif not isinstance(scopes, list) or not all(isinstance(s, str) for s in scopes):
                r.fail(f"{path}.{method}", "must be a list of strings")
            else:
                _holdable(r, scopes, f"{path}.{method}")
                result[key] = tuple(scopes)
        return result
    r.fail(path, "must be a list of scopes or a mapping of method to scopes")
    return {}


def _holdable(r: Reader, scopes: list[str], path: str) -> None:
    """Refuse a scope no key can be given (the keys' own scope rule decides), since
    only a key holding ``*`` could then use the route."""
    for i, scope in enumerate(scopes):
        try:
            parse_scope(scope)
        except ValueError as exc:
            r.fail(f"{path}[{i}]", f"{scope!r} is not a scope a key can hold ({exc})")


def _one_of(
    r: Reader,
    spec: Mapping[str, Any],
    key: str,
    path: str,
    known: tuple[str, ...],
    exclusive: tuple[str, ...],
    build: Callable[[Reader, dict[str, Any], str], T],
) -> T | None:
    if spec.get(key) is None:
        return None
    if not isinstance(spec[key], dict):
        r.fail(f"{path}.{key}", "must be a mapping")
        return None
    raw = r.section(spec, key, f"{path}.", known)
    if sum(raw.get(k) not in (None, "") for k in exclusive) != 1:
        r.fail(f"{path}.{key}", f"needs exactly one of {', '.join(exclusive)}")
    return build(r, raw, f"{path}.{key}")


def _resource(r: Reader, raw: dict[str, Any], path: str) -> ResourceRule:
    segment = raw.get("path_segment")
    return ResourceRule(
        json=r.get(raw, "json", path, str, "") or None,
        query=r.get(raw, "query", path, str, "") or None,
        header=r.get(raw, "header", path, str, "") or None,
        path_segment=r.integer(raw, "path_segment", path, 0, low=0)
        if segment is not None
        else None,
        max_body_bytes=r.integer(raw, "max_body_bytes", path, 1_048_576, low=1),
    )


def _cost(r: Reader, raw: dict[str, Any], path: str) -> CostRule:
    llm = r.choice(raw, "llm", path, ("openai", "anthropic"), "openai") if raw.get("llm") else None
    if llm is None:
        for key in ("provider", "unpriced"):
            if raw.get(key) is not None:
                r.fail(f"{path}.{key}", "applies to an LLM cost rule only (llm: ...)")
    elif raw.get("per_unit") is not None:
        r.fail(f"{path}.per_unit", "an LLM cost rule is priced per model (prices), not per unit")
    return CostRule(
        fixed=r.number(raw, "fixed", path, 0.0) if raw.get("fixed") is not None else None,
        header=r.get(raw, "header", path, str, "") or None,
        json=r.get(raw, "json", path, str, "") or None,
        per_unit=r.number(raw, "per_unit", path, 1.0),
        llm=cast(Any, llm),
        provider=r.get(raw, "provider", path, str, "") or None,
        unpriced=cast(Any, r.choice(raw, "unpriced", path, ("refuse", "allow"), "refuse")),
    )


_PRICE_KEYS = ("input_mtok", "output_mtok", "cache_read_mtok", "cache_write_mtok")


def _prices(r: Reader, raw: Mapping[str, Any]) -> dict[str, ModelPriceOverride]:
    """``prices``: model name -> credits per million tokens; wins over the catalogue."""
    section = raw.get("prices")
    if section is None:
        return {}
    if not isinstance(section, dict):
        r.fail("prices", "must be a mapping of model name to prices")
        return {}
    result = {}
    for model, spec in section.items():
        where = f"prices.{model}"
        if not isinstance(model, str) or not model:
            r.fail(where, "a model name must be a non-empty string")
            continue
        if not isinstance(spec, dict):
            r.fail(where, "must be a mapping (input_mtok, output_mtok, ...)")
            continue
        r.unknown(spec, where, _PRICE_KEYS)
        for key in ("input_mtok", "output_mtok"):
            if spec.get(key) is None:
                r.fail(f"{where}.{key}", "required: credits per million tokens")

        def optional(key: str, spec: dict[str, Any] = spec, where: str = where) -> float | None:
            return r.number(spec, key, where, 0.0) if spec.get(key) is not None else None

        result[model] = ModelPriceOverride(
            input_mtok=r.number(spec, "input_mtok", where, 0.0),
            output_mtok=r.number(spec, "output_mtok", where, 0.0),
            cache_read_mtok=optional("cache_read_mtok"),
            cache_write_mtok=optional("cache_write_mtok"),
        )
    return result


def _rate_limit(r: Reader, spec: Mapping[str, Any], path: str) -> RateLimit | None:
    if spec.get("rate_limit") is None:
        return None
    if not isinstance(spec["rate_limit"], dict):
        r.fail(f"{path}.rate_limit", "must be a mapping")
        return None
    raw = r.section(spec, "rate_limit", f"{path}.", ("requests", "period_seconds"))
    where = f"{path}.rate_limit"
    if raw.get("requests") is None or raw.get("period_seconds") is None:
        r.fail(where, "needs requests and period_seconds")
    return RateLimit(
        r.integer(raw, "requests", where, 1, low=1),
        r.number(raw, "period_seconds", where, 1.0, open_low=True),
    )


def _route_sources(r: Reader, spec: Mapping[str, Any], path: str) -> tuple[str, ...] | None:
    if spec.get("sources") is None:
        return None
    sources = r.strings(spec, "sources", path, ())
    for i, source in enumerate(sources):
        if source not in CREDENTIAL_SOURCES:
            r.fail(f"{path}.sources[{i}]", f"unknown source {source!r}")
    return sources


def _routes(
    r: Reader, raw: Mapping[str, Any], upstreams: Mapping[str, Upstream]
) -> tuple[Route, ...]:
    section = raw.get("routes")
    if section is None:
        return ()
    if not isinstance(section, list):
        r.fail("routes", "must be a list")
        return ()
    routes, seen = [], set()
    for i, spec in enumerate(section):
        if not isinstance(spec, dict):
            r.fail(f"routes[{i}]", "must be a mapping")
            continue
        route = _route(r, spec, f"routes[{i}]", upstreams)
        if route is not None:
            if route.name in seen:
                r.fail(f"routes[{i}].name", f"duplicate route name {route.name!r}")
            seen.add(route.name)
            routes.append(route)
    return tuple(routes)


def _reservations(r: Reader, raw: Mapping[str, Any]) -> Reservations:
    s = r.section(raw, "reservations", "", SECTION_KEYS["reservations"])
    lease = None
    if s.get("lease_seconds") is not None:
        lease = r.number(s, "lease_seconds", "reservations", 1.0, open_low=True)
    expiry = r.choice(s, "on_expiry", "reservations", ("charge", "refund"), "charge")
    return Reservations(lease_seconds=lease, on_expiry=cast(Any, expiry))


def _leased(
    routes: tuple[Route, ...], upstreams: Mapping[str, Upstream], reservations: Reservations
) -> tuple[Route, ...]:
    """Each route with its reservation lease and expiry rule (see Reservations)."""

    def lease(route: Route) -> float:
        if route.lease_seconds is not None:
            return route.lease_seconds
        if reservations.lease_seconds is not None:
            return reservations.lease_seconds
        upstream = upstreams.get(route.upstream)
        total = upstream.timeouts.total if upstream is not None else Timeouts().total
        return total + RESERVATION_LEASE_MARGIN

    return tuple(
        dataclasses.replace(
            route,
            lease_seconds=lease(route),
            on_expiry=route.on_expiry or reservations.on_expiry,
        )
        for route in routes
    )


def _dialects(r: Reader, raw: Mapping[str, Any]) -> dict[str, Dialect]:
    section = r.section(raw, "dialects", "", DIALECTS)
    result = {}
    for name in DIALECTS:
        spec = r.section(section, name, "dialects.", ("enabled", "path"))
        where = f"dialects.{name}"
        path = r.get(spec, "path", where, str, "") or None
        if path is not None and not path.startswith("/"):
            r.fail(f"{where}.path", "must start with '/'")
        # Off unless enabled: a dialect lists (some also create and delete) keys on the
        # proxy listener, which is public.
        result[name] = Dialect(r.get(spec, "enabled", where, bool, False), path)
    return result


def _address(r: Reader, raw: Mapping[str, Any], key: str, default: Address) -> Address:
    text = r.get(raw, key, "", str, str(default))
    try:
        return parse_address(text)
    except ValueError as exc:
        r.fail(key, str(exc))
        return default


def _optional_address(r: Reader, raw: Mapping[str, Any], key: str, where: str) -> Address | None:
    text = raw.get(key)
    if text is None:
        return None
    if not isinstance(text, str):
        r.fail(where, "must be host:port")
        return None
    try:
        return parse_address(text)
    except ValueError as exc:
        r.fail(where, str(exc))
        return None


_ANY_HOST = ("0.0.0.0", "::")  # noqa: S104 - compared with, never bound


def _overlap(a: Address, b: Address) -> bool:
    """Whether two listeners would take one port: the same port (0 picks a free one) on
    the same host, a wildcard host, or localhost and a loopback address."""
    if a.port != b.port or a.port == 0:
        return False
    hosts = {a.host.lower(), b.host.lower()}
    return (
        len(hosts) == 1
        or bool(hosts & set(_ANY_HOST))
        or ("localhost" in hosts and bool(hosts & {"127.0.0.1", "::1"}))
    )


def _listeners_apart(r: Reader, settings: Settings) -> None:
    listeners = [("listen", settings.listen), ("admin_listen", settings.admin_listen)]
    if settings.metrics.listen is not None:
        listeners.append(("metrics.listen", settings.metrics.listen))
    if settings.auth_listen is not None:
        listeners.append(("auth_listen", settings.auth_listen))
    for i, (name, address) in enumerate(listeners):
        for other, taken in listeners[:i]:
            if _overlap(address, taken):
                r.fail(
                    name,
                    f"{address} overlaps {other} ({taken}): each listener needs a port of its own",
                )


def build(raw: Mapping[str, Any], base: Path) -> Settings:
    """Validate a raw mapping into Settings; relative paths resolve against ``base``."""
    r = Reader()
    r.unknown(
        raw,
        "",
        (
            "listen",
            "admin_listen",
            "auth_listen",
            "workers",
            "shutdown_timeout",
            "upstreams",
            "routes",
            *SECTIONS,
            "dialects",
            "prices",
        ),
    )
    upstreams = _upstreams(r, raw)
    admin = r.section(raw, "admin", "", SECTION_KEYS["admin"])
    metrics = r.section(raw, "metrics", "", SECTION_KEYS["metrics"])
    log = r.section(raw, "log", "", SECTION_KEYS["log"])
    reservations = _reservations(r, raw)
    settings = Settings(
        listen=_address(r, raw, "listen", DEFAULT_LISTEN),
        admin_listen=_address(r, raw, "admin_listen", DEFAULT_ADMIN_LISTEN),
        auth_listen=_optional_address(r, raw, "auth_listen", "auth_listen"),
        workers=r.integer(raw, "workers", "", 1, low=1),
        shutdown_timeout=r.number(raw, "shutdown_timeout", "", 30.0, open_low=True),
        redis=_redis(r, raw, base),
        keys=_keys(r, raw),
        client=_client(r, raw),
        admin=AdminSettings(
            max_body_bytes=r.integer(admin, "max_body_bytes", "admin", 1_048_576, low=1024),
            default_workspace=r.get(admin, "default_workspace", "admin", str, "default"),
        ),
        upstreams=upstreams,
        routes=_leased(_routes(r, raw, upstreams), upstreams, reservations),
        reservations=reservations,
        prices=_prices(r, raw),
        dialects=_dialects(r, raw),
        metrics=MetricsSettings(
            r.get(metrics, "per_key", "metrics", bool, False),
            r.integer(metrics, "per_key_max", "metrics", 1000, low=1),
            _optional_address(r, metrics, "listen", "metrics.listen"),
            r.get(metrics, "on_proxy", "metrics", bool, False),
        ),
        log=LogSettings(
            cast(Any, r.choice(log, "format", "log", ("json", "text"), "json")),
            cast(Any, r.choice(log, "level", "log", ("debug", "info", "warning", "error"), "info")),
            r.get(log, "access", "log", bool, True),
            cast(Any, r.choice(log, "access_format", "log", ("auto", "json", "text"), "auto")),
        ),
    )
    _listeners_apart(r, settings)
    if r.problems:
        raise ConfigError(r.problems)
    return settings


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping.

    Plain YAML keeps the last one silently, so a second ``routes:`` or a repeated
    ``upstream:`` would replace the first without a word.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, list | dict):  # unhashable: let PyYAML report it as usual
                continue
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} is given twice", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load(path: Path | None, environ: Mapping[str, str] | None = None) -> Settings:
    """Read ``path`` (or defaults when None), apply KEYGATE_* overrides, validate.

    Relative paths in the file (``redis.data_dir``, ``redis.tls_*``), and the defaults of
    path options, are relative to the file's directory, so the store does not depend on
    where keygate was started; without a file, and in variables, to the working directory.
    A ``KEYGATE_*`` variable that names no option is a problem, and a problem in a value a
    variable gave names the variable.
    """
    raw: Any = {}
    cwd = Path.cwd()
    base = cwd if path is None else Path(os.path.abspath(path)).parent  # no "x/.." left
    if path is not None:
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError([f"{path}: cannot read ({exc.strerror})"]) from None
        except UnicodeDecodeError as exc:
            line = exc.object.count(b"\n", 0, exc.start) + 1
            raise ConfigError([f"{path}:{line}: not valid YAML (not UTF-8 text)"]) from None
        try:
            raw = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            position = getattr(exc, "position", None)  # a ReaderError: a forbidden character
            if mark is not None:
                where = f"{path}:{mark.line + 1}"
            elif position is not None:
                where = f"{path}:{text.count(chr(10), 0, position) + 1}"
            else:
                where = str(path)
            detail = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            raise ConfigError([f"{where}: not valid YAML ({detail})"]) from None
        except (ValueError, RecursionError) as exc:  # 5000-digit integers, 10000-deep nesting
            detail = str(exc).splitlines()[0] if str(exc) else "nested too deeply"
            raise ConfigError([f"{path}: not valid YAML ({detail})"]) from None
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise ConfigError([f"{path}: the top level must be a mapping"])
    environ = os.environ if environ is None else environ
    unknown = unknown_variables(environ)
    try:
        settings = build(apply_env(raw, environ, cwd), base)
    except ConfigError as exc:
        raise ConfigError(unknown + name_variables(exc.problems, environ)) from None
    if unknown:
        raise ConfigError(unknown)
    return settings
