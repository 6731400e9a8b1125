"""Reading a request body whole without ever holding more than a bound of it, and
parsing a JSON body into a value safe to validate, store and answer with."""

from __future__ import annotations

import json
import re

from aiohttp import StreamReader

_CHUNK = 65_536


class ClientLeft(Exception):
    """The client closed its connection before sending the whole body. Nobody is left to
    answer and nothing failed on keygate's side: not a store error, not worth a warning.
    (Deliberately no OSError: handlers treat those as the key store failing.)"""


async def read_capped(content: StreamReader, limit: int) -> bytes | None:
    """The whole body, or None as soon as it grows past ``limit`` bytes (chunked too).

    Raises ClientLeft when the connection ends first (aiohttp reports that as a
    ConnectionResetError from the body stream)."""
    parts: list[bytes] = []
    size = 0
    try:
        while chunk := await content.read(_CHUNK):
            size += len(chunk)
            if size > limit:
                return None
            parts.append(chunk)
    except OSError:  # reading a request body touches no store: only the client can fail
        raise ClientLeft from None
    return b"".join(parts)


MAX_DEPTH = 32  # arrays and objects inside one another; no key body needs more than 3
_SURROGATE = re.compile("[\ud800-\udfff]")


class NotJson(ValueError):
    """A body refused as JSON; the message says why and is safe to show."""


def parse_json(raw: bytes, *, constants: bool = True) -> object:
    """The JSON value of ``raw``, or NotJson when it is none keygate can take.

    Refused besides malformed JSON (and, without ``constants``, NaN and Infinity):

    - nesting deeper than MAX_DEPTH: a value nested near the interpreter's recursion limit
      parses, then fails wherever it is walked or written back out (as a 500);
    - a lone surrogate in any string or name (``"\\ud800"``, or its raw bytes, which json
      lets through): it is no Unicode text, so it cannot be stored, hashed or sent as UTF-8.
    """
    try:
        value: object = json.loads(raw, parse_constant=None if constants else _no_constant)
    except RecursionError:
        raise NotJson("nested too deeply") from None
    except ValueError as exc:  # UnicodeDecodeError included
        raise NotJson(f"not valid JSON ({exc})") from None
    _check_tree(value)
    return value


def is_text(value: str) -> bool:
    """Whether ``value`` is Unicode text: no lone surrogate (which json decodes from
    ``"\\ud800"`` and from raw surrogate bytes alike)."""
    return _SURROGATE.search(value) is None


def _no_constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON")


def _check_tree(value: object) -> None:
    """Walk the parsed value without recursion: depth, then every string and name."""
    stack: list[tuple[object, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            if not is_text(item):
                raise NotJson("a string holds a lone surrogate")
        elif isinstance(item, dict | list):
            if depth >= MAX_DEPTH:
                raise NotJson("nested too deeply")
            children = [*item, *item.values()] if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)
