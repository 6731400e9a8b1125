"""``GET /v1/key`` on the proxy listener: the calling key's own record and usage now.

A client learns what it may still spend and when each period resets without any
management scope (OpenRouter's ``GET /api/v1/key``). It is neither rate limited nor
charged, and it never shows a secret.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from aiohttp import web

from gateway.credentials import extract
from gateway.errors import Outcome, problem
from gateway.proxy.headers import REQUEST_ID
from gateway.proxy.steps import KEY_DENIALS
from gateway.store.connection import STORE_ERRORS
from gateway.store.report import UsageReport
from gateway.store.secrets import has_bad_checksum

if TYPE_CHECKING:
    from gateway.proxy.service import Proxy

PATH = "/v1/key"


def is_own_key_request(method: str, path: str) -> bool:
    """``path`` is the request's normalised path (its query dropped)."""
    return method == "GET" and path == PATH


async def own_key(proxy: Proxy, request: web.BaseRequest, request_id: str) -> web.Response:
    response = await _answer(proxy, request)
    response.headers[REQUEST_ID] = request_id
    return response


async def _answer(proxy: Proxy, request: web.BaseRequest) -> web.Response:
    keys = proxy.settings.keys
    query = request.query if "query" in keys.sources else None
    found = extract(request.headers, query, keys.sources, keys.query_param)
    if found.secret is None:
        return problem(found.outcome, found.detail)
    if has_bad_checksum(found.secret, keys.secret_prefix):  # refused as on every route
        return problem(*KEY_DENIALS["not_found"])
    try:
        reply = await proxy.authorizer.report(found.secret)
    except STORE_ERRORS:
        return problem(Outcome.STORE_ERROR, "the key store is unavailable; retry shortly")
    if reply is None:
        return problem(*KEY_DENIALS["not_found"])
    status = reply[0].decode() if isinstance(reply[0], bytes) else str(reply[0])
    if status != "ok":
        return problem(*KEY_DENIALS[status])
    body = {"data": UsageReport.from_reply(reply).to_json()}
    return web.Response(
        text=json.dumps(body),
        content_type="application/json",
        headers={"Cache-Control": "no-store"},
    )
