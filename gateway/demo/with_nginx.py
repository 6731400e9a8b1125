"""``keygate demo --with nginx``: nginx in front of the sample upstream, asking keygate's
auth listener about every request, with deploy/forward-auth/nginx.conf as shipped
(its placeholders filled in). nginx comes from the system (Debian: ``apt-get install
nginx``); the config from the repository checkout the demo runs from.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

SHIPPED_CONFIG = Path(__file__).resolve().parents[2] / "deploy" / "forward-auth" / "nginx.conf"
READY_TIMEOUT = 15.0


class NginxUnavailable(Exception):
    """nginx cannot run here; the message says what to do."""


@dataclass
class DemoNginx:
    process: subprocess.Popen[bytes]
    port: int

    def stop(self) -> None:
        """Stop nginx by its pid (the master stops its workers), waiting for it."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


def nginx_binary() -> str:
    found = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")
    if found is None:
        raise NginxUnavailable("nginx is not installed (Debian: apt-get install nginx)")
    if not SHIPPED_CONFIG.is_file():
        raise NginxUnavailable(f"{SHIPPED_CONFIG} is missing: run the demo from a checkout")
    return found


def start_nginx(prefix: Path, port: int, auth_port: int, upstream_port: int) -> DemoNginx:
    """nginx on 127.0.0.1:``port`` in front of the upstream, asking the auth listener;
    returns once it accepts connections (NginxUnavailable if it does not start)."""
    binary = nginx_binary()
    prefix.mkdir(parents=True, exist_ok=True)
    text = SHIPPED_CONFIG.read_text(encoding="utf-8")
    for name, value in (
        ("__LISTEN__", f"127.0.0.1:{port}"),
        ("__KEYGATE_AUTH__", f"127.0.0.1:{auth_port}"),
        ("__UPSTREAM__", f"127.0.0.1:{upstream_port}"),
    ):
        text = text.replace(name, value)
    config = prefix / "nginx.conf"
    config.write_text(text, encoding="utf-8")
    for temp in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (prefix / temp).mkdir(exist_ok=True)
    log = (prefix / "nginx.log").open("wb")
    process = subprocess.Popen(
        [
            binary, "-p", str(prefix), "-c", str(config),
            "-g", f"daemon off; pid {prefix / 'nginx.pid'}; error_log stderr;",
        ],
        stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    found = DemoNginx(process, port)
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise NginxUnavailable(
                f"nginx exited ({process.returncode}); its log: {prefix / 'nginx.log'}"
            )
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return found
        except OSError:
            time.sleep(0.05)
    found.stop()
    raise NginxUnavailable(f"nginx did not listen on {port} within {READY_TIMEOUT:g}s")
