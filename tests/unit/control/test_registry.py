"""The service registry read from configuration (``ISTIO-TRANSLATION.md`` §4.1; Istio's
``kube.ConvertProtocol`` and ``serviceentry/conversion.go``)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshlet.api import load_documents
from meshlet.api.networking import Location, Resolution
from meshlet.control.registry import (
    AggregateRegistry,
    ConfigRegistry,
    Endpoint,
    PortProtocol,
    Service,
    ServicePort,
    StaticRegistry,
    Workload,
    WorkloadIndex,
    parse_protocol,
    port_protocol,
)


def registry(text: str, workloads: list[Workload] | None = None) -> ConfigRegistry:
    return ConfigRegistry(load_documents(text, "t.yaml"), workloads=workloads or [])


def only(reg: ConfigRegistry) -> Service:
    [service] = reg.services()
    return service


@pytest.mark.parametrize(
    ("name", "number", "app_protocol", "expected"),
    [
        ("http", 80, "", PortProtocol.HTTP),
        ("http-web", 80, "", PortProtocol.HTTP),
        ("HTTP2", 80, "", PortProtocol.HTTP2),
        ("grpc", 80, "", PortProtocol.GRPC),
        ("grpc-web", 80, "", PortProtocol.GRPC_WEB),
        ("grpc-web-x", 80, "", PortProtocol.GRPC_WEB),
        ("tcp-db", 80, "", PortProtocol.TCP),
        ("https", 443, "", PortProtocol.HTTPS),
        ("mongo", 27017, "", PortProtocol.MONGO),
        ("", 8080, "", PortProtocol.UNSUPPORTED),
        ("web", 8080, "", PortProtocol.UNSUPPORTED),
        ("", 3306, "", PortProtocol.TCP),  # a well-known port
        ("web", 80, "http", PortProtocol.HTTP),  # appProtocol wins
        ("tcp", 80, "kubernetes.io/h2c", PortProtocol.HTTP2),
        ("tcp", 80, "kubernetes.io/ws", PortProtocol.HTTP),
    ],
)
def test_port_protocol_from_app_protocol_or_name_prefix(
    name: str, number: int, app_protocol: str, expected: PortProtocol
) -> None:
    assert port_protocol(name, number=number, app_protocol=app_protocol) is expected


def test_udp_ports_are_udp_and_protocol_names_ignore_case() -> None:
    assert port_protocol("http", udp=True) is PortProtocol.UDP
    assert parse_protocol("Http") is PortProtocol.HTTP
    assert parse_protocol("nonsense") is PortProtocol.UNSUPPORTED
    assert PortProtocol.UNSUPPORTED.carries_http_routes and not PortProtocol.TCP.carries_http_routes


KUBE = """
apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: prod, labels: {app: reviews}}
spec:
  clusterIP: 10.96.0.10
  selector: {app: reviews}
  ports:
  - {name: http, port: 9080}
  - {name: http-admin, port: 80, targetPort: admin}
  - {name: tcp-raw, port: 81, targetPort: 8181}
"""


def pod(name: str, address: str, *, ready: bool = True, **labels: str) -> Workload:
    return Workload(
        name=name,
        namespace="prod",
        address=address,
        labels={"app": "reviews", **labels},
        ports={"admin": 9901},
        ready=ready,
        service_account="reviews",
    )


def test_a_kubernetes_service_and_the_pods_it_selects() -> None:
    reg = registry(
        KUBE,
        [
            pod("a", "10.0.0.1"),
            pod("b", "10.0.0.2", ready=False),
            Workload(name="c", namespace="prod", address="10.0.0.3", labels={"app": "other"}),
            Workload(name="d", namespace="dev", address="10.0.0.4", labels={"app": "reviews"}),
        ],
    )
    service = only(reg)
    assert service.hostname == "reviews.prod.svc.cluster.local"
    assert (service.namespace, service.name, service.addresses) == (
        "prod",
        "reviews",
        ("10.96.0.10",),
    )
    assert service.resolution is Resolution.STATIC and service.location is Location.MESH_INTERNAL
    assert [(p.port, p.protocol) for p in service.ports] == [
        (9080, PortProtocol.HTTP),
        (80, PortProtocol.HTTP),
        (81, PortProtocol.TCP),
    ]
    http = reg.endpoints(service, 9080)
    assert [(e.address, e.port, e.ready) for e in http] == [
        ("10.0.0.1", 9080, True),
        ("10.0.0.2", 9080, False),
    ]
    assert http[0].service_account == "reviews" and http[0].workload == "a"
    # A named target port resolves per pod; a number is used as given.
    assert [(e.address, e.port) for e in reg.endpoints(service, 80)] == [
        ("10.0.0.1", 9901),
        ("10.0.0.2", 9901),
    ]
    assert {e.port for e in reg.endpoints(service, 81)} == {8181}
    assert reg.endpoints(service, 12345) == ()


def test_a_pod_without_the_named_target_port_is_no_endpoint_of_it() -> None:
    reg = registry(
        KUBE, [Workload(name="x", namespace="prod", address="10.0.0.9", labels={"app": "reviews"})]
    )
    service = only(reg)
    assert reg.endpoints(service, 80) == ()
    assert len(reg.endpoints(service, 9080)) == 1


def test_headless_external_name_and_export_annotations() -> None:
    reg = registry(
        """
