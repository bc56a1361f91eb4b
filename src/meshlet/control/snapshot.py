"""The snapshot: the mesh's configuration and registry at one moment, indexed (istiod's
``PushContext``), and what one proxy sees of it (``ProxyView``, istiod's ``SidecarScope``).

``Snapshot.build(resources, registry)`` reads Istio resources once: it resolves short host
names, expands delegated VirtualServices, orders everything as Istio does and builds the
indexes translation needs, so that building one proxy's configuration never scans the
whole mesh twice. ``snapshot.view(proxy)`` cuts the part one proxy may see.

Rules kept (``ISTIO-TRANSLATION.md`` §2.1, §2.7, §4.3, §4.4):

* Short names resolve in the resource's namespace: ``reviews`` in ``default`` is
  ``reviews.default.svc.cluster.local``; a name with a dot is taken as written
  (``ResolveShortnameToFQDN``). Gateway names resolve the same way to ``<ns>/<name>``.
* A VirtualService without ``gateways`` applies to ``mesh`` (sidecars) only. VirtualServices
  are ordered private-to-the-proxy's-namespace, then exported to it, then public; each group
  oldest first, then by name.
* exportTo: ``*`` (default) everyone, ``.`` own namespace, ``~`` no one, or names.
* DestinationRule lookup for a proxy in namespace P and a service in namespace S: P's own
  rules, then S's rules exported to P, then the root namespace's (``istio-system``); in each,
  the most specific host wins (exact, then the longest wildcard). Rules for one host merge:
  subsets concatenate (first of a name wins), the first top-level policy wins. Rules with a
  ``workloadSelector`` apply only to the workloads they select, and before the others.
* Sidecar: the one in the proxy's namespace whose selector matches, else the namespace-wide
  one, else the root namespace's. Its egress hosts (``ns/host``) scope the services and
  VirtualServices a proxy receives; without one a proxy sees everything exported to it.
* Duplicate hostnames: a Kubernetes service beats a ServiceEntry, then the proxy's own
  namespace, then the oldest.
* AuthorizationPolicies apply to a workload from the root namespace (mesh-wide) and its own
  namespace: those without a selector, and those whose selector its labels match.
* Telemetry: the root namespace's selector-less one, then the proxy's namespace's, then the
  first (oldest) in its namespace whose selector matches; later ones override earlier ones
  (``translate.telemetry`` merges them).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from envoy.config.core.v3 import base_pb2
from google.protobuf import struct_pb2

from meshlet.api import LoadedResource, Resource
from meshlet.api.networking import (
    Destination,
    DestinationRule,
    Gateway,
    GatewaySpec,
    HTTPMatchRequest,
    HTTPRetry,
    HTTPRoute,
    OutboundTrafficPolicyMode,
    Resolution,
    Sidecar,
    SidecarSpec,
    SimpleLB,
    StringMatch,
    Subset,
    TrafficPolicy,
    VirtualService,
)
from meshlet.api.security import (
    AuthorizationPolicy,
    AuthorizationPolicySpec,
    PeerAuthentication,
    RequestAuthentication,
)
from meshlet.api.telemetry import Telemetry, TelemetrySpec
from meshlet.control.registry import (
    DEFAULT_DOMAIN_SUFFIX,
    PUBLIC,
    Endpoint,
    PortProtocol,
    Registry,
    Service,
    ServicePort,
    exported_to,
)

ROOT_NAMESPACE = "istio-system"
MESH_GATEWAY = "mesh"


# -- mesh-wide settings ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class MeshConfig:
    """The MeshConfig settings translation reads, with Istio's defaults.

    ``enable_auto_mtls`` is off until meshlet has certificates (the security issue): with it
    on, every in-mesh cluster would carry Istio's ``transport_socket_matches``.
    """

    root_namespace: str = ROOT_NAMESPACE
    domain_suffix: str = DEFAULT_DOMAIN_SUFFIX
    trust_domain: str = "cluster.local"
    outbound_traffic_policy: OutboundTrafficPolicyMode = OutboundTrafficPolicyMode.ALLOW_ANY
    connect_timeout: float = 10.0  # seconds (mesh connectTimeout)
    dns_refresh_rate: float = 60.0  # seconds (mesh dnsRefreshRate)
    default_http_retry_policy: HTTPRetry | None = None  # mesh defaultHttpRetryPolicy
    exclude_503_from_default_retries: bool = True  # EXCLUDE_UNSAFE_503_FROM_DEFAULT_RETRY
    enable_auto_mtls: bool = False
    # Telemetry defaults (``meshlet control --trace-sampling`` and friends).
    trace_sampling: float = 1.0  # percent; Istio's PILOT_TRACE_SAMPLING default
    otlp_endpoint: str = ""  # OTLP/HTTP traces URL; empty: no tracing in the HCMs
    access_log_file: str = ""  # empty: access logs off unless a Telemetry turns them on
    access_log_encoding: str = "TEXT"  # or "JSON" (mesh accessLogEncoding)


DEFAULT_MESH = MeshConfig()


# -- proxies -------------------------------------------------------------------------------------


class ProxyType(StrEnum):
    SIDECAR = "sidecar"
    ROUTER = "router"  # a gateway


@dataclass(frozen=True, slots=True, kw_only=True, eq=False)
class Proxy:
    """A connected proxy, as Istio's node id and node metadata describe it.

    The node id is ``<type>~<ip>~<pod>.<namespace>~<namespace>.svc.<domain>``, e.g.
    ``sidecar~10.0.0.1~reviews-v1-abc.default~default.svc.cluster.local``.
    """

    ip: str
    namespace: str = "default"
    pod_name: str = ""
    type: ProxyType = ProxyType.SIDECAR
    dns_domain: str = ""  # default: <namespace>.svc.cluster.local
    labels: Mapping[str, str] = field(default_factory=dict)
    service_account: str = "default"
    workload_name: str = ""
    locality: str = ""  # region/zone/subzone

    def __repr__(self) -> str:
        return f"<Proxy {self.id}>"

    @property
    def domain(self) -> str:
        return self.dns_domain or f"{self.namespace}.svc.{DEFAULT_DOMAIN_SUFFIX}"

    @property
    def id(self) -> str:
        pod = self.pod_name or self.workload_name or self.ip
        return f"{self.type.value}~{self.ip}~{pod}.{self.namespace}~{self.domain}"

    @property
    def key(self) -> tuple[Any, ...]:
        """What the proxy's configuration depends on (for caching views)."""
        return (
            self.type,
            self.ip,
            self.namespace,
            self.domain,
            tuple(sorted(self.labels.items())),
            self.service_account,
            self.locality,
        )

    @classmethod
    def from_id(cls, node_id: str, **fields: Any) -> Proxy:
        """A proxy from an Istio node id; ``fields`` add what the id does not carry."""
        parts = node_id.split("~")
        if len(parts) != 4 or parts[0] not in ("sidecar", "router"):
            raise ValueError(
                f"node id {node_id!r} is not <sidecar|router>~<ip>~<pod>.<namespace>~<domain>"
            )
        kind, ip, pod_ns, domain = parts
        pod, dot, namespace = pod_ns.rpartition(".")
        if not dot:
            pod, namespace = pod_ns, "default"
        values: dict[str, Any] = {
            "type": ProxyType(kind),
            "ip": ip,
            "pod_name": pod,
            "namespace": namespace,
            "dns_domain": domain,
        }
        values.update(fields)
        return cls(**values)

    @classmethod
    def from_node(cls, node: base_pb2.Node) -> Proxy:
        """A proxy from an xDS ``Node``: its id, and metadata NAMESPACE, SERVICE_ACCOUNT,
        WORKLOAD_NAME, LABELS and INSTANCE_IPS as Istio's agent sends them."""
        md = node.metadata.fields

        def text(key: str) -> str:
            value = md.get(key)
            if value is None or value.WhichOneof("kind") != "string_value":
                return ""
            return str(value.string_value)

        labels: dict[str, str] = {}
        if "LABELS" in md and md["LABELS"].WhichOneof("kind") == "struct_value":
            for k, v in md["LABELS"].struct_value.fields.items():
                if v.WhichOneof("kind") == "string_value":
                    labels[k] = v.string_value
        extra: dict[str, Any] = {"labels": labels}
        if text("SERVICE_ACCOUNT"):
            extra["service_account"] = text("SERVICE_ACCOUNT")
        if text("WORKLOAD_NAME"):
            extra["workload_name"] = text("WORKLOAD_NAME")
        locality = node.locality
        if locality.region or locality.zone or locality.sub_zone:
            extra["locality"] = f"{locality.region}/{locality.zone}/{locality.sub_zone}"
        proxy = cls.from_id(node.id, **extra)
        namespace = text("NAMESPACE")
        ips = text("INSTANCE_IPS")
        if namespace or ips:
            proxy = cls(
                ip=ips.split(",")[0] if ips else proxy.ip,
                namespace=namespace or proxy.namespace,
                pod_name=proxy.pod_name,
                type=proxy.type,
                dns_domain=proxy.dns_domain,
                labels=proxy.labels,
                service_account=proxy.service_account,
                workload_name=proxy.workload_name,
                locality=proxy.locality,
            )
        return proxy

    def node(self) -> base_pb2.Node:
        """The xDS ``Node`` this proxy sends (for bootstraps and tests)."""
        metadata = struct_pb2.Struct()
        metadata.update(
            {
                "NAMESPACE": self.namespace,
                "SERVICE_ACCOUNT": self.service_account,
                "WORKLOAD_NAME": self.workload_name,
                "LABELS": dict(self.labels),
                "INSTANCE_IPS": self.ip,
            }
        )
        node = base_pb2.Node(id=self.id, cluster=self.workload_name, metadata=metadata)
        if self.locality:
            region, _, rest = self.locality.partition("/")
            zone, _, sub_zone = rest.partition("/")
            node.locality.region, node.locality.zone, node.locality.sub_zone = (
                region,
                zone,
                sub_zone,
            )
        return node


