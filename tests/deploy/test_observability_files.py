"""deploy/prometheus and deploy/grafana: the files parse, have the shape Prometheus and
Grafana expect, and every metric and label they name is one keygate exports.

The metric catalogue is the real exposition of ``gateway.metrics.Metrics()``, so renaming
a metric or a label there fails here until the alert rules and the dashboard follow.
promtool checks run when promtool is on PATH (Debian: ``apt-get install prometheus``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.parser import text_string_to_metric_families

from gateway.metrics import Metrics

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
PROMETHEUS_YML = DEPLOY / "prometheus" / "prometheus.yml"
ALERTS_YML = DEPLOY / "prometheus" / "alerts.yml"
DASHBOARD = DEPLOY / "grafana" / "keygate.json"

# Labels Prometheus attaches to every scraped series; `up` is the scrape's own series.
TARGET_LABELS = frozenset({"job", "instance"})
SYNTHETIC = {"up": TARGET_LABELS}
METRIC_NAME = re.compile(r"\bkeygate_[a-z_]+")
SELECTOR = re.compile(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\s*\{([^}]*)\}")
MATCHER = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)\s*\"")
GROUPING = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")
TEMPLATE_LABEL = re.compile(r"\$labels\.([a-zA-Z_][a-zA-Z0-9_]*)|\{\{\s*([a-zA-Z_]\w*)\s*\}\}")
PROMQL_WORDS = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right"})


def exposed_series() -> dict[str, frozenset[str]]:
    """Every series name ``Metrics()`` exposes (X_total, X_bucket, ...) -> its label names.

    Each labelled metric gets one child first, since a labelled metric without children
    exposes no samples; the names and labels then come from the parsed text format.
    """
    metrics = Metrics(per_key=True)
    for metric in vars(metrics).values():
        # prometheus_client keeps a metric's label names only on its wrapper; a child
        # (labels already bound, e.g. a cached one) is skipped.
        if isinstance(metric, MetricWrapperBase) and metric._labelnames and not metric._labelvalues:
            metric.labels(*("x" for _ in metric._labelnames))
    series: dict[str, set[str]] = {}
    families = text_string_to_metric_families(metrics.exposition().decode())
    for family in families:
        for sample in family.samples:
            series.setdefault(sample.name, set()).update(sample.labels)
    catalogue = {name: frozenset(labels) | TARGET_LABELS for name, labels in series.items()}
    return catalogue | SYNTHETIC


CATALOGUE = exposed_series()
# Family names (a histogram's X without _bucket/_sum/_count) may appear in prose only.
FAMILIES = frozenset(
    family.name for family in text_string_to_metric_families(Metrics().exposition().decode())
)


def load_yaml(path: Path) -> Any:
    with path.open() as f:
        return yaml.safe_load(f)


def alert_rules() -> list[dict[str, Any]]:
    return [rule for group in load_yaml(ALERTS_YML)["groups"] for rule in group["rules"]]


def dashboard() -> dict[str, Any]:
    with DASHBOARD.open() as f:
        result: dict[str, Any] = json.load(f)
    return result


def dashboard_targets() -> Iterator[tuple[str, dict[str, Any]]]:
    for panel in dashboard()["panels"]:
        for target in panel.get("targets", []):
            yield panel["title"], target


def metrics_in(expr: str) -> set[str]:
    names = set(METRIC_NAME.findall(expr))
    names.update(name for name, _ in SELECTOR.findall(expr) if name in SYNTHETIC)
    return names


def labels_of(expr: str) -> frozenset[str]:
    """The labels any metric in ``expr`` carries (what a grouping or legend may name)."""
    return frozenset().union(*(CATALOGUE.get(name, frozenset()) for name in metrics_in(expr)))


def label_problems(expr: str) -> list[str]:
    """Label names in ``expr``'s matchers and groupings that its metrics do not carry."""
    problems = []
    for name, matchers in SELECTOR.findall(expr):
        if name in PROMQL_WORDS:
            continue
        for label in MATCHER.findall(matchers):
            if label not in CATALOGUE.get(name, frozenset()):
                problems.append(f"{name}{{{label}=...}}")
    allowed = labels_of(expr)
    for grouping in GROUPING.findall(expr):
        for label in (part.strip() for part in grouping.split(",")):
            if label and label not in allowed:
                problems.append(f"by ({label})")
    return problems


