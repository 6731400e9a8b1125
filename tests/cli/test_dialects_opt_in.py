"""The listing dialects manage keys on the public listener, so each is opt-in.

Without a ``dialects`` section no dialect is served; the shipped config/gateway.yaml
lists them all switched off; the demo (``keygate demo`` and config/demo.yaml) switches
them on.
"""

from __future__ import annotations

import argparse
import urllib.error
import urllib.request
from pathlib import Path

from gateway.config.load import load
from gateway.config.model import DIALECTS
from gateway.demo.command import demo_settings
from tests.cli.running import run, serving
from tests.conftest import MakeKey
from tests.procs import free_port, write_config

CONFIG = Path(__file__).resolve().parents[2] / "config"


def _status(port: int, path: str, secret: str) -> int:
    """GET ``path`` with the key as the dialect's clients send it (konpro: x-api-key)."""
    konpro = path == "/v1/api-keys"
    header = {"x-api-key": secret} if konpro else {"Authorization": f"Bearer {secret}"}
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers=header)
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code


async def test_no_dialect_is_served_unless_configured(
    tmp_path: Path, redis_url: str, key_prefix: str, make_key: MakeKey
) -> None:
    caller = await make_key(scopes=["*"])
    admin_port, port = free_port(), free_port()
    raw = {
        "listen": f"127.0.0.1:{port}",
        "admin_listen": f"127.0.0.1:{admin_port}",
        "redis": {"url": redis_url, "key_prefix": key_prefix},
        "log": {"level": "warning"},
    }
    config = write_config(tmp_path / "gateway.yaml", raw)
    paths = ["/api/v1/api_key/", "/api/v1/apikey", "/api/v1/keys", "/v1/api_keys", "/v1/api-keys"]
    assert caller.secret is not None
    with serving("serve", "-c", str(config), cwd=tmp_path, admin_port=admin_port):
        assert [_status(port, p, caller.secret) for p in paths] == [404] * 5
    raw["dialects"] = {"konpro": {"enabled": True}}
    config = write_config(tmp_path / "gateway.yaml", raw)
    with serving("serve", "-c", str(config), cwd=tmp_path, admin_port=admin_port):
        assert [_status(port, p, caller.secret) for p in paths] == [404] * 4 + [200]


def test_the_shipped_config_switches_every_dialect_off() -> None:
    settings = load(CONFIG / "gateway.yaml", environ={})
    assert set(settings.dialects) == set(DIALECTS)
    assert not any(d.enabled for d in settings.dialects.values())
    text = (CONFIG / "gateway.yaml").read_text()
    for name in DIALECTS:
        assert f"  {name}: {{enabled: false," in text


def test_the_demo_serves_every_dialect(tmp_path: Path) -> None:
    args = argparse.Namespace(port=1, admin_port=2, data_dir=tmp_path)
    assert all(d.enabled for d in demo_settings(args, 3).dialects.values())
    demo = load(CONFIG / "demo.yaml", environ={})
    assert set(demo.dialects) == set(DIALECTS)
    assert all(d.enabled for d in demo.dialects.values())
    checked = run("check-config", str(CONFIG / "demo.yaml"), cwd=tmp_path)
    assert checked.code == 0, checked
