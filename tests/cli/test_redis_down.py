"""A Redis that is down, or can never work as configured, when keygate starts.

``keygate serve`` starts anyway (an orchestrator restarting it would only make a crash
loop): it says why in words once, binds its listeners, answers ``/healthz`` 200 and
``/readyz`` 503, and treats proxied requests per ``redis.on_error``; once Redis answers it
is ready and authorizes keys without a restart. ``keygate keys ...`` commands, which have
nothing to wait for, exit 1 with the same words.

Every test chooses its own Redis (started after keygate, behind a password, or something
that is not Redis at all), so none depends on the session's server: ``single_server``
keeps them out of the Cluster pass, where they would only repeat themselves.
"""

from __future__ import annotations

import contextlib
import functools
import json
import socket
import socketserver
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tests.cli.running import Running, run, serving
from tests.procs import http_get, write_config
from tests.topologies import HOST, NodeProcess, free_port, poll, server_argv, start_cluster

pytestmark = pytest.mark.single_server

PASSWORD = "s3cret-" + uuid.uuid4().hex[:8]
UPSTREAM_BODY = {"from": "upstream"}


# --- what the tests run against -------------------------------------------------------------


class _Upstream(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = json.dumps(UPSTREAM_BODY).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextlib.contextmanager
def upstream() -> Iterator[int]:
    """A plain HTTP upstream answering every GET with UPSTREAM_BODY; its port."""
    server = ThreadingHTTPServer((HOST, 0), _Upstream)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


class _NotRedis(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        with contextlib.suppress(OSError):
            self.request.recv(4096)
            self.request.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")


@contextlib.contextmanager
def not_redis() -> Iterator[int]:
    """A TCP server that answers whatever it is sent as an HTTP server would; its port."""
    server = socketserver.ThreadingTCPServer((HOST, 0), _NotRedis)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def _pings(node: NodeProcess, password: str | None) -> bool | None:
    with node.client(password=password, socket_timeout=1.0) as client:
        return True if client.ping() else None


def _cluster_ok(node: NodeProcess) -> bool | None:
    with node.client(socket_timeout=1.0) as client:
        return True if "cluster_state:ok" in client.execute_command("CLUSTER", "INFO") else None


@contextlib.contextmanager
def redis_server(
    directory: Path, port: int, *, password: str | None = None
) -> Iterator[NodeProcess]:
    """The packaged server on 127.0.0.1:``port``, answering PING; stopped on exit."""
    directory.mkdir(parents=True, exist_ok=True)
    extra = ["--save", "", "--appendonly", "no"]
    if password is not None:
        extra += ["--requirepass", password]
    node = NodeProcess(
        f"redis :{port}", HOST, port, server_argv(port, directory, *extra), directory / "log"
    )
    node.start()
    try:
        check = functools.partial(_pings, node, password)
        poll(f"redis on :{port} answering PING", check, timeout=15, watch=[node])
        yield node
    finally:
        node.stop()


def gateway_config(path: Path, redis: dict[str, Any], upstream_port: int) -> dict[str, Any]:
    config = {
        "listen": f"{HOST}:{free_port()}",
        "admin_listen": f"{HOST}:{free_port()}",
        "redis": {"connect_timeout": 0.5, "socket_timeout": 0.5, **redis},
        "log": {"level": "info", "format": "text", "access": False},
        "upstreams": {"up": {"url": f"http://{HOST}:{upstream_port}"}},
        "routes": [{"name": "echo", "prefix": "/echo", "upstream": "up"}],
    }
    write_config(path, config)
    return config


def port_of(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


def unknown_secret() -> str:
    """Not keygate's secret format: only Redis can say it is unknown (no checksum to fail)."""
    return "unknown-key-" + uuid.uuid4().hex


def lines_naming(serve: Running, text: str) -> list[str]:
    return [line for line in serve.stderr.splitlines() if text in line]


def wait_ready(admin_port: int, serve: Running, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        status, body = http_get(admin_port, "/readyz")
        if status == 200:
            return
        assert time.monotonic() < deadline, f"not ready within {timeout:g}s: {body}\n{serve.stderr}"
        time.sleep(0.1)


def last_line(text: str) -> str:
    return text.strip().splitlines()[-1]


NOT_READY = (503, {"status": "unavailable", "reason": "redis unreachable"})


# --- serve starts; the gateway is ready once Redis is ---------------------------------------


@pytest.mark.parametrize("on_error", ["fail_closed", "fail_open"])
def test_serve_starts_with_redis_down_and_recovers_when_it_comes_up(
    tmp_path: Path, on_error: str
) -> None:
    redis_port = free_port()
    url = f"redis://{HOST}:{redis_port}/0"
    with upstream() as upstream_port:
        config = gateway_config(
            tmp_path / "gw.yaml", {"url": url, "on_error": on_error}, upstream_port
        )
        admin, proxy = port_of(config["admin_listen"]), port_of(config["listen"])
        with serving("serve", "-c", "gw.yaml", cwd=tmp_path, admin_port=admin) as serve:
            assert http_get(admin, "/healthz") == (200, {"status": "ok"})
            assert http_get(admin, "/readyz") == NOT_READY
            status, body = http_get(proxy, "/echo/x", unknown_secret())
            if on_error == "fail_closed":
                assert (status, body["code"]) == (503, "store_error"), body
            else:
                assert (status, body) == (200, UPSTREAM_BODY)
            said = lines_naming(serve, f"nothing listens on {HOST}:{redis_port} (redis.url)")
            assert len(said) == 1, serve.stderr
            assert "WARNING" in said[0] and url in said[0], said
            assert f"redis.on_error ({on_error})" in said[0], said

            with redis_server(tmp_path / "redis", redis_port):
                wait_ready(admin, serve)
                created = run(
                    "keys", "create", "--scope", "*", "--json", "-c", "gw.yaml", cwd=tmp_path
                )
                assert created.code == 0, created
                secret = created.json()["key"]
                assert http_get(proxy, "/echo/x", secret) == (200, UPSTREAM_BODY)
                status, body = http_get(proxy, "/echo/x", unknown_secret())
                assert (status, body["code"]) == (401, "invalid_key"), body  # Redis decides
                assert len(lines_naming(serve, "answers again")) == 1, serve.stderr
            # The reason was said once, however many requests and probes failed.
            assert len(lines_naming(serve, "nothing listens on")) == 1, serve.stderr
        assert "Traceback" not in serve.stderr


def test_serve_starts_with_every_cluster_node_down_and_uses_the_cluster_once_up(
    tmp_path: Path,
) -> None:
    with upstream() as upstream_port, start_cluster(tmp_path / "cluster", primaries=3) as cluster:
        for node in cluster.nodes:
            node.stop()
        config = gateway_config(tmp_path / "gw.yaml", {"url": cluster.url}, upstream_port)
        admin, proxy = port_of(config["admin_listen"]), port_of(config["listen"])
        with serving("serve", "-c", "gw.yaml", cwd=tmp_path, admin_port=admin) as serve:
            assert http_get(admin, "/readyz") == NOT_READY
            status, body = http_get(proxy, "/echo/x", unknown_secret())
            assert (status, body["code"]) == (503, "store_error"), body
            assert len(lines_naming(serve, "nothing listens on")) == 1, serve.stderr

            for node in cluster.nodes:
                node.start()
            for node in cluster.nodes:
                check = functools.partial(_cluster_ok, node)
                poll(f"{node.name} in a working cluster", check, timeout=60, watch=[node])
            wait_ready(admin, serve)
            created = run("keys", "create", "--scope", "*", "--json", "-c", "gw.yaml", cwd=tmp_path)
            assert created.code == 0, created
            assert http_get(proxy, "/echo/x", created.json()["key"]) == (200, UPSTREAM_BODY)
        assert "Traceback" not in serve.stderr


# --- configs that cannot work yet: serve starts, keys commands say why ------------------------


def test_a_server_that_wants_a_password_is_named_in_words(tmp_path: Path) -> None:
    redis_port = free_port()
    with (
        upstream() as upstream_port,
        redis_server(tmp_path / "redis", redis_port, password=PASSWORD),
    ):
        config = gateway_config(
            tmp_path / "gw.yaml", {"url": f"redis://{HOST}:{redis_port}/0"}, upstream_port
        )
        needs = "redis.url needs a password: set redis.password or KEYGATE_REDIS_PASSWORD"

        listed = run("keys", "list", "-c", "gw.yaml", cwd=tmp_path)
        assert listed.code == 1, listed
        assert last_line(listed.err) == f"keygate: the key store failed: {needs}"

        as_json = run("keys", "list", "--json", "-c", "gw.yaml", cwd=tmp_path)
        assert as_json.code == 1, as_json
        assert as_json.json()["detail"] == f"the key store failed: {needs}"

        wrong = {"KEYGATE_REDIS_PASSWORD": "wrong-" + PASSWORD}
        refused = run("keys", "list", "-c", "gw.yaml", cwd=tmp_path, env=wrong)
        assert refused.code == 1, refused
        assert last_line(refused.err) == (
            f"keygate: the key store failed: the password for {HOST}:{redis_port} "
            "(redis.url) was refused"
        )
        assert PASSWORD not in refused.err

        admin, proxy = port_of(config["admin_listen"]), port_of(config["listen"])
        with serving("serve", "-c", "gw.yaml", cwd=tmp_path, admin_port=admin, env=wrong) as serve:
            assert http_get(admin, "/healthz") == (200, {"status": "ok"})
            assert http_get(admin, "/readyz") == NOT_READY
            status, body = http_get(proxy, "/echo/x", unknown_secret())
            assert (status, body["code"]) == (503, "store_error"), body
            said = lines_naming(serve, "was refused")
            assert len(said) == 1 and "WARNING" in said[0], serve.stderr
            assert PASSWORD not in serve.stderr

        right = run(
            "keys", "list", "-c", "gw.yaml", cwd=tmp_path, env={"KEYGATE_REDIS_PASSWORD": PASSWORD}
        )
        assert (right.code, right.out) == (0, "no keys\n"), right


def test_a_peer_that_does_not_speak_redis_is_named_in_words(tmp_path: Path) -> None:
    with upstream() as upstream_port, not_redis() as port:
        config = gateway_config(
            tmp_path / "gw.yaml", {"url": f"redis://{HOST}:{port}"}, upstream_port
        )
        listed = run("keys", "list", "-c", "gw.yaml", cwd=tmp_path)
        assert listed.code == 1, listed
        assert last_line(listed.err) == (
            f"keygate: the key store failed: {HOST}:{port} does not speak Redis"
        )

        admin = port_of(config["admin_listen"])
        with serving("serve", "-c", "gw.yaml", cwd=tmp_path, admin_port=admin) as serve:
            assert http_get(admin, "/readyz") == NOT_READY
            assert http_get(admin, "/readyz") == NOT_READY
            said = lines_naming(serve, f"{HOST}:{port} does not speak Redis")
            assert len(said) == 1 and "WARNING" in said[0], serve.stderr  # not once per probe


def test_keys_commands_say_in_words_why_redis_did_not_answer(tmp_path: Path) -> None:
    refused_port = free_port()  # nothing listens there
    write_config(tmp_path / "refused.yaml", {"redis": {"url": f"redis://{HOST}:{refused_port}"}})
    refused = run("keys", "list", "-c", "refused.yaml", cwd=tmp_path)
    assert refused.code == 1, refused
    assert last_line(refused.err) == (
        f"keygate: the key store failed: nothing listens on {HOST}:{refused_port} (redis.url)"
    )

    with socket.socket() as silent:  # accepts connections (the kernel does) and never answers
        silent.bind((HOST, 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        redis = {"url": f"redis://{HOST}:{port}", "connect_timeout": 0.5, "socket_timeout": 0.7}
        write_config(tmp_path / "silent.yaml", {"redis": redis})
        hung = run("keys", "list", "-c", "silent.yaml", cwd=tmp_path)
    assert hung.code == 1, hung
    assert last_line(hung.err) == (
        f"keygate: the key store failed: {HOST}:{port} did not answer within 0.7s "
        "(redis.socket_timeout)"
    )

    with contextlib.ExitStack() as stack:  # its queue of connections to accept is full
        full = stack.enter_context(socket.socket())
        full.bind((HOST, 0))
        full.listen(0)
        port = full.getsockname()[1]
        for _ in range(4):  # the kernel drops SYNs past the queue: connects time out
            waiting = stack.enter_context(socket.socket())
            waiting.setblocking(False)
            waiting.connect_ex((HOST, port))
        time.sleep(0.2)
        redis = {"url": f"redis://{HOST}:{port}", "connect_timeout": 0.5, "socket_timeout": 0.7}
        write_config(tmp_path / "full.yaml", {"redis": redis})
        unanswered = run("keys", "list", "-c", "full.yaml", cwd=tmp_path)
    assert unanswered.code == 1, unanswered
    assert last_line(unanswered.err) == (
        f"keygate: the key store failed: {HOST}:{port} did not answer within 0.5s "
        "(redis.connect_timeout)"
    )
