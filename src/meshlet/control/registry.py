"""The service registry: the mesh's services and their endpoints, as translation sees them.

A ``Service`` is one hostname with its ports (istiod's ``model.Service``); an ``Endpoint`` is
one address behind one service port (istiod's ``IstioEndpoint``). Whatever knows where
workloads run implements ``Registry``: the embedded runtime (pods as processes), Kubernetes
(later), and here ``ConfigRegistry``, which reads them from configuration -- ServiceEntry,
WorkloadEntry, and Kubernetes Services over the workloads they select.

Rules kept (``ISTIO-TRANSLATION.md`` §4.1, Istio's ``kube.ConvertProtocol`` and
``serviceentry/conversion.go``):

* A Kubernetes Service ``reviews`` in ``default`` is ``reviews.default.svc.cluster.local``;
  a ServiceEntry gives one service per host, named as written.
* A port's protocol comes from ``appProtocol``, else from the port name's prefix before the
  first ``-`` (``http-web`` is HTTP, ``grpc-web`` is gRPC-Web); unknown names are
  ``UNSUPPORTED`` (auto-detected), except well-known TCP ports (22, 25, 53, 3306, 27017).
  UDP ports are UDP. A ServiceEntry port names its protocol outright.
* ServiceEntry endpoints: the port is the endpoint's ``ports[name]``, else ``targetPort``,
  else the service port; with resolution DNS and neither endpoints nor a selector, the
  endpoint is the host itself. Resolution NONE has no endpoints.
* An endpoint's ``tls_mode`` is the ``security.istio.io/tlsMode`` label, else ``istio`` when
  it has a service account (ServiceEntry endpoints), else ``disabled``.

Nothing here does I/O; registries are immutable values built once per configuration.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol

from meshlet.api import LoadedResource, Resource
from meshlet.api import kube as k8s
from meshlet.api.networking import Location, Resolution, ServiceEntry, WorkloadEntry

DEFAULT_DOMAIN_SUFFIX = "cluster.local"
TLS_MODE_LABEL = "security.istio.io/tlsMode"
EXPORT_TO_ANNOTATION = "networking.istio.io/exportTo"
# On a pod whose sidecar receives its inbound traffic on this port of the pod IP, because
# nothing captures traffic to the application's ports (meshlet's embedded runtime).
INBOUND_PORT_ANNOTATION = "sidecar.meshlet.dev/inbound-port"
PUBLIC = "*"


class PortProtocol(StrEnum):
    """A service port's protocol (Istio's ``protocol.Instance``)."""

    HTTP = "HTTP"
    HTTP2 = "HTTP2"
    HTTP_PROXY = "HTTP_PROXY"
    GRPC = "GRPC"
    GRPC_WEB = "GRPC-Web"
    HTTPS = "HTTPS"
    TCP = "TCP"
    TLS = "TLS"
    UDP = "UDP"
    MONGO = "Mongo"
    MYSQL = "MySQL"
    REDIS = "Redis"
    UNSUPPORTED = "UnsupportedProtocol"  # not declared: Istio sniffs it (treated as HTTP here)

    @property
    def is_http(self) -> bool:
        return self in _HTTP_PROTOCOLS

    @property
    def is_http2(self) -> bool:
        """Spoken as HTTP/2 upstream (h2c): HTTP2, gRPC and gRPC-Web ports."""
        return self in (PortProtocol.HTTP2, PortProtocol.GRPC, PortProtocol.GRPC_WEB)

    @property
    def is_grpc(self) -> bool:
        return self in (PortProtocol.GRPC, PortProtocol.GRPC_WEB)

    @property
    def carries_http_routes(self) -> bool:
        """HTTP ports, and undeclared ones (Istio sniffs them and gives them HTTP routes)."""
        return self.is_http or self is PortProtocol.UNSUPPORTED


_HTTP_PROTOCOLS = frozenset(
    {
        PortProtocol.HTTP,
        PortProtocol.HTTP2,
        PortProtocol.HTTP_PROXY,
        PortProtocol.GRPC,
        PortProtocol.GRPC_WEB,
    }
)
_BY_NAME = {
    "tcp": PortProtocol.TCP,
    "udp": PortProtocol.UDP,
    "grpc": PortProtocol.GRPC,
    "grpc-web": PortProtocol.GRPC_WEB,
    "http": PortProtocol.HTTP,
    "http_proxy": PortProtocol.HTTP_PROXY,
    "http2": PortProtocol.HTTP2,
    "https": PortProtocol.HTTPS,
    "tls": PortProtocol.TLS,
    "mongo": PortProtocol.MONGO,
    "redis": PortProtocol.REDIS,
    "mysql": PortProtocol.MYSQL,
}
_WELL_KNOWN_TCP_PORTS = frozenset({22, 25, 53, 3306, 27017})  # Istio's wellKnownPorts


def parse_protocol(value: str) -> PortProtocol:
    """Istio's ``protocol.Parse``: a protocol name in any case; anything else UNSUPPORTED."""
    return _BY_NAME.get(value.lower(), PortProtocol.UNSUPPORTED)


