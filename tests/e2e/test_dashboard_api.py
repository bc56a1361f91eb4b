"""The dashboard's API on a whole mesh (issue 6): ``meshlet up -d`` with the demo's Bookinfo
manifests on free ports, traffic through the gateway, then the API as the UI and
``meshlet stat`` read it -- Bookinfo's workloads with their golden signals, the graph of
Istio's Bookinfo architecture (istio.io/latest/docs/examples/bookinfo/: productpage calls
details and reviews, reviews v2 and v3 call ratings), traces of whole requests, the
configuration and every proxy's sync state.
"""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from meshlet.demo import manifest
from tests.e2e.conftest import Load, Mesh, start_mesh, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))
BOOKINFO = {"productpage-v1", "details-v1", "reviews-v1", "reviews-v2", "reviews-v3", "ratings-v1"}


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    files = [manifest(n) for n in ("bookinfo.yaml", "gateway.yaml", "destination-rules.yaml")]
    running = start_mesh(
        tmp_path_factory.mktemp("dashboard-api"),
        *files,
        extra=("--trace-sampling", "100", "--scrape-interval", "1"),
    )
    try:
        with Load(running.browser(), interval=0.05) as load:
            wait_until("Bookinfo pages", lambda: len(load.pages) >= 40, timeout=120)
        assert not load.failures, load.failures[:3]
        yield running
    finally:
        running.down()


def _api(mesh: Mesh, path: str) -> Any:
    assert mesh.dashboard, "mesh.json names no dashboard"
    with _DIRECT.open(mesh.dashboard + path, timeout=30) as r:
        assert r.headers["content-type"] == "application/json"
        return json.loads(r.read())


def _busy_workloads(mesh: Mesh) -> dict[str, dict[str, Any]] | None:
    rows = {r["name"]: r for r in _api(mesh, "/api/workloads?window=300")["rows"]}
    if all(rows.get(name, {}).get("requests") for name in BOOKINFO):
        return rows
    return None


def test_workloads_list_bookinfo_with_golden_signals(mesh: Mesh) -> None:
    rows = wait_until("every Bookinfo workload's traffic", lambda: _busy_workloads(mesh), 60)
    for name in BOOKINFO:
        row = rows[name]
        assert row["namespace"] == "default" and row["app"] == name.split("-v")[0]
        assert row["rps"] > 0 and row["success_rate"] == 1.0, row
        assert row["p50_ms"] is not None and row["p50_ms"] <= row["p99_ms"], row
        assert row["mtls_ratio"] == 1.0, row  # `meshlet up` turns mutual TLS on
    gateway = rows["istio-ingressgateway"]
    assert gateway["rps"] == 0 and gateway["outbound_rps"] > 0
    assert rows["productpage-v1"]["outbound_rps"] > 0


def test_the_graph_is_bookinfos_architecture(mesh: Mesh) -> None:
    wait_until("every Bookinfo workload's traffic", lambda: _busy_workloads(mesh), 60)
    graph = _api(mesh, "/api/graph?window=300")
    edges = {(e["source"], e["target"]): e for e in graph["edges"]}
    for hop in (
        ("workload:istio-system/istio-ingressgateway", "service:default/productpage"),
        ("service:default/productpage", "workload:default/productpage-v1"),
        ("workload:default/productpage-v1", "service:default/details"),
        ("workload:default/productpage-v1", "service:default/reviews"),
        ("service:default/reviews", "workload:default/reviews-v1"),
        ("service:default/reviews", "workload:default/reviews-v2"),
        ("service:default/reviews", "workload:default/reviews-v3"),
        ("workload:default/reviews-v2", "service:default/ratings"),
        ("workload:default/reviews-v3", "service:default/ratings"),
        ("service:default/ratings", "workload:default/ratings-v1"),
    ):
        assert hop in edges, (hop, sorted(edges))
        assert edges[hop]["health"] == "healthy" and edges[hop]["mtls"], edges[hop]
    # reviews v1 calls no one (Bookinfo: "v1 doesn't call the ratings service").
    assert not [k for k in edges if k[0] == "workload:default/reviews-v1"]
    ids = {n["id"] for n in graph["nodes"]}
    assert "workload:default/ratings-v1" in ids and "service:default/details" in ids


EVERY_HOP = {
    "istio-ingressgateway.istio-system",
    "productpage.default",
    "details.default",
    "reviews.default",
    "ratings.default",
}


def _whole_trace(mesh: Mesh) -> dict[str, Any] | None:
    """A trace that reached ratings, once every proxy on its way has exported its spans of it
    (each proxy exports in batches of its own, so a trace fills up hop by hop)."""
    for row in _api(mesh, "/api/traces?service=ratings.default&limit=50")["traces"]:
        if set(row["services"]) == EVERY_HOP:
            return dict(row)
    return None


def test_traces_follow_a_request_through_every_hop(mesh: Mesh) -> None:
    row = wait_until("a trace through every hop", lambda: _whole_trace(mesh), 30)
    assert row["root_service"] == "istio-ingressgateway.istio-system"
    assert row["span_count"] == 8  # a server span per hop, a client span per call (4 + 4)
    trace = _api(mesh, f"/api/traces/{row['trace_id']}")
    spans = trace["spans"]
    ids = {s["span_id"] for s in spans}
    assert sum(1 for s in spans if s["parent_span_id"] == "") == 1
    assert all(s["parent_span_id"] in ids for s in spans if s["parent_span_id"])


def test_summary_config_and_prometheus_targets_describe_the_mesh(mesh: Mesh) -> None:
    summary = _api(mesh, "/api/summary")
    assert summary["source"] == "embedded" and summary["targets"] == 7
    assert summary["scrape_interval_s"] == 1.0 and summary["traces"] > 0
    assert summary["mesh"]["api"] == mesh.server
    config = _api(mesh, "/api/config")
    kinds = {o["kind"] for o in config["namespaces"]["default"]}
    assert {"Deployment", "Service", "DestinationRule", "VirtualService", "Gateway"} <= kinds
    assert config["findings"] == []
    assert len(config["proxies"]) == 7
    assert all(
        t["state"] in ("SYNCED", "NOT SENT") for p in config["proxies"] for t in p["sync"].values()
    )
    targets = _api(mesh, "/api/prometheus-targets")
    assert {t["labels"]["workload"] for t in targets} == BOOKINFO | {"istio-ingressgateway"}
    assert all(t["targets"][0].endswith(":15090") for t in targets)
    status = mesh.meshlet("status").stdout
    assert f"dashboard: {mesh.dashboard}/" in status
