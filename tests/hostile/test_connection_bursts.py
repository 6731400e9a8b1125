"""A burst of new connections while keygate is busy: nginx opening auth connections beyond
its keep-alive pool, clients reconnecting after a deploy, a load balancer's health checks
all at once.

While a process is busy (here: stopped with SIGSTOP, the extreme of an event loop that
has not come back to ``accept`` yet), the kernel completes the handshakes of as many
connections as the listening socket's backlog holds; the rest lose their SYN and retry it
a second later, which every one of their requests then waits. A backlog of asyncio's or
aiohttp's default (100, 128) turned a burst of a few hundred connections into a one-second
p99 behind nginx (docs/benchmarks.md). Each listener of ``keygate serve`` must queue the
whole burst.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from tests.procs import embedded_config, free_port, serving, write_config

BURST = 400  # connections opened at once: well past 128, well under the backlog
WAIT = 0.5  # seconds: under the kernel's first SYN retransmission (1 s)


def handshakes_completed(port: int, count: int, within: float) -> int:
    """Open ``count`` connections to ``port`` at once; how many the kernel completed
    ``within`` seconds (a connection still in SYN-SENT then lost its SYN)."""
    opened: list[socket.socket] = []
    poller = select.poll()
    try:
        for _ in range(count):
            sock = socket.socket()
            opened.append(sock)
            sock.setblocking(False)
            sock.connect_ex(("127.0.0.1", port))
            poller.register(sock, select.POLLOUT)
        done: set[int] = set()
        deadline = time.monotonic() + within
        while len(done) < count and (left := deadline - time.monotonic()) > 0:
            for fd, _ in poller.poll(left * 1000):
                done.add(fd)
                poller.unregister(fd)
        by_fd = {sock.fileno(): sock for sock in opened}
        return sum(
            1 for fd in done if by_fd[fd].getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0
        )
    finally:
        for sock in opened:
            sock.close()


@contextlib.contextmanager
def stopped(pid: int) -> Iterator[None]:
    """The process frozen: nothing it runs accepts a connection until it resumes."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def test_every_listener_queues_a_burst_of_connections_while_keygate_is_busy(
    tmp_path: Path,
) -> None:
    somaxconn = int(Path("/proc/sys/net/core/somaxconn").read_text())
    assert somaxconn >= BURST, f"net.core.somaxconn is {somaxconn}: it caps every backlog"
    ports = {"auth": free_port()}
    config = embedded_config(
        tmp_path,
        routes=[{"name": "echo", "prefix": "/echo", "upstream": "demo"}],
        upstreams={"demo": {"url": "http://127.0.0.1:9"}},
        auth_listen=f"127.0.0.1:{ports['auth']}",
    )
    ports["proxy"] = int(config["listen"].rsplit(":", 1)[1])
    ports["admin"] = int(config["admin_listen"].rsplit(":", 1)[1])
    with serving(write_config(tmp_path / "gateway.yaml", config), tmp_path) as serve:
        completed = {}
        for name, port in ports.items():
            with stopped(serve.pid):
                completed[name] = handshakes_completed(port, BURST, WAIT)
        assert completed == {name: BURST for name in ports}
        assert serve.process.poll() is None  # and it serves on