def template_labels(text: str) -> set[str]:
    return {a or b for a, b in TEMPLATE_LABEL.findall(text)}


# --- structure ---------------------------------------------------------------------------


def test_prometheus_yml_scrapes_keygate_admin_listener() -> None:
    config = load_yaml(PROMETHEUS_YML)
    assert config["global"]["scrape_interval"] == "15s"
    assert config["rule_files"] == ["alerts.yml"]
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "keygate"]
    assert job["metrics_path"] == "/metrics"
    targets = [t for static in job["static_configs"] for t in static["targets"]]
    assert targets and all(re.fullmatch(r"[\w.-]+:\d+", t) for t in targets)


def test_alert_rules_have_expr_for_severity_and_annotations() -> None:
    groups = load_yaml(ALERTS_YML)["groups"]
    assert groups and all(group["name"] and group["rules"] for group in groups)
    for rule in alert_rules():
        assert set(rule) == {"alert", "expr", "for", "labels", "annotations"}, rule["alert"]
        assert re.fullmatch(r"\d+[smh]", rule["for"]), rule["alert"]
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}, rule["alert"]
        assert rule["annotations"]["summary"].strip(), rule["alert"]
        assert rule["annotations"]["description"].strip(), rule["alert"]


def test_alerts_cover_the_failure_modes() -> None:
    names = {rule["alert"] for rule in alert_rules()}
    assert {
        "KeygateDown",
        "KeygateRedisErrors",
        "KeygateHigh5xxRatio",
        "KeygateFailOpenInUse",
        "KeygateUpstreamErrors",
        "KeygateSettlementsLost",
        "KeygateKeysAtSpendingCap",
    } <= names
    (cap,) = [rule for rule in alert_rules() if rule["alert"] == "KeygateKeysAtSpendingCap"]
    assert 'outcome="spend_limited"' in cap["expr"]
    assert "keygate_key_spend_credits_total" in cap["annotations"]["description"]
    assert "/v1/keys/{id}/usage" in cap["annotations"]["description"]


