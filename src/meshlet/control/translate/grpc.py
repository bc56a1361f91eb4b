"""Proxyless gRPC: the resources istiod's ``grpcgen`` serves to gRPC's own xDS client.

A gRPC client with ``GRPC_XDS_BOOTSTRAP`` and a target ``xds:///helloworld:5000`` asks, one
name at a time, for the listener ``helloworld:5000``, the route configuration that listener
names, the clusters the routes name and their endpoints. Node metadata ``GENERATOR: grpc``
(set by Istio's gRPC bootstrap) marks such a client; it gets these resources instead of a
sidecar's. Each builder takes the requested names (``None``: a wildcard, everything the
client could ask for) and returns only those that exist.

Rules kept (``ISTIO-TRANSLATION.md`` §7, istiod's ``pilot/pkg/networking/grpcgen``):

* LDS: ``<host>:<port>`` -- the FQDN, a short name expanded with the node's DNS domain
  (``helloworld``, ``helloworld.default``, ``helloworld.default.svc`` from ``default``), or a
  host without a port (every port) -- gives a listener named as requested. It has no filter
  chains, only an ``api_listener`` HttpConnectionManager with the fault and router filters
  (typed configs: gRPC refuses a router without one) and RDS over ADS for
  ``outbound|<port>||<fqdn>``.
* RDS: ``outbound|<port>||<fqdn>`` holds the service's one sidecar virtual host for that port
  (its VirtualService's routes, or the default route), every domain followed by
  ``<domain>:<port>`` -- gRPC matches the target's authority with its port -- and no
  ``ignore_port_in_host_matching``. Each route also carries its timeout as
  ``max_stream_duration`` (gRPC reads no other). Per-route CORS configurations are dropped:
  gRPC has no CORS filter and refuses configurations for filters it does not know.
* CDS: EDS clusters only (gRPC refuses other types), subsets included, with the
  DestinationRule's load balancer (ROUND_ROBIN by default; LEAST_REQUEST, RING_HASH,
  MAGLEV) and ``http2MaxRequests`` as the only circuit breaker. Services not resolved by EDS
  (DNS, passthrough) have no cluster here.
* EDS: the sidecar's assignments (subset-filtered, ready endpoints, locality groups
  weighted), with a ``locality`` on every group, empty if unknown: gRPC refuses a group
  without one.

Not served yet: gRPC server listeners (``xds.istio.io/grpc/lds/inbound/<ip>:<port>``) and
ISTIO_MUTUAL through certificate providers (meshlet has no certificates yet).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import address_pb2, config_source_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import api_listener_pb2, listener_pb2
from envoy.config.route.v3 import route_components_pb2 as rc
from envoy.config.route.v3 import route_pb2
from envoy.extensions.filters.http.fault.v3 import fault_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from google.protobuf import any_pb2, message

from meshlet.api.networking import SimpleLB
from meshlet.control.registry import Service
from meshlet.control.snapshot import (
    OutboundCluster,
    Proxy,
    ProxyView,
    Snapshot,
    outbound_cluster_name,
    parse_cluster_name,
)
from meshlet.control.translate.endpoints import load_assignment
from meshlet.control.translate.routes import (
    CORS_FILTER,
    FAULT_FILTER,
    RouteBuilder,
    service_domains,
    sidecar_virtual_hosts,
)

ROUTER_FILTER = "envoy.filters.http.router"
SERVER_LISTENER_PREFIX = "xds.istio.io/grpc/lds/inbound/"


# -- LDS -----------------------------------------------------------------------------------------


def build_grpc_listeners(
    snapshot: Snapshot, proxy: Proxy, names: Sequence[str] | None
) -> list[listener_pb2.Listener]:
    """The LDS response for a proxyless client: a listener per requested ``<host>:<port>``
    that names a visible service port (every service port, FQDN-named, for a wildcard)."""
    view = snapshot.view(proxy)
    out: dict[str, listener_pb2.Listener] = {}
    for service, requested, ports in _listener_requests(view, names):
        for sp in service.ports:
            if ports is not None and sp.port not in ports:
                continue
            name = join_host_port(requested, sp.port)
            if name not in out:
                out[name] = grpc_listener(name, service, sp.port)
    return [out[name] for name in sorted(out)]


def grpc_listener(name: str, service: Service, port: int) -> listener_pb2.Listener:
    """``name`` as an ``api_listener``: an HCM routing with ``outbound|<port>||<fqdn>``."""
    hcm = hcm_pb2.HttpConnectionManager()
    rds = hcm.rds
    rds.route_config_name = outbound_cluster_name(port, service.hostname)
    _ads(rds.config_source)
    hcm.http_filters.append(_filter(FAULT_FILTER, fault_pb2.HTTPFault()))
    hcm.http_filters.append(_filter(ROUTER_FILTER, router_pb2.Router()))
    listener = listener_pb2.Listener(name=name)
    address = next((a for a in service.addresses if a != "0.0.0.0"), "0.0.0.0")
    listener.address.CopyFrom(
        address_pb2.Address(
            socket_address=address_pb2.SocketAddress(address=address, port_value=port)
        )
    )
    listener.api_listener.CopyFrom(api_listener_pb2.ApiListener(api_listener=_pack(hcm)))
    return listener


def _listener_requests(
    view: ProxyView, names: Sequence[str] | None
) -> Iterable[tuple[Service, str, frozenset[int] | None]]:
    """(service, name to answer with, ports asked for or None for all), as istiod's
    ``newListenerNameFilter``: each name is tried as written and as its FQDN."""
    if names is None:
        for service in view.services:
            yield service, service.hostname, None
        return
    for name in names:
        if name.startswith(SERVER_LISTENER_PREFIX):
            continue  # gRPC servers' inbound listeners: not served yet
        host, port = split_host_port(name)
        ports = None if port is None else frozenset({port})
        for candidate in dict.fromkeys((host, fqdn_of(host, view.proxy))):
            found = view.service(candidate) if candidate else None
            if found is not None:
                yield found, host, ports
                break


def split_host_port(name: str) -> tuple[str, int | None]:
    """``host:port`` (``[v6]:port``) -> (host, port); a name without a port -> (name, None)."""
    host, colon, port = name.rpartition(":")
    if not colon or not port.isdigit() or (":" in host and not host.startswith("[")):
        return name, None
    return host.removeprefix("[").removesuffix("]"), int(port)


def join_host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def fqdn_of(host: str, proxy: Proxy) -> str:
    """istiod's ``tryFindFQDN``: ``helloworld`` -> ``helloworld.<dns domain>``; from a node in
    ``default``, ``helloworld.default`` and ``helloworld.default.svc`` likewise; else ""."""
    domain = proxy.domain
    if "." not in host:
        return f"{host}.{domain}"
    for suffix in (proxy.namespace, proxy.namespace + ".svc"):
        short = host.removesuffix("." + suffix)
        if short != host and domain.startswith(suffix):
            return f"{short}.{domain}"
    return ""


# -- RDS -----------------------------------------------------------------------------------------


def build_grpc_route_configs(
    snapshot: Snapshot, proxy: Proxy, names: Sequence[str] | None
) -> list[route_pb2.RouteConfiguration]:
    """The RDS response: ``outbound|<port>||<fqdn>`` per requested name that is a visible
    service port (every one for a wildcard)."""
    view = snapshot.view(proxy)
    wanted: list[tuple[Service, int]] = []
    if names is None:
        wanted = [(s, p.port) for s in view.services for p in s.ports]
    else:
        for name in names:
            parsed = parse_cluster_name(name)
            if parsed is None or parsed[0] != "outbound" or parsed[2]:
                continue
            service = view.service(parsed[3])
            if service is not None and service.port(parsed[1]) is not None:
                wanted.append((service, parsed[1]))
    return [grpc_route_config(view, service, port) for service, port in wanted]


def grpc_route_config(view: ProxyView, service: Service, port: int) -> route_pb2.RouteConfiguration:
    name = outbound_cluster_name(port, service.hostname)
    plan = next(
        (p for p in sidecar_virtual_hosts(view) if p.owner == service.hostname and p.port == port),
        None,
    )
    if plan is not None:
        domains, routes = plan.domains, plan.routes
    else:  # a port without HTTP routes (TCP, say): gRPC still needs a way to the cluster
        domains = service_domains(service, view.proxy)
        routes = [RouteBuilder(view, view.gateway_names).default_route(service, port)]
    vh = rc.VirtualHost(name=f"{service.hostname}:{port}")
    vh.domains.extend(d for domain in domains for d in (domain, f"{domain}:{port}"))
    vh.routes.extend(grpc_route(r) for r in routes)
    return route_pb2.RouteConfiguration(name=name, virtual_hosts=[vh])


def grpc_route(route: rc.Route) -> rc.Route:
    """A sidecar route as gRPC takes it: the timeout also as ``max_stream_duration``, no CORS
    configuration. The sidecar's route is shared: this is a copy."""
    out = rc.Route()
    out.CopyFrom(route)
    if CORS_FILTER in out.typed_per_filter_config:
        del out.typed_per_filter_config[CORS_FILTER]
    if out.HasField("route"):
        out.route.max_stream_duration.max_stream_duration.CopyFrom(out.route.timeout)
    return out


