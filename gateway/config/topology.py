"""Where keygate's Redis is: one server, a primary watched by Sentinel, or a Cluster.

Parsed once from ``redis.url`` and the ``redis.*`` options, then used by both clients (the
admin side's redis-py client and the proxy's multiplexer), so they always agree.

URL forms::

    redis://[user:password@]host[:port][/db]         one server (rediss:// for TLS)
    unix://[user:password@]/path/to/socket[?db=N]    one server on a unix socket
    redis+sentinel://[user:password@]host[:port][,host[:port]...]/service[/db]
    redis+cluster://[user:password@]host[:port][,host[:port]...]   (seed nodes)

``rediss+sentinel://`` and ``rediss+cluster://`` use TLS to every node (and to the
sentinels). ``redis.cluster: true`` turns a ``redis://`` URL's host into a cluster seed.
The credentials in the URL are the data nodes'; ``sentinel_username`` and
``sentinel_password`` in the query are the sentinels' own (default: none). TLS options come
from ``redis.tls_*`` or, as redis-py reads them, from the query: ``ssl_ca_certs``,
``ssl_certfile``, ``ssl_keyfile``, ``ssl_cert_reqs`` (required|optional|none) and
``ssl_check_hostname``.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import parse_qs, unquote, urlsplit

from gateway.config.model import RedisSettings

Kind = Literal["single", "sentinel", "cluster"]
SCHEMES = frozenset(
    (
        "redis",
        "rediss",
        "unix",
        "redis+sentinel",
        "rediss+sentinel",
        "redis+cluster",
        "rediss+cluster",
    )
)
SENTINEL_PORT = 26379


@dataclass(frozen=True, slots=True)
class Tls:
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    verify: Literal["required", "optional", "none"] = "required"
    check_hostname: bool = True

    def context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=self.ca_file)
        if self.cert_file:
            context.load_cert_chain(self.cert_file, self.key_file)
        if self.verify != "required" or not self.check_hostname:
            context.check_hostname = False
        if self.verify == "none":
            context.verify_mode = ssl.CERT_NONE
        elif self.verify == "optional":
            context.verify_mode = ssl.CERT_OPTIONAL
        return context

    def redis_py(self) -> dict[str, object]:
        """The same options, as redis-py's connection keywords."""
        return {
            "ssl": True,
            "ssl_ca_certs": self.ca_file,
            "ssl_certfile": self.cert_file,
            "ssl_keyfile": self.key_file,
            "ssl_cert_reqs": self.verify,
            "ssl_check_hostname": self.check_hostname and self.verify == "required",
        }


@dataclass(frozen=True, slots=True)
class RedisTarget:
    kind: Kind
    hosts: tuple[tuple[str, int], ...]  # the server; the sentinels; the cluster's seeds
    path: str | None = None  # unix socket (single server only)
    service: str = ""  # the primary's name in Sentinel
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    sentinel_username: str | None = None
    sentinel_password: str | None = field(default=None, repr=False)
    tls: Tls | None = None

    def __str__(self) -> str:
        """Where, without credentials (for logs and errors)."""
        if self.path is not None:
            return f"unix://{self.path}"
        where = ",".join(f"{h}:{p}" for h, p in self.hosts)
        return f"{self.kind} {where}/{self.service}" if self.service else f"{self.kind} {where}"

    def auth_commands(self) -> tuple[tuple[str | int, ...], ...]:
        """AUTH and SELECT for a new data connection, in that order."""
        commands: list[tuple[str | int, ...]] = []
        if self.password is not None:
            commands.append(
                ("AUTH", self.username, self.password) if self.username else ("AUTH", self.password)
            )
        if self.db:
            commands.append(("SELECT", self.db))
        return tuple(commands)


