"""deploy/kubernetes: every manifest validates against the Kubernetes JSON schemas, offline
(kubernetes-validate bundles them; strict, so an unknown field is an error), the
ServiceMonitor (a CRD it has no schema for) structurally, and the ConfigMap's gateway.yaml
with keygate's own loader. The cross-references between the manifests are checked too.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.config.env import SECTION_KEYS
from gateway.config.load import build, load

kubernetes_validate = pytest.importorskip(
    "kubernetes_validate", reason="pip install kubernetes-validate (the test extra)"
)

ROOT = Path(__file__).resolve().parents[2]
MANIFESTS = ROOT / "deploy" / "kubernetes"
# The oldest Kubernetes these manifests target, and the newest the validator knows.
KUBERNETES_VERSION = "1.30.0"
VERSIONS = (KUBERNETES_VERSION, kubernetes_validate.latest_version())
CUSTOM_KINDS = {"ServiceMonitor", "Kustomization"}


def documents() -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = {}
    for path in sorted(MANIFESTS.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                found[doc["kind"]] = doc
    return found


DOCS = documents()
DEPLOYMENT = DOCS["Deployment"]
POD = DEPLOYMENT["spec"]["template"]["spec"]
[CONTAINER] = POD["containers"]


def container_port(name: str) -> int:
    [port] = [p["containerPort"] for p in CONTAINER["ports"] if p["name"] == name]
    return int(port)


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize(
    "kind", sorted(k for k in DOCS if k not in CUSTOM_KINDS), ids=lambda kind: kind
)
def test_validates_against_the_kubernetes_schema(kind: str, version: str) -> None:
    kubernetes_validate.validate(DOCS[kind], version, strict=True)


def test_the_validator_rejects_an_unknown_field() -> None:
    broken = copy.deepcopy(DEPLOYMENT)
    broken["spec"]["template"]["spec"]["containers"][0]["readinessProbes"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


def test_every_kind_is_there() -> None:
    assert set(DOCS) == {
        "ConfigMap",
        "Secret",
        "Deployment",
        "Service",
        "PodDisruptionBudget",
        "HorizontalPodAutoscaler",
        "ServiceMonitor",
        "Kustomization",
    }
    listed = set(DOCS["Kustomization"]["resources"])
    assert listed == {p.name for p in MANIFESTS.glob("*.yaml")} - {"kustomization.yaml"}


def test_deployment_probes_resources_and_security() -> None:
    assert DEPLOYMENT["spec"]["replicas"] == 2
    assert CONTAINER["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "admin"}
    assert CONTAINER["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "admin"}
    resources = CONTAINER["resources"]
    assert {"cpu", "memory"} <= set(resources["requests"]) & set(resources["limits"])
    security = CONTAINER["securityContext"]
    assert security["runAsNonRoot"] is True and POD["securityContext"]["runAsNonRoot"] is True
    assert POD["securityContext"]["runAsUser"] != 0
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]


def test_config_comes_from_the_configmap_and_the_redis_url_from_the_secret() -> None:
    [mount] = [m for m in CONTAINER["volumeMounts"] if m["mountPath"] == "/etc/keygate"]
    [volume] = [v for v in POD["volumes"] if v["name"] == mount["name"]]
    configmap = DOCS["ConfigMap"]
    assert volume["configMap"]["name"] == configmap["metadata"]["name"]
    assert CONTAINER["args"] == ["serve", "--config", "/etc/keygate/gateway.yaml"]
    assert "gateway.yaml" in configmap["data"]

    [env] = [e for e in CONTAINER["env"] if e["name"] == "KEYGATE_REDIS_URL"]
    assert "url" in SECTION_KEYS["redis"]  # KEYGATE_REDIS_URL is an override keygate reads
    ref = env["valueFrom"]["secretKeyRef"]
    secret = DOCS["Secret"]
    assert ref["name"] == secret["metadata"]["name"]
    assert ref["key"] in secret["stringData"]


def test_configmap_gateway_yaml_is_accepted_by_keygate(tmp_path: Path) -> None:
    text = DOCS["ConfigMap"]["data"]["gateway.yaml"]
    path = tmp_path / "gateway.yaml"
    path.write_text(text)
    settings = load(path, environ={})
    assert settings.listen.port == container_port("http")
    assert settings.admin_listen.port == container_port("admin")
    assert settings.admin_listen.host not in ("127.0.0.1", "localhost", "::1")
    # With the Secret's URL as KEYGATE_REDIS_URL, as the pod runs it.
    secret_url = DOCS["Secret"]["stringData"]["redis-url"]
    overridden = load(path, environ={"KEYGATE_REDIS_URL": secret_url})
    assert overridden.redis.url == secret_url
    assert build(yaml.safe_load(text), tmp_path).routes


def test_service_pdb_and_hpa_select_the_deployment() -> None:
    labels = DEPLOYMENT["spec"]["template"]["metadata"]["labels"]
    service = DOCS["Service"]
    assert service["spec"]["selector"].items() <= labels.items()
    ports = {p["name"]: p for p in service["spec"]["ports"]}
    assert set(ports) == {"http", "admin"}
    for name, port in ports.items():
        assert port["targetPort"] == name and container_port(name)
    pdb = DOCS["PodDisruptionBudget"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["spec"]["minAvailable"] < DEPLOYMENT["spec"]["replicas"]
    hpa = DOCS["HorizontalPodAutoscaler"]
    assert hpa["apiVersion"] == "autoscaling/v2"
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", DEPLOYMENT["metadata"]["name"])
    [metric] = hpa["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu"
    assert hpa["spec"]["minReplicas"] >= 2


def test_servicemonitor_scrapes_metrics_on_the_admin_port() -> None:
    monitor = DOCS["ServiceMonitor"]
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["name"]
    service = DOCS["Service"]
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    )
    [endpoint] = monitor["spec"]["endpoints"]
    assert endpoint["port"] == "admin" and endpoint["path"] == "/metrics"
    assert "admin" in {p["name"] for p in service["spec"]["ports"]}
