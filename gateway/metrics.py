"""Every Prometheus metric keygate exports, in one place, with closed label sets.

Label values come only from closed sets: route names from the config (plus ``none`` for a
request no route matched, and ``dialect:<name>``/``own_key`` for keygate's own
endpoints), a fixed list of methods (else ``other``), status classes, outcomes
(gateway/errors.py), upstream names and error kinds. Key ids appear only with
``metrics.per_key: true``, capped at ``metrics.per_key_max`` keys (the rest are ``other``).

The proxy's hot path costs a dict lookup for the request's label children (resolved once
per distinct label set) and a few increments; nothing is computed per scrape but the
exposition itself.

With ``PROMETHEUS_MULTIPROC_DIR`` set (prometheus-client's multiprocess mode, for several
processes on one host; ``keygate serve --workers N`` sets it for its workers), counters and
histograms live in per-process files that the exposition sums: counters add up across
processes, and a restarted process's totals stay in its old file.
"""

from __future__ import annotations

import os
import platform
from typing import Any, Final

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.multiprocess import MultiProcessCollector

import gateway
from gateway.store.record import MICRO

METHODS: Final = frozenset(("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"))
NO_ROUTE = "none"
OWN_KEY = "own_key"
OTHER = "other"
# Seconds: a proxied request is a few ms; an upstream (an LLM) may take minutes.
LATENCY_BUCKETS: Final = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300,
)  # fmt: skip
ADDED_BUCKETS: Final = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1,
)  # fmt: skip
REDIS_BUCKETS: Final = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.25, 1)


# The *_created series double every counter's and histogram's series for a timestamp
# Prometheus does not need (it tracks resets itself).
disable_created_metrics()  # type: ignore[no-untyped-call]


def multiprocess_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


