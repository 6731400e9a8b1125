"""A real Caddy process on loopback, configured with deploy/forward-auth/Caddyfile exactly
as shipped (placeholders replaced), for the forward-auth tests.

The binary is Debian's ``caddy`` package (CI's setup installs it). Under ``CI=true`` a
missing binary fails the test: missing there is a broken setup, never a reason to skip.
Caddy's admin API is off (the config says so through its placeholder), so it is stopped
by its PID; HOME and the XDG directories point into the test's own directory, where Caddy
keeps what it writes (autosaved config, data).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from tests.forward_auth.processes import missing, render, stop, wait_listening
from tests.procs import free_port

CADDYFILE = Path(__file__).resolve().parents[2] / "deploy" / "forward-auth" / "Caddyfile"
LOOPBACK = "127.0.0.1"
READY_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0


def caddy_binary() -> str:
    """``caddy`` on PATH; fail under CI, skip elsewhere."""
    found = shutil.which("caddy")
    if found is None:
        missing("caddy", ".ci/run installs the Debian package caddy")
    return found


@dataclass
class Caddy:
    process: subprocess.Popen[bytes]
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def output(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")


async def start_caddy(workdir: Path, *, keygate_auth: str, upstream_url: str) -> Caddy:
    """Caddy in front of ``upstream_url`` asking keygate at ``keygate_auth`` (host:port);
    returns once it accepts connections (Caddy listens only after its config is loaded)."""
    found = _launch(workdir, keygate_auth=keygate_auth, upstream_url=upstream_url)
    try:
        await wait_listening("caddy", found.process, found.port, found.output)
    except BaseException:
        stop_caddy(found)
        raise
    return found


def _launch(workdir: Path, *, keygate_auth: str, upstream_url: str) -> Caddy:
    """Write the rendered Caddyfile and a private HOME under ``workdir``; start Caddy."""
    binary = caddy_binary()
    port = free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "Caddyfile"
    config.write_text(
        render(
            CADDYFILE,
            {
                "__CADDY_ADMIN__": "off",
                "__CADDY_BIND__": LOOPBACK,
                "__CADDY_PORT__": str(port),
                "__KEYGATE_AUTH__": keygate_auth,
                "__UPSTREAM__": upstream_url,
            },
        ),
        encoding="utf-8",
    )
    home = workdir / "home"
    home.mkdir(exist_ok=True)
    env = {
        **os.environ,
        "HOME": str(home),
        "XDG_CONFIG_HOME": str(home / "config"),
        "XDG_DATA_HOME": str(home / "data"),
    }
    log = workdir / "caddy.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [binary, "run", "--config", str(config), "--adapter", "caddyfile"],
            stdin=subprocess.DEVNULL,
            stdout=sink,
            stderr=subprocess.STDOUT,
            cwd=workdir,
            env=env,
            start_new_session=True,
        )
    return Caddy(process, port, log)


def stop_caddy(found: Caddy) -> None:
    """Stop this caddy by its PID (SIGTERM, then SIGKILL if it outstays)."""
    stop(found.process)
