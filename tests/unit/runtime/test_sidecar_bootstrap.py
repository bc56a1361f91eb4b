"""A sidecar's (and gateway's) bootstrap serves metrics where Istio's does: the static
listener ``envoy-prometheus`` on ``<pod IP>:15090`` routes ``/stats/prometheus`` to the static
cluster ``prometheus_stats``, the proxy's own admin (Istio's ``envoy_bootstrap.json``), and
counts no Istio request itself."""

from __future__ import annotations

import json

import pytest

from meshlet.proxy.bootstrap import parse_bootstrap
from meshlet.proxy.config import compile_bootstrap
from meshlet.proxy.headers import Headers, RequestHead
from meshlet.runtime.sidecar import (
    ADMIN_PORT,
    PROMETHEUS_CLUSTER,
    PROMETHEUS_LISTENER,
    PROMETHEUS_PORT,
    ProxyNode,
    proxy_bootstrap,
)


@pytest.mark.parametrize("router", [False, True])
def test_the_prometheus_listener_routes_to_the_admin_and_counts_nothing(router):
    node = ProxyNode(pod="web-1", namespace="default", ip="127.1.2.3", workload="web",
                     labels={"app": "web", "version": "v1"}, router=router)  # fmt: skip
    loaded = parse_bootstrap(json.dumps(proxy_bootstrap(node, "127.0.0.1:15010")), "b")
    config = compile_bootstrap(loaded.message)
    (listener,) = config.listeners
    assert (listener.name, listener.host, listener.port) == (
        PROMETHEUS_LISTENER,
        "127.1.2.3",
        PROMETHEUS_PORT,
    )
    head = RequestHead(
        method=b"GET", path=b"/stats/prometheus", authority=b"127.1.2.3:15090", headers=Headers()
    )
    selection = listener.hcm.route_table.select(head)
    assert selection is not None and selection.route is not None
    clusters = {c.name: c for c in config.clusters}
    (endpoint,) = clusters[PROMETHEUS_CLUSTER].endpoints
    assert (endpoint.address, endpoint.port) == ("127.1.2.3", ADMIN_PORT)
    stats = listener.hcm.istio_stats
    assert stats is not None and all(plan.drop for plan in stats.plans)
    # The node says what the metrics (and the peers, through the exchange) name it by.
    assert config.node_info.cluster_id == "Kubernetes"
    assert config.node_info.app == "web"