class Metrics:
    """keygate's metrics on a registry of their own (one per proxy, so tests stay apart)."""

    def __init__(self, *, per_key: bool = False, per_key_max: int = 1000) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "keygate_requests",
            "Requests on the proxy listener, by route, method, status class and outcome.",
            ("route", "method", "status_class", "outcome"),
            registry=r,
        )
        self.duration = Histogram(
            "keygate_request_duration_seconds",
            "Whole request time on the proxy listener, from the request head to the end "
            "of the response.",
            ("route",),
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.upstream_duration = Histogram(
            "keygate_upstream_duration_seconds",
            "Time spent on the upstream exchange, from sending the request to the end of "
            "the upstream's answer (forwarded requests only).",
            ("route",),
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.added = Histogram(
            "keygate_added_latency_seconds",
            "keygate's own share of a forwarded request: whole time minus upstream time.",
            ("route",),
            buckets=ADDED_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge(
            "keygate_requests_in_flight",
            "Requests being handled on the proxy listener.",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.upstream_errors = Counter(
            "keygate_upstream_errors",
            "Upstream exchanges that failed, by upstream and kind: connect (could not "
            "connect), timeout (connect, idle-read or total), closed (reset or closed "
            "before the answer was whole), invalid (not HTTP).",
            ("upstream", "kind"),
            registry=r,
        )
        self.redis_duration = Histogram(
            "keygate_redis_call_duration_seconds",
            "Redis calls on the request path, by call (authorize: the one call that "
            "decides a request; settle: recording a response's cost).",
            ("call",),
            buckets=REDIS_BUCKETS,
            registry=r,
        )
        self.redis_errors = Counter(
            "keygate_redis_errors",
            "Redis calls that failed (connection lost, timeout, error reply), by call.",
            ("call",),
            registry=r,
        )
        self.fail_open = Counter(
            "keygate_fail_open",
            "Requests let through unchecked because the key store was unavailable "
            "(redis.on_error: fail_open only).",
            registry=r,
        )
        self.redis_unreplicated = Counter(
            "keygate_redis_unreplicated_batches",
            "Batches of Redis commands that fewer replicas than redis.replica_acks confirmed "
            "within redis.replica_ack_timeout (a failover then could lose them).",
            registry=r,
        )
        self.settlements_lost = Counter(
            "keygate_settlements_lost",
            "Cost settlements given up after retrying until their lease ended (the ledger "
            "resolves their reservation per reservations.on_expiry).",
            registry=r,
        )
        self.reservations_expired = Counter(
            "keygate_reservations_expired",
            "Reservations whose lease ended unsettled (their process died, or their settlement "
            "never got through), by resolution: charge or refund (reservations.on_expiry).",
            ("resolution",),
            registry=r,
        )
        self.tokens = Counter(
            "keygate_tokens",
            "Tokens of LLM answers, by route, model (a priced model's name; 'other' for "
            "any other) and kind: input, output, cache_read, cache_write, reasoning.",
            ("route", "model", "kind"),
            registry=r,
        )
        self.client_connections = Gauge(
            "keygate_client_connections",
            "Client connections open, by listener (proxy, admin, metrics).",
            ("listener",),
            registry=r,
            multiprocess_mode="livesum",
        )
        self.client_connections_max = Gauge(
            "keygate_client_connections_max",
            "The most client connections a listener holds (its cap), by listener.",
            ("listener",),
            registry=r,
            multiprocess_mode="livesum",
        )
        self.client_refused = Counter(
            "keygate_client_connections_refused",
            "Client connections closed at once because their listener held its cap "
            "(client.max_connections on the proxy listener, 64 on admin and metrics).",
            ("listener",),
            registry=r,
        )
        self.client_timeouts = Counter(
            "keygate_client_timeouts",
            "Client connections closed for slowness, by listener and phase: head (no "
            "whole request head within client.header_timeout), idle (no request within "
            "client.keepalive_timeout), body (a request body stalled: 408 or cut off).",
            ("listener", "phase"),
            registry=r,
        )
        self.key_requests = Counter(
            "keygate_key_requests",
            "Requests authorized per key (metrics.per_key only; keys past "
            'metrics.per_key_max are counted under key_id="other").',
            ("key_id", "key_name"),
            registry=r,
        )
        self.key_spend = Counter(
            "keygate_key_spend_credits",
            "Credits charged per key (metrics.per_key only; capped as keygate_key_requests).",
            ("key_id", "key_name"),
            registry=r,
        )
        self.keys = Gauge(
            "keygate_keys",
            "Keys per workspace, refreshed in the background (not per scrape).",
            ("workspace",),
            registry=r,
            multiprocess_mode="max",
        )
        self.build = Gauge(
            "keygate_build_info",
            "Always 1; the labels say which keygate and Python serve.",
            ("version", "python"),
            registry=r,
            multiprocess_mode="max",
        )
        self.build.labels(gateway.__version__, platform.python_version()).set(1)
        self.per_key = per_key
        self.per_key_max = per_key_max
        self._requests: dict[tuple[str, str, int, str], Any] = {}
        self._timings: dict[str, tuple[Any, Any, Any]] = {}
        self._keys: dict[str, tuple[Any, Any]] = {}  # the first per_key_max keys seen
        self._keys_other: tuple[Any, Any] | None = None
        self._workspaces: set[str] = set()  # the keygate_keys series set
        self.authorize_duration = self.redis_duration.labels("authorize")
        self.settle_duration = self.redis_duration.labels("settle")

    def exposition(self) -> bytes:
        """The text format for a scrape: this process's registry, or with several workers
        every worker's files summed."""
        directory = multiprocess_dir()
        if directory is None:
            return generate_latest(self.registry)
        merged = CollectorRegistry()
        MultiProcessCollector(merged, path=directory)  # type: ignore[no-untyped-call]
        return generate_latest(merged)

    # --- the hot path: label children resolved once per distinct label set --------------

    def request(
        self,
        route: str,
        method: str,
        status: int,
        outcome: str,
        total_s: float,
        upstream_s: float | None,
    ) -> None:
        """One finished request on the proxy listener."""
        if method not in METHODS:
            method = OTHER
        labels = (route, method, status, outcome)
        counter = self._requests.get(labels)
        if counter is None:
            status_class = f"{min(max(status // 100, 1), 5)}xx"
            counter = self.requests.labels(route, method, status_class, outcome)
            self._requests[labels] = counter
        counter.inc()
        timings = self._timings.get(route)
        if timings is None:
            timings = (
                self.duration.labels(route),
                self.upstream_duration.labels(route),
                self.added.labels(route),
            )
            self._timings[route] = timings
        timings[0].observe(total_s)
        if upstream_s is not None:
            timings[1].observe(upstream_s)
            timings[2].observe(max(0.0, total_s - upstream_s))

    def key_used(self, key_id: str, name: str | None, cost_micro: int) -> None:
        """A request authorized for a key, and what it was charged (per_key only)."""
        children = self._keys.get(key_id)
        if children is None:
            if len(self._keys) < self.per_key_max:
                children = self._keys[key_id] = self._key_children(key_id, name or "")
            else:  # past the cap: one series for every other key
                if self._keys_other is None:
                    self._keys_other = self._key_children(OTHER, OTHER)
                children = self._keys_other
        children[0].inc()
        if cost_micro:
            children[1].inc(cost_micro / MICRO)

    def _key_children(self, key_id: str, name: str) -> tuple[Any, Any]:
        return self.key_requests.labels(key_id, name), self.key_spend.labels(key_id, name)

    def tokens_used(self, route: str, model: str, counts: dict[str, int]) -> None:
        """An LLM answer's tokens by kind (input, output, cache_read, cache_write,
        reasoning); ``model`` is already bounded (a priced model's name, or other)."""
        for kind, count in counts.items():
            if count:
                self.tokens.labels(route, model, kind).inc(count)

    def upstream_error(self, upstream: str, kind: str) -> None:
        self.upstream_errors.labels(upstream, kind).inc()

    def set_key_counts(self, counts: dict[str, int]) -> None:
        """Keys per workspace, as last counted; workspaces gone since are dropped."""
        for workspace in self._workspaces - counts.keys():
            self.keys.remove(workspace)
        for workspace, count in counts.items():
            self.keys.labels(workspace).set(count)
        self._workspaces = set(counts)
