"""What the real proxies' harnesses share: a config rendered from the shipped file, a
missing binary (a failure under CI, a skip elsewhere), waiting for a port, and stopping a
process by its PID."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

import pytest

LOOPBACK = "127.0.0.1"
READY_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0


def missing(tool: str, how: str) -> NoReturn:
    """``tool`` is not installed: under ``CI=true`` a broken install fails the test;
    elsewhere it is skipped, saying ``how`` to install it."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{tool} is missing: {how}")
    pytest.skip(f"{tool} is not installed ({how})")


def render(template: Path, values: dict[str, str]) -> str:
    """The file with every ``__NAME__`` placeholder replaced; all of them must be given."""
    text = template.read_text(encoding="utf-8")
    for name, value in values.items():
        assert name in text, f"{template.name} has no placeholder {name}"
        text = text.replace(name, value)
    return text


async def accepts(port: int) -> bool:
    """Whether something takes connections on the loopback ``port``."""
    try:
        _, writer = await asyncio.open_connection(LOOPBACK, port)
    except OSError:
        return False
    writer.close()
    await writer.wait_closed()
    return True


async def wait_listening(
    name: str, process: subprocess.Popen[bytes], port: int, output: Callable[[], str]
) -> None:
    """Until ``process`` takes connections on ``port``; its ``output`` in the error when it
    exits first or does not within READY_TIMEOUT."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + READY_TIMEOUT
    while True:
        if process.poll() is not None:
            raise AssertionError(f"{name} exited early:\n{output()}")
        if await accepts(port):
            return
        if loop.time() > deadline:
            raise AssertionError(f"{name} not ready in {READY_TIMEOUT}s:\n{output()}")
        await asyncio.sleep(0.05)


def stop(process: subprocess.Popen[bytes], *, group: bool = False) -> None:
    """SIGTERM to the process's PID (a graceful stop), SIGKILL (to its process group with
    ``group``) if it outstays STOP_TIMEOUT."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            if group:
                os.killpg(process.pid, signal.SIGKILL)
            else:
                process.kill()
            process.wait(STOP_TIMEOUT)
