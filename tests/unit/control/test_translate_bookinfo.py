"""Istio's Bookinfo networking samples, as the Bookinfo tasks use them (request routing,
traffic shifting, fault injection): each loads with ``bookinfo.yaml`` and translates for the
productpage sidecar, and the requests the tasks make go where Istio's documentation says.

The samples are read where they are (``../shared/istio-samples``), not copied.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.unit.control.simulation import BOOKINFO_APP, BOOKINFO_NETWORKING, Simulation, bookinfo

pytestmark = pytest.mark.skipif(not BOOKINFO_APP.is_file(), reason="Istio samples not present")

SAMPLES = sorted(BOOKINFO_NETWORKING.glob("*.yaml")) if BOOKINFO_NETWORKING.is_dir() else []
JASON = {"end-user": "jason"}


def subset(cluster: str | None) -> str:
    assert cluster is not None
    return cluster.split("|")[2]


# What the proxy refuses today in any sidecar's configuration: Istio's passthrough clusters
# (ORIGINAL_DST), and upstream TLS (the security issue).
KNOWN_GAPS = ("PassthroughCluster", "transport_socket")


@pytest.mark.parametrize("sample", SAMPLES, ids=lambda p: p.name)
def test_every_networking_sample_translates_for_the_productpage_sidecar(sample: Path) -> None:
    sim = Simulation(files=[BOOKINFO_APP, sample])
    proxy = sim.sidecar("productpage")
    built = sim.build(proxy)
    assert built.listeners and built.routes and built.clusters and built.endpoints
    assert [r for r in sim.refusals(proxy) if not any(g in r for g in KNOWN_GAPS)] == []


def test_all_samples_together_translate() -> None:
    sim = Simulation(files=[BOOKINFO_APP, *(p for p in SAMPLES if "mtls" not in p.name)])
    proxy = sim.sidecar("productpage")
    assert sim.build(proxy).clusters


def test_reviews_v3() -> None:
    sim = bookinfo(networking=["virtual-service-reviews-v3.yaml", "destination-rule-all.yaml"])
    result = sim.simulate(sim.sidecar("productpage"), host="reviews", port=9080, path="/reviews/0")
    assert result.cluster == "outbound|9080|v3|reviews.default.svc.cluster.local"
    assert result.endpoint == "10.0.0.5:9080"  # the reviews-v3 pod
    rds = sim.simulate(sim.sidecar("productpage"), host="reviews", port=9080, via="rds")
    assert rds.cluster == result.cluster


def test_request_routing_all_v1_then_jason_to_v2() -> None:
    sim = bookinfo(networking=["virtual-service-all-v1.yaml", "destination-rule-all.yaml"])
    pp = sim.sidecar("productpage")
    for host in ("reviews", "ratings", "details"):
        assert subset(sim.simulate(pp, host=host, port=9080).cluster) == "v1"
    sim = bookinfo(networking=["virtual-service-reviews-test-v2.yaml", "destination-rule-all.yaml"])
    pp = sim.sidecar("productpage")
    assert subset(sim.simulate(pp, host="reviews", port=9080, headers=JASON).cluster) == "v2"
    assert subset(sim.simulate(pp, host="reviews", port=9080).cluster) == "v1"


@pytest.mark.parametrize(
    ("sample", "weights"),
    [
        ("virtual-service-reviews-80-20.yaml", {"v1": 80, "v2": 20}),
        ("virtual-service-reviews-90-10.yaml", {"v1": 90, "v2": 10}),
        ("virtual-service-reviews-50-v3.yaml", {"v1": 50, "v3": 50}),
        ("virtual-service-reviews-v2-v3.yaml", {"v2": 50, "v3": 50}),
    ],
)
def test_traffic_shifting(sample: str, weights: dict[str, int]) -> None:
    sim = bookinfo(networking=[sample, "destination-rule-all.yaml"])
    result = sim.simulate(sim.sidecar("productpage"), host="reviews", port=9080)
    assert {subset(name): w for name, w in result.weights.items()} == weights


def test_jason_v2_others_v3() -> None:
    sim = bookinfo(
        networking=["virtual-service-reviews-jason-v2-v3.yaml", "destination-rule-all.yaml"]
    )
    pp = sim.sidecar("productpage")
    assert subset(sim.simulate(pp, host="reviews", port=9080, headers=JASON).cluster) == "v2"
    assert subset(sim.simulate(pp, host="reviews", port=9080).cluster) == "v3"


def test_fault_injection_delay_for_jason_from_the_reviews_sidecar() -> None:
    sim = bookinfo(
        networking=["virtual-service-ratings-test-delay.yaml", "destination-rule-all.yaml"]
    )
    reviews = sim.sidecar("reviews-v2")
    jason = sim.simulate(reviews, host="ratings", port=9080, headers=JASON)
    assert jason.fault is not None and jason.fault.delay is not None
    assert jason.fault.delay.fixed == 7.0
    assert jason.fault.delay.percentage.numerator == jason.fault.delay.percentage.denominator
    assert sim.simulate(reviews, host="ratings", port=9080).fault is None


def test_fault_injection_abort_for_jason() -> None:
    sim = bookinfo(
        networking=["virtual-service-ratings-test-abort.yaml", "destination-rule-all.yaml"]
    )
    jason = sim.simulate(sim.sidecar("reviews-v2"), host="ratings", port=9080, headers=JASON)
    assert jason.fault is not None and jason.fault.abort is not None
    assert jason.fault.abort.http_status == 500


def test_details_abort_555() -> None:
    sim = bookinfo(networking=["fault-injection-details-v1.yaml"])
    result = sim.simulate(sim.sidecar("productpage"), host="details", port=9080, path="/details/0")
    assert result.cluster == "outbound|9080|v1|details.default.svc.cluster.local"
    assert result.fault is not None and result.fault.abort is not None
    assert result.fault.abort.http_status == 555


def test_destination_rule_reviews_random() -> None:
    from envoy.config.cluster.v3 import cluster_pb2

    sim = bookinfo(networking=["destination-rule-reviews.yaml"])
    pp = sim.sidecar("productpage")
    for name in (
        "outbound|9080||reviews.default.svc.cluster.local",
        "outbound|9080|v2|reviews.default.svc.cluster.local",
    ):
        assert sim.cluster(pp, name).lb_policy == cluster_pb2.Cluster.RANDOM


def test_egress_to_googleapis_rewrites_port_80_to_443() -> None:
    sim = bookinfo(networking=["egress-rule-google-apis.yaml"])
    result = sim.simulate(sim.sidecar("productpage"), host="www.googleapis.com", port=80)
    assert result.cluster == "outbound|443||www.googleapis.com"
    assert result.endpoint == "www.googleapis.com:443"


def test_the_ingress_gateway_serves_productpage() -> None:
    from meshlet.control.snapshot import ProxyType

    sim = bookinfo(networking=["bookinfo-gateway.yaml"])
    gateway = Simulation.client(
        namespace="istio-system", labels={"istio": "ingressgateway"}, kind=ProxyType.ROUTER
    )
    for path in ("/productpage", "/static/x.css", "/login", "/api/v1/products/0"):
        result = sim.simulate(gateway, host="localhost", port=8080, path=path, via="gateway")
        assert result.cluster == "outbound|9080||productpage.default.svc.cluster.local", path
    assert [r for r in sim.refusals(gateway) if not any(g in r for g in KNOWN_GAPS)] == []
