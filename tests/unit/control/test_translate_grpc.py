"""Proxyless gRPC translation (``ISTIO-TRANSLATION.md`` §7, istiod's ``grpcgen``): what a
grpcio client that dials ``xds:///helloworld:5000`` is served, by requested name."""

from __future__ import annotations

import textwrap

import pytest
import yaml
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)

from meshlet.control.generators import Translation
from meshlet.control.snapshot import Proxy
from meshlet.control.store import Store
from meshlet.control.translate.grpc import (
    build_grpc_clusters,
    build_grpc_endpoints,
    build_grpc_listeners,
    build_grpc_route_configs,
    fqdn_of,
    split_host_port,
)
from meshlet.control.xds import CLUSTER_TYPE, LISTENER_TYPE, ROUTE_TYPE, ProxyInfo
from tests.unit.control.simulation import Simulation, app
from tests.unit.control.test_translate_routes import dr, vs

FQDN = "helloworld.default.svc.cluster.local"
DEFAULT = f"outbound|5000||{FQDN}"
V1 = f"outbound|5000|v1|{FQDN}"
V2 = f"outbound|5000|v2|{FQDN}"
CLIENT = Simulation.client()
NODE = "sidecar~127.0.0.1~client.default~default.svc.cluster.local"

HELLOWORLD = app("helloworld", ports={"grpc": 5000}, versions=("v1", "v2"))
SUBSETS = dr(
    """
    host: helloworld
    subsets:
    - {name: v1, labels: {version: v1}}
    - {name: v2, labels: {version: v2}}
    """,
    name="helloworld",
)
WEIGHTS = vs(
    """
    hosts: [helloworld]
    http:
    - timeout: 3s
      route:
      - {destination: {host: helloworld, subset: v1}, weight: 80}
      - {destination: {host: helloworld, subset: v2}, weight: 20}
    """,
    name="helloworld",
)


def mesh(*docs: str) -> Simulation:
    return Simulation(HELLOWORLD, SUBSETS, *docs)


def listener_names(sim: Simulation, names: list[str] | None, proxy: Proxy = CLIENT) -> list[str]:
    return [listener.name for listener in build_grpc_listeners(sim.snapshot, proxy, names)]


# -- LDS ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "helloworld:5000",
        "helloworld.default:5000",
        "helloworld.default.svc:5000",
        f"{FQDN}:5000",
    ],
)
def test_a_listener_answers_each_name_istio_accepts_under_the_name_asked_for(name: str) -> None:
    assert listener_names(mesh(), [name]) == [name]


def test_names_that_are_no_service_port_of_the_clients_namespace_get_no_listener() -> None:
    sim = mesh()
    assert listener_names(sim, ["nope:5000", "helloworld:6000"]) == []
    other = Simulation.client(namespace="other")
    # Short names expand in the client's own namespace only, as istiod's tryFindFQDN.
    assert listener_names(sim, ["helloworld:5000", "helloworld.default:5000"], other) == []
    assert listener_names(sim, [f"{FQDN}:5000"], other) == [f"{FQDN}:5000"]


def test_a_host_without_a_port_gets_a_listener_per_service_port() -> None:
    sim = Simulation(app("helloworld", ports={"grpc": 5000, "grpc-admin": 5001}))
    assert listener_names(sim, ["helloworld"]) == ["helloworld:5000", "helloworld:5001"]


def test_a_wildcard_gets_every_service_port_under_its_fqdn() -> None:
    sim = Simulation(HELLOWORLD, app("ratings"))
    assert listener_names(sim, None) == [
        f"{FQDN}:5000",
        "ratings.default.svc.cluster.local:9080",
    ]


def test_the_listener_is_an_api_listener_routing_over_rds_with_fault_and_typed_router() -> None:
    (listener,) = build_grpc_listeners(mesh().snapshot, CLIENT, ["helloworld:5000"])
    assert not listener.filter_chains
    hcm = hcm_pb2.HttpConnectionManager()
    assert listener.api_listener.api_listener.Unpack(hcm)
    assert hcm.rds.route_config_name == DEFAULT
    assert hcm.rds.config_source.HasField("ads")  # grpcio refuses RDS without a config source
    assert [f.name for f in hcm.http_filters] == [
        "envoy.filters.http.fault",
        "envoy.filters.http.router",
    ]
    assert hcm.http_filters[1].typed_config.Is(router_pb2.Router.DESCRIPTOR)
    assert listener.address.socket_address.port_value == 5000


