"""Reading a request body whole without ever holding more than a bound of it."""

from __future__ import annotations

from aiohttp import StreamReader

_CHUNK = 65_536


async def read_capped(content: StreamReader, limit: int) -> bytes | None:
    """The whole body, or None as soon as it grows past ``limit`` bytes (chunked too)."""
    parts: list[bytes] = []
    size = 0
    while chunk := await content.read(_CHUNK):
        size += len(chunk)
        if size > limit:
            return None
        parts.append(chunk)
    return b"".join(parts)