# -- CDS -----------------------------------------------------------------------------------------


_LB_POLICY = {
    SimpleLB.LEAST_CONN: cluster_pb2.Cluster.LEAST_REQUEST,
    SimpleLB.LEAST_REQUEST: cluster_pb2.Cluster.LEAST_REQUEST,
}


def build_grpc_clusters(
    snapshot: Snapshot, proxy: Proxy, names: Sequence[str] | None
) -> list[cluster_pb2.Cluster]:
    """The CDS response: the requested EDS clusters (every one for a wildcard)."""
    return [grpc_cluster(c) for c in _eds_clusters(snapshot.view(proxy), names)]


def grpc_cluster(c: OutboundCluster) -> cluster_pb2.Cluster:
    """An EDS cluster over ADS with the DestinationRule's load balancer and request limit."""
    cluster = cluster_pb2.Cluster(name=c.name, type=cluster_pb2.Cluster.EDS)
    cluster.eds_cluster_config.service_name = c.name
    _ads(cluster.eds_cluster_config.eds_config)
    cluster.lb_policy = cluster_pb2.Cluster.ROUND_ROBIN
    lb = c.policy.load_balancer
    if lb is not None and lb.consistent_hash is not None:
        hashing = lb.consistent_hash
        if hashing.maglev is not None:
            cluster.lb_policy = cluster_pb2.Cluster.MAGLEV
        else:
            cluster.lb_policy = cluster_pb2.Cluster.RING_HASH
            size = hashing.minimum_ring_size or (
                hashing.ring_hash.minimum_ring_size if hashing.ring_hash is not None else 0
            )
            if size:
                cluster.ring_hash_lb_config.minimum_ring_size.value = size
    elif lb is not None and lb.simple is not None:
        cluster.lb_policy = _LB_POLICY.get(lb.simple, cluster_pb2.Cluster.ROUND_ROBIN)
    pool = c.policy.connection_pool
    if pool is not None and pool.http is not None and pool.http.http2_max_requests > 0:
        threshold = cluster.circuit_breakers.thresholds.add()
        threshold.max_requests.value = pool.http.http2_max_requests
    return cluster