# -- indexed configuration ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True, eq=False)
class VirtualServiceConfig:
    """A VirtualService ready to translate: hosts and destination hosts are FQDNs, gateways
    ``mesh`` or ``<ns>/<name>``, and delegated rules are expanded in place."""

    name: str
    namespace: str
    hosts: tuple[str, ...]
    gateways: frozenset[str]
    http: tuple[HTTPRoute, ...]
    export_to: frozenset[str]
    creation: str = ""

    def __repr__(self) -> str:
        return f"<VirtualService {self.namespace}/{self.name} hosts={list(self.hosts)}>"

    @property
    def order(self) -> tuple[str, str, str]:
        return (self.creation, self.name, self.namespace)


@dataclass(frozen=True, slots=True, kw_only=True, eq=False)
class DestinationRuleConfig:
    name: str
    namespace: str
    host: str  # resolved
    traffic_policy: TrafficPolicy | None
    subsets: tuple[Subset, ...]
    export_to: frozenset[str]
    selector: Mapping[str, str] | None
    creation: str = ""

    def __repr__(self) -> str:
        return f"<DestinationRule {self.namespace}/{self.name} host={self.host}>"

    def visible_to(self, namespace: str) -> bool:
        return PUBLIC in self.export_to or namespace in self.export_to


@dataclass(frozen=True, slots=True, kw_only=True)
class EffectivePolicy:
    """The traffic policy for one (port, subset) after Istio's merging: a subset's blocks
    replace the top-level ones; a matching portLevelSettings entry replaces them all."""

    load_balancer: Any = None
    connection_pool: Any = None
    outlier_detection: Any = None
    tls: Any = None


@dataclass(frozen=True, slots=True, kw_only=True, eq=False)
class MergedDestinationRule:
    """The DestinationRules for one host as one proxy sees them (Istio's
    ``ConsolidatedDestRule``)."""

    host: str
    traffic_policy: TrafficPolicy | None
    subsets: tuple[Subset, ...]
    sources: tuple[DestinationRuleConfig, ...]

    def __repr__(self) -> str:
        names = ",".join(f"{r.namespace}/{r.name}" for r in self.sources)
        return f"<MergedDestinationRule {self.host} [{names}] subsets={len(self.subsets)}>"

    def subset(self, name: str) -> Subset | None:
        for s in self.subsets:
            if s.name == name:
                return s
        return None

    def policy(self, port: int, subset: str = "") -> EffectivePolicy:
        """Istio's ``MergeTrafficPolicy(MergeTrafficPolicy(nil, top, port), subset, port)``."""
        top = _port_policy(self.traffic_policy, port)
        chosen = self.subset(subset) if subset else None
        if chosen is None or chosen.traffic_policy is None:
            return top
        sub = chosen.traffic_policy
        merged = EffectivePolicy(
            load_balancer=sub.load_balancer or top.load_balancer,
            connection_pool=sub.connection_pool or top.connection_pool,
            outlier_detection=sub.outlier_detection or top.outlier_detection,
            tls=sub.tls or top.tls,
        )
        for p in sub.port_level_settings:
            if p.port.number == port:
                return EffectivePolicy(
                    load_balancer=p.load_balancer,
                    connection_pool=p.connection_pool,
                    outlier_detection=p.outlier_detection,
                    tls=p.tls,
                )
        return merged


