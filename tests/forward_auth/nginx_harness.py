"""A real nginx process on loopback, configured with deploy/forward-auth/nginx.conf exactly
as shipped (placeholders replaced), for the forward-auth tests.

nginx comes from the Debian package (.ci/run installs it). Under ``CI=true`` a missing
binary fails the test: missing there is a broken install, never a reason to skip.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from tests.forward_auth.processes import missing, render, stop, wait_listening
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
        missing("nginx", ".ci/run installs the Debian package nginx")
    return found


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
        await wait_listening("nginx", found.process, found.port, found.output)
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


def stop_nginx(found: Nginx) -> None:
    """Stop this nginx by its PID (SIGTERM, then SIGKILL if it outstays)."""
    stop(found.process, group=True)
