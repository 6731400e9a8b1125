"""Helpers for tests that run the real ``keygate`` command as a process.

Everything here works on real processes: the console script (or ``python -m gateway``),
``keygate serve`` on a loopback port, and the embedded server it owns, found through /proc.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis
import yaml
from redis.backoff import NoBackoff
from redis.retry import Retry

_SCRIPT = Path(sys.executable).with_name("keygate")
KEYGATE = [str(_SCRIPT)] if _SCRIPT.is_file() else [sys.executable, "-m", "gateway"]


def sync_redis_client(url: str, **options: Any) -> redis.Redis | redis.RedisCluster:
    """A blocking redis-py client for a test server's URL: one server or a Cluster."""
    if url.startswith(("redis+cluster://", "rediss+cluster://")):
        host, _, port = url.split("://", 1)[1].split(",")[0].rpartition(":")
        return redis.RedisCluster(host=host, port=int(port), **options)
    return redis.Redis.from_url(url, **options)


def delete_prefixed(url: str, prefix: str) -> None:
    """Delete every key under ``prefix`` (a test's own), on every node of a Cluster too."""
    with sync_redis_client(url) as client:
        keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
        if keys:  # redis-py splits a Cluster's DEL by slot
            client.delete(*keys)


def clean_env() -> dict[str, str]:
    """This process's environment without KEYGATE_* overrides (they would change configs)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("KEYGATE_")}


@contextlib.contextmanager
def short_tmpdir() -> Iterator[Path]:
    """A directory short enough for a unix socket path (pytest's tmp_path may not be)."""
    path = Path(tempfile.mkdtemp(prefix="kg", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def write_config(path: Path, config: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def embedded_config(root: Path, **extra: Any) -> dict[str, Any]:
    """Default (embedded) mode, data under ``root/data``, both listeners on loopback."""
    return {
        "listen": f"127.0.0.1:{free_port()}",
        "admin_listen": f"127.0.0.1:{free_port()}",
        "redis": {"data_dir": str(root / "data")},
        "log": {"level": "warning"},
        **extra,
    }


@dataclass
class Result:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)


def keygate(*args: str, cwd: Path, stdin: str | None = None, timeout: float = 30) -> Result:
    done = subprocess.run(
        [*KEYGATE, *args],
        input=stdin,
        capture_output=True,
        text=True,
        cwd=cwd,
        env=clean_env(),
        timeout=timeout,
        check=False,
    )
    return Result(done.returncode, done.stdout, done.stderr)


# --- processes, through /proc --------------------------------------------------------------


def alive(pid: int) -> bool:
    """True while ``pid`` runs; a zombie (exited, not yet reaped) counts as gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def children(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError):
            found += [int(c) for c in (task / "children").read_text().split()]
    return found


@contextlib.contextmanager
def subreaper() -> Iterator[None]:
    """Orphans of our children become ours while this is on (PR_SET_CHILD_SUBREAPER), so a
    test that kills keygate outright can reap the server it leaves, not leave a zombie of
    pid 1 (which, in a container, may never reap it)."""
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(36, 1, 0, 0, 0)
    try:
        yield
    finally:
        libc.prctl(36, 0, 0, 0, 0)


def reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)


def wait_gone(pid: int, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def server_pid(socket_path: Path) -> int:
    """The embedded server's pid, as the server itself reports it."""
    with redis.Redis(unix_socket_path=str(socket_path), socket_timeout=2) as client:
        return int(client.info("server")["process_id"])


def answers(socket_path: Path) -> bool:
    """Whether a server answers on the socket, asked once (redis-py would retry for seconds)."""
    try:
        with redis.Redis(
            unix_socket_path=str(socket_path), socket_timeout=1, retry=Retry(NoBackoff(), 0)
        ) as client:
            return bool(client.ping())
    except (redis.ConnectionError, redis.TimeoutError, OSError):
        return False


# --- HTTP on the admin listener ------------------------------------------------------------


def http_get(port: int, path: str, secret: str | None = None) -> tuple[int, Any]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}")
    if secret is not None:
        request.add_header("Authorization", f"Bearer {secret}")
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


# --- keygate serve -------------------------------------------------------------------------


class Serve:
    """``keygate serve`` as a child process; always stopped by ``close()``."""

    def __init__(self, config: Path, root: Path) -> None:
        self.admin_port = int(yaml.safe_load(config.read_text())["admin_listen"].rsplit(":")[1])
        self.stderr_path = root / f"serve-{self.admin_port}.err"
        with self.stderr_path.open("wb") as err:
            self.process = subprocess.Popen(
                [*KEYGATE, "serve", "--config", str(config)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
                cwd=root,
                env=clean_env(),
            )

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 20.0) -> Serve:
        """Poll the admin listener until it answers (the embedded server is up by then)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                code = self.process.returncode
                raise AssertionError(f"keygate serve exited {code}: {self.stderr}")
            with contextlib.suppress(OSError):
                if http_get(self.admin_port, "/openapi.json")[0] == 200:
                    return self
            time.sleep(0.05)
        raise AssertionError(f"keygate serve not ready within {timeout}s: {self.stderr}")

    def signal(self, sig: signal.Signals, timeout: float = 15.0) -> int:
        self.process.send_signal(sig)
        return self.process.wait(timeout)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self.process.wait(10)


@contextlib.contextmanager
def serving(config: Path, root: Path) -> Iterator[Serve]:
    serve = Serve(config, root)
    try:
        yield serve.wait_ready()
    finally:
        serve.close()
