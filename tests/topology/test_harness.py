"""The topology harness itself, checked with redis-py's synchronous clients."""

from __future__ import annotations

import uuid

import pytest
import redis
import redis.sentinel
from redis.backoff import NoBackoff
from redis.exceptions import AskError, MovedError
from redis.retry import Retry

from tests.topologies import ClusterTopology, SentinelTopology, TlsFront, connect
from tests.topology.conftest import MakeTlsFront

pytestmark = pytest.mark.timeout(120)


def unique(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:10]}:"


def test_cluster_serves_keys_in_every_slot_range(cluster: ClusterTopology) -> None:
    prefix = unique("kgt-cluster")
    keys = [f"{prefix}{n}" for n in range(30)]
    assert len({cluster.slot_of(k) for k in keys}) > 20
    assert len({cluster.owner_of(k) for k in keys}) == 3  # every primary serves some
    assert cluster.url == "redis+cluster://" + ",".join(f"{h}:{p}" for h, p in cluster.seeds)

    client = cluster.cluster_client()
    try:
        for n, key in enumerate(keys):
            assert client.set(key, n)
        assert [client.get(k) for k in keys] == [str(n) for n in range(len(keys))]
        for node in cluster.nodes:
            with node.client() as plain:
                assert plain.execute_command("CLUSTER", "INFO").startswith("cluster_state:ok")
        # Each key sits on the node owner_of names, and only there.
        key = keys[0]
        with connect(cluster.owner_of(key)) as owner:
            assert owner.get(key) == "0"
    finally:
        client.delete(*keys)
        client.close()


def test_migrate_slot_moves_keys_and_the_old_owner_answers_moved(cluster: ClusterTopology) -> None:
    prefix = unique("{kgt-migrate}")  # one hash tag: every key in the same slot
    moved_first, later = f"{prefix}first", f"{prefix}later"
    slot = cluster.slot_of(moved_first)
    source = cluster.owner_of(moved_first)
    target = next(a for a in cluster.seeds if a != source)
    client = cluster.cluster_client()
    try:
        client.set(moved_first, "1")
        client.set(later, "2")

        cluster.begin_migration(slot, target)
        cluster.move_key(moved_first)
        with connect(source) as old, connect(target) as new:
            # The ASK window: the moved key is asked for elsewhere, the other still served.
            with pytest.raises(AskError) as asked:
                old.get(moved_first)
            assert not isinstance(asked.value, MovedError)
            assert asked.value.node_addr == target
            assert old.get(later) == "2"
            with new.pipeline(transaction=False) as pipe:  # one connection: ASKING then GET
                assert pipe.execute_command("ASKING").get(moved_first).execute() == [True, "1"]
            assert client.get(moved_first) == "1"  # the cluster client follows ASK

        cluster.finish_migration(slot, target)
        assert cluster.owner_of(moved_first) == target
        with connect(source) as old, connect(target) as new:
            with pytest.raises(MovedError) as moved:
                old.get(later)
            assert moved.value.node_addr == target
            assert new.get(moved_first) == "1"
            assert new.get(later) == "2"
        assert client.get(later) == "2"  # the cluster client follows MOVED
    finally:
        client.delete(moved_first, later)
        client.close()
        if cluster.owner_of_slot(slot) != source:
            cluster.migrate_slot(slot, source)  # the session's cluster as it was
    assert cluster.owner_of_slot(slot) == source


def test_sentinel_group_fails_over_and_keeps_acknowledged_writes(
    sentinel_group: SentinelTopology,
) -> None:
    group = sentinel_group
    hosts = ",".join(f"{h}:{p}" for h, p in group.sentinels)
    assert group.url == f"redis+sentinel://{hosts}/keygate"
    old = group.primary_address()
    with connect(old) as primary:
        primary.set("kgt-sentinel:acked", "before the kill")
        assert primary.execute_command("WAIT", 1, 1000) == 1  # the replica has it

    assert group.kill_primary() == old
    new = group.wait_for_failover(old, every_sentinel=True)  # old comes back below
    assert new != old
    assert group.primary_address() == new

    sentinel = redis.sentinel.Sentinel(group.sentinels, socket_timeout=2)  # type: ignore[no-untyped-call]
    client = sentinel.master_for("keygate", decode_responses=True, socket_timeout=2)  # type: ignore[no-untyped-call]
    try:
        assert client.get("kgt-sentinel:acked") == "before the kill"
        assert client.set("kgt-sentinel:after", "1")
    finally:
        client.close()

    # The old primary comes back with its own data; the sentinels make it a replica.
    group.restart(old)
    group.wait_for_role(old, "slave")
    with connect(old) as replica:
        assert replica.execute_command("ROLE")[1:3] == list(new)
        assert replica.get("kgt-sentinel:acked") == "before the kill"


def test_tls_front_proxies_to_the_session_server(tls_front: TlsFront) -> None:
    key = unique("kgt-tls")
    client = redis.Redis(
        host="127.0.0.1",
        port=tls_front.port,
        ssl=True,
        ssl_ca_certs=str(tls_front.ca_file),
        decode_responses=True,
    )
    try:
        assert client.ping()
        assert client.set(key, "over tls")
        assert client.get(key) == "over tls"
    finally:
        client.delete(key)
        client.close()

    with redis.Redis.from_url(tls_front.url(), decode_responses=True) as by_url:
        assert by_url.ping()


def test_tls_front_requiring_a_client_cert_refuses_a_client_without_one(
    make_tls_front: MakeTlsFront,
) -> None:
    front = make_tls_front(require_client_cert=True)
    anonymous = redis.Redis(
        host="127.0.0.1",
        port=front.port,
        ssl=True,
        ssl_ca_certs=str(front.ca_file),
        retry=Retry(NoBackoff(), 0),
    )
    with pytest.raises(redis.ConnectionError):
        anonymous.ping()
    anonymous.close()

    with redis.Redis(
        host="127.0.0.1",
        port=front.port,
        ssl=True,
        ssl_ca_certs=str(front.ca_file),
        ssl_certfile=str(front.client_cert_file),
        ssl_keyfile=str(front.client_key_file),
    ) as with_cert:
        assert with_cert.ping()
    with redis.Redis.from_url(front.url()) as by_url:  # url() carries the client cert
        assert by_url.ping()
