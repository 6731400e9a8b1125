"""403: a disabled key, a missing scope (per method, with wildcards), and a resource outside a
restricted key's allow-list, named in a JSON body, a query parameter or a path segment."""

from __future__ import annotations

import hashlib
import json

import aiohttp
import pytest
from yarl import URL

from gateway.errors import REALM
from gateway.store.keystore import KeyStore
from tests.conftest import MakeKey, bearer
from tests.proxy.conftest import (
    ECHO_SCOPES,
    Gateway,
    StartGateway,
    Upstream,
    assert_openai_error,
    assert_problem,
    echoed,
)


def _insufficient(scope: str) -> str:
    return f'{REALM}, error="insufficient_scope", scope="{scope}"'


async def test_disabled_key_is_403_and_never_forwarded(
    gateway: Gateway, http: aiohttp.ClientSession, make_key: MakeKey, upstream: Upstream
) -> None:
    issued = await make_key(scopes=ECHO_SCOPES, disabled=True)
    assert issued.secret is not None
    response = await http.get(f"{gateway.url}/echo/x", headers=bearer(issued.secret))
    await assert_problem(response, 403, "disabled")
    assert "WWW-Authenticate" not in response.headers
    assert upstream.hits == []


async def test_disabling_takes_effect_on_the_next_request_and_enabling_too(
    gateway: Gateway, http: aiohttp.ClientSession, make_key: MakeKey, store: KeyStore
) -> None:
    issued = await make_key(scopes=ECHO_SCOPES)
    assert issued.secret is not None
    url, headers = f"{gateway.url}/echo/x", bearer(issued.secret)
    await echoed(await http.get(url, headers=headers))
    await store.update(issued.record.id, {"disabled": True})
    await assert_problem(await http.get(url, headers=headers), 403, "disabled")
    await store.update(issued.record.id, {"disabled": False})
    await echoed(await http.get(url, headers=headers))


async def test_disabled_key_on_an_openai_route_is_permission_error(
    gateway: Gateway, http: aiohttp.ClientSession, make_key: MakeKey
) -> None:
    issued = await make_key(scopes=["chat:invoke"], disabled=True)
    assert issued.secret is not None
    response = await http.post(
        f"{gateway.url}/v1/chat/completions",
        json={"model": "demo-small", "messages": [{"role": "user", "content": "hi"}]},
        headers=bearer(issued.secret),
    )
    await assert_openai_error(response, 403, "disabled", "permission_error")


async def test_missing_scope_is_403_insufficient_scope_naming_the_scope_per_method(
    gateway: Gateway, http: aiohttp.ClientSession, make_key: MakeKey, upstream: Upstream
) -> None:
    reader = await make_key(scopes=["echo:read"])
    assert reader.secret is not None
    url = f"{gateway.url}/echo/x"
    await echoed(await http.get(url, headers=bearer(reader.secret)))
    for method in ("POST", "PUT", "DELETE"):
        response = await http.request(method, url, headers=bearer(reader.secret), data=b"x")
        body = await assert_problem(response, 403, "forbidden_scope")
        assert response.headers["WWW-Authenticate"] == _insufficient("echo:write")
        assert "echo:write" in body["detail"]
    assert [hit.method for hit in upstream.hits] == ["GET"]


async def test_a_key_with_other_scopes_is_refused_with_the_read_scope_named(
    gateway: Gateway, http: aiohttp.ClientSession, make_key: MakeKey
) -> None:
    issued = await make_key(scopes=["chat:invoke", "models:read"])
    assert issued.secret is not None
    response = await http.get(f"{gateway.url}/echo/x", headers=bearer(issued.secret))
    await assert_problem(response, 403, "forbidden_scope")
    assert response.headers["WWW-Authenticate"] == _insufficient("echo:read")


async def test_missing_scope_on_an_openai_route(
    gateway: Gateway, http: aiohttp.ClientSession, make_key: MakeKey
) -> None:
    issued = await make_key(scopes=["models:read"])
    assert issued.secret is not None
    response = await http.post(
        f"{gateway.url}/v1/chat/completions",
        json={"model": "demo-small", "messages": [{"role": "user", "content": "hi"}]},
        headers=bearer(issued.secret),
    )
    await assert_openai_error(response, 403, "forbidden_scope", "permission_error")
    assert response.headers["WWW-Authenticate"] == _insufficient("chat:invoke")


