"""Typed reading of raw YAML that records problems (one line each) instead of raising."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any, TypeVar, cast
from urllib.parse import SplitResult, urlsplit

from gateway.config.model import Address

T = TypeVar("T")


class Reader:
    """Typed access to raw YAML that records problems instead of raising."""

    def __init__(self) -> None:
        self.problems: list[str] = []

    def fail(self, path: str, message: str) -> None:
        self.problems.append(f"{path}: {message}")

    def section(
        self, raw: Mapping[str, Any], key: str, path: str, known: tuple[str, ...]
    ) -> dict[str, Any]:
        value = raw.get(key, {})
        where = f"{path}{key}"
        if value is None:
            return {}
        if not isinstance(value, dict):
            self.fail(where, "must be a mapping")
            return {}
        self.unknown(value, where, known)
        return value

    def unknown(self, raw: Mapping[str, Any], path: str, known: tuple[str, ...]) -> None:
        for key in raw:
            if key not in known:
                self.fail(join(path, key), "unknown option")

    def get(self, raw: Mapping[str, Any], key: str, path: str, kind: type[T], default: T) -> T:
        if key not in raw or raw[key] is None:
            return default
        value = raw[key]
        ok = isinstance(value, kind) and not (kind in (int, float) and isinstance(value, bool))
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            try:
                value, ok = float(value), True
            except OverflowError:  # too large for a float: inf, which number() refuses
                value, ok = (math.inf if value > 0 else -math.inf), True
        if not ok:
            self.fail(join(path, key), f"must be {kind_name(kind)}")
            return default
        return cast(T, value)

    def number(
        self,
        raw: Mapping[str, Any],
        key: str,
        path: str,
        default: float,
        *,
        low: float = 0.0,
        open_low: bool = False,
    ) -> float:
        value = self.get(raw, key, path, float, default)
        where = join(path, key)
        if not math.isfinite(value) or value < low or (open_low and value == low):
            self.fail(where, f"must be a finite number {'>' if open_low else '>='} {low:g}")
            return default
        return value

    def integer(
        self, raw: Mapping[str, Any], key: str, path: str, default: int, *, low: int
    ) -> int:
        value = self.get(raw, key, path, int, default)
        if value < low:
            self.fail(join(path, key), f"must be an integer >= {low}")
            return default
        return value

    def choice(
        self, raw: Mapping[str, Any], key: str, path: str, allowed: tuple[str, ...], default: str
    ) -> str:
        value = self.get(raw, key, path, str, default)
        if value not in allowed:
            self.fail(join(path, key), f"must be one of {', '.join(allowed)} (got {value!r})")
            return default
        return value

    def strings(
        self, raw: Mapping[str, Any], key: str, path: str, default: tuple[str, ...]
    ) -> tuple[str, ...]:
        value = raw.get(key)
        if value is None:
            return default
        if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
            self.fail(join(path, key), "must be a list of strings")
            return default
        return tuple(value)


def join(path: str, key: object) -> str:
    return f"{path}.{key}" if path else str(key)


def kind_name(kind: type) -> str:
    return {
        str: "a string",
        int: "an integer",
        float: "a number",
        bool: "true or false",
        dict: "a mapping",
        list: "a list",
    }.get(kind, kind.__name__)


_HOST = re.compile(r"[A-Za-z0-9._-]+|\[[0-9A-Fa-f:.]+(%[A-Za-z0-9._-]+)?\]")


def parse_address(text: str) -> Address:
    """``host:port`` or ``[v6]:port``; raises ValueError with a readable reason."""
    host, sep, port = text.rpartition(":")
    ok_port = port.isascii() and port.isdigit() and int(port) <= 65535
    if not sep or not ok_port or not _HOST.fullmatch(host):
        raise ValueError(f"must be host:port or [ipv6]:port (got {text!r})")
    return Address(host.removeprefix("[").removesuffix("]"), int(port))


def split_url(url: str) -> SplitResult | None:
    try:
        return urlsplit(url)
    except ValueError:  # e.g. "redis://[::1": unbalanced brackets
        return None


def scheme_of(url: str) -> str:
    parts = split_url(url)
    return parts.scheme if parts is not None else ""


def redact_url(url: str) -> str:
    """``url`` for a problem line or a log, every password replaced by ``***``: the
    userinfo's password (``user:***@``), a userinfo without ``:`` (keygate reads it as a
    password alone: ``***@``) and any query value whose name holds ``password``.

    Edited as text, so a URL urlsplit cannot read (an unbalanced ``[``) is redacted too;
    the userinfo ends where urlsplit ends it, at the first ``/``, ``?`` or ``#``.
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    end = min((i for i in map(rest.find, "/?#") if i >= 0), default=len(rest))
    netloc, tail = rest[:end], rest[end:]
    userinfo, at, hosts = netloc.rpartition("@")
    if at:
        user, colon, _ = userinfo.partition(":")
        netloc = f"{user}:***@{hosts}" if colon else f"***@{hosts}"
    path, question, query = tail.partition("?")
    if question:
        query, hash_sign, fragment = query.partition("#")
        query = "&".join(
            f"{name}=***" if "password" in name.lower() else f"{name}{equals}{value}"
            for name, equals, value in (item.partition("=") for item in query.split("&"))
        )
        tail = f"{path}?{query}{hash_sign}{fragment}"
    return f"{scheme}://{netloc}{tail}"
