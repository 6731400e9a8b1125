"""`keygate serve` failures are one line and a non-zero exit, never a traceback."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path


def _serve(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", "serve", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_unreachable_redis_is_one_line(tmp_path: Path) -> None:
    config = tmp_path / "gw.yaml"
    config.write_text(
        'redis: {url: "redis://127.0.0.1:1/0", connect_timeout: 0.5}\n'
        "listen: 127.0.0.1:0\nadmin_listen: 127.0.0.1:0\n"
    )
    result = _serve(config)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("keygate: Redis failed: ")


def test_a_listener_address_in_use_is_one_line(tmp_path: Path, redis_url: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = tmp_path / "gw.yaml"
        config.write_text(
            f'redis: {{url: "{redis_url}"}}\nlisten: 127.0.0.1:{port}\nadmin_listen: 127.0.0.1:0\n'
        )
        result = _serve(config)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "address already in use" in result.stderr.splitlines()[-1]
