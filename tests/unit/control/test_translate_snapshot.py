"""The snapshot and a proxy's view of it: names, visibility, precedence
(``ISTIO-TRANSLATION.md`` §2.1, §2.7, §4.3, §4.4)."""

from __future__ import annotations

import pytest

from meshlet.api.networking import OutboundTrafficPolicyMode
from meshlet.control.snapshot import (
    MESH_GATEWAY,
    Proxy,
    ProxyType,
    parse_cluster_name,
    resolve_gateway,
    resolve_host,
)
from tests.unit.control.simulation import Simulation, app
from tests.unit.control.test_translate_routes import dr, vs

CLIENT = Simulation.client()


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("reviews", "reviews.default.svc.cluster.local"),
        ("reviews.default", "reviews.default"),  # a name with a dot is taken as written
        ("reviews.prod.svc.cluster.local", "reviews.prod.svc.cluster.local"),
        ("*", "*"),
        ("*.example.com", "*.example.com"),
        ("10.0.0.1", "10.0.0.1"),
    ],
)
def test_short_names_resolve_in_the_resources_namespace(host: str, expected: str) -> None:
    assert resolve_host(host, "default") == expected


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("mesh", "mesh"),
        ("bookinfo-gateway", "default/bookinfo-gateway"),
        ("istio-system/gw", "istio-system/gw"),
        ("gw.istio-system.svc.cluster.local", "istio-system/gw"),
    ],
)
def test_gateway_names_resolve_in_the_virtual_services_namespace(name: str, expected: str) -> None:
    assert resolve_gateway(name, "default") == expected


def test_cluster_names_parse() -> None:
    assert parse_cluster_name("outbound|9080|v1|reviews.default.svc.cluster.local") == (
        "outbound",
        9080,
        "v1",
        "reviews.default.svc.cluster.local",
    )
    assert parse_cluster_name("inbound|9080||") == ("inbound", 9080, "", "")
    assert parse_cluster_name("BlackHoleCluster") is None


def test_proxy_node_ids_follow_istios_format_and_round_trip() -> None:
    proxy = Proxy(
        ip="10.0.0.1",
        namespace="default",
        pod_name="reviews-v1-abc",
        labels={"app": "reviews", "version": "v1"},
        service_account="bookinfo-reviews",
        workload_name="reviews-v1",
        locality="us/east/a",
    )
    assert proxy.id == "sidecar~10.0.0.1~reviews-v1-abc.default~default.svc.cluster.local"
    again = Proxy.from_node(proxy.node())
    assert again.key == proxy.key
    assert (again.pod_name, again.workload_name) == ("reviews-v1-abc", "reviews-v1")
    router = Proxy.from_id("router~10.0.0.9~ingress-1.istio-system~istio-system.svc.cluster.local")
    assert (router.type, router.namespace, router.ip) == (
        ProxyType.ROUTER,
        "istio-system",
        "10.0.0.9",
    )
    with pytest.raises(ValueError, match="node id"):
        Proxy.from_id("nonsense")


def test_virtual_services_without_gateways_apply_to_the_mesh_only() -> None:
    sim = Simulation(
        vs("hosts: [a]\nhttp:\n- route: [{destination: {host: a}}]", name="mesh-only"),
        vs(
            "hosts: [b]\ngateways: [gw]\nhttp:\n- route: [{destination: {host: b}}]", name="gw-only"
        ),
        vs(
            "hosts: [c]\ngateways: [gw, mesh]\nhttp:\n- route: [{destination: {host: c}}]",
            name="both",
        ),
    )
    sidecar = sim.snapshot.view(CLIENT)
    assert [v.name for v in sidecar.virtual_services] == ["both", "mesh-only"]
    assert sidecar.gateway_names == {MESH_GATEWAY}
    gateways = {
        g: [v.name for v in sim.snapshot.virtual_services_for_gateway(g)] for g in ("default/gw",)
    }
    assert gateways == {"default/gw": ["both", "gw-only"]}


