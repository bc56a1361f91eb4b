"""The ADS client's decisions without sockets: what it accepts, builds, ACKs and NACKs."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import address_pb2, config_source_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import any_pb2, message, wrappers_pb2

from meshlet.errors import ConfigError
from meshlet.proxy.bootstrap import parse_bootstrap
from meshlet.proxy.config import ProxyConfig, compile_bootstrap
from meshlet.proxy.telemetry.stats import NodeInfo, StatsStore
from meshlet.proxy.upstream.cluster import ClusterManager, compile_cluster, with_assignment
from meshlet.proxy.xds_client import (
    CLUSTER_TYPE,
    ENDPOINT_TYPE,
    LISTENER_TYPE,
    ROUTE_TYPE,
    AdsTables,
    XdsClient,
    backoff,
    build,
)

ADS = config_source_pb2.ConfigSource(ads=config_source_pb2.AggregatedConfigSource())

BOOTSTRAP = """
node: {id: test}
dynamic_resources:
  ads_config:
    api_type: GRPC
    transport_api_version: V3
    grpc_services: [{envoy_grpc: {cluster_name: xds-grpc}}]
  lds_config: {ads: {}, resource_api_version: V3}
  cds_config: {ads: {}, resource_api_version: V3}
static_resources:
  clusters:
  - name: xds-grpc
    type: STATIC
    load_assignment:
      cluster_name: xds-grpc
      endpoints: [{lb_endpoints: [{endpoint: {address: {socket_address:
        {address: 127.0.0.1, port_value: 15010}}}}]}]