def _port_policy(policy: TrafficPolicy | None, port: int) -> EffectivePolicy:
    if policy is None:
        return EffectivePolicy()
    for p in policy.port_level_settings:
        if p.port.number == port:
            # Port-level settings replace the top-level policy; omitted blocks become
            # defaults, they are not inherited (util.GetPortLevelTrafficPolicy).
            return EffectivePolicy(
                load_balancer=p.load_balancer,
                connection_pool=p.connection_pool,
                outlier_detection=p.outlier_detection,
                tls=p.tls,
            )
    return EffectivePolicy(
        load_balancer=policy.load_balancer,
        connection_pool=policy.connection_pool,
        outlier_detection=policy.outlier_detection,
        tls=policy.tls,
    )


@dataclass(frozen=True, slots=True, kw_only=True, eq=False)
class SidecarConfig:
    name: str
    namespace: str
    spec: SidecarSpec
    creation: str = ""

    def __repr__(self) -> str:
        return f"<Sidecar {self.namespace}/{self.name}>"

    @property
    def selector(self) -> Mapping[str, str] | None:
        ws = self.spec.workload_selector
        return ws.labels if ws is not None else None


@dataclass(frozen=True, slots=True, kw_only=True, eq=False)
class GatewayConfig:
    name: str
    namespace: str
    spec: GatewaySpec
    creation: str = ""

    def __repr__(self) -> str:
        return f"<Gateway {self.namespace}/{self.name}>"

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True, slots=True, kw_only=True)
class AuthorizationPolicyConfig:
    name: str
    namespace: str
    spec: AuthorizationPolicySpec
    creation: str = ""
    #: ``istio.io/dry-run: "true"``: evaluated and counted, never enforced (shadow rules).
    dry_run: bool = False

    def __repr__(self) -> str:
        return f"<AuthorizationPolicy {self.namespace}/{self.name} {self.spec.action}>"


@dataclass(frozen=True, slots=True, kw_only=True)
class TelemetryConfig:
    name: str
    namespace: str
    spec: TelemetrySpec
    creation: str = ""

    def __repr__(self) -> str:
        return f"<Telemetry {self.namespace}/{self.name}>"

    @property
    def selector(self) -> Mapping[str, str] | None:
        """The workload selector's labels; None for a namespace-wide Telemetry."""
        selector = self.spec.selector
        return selector.match_labels if selector is not None and selector.match_labels else None


@dataclass(frozen=True, slots=True, kw_only=True, eq=False)
class OutboundCluster:
    """One outbound cluster of a proxy: a service port, maybe a subset, the policy in effect."""

    name: str
    service: Service
    port: ServicePort
    subset: str
    labels: Mapping[str, str] | None  # the subset's labels; None for the whole service
    policy: EffectivePolicy
    rule: MergedDestinationRule | None

    def __repr__(self) -> str:
        return f"<OutboundCluster {self.name}>"

    @property
    def passthrough(self) -> bool:
        """Connections go where they were sent (resolution NONE, or loadBalancer
        PASSTHROUGH): no endpoints of the mesh's own."""
        lb = self.policy.load_balancer
        if lb is not None and lb.simple is SimpleLB.PASSTHROUGH:
            return True
        return self.service.resolution in (Resolution.NONE, Resolution.DYNAMIC_DNS)

    @property
    def uses_eds(self) -> bool:
        return not self.passthrough and self.service.resolution is Resolution.STATIC


@dataclass(frozen=True, slots=True, kw_only=True, eq=False)
class ServiceInstance:
    """A service port served by a proxy's own workload: what its inbound side accepts."""

    service: Service
    port: ServicePort
    endpoint: Endpoint


# -- names ---------------------------------------------------------------------------------------


def outbound_cluster_name(port: int, host: str, subset: str = "") -> str:
    """``outbound|<port>|<subset>|<host>`` (Istio's ``BuildSubsetKey``)."""
    return f"outbound|{port}|{subset}|{host}"


def inbound_cluster_name(port: int) -> str:
    """``inbound|<port>||`` (Istio's ``BuildInboundSubsetKey``)."""
    return f"inbound|{port}||"


def parse_cluster_name(name: str) -> tuple[str, int, str, str] | None:
    """``(direction, port, subset, host)`` of an Istio cluster name, or None."""
    parts = name.split("|")
    if len(parts) != 4 or parts[0] not in ("outbound", "inbound") or not parts[1].isdigit():
        return None
    return parts[0], int(parts[1]), parts[2], parts[3]


def resolve_host(host: str, namespace: str, domain_suffix: str = DEFAULT_DOMAIN_SUFFIX) -> str:
    """Istio's ``ResolveShortnameToFQDN``: a name without a dot is a Kubernetes service in
    ``namespace``; ``*``, IP addresses and names with a dot stay as written."""
    # Only an IPv6 address has no dot; ``ip_address`` raising for every short name is slow.
    if not host or host == "*" or "." in host or (":" in host and _is_ip(host)):
        return host
    return f"{host}.{namespace}.svc.{domain_suffix}"


def resolve_gateway(name: str, namespace: str) -> str:
    """A VirtualService's gateway reference as ``<ns>/<name>`` (``mesh`` stays ``mesh``)."""
    if name == MESH_GATEWAY or "/" in name:
        return name
    if "." in name:  # the old form name.namespace[.svc.cluster.local]
        gw, _, rest = name.partition(".")
        return f"{rest.partition('.')[0]}/{gw}"
    return f"{namespace}/{name}"


def host_matches(pattern: str, host: str) -> bool:
    """Whether ``pattern`` (``*``, ``*.example.com`` or exact) covers ``host``; a wildcard
    host is covered by an equal or wider wildcard."""
    if pattern == "*" or pattern == host:
        return True
    if pattern.startswith("*"):
        suffix = pattern[1:]
        if host.startswith("*"):
            return host[1:].endswith(suffix)
        return host.endswith(suffix)
    return False


def hosts_overlap(a: str, b: str) -> bool:
    return host_matches(a, b) or host_matches(b, a)


