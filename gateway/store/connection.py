"""A redis.asyncio client for the configured server."""

from __future__ import annotations

from redis.asyncio import Redis

from gateway.config.model import RedisSettings


def connect(settings: RedisSettings, url: str) -> Redis:
    """Client for ``url`` (the embedded server's or the configured one), with timeouts.

    Timeouts bound every call, so a stalled Redis gives a fast error, never a hung request.
    """
    return Redis.from_url(
        url,
        decode_responses=True,
        socket_connect_timeout=settings.connect_timeout,
        socket_timeout=settings.socket_timeout,
        health_check_interval=30,
        retry_on_timeout=False,
    )
