"""Where keygate's Redis is, as the store's clients import it.

The parsing is the configuration's (gateway/config/topology.py): ``keygate check-config``
validates ``redis.url`` with the same code that the admin side's redis-py client and the
proxy's multiplexer connect with, so the three always agree.
"""

from gateway.config.topology import SCHEMES, SENTINEL_PORT, Kind, RedisTarget, Tls, parse_target

__all__ = ["SCHEMES", "SENTINEL_PORT", "Kind", "RedisTarget", "Tls", "parse_target"]
