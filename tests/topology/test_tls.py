"""keygate over TLS (``rediss://``, with the ``redis.tls_*`` options) and with a password or
an ACL user (``redis.username`` / ``redis.password``, or the same in the URL).

Both of keygate's clients are checked the way a user meets them: the key store (the admin
side's redis-py client, ``connect()``) creates keys or raises a redis error, and the proxy
answers 200 or 503 ``store_error`` with Retry-After. A TLS front (``make_tls_front``, a
TLS-terminating proxy in its own process) sits in front of the session's server, or in
front of a private Valkey started here with a password and ACL users; that server's ACL is
this module's own (the session's server, possibly a shared one, is never changed).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import pytest
import trustme
from redis.exceptions import AuthenticationError, RedisError
from redis.exceptions import ConnectionError as RedisConnectionError

from gateway.config.load import build
from gateway.config.model import RedisSettings, Settings
from gateway.config.topology import parse_target
from gateway.store.connection import connect
from gateway.store.keystore import Issued, KeyStore
from gateway.store.names import KeyNames
from tests.conftest import bearer
from tests.proxy.conftest import Gateway, Upstream, assert_problem
from tests.topologies import (
    HOST,
    NodeProcess,
    NotYet,
    TlsFront,
    free_port,
    poll,
    server_argv,
)
from tests.topology.conftest import MakeTlsFront

pytestmark = pytest.mark.timeout(120)

StartGateway = Callable[..., Awaitable[Gateway]]
FAST = {"connect_timeout": 1.0, "socket_timeout": 1.0}
ROUTE = "/hello"  # ROUTES: GET, any key, forwarded to the demo upstream

# The private server's credentials. The passwords are long and unusual on purpose: a test
# looks for them in responses and logs, where they must never appear.
ADMIN_PASSWORD = "adm1n-pw-7Hq2vXk9"
APP_USER, APP_PASSWORD = "app", "app-pw-Zr8mN3cQ"
NARROW_USER, NARROW_PASSWORD = "narrow", "narrow-pw-Wd5tLp4s"  # may touch other:* keys only
WRONG_PASSWORD = "wrong-pw-Jx6bFy1e"


def settings_for(tmp_path: Path, key_prefix: str, url: str, **redis: Any) -> Settings:
    return build({"redis": {"url": url, "key_prefix": key_prefix, **FAST, **redis}}, tmp_path)


@contextlib.asynccontextmanager
async def key_store(settings: Settings) -> AsyncIterator[KeyStore]:
    """A KeyStore on its own ``connect()`` client for ``settings.redis``, closed after."""
    client = connect(settings.redis, settings.redis.url)
    try:
        yield KeyStore(client, KeyNames(settings.redis.key_prefix), settings.keys.secret_prefix)
    finally:
        with contextlib.suppress(RedisError, OSError):
            await client.aclose()


async def new_key(store: KeyStore) -> Issued:
    issued = await store.create({"workspace_id": "ws-tls", "user_id": str(uuid.uuid4())})
    assert issued.secret is not None
    return issued


async def get(http: aiohttp.ClientSession, gateway: Gateway, secret: str | None) -> int:
    """GET the route with ``secret``; the status (a 503 must be keygate's store_error)."""
    async with http.get(
        f"{gateway.url}{ROUTE}", headers=bearer(secret), timeout=aiohttp.ClientTimeout(total=10)
    ) as response:
        if response.status == 503:
            await assert_problem(response, 503, "store_error")
            assert response.headers["Retry-After"] == "1"
        else:
            await response.read()
        return response.status


async def refused_text(http: aiohttp.ClientSession, gateway: Gateway, secret: str) -> str:
    """A request the proxy must refuse with 503: everything the client sees of it."""
    async with http.get(f"{gateway.url}{ROUTE}", headers=bearer(secret)) as response:
        await assert_problem(response, 503, "store_error")
        assert response.headers["Retry-After"] == "1"
        return f"{response.headers!r}\n{await response.text()}"


def with_db(url: str, db: int) -> str:
    """``url`` (rediss://host:port/0?...) naming database ``db`` instead of 0."""
    return url.replace("/0?", f"/{db}?", 1)


@pytest.fixture
def session_db(redis_url: str) -> int:
    """The session server's database: keys made over TLS land where the cleanup looks."""
    return parse_target(redis_url, RedisSettings()).db


@pytest.fixture
def no_secrets_leak(
    caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> Iterator[Callable[..., None]]:
    """``check(*texts, secrets=...)``: no secret in the texts, nor in any log record or
    output (the access log) since the test started."""
    caplog.set_level(logging.DEBUG)

    def check(*texts: str, secrets: tuple[str, ...]) -> None:
        captured = capsys.readouterr()
        everything = "\n".join((*texts, caplog.text, captured.out, captured.err))
        # The check would be empty if nothing were captured: the refusals are in the log
        # and in the access log (stdout).
        assert "key store unavailable" in caplog.text
        assert "store_error" in captured.out
        for secret in secrets:
            assert secret not in everything

    yield check


# --- TLS in front of the session's server ---------------------------------------------------


async def test_store_and_proxy_authorize_a_key_over_tls(
    make_tls_front: MakeTlsFront,
    start_gateway: StartGateway,
    http: aiohttp.ClientSession,
    upstream: Upstream,
    redis: Any,
    tmp_path: Path,
    key_prefix: str,
    session_db: int,
) -> None:
    front = make_tls_front()
    # The key store trusts the front's CA through the URL's query (redis-py's spelling) ...
    store_url = with_db(front.url(), session_db)
    async with key_store(settings_for(tmp_path, key_prefix, store_url)) as store:
        await store.scripts.load()
        issued = await new_key(store)
        assert (await store.get(issued.record.id)) is not None
    # ... the proxy through the redis.tls_ca_file option, with a bare rediss:// URL.
    gateway = await start_gateway(
        redis={
            "url": f"rediss://{HOST}:{front.port}/{session_db}",
            "tls_ca_file": str(front.ca_file),
        }
    )
    assert await get(http, gateway, issued.secret) == 200
    assert [hit.raw_path for hit in upstream.hits] == ["/echo/greeting"]
    assert await get(http, gateway, f"kg_{uuid.uuid4().hex}") == 401
    # The same server is behind the front: the session's plain client sees the use.
    names = KeyNames(key_prefix)
    assert await redis.hget(names.record(issued.record.id), "total_uses") == "1"


async def test_mutual_tls_needs_the_client_certificate(
    make_tls_front: MakeTlsFront,
    start_gateway: StartGateway,
    http: aiohttp.ClientSession,
    tmp_path: Path,
    key_prefix: str,
    session_db: int,
) -> None:
    front = make_tls_front(require_client_cert=True)
    url = f"rediss://{HOST}:{front.port}/{session_db}"
    with_cert = {
        "tls_ca_file": str(front.ca_file),
        "tls_cert_file": str(front.client_cert_file),
        "tls_key_file": str(front.client_key_file),
    }
    async with key_store(settings_for(tmp_path, key_prefix, url, **with_cert)) as store:
        issued = await new_key(store)
    gateway = await start_gateway(redis={"url": url, **with_cert})
    assert await get(http, gateway, issued.secret) == 200

    # Without a client certificate the server hangs up: the proxy refuses with 503, fast,
    # never a hang or a 500. (The key store's side: the next test.)
    gateway = await start_gateway(redis={"url": url, "tls_ca_file": str(front.ca_file)})
    for _ in range(2):
        started = time.monotonic()
        assert await get(http, gateway, issued.secret) == 503
        assert time.monotonic() - started < 2.0


async def test_without_the_client_certificate_the_store_fails_fast(
    make_tls_front: MakeTlsFront, tmp_path: Path, key_prefix: str, session_db: int
) -> None:
    front = make_tls_front(require_client_cert=True)
    url = f"rediss://{HOST}:{front.port}/{session_db}"
    ca_only = {"tls_ca_file": str(front.ca_file)}  # timeouts: 1 s each
    async with key_store(settings_for(tmp_path, key_prefix, url, **ca_only)) as store:
        async with asyncio.timeout(5):
            with pytest.raises(RedisConnectionError):
                await store.get("no-such-key")


async def test_an_untrusted_server_certificate_is_refused_without_leaking_the_password(
    make_tls_front: MakeTlsFront,
    start_gateway: StartGateway,
    http: aiohttp.ClientSession,
    upstream: Upstream,
    tmp_path: Path,
    key_prefix: str,
    session_db: int,
    no_secrets_leak: Callable[..., None],
) -> None:
    front = make_tls_front()
    other_ca = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other_ca))
    url = f"rediss://{HOST}:{front.port}/{session_db}"
    # A password (which the server would need, were it reached): it must not leak.
    options = {"tls_ca_file": str(other_ca), "password": WRONG_PASSWORD}

    async with key_store(settings_for(tmp_path, key_prefix, url, **options)) as store:
        with pytest.raises(RedisConnectionError) as raised:
            await store.get("no-such-key")
    message = str(raised.value)
    assert "certificate verify failed" in message.lower(), message

    gateway = await start_gateway(redis={"url": url, **options})
    seen = await refused_text(http, gateway, f"kg_{uuid.uuid4().hex}")
    assert upstream.hits == []
    no_secrets_leak(seen, message, secrets=(WRONG_PASSWORD,))


