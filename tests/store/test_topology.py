"""redis.url and the redis.* options: which topology, where, with which credentials and TLS."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from gateway.config.load import ConfigError, build
from gateway.config.topology import RedisTarget, parse_target


def target(url: str, **options: Any) -> RedisTarget:
    settings = build({"redis": {"url": url, **options}}, Path("/etc/keygate"))
    return parse_target(url, settings.redis)


def test_one_server_with_acl_user_password_and_database() -> None:
    t = target("redis://app:s%40cret@cache.internal:6380/2")
    assert (t.kind, t.hosts, t.db, t.username, t.password) == (
        "single",
        (("cache.internal", 6380),),
        2,
        "app",
        "s@cret",
    )
    assert t.auth_commands() == (("AUTH", "app", "s@cret"), ("SELECT", 2))
    assert "s@cret" not in repr(t) and "s@cret" not in str(t)


def test_options_override_the_urls_credentials() -> None:
    t = target("redis://:old@h:6379/0", username="svc", password="new")
    assert t.auth_commands() == (("AUTH", "svc", "new"),)


def test_sentinel_url_names_the_sentinels_the_primary_and_their_own_password() -> None:
    t = target("redis+sentinel://:pw@10.0.0.1,10.0.0.2:26380/payments/3?sentinel_password=sp")
    assert t.kind == "sentinel"
    assert t.hosts == (("10.0.0.1", 26379), ("10.0.0.2", 26380))  # 26379: Sentinel's port
    assert (t.service, t.db, t.password, t.sentinel_password) == ("payments", 3, "pw", "sp")


def test_cluster_by_url_or_by_option() -> None:
    by_url = target("rediss+cluster://a:7000,b:7001")
    assert (by_url.kind, by_url.hosts) == ("cluster", (("a", 7000), ("b", 7001)))
    assert by_url.tls is not None
    by_option = target("redis://seed:7000", cluster=True)
    assert (by_option.kind, by_option.hosts) == ("cluster", (("seed", 7000),))


def test_tls_files_from_options_are_relative_to_the_config_and_win_over_the_query() -> None:
    t = target(
        "rediss://h:6380/0?ssl_ca_certs=/q/ca.pem&ssl_check_hostname=false",
        tls_ca_file="certs/ca.pem",
        tls_cert_file="/abs/client.pem",
        tls_key_file="/abs/client.key",
    )
    assert t.tls is not None
    assert t.tls.ca_file == "/etc/keygate/certs/ca.pem"
    assert (t.tls.cert_file, t.tls.key_file) == ("/abs/client.pem", "/abs/client.key")
    assert t.tls.check_hostname is False
    assert target("redis://h:6379").tls is None


@pytest.mark.parametrize(
    ("options", "problem"),
    [
        (
            {"url": "redis+sentinel://s1:26379"},
            "redis.url: a redis+sentinel:// URL names the primary: .../<service name> "
            "(got 'redis+sentinel://s1:26379')",
        ),
        (
            {"url": "redis://a:1,b:2"},
            "redis.url: a redis:// URL names one server; for several use redis+sentinel:// "
            "or redis+cluster:// (got 'redis://a:1,b:2')",
        ),
        (
            {"url": "redis+cluster://a:7000/1"},
            "redis.url: a Redis Cluster has only database 0 (got 'redis+cluster://a:7000/1')",
        ),
        (
            {"url": "redis://:hunter2@h:99999"},
            "redis.url: a Redis URL port is out of range in 'h:99999' (got 'redis://:***@h:99999')",
        ),
        ({"cluster": True}, "redis.cluster: the embedded server is not a cluster: set redis.url"),
        (
            {"url": "rediss://h", "tls_key_file": "k.pem"},
            "redis.tls_key_file: needs redis.tls_cert_file (the certificate it belongs to)",
        ),
        ({"replica_acks": -1}, "redis.replica_acks: must be an integer >= 0"),
        ({"replica_ack_timeout": 0}, "redis.replica_ack_timeout: must be a finite number > 0"),
        (
            {"replica_acks": 1, "replica_ack_timeout": 2, "socket_timeout": 2},
            "redis.replica_ack_timeout: must be less than redis.socket_timeout",
        ),
    ],
)
def test_bad_topology_options_name_the_option_and_never_the_password(
    options: dict[str, Any], problem: str
) -> None:
    with pytest.raises(ConfigError) as failure:
        build({"redis": options}, Path("/etc/keygate"))
    assert failure.value.problems == [problem]