def port_protocol(
    name: str, *, number: int = 0, app_protocol: str = "", udp: bool = False
) -> PortProtocol:
    """A Kubernetes service port's protocol (Istio's ``kube.ConvertProtocol``)."""
    if udp:
        return PortProtocol.UDP
    text = name
    if app_protocol:
        text = app_protocol
        special = {
            "kubernetes.io/h2c": PortProtocol.HTTP2,
            "kubernetes.io/ws": PortProtocol.HTTP,
            "kubernetes.io/wss": PortProtocol.HTTPS,
        }.get(app_protocol)
        if special is not None:
            return special
    if text.lower().startswith("grpc-web"):
        return PortProtocol.GRPC_WEB
    protocol = parse_protocol(text.partition("-")[0])
    if protocol is PortProtocol.UNSUPPORTED and number in _WELL_KNOWN_TCP_PORTS:
        return PortProtocol.TCP
    return protocol


# -- values ----------------------------------------------------------------------------------


class ServiceSource(StrEnum):
    KUBERNETES = "Kubernetes"
    SERVICE_ENTRY = "ServiceEntry"
    RUNTIME = "Runtime"  # the embedded runtime's own services


@dataclass(frozen=True, slots=True, kw_only=True)
class ServicePort:
    """One port of a service. ``target_port``: a number or a container port name (Kubernetes),
    a number (ServiceEntry ``targetPort``), or None (the service port itself)."""

    name: str
    port: int
    protocol: PortProtocol
    target_port: int | str | None = None


@dataclass(frozen=True, slots=True, kw_only=True, eq=False)
class Service:
    """One service hostname. Compared by identity: two entries may share a hostname."""

    hostname: str
    namespace: str
    name: str
    ports: tuple[ServicePort, ...]
    addresses: tuple[str, ...] = ()  # VIPs; empty when the service has none
    resolution: Resolution = Resolution.STATIC
    location: Location = Location.MESH_INTERNAL
    export_to: frozenset[str] = frozenset({PUBLIC})  # namespaces, or {"*"}; empty: no one
    labels: Mapping[str, str] = field(default_factory=dict)
    source: ServiceSource = ServiceSource.KUBERNETES
    creation: str = ""  # creationTimestamp, for Istio's "oldest wins"
    headless: bool = False
    external_name: str = ""  # Kubernetes ExternalName services
    subject_alt_names: tuple[str, ...] = ()

    def __repr__(self) -> str:
        ports = ",".join(f"{p.port}/{p.protocol.value}" for p in self.ports)
        return f"<Service {self.hostname} [{ports}] {self.resolution.value}>"

    def port(self, number: int) -> ServicePort | None:
        for p in self.ports:
            if p.port == number:
                return p
        return None

    def visible_to(self, namespace: str) -> bool:
        """exportTo: whether proxies in ``namespace`` may see this service."""
        return PUBLIC in self.export_to or namespace in self.export_to

    @property
    def mesh_external(self) -> bool:
        return self.location is Location.MESH_EXTERNAL

    @property
    def is_kubernetes(self) -> bool:
        return self.source is not ServiceSource.SERVICE_ENTRY


@dataclass(frozen=True, slots=True, kw_only=True, eq=False)
class Endpoint:
    """One address serving one service port. ``port`` is where to connect (the target port)."""

    address: str
    port: int
    labels: Mapping[str, str] = field(default_factory=dict)
    ready: bool = True
    locality: str = ""  # region/zone/subzone
    service_account: str = ""
    network: str = ""
    weight: int = 0  # 0: unset (counts as 1)
    workload: str = ""  # the pod or WorkloadEntry name
    namespace: str = ""
    tls_mode: str = "disabled"  # "istio" when the workload speaks Istio mTLS
    inbound_port: int = 0  # its sidecar's inbound listener, where clients connect (0: none)

    @property
    def connect_port(self) -> int:
        """Where a client connects: the sidecar's inbound listener when traffic to the
        workload is not captured (the embedded runtime), else the target port itself."""
        return self.inbound_port or self.port

    def __repr__(self) -> str:
        state = "" if self.ready else " not-ready"
        return f"<Endpoint {self.address}:{self.port}{state}>"

    def matches(self, labels: Mapping[str, str]) -> bool:
        """Whether ``labels`` is a subset of this endpoint's labels (subset selection)."""
        own = self.labels
        return all(own.get(k) == v for k, v in labels.items())


