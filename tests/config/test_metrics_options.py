"""metrics.listen and metrics.on_proxy: defaults, values, refusals, environment overrides."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.config.load import ConfigError, build, load

BASE = Path("/srv/keygate")


def test_metrics_are_on_the_admin_listener_only_by_default() -> None:
    s = load(None, environ={})
    assert (s.metrics.listen, s.metrics.on_proxy) == (None, False)


def test_a_metrics_listener_and_the_proxy_option_are_read() -> None:
    s = build({"metrics": {"listen": "10.0.0.5:9464", "on_proxy": True}}, BASE)
    assert s.metrics.listen is not None
    assert (s.metrics.listen.host, s.metrics.listen.port) == ("10.0.0.5", 9464)
    assert s.metrics.on_proxy is True


@pytest.mark.parametrize(
    ("raw", "field"),
    [({"listen": "nowhere"}, "metrics.listen"), ({"listen": 9464}, "metrics.listen")],
)
def test_a_bad_metrics_listener_is_refused_by_name(raw: dict[str, object], field: str) -> None:
    with pytest.raises(ConfigError) as info:
        build({"metrics": raw}, BASE)
    assert len(info.value.problems) == 1
    assert info.value.problems[0].startswith(f"{field}: ")


def test_on_proxy_must_be_a_boolean() -> None:
    with pytest.raises(ConfigError) as info:
        build({"metrics": {"on_proxy": "sometimes"}}, BASE)
    assert info.value.problems == ["metrics.on_proxy: must be true or false"]


def test_environment_sets_the_metrics_options() -> None:
    s = load(
        None,
        environ={"KEYGATE_METRICS_LISTEN": "127.0.0.1:9464", "KEYGATE_METRICS_ON_PROXY": "true"},
    )
    assert s.metrics.listen is not None and s.metrics.listen.port == 9464
    assert s.metrics.on_proxy is True