def test_virtual_services_are_ordered_private_then_exported_then_public() -> None:
    sim = Simulation(
        vs("hosts: [a]\nhttp:\n- route: [{destination: {host: a}}]", name="a-public"),
        vs(
            "hosts: [b]\nexportTo: ['.']\nhttp:\n- route: [{destination: {host: b}}]",
            name="z-private",
        ),
        vs(
            "hosts: [c]\nexportTo: [default]\nhttp:\n- route: [{destination: {host: c}}]",
            name="m-exported",
            namespace="other",
        ),
        vs(
            "hosts: [d]\nexportTo: ['.']\nhttp:\n- route: [{destination: {host: d}}]",
            name="hidden",
            namespace="other",
        ),
    )
    names = [v.name for v in sim.snapshot.view(CLIENT).virtual_services]
    assert names == ["z-private", "m-exported", "a-public"]


def test_export_to_hides_services_from_other_namespaces() -> None:
    sim = Simulation(
        app("public", "prod"),
        app("private", "prod").replace(
            "metadata:\n  name: private\n  namespace: prod\n",
            "metadata:\n  name: private\n  namespace: prod\n"
            "  annotations: {networking.istio.io/exportTo: .}\n",
            1,
        ),
    )
    other = {s.name for s in sim.snapshot.view(CLIENT).services}
    same = {s.name for s in sim.snapshot.view(Simulation.client(namespace="prod")).services}
    assert other == {"public"}
    assert same == {"public", "private"}


def reviews_rule(namespace: str, lb: str, export: str = "") -> str:
    body = (
        "host: reviews.default.svc.cluster.local\n"
        f"trafficPolicy: {{loadBalancer: {{simple: {lb}}}}}"
    )
    if export:
        body += f"\nexportTo: [{export}]"
    return dr(body, name=f"r-{namespace}", namespace=namespace)


def lb_for(sim: Simulation, proxy: Proxy) -> str:
    service = sim.snapshot.view(proxy).service("reviews.default.svc.cluster.local")
    assert service is not None
    rule = sim.snapshot.view(proxy).destination_rule(service)
    assert rule is not None and rule.traffic_policy is not None
    assert rule.traffic_policy.load_balancer is not None
    return str(rule.traffic_policy.load_balancer.simple)


def test_destination_rules_come_from_the_proxys_then_the_services_then_the_root_namespace() -> None:
    docs = [
        app("reviews"),
        reviews_rule("istio-system", "RANDOM"),
        reviews_rule("default", "ROUND_ROBIN"),
        reviews_rule("client-ns", "LEAST_REQUEST"),
    ]
    sim = Simulation(*docs)
    assert lb_for(sim, Simulation.client(namespace="client-ns")) == "LEAST_REQUEST"
    assert lb_for(sim, Simulation.client(namespace="elsewhere")) == "ROUND_ROBIN"
    sim = Simulation(docs[0], docs[1])
    assert lb_for(sim, Simulation.client(namespace="elsewhere")) == "RANDOM"


def test_a_rule_not_exported_to_the_proxy_is_passed_over() -> None:
    sim = Simulation(
        app("reviews"),
        reviews_rule("istio-system", "RANDOM"),
        reviews_rule("default", "ROUND_ROBIN", export="'.'"),
    )
    assert lb_for(sim, CLIENT) == "ROUND_ROBIN"  # the proxy's own namespace sees it
    assert lb_for(sim, Simulation.client(namespace="elsewhere")) == "RANDOM"


def test_the_most_specific_host_wins_and_rules_for_one_host_merge() -> None:
    sim = Simulation(
        app("reviews", versions=("v1", "v2")),
        dr(
            "host: '*.default.svc.cluster.local'\ntrafficPolicy: {loadBalancer: {simple: RANDOM}}",
            name="wild",
        ),
        dr(
            "host: reviews\ntrafficPolicy: {loadBalancer: {simple: ROUND_ROBIN}}\n"
            "subsets: [{name: v1, labels: {version: v1}}]",
            name="a",
        ),
        dr(
            "host: reviews\ntrafficPolicy: {loadBalancer: {simple: LEAST_REQUEST}}\n"
            "subsets: [{name: v1, labels: {version: x}}, {name: v2, labels: {version: v2}}]",
            name="b",
        ),
    )
    view = sim.snapshot.view(CLIENT)
    service = view.service("reviews.default.svc.cluster.local")
    assert service is not None
    rule = view.destination_rule(service)
    assert rule is not None
    assert [s.name for s in rule.subsets] == ["v1", "v2"]
    assert rule.subset("v1") is not None and rule.subset("v1").labels == {"version": "v1"}  # type: ignore[union-attr]
    assert lb_for(sim, CLIENT) == "ROUND_ROBIN"