@dataclass(frozen=True, slots=True, kw_only=True, eq=False)
class Workload:
    """A pod or a WorkloadEntry: what service selectors choose among.

    ``ports`` maps container (or WorkloadEntry) port names to numbers, for named target ports.
    """

    name: str
    namespace: str
    address: str
    labels: Mapping[str, str] = field(default_factory=dict)
    ports: Mapping[str, int] = field(default_factory=dict)
    ready: bool = True
    locality: str = ""
    service_account: str = ""
    network: str = ""
    weight: int = 0
    from_workload_entry: bool = False
    inbound_port: int = 0  # INBOUND_PORT_ANNOTATION: its sidecar listens there, uncaptured

    def __repr__(self) -> str:
        return f"<Workload {self.namespace}/{self.name} {self.address}>"

    @property
    def tls_mode(self) -> str:
        mode = self.labels.get(TLS_MODE_LABEL)
        if mode:
            return mode
        return "istio" if self.from_workload_entry and self.service_account else "disabled"


# -- the interface ---------------------------------------------------------------------------


class Registry(Protocol):
    """Where services and their endpoints come from.

    ``services()`` lists every service in a stable order (older first where it matters:
    Istio's "oldest wins" for duplicate hostnames). ``endpoints(service, port)`` gives the
    endpoints of one of those services' port (a ``ServicePort.port``), ready or not; an
    unknown service or port gives none. Neither raises.
    """

    def services(self) -> Sequence[Service]: ...

    def endpoints(self, service: Service, port: int) -> Sequence[Endpoint]: ...


class StaticRegistry:
    """Services and endpoints given outright (tests, and simple embeddings).

    ``endpoints`` is keyed by ``(hostname, service port)``.
    """

    def __init__(
        self,
        services: Iterable[Service],
        endpoints: Mapping[tuple[str, int], Sequence[Endpoint]] | None = None,
    ) -> None:
        self._services = tuple(services)
        self._endpoints = dict(endpoints or {})

    def __repr__(self) -> str:
        count = sum(len(v) for v in self._endpoints.values())
        return f"<StaticRegistry [{len(self._services)} services, {count} endpoints]>"

    def services(self) -> Sequence[Service]:
        return self._services

    def endpoints(self, service: Service, port: int) -> Sequence[Endpoint]:
        return self._endpoints.get((service.hostname, port), ())


class AggregateRegistry:
    """Several registries seen as one (istiod's aggregate controller), in the order given."""

    def __init__(self, *registries: Registry) -> None:
        self._registries = registries
        self._services: list[Service] = []
        self._owner: dict[int, Registry] = {}
        for registry in registries:
            for service in registry.services():
                self._services.append(service)
                self._owner[id(service)] = registry

    def __repr__(self) -> str:
        return f"<AggregateRegistry [{len(self._registries)} registries]>"

    def services(self) -> Sequence[Service]:
        return self._services

    def endpoints(self, service: Service, port: int) -> Sequence[Endpoint]:
        owner = self._owner.get(id(service))
        return owner.endpoints(service, port) if owner is not None else ()


# -- the registry read from configuration -----------------------------------------------------


