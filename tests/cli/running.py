"""The real ``keygate`` command with the KEYGATE_* variables a test chooses.

``tests.procs`` runs keygate with every KEYGATE_* variable removed; the tests of config
discovery and of the environment check need to set some, and to run ``keygate serve``
without a config file (so no ``admin_listen`` to read back from it).
"""

from __future__ import annotations

import contextlib
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tests.procs import KEYGATE, Result, clean_env, http_get


def run(
    *args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 30
) -> Result:
    """One ``keygate`` command, to its end; a command still running at ``timeout`` fails
    the test (a ``serve`` that should have refused to start)."""
    try:
        done = subprocess.run(
            [*KEYGATE, *args],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            cwd=cwd,
            env={**clean_env(), **(env or {})},
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:  # run() has killed it
        err = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else ""
        message = f"keygate {' '.join(args)} still running after {timeout}s: {err}"
        raise AssertionError(message) from None
    assert "Traceback" not in done.stderr, done.stderr
    return Result(done.returncode, done.stdout, done.stderr)


@dataclass
class Running:
    process: subprocess.Popen[bytes]
    stderr_path: Path

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")


@contextlib.contextmanager
def serving(
    *args: str, cwd: Path, admin_port: int, env: dict[str, str] | None = None
) -> Iterator[Running]:
    """``keygate <args>`` (a serve) until its admin listener answers; stopped on exit."""
    stderr_path = cwd / f"serve-{admin_port}.err"
    with stderr_path.open("wb") as err:
        process = subprocess.Popen(
            [*KEYGATE, *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=err,
            cwd=cwd,
            env={**clean_env(), **(env or {})},
        )
    running = Running(process, stderr_path)
    try:
        deadline = time.monotonic() + 30
        while True:
            if process.poll() is not None:
                raise AssertionError(f"keygate exited {process.returncode}: {running.stderr}")
            with contextlib.suppress(OSError):
                if http_get(admin_port, "/openapi.json")[0] == 200:
                    break
            if time.monotonic() > deadline:
                raise AssertionError(f"keygate serve not ready within 30s: {running.stderr}")
            time.sleep(0.05)
        yield running
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
        process.wait(10)
