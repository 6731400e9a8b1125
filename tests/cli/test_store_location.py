"""Where the key store is does not depend on the directory keygate runs in.

A relative ``redis.data_dir`` in a config file is relative to that file, so ``keygate keys
create -c /etc/keygate/gateway.yaml`` and ``keygate serve -c /etc/keygate/gateway.yaml``
use one store wherever each is started; and every ``keys`` command and ``serve`` name the
store they use (on stderr, so stdout stays parseable), never with a password.
"""

from __future__ import annotations

from pathlib import Path

from tests.cli.running import run, serving
from tests.procs import free_port, http_get, short_tmpdir, write_config


def _dirs(root: Path) -> tuple[Path, Path, Path]:
    etc, here, there = root / "etc", root / "here", root / "there"
    for directory in (etc, here, there):
        directory.mkdir()
    return etc, here, there


def test_a_key_made_in_one_directory_works_on_a_gateway_started_in_another() -> None:
    with short_tmpdir() as root:
        etc, here, there = _dirs(root)
        admin_port = free_port()
        config = write_config(
            etc / "gateway.yaml",
            {
                "listen": f"127.0.0.1:{free_port()}",
                "admin_listen": f"127.0.0.1:{admin_port}",
                "redis": {"data_dir": ".keygate"},  # relative: to etc/, not to the cwd
                "log": {"format": "text", "level": "info", "access": False},
            },
        )
        created = run("keys", "create", "--scope", "*", "--json", "-c", str(config), cwd=here)
        assert created.code == 0, created
        key = created.json()

        with serving("serve", "-c", str(config), cwd=there, admin_port=admin_port) as serve:
            status, body = http_get(admin_port, "/v1/keys", key["key"])
            assert status == 200, body
            assert [r["id"] for r in body["data"]] == [key["id"]]
            listed = run("keys", "list", "--json", "-c", str(config), cwd=root)
            assert listed.code == 0, listed
            assert [r["id"] for r in listed.json()["data"]] == [key["id"]]
            log = serve.stderr

        store = f"key store: embedded Redis in {etc / '.keygate'}, key prefix kg:"
        assert created.err == f"keygate: config {config} (from --config): 0 routes; {store}\n"
        assert listed.err == created.err
        assert f"config {config} (from --config): 0 routes, 0 upstreams; {store}" in log
        assert (etc / ".keygate" / "appendonlydir").is_dir()
        assert not (here / ".keygate").exists() and not (there / ".keygate").exists()


def test_keys_list_from_two_directories_shows_one_store() -> None:
    with short_tmpdir() as root:
        etc, here, there = _dirs(root)
        config = write_config(etc / "gateway.yaml", {"redis": {"data_dir": "store"}})
        created = run("keys", "create", "--name", "one", "--json", "-c", str(config), cwd=here)
        assert created.code == 0, created
        listed = run("keys", "list", "--json", "-c", "../etc/gateway.yaml", cwd=there)
        assert listed.code == 0, listed
        assert [r["name"] for r in listed.json()["data"]] == ["one"]
        store = f"key store: embedded Redis in {etc / 'store'}, key prefix kg:\n"
        assert listed.err.endswith(store)


def test_without_a_config_file_the_store_is_in_the_working_directory() -> None:
    with short_tmpdir() as root:
        listed = run("keys", "list", cwd=root)
        assert (listed.code, listed.out) == (0, "no keys\n"), listed
        assert listed.err == (
            f"keygate: no config file found (looked for gateway.yaml and config/gateway.yaml "
            f"in {root}); running on defaults: 0 routes; "
            f"key store: embedded Redis in {root / '.keygate'}, key prefix kg:\n"
        )


def test_an_environment_override_of_data_dir_is_relative_to_the_working_directory() -> None:
    with short_tmpdir() as root:
        etc, here, _ = _dirs(root)
        config = write_config(etc / "gateway.yaml", {"redis": {"data_dir": "ignored"}})
        listed = run(
            "keys", "list", "-c", str(config), cwd=here, env={"KEYGATE_REDIS_DATA_DIR": "state"}
        )
        assert listed.code == 0, listed
        store = f"key store: embedded Redis in {here / 'state'}, key prefix kg:\n"
        assert listed.err.endswith(store)
        assert (here / "state").is_dir() and not (etc / "ignored").exists()


def test_the_store_named_for_a_redis_url_never_shows_a_password(tmp_path: Path) -> None:
    urls = {
        "redis://ops:hunter2@127.0.0.1:1/0": "redis://ops:***@127.0.0.1:1/0",
        "redis://hunter2@127.0.0.1:1/0": "redis://***@127.0.0.1:1/0",  # a password alone
        "redis+sentinel://:hunter2@127.0.0.1:1/main?sentinel_password=hunter2": (
            "redis+sentinel://:***@127.0.0.1:1/main?sentinel_password=***"
        ),
    }
    for url, shown in urls.items():
        config = write_config(
            tmp_path / "gateway.yaml",
            {"redis": {"url": url, "key_prefix": "app:", "connect_timeout": 0.2}},
        )
        result = run("keys", "list", "-c", str(config), cwd=tmp_path)
        assert result.code == 1, result
        assert "hunter2" not in result.err + result.out
        first = result.err.splitlines()[0]
        source = f"keygate: config {config} (from --config): 0 routes"
        assert first == f"{source}; key store: {shown}, key prefix app:"