class ConfigRegistry:
    """Services and endpoints from configuration: ServiceEntry, WorkloadEntry, Kubernetes
    Services (over the workloads they select), and Pods that carry ``status.podIP``.

    ``workloads`` adds pods known otherwise (the embedded runtime's, or a test's). Other
    kinds in ``resources`` are ignored.
    """

    def __init__(
        self,
        resources: Iterable[LoadedResource | Resource],
        *,
        workloads: Iterable[Workload] = (),
        domain_suffix: str = DEFAULT_DOMAIN_SUFFIX,
    ) -> None:
        self.domain_suffix = domain_suffix
        entries: list[tuple[Resource, str]] = []
        kube_services: list[tuple[k8s.Service, str]] = []
        all_workloads = list(workloads)
        for item in resources:
            model, namespace = _unwrap(item)
            if isinstance(model, ServiceEntry):
                entries.append((model, namespace))
            elif isinstance(model, k8s.Service):
                kube_services.append((model, namespace))
            elif isinstance(model, WorkloadEntry):
                all_workloads.append(_workload_from_entry(model, namespace))
            elif isinstance(model, k8s.Pod):
                pod = _workload_from_pod(model, namespace)
                if pod is not None:
                    all_workloads.append(pod)
        self._index = WorkloadIndex(all_workloads)
        self._services: list[Service] = []
        self._endpoints: dict[tuple[int, int], tuple[Endpoint, ...]] = {}
        for svc, namespace in kube_services:
            self._add_kube_service(svc, namespace)
        for se, namespace in entries:
            assert isinstance(se, ServiceEntry)
            self._add_service_entry(se, namespace)

    def __repr__(self) -> str:
        count = sum(len(v) for v in self._endpoints.values())
        return f"<ConfigRegistry [{len(self._services)} services, {count} endpoints]>"

    def services(self) -> Sequence[Service]:
        return self._services

    def endpoints(self, service: Service, port: int) -> Sequence[Endpoint]:
        return self._endpoints.get((id(service), port), ())

    # -- Kubernetes Services ---------------------------------------------------------------

    def _add_kube_service(self, svc: k8s.Service, namespace: str) -> None:
        spec = svc.spec
        meta = svc.metadata
        hostname = f"{meta.name}.{namespace}.svc.{self.domain_suffix}"
        ports = tuple(
            ServicePort(
                name=p.name,
                port=p.port,
                protocol=port_protocol(
                    p.name,
                    number=p.port,
                    app_protocol=p.app_protocol,
                    udp=p.protocol is k8s.Protocol.UDP,
                ),
                target_port=p.effective_target_port,
            )
            for p in spec.ports
        )
        external = spec.type is k8s.ServiceType.EXTERNAL_NAME
        if external:
            resolution = Resolution.DNS
        elif spec.headless:
            resolution = Resolution.NONE
        else:
            resolution = Resolution.STATIC
        addresses = tuple(a for a in (spec.cluster_ips or (spec.cluster_ip,)) if _is_ip(a))
        service = Service(
            hostname=hostname,
            namespace=namespace,
            name=meta.name,
            ports=ports,
            addresses=addresses,
            resolution=resolution,
            location=Location.MESH_INTERNAL,
            export_to=exported_to(
                tuple(
                    v.strip()
                    for v in meta.annotations.get(EXPORT_TO_ANNOTATION, "").split(",")
                    if v.strip()
                ),
                namespace,
            ),
            labels=dict(meta.labels),
            source=ServiceSource.KUBERNETES,
            creation=meta.creation_timestamp or "",
            headless=spec.headless,
            external_name=spec.external_name if external else "",
        )
        self._services.append(service)
        if external:
            for p in ports:
                self._endpoints[(id(service), p.port)] = (
                    Endpoint(address=spec.external_name, port=p.port, namespace=namespace),
                )
            return
        if not spec.selector:
            return  # endpoints of selector-less services are managed elsewhere
        selected = self._index.select(namespace, spec.selector)
        for p in ports:
            endpoints: list[Endpoint] = []
            for w in selected:
                target = p.target_port if p.target_port is not None else p.port
                number = w.ports.get(target) if isinstance(target, str) else target
                if number is None:
                    continue  # the pod does not declare the named port
                endpoints.append(_endpoint(w, number))
            self._endpoints[(id(service), p.port)] = tuple(endpoints)

    # -- ServiceEntry ----------------------------------------------------------------------

    def _add_service_entry(self, se: ServiceEntry, namespace: str) -> None:
        spec = se.spec
        meta = se.metadata
        ports = tuple(
            ServicePort(
                name=p.name,
                port=p.number,
                protocol=parse_protocol(p.protocol),
                target_port=p.target_port or None,
            )
            for p in spec.ports
        )
        export_to = exported_to(spec.export_to, namespace)
        selected: list[Workload] = []
        if spec.workload_selector is not None:
            selected = self._index.select(namespace, spec.workload_selector.labels)
        for host in spec.hosts:
            service = Service(
                hostname=host,
                namespace=namespace,
                name=meta.name,
                ports=ports,
                addresses=tuple(a for a in spec.addresses if _is_ip(a)),
                resolution=spec.resolution,
                location=spec.location,
                export_to=export_to,
                labels=dict(meta.labels),
                source=ServiceSource.SERVICE_ENTRY,
                creation=meta.creation_timestamp or "",
                subject_alt_names=spec.subject_alt_names,
            )
            self._services.append(service)
            if spec.resolution is Resolution.NONE:
                continue
            for p in ports:
                default_port = p.target_port if isinstance(p.target_port, int) else p.port
                endpoints: list[Endpoint] = []
                for ep in spec.endpoints:
                    if ep.address.startswith("unix://") or not ep.address:
                        continue  # Unix sockets and network-gateway-only endpoints: not here
                    mode = ep.labels.get(TLS_MODE_LABEL) or (
                        "istio" if ep.service_account else "disabled"
                    )
                    endpoints.append(
                        Endpoint(
                            address=ep.address,
                            port=ep.ports.get(p.name, default_port),
                            labels=dict(ep.labels),
                            locality=ep.locality,
                            service_account=ep.service_account,
                            network=ep.network,
                            weight=ep.weight,
                            namespace=namespace,
                            tls_mode=mode,
                        )
                    )
                for w in selected:
                    endpoints.append(_endpoint(w, w.ports.get(p.name, default_port)))
                if (
                    not spec.endpoints
                    and spec.workload_selector is None
                    and spec.resolution in (Resolution.DNS, Resolution.DNS_ROUND_ROBIN)
                    and not host.startswith("*")
                ):
                    endpoints.append(Endpoint(address=host, port=default_port, namespace=namespace))
                self._endpoints[(id(service), p.port)] = tuple(endpoints)


