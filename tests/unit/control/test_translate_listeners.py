"""Listener translation: the sidecar's explicit-proxy outbound listener (15001), its inbound
listener (15006), and a gateway's listeners (``ISTIO-TRANSLATION.md`` §1.2, §4.2, §8)."""

from __future__ import annotations

from envoy.config.core.v3 import base_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)

from meshlet.control.snapshot import ProxyType
from meshlet.proxy.listener import compile_listener
from tests.unit.control.simulation import Simulation, app, bookinfo
from tests.unit.control.test_translate_routes import vs

CLIENT = Simulation.client()


def hcm(listener: listener_pb2.Listener) -> hcm_pb2.HttpConnectionManager:
    out = hcm_pb2.HttpConnectionManager()
    [chain] = listener.filter_chains
    [f] = chain.filters
    assert f.name == "envoy.filters.network.http_connection_manager"
    f.typed_config.Unpack(out)
    return out


def test_a_sidecar_gets_an_outbound_and_an_inbound_listener_on_its_pod_ip() -> None:
    sim = Simulation(app("reviews"))
    proxy = sim.sidecar("reviews")
    listeners = {listener.name: listener for listener in sim.build(proxy).listeners}
    assert sorted(listeners) == ["virtualInbound", "virtualOutbound"]
    out, into = listeners["virtualOutbound"], listeners["virtualInbound"]
    assert (out.address.socket_address.address, out.address.socket_address.port_value) == (
        proxy.ip,
        15001,
    )
    assert (into.address.socket_address.address, into.address.socket_address.port_value) == (
        proxy.ip,
        15006,
    )
    assert (out.traffic_direction, into.traffic_direction) == (base_pb2.OUTBOUND, base_pb2.INBOUND)
    assert compile_listener(out, "").reporter == "source"
    assert compile_listener(into, "").reporter == "destination"


def test_the_connection_manager_has_the_fault_filter_and_a_typed_router_last() -> None:
    sim = Simulation(app("reviews"))
    manager = hcm(sim.listener(CLIENT, "virtualOutbound"))
    assert [f.name for f in manager.http_filters] == [
        "istio.metadata_exchange",
        "envoy.filters.http.fault",
        "istio.stats",
        "envoy.filters.http.router",
    ]
    router = manager.http_filters[-1].typed_config
    assert router.type_url == "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
    assert manager.codec_type == hcm_pb2.HttpConnectionManager.AUTO
    assert manager.HasField("stream_idle_timeout") and manager.stream_idle_timeout.seconds == 0
    assert manager.route_config.name == "http_proxy"
    assert not manager.route_config.ignore_port_in_host_matching
    inbound = hcm(sim.listener(CLIENT, "virtualInbound"))
    assert inbound.server_name == "istio-envoy"


def test_the_cors_filter_is_added_only_when_a_route_uses_it() -> None:
    sim = Simulation(
        app("reviews"),
        vs(
            "hosts: [reviews]\nhttp:\n- corsPolicy: {allowOrigins: [{exact: a}]}\n"
            "  route: [{destination: {host: reviews}}]"
        ),
    )
    names = [f.name for f in hcm(sim.listener(CLIENT, "virtualOutbound")).http_filters]
    assert names == [
        "istio.metadata_exchange",
        "envoy.filters.http.fault",
        "envoy.filters.http.cors",
        "istio.stats",
        "envoy.filters.http.router",
    ]


def test_the_inbound_listener_routes_by_the_port_in_the_host_to_the_inbound_cluster() -> None:
    sim = Simulation(app("reviews", ports={"http": 9080, "http-admin": 9090}))
    proxy = sim.sidecar("reviews")
    for host, port, cluster in [
        ("reviews", 9080, "inbound|9080||"),
        ("reviews.default.svc.cluster.local", 9090, "inbound|9090||"),
        (proxy.ip, 9090, "inbound|9090||"),
        ("reviews", None, "inbound|9080||"),  # no port: the first served port
    ]:
        result = sim.simulate(proxy, host=host, port=port, via="inbound")
        assert result.cluster == cluster, (host, port)
        assert result.endpoint == f"{proxy.ip}:{cluster.split('|')[1]}"
    route = sim.simulate(proxy, host="reviews", port=9080, via="inbound")
    assert route.retry is not None and route.retry.retry_on == {"reset-before-request"}
    assert route.retry.num_retries == 2
    assert route.timeout == 0.0


def test_a_workload_serving_nothing_passes_inbound_traffic_through() -> None:
    sim = Simulation(app("reviews"))
    result = sim.simulate(CLIENT, host="x", port=80, via="inbound")
    assert result.cluster == "InboundPassthroughCluster"


def test_grpc_ports_get_no_inbound_retries() -> None:
    sim = Simulation(app("greeter", ports={"grpc": 7070}))
    proxy = sim.sidecar("greeter")
    assert sim.simulate(proxy, host="greeter", port=7070, via="inbound").retry is None


