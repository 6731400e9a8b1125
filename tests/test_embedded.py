"""The embedded server behind ``redis.url: embedded``: one owner per data_dir, data that
survives restarts, and no server process left behind however keygate ends."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from gateway.config.model import RedisSettings
from gateway.embedded import MAX_SOCKET_PATH, EmbeddedError, EmbeddedRedis
from gateway.store.connection import connect
from gateway.store.keystore import KeyStore
from gateway.store.names import KeyNames
from tests.procs import (
    Serve,
    alive,
    answers,
    children,
    embedded_config,
    keygate,
    parent_of,
    reap,
    server_pid,
    serving,
    short_tmpdir,
    subreaper,
    wait_gone,
    write_config,
)


@pytest.fixture
def root() -> Iterator[Path]:
    with short_tmpdir() as path:
        yield path


@pytest.fixture
def data_dir(root: Path) -> Path:
    return root / "data"


@pytest.fixture
def config(root: Path) -> Path:
    return write_config(root / "gateway.yaml", embedded_config(root))


async def open_store(server: EmbeddedRedis) -> KeyStore:
    store = KeyStore(connect(RedisSettings(), server.url), KeyNames(), "kg_")
    await store.scripts.load()
    return store


def embedded_child(serve: Serve, socket_path: Path) -> int:
    """The pid of the server that ``keygate serve`` owns: its child, answering on the socket."""
    pid = server_pid(socket_path)
    assert pid in children(serve.pid) and parent_of(pid) == serve.pid
    return pid


# --- ownership, persistence, stop ----------------------------------------------------------


async def test_data_survives_a_restart(data_dir: Path) -> None:
    with EmbeddedRedis(data_dir).start() as server:
        assert server.owner
        store = await open_store(server)
        issued = await store.create(
            {"workspace_id": "ws", "user_id": str(uuid.uuid4()), "name": "kept"}
        )
        rotated = await store.rotate(issued.record.id, 3600)
        assert rotated is not None and rotated.secret is not None
        await store.client.aclose()
    assert not answers(server.socket_path)

    with EmbeddedRedis(data_dir).start() as server:
        store = await open_store(server)
        try:
            for secret in (rotated.secret, issued.secret):  # the grace survives as well
                assert secret is not None
                auth = await store.authenticate(secret)
                assert auth.status == "ok" and auth.record is not None
                assert auth.record.id == issued.record.id and auth.record.name == "kept"
            page = await store.list(workspace_id="ws")
            assert [r.id for r in page.records] == [issued.record.id]
        finally:
            await store.client.aclose()


def test_stop_leaves_no_server_process(data_dir: Path) -> None:
    server = EmbeddedRedis(data_dir).start()
    try:
        pid = server_pid(server.socket_path)
        assert pid in children(os.getpid()) and alive(pid)
    finally:
        server.stop()
    assert not alive(pid)
    assert not answers(server.socket_path)
    assert not server.owner
    server.stop()  # idempotent


def test_a_second_owner_is_refused_naming_the_pid_and_attach_uses_the_owner(
    data_dir: Path,
) -> None:
    with EmbeddedRedis(data_dir).start() as owner:
        pid = server_pid(owner.socket_path)
        with pytest.raises(EmbeddedError) as refused:
            EmbeddedRedis(data_dir).start()
        message = str(refused.value)
        assert f"is in use by another keygate (pid {os.getpid()})" in message
        assert str(data_dir) in message and "\n" not in message

        attached = EmbeddedRedis(data_dir).start(attach=True)
        assert not attached.owner and attached.url == owner.url
        with redis.Redis.from_url(attached.url, decode_responses=True) as client:
            client.set("marker", "from the attached client")
        attached.stop()  # does not stop the owner's server
        assert alive(pid) and server_pid(owner.socket_path) == pid
        with redis.Redis.from_url(owner.url, decode_responses=True) as client:
            assert client.get("marker") == "from the attached client"

        with pytest.raises(EmbeddedError, match="in use by another keygate"):
            EmbeddedRedis(data_dir).start()  # still owned after the attached one stopped
    assert not alive(pid)


def test_a_data_dir_too_long_for_a_unix_socket_is_a_clear_error(root: Path) -> None:
    long_dir = root / ("d" * (MAX_SOCKET_PATH - len(str(root))))
    with pytest.raises(EmbeddedError, match=r"too long for a unix socket path") as refused:
        EmbeddedRedis(long_dir).start()
    assert str(long_dir) in str(refused.value)
    assert not long_dir.exists()

    config = write_config(
        root / "long.yaml", embedded_config(root, redis={"data_dir": str(long_dir)})
    )
    result = keygate("serve", "--config", str(config), cwd=root)
    assert result.code == 1
    assert result.err.startswith("keygate: redis.data_dir ")
    assert "too long for a unix socket path" in result.err
    assert len(result.err.splitlines()) == 1


# --- keygate serve: owner of the data_dir --------------------------------------------------


def test_serve_on_a_data_dir_owned_by_a_running_keygate_exits_with_one_line(
    root: Path, data_dir: Path, config: Path
) -> None:
    with serving(config, root) as first:
        second_config = write_config(root / "second.yaml", embedded_config(root))
        result = keygate("serve", "--config", str(second_config), cwd=root)
        assert result.code == 1
        assert result.err == (
            f"keygate: redis.data_dir {data_dir} is in use by another keygate "
            f"(pid {first.pid}); stop it, or give this one another redis.data_dir\n"
        )
        assert first.process.poll() is None and answers(data_dir / "redis.sock")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_stops_serve_with_status_0_and_the_server_with_it(
    root: Path, data_dir: Path, config: Path, sig: signal.Signals
) -> None:
    with serving(config, root) as serve:
        socket_path = data_dir / "redis.sock"
        pid = embedded_child(serve, socket_path)
        with redis.Redis(unix_socket_path=str(socket_path)) as client:
            client.set("kept", "1")
        assert serve.signal(sig) == 0
        assert "Traceback" not in serve.stderr
    assert not alive(pid)
    assert not answers(socket_path)
    # The lock is free again, and the data is there.
    with (
        EmbeddedRedis(data_dir).start() as again,
        redis.Redis.from_url(again.url) as client,
    ):
        assert client.get("kept") == b"1"


def test_sigkill_of_serve_still_takes_the_server_down(
    root: Path, data_dir: Path, config: Path
) -> None:
    with subreaper(), serving(config, root) as serve:
        socket_path = data_dir / "redis.sock"
        pid = embedded_child(serve, socket_path)
        with redis.Redis(unix_socket_path=str(socket_path)) as client:
            client.set("kept", "1")
        # Held stopped, the server outlives keygate for half a second (the kernel's SIGTERM
        # waits until SIGCONT): the window in which a restarted keygate must not start a
        # second server on this data_dir.
        os.kill(pid, signal.SIGSTOP)
        resume = threading.Timer(0.5, os.kill, (pid, signal.SIGCONT))
        try:
            assert serve.signal(signal.SIGKILL) == -signal.SIGKILL
            resume.start()
            # Straight away, as a supervisor restarting keygate would. The new owner waits
            # for the dying server to let go of the data_dir; were both up at once, the old
            # one would delete the new one's socket on its way out (and share its files).
            with EmbeddedRedis(data_dir, start_timeout=5).start() as again:
                assert wait_gone(pid, 5), "PR_SET_PDEATHSIG did not stop the embedded server"
                assert answers(again.socket_path)
                assert server_pid(again.socket_path) != pid
                with redis.Redis.from_url(again.url) as client:
                    assert client.get("kept") == b"1"
        finally:
            resume.cancel()
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
            reap(pid)  # orphaned to this process by subreaper()