# -- helpers ---------------------------------------------------------------------------------


class WorkloadIndex:
    """Workloads by namespace and by label, so that a selector costs its smallest label set
    rather than a scan of every workload."""

    def __init__(self, workloads: Iterable[Workload]) -> None:
        self._by_namespace: dict[str, list[Workload]] = {}
        self._by_label: dict[tuple[str, str, str], list[Workload]] = {}
        for w in workloads:
            self._by_namespace.setdefault(w.namespace, []).append(w)
            for key, value in w.labels.items():
                self._by_label.setdefault((w.namespace, key, value), []).append(w)

    def select(self, namespace: str, selector: Mapping[str, str]) -> list[Workload]:
        if not selector:
            return list(self._by_namespace.get(namespace, ()))
        candidates: list[Workload] | None = None
        for key, value in selector.items():
            found = self._by_label.get((namespace, key, value))
            if not found:
                return []
            if candidates is None or len(found) < len(candidates):
                candidates = found
        assert candidates is not None
        return [w for w in candidates if all(w.labels.get(k) == v for k, v in selector.items())]


def _endpoint(w: Workload, port: int) -> Endpoint:
    return Endpoint(
        address=w.address,
        port=port,
        labels=w.labels,
        ready=w.ready,
        locality=w.locality,
        service_account=w.service_account,
        network=w.network,
        weight=w.weight,
        workload=w.name,
        namespace=w.namespace,
        tls_mode=w.tls_mode,
        inbound_port=w.inbound_port,
    )


def _unwrap(item: LoadedResource | Resource) -> tuple[Resource, str]:
    if isinstance(item, LoadedResource):
        return item.model, item.namespace or ""
    return item, item.metadata.namespace or "default"


def exported_to(values: Sequence[str], namespace: str) -> frozenset[str]:
    """exportTo as the set of namespaces that see the object: ``.`` is its own namespace,
    ``*`` (or nothing given: the mesh default) everyone, ``~`` no one."""
    if not values:
        return frozenset({PUBLIC})
    out: set[str] = set()
    for value in values:
        if value == "~":
            return frozenset()
        out.add(namespace if value == "." else value)
    return frozenset(out)


def _is_ip(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True


def _workload_from_entry(we: WorkloadEntry, namespace: str) -> Workload:
    spec = we.spec
    return Workload(
        name=we.metadata.name,
        namespace=namespace,
        address=spec.address,
        labels={**we.metadata.labels, **spec.labels},
        ports=dict(spec.ports),
        locality=spec.locality,
        service_account=spec.service_account,
        network=spec.network,
        weight=spec.weight,
        from_workload_entry=True,
    )


def _workload_from_pod(pod: k8s.Pod, namespace: str) -> Workload | None:
    status: Mapping[str, Any] = pod.status or {}
    address = status.get("podIP")
    if not isinstance(address, str) or not address:
        return None
    ready = True
    for condition in status.get("conditions") or ():
        if isinstance(condition, Mapping) and condition.get("type") == "Ready":
            ready = condition.get("status") == "True"
    ports = {p.name: p.container_port for c in pod.spec.containers for p in c.ports if p.name}
    inbound = pod.metadata.annotations.get(INBOUND_PORT_ANNOTATION, "")
    return Workload(
        name=pod.metadata.name,
        namespace=namespace,
        address=address,
        labels=dict(pod.metadata.labels),
        ports=ports,
        ready=ready,
        service_account=pod.spec.effective_service_account,
        inbound_port=int(inbound) if inbound.isdigit() and 0 < int(inbound) < 65536 else 0,
    )
