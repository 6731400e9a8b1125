"""A redis.asyncio client for the configured server, Sentinel primary or Cluster."""

from __future__ import annotations

from typing import Any, TypeAlias

from redis.asyncio import Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff
from redis.exceptions import RedisClusterException, RedisError

from gateway.config.model import RedisSettings
from gateway.store.errors_text import describe as describe  # Redis failures in words
from gateway.store.topology import RedisTarget, parse_target

# The key store's client: redis-py's cluster client routes each command by its key's slot.
StoreClient: TypeAlias = Redis | RedisCluster
# What a failing key store raises: redis-py's errors, its cluster client's own (no node
# reachable, a slot no node serves), which are not RedisErrors, and socket errors.
STORE_ERRORS = (RedisError, RedisClusterException, OSError)


def connect(settings: RedisSettings, url: str) -> StoreClient:
    """Client for ``url`` (the embedded server's or the configured one), with timeouts.

    Timeouts bound every call, so a stalled Redis gives a fast error, never a hung request.
    """
    return client_for(parse_target(url, settings), settings)


def client_for(target: RedisTarget, settings: RedisSettings) -> StoreClient:
    options: dict[str, Any] = {
        # One retry: a pooled connection found dead is replaced (after a failover, say);
        # redis-py's default of ten with backoff turns a refused port into seconds.
        "retry": Retry(NoBackoff(), 1),
        "decode_responses": True,
        "socket_connect_timeout": settings.connect_timeout,
        "socket_timeout": settings.socket_timeout,
        "username": target.username,
        "password": target.password,
        **(target.tls.redis_py() if target.tls else {}),
    }
    if target.kind == "cluster":
        nodes = [ClusterNode(host, port) for host, port in target.hosts]
        return RedisCluster(startup_nodes=nodes, **options)
    options.update(health_check_interval=30, db=target.db)
    if target.kind == "sentinel":
        sentinel_options = {
            "retry": Retry(NoBackoff(), 1),
            "socket_connect_timeout": settings.connect_timeout,
            "socket_timeout": settings.socket_timeout,
            "username": target.sentinel_username,
            "password": target.sentinel_password,
            **(target.tls.redis_py() if target.tls else {}),
        }
        sentinel = Sentinel(list(target.hosts), sentinel_kwargs=sentinel_options)  # type: ignore[no-untyped-call, unused-ignore]
        primary: Redis = sentinel.master_for(target.service, redis_class=Redis, **options)
        return primary
    if target.path is not None:
        return Redis(unix_socket_path=target.path, **options)
    host, port = target.hosts[0]
    return Redis(host=host, port=port, **options)
