"""ORIGINAL_DST clusters (Istio's PassthroughCluster and InboundPassthroughCluster) through a
real proxy process.

Envoy (``ENVOY-SEMANTICS.md``, cluster ``type: ORIGINAL_DST``; envoyproxy.io "Original
destination" cluster docs): the upstream host is the connection's original destination, or,
with ``original_dst_lb_config.use_http_header``, the ``IP:port`` in ``x-envoy-original-dst-host``;
``lb_policy`` must be ``CLUSTER_PROVIDED``. meshlet captures no traffic, so without the header
the original destination is what the request names (docs/proxy.md): an outbound listener goes
to the authority, an inbound listener to its own IP at the authority's port.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler
from typing import Any

import pytest

from tests.integration.conftest import Proxy, Upstream, bootstrap, free_port, http_request


def passthrough(**extra: Any) -> dict[str, Any]:
    return {
        "name": "PassthroughCluster",
        "type": "ORIGINAL_DST",
        "lb_policy": "CLUSTER_PROVIDED",
        "connect_timeout": "1s",
        **extra,
    }


def recording_peer(up: Upstream) -> list[str]:
    """Make ``up`` answer 200 with its name and record each request's peer address."""
    peers: list[str] = []

    def answer(h: BaseHTTPRequestHandler) -> None:
        peers.append(h.client_address[0])
        body = up.name.encode()
        h.send_response(200)
        h.send_header("content-length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)

    up.override = answer
    return peers


def test_outbound_goes_where_the_authority_says(
    make_upstream: Callable[..., Upstream], start_proxy: Callable[..., Proxy]
) -> None:
    a, b = make_upstream("a"), make_upstream("b")
    proxy = start_proxy(bootstrap(clusters=[passthrough()]))
    for up in (a, b, a):
        # The explicit-proxy form, as an application with HTTP_PROXY sends it.
        got = subprocess.run(
            ["curl", "-s", "-x", f"127.0.0.1:{proxy.port}", f"http://127.0.0.1:{up.port}/x"],
            capture_output=True,
            timeout=10,
            check=True,
        )
        assert got.stdout.decode() == f"hello from {up.name}"
    assert [s.path for s in a.seen] == ["/x", "/x"]
    assert [s.path for s in b.seen] == ["/x"]
    stats = proxy.admin_get("/stats")[1]
    assert "cluster.PassthroughCluster.upstream_rq_200: 3" in stats


def test_a_request_without_a_usable_destination_gets_503(start_proxy: Callable[..., Proxy]) -> None:
    proxy = start_proxy(bootstrap(clusters=[passthrough()]))
    r = http_request(proxy.port, headers={"host": "bad:port"})
    assert r.status == 503
    assert r.body == b"no healthy upstream"


def test_the_header_names_the_destination_when_configured(
    make_upstream: Callable[..., Upstream], start_proxy: Callable[..., Proxy]
) -> None:
    up = make_upstream("target")
    recording_peer(up)
    config = passthrough(original_dst_lb_config={"use_http_header": True})
    proxy = start_proxy(bootstrap(clusters=[config]))
    r = http_request(
        proxy.port,
        headers={"host": "ignored:1", "x-envoy-original-dst-host": f"127.0.0.1:{up.port}"},
    )
    assert (r.status, r.body) == (200, b"target")
    # Envoy accepts only IP:port there: a name is no destination.
    r = http_request(proxy.port, headers={"x-envoy-original-dst-host": f"localhost:{up.port}"})
    assert r.status == 503


def test_inbound_keeps_its_own_ip_and_binds_the_source_address(
    make_upstream: Callable[..., Upstream], start_proxy: Callable[..., Proxy]
) -> None:
    """Istio's InboundPassthroughCluster connects from 127.0.0.6 (upstream_bind_config), so the
    application can tell the sidecar's traffic from its own; the destination is the sidecar's
    own IP at the port the request names."""
    up = make_upstream("app")
    peers = recording_peer(up)
    config = passthrough(
        name="InboundPassthroughCluster",
        upstream_bind_config={"source_address": {"address": "127.0.0.6", "port_value": 0}},
    )
    listener_port = free_port()
    cfg = bootstrap(clusters=[config], listener_port=listener_port)
    cfg["static_resources"]["listeners"][0]["traffic_direction"] = "INBOUND"
    proxy = start_proxy(cfg)
    r = http_request(proxy.port, headers={"host": f"some-service.default:{up.port}"})
    assert (r.status, r.body) == (200, b"app")
    assert peers == ["127.0.0.6"]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"lb_policy": "ROUND_ROBIN"}, "lb_policy: must be CLUSTER_PROVIDED"),
        (
            {"original_dst_lb_config": {"use_http_header": True, "upstream_port_override": 8}},
            "original_dst_lb_config.upstream_port_override",
        ),
        (
            {"upstream_bind_config": {"source_address": {"address": "nope", "port_value": 0}}},
            "upstream_bind_config.source_address.address: 'nope' is not an IP address",
        ),
    ],
)
def test_bad_original_dst_configuration_is_refused_by_field(
    extra: dict[str, Any], message: str, start_proxy: Callable[..., Proxy], tmp_path: Any
) -> None:
    import json
    import sys

    path = tmp_path / "bad.json"
    path.write_text(json.dumps(bootstrap(clusters=[passthrough(**extra)])))
    got = subprocess.run(
        [sys.executable, "-m", "meshlet", "proxy", "-c", str(path)],
        capture_output=True,
        timeout=30,
    )
    assert got.returncode == 2
    assert message in got.stderr.decode()
