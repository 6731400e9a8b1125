"""``KEYGATE_<SECTION>_<KEY>`` environment overrides, applied to the raw config.

Any other ``KEYGATE_*`` variable is a mistake keygate reports (a typo would otherwise leave
the option at its default without a word), except the few that are not options at all.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

ENV_PREFIX = "KEYGATE_"
SECTIONS = ("client", "redis", "keys", "admin", "metrics", "log", "reservations")
_TOP_SCALARS = ("listen", "admin_listen", "workers", "shutdown_timeout")
_FILE_ONLY = ("upstreams", "routes", "dialects")
# KEYGATE_* variables that are not options: the CLI's config file, what the worker
# supervisor hands its workers (its pid, their sockets, their readiness pipe), and what
# keygate's own tests and tools read.
NOT_OPTIONS = frozenset(
    (
        "KEYGATE_CONFIG",
        "KEYGATE_WORKER_OF",
        "KEYGATE_LISTENER_FDS",
        "KEYGATE_READY_FD",
        "KEYGATE_TEST_REDIS",
        "KEYGATE_TEST_REDIS_URL",
        "KEYGATE_FUZZ_EXAMPLES",
        "KEYGATE_WIRE_FUZZ_EXAMPLES",
    )
)
# What Kubernetes puts in every pod for a Service named keygate or keygate-<x> (as the
# shipped manifests name theirs): not ours to judge. A bare *_PORT counts only with the
# tcp://host:port value Kubernetes gives it, so KEYGATE_PORT=9000 is still a mistake.
_SERVICE_LINK = re.compile(
    r"KEYGATE(_\w+?)?_(SERVICE_HOST|SERVICE_PORT(_\w+)?"
    r"|PORT_\d+_(TCP|UDP|SCTP)(_PROTO|_PORT|_ADDR)?)"
)
_PORT_LINK = re.compile(r"KEYGATE(_\w+?)?_PORT")
_PORT_LINK_VALUE = re.compile(r"(tcp|udp|sctp)://")


def option_of(name: str) -> str | None:
    """The option a variable overrides (``KEYGATE_REDIS_URL`` -> ``redis.url``,
    ``KEYGATE_LISTEN`` -> ``listen``), or None when it names no option."""
    if not name.startswith(ENV_PREFIX):
        return None
    rest = name[len(ENV_PREFIX) :].lower()
    if rest in _TOP_SCALARS:
        return rest
    section, _, key = rest.partition("_")
    if section in SECTIONS and key in SECTION_KEYS[section]:
        return f"{section}.{key}"
    return None


def apply_env(
    raw: dict[str, Any], environ: Mapping[str, str], cwd: Path | None = None
) -> dict[str, Any]:
    """Overlay ``KEYGATE_<SECTION>_<KEY>`` (and ``KEYGATE_LISTEN`` ...) onto the raw config.

    Values are parsed as YAML scalars, so ``true``, ``8`` and ``[a, b]`` keep their type;
    string options keep the text as given (``KEYGATE_REDIS_KEY_PREFIX=kg:`` is not a mapping)
    and text that is not YAML stays text, for validation to judge. A relative path given in
    a variable is relative to ``cwd`` (the working directory), not to the config file.
    Variables that name no option are left out here; ``unknown_variables`` reports them.
    """
    merged = dict(raw)
    for name, text in environ.items():
        option = option_of(name)
        if option is None:
            continue
        section, _, key = option.rpartition(".")
        value = _env_value(text, option in _TEXT_OPTIONS)
        if option in PATH_OPTIONS and cwd is not None and isinstance(value, str) and value:
            value = str(cwd / value)  # an absolute value stays as it is
        if not section:
            merged[key] = value
            continue
        current = merged.get(section)
        if current is not None and not isinstance(current, dict):
            continue  # the file's own error ("must be a mapping") is reported
        merged[section] = {**(current or {}), key: value}
    return merged


def unknown_variables(environ: Mapping[str, str]) -> list[str]:
    """One problem line per ``KEYGATE_*`` variable that sets no option, sorted by name:
    ``KEYGATE_REDIS_URLL: no such option (did you mean KEYGATE_REDIS_URL?)``."""
    problems = []
    for name in sorted(environ):
        if not name.startswith(ENV_PREFIX) or name in NOT_OPTIONS or option_of(name):
            continue
        if _SERVICE_LINK.fullmatch(name) or (
            _PORT_LINK.fullmatch(name) and _PORT_LINK_VALUE.match(environ[name])
        ):
            continue
        problems.append(f"{name}: {_why_unknown(name[len(ENV_PREFIX) :].lower())}")
    return problems


def _why_unknown(rest: str) -> str:
    head = rest.partition("_")[0]
    if head in _FILE_ONLY:
        return f"{head} can be set in the config file only"
    options = [*_TOP_SCALARS, *(f"{s}_{k}" for s in SECTIONS for k in SECTION_KEYS[s])]
    close = difflib.get_close_matches(rest, options, n=1, cutoff=0.8)
    if close:
        return f"no such option (did you mean {ENV_PREFIX}{close[0].upper()}?)"
    return "no such option (KEYGATE_<SECTION>_<KEY> sets <section>.<key>)"


def name_variables(problems: list[str], environ: Mapping[str, str]) -> list[str]:
    """``problems`` with each option a variable set named by that variable, since the
    variable is what the operator has to fix: ``KEYGATE_REDIS_SOCKET_TIMEOUT: must be ...``
    for ``redis.socket_timeout: must be ...``, ``KEYGATE_KEYS_SOURCES[1]: ...``."""
    variables = {option: name for name in environ if (option := option_of(name)) is not None}
    named = []
    for line in problems:
        where, sep, message = line.partition(": ")
        for option, name in variables.items():
            if where == option or where.startswith((f"{option}[", f"{option}.")):
                where = name + where[len(option) :]
                break
        named.append(f"{where}{sep}{message}")
    return named


# Options that are file paths (relative ones resolve against the config file's directory).
PATH_OPTIONS = frozenset(
    ("redis.data_dir", "redis.tls_ca_file", "redis.tls_cert_file", "redis.tls_key_file")
)
_TEXT_OPTIONS = frozenset(
    (
        "listen",
        "admin_listen",
        "redis.url",
        "redis.data_dir",
        "redis.key_prefix",
        "redis.on_error",
        "redis.username",
        "redis.password",
        "redis.tls_ca_file",
        "redis.tls_cert_file",
        "redis.tls_key_file",
        "keys.secret_prefix",
        "keys.query_param",
        "admin.default_workspace",
        "log.format",
        "log.level",
        "log.access_format",
        "metrics.listen",
        "reservations.on_expiry",
    )
)


def _env_value(text: str, is_text: bool) -> Any:
    try:
        value = yaml.safe_load(text) if text else ""
    except (yaml.YAMLError, ValueError, RecursionError):
        return text
    return text if is_text and not isinstance(value, str) else value


SECTION_KEYS: dict[str, tuple[str, ...]] = {
    "client": (
        "header_timeout",
        "keepalive_timeout",
        "body_timeout",
        "min_upload_rate",
        "max_connections",
    ),
    "redis": (
        "url",
        "data_dir",
        "key_prefix",
        "on_error",
        "connect_timeout",
        "socket_timeout",
        "cluster",
        "username",
        "password",
        "tls_ca_file",
        "tls_cert_file",
        "tls_key_file",
        "tls_check_hostname",
        "replica_acks",
        "replica_ack_timeout",
        "health_check_interval",
    ),
    "keys": ("secret_prefix", "sources", "query_param", "hide_credentials", "hash_cache_size"),
    "admin": ("max_body_bytes", "default_workspace"),
    "metrics": ("per_key", "per_key_max", "listen", "on_proxy"),
    "log": ("format", "level", "access", "access_format"),
    "reservations": ("lease_seconds", "on_expiry"),
}
