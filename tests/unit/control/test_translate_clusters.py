"""DestinationRule and service translation to clusters (``ISTIO-TRANSLATION.md`` §1.1, §3)."""

from __future__ import annotations

import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.extensions.transport_sockets.tls.v3 import tls_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2

from meshlet.control.snapshot import ProxyType
from meshlet.control.translate.clusters import MAX_UINT32
from meshlet.proxy.upstream.cluster import compile_cluster
from tests.unit.control.simulation import Simulation, app, as_static
from tests.unit.control.test_translate_routes import dr

CLIENT = Simulation.client()
REVIEWS = "outbound|9080||reviews.default.svc.cluster.local"


def cluster(sim: Simulation, name: str = REVIEWS) -> cluster_pb2.Cluster:
    return sim.cluster(CLIENT, name)


def reviews(*docs: str) -> Simulation:
    return Simulation(app("reviews", versions=("v1", "v2")), *docs)


def policy(body: str) -> Simulation:
    """reviews with a DestinationRule whose trafficPolicy is ``body`` (YAML, flow style)."""
    return reviews(dr(f"host: reviews\ntrafficPolicy: {body}"))


def compiled(sim: Simulation, name: str = REVIEWS):  # type: ignore[no-untyped-def]
    c = cluster(sim, name)
    cla = next((a for a in sim.build(CLIENT).endpoints if a.cluster_name == name), None)
    return compile_cluster(as_static(c, cla), "")


def test_a_service_port_is_an_eds_cluster_over_ads_with_istios_defaults() -> None:
    c = cluster(reviews())
    assert c.type == cluster_pb2.Cluster.EDS
    assert c.eds_cluster_config.service_name == REVIEWS
    assert c.eds_cluster_config.eds_config.HasField("ads")
    assert c.eds_cluster_config.eds_config.HasField("initial_fetch_timeout")
    assert c.eds_cluster_config.eds_config.initial_fetch_timeout.seconds == 0
    assert c.connect_timeout.seconds == 10
    assert c.lb_policy == cluster_pb2.Cluster.LEAST_REQUEST
    assert c.alt_stat_name == REVIEWS + ";"
    [t] = c.circuit_breakers.thresholds
    assert (
        t.max_connections.value,
        t.max_pending_requests.value,
        t.max_requests.value,
        t.max_retries.value,
    ) == (MAX_UINT32,) * 4
    assert not c.HasField("outlier_detection")


def test_the_proxy_accepts_a_default_cluster_once_its_endpoints_are_inlined() -> None:
    config = compiled(reviews())
    assert config.lb.policy.value == "LEAST_REQUEST"
    assert config.limits.max_requests == MAX_UINT32
    assert {(e.address, e.port) for e in config.endpoints} == {
        ("10.0.0.1", 9080),
        ("10.0.0.2", 9080),
    }


def test_a_sidecar_has_the_fixed_clusters_and_a_gateway_only_the_blackhole() -> None:
    sim = reviews()
    names = [c.name for c in sim.build(CLIENT).clusters]
    assert {"BlackHoleCluster", "PassthroughCluster", "InboundPassthroughCluster"} <= set(names)
    gateway = Simulation.client(kind=ProxyType.ROUTER, labels={"istio": "ingressgateway"})
    names = [c.name for c in sim.build(gateway).clusters]
    assert "BlackHoleCluster" in names and "PassthroughCluster" not in names


@pytest.mark.parametrize(
    ("simple", "expected"),
    [
        ("LEAST_REQUEST", cluster_pb2.Cluster.LEAST_REQUEST),
        ("LEAST_CONN", cluster_pb2.Cluster.LEAST_REQUEST),
        ("ROUND_ROBIN", cluster_pb2.Cluster.ROUND_ROBIN),
        ("RANDOM", cluster_pb2.Cluster.RANDOM),
        ("UNSPECIFIED", cluster_pb2.Cluster.LEAST_REQUEST),
    ],
)
def test_simple_load_balancers(simple: str, expected: int) -> None:
    sim = policy(f"{{loadBalancer: {{simple: {simple}}}}}")
    assert cluster(sim).lb_policy == expected
    compiled(sim)


def test_passthrough_load_balancing_is_an_original_destination_cluster() -> None:
    c = cluster(policy("{loadBalancer: {simple: PASSTHROUGH}}"))
    assert (c.type, c.lb_policy) == (
        cluster_pb2.Cluster.ORIGINAL_DST,
        cluster_pb2.Cluster.CLUSTER_PROVIDED,
    )