def parse_target(url: str, settings: RedisSettings) -> RedisTarget:
    """The topology named by ``url`` and the options; ValueError names what is wrong."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES:
        raise ValueError(
            "Redis URL must start with redis://, rediss://, unix://, redis+sentinel:// or "
            "redis+cluster:// (or rediss+...)"
        )
    query = {name: values[-1] for name, values in parse_qs(parts.query).items()}
    userinfo, _, hostlist = parts.netloc.rpartition("@")
    username, password = _credentials(userinfo)
    if settings.username is not None:
        username = settings.username
    if settings.password is not None:
        password = settings.password
    tls = _tls(query, settings) if scheme.startswith("rediss") else None
    kind: Kind = "single"
    if scheme.endswith("+sentinel"):
        kind = "sentinel"
    elif scheme.endswith("+cluster") or settings.cluster:
        kind = "cluster"
    if scheme == "unix":
        if kind == "cluster":
            raise ValueError("a Redis Cluster is reached over TCP, not a unix socket")
        path = unquote(parts.path)
        db = _db(query.get("db"))
        return RedisTarget("single", (), path, "", db, username, password, tls=tls)
    default_port = SENTINEL_PORT if kind == "sentinel" else 6379
    hosts = tuple(_host(item, default_port) for item in hostlist.split(",") if item)
    if not hosts:
        raise ValueError("the Redis URL names no host")
    segments = [unquote(s) for s in parts.path.split("/") if s]
    if kind == "sentinel":
        if not segments:
            raise ValueError("a redis+sentinel:// URL names the primary: .../<service name>")
        if len(segments) > 2:
            raise ValueError("a redis+sentinel:// URL's path is /<service>[/<db>]")
        return RedisTarget(
            "sentinel",
            hosts,
            None,
            segments[0],
            _db(segments[1] if len(segments) > 1 else query.get("db")),
            username,
            password,
            query.get("sentinel_username"),
            query.get("sentinel_password"),
            tls,
        )
    if len(segments) > 1:
        raise ValueError("a Redis URL's path is at most /<db>")
    db = _db(segments[0] if segments else query.get("db"))
    if kind == "cluster":
        if db:
            raise ValueError("a Redis Cluster has only database 0")
        return RedisTarget("cluster", hosts, None, "", 0, username, password, tls=tls)
    if len(hosts) > 1:
        raise ValueError(
            "a redis:// URL names one server; for several use redis+sentinel:// or redis+cluster://"
        )
    return RedisTarget("single", hosts, None, "", db, username, password, tls=tls)


def _credentials(userinfo: str) -> tuple[str | None, str | None]:
    if not userinfo:
        return None, None
    user, has_password, password = userinfo.partition(":")
    if not has_password:
        return None, unquote(user) or None  # redis://secret@host: a password alone
    return unquote(user) or None, unquote(password)


def _host(item: str, default_port: int) -> tuple[str, int]:
    host, port = item, ""
    if item.startswith("["):  # [::1]:6379
        host, _, rest = item[1:].partition("]")
        port = rest.removeprefix(":")
    elif item.count(":") == 1:
        host, port = item.split(":")
    if not host:
        raise ValueError(f"a Redis URL host is empty in {item!r}")
    try:
        number = int(port) if port else default_port
    except ValueError:
        raise ValueError(f"a Redis URL port is not a number in {item!r}") from None
    if not 0 < number < 65536:
        raise ValueError(f"a Redis URL port is out of range in {item!r}")
    return host, number


def _db(text: str | None) -> int:
    if not text:
        return 0
    if not text.isdigit():
        raise ValueError(f"the Redis database must be a number (got {text!r})")
    return int(text)


def _tls(query: dict[str, str], settings: RedisSettings) -> Tls:
    verify = (query.get("ssl_cert_reqs") or "required").lower()
    if verify not in ("required", "optional", "none"):
        raise ValueError("ssl_cert_reqs must be required, optional or none")
    check = query.get("ssl_check_hostname", "true").lower() not in ("false", "0", "no")
    return Tls(
        ca_file=_path(settings.tls_ca_file) or query.get("ssl_ca_certs"),
        cert_file=_path(settings.tls_cert_file) or query.get("ssl_certfile"),
        key_file=_path(settings.tls_key_file) or query.get("ssl_keyfile"),
        verify=verify,  # type: ignore[arg-type]
        check_hostname=check and settings.tls_check_hostname,
    )


def _path(value: object) -> str | None:
    return None if value is None else str(value)
