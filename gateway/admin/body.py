"""Reading a JSON request body: media type, size and shape, each with its own error."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from gateway.bodies import NotJson, parse_json, read_capped
from gateway.errors import Outcome, problem

from .caller import Denied
from .context import SETTINGS


def _is_json(content_type: str) -> bool:
    return content_type == "application/json" or (
        content_type.startswith("application/") and content_type.endswith("+json")
    )


async def read_object(request: web.Request, *, optional: bool = False) -> dict[str, Any]:
    """The body as a JSON object. Errors: 413 too large, 415 not JSON, 400 malformed.

    With ``optional``, an empty body reads as ``{}``.
    """
    limit = request.app[SETTINGS].admin.max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        raise Denied(problem(Outcome.PAYLOAD_TOO_LARGE, f"the body exceeds {limit} bytes"))
    raw = await _read_capped(request, limit)
    if not raw and optional:
        return {}
    if not _is_json(request.content_type):
        raise Denied(problem(Outcome.UNSUPPORTED_MEDIA_TYPE, "the body must be application/json"))
    try:
        # Also refuses lone surrogates and deep nesting: nothing is written from such a body.
        body = parse_json(raw, constants=False)
    except NotJson as exc:
        raise Denied(problem(Outcome.INVALID_REQUEST, f"body: {exc}")) from None
    if not isinstance(body, dict):
        raise Denied(problem(Outcome.INVALID_REQUEST, "body: must be a JSON object"))
    return body


async def _read_capped(request: web.Request, limit: int) -> bytes:
    """The whole body, refusing (413) as soon as it grows past ``limit`` (chunked too)."""
    raw = await read_capped(request.content, limit)
    if raw is None:
        raise Denied(problem(Outcome.PAYLOAD_TOO_LARGE, f"the body exceeds {limit} bytes"))
    return raw
