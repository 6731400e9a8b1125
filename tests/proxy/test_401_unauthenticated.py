"""401: no key, a malformed or bad-checksum key (refused without Redis), an unknown, revoked
or expired key, and a rotated key's old secret once its grace has ended."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest

from gateway.errors import REALM
from gateway.store.keystore import KeyStore
from gateway.store.secrets import generate
from tests.conftest import MakeKey, bearer
from tests.procs import free_port
from tests.proxy.conftest import (
    ECHO_SCOPES,
    Gateway,
    StartGateway,
    Upstream,
    assert_openai_error,
    assert_problem,
    bad_checksum,
    echoed,
    sha256_hex,
)

INVALID_TOKEN = f'{REALM}, error="invalid_token"'


async def _status_until(
    http: aiohttp.ClientSession, url: str, secret: str, status: int, within: float
) -> float:
    """Poll until ``url`` answers ``status`` for ``secret``; the seconds that took."""
    started = time.monotonic()
    while True:
        async with http.get(url, headers=bearer(secret)) as response:
            if response.status == status:
                return time.monotonic() - started
        assert time.monotonic() - started < within, f"still not {status} after {within}s"
        await asyncio.sleep(0.05)


async def test_missing_key_is_401_with_a_bare_bearer_challenge(
    gateway: Gateway, http: aiohttp.ClientSession, upstream: Upstream
) -> None:
    response = await http.get(f"{gateway.url}/echo/x")
    await assert_problem(response, 401, "missing_key")
    assert response.headers["WWW-Authenticate"] == REALM
    assert upstream.hits == []


async def test_missing_key_on_an_openai_route_answers_in_openai_shape(
    gateway: Gateway, http: aiohttp.ClientSession, upstream: Upstream
) -> None:
    response = await http.post(
        f"{gateway.url}/v1/chat/completions",
        json={"model": "demo-small", "messages": [{"role": "user", "content": "hi"}]},
    )
    await assert_openai_error(response, 401, "missing_key", "authentication_error")
    assert response.headers["WWW-Authenticate"] == REALM
    assert upstream.hits == []


async def test_a_scheme_keygate_does_not_read_counts_as_no_key(
    gateway: Gateway, http: aiohttp.ClientSession, make_key: MakeKey
) -> None:
    issued = await make_key(scopes=ECHO_SCOPES)
    response = await http.get(
        f"{gateway.url}/echo/x", headers={"Authorization": f"Basic {issued.secret}"}
    )
    await assert_problem(response, 401, "missing_key")
    assert response.headers["WWW-Authenticate"] == REALM


@pytest.mark.parametrize(
    "headers",
    [
        {"Authorization": "Bearer"},
        {"Authorization": "Bearer "},
        {"Authorization": "Bearer two words"},
        {"Authorization": "Api-Key"},
        {"x-api-key": ""},
    ],
    ids=["bearer-no-value", "bearer-blank", "bearer-two-tokens", "api-key-no-value", "empty-x-api"],
)
async def test_malformed_credentials_are_401_invalid_token(
    gateway: Gateway, http: aiohttp.ClientSession, upstream: Upstream, headers: dict[str, str]
) -> None:
    response = await http.get(f"{gateway.url}/echo/x", headers=headers)
    await assert_problem(response, 401, "invalid_key")
    assert response.headers["WWW-Authenticate"] == INVALID_TOKEN
    assert upstream.hits == []
    assert gateway.mux.stats.commands == 0


async def test_bad_checksum_is_refused_without_a_redis_command(
    gateway: Gateway, http: aiohttp.ClientSession, make_key: MakeKey, upstream: Upstream
) -> None:
    issued = await make_key(scopes=ECHO_SCOPES)
    assert issued.secret is not None
    forged = bad_checksum(issued.secret)
    for headers in (bearer(forged), {"x-api-key": forged}, {"Authorization": f"Api-Key {forged}"}):
        response = await http.get(f"{gateway.url}/echo/x", headers=headers)
        body = await assert_problem(response, 401, "invalid_key")
        assert response.headers["WWW-Authenticate"] == INVALID_TOKEN
        assert forged not in await response.text() and forged not in body["detail"]
    assert gateway.mux.stats.commands == 0 and gateway.mux.stats.connects == 0
    assert upstream.hits == []
    # The counter does move for a real lookup: the zero above is meaningful.
    await echoed(await http.get(f"{gateway.url}/echo/x", headers=bearer(issued.secret)))
    assert gateway.mux.stats.commands > 0


async def test_bad_checksum_is_401_even_when_redis_is_unreachable(
    start_gateway: StartGateway, http: aiohttp.ClientSession
) -> None:
    gateway = await start_gateway(redis={"url": f"redis://127.0.0.1:{free_port()}"})
    forged = bad_checksum(generate("kg_"))
    response = await http.get(f"{gateway.url}/echo/x", headers=bearer(forged))
    await assert_problem(response, 401, "invalid_key")
    # A well-formed key does need Redis, which is down: 503, not 401.
    response = await http.get(f"{gateway.url}/echo/x", headers=bearer(generate("kg_")))
    await assert_problem(response, 503, "store_error")


@pytest.mark.parametrize(
    "secret",
    [generate("kg_"), "sk-live-0123456789abcdef", "kg_short"],
    ids=["keygate-format", "foreign-format", "keygate-prefix-wrong-length"],
)
async def test_unknown_key_is_401_invalid_token(
    gateway: Gateway, http: aiohttp.ClientSession, upstream: Upstream, secret: str
) -> None:
    response = await http.get(f"{gateway.url}/echo/x", headers=bearer(secret))
    body = await assert_problem(response, 401, "invalid_key")
    assert response.headers["WWW-Authenticate"] == INVALID_TOKEN
    assert secret not in await response.text() and secret not in body["detail"]
    assert upstream.hits == []
    assert len(gateway.proxy.authorizer.cache) == 0  # unknown hashes are never cached


async def test_revoked_key_is_refused_on_the_very_next_request_despite_the_cache(
    gateway: Gateway, http: aiohttp.ClientSession, make_key: MakeKey, store: KeyStore
) -> None:
    issued = await make_key(scopes=ECHO_SCOPES)
    assert issued.secret is not None
    url = f"{gateway.url}/echo/x"
    for _ in range(2):
        await echoed(await http.get(url, headers=bearer(issued.secret)))
    assert gateway.proxy.authorizer.cache.get(sha256_hex(issued.secret)) == issued.record.id
    assert await store.revoke(issued.record.id)
    response = await http.get(url, headers=bearer(issued.secret))
    await assert_problem(response, 401, "invalid_key")
    assert response.headers["WWW-Authenticate"] == INVALID_TOKEN


async def test_revoked_key_never_seen_before_is_401(
    gateway: Gateway, http: aiohttp.ClientSession, make_key: MakeKey, store: KeyStore
) -> None:
    issued = await make_key(scopes=ECHO_SCOPES)
    assert issued.secret is not None
    assert await store.revoke(issued.record.id)
    response = await http.get(f"{gateway.url}/echo/x", headers=bearer(issued.secret))
    await assert_problem(response, 401, "invalid_key")


async def test_key_created_expired_is_401_expired(
    gateway: Gateway, http: aiohttp.ClientSession, make_key: MakeKey, store: KeyStore
) -> None:
    now = await store.server_time_ms()
    issued = await make_key(scopes=ECHO_SCOPES, expires_at=now - 1000)
    assert issued.secret is not None
    response = await http.get(f"{gateway.url}/echo/x", headers=bearer(issued.secret))
    await assert_problem(response, 401, "expired")
    assert response.headers["WWW-Authenticate"] == INVALID_TOKEN


async def test_key_expiring_now_is_refused_on_the_next_request(
    gateway: Gateway, http: aiohttp.ClientSession, make_key: MakeKey, store: KeyStore
) -> None:
    now = await store.server_time_ms()
    issued = await make_key(scopes=ECHO_SCOPES, expires_at=now + 3_600_000)
    assert issued.secret is not None
    url = f"{gateway.url}/echo/x"
    await echoed(await http.get(url, headers=bearer(issued.secret)))
    await store.update(issued.record.id, {"expires_at": await store.server_time_ms()})
    response = await http.get(url, headers=bearer(issued.secret))
    await assert_problem(response, 401, "expired")


async def test_key_passing_its_expiry_is_refused_without_any_write(
    gateway: Gateway, http: aiohttp.ClientSession, make_key: MakeKey, store: KeyStore
) -> None:
    now = await store.server_time_ms()
    issued = await make_key(scopes=ECHO_SCOPES, expires_at=now + 400)
    assert issued.secret is not None
    url = f"{gateway.url}/echo/x"
    await echoed(await http.get(url, headers=bearer(issued.secret)))
    await _status_until(http, url, issued.secret, 401, within=3.0)


async def test_old_secret_works_within_rotation_grace_and_is_401_after(
    gateway: Gateway, http: aiohttp.ClientSession, make_key: MakeKey, store: KeyStore
) -> None:
    issued = await make_key(scopes=ECHO_SCOPES)
    old = issued.secret
    assert old is not None
    url = f"{gateway.url}/echo/x"
    await echoed(await http.get(url, headers=bearer(old)))  # cached: hash -> id
    rotated = await store.rotate(issued.record.id, grace_seconds=0.6)
    assert rotated is not None and rotated.secret is not None
    for secret in (old, rotated.secret):
        echo = await echoed(await http.get(url, headers=bearer(secret)))
        assert echo["headers"]["X-Keygate-Key-Id"] == issued.record.id  # same id
    await _status_until(http, url, old, 401, within=3.0)
    response = await http.get(url, headers=bearer(old))
    await assert_problem(response, 401, "invalid_key")
    await echoed(await http.get(url, headers=bearer(rotated.secret)))


async def test_old_secret_is_401_at_once_after_rotation_without_grace(
    gateway: Gateway, http: aiohttp.ClientSession, make_key: MakeKey, store: KeyStore
) -> None:
    issued = await make_key(scopes=ECHO_SCOPES)
    assert issued.secret is not None
    url = f"{gateway.url}/echo/x"
    await echoed(await http.get(url, headers=bearer(issued.secret)))
    rotated = await store.rotate(issued.record.id, grace_seconds=0)
    assert rotated is not None and rotated.secret is not None
    await assert_problem(await http.get(url, headers=bearer(issued.secret)), 401, "invalid_key")
    await echoed(await http.get(url, headers=bearer(rotated.secret)))


@pytest.mark.parametrize("seen_revoked", [True, False], ids=["401-seen-between", "straight"])
async def test_revoked_secret_reimported_under_a_new_id_works_again(
    gateway: Gateway,
    http: aiohttp.ClientSession,
    make_key: MakeKey,
    store: KeyStore,
    seen_revoked: bool,
) -> None:
    issued = await make_key(scopes=ECHO_SCOPES)
    secret = issued.secret
    assert secret is not None
    url = f"{gateway.url}/echo/x"
    await echoed(await http.get(url, headers=bearer(secret)))  # caches hash -> old id
    assert await store.revoke(issued.record.id)
    if seen_revoked:
        await assert_problem(await http.get(url, headers=bearer(secret)), 401, "invalid_key")
    imported = await store.create(
        {"workspace_id": "ws-b", "user_id": issued.record.user_id, "scopes": ECHO_SCOPES},
        secret=secret,
    )
    assert imported.record.id != issued.record.id
    echo = await echoed(await http.get(url, headers=bearer(secret)))
    assert echo["headers"]["X-Keygate-Key-Id"] == imported.record.id
    assert echo["headers"]["X-Keygate-Workspace-Id"] == "ws-b"
    assert gateway.proxy.authorizer.cache.get(sha256_hex(secret)) == imported.record.id