def test_dashboard_structure() -> None:
    board = dashboard()
    assert 36 <= board["schemaVersion"] <= 41
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["DS_PROMETHEUS"]["query"] == "prometheus"
    ids = [panel["id"] for panel in board["panels"]]
    assert len(ids) == len(set(ids))
    for panel in board["panels"]:
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["expr"].strip() and target["refId"], panel["title"]
            assert target["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]


def test_dashboard_shows_latency_percentiles_and_spend_per_key() -> None:
    exprs = [target["expr"] for _, target in dashboard_targets()]
    for histogram in (
        "keygate_request_duration_seconds",
        "keygate_added_latency_seconds",
        "keygate_upstream_duration_seconds",
        "keygate_redis_call_duration_seconds",
    ):
        quantiles = {
            q
            for expr in exprs
            if f"{histogram}_bucket" in expr
            for q in re.findall(r"histogram_quantile\(([\d.]+)", expr)
        }
        assert quantiles == {"0.5", "0.95", "0.99"}, histogram
    assert any(
        expr.startswith("topk(") and "rate(keygate_key_spend_credits_total" in expr
        for expr in exprs
    )


# --- names and labels --------------------------------------------------------------------


def test_catalogue_is_the_exposition() -> None:
    # Guards the test itself: the names below are what gateway/metrics.py is documented to
    # expose, so a catalogue built wrongly cannot make every other check pass.
    for name in (
        "keygate_requests_total",
        "keygate_request_duration_seconds_bucket",
        "keygate_request_duration_seconds_count",
        "keygate_requests_in_flight",
        "keygate_fail_open_total",
        "keygate_key_spend_credits_total",
        "keygate_build_info",
    ):
        assert name in CATALOGUE
    assert "outcome" in CATALOGUE["keygate_requests_total"]
    assert "le" in CATALOGUE["keygate_added_latency_seconds_bucket"]


@pytest.mark.parametrize("path", [ALERTS_YML, DASHBOARD, PROMETHEUS_YML], ids=lambda p: p.name)
def test_every_metric_name_is_exposed(path: Path) -> None:
    # The whole file, so descriptions that send a reader to a metric name a real one too.
    unknown = set(METRIC_NAME.findall(path.read_text())) - set(CATALOGUE) - FAMILIES
    assert not unknown, f"{path.name} names metrics keygate does not expose: {sorted(unknown)}"


def test_alert_expressions_use_only_exposed_metrics_and_labels() -> None:
    for rule in alert_rules():
        expr = rule["expr"]
        assert metrics_in(expr), rule["alert"]
        assert metrics_in(expr) <= set(CATALOGUE), (rule["alert"], metrics_in(expr))
        assert not label_problems(expr), (rule["alert"], label_problems(expr))
        used = template_labels(rule["annotations"]["summary"])
        used |= template_labels(rule["annotations"]["description"])
        assert used <= labels_of(expr), (rule["alert"], used - labels_of(expr))


def test_dashboard_expressions_use_only_exposed_metrics_and_labels() -> None:
    for title, target in dashboard_targets():
        expr = target["expr"]
        assert metrics_in(expr), title
        assert metrics_in(expr) <= set(CATALOGUE), (title, metrics_in(expr))
        assert not label_problems(expr), (title, label_problems(expr))
        legend = template_labels(target.get("legendFormat", ""))
        assert legend <= labels_of(expr), (title, legend - labels_of(expr))
    for variable in dashboard()["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]["query"]
            match = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", query)
            assert match, query
            assert match[2] in CATALOGUE[match[1]], query


# --- promtool ----------------------------------------------------------------------------


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        if os.environ.get("CI") == "true":  # .ci/run installs it: missing there is a failure
            pytest.fail("promtool not on PATH (Debian package prometheus)")
        pytest.skip("promtool not on PATH; install Debian's `prometheus` package to run it")
    return path


def run_promtool(*args: str) -> None:
    done = subprocess.run(
        [promtool(), *args], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_promtool_check_rules() -> None:
    run_promtool("check", "rules", str(ALERTS_YML))


def test_promtool_check_config() -> None:
    run_promtool("check", "config", str(PROMETHEUS_YML))


SERIES = 'job="keygate", instance="keygate:8081"'
# Per rule: input series (one sample a minute), when to evaluate, what the expression
# returns then. The labels returned are the ones the rule's annotations template from.
EXPR_CASES: dict[str, tuple[list[tuple[str, str]], str, list[tuple[str, float]]]] = {
    "KeygateHigh5xxRatio": (
        [
            (
                f'keygate_requests_total{{{SERIES}, route="chat", method="POST", '
                'status_class="2xx", outcome="ok"}',
                "0+540x30",
            ),
            (
                f'keygate_requests_total{{{SERIES}, route="chat", method="POST", '
                'status_class="5xx", outcome="upstream_error"}',
                "0+60x30",
            ),
        ],
        "20m",
        [(f"{{{SERIES}}}", 0.1)],
    ),
    "KeygateKeysAtSpendingCap": (
        [
            (
                f'keygate_requests_total{{{SERIES}, route="chat", method="POST", '
                'status_class="4xx", outcome="spend_limited"}',
                "0+60x30",
            )
        ],
        "20m",
        [(f'{{{SERIES}, route="chat"}}', 1.0)],
    ),
    "KeygateRedisErrors": (
        [(f'keygate_redis_errors_total{{{SERIES}, call="authorize"}}', "0+30x30")],
        "20m",
        [(f'{{{SERIES}, call="authorize"}}', 0.5)],
    ),
    "KeygateFailOpenInUse": (
        [(f"keygate_fail_open_total{{{SERIES}}}", "0 0 0 0 0 0 0 0 0 0 5 5 5")],
        "12m",
        [(f"{{{SERIES}}}", 5.0)],
    ),
}


@pytest.mark.parametrize("alert", sorted(EXPR_CASES))
def test_promtool_alert_expression_fires_with_its_labels(alert: str, tmp_path: Path) -> None:
    (rule,) = [rule for rule in alert_rules() if rule["alert"] == alert]
    series, at, expected = EXPR_CASES[alert]
    tests = {
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [{"series": s, "values": v} for s, v in series],
                "promql_expr_test": [
                    {
                        "expr": rule["expr"],
                        "eval_time": at,
                        "exp_samples": [{"labels": lab, "value": val} for lab, val in expected],
                    }
                ],
            }
        ],
    }
    path = tmp_path / "alerts_test.yml"
    path.write_text(yaml.safe_dump(tests, sort_keys=False))
    run_promtool("test", "rules", str(path))