# --- a password and ACL users (a private Valkey) ----------------------------------------------


@pytest.fixture
def acl_server(tmp_path: Path) -> Iterator[NodeProcess]:
    """A Valkey of this test's own: the default user needs ADMIN_PASSWORD; ``app`` may do
    everything; ``narrow`` only touches keys under ``other:``."""
    port = free_port()
    data = tmp_path / "acl-server"
    data.mkdir()
    argv = server_argv(
        port,
        data,
        "--save",
        "",
        "--appendonly",
        "no",
        "--requirepass",
        ADMIN_PASSWORD,
        "--user",
        *(APP_USER, "on", f">{APP_PASSWORD}", "~*", "&*", "+@all"),
        "--user",
        *(NARROW_USER, "on", f">{NARROW_PASSWORD}", "~other:*", "+@all"),
    )
    node = NodeProcess(f"ACL server :{port}", HOST, port, argv, data / "server.log")
    node.start()
    try:

        def ready() -> bool:
            with node.client(username=APP_USER, password=APP_PASSWORD) as client:
                if client.acl_whoami() != APP_USER:
                    raise NotYet("not authenticated as app")
                return True

        poll("the ACL server answering app", ready, timeout=15, watch=[node])
        yield node
    finally:
        node.stop()


def plain_url(server: NodeProcess, credentials: str = "") -> str:
    return f"redis://{credentials}{server.host}:{server.port}/0"