apiVersion: v1
kind: Service
metadata: {name: db, annotations: {networking.istio.io/exportTo: "."}}
spec: {clusterIP: None, selector: {app: db}, ports: [{name: tcp, port: 5432}]}
---
apiVersion: v1
kind: Service
metadata: {name: ext}
spec: {type: ExternalName, externalName: api.example.com, ports: [{name: http, port: 80}]}
        """
    )
    db, ext = reg.services()
    assert (db.headless, db.resolution, db.export_to) == (
        True,
        Resolution.NONE,
        frozenset({"default"}),
    )
    assert db.visible_to("default") and not db.visible_to("other")
    assert (ext.resolution, ext.external_name) == (Resolution.DNS, "api.example.com")
    assert [(e.address, e.port) for e in reg.endpoints(ext, 80)] == [("api.example.com", 80)]


SERVICE_ENTRY = """
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: ext, namespace: egress}
spec:
  hosts: [a.example.com, b.example.com]
  addresses: [192.0.2.10]
  ports:
  - {number: 80, name: http, protocol: HTTP}
  - {number: 443, name: https, protocol: HTTPS, targetPort: 8443}
  location: MESH_INTERNAL
  resolution: STATIC
  exportTo: ["."]
  endpoints:
  - {address: 192.0.2.1, ports: {http: 8080}, labels: {version: v1}, locality: us/east/a, weight: 3}
  - {address: 192.0.2.2, serviceAccount: vm}
"""


def test_a_service_entry_is_one_service_per_host_with_its_inline_endpoints() -> None:
    reg = registry(SERVICE_ENTRY)
    a, b = reg.services()
    assert (a.hostname, b.hostname) == ("a.example.com", "b.example.com")
    assert (a.namespace, a.addresses, a.resolution, a.location) == (
        "egress",
        ("192.0.2.10",),
        Resolution.STATIC,
        Location.MESH_INTERNAL,
    )
    assert a.export_to == frozenset({"egress"})
    assert [p.protocol for p in a.ports] == [PortProtocol.HTTP, PortProtocol.HTTPS]
    http = reg.endpoints(a, 80)
    # ports[name] wins; otherwise the targetPort, otherwise the service port.
    assert [(e.address, e.port) for e in http] == [("192.0.2.1", 8080), ("192.0.2.2", 80)]
    assert [(e.address, e.port) for e in reg.endpoints(b, 443)] == [
        ("192.0.2.1", 8443),
        ("192.0.2.2", 8443),
    ]
    first, second = http
    assert (first.labels, first.locality, first.weight, first.tls_mode) == (
        {"version": "v1"},
        "us/east/a",
        3,
        "disabled",
    )
    assert (second.service_account, second.tls_mode) == ("vm", "istio")


def test_service_entry_dns_without_endpoints_resolves_the_host_and_none_has_no_endpoints() -> None:
    reg = registry(
        """
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: dns}
spec:
  hosts: [api.example.com]
  ports: [{number: 443, name: tls, protocol: TLS, targetPort: 8443}]
  resolution: DNS
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: none}
spec: {hosts: [any.example.com], ports: [{number: 80, name: http}], resolution: NONE}
        """
    )
    dns, none = reg.services()
    assert [(e.address, e.port) for e in reg.endpoints(dns, 443)] == [("api.example.com", 8443)]
    assert reg.endpoints(none, 80) == ()
    assert dns.location is Location.MESH_EXTERNAL  # the default


def test_a_workload_selector_picks_workload_entries_in_the_entrys_namespace() -> None:
    reg = registry(
        """
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: vm-1, namespace: vms}
spec: {address: 203.0.113.1, labels: {app: legacy}, ports: {http: 8000}, serviceAccount: legacy}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: vm-2, namespace: other}
spec: {address: 203.0.113.2, labels: {app: legacy}}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: legacy, namespace: vms}
spec:
  hosts: [legacy.vms.example]
  ports: [{number: 80, name: http}]
  resolution: STATIC
  workloadSelector: {labels: {app: legacy}}