@pytest.mark.parametrize(
    ("hashing", "lb", "config"),
    [
        ("{httpHeaderName: x}", cluster_pb2.Cluster.RING_HASH, ("ring_hash_lb_config", 1024)),
        (
            "{httpHeaderName: x, minimumRingSize: 64}",
            cluster_pb2.Cluster.RING_HASH,
            ("ring_hash_lb_config", 64),
        ),
        (
            "{httpHeaderName: x, ringHash: {minimumRingSize: 2048}}",
            cluster_pb2.Cluster.RING_HASH,
            ("ring_hash_lb_config", 2048),
        ),
        ("{httpHeaderName: x, ringHash: {}}", cluster_pb2.Cluster.RING_HASH, None),
        (
            "{httpHeaderName: x, maglev: {tableSize: 65537}}",
            cluster_pb2.Cluster.MAGLEV,
            ("maglev_lb_config", 65537),
        ),
        ("{httpHeaderName: x, maglev: {}}", cluster_pb2.Cluster.MAGLEV, None),
    ],
)
def test_consistent_hash_load_balancers(
    hashing: str, lb: int, config: tuple[str, int] | None
) -> None:
    sim = policy(f"{{loadBalancer: {{consistentHash: {hashing}}}}}")
    c = cluster(sim)
    assert c.lb_policy == lb
    if config is None:
        assert c.WhichOneof("lb_config") is None
    else:
        field, value = config
        message = getattr(c, field)
        size = message.minimum_ring_size if field == "ring_hash_lb_config" else message.table_size
        assert size.value == value
    compiled(sim)


def test_warmup_is_slow_start() -> None:
    c = cluster(
        policy("{loadBalancer: {simple: ROUND_ROBIN, warmup: {duration: 30s, minimumPercent: 20}}}")
    )
    slow = c.round_robin_lb_config.slow_start_config
    assert slow.slow_start_window.seconds == 30
    assert (slow.aggression.default_value, slow.min_weight_percent.value) == (1.0, 20.0)


def test_connection_pool() -> None:
    sim = policy(
        "{connectionPool: {tcp: {maxConnections: 10, connectTimeout: 250ms, "
        "tcpKeepalive: {probes: 3, time: 60s, interval: 10s}}, "
        "http: {http1MaxPendingRequests: 5, http2MaxRequests: 20, maxRetries: 4, "
        "maxRequestsPerConnection: 1, idleTimeout: 30s}}}"
    )
    c = cluster(sim)
    [t] = c.circuit_breakers.thresholds
    assert (
        t.max_connections.value,
        t.max_pending_requests.value,
        t.max_requests.value,
        t.max_retries.value,
    ) == (10, 5, 20, 4)
    assert (c.connect_timeout.seconds, c.connect_timeout.nanos) == (0, 250_000_000)
    assert c.common_http_protocol_options.idle_timeout.seconds == 30
    assert c.common_http_protocol_options.max_requests_per_connection.value == 1
    keepalive = c.upstream_connection_options.tcp_keepalive
    assert (keepalive.keepalive_probes.value, keepalive.keepalive_time.value) == (3, 60)


def test_the_proxy_applies_the_connection_pool_it_supports() -> None:
    sim = policy(
        "{connectionPool: {tcp: {maxConnections: 10, connectTimeout: 250ms}, "
        "http: {http1MaxPendingRequests: 5, http2MaxRequests: 20, maxRetries: 4, "
        "maxRequestsPerConnection: 1, idleTimeout: 30s}}}"
    )
    config = compiled(sim)
    assert (config.limits.max_connections, config.limits.max_pending_requests) == (10, 5)
    assert (config.limits.max_requests, config.limits.max_retries) == (20, 4)
    assert (config.connect_timeout, config.idle_timeout) == (0.25, 30.0)
    assert config.max_requests_per_connection == 1


def test_tcp_idle_timeout_applies_when_http_has_none() -> None:
    c = cluster(policy("{connectionPool: {tcp: {idleTimeout: 5s, maxConnectionDuration: 1h}}}"))
    assert c.common_http_protocol_options.idle_timeout.seconds == 5
    assert c.common_http_protocol_options.max_connection_duration.seconds == 3600