"""


def base() -> ProxyConfig:
    return compile_bootstrap(parse_bootstrap(BOOTSTRAP, "bootstrap.yaml").message)


def pack(msg: message.Message) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(msg)
    return packed


def listener(name: str, port: int, route: str = "r") -> listener_pb2.Listener:
    hcm = hcm_pb2.HttpConnectionManager(
        rds=hcm_pb2.Rds(route_config_name=route, config_source=ADS),
        http_filters=[
            hcm_pb2.HttpFilter(
                name="envoy.filters.http.router", typed_config=pack(router_pb2.Router())
            )
        ],
    )
    return listener_pb2.Listener(
        name=name,
        address=address_pb2.Address(
            socket_address=address_pb2.SocketAddress(address="127.0.0.1", port_value=port)
        ),
        filter_chains=[
            listener_components_pb2.FilterChain(
                filters=[listener_components_pb2.Filter(name="hcm", typed_config=pack(hcm))]
            )
        ],
    )


def routes(name: str, cluster: str) -> route_pb2.RouteConfiguration:
    return route_pb2.RouteConfiguration(
        name=name,
        virtual_hosts=[
            route_components_pb2.VirtualHost(
                name="all",
                domains=["*"],
                routes=[
                    route_components_pb2.Route(
                        match=route_components_pb2.RouteMatch(prefix="/"),
                        route=route_components_pb2.RouteAction(cluster=cluster),
                    )
                ],
            )
        ],
    )


def eds_cluster(name: str, service: str = "") -> cluster_pb2.Cluster:
    return cluster_pb2.Cluster(
        name=name,
        type=cluster_pb2.Cluster.EDS,
        eds_cluster_config=cluster_pb2.Cluster.EdsClusterConfig(
            eds_config=ADS, service_name=service
        ),
    )


def cla(name: str, *ports: int, weight: int = 1) -> endpoint_pb2.ClusterLoadAssignment:
    return endpoint_pb2.ClusterLoadAssignment(
        cluster_name=name,
        endpoints=[
            endpoint_components_pb2.LocalityLbEndpoints(
                load_balancing_weight=wrappers_pb2.UInt32Value(value=1),
                lb_endpoints=[
                    endpoint_components_pb2.LbEndpoint(
                        endpoint=endpoint_components_pb2.Endpoint(
                            address=address_pb2.Address(
                                socket_address=address_pb2.SocketAddress(
                                    address="127.0.0.1", port_value=p
                                )
                            )
                        ),
                        load_balancing_weight=wrappers_pb2.UInt32Value(value=weight),
                    )
                    for p in ports
                ],
            )
        ],
    )


def response(
    type_url: str, version: str, *resources: message.Message, nonce: str = ""
) -> discovery_pb2.DiscoveryResponse:
    return discovery_pb2.DiscoveryResponse(
        type_url=type_url,
        version_info=version,
        nonce=nonce or f"n{version}",
        resources=[pack(r) for r in resources],
    )


# -- bootstrap ----------------------------------------------------------------------------------


def test_a_dynamic_bootstrap_names_the_control_plane_by_its_static_cluster() -> None:
    ads = base().ads
    assert ads is not None
    assert (ads.cluster_name, ads.target, ads.lds, ads.cds) == (
        "xds-grpc",
        "127.0.0.1:15010",
        True,
        True,
    )


def test_a_static_bootstrap_refuses_eds_clusters_and_rds() -> None:
    with pytest.raises(ConfigError, match="EDS only for clusters from ADS"):
        compile_cluster(eds_cluster("a"), "static_resources.clusters[0]")
    from meshlet.proxy.listener import compile_listener

    with pytest.raises(ConfigError, match="rds only for listeners from ADS"):
        compile_listener(listener("l", 8080), "static_resources.listeners[0]")


def test_rds_and_eds_config_sources_other_than_ads_are_refused_by_field() -> None:
    cluster = eds_cluster("a")
    cluster.eds_cluster_config.eds_config.path_config_source.path = "/tmp/eds.yaml"
    cluster.eds_cluster_config.eds_config.ClearField("ads")
    with pytest.raises(ConfigError) as e:
        compile_cluster(cluster, "c", eds=True)
    assert "c.eds_cluster_config.eds_config.path_config_source: is not supported" in str(e.value)


# -- accepting and building ----------------------------------------------------------------------


def accept(tables: AdsTables, r: discovery_pb2.DiscoveryResponse, b: ProxyConfig) -> AdsTables:
    """``tables`` with ``r`` accepted whole (it must have no problems)."""
    new, error = tables.accept(r, b, 0.0)
    assert error is None, str(error)
    return new


def test_a_listener_waits_for_its_routes_and_a_cluster_for_its_endpoints() -> None:
    b = base()
    tables = accept(AdsTables(), response(CLUSTER_TYPE, "1", eds_cluster("a")), b)
    tables = accept(tables, response(LISTENER_TYPE, "1", listener("l", 0)), b)
    assert (tables.route_names(), tables.eds_names()) == (["r"], ["a"])
    built = build(tables, b, {}, {})
    assert not built.complete
    assert [c.name for c in built.config.clusters] == ["xds-grpc"]  # "a" is warming
    assert built.config.listeners == ()

    tables = accept(tables, response(ENDPOINT_TYPE, "1", cla("a", 9001)), b)
    tables = accept(tables, response(ROUTE_TYPE, "1", routes("r", "a")), b)
    built = build(tables, b, {}, {})
    assert built.complete
    [a] = [c for c in built.config.clusters if c.name == "a"]
    assert [e.port for e in a.endpoints] == [9001]
    [lc] = built.config.listeners
    assert lc.hcm.route_table.referenced_clusters() == {"a"}
    assert [r.version for r in built.config.dynamic.routes] == ["1"]


def test_a_warming_cluster_keeps_the_version_applied_before() -> None:
    b = base()
    tables = accept(AdsTables(), response(CLUSTER_TYPE, "1", eds_cluster("a")), b)
    tables = accept(tables, response(ENDPOINT_TYPE, "1", cla("a", 9001)), b)
    first = build(tables, b, {}, {})
    # The cluster now reads another assignment, which has not arrived.
    tables = accept(tables, response(CLUSTER_TYPE, "2", eds_cluster("a", "a-v2")), b)
    assert tables.assignments == {}  # nobody needs "a" any more
    second = build(tables, b, first.listeners, first.clusters)
    assert not second.complete
    [a] = [c for c in second.config.clusters if c.name == "a"]
    assert [e.port for e in a.endpoints] == [9001]


def test_new_routes_to_a_warming_cluster_wait_for_its_endpoints() -> None:
    b = base()
    tables = accept(AdsTables(), response(CLUSTER_TYPE, "1", eds_cluster("a")), b)
    tables = accept(tables, response(ENDPOINT_TYPE, "1", cla("a", 9001)), b)
    tables = accept(tables, response(LISTENER_TYPE, "1", listener("l", 0)), b)
    tables = accept(tables, response(ROUTE_TYPE, "1", routes("r", "a")), b)
    first = build(tables, b, {}, {})
    assert first.complete

    # Cluster "b" arrives, and routes to it before its endpoints do.
    tables = accept(tables, response(CLUSTER_TYPE, "2", eds_cluster("a"), eds_cluster("b")), b)
    tables = accept(tables, response(ROUTE_TYPE, "2", routes("r", "b")), b)
    second = build(tables, b, first.listeners, first.clusters)
    [lc] = second.config.listeners
    assert lc.hcm.route_table.referenced_clusters() == {"a"}  # still the old routes
    tables = accept(tables, response(ENDPOINT_TYPE, "2", cla("b", 9002)), b)
    third = build(tables, b, second.listeners, second.clusters)
    [lc] = third.config.listeners
    assert lc.hcm.route_table.referenced_clusters() == {"b"}
    assert third.complete


def test_bad_resources_keep_their_last_version_and_every_problem_is_listed() -> None:
    b = base()
    good = accept(AdsTables(), response(CLUSTER_TYPE, "1", eds_cluster("a")), b)
    bad_a = eds_cluster("a")
    bad_a.lb_policy = cluster_pb2.Cluster.CLUSTER_PROVIDED
    bad_c = eds_cluster("c")
    bad_c.ClearField("eds_cluster_config")
    r = response(CLUSTER_TYPE, "2", bad_a, eds_cluster("b"), bad_c)
    tables, error = good.accept(r, b, 0.0)
    assert error is not None
    text = str(error)
    assert "cluster a.lb_policy: CLUSTER_PROVIDED needs type: ORIGINAL_DST" in text
    assert "cluster c.eds_cluster_config: is required with type: EDS" in text
    # As in Envoy: the valid "b" is taken, "a" keeps version 1, "c" is not there.
    assert {n: e.version for n, e in tables.clusters.items()} == {"a": "1", "b": "2"}
    assert tables.versions == {CLUSTER_TYPE: "1"}


def test_static_names_and_shared_addresses_are_refused() -> None:
    b = base()
    r = response(CLUSTER_TYPE, "1", eds_cluster("xds-grpc"))
    tables, error = AdsTables().accept(r, b, 0.0)
    assert error is not None and "has the name of a static cluster" in str(error)
    assert tables.clusters == {}
    r = response(LISTENER_TYPE, "1", listener("l1", 8081), listener("l2", 8081))
    tables, error = AdsTables().accept(r, b, 0.0)
    assert error is not None and "is also the address of listener" in str(error)
    assert tables.listeners == {}


def test_rds_responses_update_what_they_carry_and_drop_what_nobody_uses() -> None:
    b = base()
    two = response(LISTENER_TYPE, "1", listener("l1", 0, "r1"), listener("l2", 0, "r2"))
    tables = accept(AdsTables(), two, b)
    tables = accept(tables, response(ROUTE_TYPE, "1", routes("r1", "a")), b)
    tables = accept(tables, response(ROUTE_TYPE, "2", routes("r2", "a"), routes("x", "a")), b)
    assert sorted(tables.routes) == ["r1", "r2"]
    tables = accept(tables, response(LISTENER_TYPE, "2", listener("l2", 0, "r2")), b)
    assert sorted(tables.routes) == ["r2"]


def test_an_unchanged_resource_keeps_its_version() -> None:
    b = base()
    tables = accept(AdsTables(), response(CLUSTER_TYPE, "1", eds_cluster("a")), b)
    tables = accept(tables, response(CLUSTER_TYPE, "2", eds_cluster("a"), eds_cluster("b")), b)
    assert {n: e.version for n, e in tables.clusters.items()} == {"a": "1", "b": "2"}


# -- the client's answers -----------------------------------------------------------------------


class FakeProxy:
    def __init__(self) -> None:
        self.applied: list[ProxyConfig] = []
        self.ready = 0
        self.fail: str | None = None

    async def apply(self, config: ProxyConfig) -> None:
        if self.fail:
            raise ConfigError.at("listener l", self.fail)
        self.applied.append(config)

    def on_ready(self) -> None:
        self.ready += 1


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_acks_carry_version_and_nonce_and_subscriptions_follow_listeners_and_clusters() -> None:
    fake = FakeProxy()
    client = XdsClient(base(), fake.apply, fake.on_ready)
    [ack, eds] = run(client.handle(response(CLUSTER_TYPE, "1", eds_cluster("a"), nonce="c1")))
    assert (ack.type_url, ack.version_info, ack.response_nonce, list(ack.resource_names)) == (
        CLUSTER_TYPE,
        "1",
        "c1",
        [],
    )
    assert not ack.HasField("error_detail")
    assert (eds.type_url, list(eds.resource_names), eds.response_nonce) == (
        ENDPOINT_TYPE,
        ["a"],
        "",
    )
    [ack, rds] = run(client.handle(response(LISTENER_TYPE, "1", listener("l", 0))))
    assert (rds.type_url, list(rds.resource_names)) == (ROUTE_TYPE, ["r"])
    run(client.handle(response(ENDPOINT_TYPE, "1", cla("a", 9001), nonce="e1")))
    assert fake.ready == 0
    [ack] = run(client.handle(response(ROUTE_TYPE, "1", routes("r", "a"), nonce="r1")))
    assert (ack.version_info, ack.response_nonce, list(ack.resource_names)) == ("1", "r1", ["r"])
    assert fake.ready == 1
    run(client.handle(response(ROUTE_TYPE, "2", routes("r", "a"))))
    assert fake.ready == 1  # once
    assert len(fake.applied) == 5


def test_a_nack_keeps_the_last_version_and_says_why() -> None:
    fake = FakeProxy()
    client = XdsClient(base(), fake.apply, fake.on_ready)
    run(client.handle(response(CLUSTER_TYPE, "1", eds_cluster("a"))))
    bad = eds_cluster("a")
    bad.lb_policy = cluster_pb2.Cluster.CLUSTER_PROVIDED
    [nack] = run(client.handle(response(CLUSTER_TYPE, "2", bad, nonce="c2")))
    assert (nack.version_info, nack.response_nonce) == ("1", "c2")
    assert nack.error_detail.code == 3
    message = nack.error_detail.message
    assert "cluster a.lb_policy: CLUSTER_PROVIDED needs type: ORIGINAL_DST" in message
    assert client.tables.clusters["a"].version == "1"  # the version accepted before

    # A configuration that compiles but cannot be applied (a port in use) is NACKed too.
    fake.fail = "cannot bind: Address already in use"
    [nack] = run(client.handle(response(LISTENER_TYPE, "1", listener("l", 8080))))
    assert nack.version_info == ""
    assert "cannot bind" in nack.error_detail.message
    assert client.tables.listeners == {}


def test_backoff_is_jittered_doubling_and_capped() -> None:
    rng = random.Random(1)
    first = [backoff(0, rng) for _ in range(100)]
    assert all(0.25 <= d <= 0.5 for d in first)
    assert len(set(first)) > 50
    assert all(0.5 <= backoff(1, rng) <= 1.0 for _ in range(100))
    assert all(15.0 <= backoff(n, rng) <= 30.0 for n in (6, 7, 50, 10_000))


# -- EDS updates in place ------------------------------------------------------------------------


def test_an_eds_update_keeps_the_cluster_and_the_hosts_that_stayed() -> None:
    async def main() -> None:
        config = compile_cluster(eds_cluster("a"), "a", eds=True)
        manager = ClusterManager(StatsStore(NodeInfo.from_node(base().node)))
        manager.apply([with_assignment(config, cla("a", 9001, 9002), "a")])
        cluster = manager.clusters["a"]
        kept = next(h for h in cluster.hosts if h.port == 9002)
        kept.rq_total = 7
        manager.apply([with_assignment(config, cla("a", 9002, 9003), "a")])
        assert manager.clusters["a"] is cluster
        assert [h.port for h in cluster.hosts] == [9002, 9003]
        assert cluster.hosts[0] is kept
        # A changed weight is a new host.
        manager.apply([with_assignment(config, cla("a", 9002, weight=5), "a")])
        assert cluster.hosts[0] is not kept and cluster.hosts[0].weight == 5
        manager.stop()

    run(main())


def test_routes_that_never_come_stop_holding_readiness_after_their_fetch_timeout() -> None:
    async def main() -> None:
        fake = FakeProxy()
        client = XdsClient(base(), fake.apply, fake.on_ready)
        slow = listener("l", 0)
        hcm = hcm_pb2.HttpConnectionManager()
        slow.filter_chains[0].filters[0].typed_config.Unpack(hcm)
        hcm.rds.config_source.initial_fetch_timeout.nanos = 50_000_000
        slow.filter_chains[0].filters[0].typed_config.Pack(hcm)
        await client.handle(response(LISTENER_TYPE, "1", slow))
        await asyncio.sleep(0.1)
        assert fake.ready == 0  # CDS has not come yet: the clock has not started
        await client.handle(response(CLUSTER_TYPE, "1"))
        assert fake.ready == 0
        await asyncio.sleep(0.1)
        assert fake.ready == 1
        await client.handle(response(ROUTE_TYPE, "1", routes("r", "a")))
        assert fake.ready == 1

    run(main())


def test_initial_fetch_timeout_0s_waits_for_the_endpoints_however_long() -> None:
    async def main() -> None:
        fake = FakeProxy()
        client = XdsClient(base(), fake.apply, fake.on_ready)
        patient = eds_cluster("a")
        patient.eds_cluster_config.eds_config.initial_fetch_timeout.SetInParent()  # 0s
        quick = eds_cluster("b")
        quick.eds_cluster_config.eds_config.initial_fetch_timeout.nanos = 10_000_000
        await client.handle(response(LISTENER_TYPE, "1"))
        await client.handle(response(CLUSTER_TYPE, "1", patient, quick))
        await asyncio.sleep(0.1)
        assert fake.ready == 0
        await client.handle(response(ENDPOINT_TYPE, "1", cla("a", 9001)))
        await asyncio.sleep(0.05)  # "b" is past its timeout already
        assert fake.ready == 1

    run(main())


def test_a_nonzero_initial_fetch_timeout_for_listeners_is_refused() -> None:
    text = BOOTSTRAP.replace(
        "lds_config: {ads: {}, resource_api_version: V3}",
        "lds_config: {ads: {}, initial_fetch_timeout: 5s}",
    )
    with pytest.raises(ConfigError, match=r"lds_config\.initial_fetch_timeout: only 0s"):
        compile_bootstrap(parse_bootstrap(text, "b").message)
    zero = BOOTSTRAP.replace(
        "lds_config: {ads: {}, resource_api_version: V3}",
        "lds_config: {ads: {}, initial_fetch_timeout: 0s}",
    )
    assert compile_bootstrap(parse_bootstrap(zero, "b").message).ads is not None


def test_an_assignment_carries_priorities_weights_localities_and_eds_health() -> None:
    from envoy.config.core.v3 import base_pb2, health_check_pb2

    from meshlet.proxy.upstream.cluster import compile_cla

    assignment = cla("a", 9001, weight=3)
    assignment.endpoints[0].locality.CopyFrom(base_pb2.Locality(region="r", zone="z"))
    backup = cla("a", 9002).endpoints[0]
    backup.priority = 1
    backup.lb_endpoints[0].health_status = health_check_pb2.UNHEALTHY
    assignment.endpoints.append(backup)
    [primary, secondary] = compile_cla(assignment, "a")
    assert (primary.port, primary.weight, primary.priority, primary.locality, primary.healthy) == (
        9001,
        3,
        0,
        ("r", "z", ""),
        True,
    )
    assert (secondary.port, secondary.priority, secondary.healthy) == (9002, 1, False)
    assignment.policy.overprovisioning_factor.value = 200
    with pytest.raises(ConfigError, match=r"a\.policy: is not supported"):
        compile_cla(assignment, "a")
