"""deploy/docker-compose.yml: the services a scaled-out keygate needs, every file it mounts,
Prometheus' targets matching the replicas' admin listeners, and the gateway.yaml it mounts
accepted by keygate's own loader. The sample upstream is run locally as compose runs it.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.config.load import load
from gateway.config.model import Settings
from tests.procs import free_port

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
COMPOSE = DEPLOY / "docker-compose.yml"
MOUNT_TARGET = "/etc/keygate/gateway.yaml"


def compose() -> dict[str, Any]:
    with COMPOSE.open() as f:
        document: dict[str, Any] = yaml.safe_load(f)
    return document


SERVICES: dict[str, Any] = compose()["services"]
KEYGATES = sorted(name for name in SERVICES if name.startswith("keygate"))


def bind_mounts(service: dict[str, Any]) -> list[tuple[Path, str]]:
    """(host path, container path) of each bind mount; named volumes are left out."""
    mounts = []
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith((".", "/")):
            mounts.append(((COMPOSE.parent / source).resolve(), target))
    return mounts


def mounted_config(service: str) -> Path:
    [path] = [host for host, target in bind_mounts(SERVICES[service]) if target == MOUNT_TARGET]
    return path


def settings_of(service: str) -> Settings:
    return load(mounted_config(service), environ={})


def test_services() -> None:
    assert {"redis", "upstream", "prometheus", "grafana"} <= set(SERVICES)
    assert len(KEYGATES) == 2
    for name in KEYGATES:
        build = SERVICES[name]["build"]
        assert (COMPOSE.parent / build["context"] / build["dockerfile"]).is_file()


def test_redis_persists_to_a_volume() -> None:
    redis = SERVICES["redis"]
    assert redis["image"].startswith("redis:7")
    command = redis["command"]
    assert command[command.index("--appendonly") + 1] == "yes"
    volumes = compose()["volumes"]
    assert any(v.split(":")[0] in volumes and v.endswith(":/data") for v in redis["volumes"])


def test_every_service_has_a_healthcheck_and_keygate_waits_for_its_dependencies() -> None:
    for name, service in SERVICES.items():
        assert service["healthcheck"]["test"][0] == "CMD", name
    for name in KEYGATES:
        depends = SERVICES[name]["depends_on"]
        assert depends["redis"]["condition"] == "service_healthy"
        assert depends["upstream"]["condition"] == "service_healthy"


def test_every_mounted_file_exists() -> None:
    mounts = [m for service in SERVICES.values() for m in bind_mounts(service)]
    assert mounts
    for host, target in mounts:
        assert host.is_file(), f"{host} (mounted at {target}) is missing"


def test_published_ports_are_loopback_only() -> None:
    for name, service in SERVICES.items():
        for port in service.get("ports", []):
            assert port.startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"


def test_keygate_config_validates_and_uses_the_compose_services() -> None:
    for name in KEYGATES:
        settings = settings_of(name)
        assert settings.redis.url == "redis://redis:6379/0"
        assert settings.listen.port == 8080 and settings.admin_listen.port == 8081
        # Prometheus, in another container, scrapes the admin listener: not loopback.
        assert settings.admin_listen.host not in ("127.0.0.1", "localhost", "::1")
        upstream_port = SERVICES["upstream"]["command"][-1]
        assert {u.url for u in settings.upstreams.values()} == {f"http://upstream:{upstream_port}"}
        assert settings.routes


def test_prometheus_scrapes_each_replicas_admin_listener() -> None:
    prometheus = SERVICES["prometheus"]
    mounts = {target: host for host, target in bind_mounts(prometheus)}
    config = yaml.safe_load(mounts["/etc/prometheus/prometheus.yml"].read_text())
    # rule_files are relative to the config file: each must be mounted beside it.
    for rules in config["rule_files"]:
        assert f"/etc/prometheus/{rules}" in mounts
    [job] = [j for j in config["scrape_configs"] if j["job_name"] == "keygate"]
    assert job["metrics_path"] == "/metrics"
    targets = {t for static in job["static_configs"] for t in static["targets"]}
    expected = {f"{name}:{settings_of(name).admin_listen.port}" for name in KEYGATES}
    assert targets == expected


def test_grafana_provisions_the_dashboard_and_the_datasource() -> None:
    mounts = {target: host for host, target in bind_mounts(SERVICES["grafana"])}
    providers = [
        yaml.safe_load(host.read_text())
        for target, host in mounts.items()
        if target.startswith("/etc/grafana/provisioning/dashboards/")
    ]
    [provider] = [p for doc in providers for p in doc["providers"]]
    folder = provider["options"]["path"]
    dashboards = [h for t, h in mounts.items() if t.startswith(f"{folder}/")]
    assert dashboards == [(DEPLOY / "grafana" / "keygate.json").resolve()]
    [datasource] = [
        d
        for target, host in mounts.items()
        if target.startswith("/etc/grafana/provisioning/datasources/")
        for d in yaml.safe_load(host.read_text())["datasources"]
    ]
    assert datasource["type"] == "prometheus" and datasource["isDefault"] is True
    port = SERVICES["prometheus"]["ports"][0].rsplit(":", 1)[1]
    assert datasource["url"] == f"http://prometheus:{port}"


def test_sample_upstream_runs_as_compose_starts_it() -> None:
    """The upstream service's entrypoint + command, on loopback, answers its healthcheck."""
    upstream = SERVICES["upstream"]
    entrypoint, command = upstream["entrypoint"], upstream["command"]
    assert entrypoint[:2] == ["python", "-m"]
    command = list(command)
    command[command.index("--host") + 1] = "127.0.0.1"
    port = free_port()
    command[command.index("--port") + 1] = str(port)
    check = [
        sys.executable if word == "python" else word.replace(":9000/", f":{port}/")
        for word in upstream["healthcheck"]["test"][1:]
    ]
    process = subprocess.Popen(
        [sys.executable, *entrypoint[1:], *command],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 15
        while subprocess.run(check, capture_output=True, check=False).returncode != 0:
            assert process.poll() is None, "the sample upstream exited"
            if time.monotonic() > deadline:
                pytest.fail("the sample upstream's healthcheck did not pass within 15 s")
            time.sleep(0.1)
        process.send_signal(signal.SIGTERM)
        assert process.wait(10) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