def labels_match(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def _is_ip(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True


# -- the snapshot --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _HostRules:
    """DestinationRules of one namespace by host: exact hosts, and wildcards most specific
    first."""

    exact: dict[str, list[DestinationRuleConfig]]
    wildcards: list[tuple[str, list[DestinationRuleConfig]]]


class Snapshot:
    """The mesh's configuration and registry at one moment, indexed. Immutable once built."""

    def __init__(
        self,
        *,
        mesh: MeshConfig,
        registry: Registry,
        virtual_services: Sequence[VirtualServiceConfig],
        destination_rules: Sequence[DestinationRuleConfig],
        sidecars: Sequence[SidecarConfig],
        gateways: Sequence[GatewayConfig],
        authorization_policies: Sequence[AuthorizationPolicyConfig] = (),
        peer_authentications: Sequence[Any] = (),
        request_authentications: Sequence[tuple[RequestAuthentication, str]] = (),
        telemetries: Sequence[TelemetryConfig] = (),
    ) -> None:
        self.mesh = mesh
        # Oldest first, then by name (istiod's order), by namespace.
        self._telemetry_by_ns: dict[str, list[TelemetryConfig]] = {}
        for tc in sorted(telemetries, key=lambda t: (t.creation, t.name)):
            self._telemetry_by_ns.setdefault(tc.namespace, []).append(tc)
        # (RequestAuthentication, namespace) pairs, in the store's order.
        self.request_authentications = tuple(request_authentications)
        # PeerAuthnConfig values (``translate.peer_authn``), in the store's order.
        self.peer_authentications = tuple(peer_authentications)
        self.registry = registry
        self.services: tuple[Service, ...] = tuple(registry.services())
        self.virtual_services = tuple(sorted(virtual_services, key=lambda v: v.order))
        self.destination_rules = tuple(destination_rules)
        self.sidecars = tuple(sorted(sidecars, key=lambda s: (s.creation, s.name)))
        self.gateways = tuple(sorted(gateways, key=lambda g: (g.creation, g.name, g.namespace)))
        self._by_host: dict[str, list[Service]] = {}
        self._order: dict[int, int] = {}
        for i, s in enumerate(self.services):
            self._by_host.setdefault(s.hostname, []).append(s)
            self._order[id(s)] = i
        self._vs_by_gateway: dict[str, list[VirtualServiceConfig]] = {}
        # By gateway and exact host, plus those with a wildcard host: a Sidecar listing a few
        # hosts looks its VirtualServices up instead of scanning them all.
        self._vs_by_host: dict[tuple[str, str], list[VirtualServiceConfig]] = {}
        self._vs_wildcard: dict[str, list[VirtualServiceConfig]] = {}
        for vs in self.virtual_services:
            wildcard = any("*" in h for h in vs.hosts)
            for gw in vs.gateways:
                self._vs_by_gateway.setdefault(gw, []).append(vs)
                if wildcard:
                    self._vs_wildcard.setdefault(gw, []).append(vs)
                else:
                    for h in vs.hosts:
                        self._vs_by_host.setdefault((gw, h), []).append(vs)
        self._rules: dict[str, _HostRules] = _index_rules(destination_rules)
        # Oldest first, then by name (istiod's order); by namespace for the scope lookup.
        self._authz_by_ns: dict[str, list[AuthorizationPolicyConfig]] = {}
        for ap in sorted(authorization_policies, key=lambda a: (a.creation, a.name, a.namespace)):
            self._authz_by_ns.setdefault(ap.namespace, []).append(ap)
        self._sidecars_by_ns: dict[str, list[SidecarConfig]] = {}
        for sc in self.sidecars:
            self._sidecars_by_ns.setdefault(sc.namespace, []).append(sc)
        self._instances: dict[str, list[tuple[Service, ServicePort, Endpoint]]] | None = None
        self._instances_at: dict[str, tuple[ServiceInstance, ...]] = {}
        self._endpoint_cache: dict[tuple[int, int], Sequence[Endpoint]] = {}
        self._views: dict[tuple[Any, ...], ProxyView] = {}
        # Translation results that do not depend on the proxy (an endpoint's proto, say),
        # shared by every proxy's translation of this snapshot.
        self.memo: dict[Any, Any] = {}

    def __repr__(self) -> str:
        return (
            f"<Snapshot [{len(self.services)} services, {len(self.virtual_services)} vs, "
            f"{len(self.destination_rules)} dr, {len(self.gateways)} gateways]>"
        )

    @classmethod
    def build(
        cls,
        resources: Iterable[LoadedResource | Resource],
        registry: Registry,
        mesh: MeshConfig = DEFAULT_MESH,
        *,
        memo: dict[Any, Any] | None = None,
    ) -> Snapshot:
        """Index the Istio resources among ``resources`` (other kinds are passed over).

        ``memo``, kept by the caller from one build to the next, reuses the prepared form of
        a VirtualService that is the same object as last time and delegates nothing."""
        domain = mesh.domain_suffix
        hosted: list[tuple[VirtualService, str]] = []
        delegates: dict[tuple[str, str], tuple[VirtualService, str]] = {}
        rules: list[DestinationRuleConfig] = []
        sidecars: list[SidecarConfig] = []
        gateways: list[GatewayConfig] = []
        authz: list[AuthorizationPolicyConfig] = []
        peer_authentications: list[Any] = []
        request_authentications: list[tuple[RequestAuthentication, str]] = []
        telemetries: list[TelemetryConfig] = []
        from meshlet.control.translate.peer_authn import PeerAuthnConfig

        # Kinds kept as they are: name, namespace, spec and creation, under their config type.
        kept: list[tuple[type[Any], type[Any], list[Any]]] = [
            (Sidecar, SidecarConfig, sidecars),
            (Gateway, GatewayConfig, gateways),
            (PeerAuthentication, PeerAuthnConfig, peer_authentications),
            (AuthorizationPolicy, AuthorizationPolicyConfig, authz),
            (Telemetry, TelemetryConfig, telemetries),
        ]
        for item in resources:
            model, namespace = _unwrap(item)
            creation = model.metadata.creation_timestamp or ""
            if isinstance(model, VirtualService):
                if model.spec.is_delegate:
                    delegates[(namespace, model.metadata.name)] = (model, namespace)
                else:
                    hosted.append((model, namespace))
            elif isinstance(model, DestinationRule):
                spec = model.spec
                rules.append(
                    DestinationRuleConfig(
                        name=model.metadata.name,
                        namespace=namespace,
                        host=resolve_host(spec.host, namespace, domain),
                        traffic_policy=spec.traffic_policy,
                        subsets=spec.subsets,
                        export_to=exported_to(spec.export_to, namespace),
                        selector=(
                            spec.workload_selector.match_labels
                            if spec.workload_selector is not None
                            else None
                        ),
                        creation=creation,
                    )
                )
            elif isinstance(model, RequestAuthentication):
                request_authentications.append((model, namespace))
            else:
                for kind, config, into in kept:
                    if isinstance(model, kind):
                        extra = {"dry_run": _dry_run(model)} if kind is AuthorizationPolicy else {}
                        into.append(
                            config(
                                name=model.metadata.name,
                                namespace=namespace,
                                spec=model.spec,
                                creation=creation,
                                **extra,
                            )
                        )
                        break
        rules.sort(key=lambda r: (r.creation, r.name, r.namespace))
        virtual_services = [
            _prepared(vs, namespace, delegates, domain, memo) for vs, namespace in hosted
        ]
        return cls(
            mesh=mesh,
            registry=registry,
            virtual_services=virtual_services,
            destination_rules=rules,
            sidecars=sidecars,
            gateways=gateways,
            authorization_policies=authz,
            peer_authentications=peer_authentications,
            request_authentications=request_authentications,
            telemetries=telemetries,
        )

    # -- lookups -------------------------------------------------------------------------------

    def services_for_host(self, hostname: str) -> Sequence[Service]:
        return self._by_host.get(hostname, ())

    def service_order(self, service: Service) -> int:
        """Where ``service`` stands in the registry's order (oldest first)."""
        return self._order[id(service)]

    def virtual_services_for_gateway(self, gateway: str) -> Sequence[VirtualServiceConfig]:
        return self._vs_by_gateway.get(gateway, ())

    def virtual_services_for_hosts(
        self, gateway: str, hosts: Iterable[str]
    ) -> list[VirtualServiceConfig]:
        """The VirtualServices of ``gateway`` with one of the exact ``hosts``, and those with
        a wildcard host (which may cover any of them); in no particular order."""
        found = list(self._vs_wildcard.get(gateway, ()))
        for h in hosts:
            found.extend(self._vs_by_host.get((gateway, h), ()))
        return found

    def endpoints(self, service: Service, port: int) -> Sequence[Endpoint]:
        key = (id(service), port)
        found = self._endpoint_cache.get(key)
        if found is None:
            found = self._endpoint_cache[key] = tuple(self.registry.endpoints(service, port))
        return found

    def instances(self, address: str) -> Sequence[ServiceInstance]:
        """Service ports whose endpoints are at ``address`` (a proxy's own workload)."""
        found = self._instances_at.get(address)
        if found is not None:
            return found
        if self._instances is None:
            # Plain tuples: the index covers every endpoint of the mesh, but only the few
            # proxies' own addresses ever become ``ServiceInstance`` values.
            index: dict[str, list[tuple[Service, ServicePort, Endpoint]]] = {}
            for service in self.services:
                for port in service.ports:
                    for ep in self.endpoints(service, port.port):
                        index.setdefault(ep.address, []).append((service, port, ep))
            self._instances = index
        found = self._instances_at[address] = tuple(
            ServiceInstance(service=service, port=port, endpoint=ep)
            for service, port, ep in self._instances.get(address, ())
        )
        return found

    def sidecar_for(self, proxy: Proxy) -> SidecarConfig | None:
        """The Sidecar in effect for ``proxy`` (None: the mesh default, ``*/*``)."""
        if proxy.type is not ProxyType.SIDECAR:
            return None
        local = self._sidecars_by_ns.get(proxy.namespace, ())
        for sc in local:
            selector = sc.selector
            if selector is not None and labels_match(selector, proxy.labels):
                return sc
        for sc in local:
            if sc.selector is None:
                return sc
        for sc in self._sidecars_by_ns.get(self.mesh.root_namespace, ()):
            if sc.selector is None:
                return sc
        return None

    def authorization_policies_for(self, proxy: Proxy) -> tuple[AuthorizationPolicyConfig, ...]:
        """The AuthorizationPolicies that apply to ``proxy`` (istiod's
        ``ListAuthorizationPolicies``): mesh-wide ones in the root namespace, then those of its
        own namespace; each without a selector, or with one its labels match. Policies with
        ``targetRef(s)`` are for gateways and waypoints by Service or Gateway, not supported."""
        found: list[AuthorizationPolicyConfig] = []
        namespaces = dict.fromkeys((self.mesh.root_namespace, proxy.namespace))
        for namespace in namespaces:
            for ap in self._authz_by_ns.get(namespace, ()):
                spec = ap.spec
                if spec.target_ref is not None or spec.target_refs:
                    continue
                selector = spec.selector.match_labels if spec.selector is not None else None
                if selector and not labels_match(selector, proxy.labels):
                    continue
                found.append(ap)
        return tuple(found)

    def telemetries_for(self, proxy: Proxy) -> tuple[TelemetryConfig, ...]:
        """The Telemetries that apply to ``proxy``, least specific first (istiod's
        ``applicableTelemetries``): the root namespace's selector-less one, the proxy's
        namespace's selector-less one, then the first whose selector its labels match. In
        each namespace the oldest wins. Telemetries with ``targetRef(s)`` (waypoints and
        gateways by Service or Gateway) are not supported and apply to no proxy."""
        found: list[TelemetryConfig] = []
        root = self.mesh.root_namespace
        namespaces = [root] if proxy.namespace == root else [root, proxy.namespace]
        for namespace in namespaces:
            for tc in self._telemetry_by_ns.get(namespace, ()):
                if tc.selector is None and not _targets(tc.spec):
                    found.append(tc)
                    break
        for tc in self._telemetry_by_ns.get(proxy.namespace, ()):
            selector = tc.selector
            if selector is not None and labels_match(selector, proxy.labels):
                found.append(tc)
                break
        return tuple(found)

    def gateways_for(self, proxy: Proxy) -> tuple[GatewayConfig, ...]:
        """Gateways whose selector picks ``proxy`` (from any namespace, as Istio's default)."""
        if proxy.type is not ProxyType.ROUTER:
            return ()
        return tuple(
            g
            for g in self.gateways
            if g.spec.selector and labels_match(g.spec.selector, proxy.labels)
        )

    def destination_rule(
        self, proxy_namespace: str, proxy_labels: Mapping[str, str], service: Service
    ) -> MergedDestinationRule | None:
        """The DestinationRules that apply to ``service`` for a proxy (``PushContext
        .destinationRule``): the proxy's namespace, the service's, then the root's."""
        hostname = service.hostname
        local = self._rules.get(proxy_namespace)
        if local is not None:
            found = _most_specific(local, hostname, proxy_labels, None)
            if found:
                return _merge(hostname, found)
        for namespace in (service.namespace, self.mesh.root_namespace):
            rules = self._rules.get(namespace)
            if rules is None:
                continue
            found = _most_specific(rules, hostname, proxy_labels, proxy_namespace)
            if found:
                return _merge(hostname, found)
        return None

    def view(self, proxy: Proxy) -> ProxyView:
        """What ``proxy`` sees (cached per proxy identity and labels)."""
        key = proxy.key
        view = self._views.get(key)
        if view is None:
            view = self._views[key] = ProxyView(self, proxy)
        return view


def _targets(spec: TelemetrySpec) -> bool:
    return spec.target_ref is not None or bool(spec.target_refs)


def _index_rules(rules: Iterable[DestinationRuleConfig]) -> dict[str, _HostRules]:
    by_ns: dict[str, dict[str, list[DestinationRuleConfig]]] = {}
    for r in rules:
        by_ns.setdefault(r.namespace, {}).setdefault(r.host, []).append(r)
    out: dict[str, _HostRules] = {}
    for ns, hosts in by_ns.items():
        exact = {h: rs for h, rs in hosts.items() if not h.startswith("*")}
        wildcards = sorted(
            ((h, rs) for h, rs in hosts.items() if h.startswith("*")),
            key=lambda item: -len(item[0]),
        )
        out[ns] = _HostRules(exact=exact, wildcards=wildcards)
    return out


def _most_specific(
    rules: _HostRules,
    hostname: str,
    labels: Mapping[str, str],
    exported_to_namespace: str | None,
) -> list[DestinationRuleConfig]:
    """The applicable rules of the most specific host that has any (``MostSpecificHostMatch``).

    ``exported_to_namespace``: keep only rules exported there (None: a proxy's own namespace,
    where every rule of the namespace applies).
    """

    def usable(candidates: list[DestinationRuleConfig]) -> list[DestinationRuleConfig]:
        selected: list[DestinationRuleConfig] = []
        general: list[DestinationRuleConfig] = []
        for r in candidates:
            if exported_to_namespace is not None and not r.visible_to(exported_to_namespace):
                continue
            if r.selector is None:
                general.append(r)
            elif labels_match(r.selector, labels):
                selected.append(r)
        # Rules that select this workload come first and stand alone (Istio keeps them in a
        # separate consolidated rule that is found first).
        return selected or general

    exact = rules.exact.get(hostname)
    if exact:
        found = usable(exact)
        if found:
            return found
    for pattern, candidates in rules.wildcards:
        if host_matches(pattern, hostname):
            found = usable(candidates)
            if found:
                return found
    return []


def _merge(hostname: str, rules: list[DestinationRuleConfig]) -> MergedDestinationRule:
    policy: TrafficPolicy | None = None
    subsets: list[Subset] = []
    seen: set[str] = set()
    for r in rules:
        if policy is None:
            policy = r.traffic_policy
        for s in r.subsets:
            if s.name not in seen:
                seen.add(s.name)
                subsets.append(s)
    return MergedDestinationRule(
        host=hostname, traffic_policy=policy, subsets=tuple(subsets), sources=tuple(rules)
    )


DRY_RUN_ANNOTATION = "istio.io/dry-run"


def _dry_run(model: Any) -> bool:
    """Istio's ``istio.io/dry-run`` annotation: "true" (any case) turns it on."""
    value = (model.metadata.annotations or {}).get(DRY_RUN_ANNOTATION, "")
    return str(value).strip().lower() == "true"


def _unwrap(item: LoadedResource | Resource) -> tuple[Resource, str]:
    if isinstance(item, LoadedResource):
        return item.model, item.namespace or ""
    return item, item.metadata.namespace or "default"


# -- VirtualService preparation ------------------------------------------------------------------


def _prepared(
    vs: VirtualService,
    namespace: str,
    delegates: Mapping[tuple[str, str], tuple[VirtualService, str]],
    domain: str,
    memo: dict[Any, Any] | None,
) -> VirtualServiceConfig:
    if memo is None or any(rule.delegate is not None for rule in vs.spec.http):
        return _virtual_service(vs, namespace, delegates, domain)
    key = ("virtual_service", id(vs), namespace, domain)
    hit = memo.get(key)
    if hit is not None and hit[0] is vs:  # the object itself is kept, so its id is not reused
        return hit[1]  # type: ignore[no-any-return]
    config = _virtual_service(vs, namespace, delegates, domain)
    memo[key] = (vs, config)
    return config


def _virtual_service(
    vs: VirtualService,
    namespace: str,
    delegates: Mapping[tuple[str, str], tuple[VirtualService, str]],
    domain: str,
) -> VirtualServiceConfig:
    spec = vs.spec
    gateways = frozenset(resolve_gateway(g, namespace) for g in spec.gateways) or frozenset(
        {MESH_GATEWAY}
    )
    http: list[HTTPRoute] = []
    for rule in spec.http:
        rule = _resolve_route(rule, namespace, domain)
        if rule.delegate is None:
            http.append(rule)
            continue
        http.extend(_expand_delegate(rule, namespace, delegates, domain))
    return VirtualServiceConfig(
        name=vs.metadata.name,
        namespace=namespace,
        hosts=tuple(resolve_host(h, namespace, domain) for h in spec.hosts),
        gateways=gateways,
        http=tuple(http),
        export_to=exported_to(spec.export_to, namespace),
        creation=vs.metadata.creation_timestamp or "",
    )


def _resolve_destination(d: Destination, namespace: str, domain: str) -> Destination:
    host = resolve_host(d.host, namespace, domain)
    return d if host == d.host else d.model_copy(update={"host": host})


def _resolve_route(rule: HTTPRoute, namespace: str, domain: str) -> HTTPRoute:
    """``rule`` with its destination and mirror hosts resolved in ``namespace``, and the
    gateways of its matches as ``<ns>/<name>``."""
    update: dict[str, Any] = {}
    if rule.route:
        update["route"] = tuple(
            d.model_copy(
                update={"destination": _resolve_destination(d.destination, namespace, domain)}
            )
            for d in rule.route
        )
    if rule.mirror is not None:
        update["mirror"] = _resolve_destination(rule.mirror, namespace, domain)
    if rule.mirrors:
        update["mirrors"] = tuple(
            m.model_copy(
                update={"destination": _resolve_destination(m.destination, namespace, domain)}
            )
            for m in rule.mirrors
        )
    if any(m.gateways for m in rule.match):
        update["match"] = tuple(
            m.model_copy(
                update={"gateways": tuple(resolve_gateway(g, namespace) for g in m.gateways)}
            )
            if m.gateways
            else m
            for m in rule.match
        )
    return rule.model_copy(update=update) if update else rule


def _expand_delegate(
    root: HTTPRoute,
    namespace: str,
    delegates: Mapping[tuple[str, str], tuple[VirtualService, str]],
    domain: str,
) -> list[HTTPRoute]:
    """The delegate's rules merged under ``root`` (Istio's ``mergeHTTPRoutes``); none when
    the delegate does not exist or is not exported to the root's namespace."""
    assert root.delegate is not None
    ref_ns = root.delegate.namespace or namespace
    found = delegates.get((ref_ns, root.delegate.name))
    if found is None:
        return []
    delegate, delegate_ns = found
    if not _exported(exported_to(delegate.spec.export_to, delegate_ns), namespace):
        return []
    out: list[HTTPRoute] = []
    for leaf in delegate.spec.http:
        merged = _merge_route(root, _resolve_route(leaf, delegate_ns, domain))
        if merged is not None:
            out.append(merged)
    return out


def _exported(export: frozenset[str], namespace: str) -> bool:
    return PUBLIC in export or namespace in export


def _merge_route(root: HTTPRoute, leaf: HTTPRoute) -> HTTPRoute | None:
    matches = _merge_matches(root.match, leaf.match)
    if matches is None:
        return None
    name = leaf.name or root.name
    if leaf.name and root.name:
        name = f"{root.name}-{leaf.name}"
    update: dict[str, Any] = {"match": matches, "name": name}
    for attr in (
        "rewrite",
        "direct_response",
        "timeout",
        "retries",
        "fault",
        "mirror",
        "mirror_percent",
        "mirror_percentage",
        "cors_policy",
        "headers",
    ):
        if getattr(leaf, attr) is None:
            update[attr] = getattr(root, attr)
    if not leaf.mirrors:
        update["mirrors"] = root.mirrors
    return leaf.model_copy(update=update)


def _merge_matches(
    root: tuple[HTTPMatchRequest, ...], leaf: tuple[HTTPMatchRequest, ...]
) -> tuple[HTTPMatchRequest, ...] | None:
    """Each leaf match must refine some root match (``mergeHTTPMatchRequests``); None when
    one does not (the leaf rule is dropped)."""
    if not root:
        return leaf
    if not leaf:
        return root
    out: list[HTTPMatchRequest] = []
    for sub in leaf:
        found = False
        for top in root:
            if _match_conflict(top, sub):
                continue
            out.append(_merge_match(top, sub))
            found = True
        if not found:
            return None
    return tuple(out) if out else None


def _merge_match(root: HTTPMatchRequest, leaf: HTTPMatchRequest) -> HTTPMatchRequest:
    name = leaf.name or root.name
    if leaf.name and root.name:
        name = f"{root.name}-{leaf.name}"
    return leaf.model_copy(
        update={
            "name": name,
            "uri": leaf.uri or root.uri,
            "scheme": leaf.scheme or root.scheme,
            "method": leaf.method or root.method,
            "authority": leaf.authority or root.authority,
            "headers": {**root.headers, **leaf.headers},
            "without_headers": {**root.without_headers, **leaf.without_headers},
            "query_params": {**root.query_params, **leaf.query_params},
            "port": leaf.port or root.port,
            "source_labels": {**root.source_labels, **leaf.source_labels},
            "source_namespace": leaf.source_namespace or root.source_namespace,
            "gateways": leaf.gateways or root.gateways,
            "stat_prefix": leaf.stat_prefix or root.stat_prefix,
        }
    )


def _match_conflict(root: HTTPMatchRequest, leaf: HTTPMatchRequest) -> bool:
    """Istio's ``hasConflict``: the leaf asks for something the root excludes."""
    for a, b in (
        (root.uri, leaf.uri),
        (root.scheme, leaf.scheme),
        (root.method, leaf.method),
        (root.authority, leaf.authority),
    ):
        if _string_conflict(a, b):
            return True
    for mine, theirs in (
        (root.headers, leaf.headers),
        (root.without_headers, leaf.without_headers),
        (root.query_params, leaf.query_params),
    ):
        for key, value in theirs.items():
            if _string_conflict(mine.get(key), value):
                return True
    if root.ignore_uri_case != leaf.ignore_uri_case:
        return True
    if root.port and leaf.port and root.port != leaf.port:
        return True
    if root.source_namespace and leaf.source_namespace != root.source_namespace:
        return True
    for key, label in leaf.source_labels.items():
        if key in root.source_labels and root.source_labels[key] != label:
            return True
    if root.gateways and leaf.gateways:
        if len(root.gateways) < len(leaf.gateways):
            return True
        if not set(leaf.gateways) <= set(root.gateways):
            return True
    return False


def _string_conflict(root: StringMatch | None, leaf: StringMatch | None) -> bool:
    """Istio's ``stringMatchConflict``: the leaf's match must be narrower than the root's."""
    if root is None or leaf is None:
        return False
    if root.regex and (leaf.regex or leaf.prefix or leaf.exact):
        return True
    if leaf.regex and (root.regex or root.prefix or root.exact):
        return True
    if root.exact:
        return bool(leaf.prefix) or leaf.exact != root.exact
    if root.prefix:
        if leaf.prefix:
            return not leaf.prefix.startswith(root.prefix)
        if leaf.exact:
            return not leaf.exact.startswith(root.prefix)
    return True


# -- one proxy's view ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _EgressHost:
    namespace: str  # "*" any, "~" none, else a namespace (``.`` already resolved)
    host: str

    def covers(self, namespace: str, host: str) -> bool:
        if self.namespace == "~":
            return False
        if self.namespace != "*" and self.namespace != namespace:
            return False
        return host_matches(self.host, host)

    def overlaps(self, namespace: str, host: str) -> bool:
        if self.namespace == "~":
            return False
        if self.namespace != "*" and self.namespace != namespace:
            return False
        return hosts_overlap(self.host, host)


_EVERYTHING = (_EgressHost(namespace="*", host="*"),)


class ProxyView:
    """What one proxy sees of a snapshot: its services, VirtualServices, DestinationRules,
    Sidecar, gateways and own service instances (istiod's ``SidecarScope`` plus the proxy).
    """

    def __init__(self, snapshot: Snapshot, proxy: Proxy) -> None:
        self.snapshot = snapshot
        self.proxy = proxy
        self.mesh = snapshot.mesh
        self.sidecar = snapshot.sidecar_for(proxy)
        mode = self.mesh.outbound_traffic_policy
        if self.sidecar is not None and self.sidecar.spec.outbound_traffic_policy is not None:
            mode = self.sidecar.spec.outbound_traffic_policy.mode
        self.outbound_policy: OutboundTrafficPolicyMode = mode
        self.egress = self._egress_hosts()
        # Exact egress hosts by (namespace, host) -- a Sidecar listing services one by one
        # costs a dict lookup per service, not a scan of the list.
        self._exact_egress = {
            (e.namespace, e.host) for e in self.egress if "*" not in e.host and e.namespace != "~"
        }
        self._wild_egress = tuple(
            e
            for e in self.egress
            if "*" in e.host or (e.namespace, e.host) not in self._exact_egress
        )
        self.gateways: tuple[GatewayConfig, ...] = snapshot.gateways_for(proxy)
        if proxy.type is ProxyType.ROUTER:
            self.gateway_names = frozenset(g.key for g in self.gateways)
        else:
            self.gateway_names = frozenset({MESH_GATEWAY})
        self._services = self._visible_services()
        self.services: tuple[Service, ...] = tuple(
            self._services[h] for h in sorted(self._services)
        )
        self.virtual_services: tuple[VirtualServiceConfig, ...] = self._visible_virtual_services()
        self._rules: dict[str, MergedDestinationRule | None] = {}
        self._clusters: tuple[OutboundCluster, ...] | None = None
        # Intermediate results that several translators share (the outbound virtual hosts
        # serve both the per-port route configurations and the explicit-proxy listener).
        self.memo: dict[str, Any] = {}

    def __repr__(self) -> str:
        return (
            f"<ProxyView {self.proxy.id} [{len(self.services)} services, "
            f"{len(self.virtual_services)} vs]>"
        )

    # -- lookups -----------------------------------------------------------------------------

    def service(self, hostname: str) -> Service | None:
        return self._services.get(hostname)

    def destination_rule(self, service: Service) -> MergedDestinationRule | None:
        hostname = service.hostname
        if hostname not in self._rules:
            self._rules[hostname] = self.snapshot.destination_rule(
                self.proxy.namespace, self.proxy.labels, service
            )
        return self._rules[hostname]

    def endpoints(self, service: Service, port: int) -> Sequence[Endpoint]:
        return self.snapshot.endpoints(service, port)

    @property
    def instances(self) -> Sequence[ServiceInstance]:
        """The service ports this proxy's workload serves (its inbound side)."""
        return self.snapshot.instances(self.proxy.ip)

    def outbound_clusters(self) -> tuple[OutboundCluster, ...]:
        """Every outbound cluster of the proxy: service by service, port by port, the
        service-wide cluster before its subsets. UDP ports have none."""
        if self._clusters is None:
            out: list[OutboundCluster] = []
            for service in self.services:
                rule = self.destination_rule(service)
                for port in service.ports:
                    if port.protocol is PortProtocol.UDP:
                        continue
                    out.append(
                        OutboundCluster(
                            name=outbound_cluster_name(port.port, service.hostname),
                            service=service,
                            port=port,
                            subset="",
                            labels=None,
                            policy=rule.policy(port.port) if rule else EffectivePolicy(),
                            rule=rule,
                        )
                    )
                    if rule is None:
                        continue
                    for subset in rule.subsets:
                        out.append(
                            OutboundCluster(
                                name=outbound_cluster_name(
                                    port.port, service.hostname, subset.name
                                ),
                                service=service,
                                port=port,
                                subset=subset.name,
                                labels=subset.labels,
                                policy=rule.policy(port.port, subset.name),
                                rule=rule,
                            )
                        )
            self._clusters = tuple(out)
        return self._clusters

    # -- building ----------------------------------------------------------------------------

    def _egress_hosts(self) -> tuple[_EgressHost, ...]:
        if self.sidecar is None or not self.sidecar.spec.egress:
            return _EVERYTHING
        out: list[_EgressHost] = []
        for listener in self.sidecar.spec.egress:
            for entry in listener.hosts:
                ns, _, host = entry.rpartition("/")
                if ns == ".":
                    ns = self.sidecar.namespace
                out.append(_EgressHost(namespace=ns, host=host))
        return tuple(out)

    def _allowed(self, namespace: str, host: str) -> bool:
        if self.egress is _EVERYTHING:
            return True
        exact = self._exact_egress
        if (namespace, host) in exact or ("*", host) in exact:
            return True
        return any(e.covers(namespace, host) for e in self._wild_egress)

    def _exact_egress_only(self) -> bool:
        """A Sidecar whose egress names hosts one by one, without wildcards."""
        return self.egress is not _EVERYTHING and all(e.namespace == "~" for e in self._wild_egress)

    def _visible_services(self) -> dict[str, Service]:
        namespace = self.proxy.namespace
        chosen: dict[str, Service] = {}
        candidates: Iterable[Service] = self.snapshot.services
        if self._exact_egress_only():
            # Only exact hosts: look them up (in the registry's order, which ``_preferred``
            # relies on) instead of scanning every service of the mesh.
            hosts = sorted({host for _, host in self._exact_egress})
            candidates = sorted(
                (s for h in hosts for s in self.snapshot.services_for_host(h)),
                key=self.snapshot.service_order,
            )
        for service in candidates:
            if not service.visible_to(namespace):
                continue
            if not self._allowed(service.namespace, service.hostname):
                continue
            current = chosen.get(service.hostname)
            if current is None or _preferred(service, current, namespace):
                chosen[service.hostname] = service
        return chosen

    def _visible_virtual_services(self) -> tuple[VirtualServiceConfig, ...]:
        namespace = self.proxy.namespace
        seen: set[int] = set()
        found: list[tuple[int, VirtualServiceConfig]] = []
        exact_only = self.proxy.type is ProxyType.SIDECAR and self._exact_egress_only()
        hosts = sorted({host for _, host in self._exact_egress})
        for gateway in sorted(self.gateway_names):
            candidates: Iterable[VirtualServiceConfig]
            if exact_only:
                candidates = self.snapshot.virtual_services_for_hosts(gateway, hosts)
            else:
                candidates = self.snapshot.virtual_services_for_gateway(gateway)
            for vs in candidates:
                if id(vs) in seen:
                    continue
                seen.add(id(vs))
                public = PUBLIC in vs.export_to
                if not public and namespace not in vs.export_to:
                    continue
                if self._scoped_out(vs):
                    continue
                group = 2 if public else (0 if vs.namespace == namespace else 1)
                found.append((group, vs))
        found.sort(key=lambda item: (item[0], item[1].order))
        return tuple(vs for _, vs in found)

    def _scoped_out(self, vs: VirtualServiceConfig) -> bool:
        """A Sidecar's egress hosts leave out every host of ``vs``."""
        if self.proxy.type is not ProxyType.SIDECAR or self.egress is _EVERYTHING:
            return False
        exact = self._exact_egress
        namespace = vs.namespace
        for h in vs.hosts:
            if "*" in h:
                if any(e.overlaps(namespace, h) for e in self.egress):
                    return False
                continue
            # Two exact hosts overlap only when equal: a set lookup, not a scan of the
            # egress list for each of the mesh's VirtualServices.
            if (namespace, h) in exact or ("*", h) in exact:
                return False
            if any(e.overlaps(namespace, h) for e in self._wild_egress):
                return False
        return True


def _preferred(candidate: Service, current: Service, namespace: str) -> bool:
    """Whether ``candidate`` beats ``current`` for one hostname (the first one seen is the
    older, as registries list services oldest first)."""
    if candidate.is_kubernetes != current.is_kubernetes:
        return candidate.is_kubernetes
    if (candidate.namespace == namespace) != (current.namespace == namespace):
        return candidate.namespace == namespace
    return False


__all__ = [
    "DEFAULT_MESH",
    "MESH_GATEWAY",
    "ROOT_NAMESPACE",
    "AuthorizationPolicyConfig",
    "DestinationRuleConfig",
    "EffectivePolicy",
    "GatewayConfig",
    "MergedDestinationRule",
    "MeshConfig",
    "OutboundCluster",
    "Proxy",
    "ProxyType",
    "ProxyView",
    "ServiceInstance",
    "SidecarConfig",
    "Snapshot",
    "TelemetryConfig",
    "VirtualServiceConfig",
    "host_matches",
    "hosts_overlap",
    "inbound_cluster_name",
    "labels_match",
    "outbound_cluster_name",
    "parse_cluster_name",
    "resolve_gateway",
    "resolve_host",
]
