"""Request-target normalisation, done before routing so that no spelling of a path
(``/v1/../admin``, ``%2e%2e``, ``//``, ``%2F``) reaches a route it should not."""

from __future__ import annotations

import re
from urllib.parse import quote, unquote

_FORBIDDEN_ENCODED = ("%2f", "%5c", "%00")
_SAFE = "/:@!$&'()*+,;=~-._"


_PLAIN = re.compile(r"(?:/[A-Za-z0-9_~!$&'()*+,;=:@-][A-Za-z0-9._~!$&'()*+,;=:@-]*)*/?(?:\?[^#]*)?")


def is_plain(raw_target: str) -> bool:
    """True when the raw target is already normal: no escapes, no dot segments, no empty
    segments, nothing to decode. The common case skips the full normalisation."""
    return _PLAIN.fullmatch(raw_target) is not None and "/." not in raw_target.partition("?")[0]


class BadPath(ValueError):
    """A request target keygate refuses to interpret (400)."""


def normalize(raw_target: str) -> str:
    """The decoded, dot-free, single-slash path of a raw request target (query dropped).

    A fragment is refused, not dropped: a client never sends one (RFC 9112 §3.2), and
    cutting the target there is a guess an upstream may not share.

    Encoded slashes, backslashes and control characters are refused rather than guessed
    at: upstreams disagree on what they mean, and that disagreement is how bypasses work.
    """
    if "#" in raw_target:
        # origin-form has no fragment; upstreams disagree on where such a target ends.
        raise BadPath("a request target carries no fragment ('#')")
    path = raw_target.split("?", 1)[0]
    if not path.startswith("/"):
        raise BadPath("the request target must be an absolute path")
    lowered = path.lower()
    if "\\" in path or any(code in lowered for code in _FORBIDDEN_ENCODED):
        raise BadPath("encoded slashes, backslashes and NUL are not allowed in paths")
    decoded = unquote(path, errors="strict")
    if any(ord(char) < 0x20 or ord(char) == 0x7F for char in decoded):
        raise BadPath("control characters are not allowed in paths")
    segments: list[str] = []
    for segment in decoded.split("/")[1:]:
        if segment in ("", "."):
            continue
        if segment == "..":
            if not segments:
                raise BadPath("the path climbs above the root")
            segments.pop()
            continue
        segments.append(segment)
    trailing = decoded.endswith(("/", "/.", "/..")) and bool(segments)
    return "/" + "/".join(segments) + ("/" if trailing else "")


def encode(path: str) -> str:
    """Percent-encode a normalised path for the upstream request line."""
    return quote(path, safe=_SAFE)