@pytest.mark.parametrize(
    ("how", "options"),
    [
        pytest.param("options", {"username": APP_USER, "password": APP_PASSWORD}, id="options"),
        pytest.param("url", {}, id="url"),
        pytest.param("default user", {"password": ADMIN_PASSWORD}, id="password-only"),
    ],
)
async def test_acl_user_and_password_authenticate_store_and_proxy(
    acl_server: NodeProcess,
    start_gateway: StartGateway,
    http: aiohttp.ClientSession,
    tmp_path: Path,
    key_prefix: str,
    how: str,
    options: dict[str, str],
) -> None:
    credentials = f"{APP_USER}:{quote(APP_PASSWORD)}@" if how == "url" else ""
    url = plain_url(acl_server, credentials)
    async with key_store(settings_for(tmp_path, key_prefix, url, **options)) as store:
        issued = await new_key(store)
    gateway = await start_gateway(redis={"url": url, **options})
    assert await get(http, gateway, issued.secret) == 200
    expected_user = "default" if "default" in how else APP_USER
    with acl_server.client(username=APP_USER, password=APP_PASSWORD) as admin:
        assert admin.hget(KeyNames(key_prefix).record(issued.record.id), "total_uses") == "1"
        others = [c for c in admin.client_list() if int(c["id"]) != admin.client_id()]
    # The only other connection, the proxy's, is authenticated as the expected user.
    assert {c["user"] for c in others} == {expected_user}