@pytest.mark.parametrize(
    ("held", "get_status", "post_status"),
    [
        (["echo:*"], 200, 200),
        (["*"], 200, 200),
        (["echo:read", "echo:write"], 200, 200),
        (["echo:read"], 200, 403),
        (["chat:*"], 403, 403),
        (["ech:*"], 403, 403),
        (["echo"], 403, 403),
        (["echo:read:*"], 403, 403),
        ([], 403, 403),
    ],
)
async def test_wildcard_scopes(
    gateway: Gateway,
    http: aiohttp.ClientSession,
    make_key: MakeKey,
    held: list[str],
    get_status: int,
    post_status: int,
) -> None:
    issued = await make_key(scopes=held)
    assert issued.secret is not None
    url = f"{gateway.url}/echo/x"
    got = await http.get(url, headers=bearer(issued.secret))
    posted = await http.post(url, headers=bearer(issued.secret), data=b"{}")
    assert (got.status, posted.status) == (get_status, post_status)


async def test_removing_a_scope_takes_effect_on_the_next_request(
    gateway: Gateway, http: aiohttp.ClientSession, make_key: MakeKey, store: KeyStore
) -> None:
    issued = await make_key(scopes=ECHO_SCOPES)
    assert issued.secret is not None
    url, headers = f"{gateway.url}/echo/x", bearer(issued.secret)
    await echoed(await http.post(url, headers=headers, data=b"1"))
    await store.update(issued.record.id, {"scopes": ("echo:read",)})
    await assert_problem(await http.post(url, headers=headers, data=b"1"), 403, "forbidden_scope")


async def test_a_route_without_scopes_takes_any_valid_key(
    gateway: Gateway, http: aiohttp.ClientSession, make_key: MakeKey
) -> None:
    issued = await make_key(scopes=[])
    assert issued.secret is not None
    echo = await echoed(await http.get(f"{gateway.url}/open/x", headers=bearer(issued.secret)))
    assert echo["path"] == "/echo/open/x"


# --- resources ---------------------------------------------------------------------------------


async def test_json_body_resource_in_the_allow_list_passes_with_the_body_unchanged(
    gateway: Gateway, http: aiohttp.ClientSession, make_key: MakeKey
) -> None:
    issued = await make_key(resources=["demo-small"])
    assert issued.secret is not None
    raw = b'{ "model" : "demo-small", "input": "caf\xc3\xa9",\n "n": 1.50 }'
    echo = await echoed(
        await http.post(
            f"{gateway.url}/infer",
            data=raw,
            headers={**bearer(issued.secret), "Content-Type": "application/json"},
        )
    )
    assert echo["sha256"] == hashlib.sha256(raw).hexdigest()
    assert echo["body_bytes"] == len(raw)
    assert echo["headers"]["Content-Type"] == "application/json"


@pytest.mark.parametrize(
    "raw",
    [
        b'{"model": "demo-large"}',
        b'{"input": "no model named"}',
        b'{"model": ["demo-small"]}',
        b'{"model": null}',
        b"not json at all",
        b"",
    ],
    ids=["other-model", "absent", "list", "null", "not-json", "empty"],
)
async def test_json_body_resource_outside_the_allow_list_is_403(
    gateway: Gateway,
    http: aiohttp.ClientSession,
    make_key: MakeKey,
    upstream: Upstream,
    raw: bytes,
) -> None:
    issued = await make_key(resources=["demo-small"])
    assert issued.secret is not None
    response = await http.post(f"{gateway.url}/infer", data=raw, headers=bearer(issued.secret))
    await assert_problem(response, 403, "forbidden_resource")
    assert upstream.hits == []


async def test_json_body_over_the_read_cap_is_413_for_a_restricted_key(
    gateway: Gateway, http: aiohttp.ClientSession, make_key: MakeKey, upstream: Upstream
) -> None:
    issued = await make_key(resources=["demo-small"])
    assert issued.secret is not None
    raw = json.dumps({"model": "demo-small", "pad": "x" * 8000}).encode()
    response = await http.post(f"{gateway.url}/infer", data=raw, headers=bearer(issued.secret))
    await assert_problem(response, 413, "payload_too_large")
    assert upstream.hits == []


async def test_unrestricted_key_body_is_forwarded_unchanged_and_never_capped(
    gateway: Gateway, http: aiohttp.ClientSession, make_key: MakeKey
) -> None:
    issued = await make_key()  # resources: null -> any
    assert issued.secret is not None
    raw = json.dumps({"model": "anything-at-all", "pad": "x" * 20_000}).encode()
    echo = await echoed(
        await http.post(f"{gateway.url}/infer", data=raw, headers=bearer(issued.secret))
    )
    assert echo["sha256"] == hashlib.sha256(raw).hexdigest()
    assert echo["body_bytes"] == len(raw)  # over the 4096-byte read cap: not read at all