# -- EDS -----------------------------------------------------------------------------------------


def build_grpc_endpoints(
    snapshot: Snapshot, proxy: Proxy, names: Sequence[str] | None
) -> list[endpoint_pb2.ClusterLoadAssignment]:
    """The EDS response: an assignment per requested EDS cluster, each endpoint at the
    application's own port (a proxyless client speaks HTTP/2 to it, not to its sidecar)."""
    view = snapshot.view(proxy)
    return [load_assignment(c, view, direct=True) for c in _eds_clusters(view, names)]


def _eds_clusters(view: ProxyView, names: Sequence[str] | None) -> list[OutboundCluster]:
    clusters = [c for c in view.outbound_clusters() if c.uses_eds]
    if names is None:
        return clusters
    by_name = {c.name: c for c in clusters}
    return [by_name[n] for n in dict.fromkeys(names) if n in by_name]


# -- small pieces --------------------------------------------------------------------------------


def _ads(source: config_source_pb2.ConfigSource) -> None:
    source.ads.SetInParent()
    source.resource_api_version = config_source_pb2.V3


def _filter(name: str, config: message.Message) -> hcm_pb2.HttpFilter:
    return hcm_pb2.HttpFilter(name=name, typed_config=_pack(config))


def _pack(msg: message.Message) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(msg)
    return packed


__all__ = [
    "SERVER_LISTENER_PREFIX",
    "build_grpc_clusters",
    "build_grpc_endpoints",
    "build_grpc_listeners",
    "build_grpc_route_configs",
    "fqdn_of",
    "grpc_cluster",
    "grpc_listener",
    "grpc_route",
    "grpc_route_config",
    "join_host_port",
    "split_host_port",
]
