"""A real nginx process on loopback, configured with deploy/forward-auth/nginx.conf exactly
as shipped (placeholders replaced), for the forward-auth tests.

nginx comes from the Debian package (.ci/run installs it). Under ``CI=true`` a missing
binary fails the test: missing there is a broken install, never a reason to skip.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.procs import free_port

FORWARD_AUTH = Path(__file__).resolve().parents[2] / "deploy" / "forward-auth"
CONFIG = FORWARD_AUTH / "nginx.conf"
INGRESS = FORWARD_AUTH / "ingress-nginx.yaml"
LOOPBACK = "127.0.0.1"
READY_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0


def nginx_binary() -> str:
    """nginx on PATH (or Debian's /usr/sbin/nginx, often not on a user's PATH); fail under CI."""
    found = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")
    if found is None:
        if os.environ.get("CI") == "true":
            pytest.fail("nginx is missing: .ci/run installs the Debian package nginx")
        pytest.skip("nginx is not installed (apt-get install nginx)")
    return found


def render(template: Path, values: dict[str, str]) -> str:
    """The file with every ``__NAME__`` placeholder replaced; all of them must be given."""
    text = template.read_text(encoding="utf-8")
    for name, value in values.items():
        assert name in text, f"{template.name} has no placeholder {name}"
        text = text.replace(name, value)
    return text


@dataclass
class Nginx:
    process: subprocess.Popen[bytes]
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def output(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")


async def start_nginx(prefix: Path, *, keygate_auth: str, upstream: str) -> Nginx:
    """nginx in front of ``upstream`` (host:port) asking keygate's auth listener at
    ``keygate_auth`` (host:port); returns once it accepts connections. ``prefix`` holds its
    config, pid file and log (stdout and stderr, the access and error logs)."""
    found = launch_nginx(prefix, keygate_auth=keygate_auth, upstream=upstream)
    try:
        await _wait_ready(found)
    except BaseException:
        stop_nginx(found)
        raise
    return found


def launch_nginx(prefix: Path, *, keygate_auth: str, upstream: str) -> Nginx:
    """The nginx process of ``start_nginx``, started but not yet known to be listening."""
    binary = nginx_binary()
    port = free_port()
    prefix.mkdir(parents=True, exist_ok=True)
    config = prefix / "nginx.conf"
    config.write_text(
        render(
            CONFIG,
            {
                "__LISTEN__": f"{LOOPBACK}:{port}",
                "__KEYGATE_AUTH__": keygate_auth,
                "__UPSTREAM__": upstream,
            },
        ),
        encoding="utf-8",
    )
    log = prefix / "nginx.log"
    overrides = f"daemon off; pid {prefix / 'nginx.pid'}; error_log stderr;"
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [binary, "-p", str(prefix), "-c", str(config), "-g", overrides],
            stdin=subprocess.DEVNULL,
            stdout=sink,
            stderr=subprocess.STDOUT,
            cwd=prefix,
            start_new_session=True,
        )
    return Nginx(process, port, log)


async def _wait_ready(nginx: Nginx) -> None:
    """Until nginx's listener takes connections (it binds before its workers start, and
    the kernel queues connections for them meanwhile)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + READY_TIMEOUT
    while True:
        if nginx.process.poll() is not None:
            raise AssertionError(f"nginx exited early:\n{nginx.output()}")
        if await _accepts(nginx.port):
            return
        if loop.time() > deadline:
            raise AssertionError(f"nginx not ready in {READY_TIMEOUT}s:\n{nginx.output()}")
        await asyncio.sleep(0.05)


async def _accepts(port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection(LOOPBACK, port)
    except OSError:
        return False
    writer.close()
    await writer.wait_closed()
    return True


def stop_nginx(nginx: Nginx) -> None:
    """SIGTERM to this nginx's master PID (fast shutdown; its workers follow), SIGKILL to
    its process group if it outstays."""
    process = nginx.process
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(STOP_TIMEOUT)
