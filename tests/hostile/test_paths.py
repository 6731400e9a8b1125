"""One path for every matcher: a spelling of a dialect's path, of ``GET /v1/key`` or of
``/metrics`` (``//``, ``%6b``, ``./``, ``x/..``) reaches the same endpoint as its plain
form, never a catch-all route behind it; and a request target carrying a fragment (which
HTTP's origin-form has no room for) is refused, never forwarded."""

from __future__ import annotations

import json
from typing import Any

import pytest

from gateway.config.model import DIALECTS
from tests.conftest import MakeKey
from tests.proxy.conftest import ECHO_SCOPES, RawResponse, StartGateway, Upstream, raw_http

# Routes that would take every dialect path if a spelling slipped past the dialects.
CATCH_ALL: list[dict[str, Any]] = [
    {"name": "api", "prefix": "/api/", "upstream": "demo", "yield_to_dialects": True},
    {"name": "v1all", "prefix": "/v1/", "upstream": "demo", "yield_to_dialects": True},
    {"name": "everything", "prefix": "/", "upstream": "demo", "yield_to_dialects": True},
]
ALL_DIALECTS = {name: {"enabled": True} for name in DIALECTS}


async def _get(port: int, target: str, secret: str | None) -> RawResponse:
    head = (
        f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Authorization: Bearer {secret}\r\nConnection: close\r\n\r\n"
    )
    return await raw_http(port, head.encode())


def _json(response: RawResponse) -> Any:
    return json.loads(response.body)


@pytest.mark.parametrize(
    "target",
    [
        "/api/v1//keys",
        "/api/v1/%6beys",
        "/api/v1/./keys",
        "/api/v1/x/../keys",
        "/api//v1/keys",
        "/api/v1/%6B%65%79%73",
        "/api/v1//keys?offset=0",
    ],
)
async def test_spellings_of_a_dialect_path_reach_the_dialect(
    start_gateway: StartGateway, make_key: MakeKey, upstream: Upstream, target: str
) -> None:
    gateway = await start_gateway(routes=CATCH_ALL, dialects=ALL_DIALECTS)
    caller = await make_key(scopes=["apikeys:view"], workspace_id="ws-paths")
    response = await _get(gateway.port, target, caller.secret)
    assert response.status == 200, response.body
    assert [item["label"] for item in _json(response)["data"]] == [caller.record.label]
    assert upstream.hits == []


@pytest.mark.parametrize("target", ["/api/v1//api_key/", "/api/v1/%61pi_key/", "/api/./v1/api_key"])
async def test_spellings_of_the_langflow_listing_reach_it(
    start_gateway: StartGateway, make_key: MakeKey, upstream: Upstream, target: str
) -> None:
    gateway = await start_gateway(routes=CATCH_ALL, dialects=ALL_DIALECTS)
    caller = await make_key(scopes=["apikeys:view"])
    response = await _get(gateway.port, target, caller.secret)
    assert response.status == 200, response.body
    assert _json(response)["user_id"] == caller.record.user_id
    assert upstream.hits == []


@pytest.mark.parametrize(
    "target", ["/v1//key", "/v1/%6bey", "/v1/./key", "//v1/key", "/v1/x/../key"]
)
async def test_spellings_of_get_v1_key_reach_the_own_key_endpoint(
    start_gateway: StartGateway, make_key: MakeKey, upstream: Upstream, target: str
) -> None:
    gateway = await start_gateway(routes=CATCH_ALL, dialects=ALL_DIALECTS)
    caller = await make_key(scopes=ECHO_SCOPES)
    response = await _get(gateway.port, target, caller.secret)
    assert response.status == 200, response.body
    assert _json(response)["data"]["id"] == caller.record.id
    assert upstream.hits == []


@pytest.mark.parametrize("target", ["//metrics", "/%6detrics", "/./metrics", "/x/../metrics"])
async def test_spellings_of_metrics_on_the_proxy_reach_the_metrics(
    start_gateway: StartGateway, make_key: MakeKey, upstream: Upstream, target: str
) -> None:
    gateway = await start_gateway(
        routes=CATCH_ALL, dialects=ALL_DIALECTS, metrics={"on_proxy": True}
    )
    caller = await make_key(scopes=["metrics:read"])
    response = await _get(gateway.port, target, caller.secret)
    assert response.status == 200, response.body
    assert b"keygate_requests_total" in response.body
    assert upstream.hits == []


@pytest.mark.parametrize(
    "target",
    [
        "/echo/x#frag",
        "/echo/x?a=1#frag",
        "/echo/x?a=1#",
        "/api/v1/keys#frag",
        "/v1/key#frag",
    ],
)
async def test_a_fragment_in_the_request_target_is_400_and_never_forwarded(
    start_gateway: StartGateway, make_key: MakeKey, upstream: Upstream, target: str
) -> None:
    gateway = await start_gateway(routes=CATCH_ALL, dialects=ALL_DIALECTS)
    caller = await make_key(scopes=[*ECHO_SCOPES, "apikeys:view"])
    response = await _get(gateway.port, target, caller.secret)
    assert response.status == 400, response.body
    body = _json(response)
    assert body["code"] == "invalid_request" and "fragment" in body["detail"]
    assert upstream.hits == []


async def test_plain_paths_and_escaped_ones_still_route_as_before(
    start_gateway: StartGateway, make_key: MakeKey, upstream: Upstream
) -> None:
    gateway = await start_gateway()
    caller = await make_key(scopes=ECHO_SCOPES)
    for target in ("/echo/x?a=1", "/echo//y", "/echo/%7Ez"):
        response = await _get(gateway.port, target, caller.secret)
        assert response.status == 200, response.body
    assert [hit.raw_path for hit in upstream.hits] == ["/echo/x?a=1", "/echo/y", "/echo/~z"]
