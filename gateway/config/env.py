"""``KEYGATE_<SECTION>_<KEY>`` environment overrides, applied to the raw config."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import yaml

ENV_PREFIX = "KEYGATE_"
SECTIONS = ("redis", "keys", "admin", "metrics", "log")
_TOP_SCALARS = ("listen", "admin_listen", "workers", "shutdown_timeout")


def apply_env(raw: dict[str, Any], environ: Mapping[str, str]) -> dict[str, Any]:
    """Overlay ``KEYGATE_<SECTION>_<KEY>`` (and ``KEYGATE_LISTEN`` ...) onto the raw config.

    Values are parsed as YAML scalars, so ``true``, ``8`` and ``[a, b]`` keep their type;
    string options keep the text as given (``KEYGATE_REDIS_KEY_PREFIX=kg:`` is not a mapping)
    and text that is not YAML stays text, for validation to judge.
    Variables that name no option (``KEYGATE_TEST_REDIS_URL``) are not keygate's to judge.
    """
    merged = dict(raw)
    for name, text in environ.items():
        if not name.startswith(ENV_PREFIX):
            continue
        rest = name[len(ENV_PREFIX) :].lower()
        if rest in _TOP_SCALARS:
            merged[rest] = _env_value(text, rest in _TEXT_OPTIONS)
            continue
        section, _, key = rest.partition("_")
        if section in SECTIONS and key in SECTION_KEYS[section]:
            current = merged.get(section)
            if current is not None and not isinstance(current, dict):
                continue  # the file's own error ("must be a mapping") is reported
            value = _env_value(text, f"{section}.{key}" in _TEXT_OPTIONS)
            merged[section] = {**(current or {}), key: value}
    return merged


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
    )
)


def _env_value(text: str, is_text: bool) -> Any:
    try:
        value = yaml.safe_load(text) if text else ""
    except (yaml.YAMLError, ValueError, RecursionError):
        return text
    return text if is_text and not isinstance(value, str) else value


SECTION_KEYS: dict[str, tuple[str, ...]] = {
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
    ),
    "keys": ("secret_prefix", "sources", "query_param", "hide_credentials", "hash_cache_size"),
    "admin": ("max_body_bytes", "default_workspace"),
    "metrics": ("per_key", "per_key_max", "listen", "on_proxy"),
    "log": ("format", "level", "access", "access_format"),
}
