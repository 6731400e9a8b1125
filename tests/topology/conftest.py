"""Real topologies for tests: a Redis Cluster, a Sentinel group, a TLS front.

``cluster`` is started once per session (three primaries, no replicas); a test that moves
slots should move them back. ``sentinel_group`` is fresh for every test, since tests kill
its primary. ``tls_front`` (and ``make_tls_front``, for one that requires a client cert)
put a TLS-terminating proxy in front of the session's server (``redis_url``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

# The proxy tests' fixtures (a real upstream, gateways built in-process), for gateways whose
# Redis is one of these topologies: a test module overrides ``redis_url`` to point there.
from tests.proxy.conftest import (  # noqa: F401
    cost_gateway,
    cost_upstream_url,
    gateway,
    http,
    serve_app,
    start_cost_gateway,
    start_gateway,
    upstream,
)
from tests.topologies import (
    Address,
    ClusterTopology,
    SentinelTopology,
    TlsFront,
    start_cluster,
    start_sentinel_group,
    start_tls_front,
    target_of_url,
)

MakeTlsFront = Callable[..., TlsFront]


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterTopology]:
    with start_cluster(tmp_path_factory.mktemp("cluster"), primaries=3) as topology:
        yield topology


@pytest.fixture
def sentinel_group(tmp_path: Path) -> Iterator[SentinelTopology]:
    with start_sentinel_group(tmp_path / "sentinel") as topology:
        yield topology


@pytest.fixture
def make_tls_front(redis_url: str, tmp_path: Path) -> Iterator[MakeTlsFront]:
    """``make_tls_front(require_client_cert=False, target=None)``: a started TlsFront, in
    front of the session's server unless ``target`` says otherwise; all stopped after."""
    fronts: list[TlsFront] = []

    def make(*, require_client_cert: bool = False, target: Address | str | None = None) -> TlsFront:
        if target is None:
            try:
                target = target_of_url(redis_url)
            except ValueError as exc:
                pytest.skip(str(exc))
        front = start_tls_front(
            target, tmp_path / f"tls-front-{len(fronts)}", require_client_cert=require_client_cert
        )
        fronts.append(front)
        return front

    try:
        yield make
    finally:
        for front in fronts:
            front.close()


@pytest.fixture
def tls_front(make_tls_front: MakeTlsFront) -> TlsFront:
    return make_tls_front()
