"""400: two different credentials in one request. The same credential sent twice is fine; the
query-parameter credential counts only when ``keys.sources`` enables it, and is then removed
from the forwarded query (unless ``hide_credentials: false``); where it is no source, another
value in it beside the key is still a second credential."""

from __future__ import annotations

import aiohttp
import pytest
from multidict import CIMultiDict

from tests.conftest import MakeKey, bearer
from tests.proxy.conftest import (
    ECHO_SCOPES,
    Gateway,
    StartGateway,
    Upstream,
    assert_problem,
    echoed,
)


@pytest.mark.parametrize(
    "pair",
    [
        ("Authorization", "Bearer {a}", "x-api-key", "{b}"),
        ("Authorization", "Api-Key {a}", "x-api-key", "{b}"),
    ],
    ids=["bearer+x-api-key", "api-key-scheme+x-api-key"],
)
async def test_two_different_credentials_are_400_even_when_both_are_valid(
    gateway: Gateway,
    http: aiohttp.ClientSession,
    make_key: MakeKey,
    upstream: Upstream,
    pair: tuple[str, str, str, str],
) -> None:
    a, b = await make_key(scopes=ECHO_SCOPES), await make_key(scopes=ECHO_SCOPES)
    first, first_value, second, second_value = pair
    headers = {
        first: first_value.format(a=a.secret, b=b.secret),
        second: second_value.format(a=a.secret, b=b.secret),
    }
    response = await http.get(f"{gateway.url}/echo/x", headers=headers)
    body = await assert_problem(response, 400, "invalid_request")
    text = await response.text()
    assert str(a.secret) not in text and str(b.secret) not in text
    assert "two different" in body["detail"]
    assert upstream.hits == []


async def test_a_valid_and_an_invalid_credential_together_are_400_not_a_pass(
    gateway: Gateway, http: aiohttp.ClientSession, make_key: MakeKey, upstream: Upstream
) -> None:
    issued = await make_key(scopes=ECHO_SCOPES)
    headers = {**bearer(issued.secret), "x-api-key": "sk-someone-elses-key"}
    await assert_problem(
        await http.get(f"{gateway.url}/echo/x", headers=headers), 400, "invalid_request"
    )
    assert upstream.hits == []


@pytest.mark.parametrize("carrier", ["Authorization", "x-api-key", "query"])
async def test_the_same_carrier_repeated_with_different_keys_is_400(
    start_gateway: StartGateway,
    http: aiohttp.ClientSession,
    make_key: MakeKey,
    upstream: Upstream,
    carrier: str,
) -> None:
    # With hide_credentials: false the upstream would see both keys and might use the
    # second, which keygate never checked.
    gateway = await start_gateway(
        keys={"sources": ["bearer", "x-api-key", "query"], "hide_credentials": False}
    )
    issued = await make_key(scopes=ECHO_SCOPES)
    unchecked = "sk-unchecked-second-key"
    url, headers = f"{gateway.url}/echo/x", CIMultiDict[str]()
    if carrier == "query":
        url += f"?api_key={issued.secret}&api_key={unchecked}"
    else:
        scheme = "Bearer " if carrier == "Authorization" else ""
        headers.add(carrier, f"{scheme}{issued.secret}")
        headers.add(carrier, f"{scheme}{unchecked}")
    response = await http.get(url, headers=headers)
    await assert_problem(response, 400, "invalid_request")
    assert upstream.hits == []


async def test_the_same_credential_twice_is_accepted_and_both_carriers_hidden(
    gateway: Gateway, http: aiohttp.ClientSession, make_key: MakeKey
) -> None:
    issued = await make_key(scopes=ECHO_SCOPES)
    headers = {**bearer(issued.secret), "x-api-key": str(issued.secret)}
    echo = await echoed(await http.get(f"{gateway.url}/echo/x", headers=headers))
    assert echo["headers"]["X-Keygate-Key-Id"] == issued.record.id
    assert "Authorization" not in echo["headers"] and "x-api-key" not in echo["headers"]