def test_outlier_detection() -> None:
    sim = policy(
        "{outlierDetection: {consecutive5xxErrors: 3, consecutiveGatewayErrors: 0, "
        "interval: 5s, baseEjectionTime: 1m, maxEjectionPercent: 50, minHealthPercent: 25}}"
    )
    c = cluster(sim)
    od = c.outlier_detection
    assert (od.consecutive_5xx.value, od.enforcing_consecutive_5xx.value) == (3, 100)
    assert (
        od.consecutive_gateway_failure.value,
        od.enforcing_consecutive_gateway_failure.value,
    ) == (0, 0)
    assert od.HasField("enforcing_success_rate") and od.enforcing_success_rate.value == 0
    assert (od.interval.seconds, od.base_ejection_time.seconds, od.max_ejection_percent.value) == (
        5,
        60,
        50,
    )
    assert c.common_lb_config.healthy_panic_threshold.value == 25.0
    config = compiled(sim)
    assert config.outlier is not None
    assert (config.outlier.consecutive_5xx, config.outlier.interval) == (3, 5.0)


def test_outlier_detection_disables_panic_mode_by_default() -> None:
    c = cluster(policy("{outlierDetection: {consecutive5xxErrors: 1}}"))
    assert c.common_lb_config.HasField("healthy_panic_threshold")
    assert c.common_lb_config.healthy_panic_threshold.value == 0.0


def test_the_deprecated_consecutive_errors_counts_gateway_errors_only() -> None:
    od = cluster(policy("{outlierDetection: {consecutiveErrors: 7}}")).outlier_detection
    assert (
        od.consecutive_gateway_failure.value,
        od.enforcing_consecutive_gateway_failure.value,
    ) == (7, 100)
    assert od.enforcing_consecutive_5xx.value == 0


def test_each_subset_is_a_cluster_whose_policy_blocks_replace_the_rules() -> None:
    sim = reviews(
        dr(
            """
            host: reviews
            trafficPolicy:
              loadBalancer: {simple: RANDOM}
              connectionPool: {tcp: {maxConnections: 7}}
            subsets:
            - name: v1
              labels: {version: v1}
              trafficPolicy:
                loadBalancer: {simple: ROUND_ROBIN}
            - name: v2
              labels: {version: v2}
            """
        )
    )
    v1 = cluster(sim, "outbound|9080|v1|reviews.default.svc.cluster.local")
    v2 = cluster(sim, "outbound|9080|v2|reviews.default.svc.cluster.local")
    assert (
        v1.eds_cluster_config.service_name == "outbound|9080|v1|reviews.default.svc.cluster.local"
    )
    assert v1.lb_policy == cluster_pb2.Cluster.ROUND_ROBIN
    assert v1.circuit_breakers.thresholds[0].max_connections.value == 7  # inherited block
    assert v2.lb_policy == cluster_pb2.Cluster.RANDOM
    assert not v1.HasField("lb_subset_config")


def test_port_level_settings_replace_the_whole_policy_without_inheriting() -> None:
    sim = Simulation(
        app("multi", ports={"http": 80, "http-admin": 9000}),
        dr(
            """
            host: multi
            trafficPolicy:
              loadBalancer: {simple: RANDOM}
              connectionPool: {tcp: {maxConnections: 7}}
              portLevelSettings:
              - port: {number: 9000}
                loadBalancer: {simple: ROUND_ROBIN}
            """,
            name="multi",
        ),
    )
    port80 = cluster(sim, "outbound|80||multi.default.svc.cluster.local")
    port9000 = cluster(sim, "outbound|9000||multi.default.svc.cluster.local")
    assert port80.lb_policy == cluster_pb2.Cluster.RANDOM
    assert port80.circuit_breakers.thresholds[0].max_connections.value == 7
    assert port9000.lb_policy == cluster_pb2.Cluster.ROUND_ROBIN
    assert port9000.circuit_breakers.thresholds[0].max_connections.value == MAX_UINT32


def test_subset_port_level_settings_win_over_everything() -> None:
    sim = reviews(
        dr(
            """
            host: reviews
            trafficPolicy: {loadBalancer: {simple: RANDOM}}
            subsets:
            - name: v1
              labels: {version: v1}
              trafficPolicy:
                loadBalancer: {simple: LEAST_REQUEST}
                portLevelSettings:
                - port: {number: 9080}
                  loadBalancer: {simple: ROUND_ROBIN}
            """
        )
    )
    c = cluster(sim, "outbound|9080|v1|reviews.default.svc.cluster.local")
    assert c.lb_policy == cluster_pb2.Cluster.ROUND_ROBIN


SERVICE_ENTRY = """
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: ext}}
spec:
  hosts: [api.example.com]
  ports: [{{number: 443, name: https, protocol: HTTPS}}, {{number: 80, name: http, protocol: HTTP}}]
  resolution: {resolution}
  location: MESH_EXTERNAL
{endpoints}
"""