# -- RDS ---------------------------------------------------------------------------------------


def test_the_route_configuration_holds_the_virtual_services_weights_to_subsets() -> None:
    (config,) = build_grpc_route_configs(mesh(WEIGHTS).snapshot, CLIENT, [DEFAULT])
    assert config.name == DEFAULT
    assert not config.ignore_port_in_host_matching
    (vh,) = config.virtual_hosts
    (route,) = vh.routes
    weighted = {c.name: c.weight.value for c in route.route.weighted_clusters.clusters}
    assert weighted == {V1: 80, V2: 20}
    # gRPC reads the timeout from max_stream_duration only.
    assert route.route.max_stream_duration.max_stream_duration.seconds == 3


def test_every_domain_is_followed_by_its_port_form_so_the_targets_authority_matches() -> None:
    (config,) = build_grpc_route_configs(mesh().snapshot, CLIENT, [DEFAULT])
    domains = list(config.virtual_hosts[0].domains)
    assert domains[:4] == [FQDN, f"{FQDN}:5000", f"{FQDN}.", f"{FQDN}.:5000"]
    assert domains.index("helloworld:5000") == domains.index("helloworld") + 1
    assert "helloworld.default:5000" in domains


def test_without_a_virtual_service_the_default_route_goes_to_the_service_cluster() -> None:
    (config,) = build_grpc_route_configs(mesh().snapshot, CLIENT, [DEFAULT])
    (route,) = config.virtual_hosts[0].routes
    assert route.route.cluster == DEFAULT
    assert route.route.max_stream_duration.HasField("max_stream_duration")  # 0s: no limit


def test_cors_configurations_are_dropped_and_the_sidecars_route_is_left_alone() -> None:
    cors = vs(
        """
        hosts: [helloworld]
        http:
        - corsPolicy: {allowOrigins: [{exact: "https://a.example"}]}
          route: [{destination: {host: helloworld}}]
        """,
        name="helloworld",
    )
    sim = mesh(cors)
    (config,) = build_grpc_route_configs(sim.snapshot, CLIENT, [DEFAULT])
    assert not config.virtual_hosts[0].routes[0].typed_per_filter_config
    sidecar = sim.route_config(CLIENT, "5000")
    assert "envoy.filters.http.cors" in sidecar.virtual_hosts[0].routes[0].typed_per_filter_config


def test_route_names_that_are_not_a_services_default_cluster_are_not_served() -> None:
    sim = mesh()
    names = [V1, "outbound|5000||nope.default.svc.cluster.local", "5000", "http_proxy"]
    assert build_grpc_route_configs(sim.snapshot, CLIENT, names) == []


# -- CDS and EDS -------------------------------------------------------------------------------


def test_clusters_are_eds_over_ads_round_robin_and_only_those_asked_for() -> None:
    clusters = build_grpc_clusters(mesh().snapshot, CLIENT, [V1, V2, "BlackHoleCluster"])
    assert [c.name for c in clusters] == [V1, V2]
    for c in clusters:
        assert c.type == cluster_pb2.Cluster.EDS
        assert c.eds_cluster_config.service_name == c.name
        assert c.eds_cluster_config.eds_config.HasField("ads")
        assert c.lb_policy == cluster_pb2.Cluster.ROUND_ROBIN
        assert not c.HasField("connect_timeout") and not c.circuit_breakers.thresholds


def test_a_dns_service_has_no_cluster_for_grpc() -> None:
    external = (
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: ext}\n"
        "spec: {hosts: [a.example], ports: [{number: 80, name: grpc}], resolution: DNS}"
    )
    sim = mesh(external)
    names = [c.name for c in build_grpc_clusters(sim.snapshot, CLIENT, None)]
    assert names == [DEFAULT, V1, V2]


@pytest.mark.parametrize(
    ("policy", "expected"),
    [
        ("loadBalancer: {simple: LEAST_REQUEST}", cluster_pb2.Cluster.LEAST_REQUEST),
        ("loadBalancer: {simple: RANDOM}", cluster_pb2.Cluster.ROUND_ROBIN),
        (
            "loadBalancer: {consistentHash: {httpHeaderName: x-user}}",
            cluster_pb2.Cluster.RING_HASH,
        ),
        (
            "loadBalancer: {consistentHash: {httpHeaderName: x-user, maglev: {}}}",
            cluster_pb2.Cluster.MAGLEV,
        ),
    ],
)
def test_the_destination_rules_load_balancer_is_kept(
    policy: str, expected: cluster_pb2.Cluster.LbPolicy
) -> None:
    rule = dr(f"host: helloworld\ntrafficPolicy:\n  {policy}\n", name="helloworld")
    (cluster,) = build_grpc_clusters(Simulation(HELLOWORLD, rule).snapshot, CLIENT, [DEFAULT])
    assert cluster.lb_policy == expected