def gateway_sim(*docs: str) -> Simulation:
    return bookinfo(*docs, networking=["bookinfo-gateway.yaml", "destination-rule-all.yaml"])


GATEWAY = Simulation.client(
    namespace="istio-system",
    labels={"istio": "ingressgateway"},
    kind=ProxyType.ROUTER,
    ip="10.0.9.1",
)


def test_a_gateway_routes_its_servers_hosts_with_the_virtual_services_bound_to_it() -> None:
    sim = gateway_sim()
    [listener] = sim.build(GATEWAY).listeners
    assert listener.name == "0.0.0.0_8080"
    assert listener.address.socket_address.port_value == 8080
    manager = hcm(listener)
    assert manager.use_remote_address.value is True
    assert manager.route_config.name == "http.8080"
    page = sim.simulate(
        GATEWAY, host="bookinfo.example", port=8080, path="/productpage", via="gateway"
    )
    assert (page.virtual_host, page.cluster) == (
        "*:8080",
        "outbound|9080||productpage.default.svc.cluster.local",
    )
    assert page.endpoint is not None
    other = sim.simulate(GATEWAY, host="bookinfo.example", port=8080, path="/admin", via="gateway")
    assert other.status == 404


HTTP_GATEWAY = """
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: gw}
spec:
  selector: {istio: ingressgateway}
  servers:
  - port: {number: 8080, name: http, protocol: HTTP}
    hosts: ["*"]
"""


def test_a_gateway_without_matching_virtual_services_answers_404_from_a_blackhole_vhost() -> None:
    result = Simulation(HTTP_GATEWAY).simulate(GATEWAY, host="x", port=8080, via="gateway")
    assert (result.virtual_host, result.status) == ("blackhole:8080", 404)


def test_gateway_routes_of_several_virtual_services_are_concatenated_catch_alls_last() -> None:
    sim = Simulation(
        HTTP_GATEWAY,
        app("a"),
        app("b"),
        vs(
            "hosts: [x.example]\ngateways: [gw]\nhttp:\n- route: [{destination: {host: a}}]",
            name="a",
        ),
        vs(
            "hosts: [x.example]\ngateways: [gw]\nhttp:\n- match: [{uri: {prefix: /b}}]\n"
            "  route: [{destination: {host: b}}]",
            name="b",
        ),
    )
    b = sim.simulate(GATEWAY, host="x.example", port=8080, path="/b", via="gateway")
    assert b.cluster == "outbound|9080||b.default.svc.cluster.local"
    a = sim.simulate(GATEWAY, host="x.example", port=8080, path="/a", via="gateway")
    assert a.cluster == "outbound|9080||a.default.svc.cluster.local"


def test_sidecar_virtual_services_do_not_reach_the_gateway() -> None:
    sim = gateway_sim(
        vs("hosts: [productpage]\nhttp:\n- route: [{destination: {host: reviews}}]", name="pp")
    )
    page = sim.simulate(GATEWAY, host="x", port=8080, path="/productpage", via="gateway")
    assert page.cluster == "outbound|9080||productpage.default.svc.cluster.local"


def test_tls_gateway_servers_terminate_with_sds_secrets() -> None:
    sim = Simulation(
        """
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: gw}
spec:
  selector: {istio: ingressgateway}
  servers:
  - port: {number: 443, name: https, protocol: HTTPS}
    hosts: [a.example.com]
    tls: {mode: SIMPLE, credentialName: a-cert}
        """
    )
    gateway = Simulation.client(labels={"istio": "ingressgateway"}, kind=ProxyType.ROUTER)
    [listener] = sim.build(gateway).listeners
    [chain] = listener.filter_chains
    assert list(chain.filter_chain_match.server_names) == ["a.example.com"]
    from envoy.extensions.transport_sockets.tls.v3 import tls_pb2

    context = tls_pb2.DownstreamTlsContext()
    chain.transport_socket.typed_config.Unpack(context)
    assert (
        context.common_tls_context.tls_certificate_sds_secret_configs[0].name
        == "kubernetes://a-cert"
    )


def test_an_https_redirect_server_requires_tls_on_its_virtual_hosts() -> None:
    sim = Simulation(
        HTTP_GATEWAY.replace('hosts: ["*"]', 'hosts: ["*"]\n    tls: {httpsRedirect: true}'),
        app("a"),
        vs(
            "hosts: [x.example]\ngateways: [gw]\nhttp:\n- route: [{destination: {host: a}}]",
            name="a",
        ),
    )
    [config] = sim.build(GATEWAY).routes
    [vh] = config.virtual_hosts
    assert vh.require_tls == vh.ALL
    assert any("require_tls" in r for r in sim.refusals(GATEWAY))
