"""What the ADS server asks of the resource side: generators by type URL, and who a proxy is.

The ADS server does not know how resources are made. For each type URL it serves (LDS, RDS,
CDS, EDS) it holds one ``Generator``; given the proxy at the other end of a stream and the
resource names that proxy subscribed to, a generator returns those resources, packed as
``google.protobuf.Any``, and the version they belong to. Generators are pure: no I/O, no
awaits, called on the event loop; a generator that raises is logged and that one type is
skipped for that one proxy, the stream carries on.

``ProxyInfo`` is the proxy as its first ``DiscoveryRequest.node`` describes it, with Istio's
node id (``sidecar~<ip>~<pod>.<namespace>~<namespace>.svc.cluster.local``, ``router~...`` for
a gateway) and node metadata (NAMESPACE, SERVICE_ACCOUNT, WORKLOAD_NAME, LABELS, INSTANCE_IPS,
GENERATOR) already parsed. Ids in other forms (a proxyless gRPC client's, a test's) are
accepted: the parts that cannot be read from them are empty.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any, Protocol

from google.protobuf import any_pb2, json_format

LISTENER_TYPE = "type.googleapis.com/envoy.config.listener.v3.Listener"
ROUTE_TYPE = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
CLUSTER_TYPE = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
ENDPOINT_TYPE = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
SECRET_TYPE = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"

#: Node metadata ``GENERATOR`` of a proxyless gRPC client (Istio's gRPC bootstrap sets it):
#: it is served istiod's ``grpcgen`` resources, not a sidecar's.
GRPC_GENERATOR = "grpc"

#: Short names, as istiod and Envoy use them in logs, metrics and ``proxy-status``.
SHORT_TYPE_NAMES: Mapping[str, str] = MappingProxyType(
    {
        LISTENER_TYPE: "lds",
        ROUTE_TYPE: "rds",
        CLUSTER_TYPE: "cds",
        ENDPOINT_TYPE: "eds",
        SECRET_TYPE: "sds",
    }
)

#: Types whose state-of-the-world responses carry every subscribed resource, so that a
#: resource missing from a response is deleted, and whose first request may be a wildcard.
FULL_STATE_TYPES = frozenset({LISTENER_TYPE, CLUSTER_TYPE})


def short_type_name(type_url: str) -> str:
    """``lds``, ``rds``, ``cds``, ``eds``, ``sds``; the message name for other types."""
    return SHORT_TYPE_NAMES.get(type_url) or type_url.rsplit(".", 1)[-1]


@dataclass(frozen=True, slots=True, kw_only=True)
class ProxyInfo:
    """A connected proxy, as its node describes it.

    ``kind`` is ``sidecar`` or ``router`` for Istio-style ids, else empty; ``namespace`` comes
    from the NAMESPACE metadata, else from the id's ``<pod>.<namespace>`` part; ``generator``
    is the GENERATOR metadata (``grpc`` for a proxyless gRPC client), else empty.
    """

    id: str
    cluster: str = ""
    metadata: Mapping[str, Any] = field(default_factory=dict)
    kind: str = ""
    ip: str = ""
    pod: str = ""
    namespace: str = ""
    dns_domain: str = ""
    service_account: str = ""
    workload_name: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)
    instance_ips: tuple[str, ...] = ()
    user_agent: str = ""
    generator: str = ""
    #: The SPIFFE id of the stream's client certificate (ADS over mTLS), else empty: what the
    #: peer proved, as opposed to what its node claims.
    peer_identity: str = ""

    @property
    def proxyless_grpc(self) -> bool:
        """A grpcio (or grpc-go, grpc-java) xDS client rather than an Envoy-like proxy."""
        return self.generator == GRPC_GENERATOR

    @classmethod
    def from_node(cls, node: Any) -> ProxyInfo:
        """Read an ``envoy.config.core.v3.Node``."""
        metadata = json_format.MessageToDict(node.metadata) if node.HasField("metadata") else {}
        info = cls.parse_id(node.id, metadata)
        agent = " ".join(p for p in (node.user_agent_name, node.user_agent_version) if p)
        return replace(info, cluster=node.cluster, user_agent=agent)

    @classmethod
    def parse_id(cls, node_id: str, metadata: Mapping[str, Any] | None = None) -> ProxyInfo:
        """Parse Istio's ``<kind>~<ip>~<pod>.<namespace>~<dns domain>`` and node metadata."""
        metadata = dict(metadata or {})
        kind = ip = pod = namespace = dns_domain = ""
        parts = node_id.split("~")
        if len(parts) == 4 and parts[0] in ("sidecar", "router"):
            kind, ip, pod_ns, dns_domain = parts
            pod, _, namespace = pod_ns.partition(".")
        namespace = _string(metadata.get("NAMESPACE")) or namespace
        raw_labels = metadata.get("LABELS")
        labels = (
            {str(k): str(v) for k, v in raw_labels.items()} if isinstance(raw_labels, dict) else {}
        )
        ips = tuple(p for p in _string(metadata.get("INSTANCE_IPS")).split(",") if p) or (
            (ip,) if ip else ()
        )
        return cls(
            id=node_id,
            metadata=metadata,
            kind=kind,
            ip=ip,
            pod=pod,
            namespace=namespace,
            dns_domain=dns_domain,
            service_account=_string(metadata.get("SERVICE_ACCOUNT")),
            workload_name=_string(metadata.get("WORKLOAD_NAME")),
            labels=labels,
            instance_ips=ips,
            generator=_string(metadata.get("GENERATOR")),
        )

    def __repr__(self) -> str:
        return f"<ProxyInfo {self.id!r}>"


def _string(value: Any) -> str:
    return value if isinstance(value, str) else ""


@dataclass(frozen=True, slots=True, kw_only=True)
class GeneratedResources:
    """One type's resources for one proxy: name -> packed resource, and their version.

    An empty ``version`` lets the server derive one from the resources' content.
    """

    version: str
    resources: Mapping[str, any_pb2.Any]

    def __repr__(self) -> str:
        return f"<GeneratedResources version={self.version!r} [{len(self.resources)} resources]>"


class Generator(Protocol):
    """Makes one type's resources for one proxy. Pure; called on the event loop."""

    def generate(
        self, proxy: ProxyInfo, type_url: str, names: Sequence[str] | None
    ) -> GeneratedResources:
        """The resources named in ``names`` (``None``: a wildcard, every resource of the type
        this proxy should have). Names that do not exist are left out: for LDS and CDS that
        tells the proxy they are gone. May raise any exception: the server logs it and sends
        nothing of this type to this proxy for now."""
        ...