def test_a_workload_selector_rule_applies_only_to_the_workloads_it_selects() -> None:
    sim = Simulation(
        app("reviews"),
        reviews_rule("default", "ROUND_ROBIN"),
        dr(
            "host: reviews\nworkloadSelector: {matchLabels: {app: productpage}}\n"
            "trafficPolicy: {loadBalancer: {simple: RANDOM}}",
            name="selected",
        ),
    )
    assert lb_for(sim, Simulation.client(labels={"app": "productpage"})) == "RANDOM"
    assert lb_for(sim, CLIENT) == "ROUND_ROBIN"


SIDECAR = """
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {{name: {name}, namespace: {namespace}}}
spec:
{spec}
"""


def test_a_sidecar_scopes_the_services_and_virtual_services_a_proxy_receives() -> None:
    sim = Simulation(
        app("reviews"),
        app("ratings"),
        app("other", "elsewhere"),
        vs("hosts: [ratings]\nhttp:\n- route: [{destination: {host: ratings}}]", name="ratings"),
        SIDECAR.format(
            name="default",
            namespace="default",
            spec="  egress:\n  - hosts: ['./reviews.default.svc.cluster.local', 'istio-system/*']",
        ),
    )
    view = sim.snapshot.view(CLIENT)
    assert [s.name for s in view.services] == ["reviews"]
    assert view.virtual_services == ()
    clusters = {c.name for c in sim.build(CLIENT).clusters}
    assert "outbound|9080||reviews.default.svc.cluster.local" in clusters
    assert "outbound|9080||ratings.default.svc.cluster.local" not in clusters
    # Another namespace is not scoped by default's Sidecar.
    assert len(sim.snapshot.view(Simulation.client(namespace="x")).services) == 3


def test_a_selecting_sidecar_beats_the_namespace_one_which_beats_the_root_one() -> None:
    sim = Simulation(
        SIDECAR.format(
            name="root",
            namespace="istio-system",
            spec="  outboundTrafficPolicy: {mode: REGISTRY_ONLY}",
        ),
        SIDECAR.format(
            name="ns",
            namespace="default",
            spec="  outboundTrafficPolicy: {mode: ALLOW_ANY}",
        ),
        SIDECAR.format(
            name="selecting",
            namespace="default",
            spec=(
                "  workloadSelector: {labels: {app: x}}\n"
                "  outboundTrafficPolicy: {mode: REGISTRY_ONLY}"
            ),
        ),
    )
    assert sim.snapshot.view(Simulation.client(labels={"app": "x"})).sidecar.name == "selecting"  # type: ignore[union-attr]
    assert sim.snapshot.view(CLIENT).outbound_policy is OutboundTrafficPolicyMode.ALLOW_ANY
    elsewhere = sim.snapshot.view(Simulation.client(namespace="elsewhere"))
    assert elsewhere.outbound_policy is OutboundTrafficPolicyMode.REGISTRY_ONLY


def test_a_kubernetes_service_beats_a_service_entry_for_the_same_hostname() -> None:
    sim = Simulation(
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: se}\n"
        "spec: {hosts: [reviews.default.svc.cluster.local], ports: [{number: 9080, name: http}], "
        "resolution: DNS}",
        app("reviews"),
    )
    service = sim.snapshot.view(CLIENT).service("reviews.default.svc.cluster.local")
    assert service is not None and service.is_kubernetes


def test_views_are_cached_per_proxy_identity() -> None:
    sim = Simulation(app("reviews"))
    assert sim.snapshot.view(CLIENT) is sim.snapshot.view(Simulation.client())
    assert sim.snapshot.view(CLIENT) is not sim.snapshot.view(Simulation.client(labels={"a": "b"}))
