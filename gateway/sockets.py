"""The listening sockets of ``keygate serve``: bound once, then served or handed over.

``keygate serve`` binds every listener (proxy, admin, optional metrics) before it starts
anything else, without ``SO_REUSEPORT``: a port another process holds, a second keygate
included, is one clear error instead of a share of its traffic. Under ``--workers N`` the
supervisor binds them and each worker inherits the same sockets, named in
``KEYGATE_LISTENER_FDS`` (``proxy:3,admin:4,metrics:5``), as gunicorn and uvicorn do.
"""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Mapping

from gateway.config.model import Address, Settings

LISTENER_FDS_ENV = "KEYGATE_LISTENER_FDS"  # set in a worker: its inherited sockets
# Connections the kernel completes while the process is busy. A burst beyond it (nginx
# opening auth connections past its keep-alive pool, clients reconnecting after a deploy)
# loses its SYNs and waits a second for the retry; asyncio's and aiohttp's defaults (100,
# 128) made that a one-second p99 behind nginx. The kernel caps it at net.core.somaxconn.
# Every server built on these sockets must listen with it again: create_server re-listens.
BACKLOG = 1024

# Listener name (as server.serve names its runners) -> its sockets; a host that resolves
# to several addresses gets one socket for each, as asyncio's create_server binds them.
Listening = dict[str, list[socket.socket]]


class ListenerError(OSError):
    """A listener could not be bound; ``strerror`` is the one line that says which:
    ``127.0.0.1:8080 (listen) is already in use``."""


def listeners(settings: Settings) -> list[tuple[str, str, Address]]:
    """``(listener name, config option, address)`` for each listener ``settings`` asks for."""
    found = [("proxy", "listen", settings.listen), ("admin", "admin_listen", settings.admin_listen)]
    if settings.metrics.listen is not None:
        found.append(("metrics", "metrics.listen", settings.metrics.listen))
    if settings.auth_listen is not None:
        found.append(("auth", "auth_listen", settings.auth_listen))
    return found


def bind(settings: Settings) -> Listening:
    """Bind and listen on every listener of ``settings``; raise ListenerError (having
    closed what was bound) when one cannot be. Port 0 gets a free port, once."""
    bound: Listening = {}
    try:
        for name, option, address in listeners(settings):
            bound[name] = _bind_one(address, option)
    except BaseException:
        close(bound)
        raise
    return bound


def _bind_one(address: Address, option: str) -> list[socket.socket]:
    try:
        infos = socket.getaddrinfo(
            address.host,
            address.port,
            family=socket.AF_UNSPEC,
            type=socket.SOCK_STREAM,
            flags=socket.AI_PASSIVE,
        )
    except OSError as exc:
        raise _error(address, option, exc) from None
    bound: list[socket.socket] = []
    try:
        for family, kind, proto, _, sockaddr in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            bound.append(sock)
            # SO_REUSEADDR only lets a restart bind past connections in TIME_WAIT; it
            # never lets two listeners share the port (SO_REUSEPORT would).
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:  # as asyncio: [::] is IPv6 only, 0.0.0.0 is v4
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(sockaddr)
            sock.listen(BACKLOG)
            sock.setblocking(False)
    except OSError as exc:
        for sock in bound:
            sock.close()
        raise _error(address, option, exc) from None
    return bound


def _error(address: Address, option: str, exc: OSError) -> ListenerError:
    if exc.errno == errno.EADDRINUSE:
        return ListenerError(errno.EADDRINUSE, f"{address} ({option}) is already in use")
    reason = (exc.strerror or str(exc)).lower()
    return ListenerError(
        exc.errno or errno.EINVAL, f"{address} ({option}): cannot listen: {reason}"
    )


def close(listening: Listening) -> None:
    for sockets in listening.values():
        for sock in sockets:
            sock.close()


def fds(listening: Listening) -> list[int]:
    """Every socket's descriptor, for a worker's ``pass_fds``."""
    return [sock.fileno() for sockets in listening.values() for sock in sockets]


def encode(listening: Listening) -> str:
    """The value of ``KEYGATE_LISTENER_FDS`` naming ``listening``'s descriptors."""
    return ",".join(
        f"{name}:{sock.fileno()}" for name, sockets in listening.items() for sock in sockets
    )


def inherited(environ: Mapping[str, str]) -> Listening | None:
    """The sockets ``KEYGATE_LISTENER_FDS`` names (this process inherited them), or None
    when it is not set. Raises ListenerError when a descriptor is not a socket."""
    text = environ.get(LISTENER_FDS_ENV)
    if text is None:
        return None
    listening: Listening = {}
    try:
        for item in text.split(","):
            name, _, fd = item.partition(":")
            sock = socket.socket(fileno=int(fd))  # family and type read from the socket
            os.set_inheritable(sock.fileno(), False)  # not for this process's own children
            sock.setblocking(False)
            listening.setdefault(name, []).append(sock)
    except (OSError, ValueError) as exc:
        close(listening)
        raise ListenerError(errno.EBADF, f"{LISTENER_FDS_ENV}={text}: {exc}") from None
    return listening