def test_http2_max_requests_is_the_only_circuit_breaker() -> None:
    rule = dr(
        "host: helloworld\ntrafficPolicy:\n  connectionPool:\n"
        "    http: {http2MaxRequests: 7, http1MaxPendingRequests: 3}\n"
        "    tcp: {maxConnections: 2}\n",
        name="helloworld",
    )
    (cluster,) = build_grpc_clusters(Simulation(HELLOWORLD, rule).snapshot, CLIENT, [DEFAULT])
    (threshold,) = cluster.circuit_breakers.thresholds
    assert threshold.max_requests.value == 7
    assert not threshold.HasField("max_pending_requests")
    assert not threshold.HasField("max_connections")


def test_assignments_hold_the_subsets_endpoints_in_groups_that_all_have_a_locality() -> None:
    sim = mesh()
    assignments = build_grpc_endpoints(sim.snapshot, CLIENT, [V2, DEFAULT])
    assert [a.cluster_name for a in assignments] == [V2, DEFAULT]
    v2, whole = assignments
    assert [e.endpoint.address.socket_address.address for e in v2.endpoints[0].lb_endpoints] == [
        "10.0.0.2"
    ]
    assert sum(len(g.lb_endpoints) for g in whole.endpoints) == 2
    for group in [*v2.endpoints, *whole.endpoints]:
        assert group.HasField("locality")  # grpcio refuses a group without one
        assert group.load_balancing_weight.value > 0  # and silently drops one without this
    # Sidecars get the same shape (Istio always sends a locality, empty when unknown).
    sidecar = sim.assignment(CLIENT, V2)
    assert sidecar is not None and sidecar.endpoints[0].HasField("locality")


# -- names ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("helloworld:5000", ("helloworld", 5000)),
        ("helloworld", ("helloworld", None)),
        ("[fd00::1]:80", ("fd00::1", 80)),
        ("fd00::1", ("fd00::1", None)),
        ("a:b", ("a:b", None)),
    ],
)
def test_split_host_port(name: str, expected: tuple[str, int | None]) -> None:
    assert split_host_port(name) == expected


def test_fqdn_of_expands_short_names_in_the_clients_namespace() -> None:
    assert fqdn_of("helloworld", CLIENT) == FQDN
    assert fqdn_of("helloworld.default", CLIENT) == FQDN
    assert fqdn_of("helloworld.default.svc", CLIENT) == FQDN
    assert fqdn_of("helloworld.other", CLIENT) == ""
    assert fqdn_of("a.example", CLIENT) == ""


# -- the generator -------------------------------------------------------------------------------


def translation(*docs: str) -> Translation:
    store = Store.memory()
    store.apply([d for text in docs for d in yaml.safe_load_all(textwrap.dedent(text)) if d])
    return Translation(store)


def test_a_node_with_generator_grpc_is_served_grpc_resources_by_name() -> None:
    t = translation(SUBSETS, WEIGHTS, HELLOWORLD)
    grpc_node = ProxyInfo.parse_id(NODE, {"GENERATOR": "grpc", "NAMESPACE": "default"})
    assert grpc_node.proxyless_grpc
    lds = t.generate(grpc_node, LISTENER_TYPE, ["helloworld:5000", "nope:1"])
    assert list(lds.resources) == ["helloworld:5000"]
    listener = listener_pb2.Listener.FromString(lds.resources["helloworld:5000"].value)
    assert listener.HasField("api_listener")
    assert list(t.generate(grpc_node, ROUTE_TYPE, [DEFAULT]).resources) == [DEFAULT]
    assert list(t.generate(grpc_node, CLUSTER_TYPE, [V1]).resources) == [V1]
    assert lds.version == str(t.revision)

    sidecar = ProxyInfo.parse_id(NODE, {"NAMESPACE": "default"})
    assert not sidecar.proxyless_grpc
    assert set(t.generate(sidecar, LISTENER_TYPE, None).resources) == {
        "virtualOutbound",
        "virtualInbound",
    }