@pytest.mark.parametrize("where", ["options", "url"])
async def test_a_wrong_password_is_a_clear_error_and_503_and_never_leaks(
    acl_server: NodeProcess,
    start_gateway: StartGateway,
    http: aiohttp.ClientSession,
    upstream: Upstream,
    tmp_path: Path,
    key_prefix: str,
    where: str,
    no_secrets_leak: Callable[..., None],
) -> None:
    if where == "url":
        url, options = plain_url(acl_server, f"{APP_USER}:{WRONG_PASSWORD}@"), {}
    else:
        url, options = plain_url(acl_server), {"username": APP_USER, "password": WRONG_PASSWORD}
    async with key_store(settings_for(tmp_path, key_prefix, url, **options)) as store:
        with pytest.raises(AuthenticationError) as raised:
            await store.get("no-such-key")
    message = str(raised.value)
    assert "invalid username-password pair" in message, message

    gateway = await start_gateway(redis={"url": url, **options})
    seen = [await refused_text(http, gateway, f"kg_{uuid.uuid4().hex}") for _ in range(2)]
    assert upstream.hits == []
    no_secrets_leak(*seen, message, secrets=(WRONG_PASSWORD,))


async def test_an_acl_user_without_access_to_keygate_keys_gets_503_not_a_wrong_answer(
    acl_server: NodeProcess,
    start_gateway: StartGateway,
    http: aiohttp.ClientSession,
    upstream: Upstream,
    tmp_path: Path,
    key_prefix: str,
) -> None:
    app = {"username": APP_USER, "password": APP_PASSWORD}
    async with key_store(settings_for(tmp_path, key_prefix, plain_url(acl_server), **app)) as store:
        issued = await new_key(store)
    narrow = {"username": NARROW_USER, "password": NARROW_PASSWORD}
    gateway = await start_gateway(redis={"url": plain_url(acl_server), **narrow})
    # The key exists, but this user may not read it: not "unknown key" (401), a store error.
    assert await get(http, gateway, issued.secret) == 503
    assert upstream.hits == []


async def test_tls_and_an_acl_user_in_one_url(
    acl_server: NodeProcess,
    make_tls_front: MakeTlsFront,
    start_gateway: StartGateway,
    http: aiohttp.ClientSession,
    tmp_path: Path,
    key_prefix: str,
) -> None:
    front: TlsFront = make_tls_front(target=acl_server.address)
    # rediss://app:PASSWORD@127.0.0.1:PORT/0?ssl_ca_certs=...: everything in the URL.
    url = front.url().replace("rediss://", f"rediss://{APP_USER}:{quote(APP_PASSWORD)}@", 1)
    async with key_store(settings_for(tmp_path, key_prefix, url)) as store:
        issued = await new_key(store)
    gateway = await start_gateway(redis={"url": url})
    assert await get(http, gateway, issued.secret) == 200
    with acl_server.client(username=APP_USER, password=APP_PASSWORD) as admin:
        assert admin.hget(KeyNames(key_prefix).record(issued.record.id), "total_uses") == "1"

    # The same URL with a wrong password: TLS works, AUTH does not; a 503.
    wrong = url.replace(quote(APP_PASSWORD), WRONG_PASSWORD, 1)
    gateway = await start_gateway(redis={"url": wrong})
    assert await get(http, gateway, issued.secret) == 503