@pytest.mark.parametrize(
    ("resolution", "kind"),
    [
        ("DNS", cluster_pb2.Cluster.STRICT_DNS),
        ("DNS_ROUND_ROBIN", cluster_pb2.Cluster.LOGICAL_DNS),
        ("NONE", cluster_pb2.Cluster.ORIGINAL_DST),
    ],
)
def test_service_entry_resolution_sets_the_cluster_type(resolution: str, kind: int) -> None:
    sim = Simulation(SERVICE_ENTRY.format(resolution=resolution, endpoints=""))
    c = cluster(sim, "outbound|80||api.example.com")
    assert c.type == kind
    if resolution != "NONE":
        assert c.dns_lookup_family == cluster_pb2.Cluster.V4_ONLY
        assert c.dns_refresh_rate.seconds == 60
        [group] = c.load_assignment.endpoints
        assert group.load_balancing_weight.value == 1
        sa = group.lb_endpoints[0].endpoint.address.socket_address
        assert (sa.address, sa.port_value) == ("api.example.com", 80)
        config = compile_cluster(c, "")
        assert config.discovery in ("STRICT_DNS", "LOGICAL_DNS")
    else:
        assert c.lb_policy == cluster_pb2.Cluster.CLUSTER_PROVIDED
        assert not c.HasField("load_assignment")


def test_static_service_entry_endpoints_use_eds() -> None:
    sim = Simulation(
        SERVICE_ENTRY.format(
            resolution="STATIC",
            endpoints=(
                "  endpoints:\n  - {address: 192.0.2.1, ports: {http: 8080}}\n"
                "  - {address: 192.0.2.2}"
            ),
        )
    )
    assert cluster(sim, "outbound|80||api.example.com").type == cluster_pb2.Cluster.EDS
    assert sim.endpoints(CLIENT, "outbound|80||api.example.com") == (
        "192.0.2.1:8080",
        "192.0.2.2:80",
    )


def test_http2_and_grpc_ports_speak_http2_upstream() -> None:
    sim = Simulation(app("grpc", ports={"grpc": 7070, "http": 80}))
    c = cluster(sim, "outbound|7070||grpc.default.svc.cluster.local")
    packed = c.typed_extension_protocol_options[
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
    ]
    options = http_protocol_options_pb2.HttpProtocolOptions()
    packed.Unpack(options)
    assert options.explicit_http_config.HasField("http2_protocol_options")
    assert not cluster(
        sim, "outbound|80||grpc.default.svc.cluster.local"
    ).typed_extension_protocol_options


def test_udp_ports_have_no_cluster() -> None:
    sim = Simulation(
        "apiVersion: v1\nkind: Service\nmetadata: {name: dns}\n"
        "spec: {selector: {app: dns}, ports: "
        "[{name: dns, port: 53, protocol: UDP}, {name: tcp, port: 54}]}"
    )
    names = {c.name for c in sim.build(CLIENT).clusters}
    assert "outbound|54||dns.default.svc.cluster.local" in names
    assert "outbound|53||dns.default.svc.cluster.local" not in names


def tls_context(c: cluster_pb2.Cluster) -> tls_pb2.UpstreamTlsContext:
    context = tls_pb2.UpstreamTlsContext()
    c.transport_socket.typed_config.Unpack(context)
    return context


def test_istio_mutual_tls_uses_sds_secrets_over_ads_and_the_istio_sni() -> None:
    sim = Simulation(
        app("reviews", service_account="bookinfo-reviews"),
        dr(
            "host: reviews\ntrafficPolicy: {tls: {mode: ISTIO_MUTUAL}}\n"
            "subsets: [{name: v1, labels: {version: v1}}]"
        ),
    )
    c = cluster(sim, "outbound|9080|v1|reviews.default.svc.cluster.local")
    assert c.transport_socket.name == "envoy.transport_sockets.tls"
    context = tls_context(c)
    assert context.sni == "outbound_.9080_.v1_.reviews.default.svc.cluster.local"
    common = context.common_tls_context
    assert [s.name for s in common.tls_certificate_sds_secret_configs] == ["default"]
    validation = common.combined_validation_context
    assert validation.validation_context_sds_secret_config.name == "ROOTCA"
    sans = [m.exact for m in validation.default_validation_context.match_subject_alt_names]
    assert sans == ["spiffe://cluster.local/ns/default/sa/bookinfo-reviews"]
    assert list(common.alpn_protocols) == ["istio-peer-exchange", "istio"]
    # Istio's Envoy asks its agent (sds-grpc); meshlet's proxy is its own agent, over ADS.
    assert common.tls_certificate_sds_secret_configs[0].sds_config.HasField("ads")


