"""The upstream connection pool: keep-alive reuse, max_requests_per_connection, idle timeout.

ENVOY-SEMANTICS §6 (HTTP/1.1 pool, Envoy's connection_pooling.rst): one request at a time per
connection, connections reused; ``max_requests_per_connection`` closes a connection after that
many requests; the cluster's ``common_http_protocol_options.idle_timeout`` closes idle ones.
"""

from __future__ import annotations

import time
from http.server import BaseHTTPRequestHandler

from tests.integration.conftest import bootstrap, cluster, http_request


def _recording_ports(upstream) -> list[int]:
    """Make the upstream answer 200 and record the client port (the proxy's connection)."""
    ports: list[int] = []

    def answer(handler: BaseHTTPRequestHandler) -> None:
        ports.append(handler.client_address[1])
        handler.send_response(200)
        handler.send_header("content-length", "2")
        handler.end_headers()
        handler.wfile.write(b"ok")

    upstream.override = answer
    return ports


def test_sequential_requests_reuse_one_upstream_connection(upstream, start_proxy):
    ports = _recording_ports(upstream)
    proxy = start_proxy(bootstrap(clusters=[cluster("web", upstream.port)]))
    for _ in range(5):
        assert http_request(proxy.port, "/").status == 200
    assert len(ports) == 5
    assert len(set(ports)) == 1


def test_max_requests_per_connection_opens_a_new_connection_after_the_limit(upstream, start_proxy):
    ports = _recording_ports(upstream)
    web = cluster("web", upstream.port, max_requests_per_connection=2)
    proxy = start_proxy(bootstrap(clusters=[web]))
    for _ in range(5):
        assert http_request(proxy.port, "/").status == 200
    # requests 1-2, 3-4 and 5 each on their own connection
    assert [ports.index(p) for p in ports] == [0, 0, 2, 2, 4]


def test_an_idle_upstream_connection_is_closed_after_the_idle_timeout(upstream, start_proxy):
    ports = _recording_ports(upstream)
    web = cluster("web", upstream.port, common_http_protocol_options={"idle_timeout": "0.3s"})
    proxy = start_proxy(bootstrap(clusters=[web]))
    assert http_request(proxy.port, "/").status == 200
    assert http_request(proxy.port, "/").status == 200  # within the timeout: reused
    time.sleep(1.0)
    assert http_request(proxy.port, "/").status == 200  # after it: a new connection
    assert ports[0] == ports[1]
    assert ports[2] != ports[0]
    stats = proxy.admin_get("/stats")[1]
    assert "cluster.web.upstream_cx_total: 2" in stats
