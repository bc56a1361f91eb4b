"""The service graph, the workload and service tables and the time series, from Istio's
standard metrics (istio.io/latest/docs/reference/config/metrics/: ``reporter`` is
``source`` for the client's proxy and ``destination`` for the server's), with Kiali's health
thresholds (kiali.io/docs/configuration/health/: for HTTP 5xx, ``degraded: 0`` and
``failure: 10`` percent)."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import Any

import pytest

from meshlet.dashboard.golden import GoldenSignals, health
from meshlet.dashboard.metrics import DURATION_BUCKETS, REQUESTS, Group

WINDOW = 10.0


class FakeSource:
    """A ``MetricsSource`` over fixed increases: (metric, labels, increase per time)."""

    kind = "embedded"
    interval = 5.0

    def __init__(self, series: list[tuple[str, dict[str, str], float]]) -> None:
        self.series = series

    async def increase(
        self,
        metric: str,
        *,
        by: Sequence[str],
        match: Mapping[str, str],
        window: float,
        at: Sequence[float],
    ) -> dict[Group, list[float]]:
        out: dict[Group, list[float]] = {}
        for name, labels, value in self.series:
            if name != metric or any(labels.get(k) != v for k, v in match.items()):
                continue
            group = tuple(labels.get(k, "") for k in by)
            sums = out.setdefault(group, [0.0] * len(at))
            for i in range(len(at)):
                sums[i] += value
        return out


def _flow(
    reporter: str,
    source: str,
    service: str,
    destination: str,
    *,
    code: str = "200",
    mtls: bool = True,
    source_ns: str = "default",
) -> dict[str, str]:
    return {
        "reporter": reporter,
        "source_workload": source,
        "source_workload_namespace": source_ns if source != "unknown" else "unknown",
        "source_app": source.rsplit("-v", 1)[0],
        "source_version": "v1" if source.endswith("-v1") else "unknown",
        "destination_workload": destination,
        "destination_workload_namespace": "default" if destination != "unknown" else "unknown",
        "destination_app": destination.rsplit("-v", 1)[0]
        if destination != "unknown"
        else "unknown",
        "destination_version": destination.rsplit("-", 1)[-1] if "-v" in destination else "unknown",
        "destination_service_name": service,
        "destination_service_namespace": "default",
        "response_code": code,
        "connection_security_policy": "mutual_tls"
        if mtls and reporter == "destination"
        else "unknown",
    }


def _buckets(
    labels: dict[str, str], counts: dict[str, float]
) -> list[tuple[str, dict[str, str], float]]:
    return [(DURATION_BUCKETS, {**labels, "le": le}, n) for le, n in counts.items()]


GATEWAY = "istio-ingressgateway"


def _bookinfo() -> FakeSource:
    gw_pp = _flow("source", GATEWAY, "productpage", "productpage-v1", source_ns="istio-system")
    pp_in = _flow("destination", GATEWAY, "productpage", "productpage-v1", source_ns="istio-system")
    r1 = _flow("destination", "productpage-v1", "reviews", "reviews-v1")
    r1_err = _flow("destination", "productpage-v1", "reviews", "reviews-v1", code="503")
    r2 = _flow("destination", "productpage-v1", "reviews", "reviews-v2")
    r2_err = _flow("destination", "productpage-v1", "reviews", "reviews-v2", code="500")
    r2_src = _flow("source", "productpage-v1", "reviews", "reviews-v2")  # also reported by pp
    # No healthy upstream: the request never reached details, only the source saw it.
    details_uh = _flow("source", "productpage-v1", "details", "unknown", code="503")
    idle = _flow("destination", "reviews-v2", "ratings", "ratings-v1")
    stranger = _flow("destination", "unknown", "productpage", "productpage-v1", mtls=False)
    return FakeSource(
        [
            (REQUESTS, gw_pp, 100.0),
            (REQUESTS, pp_in, 100.0),
            (REQUESTS, r1, 90.0),
            (REQUESTS, r1_err, 10.0),
            (REQUESTS, r2, 99.0),
            (REQUESTS, r2_err, 1.0),
            (REQUESTS, r2_src, 1000.0),  # ignored: the destination reported this edge
            (REQUESTS, details_uh, 5.0),
            (REQUESTS, idle, 0.0),
            (REQUESTS, stranger, 10.0),
            *_buckets(r1, {"5": 50.0, "10": 100.0, "+Inf": 100.0}),
            *_buckets(r1_err, {"5": 0.0, "10": 0.0, "+Inf": 0.0}),
        ]
    )


def _graph() -> dict[str, Any]:
    signals = GoldenSignals(_bookinfo(), clock=lambda: 1000.0)
    return asyncio.run(signals.graph(WINDOW))


@pytest.mark.parametrize(
    ("rps", "error_rate", "expected"),
    [
        (0.0, 0.0, "idle"),
        (5.0, 0.0, "healthy"),
        (5.0, 0.001, "degraded"),  # any 5xx: Kiali's `degraded: 0`
        (5.0, 0.0999, "degraded"),
        (5.0, 0.1, "failing"),  # Kiali's `failure: 10` percent
        (5.0, 1.0, "failing"),
    ],
)
def test_health_uses_kialis_default_5xx_thresholds(
    rps: float, error_rate: float, expected: str
) -> None:
    assert health(rps, error_rate) == expected


def test_graph_edges_run_workload_to_service_to_workload() -> None:
    graph = _graph()
    pairs = {(e["source"], e["target"]) for e in graph["edges"]}
    assert ("workload:istio-system/istio-ingressgateway", "service:default/productpage") in pairs
    assert ("service:default/productpage", "workload:default/productpage-v1") in pairs
    assert ("workload:default/productpage-v1", "service:default/reviews") in pairs
    assert ("service:default/reviews", "workload:default/reviews-v1") in pairs
    assert ("service:default/reviews", "workload:default/reviews-v2") in pairs
    assert ("unknown", "service:default/productpage") in pairs
    assert graph["window_s"] == WINDOW


def _edge(graph: dict[str, Any], source: str, target: str) -> dict[str, Any]:
    [edge] = [e for e in graph["edges"] if e["source"] == source and e["target"] == target]
    return edge


def _node(graph: dict[str, Any], node_id: str) -> dict[str, Any]:
    [node] = [n for n in graph["nodes"] if n["id"] == node_id]
    return node


def test_an_edge_with_a_destination_report_ignores_the_source_report() -> None:
    edge = _edge(_graph(), "service:default/reviews", "workload:default/reviews-v2")
    assert edge["rps"] == 100 / WINDOW  # 99 + 1 from reviews-v2's sidecar, not pp's 1000
    assert edge["error_rate"] == 0.01 and edge["health"] == "degraded"
    assert edge["mtls"] is True and edge["protocol"] == "http"


def test_ten_percent_5xx_is_failing_and_latency_comes_from_the_edges_buckets() -> None:
    edge = _edge(_graph(), "service:default/reviews", "workload:default/reviews-v1")
    assert edge["error_rate"] == 0.1 and edge["health"] == "failing"
    assert edge["p50_ms"] == 5.0  # rank 50 of 100: the top of the 5 ms bucket
    assert edge["p99_ms"] == pytest.approx(5 + 5 * 49 / 50)


def test_a_request_only_the_source_saw_ends_at_the_service() -> None:
    graph = _graph()
    edge = _edge(graph, "workload:default/productpage-v1", "service:default/details")
    assert edge["rps"] == 0.5 and edge["error_rate"] == 1.0 and edge["health"] == "failing"
    assert edge["mtls"] is False  # the source does not know
    assert not [e for e in graph["edges"] if e["source"] == "service:default/details"]


def test_nodes_carry_app_version_and_inbound_health_and_idle_edges_stay_idle() -> None:
    graph = _graph()
    reviews_v1 = _node(graph, "workload:default/reviews-v1")
    assert (reviews_v1["app"], reviews_v1["version"], reviews_v1["kind"]) == (
        "reviews",
        "v1",
        "workload",
    )
    assert reviews_v1["rps"] == 10.0 and reviews_v1["health"] == "failing"
    assert _node(graph, "service:default/ratings")["health"] == "idle"
    assert (
        _edge(graph, "workload:default/reviews-v2", "service:default/ratings")["health"] == "idle"
    )
    assert _node(graph, "unknown")["kind"] == "unknown"


def test_a_gateway_without_inbound_traffic_is_judged_by_its_outbound() -> None:
    gateway = _node(_graph(), "workload:istio-system/istio-ingressgateway")
    assert gateway["rps"] == 10.0 and gateway["health"] == "healthy"


def test_workloads_table_is_inbound_by_rps_with_the_gateway_as_outbound_only() -> None:
    signals = GoldenSignals(
        _bookinfo(),
        known=lambda: [("default", "details-v1", "details", "v1")],
        clock=lambda: 1000.0,
    )
    rows = asyncio.run(signals.workloads(WINDOW))["rows"]
    names = [r["name"] for r in rows]
    assert names[0] == "productpage-v1"  # 110 requests in
    row = {r["name"]: r for r in rows}
    assert row["productpage-v1"]["rps"] == 11.0 and row["productpage-v1"]["requests"] == 110
    assert row["productpage-v1"]["mtls_ratio"] == pytest.approx(100 / 110, abs=1e-4)
    # Outbound is what productpage's own sidecar reports: its reviews-v2 and details calls.
    assert row["productpage-v1"]["outbound_rps"] == (1000 + 5) / WINDOW
    assert row["reviews-v1"]["success_rate"] == 0.9
    assert row["reviews-v1"]["p50_ms"] == 5.0 and row["reviews-v1"]["p90_ms"] is not None
    gateway = row[GATEWAY]
    assert gateway["rps"] == 0 and gateway["success_rate"] is None and gateway["p99_ms"] is None
    assert gateway["outbound_rps"] == 10.0
    assert row["details-v1"]["rps"] == 0 and row["details-v1"]["app"] == "details"


def test_services_table_falls_back_to_the_source_report() -> None:
    signals = GoldenSignals(_bookinfo(), clock=lambda: 1000.0)
    rows = {r["name"]: r for r in asyncio.run(signals.services(WINDOW))["rows"]}
    assert rows["reviews"]["rps"] == 20.0 and rows["reviews"]["version"] == "v1,v2"
    assert rows["details"]["rps"] == 0.5 and rows["details"]["success_rate"] == 0.0
    assert rows["ratings"]["rps"] == 0.0 and rows["ratings"]["success_rate"] is None


def test_time_series_have_a_point_per_step_and_rates_by_code() -> None:
    signals = GoldenSignals(_bookinfo(), clock=lambda: 1000.0)
    series = asyncio.run(signals.metrics("workload", "default", "reviews-v1", minutes=1))
    assert series["step_s"] == 5.0
    window = 10.0  # two scrape intervals
    assert len(series["inbound"]) == 12 and series["inbound"][-1]["t"] == 1000.0
    point = series["inbound"][-1]
    assert point["rps"] == 100 / window and point["success_rate"] == 0.9
    assert point["p50_ms"] == 5.0
    assert set(series["by_code"]) == {"200", "503"}
    assert series["by_code"]["503"][-1]["rps"] == 10 / window
    assert series["outbound"][-1]["rps"] == 0.0  # reviews-v1 calls nobody


def test_service_series_have_no_outbound() -> None:
    signals = GoldenSignals(_bookinfo(), clock=lambda: 1000.0)
    series = asyncio.run(signals.metrics("service", "default", "reviews", minutes=15))
    assert series["step_s"] == 15 and len(series["inbound"]) == 60
    assert series["outbound"] == []
    assert series["inbound"][-1]["rps"] == pytest.approx(200 / 15, abs=1e-4)


def test_a_destination_report_without_the_service_takes_it_from_the_source_report() -> None:
    """An inbound sidecar that reports ``destination_service_name="unknown"`` still gives one
    edge per hop, workload → service → workload, not a second, direct edge."""
    source = _flow("source", "productpage-v1", "details", "details-v1")
    inbound = {
        **_flow("destination", "productpage-v1", "details", "details-v1"),
        "destination_service_name": "unknown",
        "destination_service_namespace": "unknown",
    }
    signals = GoldenSignals(
        FakeSource(
            [
                (REQUESTS, source, 20.0),
                (REQUESTS, inbound, 20.0),
                *_buckets(inbound, {"5": 20.0, "+Inf": 20.0}),
            ]
        ),
        clock=lambda: 1000.0,
    )
    graph = asyncio.run(signals.graph(WINDOW))
    assert {(e["source"], e["target"]) for e in graph["edges"]} == {
        ("workload:default/productpage-v1", "service:default/details"),
        ("service:default/details", "workload:default/details-v1"),
    }
    edge = _edge(graph, "service:default/details", "workload:default/details-v1")
    assert edge["mtls"] is True and edge["p50_ms"] == 2.5  # the destination's report
    rows = asyncio.run(signals.services(WINDOW))["rows"]
    assert [(r["name"], r["rps"], r["mtls_ratio"]) for r in rows] == [("details", 2.0, 1.0)]
