"""The proxy started as a user starts it forwards a request and answers its admin endpoints."""

from __future__ import annotations

import urllib.request

from tests.integration.conftest import bootstrap, cluster


def test_proxy_forwards_a_request_to_its_cluster(upstream, start_proxy):
    proxy = start_proxy(bootstrap(clusters=[cluster("web", upstream.port)]))
    with urllib.request.urlopen(proxy.url + "/anything") as r:
        assert r.status == 200
        assert r.read() == b"hello from upstream"
    assert upstream.seen[0].path == "/anything"
    assert proxy.admin_get("/ready") == (200, "LIVE\n")