async def test_query_credential_is_ignored_unless_enabled(
    gateway: Gateway, http: aiohttp.ClientSession, make_key: MakeKey, upstream: Upstream
) -> None:
    issued = await make_key(scopes=ECHO_SCOPES)
    response = await http.get(f"{gateway.url}/echo/x", params={"api_key": str(issued.secret)})
    await assert_problem(response, 401, "missing_key")
    assert upstream.hits == []
    # No source here, but still keygate's credential parameter, which an upstream may read:
    # another value beside the key is a second credential.
    response = await http.get(
        f"{gateway.url}/echo/x", params={"api_key": "something-else"}, headers=bearer(issued.secret)
    )
    body = await assert_problem(response, 400, "invalid_request")
    assert body["detail"].startswith("api_key:")
    assert upstream.hits == []


async def test_enabled_query_credential_works_and_is_removed_from_the_forwarded_query(
    start_gateway: StartGateway, http: aiohttp.ClientSession, make_key: MakeKey, upstream: Upstream
) -> None:
    gateway = await start_gateway(keys={"sources": ["bearer", "x-api-key", "query"]})
    issued = await make_key(scopes=ECHO_SCOPES)
    query = f"b=1&api_key={issued.secret}&b=2&q=a%2Bb&r=x%26y&s=%E2%9C%93&empty="
    echo = await echoed(await http.get(f"{gateway.url}/echo/x?{query}"))
    assert echo["headers"]["X-Keygate-Key-Id"] == issued.record.id
    assert echo["query"] == {"b": ["1", "2"], "q": "a+b", "r": "x&y", "s": "\u2713", "empty": ""}
    assert str(issued.secret) not in upstream.hits[-1].raw_path


async def test_query_credential_stays_in_the_query_with_hide_credentials_false(
    start_gateway: StartGateway, http: aiohttp.ClientSession, make_key: MakeKey, upstream: Upstream
) -> None:
    gateway = await start_gateway(keys={"sources": ["query"], "hide_credentials": False})
    issued = await make_key(scopes=ECHO_SCOPES)
    await echoed(await http.get(f"{gateway.url}/echo/x?api_key={issued.secret}&z=9"))
    assert upstream.hits[-1].raw_path == f"/echo/x?api_key={issued.secret}&z=9"


async def test_query_and_header_credentials_that_differ_are_400(
    start_gateway: StartGateway, http: aiohttp.ClientSession, make_key: MakeKey, upstream: Upstream
) -> None:
    gateway = await start_gateway(keys={"sources": ["bearer", "query"]})
    a, b = await make_key(scopes=ECHO_SCOPES), await make_key(scopes=ECHO_SCOPES)
    response = await http.get(
        f"{gateway.url}/echo/x", params={"api_key": str(a.secret)}, headers=bearer(b.secret)
    )
    await assert_problem(response, 400, "invalid_request")
    # The same key in both places is one credential.
    await echoed(
        await http.get(
            f"{gateway.url}/echo/x", params={"api_key": str(a.secret)}, headers=bearer(a.secret)
        )
    )
    assert len(upstream.hits) == 1


async def test_a_source_not_enabled_is_not_a_credential(
    start_gateway: StartGateway, http: aiohttp.ClientSession, make_key: MakeKey, upstream: Upstream
) -> None:
    gateway = await start_gateway(keys={"sources": ["x-api-key"]})
    issued = await make_key(scopes=ECHO_SCOPES)
    url = f"{gateway.url}/echo/x"
    await assert_problem(await http.get(url, headers=bearer(issued.secret)), 401, "missing_key")
    echo = await echoed(await http.get(url, headers={"x-api-key": str(issued.secret)}))
    assert echo["headers"]["X-Keygate-Key-Id"] == issued.record.id


async def test_a_route_may_narrow_the_credential_sources(
    start_gateway: StartGateway, http: aiohttp.ClientSession, make_key: MakeKey
) -> None:
    gateway = await start_gateway(
        routes=[
            {
                "name": "legacy",
                "prefix": "/legacy",
                "upstream": "demo",
                "rewrite": "/echo/legacy",
                "sources": ["x-api-key"],
            }
        ]
    )
    issued = await make_key()
    url = f"{gateway.url}/legacy/x"
    await assert_problem(await http.get(url, headers=bearer(issued.secret)), 401, "missing_key")
    await echoed(await http.get(url, headers={"x-api-key": str(issued.secret)}))
