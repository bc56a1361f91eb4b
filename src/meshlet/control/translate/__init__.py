"""Translation: a snapshot and a proxy in, Envoy resources out (istiod's
``pilot/pkg/networking/core``).

Each module is one xDS type, a pure function of ``(snapshot, proxy)``:

* ``clusters`` -- CDS: ``outbound|<port>|<subset>|<host>``, ``inbound|<port>||`` and the fixed
  BlackHole/Passthrough clusters, with DestinationRule policies applied.
* ``endpoints`` -- EDS: a ``ClusterLoadAssignment`` per EDS cluster (subsets filtered by labels).
* ``routes`` -- RDS: VirtualService rules as routes, virtual hosts with Istio's domains,
  ``"<port>"`` route configurations (and ``http_proxy``, ``http.<port>``, the inbound one).
* ``listeners`` -- LDS: the sidecar's ``virtualOutbound`` (15001, explicit HTTP proxy) and
  ``virtualInbound`` (15006), or a gateway's ``0.0.0.0_<port>``, with inline routes.
* Helpers the listeners use: ``authz`` (AuthorizationPolicy → RBAC filters, dry-run as shadow
  rules), ``request_authn`` (RequestAuthentication → jwt_authn), ``peer_authn``
  (PeerAuthentication modes, per port too) and ``telemetry`` (Telemetry and the mesh's options
  → ``istio.metadata_exchange``, ``istio.stats``, ``tracing`` and access logs, plus the OTLP
  collector's cluster).
* ``grpc`` -- all four types for proxyless gRPC clients (istiod's ``grpcgen``), by requested
  name: ``<host>:<port>`` API listeners over RDS, built on the sidecar's routes and
  endpoints.

``snapshot.view(proxy)`` is computed once per proxy and shared by the four, so building a
proxy's whole configuration reads the mesh once. Nothing here does I/O. The snapshot and its
views memoise what they compute, so give one snapshot to one thread at a time.
"""

from __future__ import annotations

from dataclasses import dataclass

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2

from meshlet.control.snapshot import Proxy, Snapshot
from meshlet.control.translate.clusters import build_clusters
from meshlet.control.translate.endpoints import build_endpoints
from meshlet.control.translate.grpc import (
    build_grpc_clusters,
    build_grpc_endpoints,
    build_grpc_listeners,
    build_grpc_route_configs,
)
from meshlet.control.translate.listeners import build_listeners
from meshlet.control.translate.routes import build_route_configs

LISTENER_TYPE = "type.googleapis.com/envoy.config.listener.v3.Listener"
ROUTE_TYPE = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
CLUSTER_TYPE = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
ENDPOINT_TYPE = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"


@dataclass(frozen=True, slots=True, kw_only=True)
class ProxyResources:
    """One proxy's whole configuration, by xDS type."""

    listeners: tuple[listener_pb2.Listener, ...]
    routes: tuple[route_pb2.RouteConfiguration, ...]
    clusters: tuple[cluster_pb2.Cluster, ...]
    endpoints: tuple[endpoint_pb2.ClusterLoadAssignment, ...]

    def __repr__(self) -> str:
        return (
            f"<ProxyResources [{len(self.listeners)} listeners, {len(self.routes)} routes, "
            f"{len(self.clusters)} clusters, {len(self.endpoints)} endpoints]>"
        )


def build_all(snapshot: Snapshot, proxy: Proxy) -> ProxyResources:
    """Every resource type for ``proxy``."""
    return ProxyResources(
        listeners=tuple(build_listeners(snapshot, proxy)),
        routes=tuple(build_route_configs(snapshot, proxy)),
        clusters=tuple(build_clusters(snapshot, proxy)),
        endpoints=tuple(build_endpoints(snapshot, proxy)),
    )


__all__ = [
    "CLUSTER_TYPE",
    "ENDPOINT_TYPE",
    "LISTENER_TYPE",
    "ROUTE_TYPE",
    "ProxyResources",
    "build_all",
    "build_clusters",
    "build_endpoints",
    "build_grpc_clusters",
    "build_grpc_endpoints",
    "build_grpc_listeners",
    "build_grpc_route_configs",
    "build_listeners",
    "build_route_configs",
]
