"""Redis failures in words: what an operator reads at startup, in the log and from the CLI.

redis-py's texts (``Error 111 connecting to h:6379. Connection refused.``, ``Protocol error,
got "H" as reply type byte``, ``HELLO must be called with the client already
authenticated ...``) and the proxy's multiplexer's are mapped here, in one place, to a
sentence that names the server and the option to look at. No sentence shows a password:
they name hosts and ports, never the URL. An error not known here keeps its own text, and
redis-py's texts carry no password either.
"""

from __future__ import annotations

import errno
import re
import socket
import ssl
from dataclasses import dataclass

from redis.exceptions import AuthenticationError, InvalidResponse, RedisClusterException
from redis.exceptions import TimeoutError as RedisTimeoutError

from gateway.config.model import RedisSettings
from gateway.store.topology import RedisTarget, parse_target

NEEDS_PASSWORD = "redis.url needs a password: set redis.password or KEYGATE_REDIS_PASSWORD"

# "connecting to <where>. <reason>" (redis-py), "Redis at <where>: <reason>" and "Redis at
# <where> took over" (the multiplexer): the server that failed, which for a Cluster or
# behind Sentinel is more precise than the configured one.
_WHERE = re.compile(r"(?:connecting to|Redis at) (?P<where>.+?)[.:]?(?: |$)")
_ERRNO = re.compile(r"(?:^|\W)(?:Error|\[Errno) (?P<errno>-?\d+)")
_CLUSTER = re.compile(r"^Redis Cluster cannot be connected\..*?: ", re.DOTALL)
_DNS_TEXTS = (
    "name or service not known",
    "nodename nor servname",
    "no address associated",
    "name resolution",  # "Temporary failure in name resolution": no DNS server answered
)
_DNS_ERRNOS = frozenset(
    getattr(socket, name)
    for name in ("EAI_NONAME", "EAI_AGAIN", "EAI_FAIL", "EAI_NODATA", "EAI_ADDRFAMILY")
    if hasattr(socket, name)
)
_NEEDS_AUTH_TEXTS = (
    "noauth",
    "authentication required",
    "must be called with the client already authenticated",
)
_REFUSED_AUTH_TEXTS = ("wrongpass", "invalid username-password", "invalid password")
_TIMEOUT_TEXTS = ("timeout", "timed out", "took over", "no reply from redis within")


@dataclass(frozen=True, slots=True)
class _Where:
    server: str  # "127.0.0.1:6379", a unix socket's path, or the Cluster's seeds
    option: str  # what configured it, in parentheses after a sentence
    password: bool  # whether one was configured
    service: str  # the primary's name in Sentinel
    connect_timeout: float | None
    socket_timeout: float | None


def describe(
    error: BaseException, redis: RedisSettings | None = None, url: str | None = None
) -> str:
    """One sentence for a Redis failure, e.g. ``nothing listens on 127.0.0.1:6379
    (redis.url)``; an error it does not know is ``<type>: <message>`` (without the client
    repr some redis-py errors carry).

    ``redis`` and ``url`` (the server used: the embedded server's; ``redis.url`` by
    default) name the server when the error does not, and the timeouts that ran out.
    """
    text = _message(error)
    cluster = _CLUSTER.match(text)
    if isinstance(error, RedisClusterException) and cluster:
        inner = text[cluster.end() :]  # the last seed's failure, as redis-py's text
        words = _words(None, inner, _where(redis, url, inner))
        return f"no node of the Redis Cluster answered: {words or inner}"
    return _words(error, text, _where(redis, url, text)) or f"{type(error).__name__}: {text}"


def _message(error: BaseException) -> str:
    return str(error).split(" : <", 1)[0].strip()


def _words(error: BaseException | None, text: str, where: _Where) -> str | None:
    """The sentence for ``error`` (None: known only by its ``text``), or None."""
    lowered = text.lower()
    server, option = where.server, where.option
    refused = f"the password for {server} ({option}) was refused"
    if any(t in lowered for t in _REFUSED_AUTH_TEXTS):
        return refused
    if any(t in lowered for t in _NEEDS_AUTH_TEXTS):
        return NEEDS_PASSWORD
    if isinstance(error, AuthenticationError):  # a text of another server version
        return refused if where.password else NEEDS_PASSWORD
    if isinstance(error, InvalidResponse) or "protocol error" in lowered:
        return f"{server} does not speak Redis"
    if isinstance(error, ssl.SSLError) or "ssl" in lowered:
        if "wrong version number" in lowered or "record layer failure" in lowered:
            return f"{server} does not speak TLS ({option} starts with rediss)"
        if "certificate" in lowered:
            return f"the TLS certificate of {server} was not accepted (redis.tls_ca_file)"
    if "cluster is down" in lowered or "clusterdown" in lowered:
        return f"the Redis Cluster at {server} is down (a node says cluster_state:fail)"
    number = _errno(error, text)
    if number == errno.ECONNREFUSED:
        return f"nothing listens on {server} ({option})"
    if number in _DNS_ERRNOS or any(t in lowered for t in _DNS_TEXTS):
        host = server.rpartition(":")[0] if ":" in server else server
        return f"cannot resolve host {host.strip('[]')} ({option})"
    if number == errno.ENOENT:
        return f"no socket at {server} ({option})"
    if number == errno.EACCES:
        return f"no permission to open {server} ({option})"
    if number in (errno.EHOSTUNREACH, errno.ENETUNREACH):
        return f"{server} cannot be reached from this host ({option})"
    timed_out = isinstance(error, (TimeoutError, RedisTimeoutError)) or number == errno.ETIMEDOUT
    if timed_out or any(t in lowered for t in _TIMEOUT_TEXTS):
        if "connect" in lowered or number == errno.ETIMEDOUT:
            return _late(server, where.connect_timeout, "redis.connect_timeout")
        return _late(server, where.socket_timeout, "redis.socket_timeout")
    if number == errno.ECONNRESET or "closed by server" in lowered or "connection lost" in lowered:
        return f"{server} closed the connection without answering"
    if "no master found for" in lowered or "no sentinel knows the primary" in lowered:
        return f"no sentinel at {server} knows the primary {where.service!r} ({option})"
    return None


def _late(server: str, seconds: float | None, option: str) -> str:
    within = f"within {seconds:g}s" if seconds is not None else "in time"
    return f"{server} did not answer {within} ({option})"


def _errno(error: BaseException | None, text: str) -> int | None:
    if isinstance(error, OSError) and error.errno is not None:
        return int(error.errno)
    found = _ERRNO.search(text)
    return int(found["errno"]) if found else None


def _where(redis: RedisSettings | None, url: str | None, text: str) -> _Where:
    embedded = redis is not None and redis.embedded
    if url is None and redis is not None and not embedded:
        url = redis.url
    target = _target(url, redis)
    server = "Redis" if target is None else _server(target)
    found = _WHERE.search(text)
    if found and (":" in found["where"] or found["where"].startswith("/")):
        server = found["where"]
    return _Where(
        server,
        "the embedded server" if embedded else "redis.url",
        target is not None and target.password is not None,
        target.service if target is not None else "",
        redis.connect_timeout if redis is not None else None,
        redis.socket_timeout if redis is not None else None,
    )


def _target(url: str | None, redis: RedisSettings | None) -> RedisTarget | None:
    if url is None:
        return None
    try:
        return parse_target(url, redis or RedisSettings())
    except ValueError:
        return None


def _server(target: RedisTarget) -> str:
    if target.path is not None:
        return target.path
    return ",".join(f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in target.hosts)
