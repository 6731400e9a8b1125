"""`keygate serve` failures are one line and a non-zero exit, never a traceback; a Redis that
does not answer is not one of them."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

from tests.cli.running import run, serving
from tests.procs import free_port, http_get


def _serve(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", "serve", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_unreachable_redis_is_one_line(tmp_path: Path) -> None:
    """serve starts without its Redis (see test_redis_down.py); a keys command, which has
    nothing to wait for, exits 1 with the reason in words."""
    config = tmp_path / "gw.yaml"
    admin_port = free_port()
    config.write_text(
        'redis: {url: "redis://127.0.0.1:1/0", connect_timeout: 0.5}\n'
        f"listen: 127.0.0.1:0\nadmin_listen: 127.0.0.1:{admin_port}\n"
    )
    listed = run("keys", "list", "-c", str(config), cwd=tmp_path)
    assert listed.code == 1
    assert listed.err.strip().splitlines()[-1] == (
        "keygate: the key store failed: nothing listens on 127.0.0.1:1 (redis.url)"
    )
    with serving("serve", "-c", str(config), cwd=tmp_path, admin_port=admin_port) as serve:
        assert http_get(admin_port, "/readyz")[0] == 503
        said = [line for line in serve.stderr.splitlines() if "nothing listens on" in line]
    assert len(said) == 1 and "nothing listens on 127.0.0.1:1 (redis.url)" in said[0], said
    assert "Traceback" not in serve.stderr


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
    assert result.stderr.splitlines()[-1] == f"keygate: 127.0.0.1:{port} (listen) is already in use"