def test_simple_tls_validates_against_the_system_roots_with_the_host_as_sni() -> None:
    sim = Simulation(
        SERVICE_ENTRY.format(resolution="DNS", endpoints=""),
        dr(
            "host: api.example.com\ntrafficPolicy:\n  portLevelSettings:\n"
            "  - {port: {number: 443}, tls: {mode: SIMPLE}}",
            name="ext",
        ),
    )
    context = tls_context(cluster(sim, "outbound|443||api.example.com"))
    assert context.sni == "api.example.com"
    validation = context.common_tls_context.combined_validation_context
    assert validation.validation_context_sds_secret_config.name == "file-root:system"
    assert not cluster(sim, "outbound|80||api.example.com").HasField("transport_socket")


def test_mutual_tls_with_files() -> None:
    sim = policy(
        "{tls: {mode: MUTUAL, clientCertificate: /c.pem, privateKey: /k.pem, "
        "caCertificates: /ca.pem, sni: x.example}}"
    )
    context = tls_context(cluster(sim))
    common = context.common_tls_context
    assert [s.name for s in common.tls_certificate_sds_secret_configs] == [
        "file-cert:/c.pem~/k.pem"
    ]
    assert (
        common.combined_validation_context.validation_context_sds_secret_config.name
        == "file-root:/ca.pem"
    )
    assert context.sni == "x.example"


def test_disable_tls_has_no_transport_socket() -> None:
    assert not cluster(policy("{tls: {mode: DISABLE}}")).HasField("transport_socket")


def test_inbound_clusters_are_static_to_the_workloads_own_address() -> None:
    sim = Simulation(app("reviews", ports={"http": 9080, "http-admin": 9090}))
    proxy = sim.sidecar("reviews-v1")
    inbound = {c.name: c for c in sim.build(proxy).clusters if c.name.startswith("inbound|")}
    assert sorted(inbound) == ["inbound|9080||", "inbound|9090||"]
    c = inbound["inbound|9080||"]
    assert c.type == cluster_pb2.Cluster.STATIC
    sa = c.load_assignment.endpoints[0].lb_endpoints[0].endpoint.address.socket_address
    assert (sa.address, sa.port_value) == (proxy.ip, 9080)
    config = compile_cluster(c, "")
    assert [(e.address, e.port) for e in config.endpoints] == [(proxy.ip, 9080)]


def test_sidecar_ingress_default_endpoints_and_inbound_connection_pool() -> None:
    sim = Simulation(
        app("reviews"),
        """
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {name: default}
spec:
  ingress:
  - port: {number: 9080, protocol: HTTP, name: http}
    defaultEndpoint: 127.0.0.1:8080
  inboundConnectionPool: {http: {http1MaxPendingRequests: 3}}
        """,
    )
    proxy = sim.sidecar("reviews-v1")
    c = sim.cluster(proxy, "inbound|8080||")
    sa = c.load_assignment.endpoints[0].lb_endpoints[0].endpoint.address.socket_address
    assert (sa.address, sa.port_value) == ("127.0.0.1", 8080)
    assert c.circuit_breakers.thresholds[0].max_pending_requests.value == 3
    assert [x.name for x in sim.build(proxy).clusters if x.name.startswith("inbound|")] == [
        "inbound|8080||"
    ]
    result = sim.simulate(proxy, host="reviews", port=9080, via="inbound")
    assert (result.cluster, result.endpoint) == ("inbound|8080||", "127.0.0.1:8080")


def test_every_cluster_feature_the_proxy_implements_is_accepted() -> None:
    sim = reviews(
        dr(
            """
            host: reviews
            trafficPolicy:
              loadBalancer: {consistentHash: {useSourceIp: true, maglev: {tableSize: 65537}}}
              connectionPool:
                tcp: {maxConnections: 10, connectTimeout: 1s}
                http: {http1MaxPendingRequests: 5, maxRequestsPerConnection: 10, idleTimeout: 10s}
              outlierDetection:
                consecutive5xxErrors: 5
                consecutiveGatewayErrors: 2
                interval: 10s
                baseEjectionTime: 30s
                maxEjectionPercent: 100
            subsets:
            - name: v1
              labels: {version: v1}
              trafficPolicy: {loadBalancer: {simple: ROUND_ROBIN}}
            """
        )
    )
    refused = [r for r in sim.refusals(CLIENT) if "Passthrough" not in r]
    assert refused == []
