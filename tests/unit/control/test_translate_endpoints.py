"""EDS translation (``ISTIO-TRANSLATION.md`` §5, DESIGN.md's xDS facts)."""

from __future__ import annotations

from meshlet.control.registry import Endpoint, PortProtocol, Service, ServicePort, StaticRegistry
from meshlet.control.snapshot import Proxy, Snapshot
from meshlet.control.translate.endpoints import build_endpoints, cluster_load_assignment
from meshlet.proxy.upstream.cluster import compile_cluster
from tests.unit.control.simulation import Simulation, app, as_static
from tests.unit.control.test_translate_routes import SUBSETS, dr

CLIENT = Simulation.client()
REVIEWS = "outbound|9080||reviews.default.svc.cluster.local"


def test_every_eds_cluster_has_an_assignment_and_dns_clusters_none() -> None:
    sim = Simulation(
        app("reviews", versions=("v1", "v2", "v3")),
        SUBSETS,
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: ext}\n"
        "spec: {hosts: [a.example], ports: [{number: 80, name: http}], resolution: DNS}",
    )
    names = [cla.cluster_name for cla in sim.build(CLIENT).endpoints]
    assert names == [
        REVIEWS,
        "outbound|9080|v1|reviews.default.svc.cluster.local",
        "outbound|9080|v2|reviews.default.svc.cluster.local",
        "outbound|9080|v3|reviews.default.svc.cluster.local",
    ]


def test_subset_assignments_hold_only_the_subsets_endpoints() -> None:
    sim = Simulation(app("reviews", versions=("v1", "v2", "v3"), replicas=2), SUBSETS)
    assert sim.endpoints(CLIENT, "outbound|9080|v2|reviews.default.svc.cluster.local") == (
        "10.0.0.3:9080",
        "10.0.0.4:9080",
    )
    assert len(sim.endpoints(CLIENT, REVIEWS)) == 6


def test_a_subset_matching_no_endpoint_has_an_empty_assignment() -> None:
    sim = Simulation(
        app("reviews"), dr("host: reviews\nsubsets: [{name: v9, labels: {version: v9}}]")
    )
    cla = sim.assignment(CLIENT, "outbound|9080|v9|reviews.default.svc.cluster.local")
    assert cla is not None and list(cla.endpoints) == []


def endpoint(address: str, **kw: object) -> Endpoint:
    return Endpoint(address=address, port=80, **kw)  # type: ignore[arg-type]


def test_localities_are_sorted_groups_with_their_weight_sum() -> None:
    cla = cluster_load_assignment(
        "c",
        [
            endpoint("10.0.0.3", locality="us/east/b", weight=5),
            endpoint("10.0.0.1", locality="eu/west/a"),
            endpoint("10.0.0.2", locality="us/east/b"),
        ],
    )
    groups = [(g.locality.region, g.locality.zone, g.locality.sub_zone) for g in cla.endpoints]
    assert groups == [("eu", "west", "a"), ("us", "east", "b")]
    assert [g.load_balancing_weight.value for g in cla.endpoints] == [1, 6]
    assert [e.load_balancing_weight.value for e in cla.endpoints[1].lb_endpoints] == [5, 1]
    assert all(e.health_status == 1 for g in cla.endpoints for e in g.lb_endpoints)  # HEALTHY


def test_an_endpoint_without_locality_still_gets_a_weighted_group() -> None:
    cla = cluster_load_assignment("c", [endpoint("10.0.0.1")])
    [group] = cla.endpoints
    assert group.load_balancing_weight.value == 1
    # Present and empty, as Istio sends it (grpcio's xDS client refuses a group without it).
    assert group.HasField("locality") and group.locality.region == ""


def service(hostname: str = "svc.default.svc.cluster.local") -> Service:
    return Service(
        hostname=hostname,
        namespace="default",
        name="svc",
        ports=(ServicePort(name="http", port=80, protocol=PortProtocol.HTTP),),
    )


def test_endpoints_that_are_not_ready_are_left_out() -> None:
    svc = service()
    registry = StaticRegistry(
        [svc],
        {(svc.hostname, 80): [endpoint("10.0.0.1"), endpoint("10.0.0.2", ready=False)]},
    )
    [cla] = build_endpoints(Snapshot.build([], registry), Proxy(ip="10.9.9.9"))
    assert [
        e.endpoint.address.socket_address.address for g in cla.endpoints for e in g.lb_endpoints
    ] == ["10.0.0.1"]


def test_endpoints_carry_istios_workload_metadata() -> None:
    sim = Simulation(app("reviews"))
    cla = sim.assignment(CLIENT, REVIEWS)
    assert cla is not None
    md = cla.endpoints[0].lb_endpoints[0].metadata.filter_metadata["istio"]
    assert md.fields["workload"].string_value == "reviews-v1-0;default;reviews;v1;Kubernetes"


def test_with_outlier_detection_endpoints_get_locality_failover_priorities() -> None:
    svc = service()
    registry = StaticRegistry(
        [svc],
        {
            (svc.hostname, 80): [
                endpoint("10.0.0.1", locality="us/east/a"),
                endpoint("10.0.0.2", locality="us/east/b"),
                endpoint("10.0.0.3", locality="eu/west/a"),
            ]
        },
    )
    rule = dr("host: svc\ntrafficPolicy: {outlierDetection: {consecutive5xxErrors: 1}}", name="svc")
    from meshlet.api import load_documents

    snapshot = Snapshot.build(load_documents(rule, "dr.yaml"), registry)
    [cla] = build_endpoints(snapshot, Proxy(ip="10.9.9.9", locality="us/east/a"))
    priorities = {g.locality.zone + "/" + g.locality.sub_zone: g.priority for g in cla.endpoints}
    assert priorities == {"west/a": 2, "east/a": 0, "east/b": 1}
    # Without outlier detection there are no priorities.
    [plain] = build_endpoints(
        Snapshot.build([], registry), Proxy(ip="10.9.9.9", locality="us/east/a")
    )
    assert {g.priority for g in plain.endpoints} == {0}


def test_the_proxy_accepts_the_assignment_as_its_clusters_endpoints() -> None:
    sim = Simulation(app("reviews", versions=("v1", "v2")))
    config = compile_cluster(
        as_static(sim.cluster(CLIENT, REVIEWS), sim.assignment(CLIENT, REVIEWS)), ""
    )
    assert sorted((e.address, e.port, e.weight) for e in config.endpoints) == [
        ("10.0.0.1", 9080, 1),
        ("10.0.0.2", 9080, 1),
    ]