---
apiVersion: v1
kind: Service
metadata: {name: legacy, namespace: vms}
spec: {selector: {app: legacy}, ports: [{name: http, port: 80, targetPort: 8000}]}
        """
    )
    kube, entry = reg.services()
    [ep] = reg.endpoints(entry, 80)
    assert (ep.address, ep.port, ep.service_account, ep.tls_mode) == (
        "203.0.113.1",
        8000,
        "legacy",
        "istio",
    )
    # Kubernetes Services select WorkloadEntries too.
    assert [(e.address, e.port) for e in reg.endpoints(kube, 80)] == [("203.0.113.1", 8000)]


def test_pods_with_an_ip_in_their_status_are_workloads() -> None:
    reg = registry(
        """
apiVersion: v1
kind: Pod
metadata: {name: web-1, labels: {app: web}}
spec: {containers: [{name: web, image: x, ports: [{containerPort: 8080, name: http}]}]}
status: {podIP: 10.1.0.5, conditions: [{type: Ready, status: "False"}]}
---
apiVersion: v1
kind: Pod
metadata: {name: web-2, labels: {app: web}}
spec: {containers: [{name: web, image: x}]}
---
apiVersion: v1
kind: Service
metadata: {name: web}
spec: {selector: {app: web}, ports: [{name: http, port: 80, targetPort: http}]}
        """
    )
    [ep] = reg.endpoints(only(reg), 80)
    assert (ep.address, ep.port, ep.ready, ep.service_account) == (
        "10.1.0.5",
        8080,
        False,
        "default",
    )


def test_static_and_aggregate_registries() -> None:
    port = ServicePort(name="http", port=80, protocol=PortProtocol.HTTP)
    a = Service(hostname="a.example", namespace="x", name="a", ports=(port,))
    b = Service(hostname="b.example", namespace="x", name="b", ports=(port,))
    ep = Endpoint(address="192.0.2.1", port=80)
    first = StaticRegistry([a], {("a.example", 80): [ep]})
    second = StaticRegistry([b])
    both = AggregateRegistry(first, second)
    assert list(both.services()) == [a, b]
    assert list(both.endpoints(a, 80)) == [ep]
    assert list(both.endpoints(b, 80)) == []


LABELS = st.dictionaries(
    st.sampled_from(["app", "version", "tier"]), st.sampled_from(["a", "b"]), max_size=3
)


@given(
    workloads=st.lists(st.tuples(st.sampled_from(["ns1", "ns2"]), LABELS), max_size=30),
    namespace=st.sampled_from(["ns1", "ns2"]),
    selector=LABELS,
)
def test_the_workload_index_selects_exactly_what_a_scan_selects(
    workloads: list[tuple[str, dict[str, str]]], namespace: str, selector: dict[str, str]
) -> None:
    items = [
        Workload(name=f"w{i}", namespace=ns, address=f"10.0.0.{i}", labels=labels)
        for i, (ns, labels) in enumerate(workloads)
    ]
    index = WorkloadIndex(items)
    expected = [
        w
        for w in items
        if w.namespace == namespace and all(w.labels.get(k) == v for k, v in selector.items())
    ]
    assert sorted(w.name for w in index.select(namespace, selector)) == sorted(
        w.name for w in expected
    )