async def test_chat_route_resource_denial_is_openai_shaped(
    gateway: Gateway, http: aiohttp.ClientSession, make_key: MakeKey, upstream: Upstream
) -> None:
    issued = await make_key(scopes=["chat:invoke"], resources=["demo-small"])
    assert issued.secret is not None
    url = f"{gateway.url}/v1/chat/completions"
    messages = [{"role": "user", "content": "hello there"}]
    ok = await http.post(
        url, json={"model": "demo-small", "messages": messages}, headers=bearer(issued.secret)
    )
    assert ok.status == 200
    assert (await ok.json())["choices"][0]["message"]["content"] == "Echo: hello there"
    response = await http.post(
        url, json={"model": "demo-large", "messages": messages}, headers=bearer(issued.secret)
    )
    body = await assert_openai_error(response, 403, "forbidden_resource", "permission_error")
    assert "demo-large" in body["error"]["message"]
    assert len(upstream.hits) == 1


@pytest.mark.parametrize(
    ("query", "status"),
    [
        ("model=demo-small", 200),
        ("model=demo-large", 403),
        ("other=demo-small", 403),
        ("", 403),
    ],
)
async def test_query_parameter_resource(
    gateway: Gateway, http: aiohttp.ClientSession, make_key: MakeKey, query: str, status: int
) -> None:
    issued = await make_key(resources=["demo-small"])
    assert issued.secret is not None
    response = await http.get(f"{gateway.url}/search?{query}", headers=bearer(issued.secret))
    if status == 200:
        echo = await echoed(response)
        assert echo["query"] == {"model": "demo-small"}
    else:
        await assert_problem(response, status, "forbidden_resource")


async def test_repeated_query_resource_cannot_smuggle_a_second_model(
    gateway: Gateway, http: aiohttp.ClientSession, make_key: MakeKey, upstream: Upstream
) -> None:
    issued = await make_key(resources=["demo-small"])
    assert issued.secret is not None
    response = await http.get(
        f"{gateway.url}/search?model=demo-small&model=demo-large", headers=bearer(issued.secret)
    )
    assert response.status in (400, 403)
    assert upstream.hits == []


@pytest.mark.parametrize(
    ("path", "status", "upstream_path"),
    [
        ("/deployments/demo-small/predict", 200, "/echo/deployments/demo-small/predict"),
        ("/deployments/demo%2Dsmall/predict", 200, "/echo/deployments/demo-small/predict"),
        ("/deployments/demo-large/predict", 403, None),
        ("/deployments/demo-small/../demo-large/predict", 403, None),
        ("/deployments", 403, None),
    ],
)
async def test_path_segment_resource(
    gateway: Gateway,
    http: aiohttp.ClientSession,
    make_key: MakeKey,
    upstream: Upstream,
    path: str,
    status: int,
    upstream_path: str | None,
) -> None:
    issued = await make_key(resources=["demo-small"])
    assert issued.secret is not None
    url = URL(f"{gateway.url}{path}", encoded=True)
    response = await http.get(url, headers=bearer(issued.secret))
    if status == 200:
        assert (await echoed(response))["path"] == upstream_path
    else:
        await assert_problem(response, status, "forbidden_resource")
        assert upstream.hits == []


async def test_an_empty_allow_list_allows_nothing(
    gateway: Gateway, http: aiohttp.ClientSession, make_key: MakeKey
) -> None:
    issued = await make_key(resources=[])
    assert issued.secret is not None
    response = await http.post(
        f"{gateway.url}/infer", json={"model": "demo-small"}, headers=bearer(issued.secret)
    )
    await assert_problem(response, 403, "forbidden_resource")
    # Routes without a resource rule do not ask.
    await echoed(await http.get(f"{gateway.url}/open/x", headers=bearer(issued.secret)))


async def test_an_explicitly_empty_method_scope_list_needs_no_scope(
    start_gateway: StartGateway, http: aiohttp.ClientSession, make_key: MakeKey
) -> None:
    gateway = await start_gateway(
        routes=[
            {
                "name": "public-read",
                "prefix": "/catalog",
                "upstream": "demo",
                "rewrite": "/echo/catalog",
                "scopes": {"GET": [], "*": ["echo:write"]},
            }
        ]
    )
    issued = await make_key(scopes=[])
    assert issued.secret is not None
    url = f"{gateway.url}/catalog/item"
    await assert_problem(
        await http.post(url, headers=bearer(issued.secret), data=b"1"), 403, "forbidden_scope"
    )
    await echoed(await http.get(url, headers=bearer(issued.secret)))
