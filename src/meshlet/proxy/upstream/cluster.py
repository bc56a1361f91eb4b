"""Clusters: their compiled configuration and their live state in one worker process.

``compile_cluster`` turns an Envoy ``Cluster`` proto into an immutable ``ClusterConfig``.
``Cluster`` is what a worker keeps per cluster: hosts (static or resolved by DNS), the load
balancer built over them, per-host connection pools, circuit-breaker counts, outlier
detection and active health checking. A ``ClusterManager`` owns them and swaps them when a
new configuration arrives, keeping the live state of clusters whose configuration did not
change.

A cluster is *initialized* once it has its first host set (DNS clusters: the first answer)
and, with active health checking, once every host has had its first check, as Envoy's
``ClusterImplBase`` waits for the first round before the server goes LIVE. EDS clusters (only
from ADS) get their hosts from a ClusterLoadAssignment: the ADS client installs an EDS cluster
once its assignment is known (Envoy's cluster warming), and a later assignment changes the hosts
of the live cluster in place, keeping the pools and counters of hosts that stayed. A passing active
health check returns a host ejected by outlier detection (Envoy's
``successful_active_health_check_uneject_host``, default true).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import random
import socket
from collections.abc import Iterable
from dataclasses import dataclass, replace

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import health_check_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from google.protobuf import struct_pb2

from meshlet.errors import ConfigError, ProblemList
from meshlet.proxy.fields import (
    DEFAULT_FETCH_TIMEOUT,
    ads_config_source,
    check_fields,
    duration_field,
    join,
    uint_field,
)
from meshlet.proxy.filters.metadata_exchange import endpoint_peer
from meshlet.proxy.telemetry.stats import ClusterStats, StatsStore
from meshlet.proxy.tls import TlsConfig, TlsContexts, compile_transport_socket
from meshlet.proxy.upstream.health import (
    Check,
    HealthCheckConfig,
    HealthChecker,
    compile_health_checks,
)
from meshlet.proxy.upstream.host import Host, LbContext
from meshlet.proxy.upstream.lb import LbConfig, LoadBalancer, build_load_balancer, compile_lb_config
from meshlet.proxy.upstream.outlier import OutlierConfig, OutlierDetector, compile_outlier_config
from meshlet.proxy.upstream.pool import HostPool

log = logging.getLogger("meshlet.cluster")

_DISCOVERY = {
    cluster_pb2.Cluster.STATIC: "STATIC",
    cluster_pb2.Cluster.STRICT_DNS: "STRICT_DNS",
    cluster_pb2.Cluster.LOGICAL_DNS: "LOGICAL_DNS",
    cluster_pb2.Cluster.ORIGINAL_DST: "ORIGINAL_DST",
}
ORIGINAL_DST_HEADER = b"x-envoy-original-dst-host"  # original_dst_lb_config's default header
# dns_lookup_family -> (getaddrinfo family, preferred family or None). Envoy's rules: AUTO
# uses IPv6 addresses when there are any, else IPv4; V4_PREFERRED the reverse; ALL keeps both.
_FAMILIES: dict[int, tuple[int, int | None]] = {
    cluster_pb2.Cluster.AUTO: (socket.AF_UNSPEC, socket.AF_INET6),
    cluster_pb2.Cluster.V4_ONLY: (socket.AF_INET, None),
    cluster_pb2.Cluster.V6_ONLY: (socket.AF_INET6, None),
    cluster_pb2.Cluster.V4_PREFERRED: (socket.AF_UNSPEC, socket.AF_INET),
    cluster_pb2.Cluster.ALL: (socket.AF_UNSPEC, None),
}
_CLUSTER_FIELDS = {
    "name",
    "type",
    "connect_timeout",
    "lb_policy",
    "load_assignment",
    "circuit_breakers",
    "outlier_detection",
    "health_checks",
    "max_requests_per_connection",
    "common_http_protocol_options",
    "per_connection_buffer_limit_bytes",
    "dns_refresh_rate",
    "dns_lookup_family",
    "least_request_lb_config",
    "ring_hash_lb_config",
    "maglev_lb_config",
    "common_lb_config",
    "alt_stat_name",
    "eds_cluster_config",
    "original_dst_lb_config",
    "cleanup_interval",
    "upstream_bind_config",
    "transport_socket",
    "transport_socket_matches",
    "metadata",
}
SOCKET_MATCH_KEY = "envoy.transport_socket_match"  # endpoint filter_metadata key (Istio's)


@dataclass(frozen=True, slots=True, kw_only=True)
class Thresholds:
    """Circuit-breaker limits for the default priority (Envoy's defaults)."""

    max_connections: int = 1024
    max_pending_requests: int = 1024
    max_requests: int = 1024
    max_retries: int = 3


@dataclass(frozen=True, slots=True, kw_only=True)
class EndpointConfig:
    address: str
    port: int
    weight: int
    priority: int
    hostname: str
    locality: tuple[str, str, str]
    healthy: bool
    # filter_metadata["envoy.transport_socket_match"], flattened: what transport_socket_matches
    # compare (Istio: tlsMode=istio for endpoints with a sidecar)
    socket_match: tuple[tuple[str, str], ...] = ()
    # filter_metadata["istio"]["workload"]: "<workload>;<ns>;<canonical svc>;<rev>;<cluster>",
    # the metrics' destination peer when the response names none (metadata_exchange)
    istio_workload: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class SocketMatch:
    """One ``transport_socket_matches`` entry: endpoints whose socket-match metadata holds
    every pair of ``match`` use ``tls`` (None: plaintext)."""

    name: str
    match: tuple[tuple[str, str], ...]
    tls: TlsConfig | None


@dataclass(frozen=True, slots=True, kw_only=True)
class ClusterConfig:
    name: str
    discovery: str  # STATIC, STRICT_DNS, LOGICAL_DNS, EDS, ORIGINAL_DST
    endpoints: tuple[EndpointConfig, ...]
    connect_timeout: float
    lb: LbConfig
    limits: Thresholds
    outlier: OutlierConfig | None
    health: HealthCheckConfig | None
    idle_timeout: float | None  # upstream connection idle timeout, None = never
    max_requests_per_connection: int  # 0 = unlimited
    buffer_limit: int  # bytes of request body kept for retries and mirrors
    dns_refresh_rate: float
    dns_family: int  # for getaddrinfo
    dns_preferred: int | None  # the family used when the answer has both (None: keep both)
    eds_service_name: str = ""  # EDS: the ClusterLoadAssignment's name (default: the cluster's)
    eds_fetch_timeout: float | None = 15.0  # EDS: how long the first config waits (None: ever)
    original_dst_header: bytes | None = None  # ORIGINAL_DST: the header naming the destination
    cleanup_interval: float = 5.0  # ORIGINAL_DST: how often unused hosts are dropped
    source_address: str | None = None  # upstream_bind_config: the local address to bind
    transport_socket: TlsConfig | None = None  # None: plaintext
    transport_socket_matches: tuple[SocketMatch, ...] = ()
    # metadata filter_metadata["istio"]["services"][0]["host"]: Istio's destination_service for
    # requests to this cluster (istiod sets it on inbound clusters too); "" when absent
    istio_service: str = ""

    def transport_for(self, socket_match: tuple[tuple[str, str], ...]) -> TlsConfig | None:
        """The TLS config for an endpoint with this metadata (Envoy: the first matching
        ``transport_socket_matches`` entry, else ``transport_socket``)."""
        for entry in self.transport_socket_matches:
            if all(pair in socket_match for pair in entry.match):
                return entry.tls
        return self.transport_socket

    def secret_names(self) -> frozenset[str]:
        tls = [self.transport_socket, *(m.tls for m in self.transport_socket_matches)]
        return frozenset(n for t in tls if t is not None for n in t.secret_names())


def compile_cluster(proto: cluster_pb2.Cluster, path: str, *, eds: bool = False) -> ClusterConfig:
    """Compile one Cluster; raises ``ConfigError`` listing every unsupported or bad field.

    ``eds`` allows ``type: EDS`` (clusters from ADS, whose endpoints come over ADS too); the
    result then has no endpoints until ``with_assignment`` gives it some.
    """
    problems = ProblemList()

    def attempt(fn: object) -> None:
        try:
            assert callable(fn)
            fn()
        except ConfigError as e:
            problems.extend(e)

    attempt(lambda: check_fields(proto, path, _CLUSTER_FIELDS))
    istio_service = [""]
    if proto.HasField("metadata"):
        attempt(lambda: istio_service.__setitem__(0, _istio_service(proto, join(path, "metadata"))))
    if not proto.name:
        problems.add(join(path, "name"), "is required")
    discovery = _DISCOVERY.get(proto.type)
    service_name = ""
    fetch_timeout: float | None = DEFAULT_FETCH_TIMEOUT
    if eds and proto.type == cluster_pb2.Cluster.EDS:
        discovery = "EDS"
        try:
            service_name, fetch_timeout = _compile_eds_config(proto, path)
        except ConfigError as e:
            problems.extend(e)
    elif discovery is None:
        name = cluster_pb2.Cluster.DiscoveryType.Name(proto.type)
        supported = ", ".join(_DISCOVERY.values()) + (", EDS" if eds else "")
        hint = "" if eds else "; EDS only for clusters from ADS"
        problems.add(join(path, "type"), f"{name} is not supported (supported: {supported}{hint})")
    if discovery != "EDS" and proto.HasField("eds_cluster_config"):
        problems.add(join(path, "eds_cluster_config"), "is only allowed with type: EDS")
    original_dst: list[bytes | None] = [None]
    if discovery == "ORIGINAL_DST":
        attempt(lambda: original_dst.__setitem__(0, _compile_original_dst(proto, path)))
    else:
        for name in ("original_dst_lb_config", "cleanup_interval"):
            if proto.HasField(name):
                problems.add(join(path, name), "is only allowed with type: ORIGINAL_DST")
        if proto.lb_policy == cluster_pb2.Cluster.CLUSTER_PROVIDED:
            problems.add(join(path, "lb_policy"), "CLUSTER_PROVIDED needs type: ORIGINAL_DST")
    source: list[str | None] = [None]
    if proto.HasField("upstream_bind_config"):
        attempt(lambda: source.__setitem__(0, _compile_bind_config(proto, path)))
    lb: list[LbConfig] = []
    attempt(lambda: lb.append(compile_lb_config(proto, path)))
    outlier: list[OutlierConfig | None] = [None]
    if proto.HasField("outlier_detection"):
        od = proto.outlier_detection

        def _outlier() -> None:
            outlier[0] = compile_outlier_config(od, join(path, "outlier_detection"))

        attempt(_outlier)
    health: list[HealthCheckConfig | None] = [None]
    if proto.health_checks:
        checks: list[health_check_pb2.HealthCheck] = list(proto.health_checks)

        def _health() -> None:
            health[0] = compile_health_checks(checks, proto.name, join(path, "health_checks"))

        attempt(_health)
    endpoints: list[EndpointConfig] = []
    if discovery in ("EDS", "ORIGINAL_DST"):
        if proto.HasField("load_assignment") and proto.load_assignment.endpoints:
            problems.add(
                join(path, "load_assignment"),
                f"is not allowed with type: {discovery} (its endpoints come "
                + ("by EDS)" if discovery == "EDS" else "from each request)"),
            )
    else:
        load_assignment = proto.load_assignment
        attempt(
            lambda: endpoints.extend(compile_cla(load_assignment, join(path, "load_assignment")))
        )
    limits: list[Thresholds] = [Thresholds()]
    if proto.HasField("circuit_breakers"):

        def _limits() -> None:
            limits[0] = _compile_thresholds(proto.circuit_breakers, join(path, "circuit_breakers"))

        attempt(_limits)
    idle_timeout: float | None = 3600.0
    max_requests = uint_field(proto, "max_requests_per_connection", 0)
    if proto.HasField("common_http_protocol_options"):
        opts = proto.common_http_protocol_options
        opts_path = join(path, "common_http_protocol_options")
        attempt(
            lambda: check_fields(opts, opts_path, {"idle_timeout", "max_requests_per_connection"})
        )
        idle_timeout = duration_field(opts, "idle_timeout", 3600.0) or None
        max_requests = uint_field(opts, "max_requests_per_connection", max_requests)
    transport: list[TlsConfig | None] = [None]
    if proto.HasField("transport_socket"):

        def _transport() -> None:
            transport[0] = compile_transport_socket(
                proto.transport_socket, join(path, "transport_socket"), upstream=True
            )

        attempt(_transport)
    matches: list[SocketMatch] = []
    for i, tsm in enumerate(proto.transport_socket_matches):
        attempt(lambda tsm=tsm, i=i: matches.append(_compile_socket_match(tsm, path, i)))
    if discovery == "LOGICAL_DNS" and len(endpoints) != 1:
        problems.add(
            join(path, "load_assignment"), "LOGICAL_DNS clusters need exactly one endpoint"
        )
    problems.raise_if_any()
    connect_timeout = duration_field(proto, "connect_timeout", 5.0)
    return ClusterConfig(
        name=proto.name,
        discovery=discovery or "STATIC",
        endpoints=tuple(endpoints),
        connect_timeout=connect_timeout or 5.0,
        lb=lb[0],
        limits=limits[0],
        outlier=outlier[0],
        health=health[0],
        idle_timeout=idle_timeout,
        max_requests_per_connection=max_requests,
        buffer_limit=uint_field(proto, "per_connection_buffer_limit_bytes", 1024 * 1024),
        dns_refresh_rate=duration_field(proto, "dns_refresh_rate", 5.0) or 5.0,
        dns_family=_FAMILIES[proto.dns_lookup_family][0],
        dns_preferred=_FAMILIES[proto.dns_lookup_family][1],
        eds_service_name=(service_name or proto.name) if discovery == "EDS" else "",
        eds_fetch_timeout=fetch_timeout,
        original_dst_header=original_dst[0],
        cleanup_interval=duration_field(proto, "cleanup_interval", 5.0) or 5.0,
        source_address=source[0],
        transport_socket=transport[0],
        transport_socket_matches=tuple(matches),
        istio_service=istio_service[0],
    )


def _istio_service(proto: cluster_pb2.Cluster, path: str) -> str:
    """The first ``istio.services`` entry's host in a cluster's metadata (istiod's telemetry
    metadata: ``[{host, name, namespace}]``); other metadata is kept for no one."""
    check_fields(proto.metadata, path, {"filter_metadata"})
    if "istio" not in proto.metadata.filter_metadata:
        return ""
    services = proto.metadata.filter_metadata["istio"].fields.get("services")
    if services is None or not services.list_value.values:
        return ""
    first = services.list_value.values[0].struct_value.fields.get("host")
    return str(first.string_value) if first is not None else ""


def _compile_socket_match(tsm: object, path: str, index: int) -> SocketMatch:
    assert isinstance(tsm, cluster_pb2.Cluster.TransportSocketMatch)
    mpath = join(path, f"transport_socket_matches[{index}]")
    check_fields(tsm, mpath, {"name", "match", "transport_socket"})
    tls = None
    if tsm.HasField("transport_socket"):
        tls = compile_transport_socket(
            tsm.transport_socket, join(mpath, "transport_socket"), upstream=True
        )
    return SocketMatch(name=tsm.name, match=_flatten(tsm.match), tls=tls)


def _flatten(struct: struct_pb2.Struct) -> tuple[tuple[str, str], ...]:
    """A Struct's top-level fields as sorted (key, value) strings, for subset comparison."""
    out = []
    for key, value in struct.fields.items():
        kind = value.WhichOneof("kind")
        if kind == "string_value":
            text = value.string_value
        elif kind == "bool_value":
            text = "true" if value.bool_value else "false"
        elif kind == "number_value":
            text = repr(value.number_value)
        else:
            text = value.SerializeToString().hex()
        out.append((key, text))
    return tuple(sorted(out))


def _compile_original_dst(proto: cluster_pb2.Cluster, path: str) -> bytes | None:
    """ORIGINAL_DST's options: the header naming the destination, if the cluster reads one.
    Envoy requires CLUSTER_PROVIDED balancing with this type; so does meshlet."""
    if proto.lb_policy != cluster_pb2.Cluster.CLUSTER_PROVIDED:
        name = cluster_pb2.Cluster.LbPolicy.Name(proto.lb_policy)
        raise ConfigError.at(
            join(path, "lb_policy"), f"must be CLUSTER_PROVIDED with type: ORIGINAL_DST, not {name}"
        )
    if not proto.HasField("original_dst_lb_config"):
        return None
    lb_path = join(path, "original_dst_lb_config")
    config = proto.original_dst_lb_config
    check_fields(config, lb_path, {"use_http_header", "http_header_name"})
    if not config.use_http_header:
        return None
    return (config.http_header_name or ORIGINAL_DST_HEADER.decode()).lower().encode()


def _compile_bind_config(proto: cluster_pb2.Cluster, path: str) -> str:
    """``upstream_bind_config``: the local address upstream connections are made from."""
    bind_path = join(path, "upstream_bind_config")
    bind = proto.upstream_bind_config
    check_fields(bind, bind_path, {"source_address"})
    sa = bind.source_address
    sa_path = join(bind_path, "source_address")
    check_fields(sa, sa_path, {"address", "port_value", "protocol"})
    if sa.port_value != 0:
        raise ConfigError.at(join(sa_path, "port_value"), "must be 0 (any free port)")
    try:
        ipaddress.ip_address(sa.address)
    except ValueError:
        message = f"{sa.address!r} is not an IP address"
        raise ConfigError.at(join(sa_path, "address"), message) from None
    return str(sa.address)


def _compile_eds_config(proto: cluster_pb2.Cluster, path: str) -> tuple[str, float | None]:
    """The EDS resource name of an EDS cluster and its initial fetch timeout; its config
    source must be ADS."""
    eds_path = join(path, "eds_cluster_config")
    if not proto.HasField("eds_cluster_config"):
        raise ConfigError.at(eds_path, "is required with type: EDS")
    config = proto.eds_cluster_config
    check_fields(config, eds_path, {"eds_config", "service_name"})
    timeout = ads_config_source(config.eds_config, join(eds_path, "eds_config"))
    return str(config.service_name), timeout


def with_assignment(
    config: ClusterConfig, cla: endpoint_pb2.ClusterLoadAssignment, path: str
) -> ClusterConfig:
    """An EDS cluster's configuration with the endpoints of ``cla``; ``ConfigError`` if bad."""
    return replace(config, endpoints=tuple(compile_cla(cla, path)))


def compile_cla(cla: endpoint_pb2.ClusterLoadAssignment, cla_path: str) -> list[EndpointConfig]:
    """The endpoints of a ClusterLoadAssignment (a cluster's ``load_assignment`` or from EDS):
    priorities, endpoint weights and EDS health status. Locality weights are accepted; as in
    Envoy without ``locality_weighted_lb_config``, they do not change the balancing."""
    check_fields(cla, cla_path, {"cluster_name", "endpoints"})
    out: list[EndpointConfig] = []
    problems = ProblemList()
    for i, group in enumerate(cla.endpoints):
        gpath = f"{cla_path}.endpoints[{i}]"
        try:
            check_fields(
                group, gpath, {"locality", "lb_endpoints", "priority", "load_balancing_weight"}
            )
        except ConfigError as e:
            problems.extend(e)
        locality = (group.locality.region, group.locality.zone, group.locality.sub_zone)
        for j, lbe in enumerate(group.lb_endpoints):
            epath = f"{gpath}.lb_endpoints[{j}]"
            try:
                out.append(_compile_endpoint(lbe, epath, group.priority, locality))
            except ConfigError as e:
                problems.extend(e)
    problems.raise_if_any()
    return out


def _compile_endpoint(
    lbe: endpoint_components_pb2.LbEndpoint,
    path: str,
    priority: int,
    locality: tuple[str, str, str],
) -> EndpointConfig:
    check_fields(lbe, path, {"endpoint", "load_balancing_weight", "health_status", "metadata"})
    ep = lbe.endpoint
    check_fields(ep, join(path, "endpoint"), {"address", "hostname"})
    sa = ep.address.socket_address
    check_fields(ep.address, join(path, "endpoint.address"), {"socket_address"})
    sa_path = join(path, "endpoint.address.socket_address")
    check_fields(sa, sa_path, {"address", "port_value", "protocol"})
    if not sa.address:
        raise ConfigError.at(join(sa_path, "address"), "is required")
    if not 0 < sa.port_value < 65536:
        raise ConfigError.at(join(sa_path, "port_value"), "must be a port between 1 and 65535")
    weight = uint_field(lbe, "load_balancing_weight", 1)
    if weight < 1:
        raise ConfigError.at(join(path, "load_balancing_weight"), "must be at least 1")
    # EDS health: UNHEALTHY, DRAINING and TIMEOUT hosts take no traffic (Envoy's rule).
    healthy = lbe.health_status in (0, 1)
    socket_match: tuple[tuple[str, str], ...] = ()
    istio_workload = ""
    if lbe.HasField("metadata"):
        check_fields(lbe.metadata, join(path, "metadata"), {"filter_metadata"})
        if SOCKET_MATCH_KEY in lbe.metadata.filter_metadata:
            socket_match = _flatten(lbe.metadata.filter_metadata[SOCKET_MATCH_KEY])
        if "istio" in lbe.metadata.filter_metadata:
            istio = lbe.metadata.filter_metadata["istio"].fields
            if "workload" in istio:
                istio_workload = istio["workload"].string_value
    return EndpointConfig(
        address=sa.address,
        port=sa.port_value,
        weight=weight,
        priority=priority,
        hostname=ep.hostname,
        locality=locality,
        healthy=healthy,
        socket_match=socket_match,
        istio_workload=istio_workload,
    )


def _compile_thresholds(cb: object, path: str) -> Thresholds:
    from envoy.config.cluster.v3 import circuit_breaker_pb2

    assert isinstance(cb, circuit_breaker_pb2.CircuitBreakers)
    check_fields(cb, path, {"thresholds"})
    result = Thresholds()
    for i, t in enumerate(cb.thresholds):
        tpath = f"{path}.thresholds[{i}]"
        check_fields(
            t,
            tpath,
            {"priority", "max_connections", "max_pending_requests", "max_requests", "max_retries"},
        )
        if t.priority != 0:
            continue  # HIGH priority limits: meshlet routes everything at DEFAULT priority
        result = Thresholds(
            max_connections=uint_field(t, "max_connections", 1024),
            max_pending_requests=uint_field(t, "max_pending_requests", 1024),
            max_requests=uint_field(t, "max_requests", 1024),
            max_retries=uint_field(t, "max_retries", 3),
        )
    return result


class Cluster:
    """The live state of one cluster in this worker."""

    def __init__(
        self,
        config: ClusterConfig,
        stats: ClusterStats,
        rng: random.Random,
        tls_contexts: TlsContexts | None = None,
    ) -> None:
        self.config = config
        self.tls_contexts = tls_contexts
        self.name = config.name
        self.limits = config.limits
        self.stats = stats
        self._rng = rng
        self.hosts: list[Host] = []
        self.pools: dict[Host, HostPool] = {}
        self.lb: LoadBalancer = build_load_balancer(config.lb, [], rng)
        self.rq_active = 0
        self.rq_pending = 0
        self.cx_active = 0
        self.cx_connecting = 0
        self.retries_active = 0
        self.closed = False
        self.initialized = asyncio.Event()
        self.outlier: OutlierDetector | None = None
        self._health: HealthChecker | None = None
        self._health_checked: set[Host] = set()  # hosts that have had their first check
        self._resolved = False  # the first host set is known
        self._resolved_hosts: dict[int, list[Host]] = {}  # DNS: endpoint index -> its hosts
        self._timers: list[asyncio.TimerHandle] = []
        self._dns_task: asyncio.Task[None] | None = None
        self._health_task: asyncio.Task[None] | None = None
        self._eds_hosts: dict[EndpointConfig, Host] = {}  # EDS: each endpoint's host
        self._original_hosts: dict[tuple[str, int], Host] = {}  # ORIGINAL_DST: hosts in use
        self._original_seen: dict[Host, int] = {}  # ORIGINAL_DST: rq_total at the last sweep
        if config.discovery in ("STATIC", "EDS", "ORIGINAL_DST"):
            self._set_hosts(self._hosts_of(config.endpoints))
            self._resolved = True
            if config.health is None:
                self.initialized.set()

    def __repr__(self) -> str:
        healthy = sum(1 for h in self.hosts if h.healthy)
        return (
            f"<Cluster {self.name} [Hosts: {len(self.hosts)} ({healthy} healthy) | "
            f"Requests: {self.rq_active} active, {self.rq_pending} pending | "
            f"Connections: {self.cx_active} active]>"
        )

    # -- request path ------------------------------------------------------------------------

    def choose(self, ctx: LbContext) -> Host | None:
        if self.config.discovery == "ORIGINAL_DST":
            return self._original_host(ctx.original_dst)
        return self.lb.choose(ctx)

    def _original_host(self, destination: tuple[str, int] | None) -> Host | None:
        """ORIGINAL_DST: the host for where the request was going, made on first use (Envoy
        adds such hosts to the cluster and drops them after ``cleanup_interval`` unused)."""
        if destination is None:
            return None
        host = self._original_hosts.get(destination)
        if host is None:
            host = self._original_hosts[destination] = Host(*destination)
            self.stats.membership_total = self.stats.membership_healthy = len(self._original_hosts)
        return host

    def _cleanup_original_hosts(self) -> None:
        """Drop ORIGINAL_DST hosts that took no request since the last sweep and have none
        in flight, with their idle connections."""
        seen = self._original_seen
        for key, host in list(self._original_hosts.items()):
            pool = self.pools.get(host)
            busy = host.rq_active or (pool is not None and (pool.connecting or pool.pending_count))
            if busy or seen.get(host) != host.rq_total:
                seen[host] = host.rq_total
                continue
            del self._original_hosts[key]
            del seen[host]
            if pool is not None:
                self.pools.pop(host).close_idle()
        self.stats.membership_total = self.stats.membership_healthy = len(self._original_hosts)

    def pool(self, host: Host) -> HostPool:
        """The host's pool. A host's transport (TLS or not) follows from its metadata, which
        a host keeps for life, so one pool per host is one pool per (host, transport)."""
        pool = self.pools.get(host)
        if pool is None:
            pool = self.pools[host] = HostPool(
                self, host, self.config.transport_for(host.socket_match)
            )
        return pool

    # -- lifecycle ---------------------------------------------------------------------------

    def _hosts_of(self, endpoints: tuple[EndpointConfig, ...]) -> list[Host]:
        """Hosts for ``endpoints``; an endpoint the cluster already has keeps its host."""
        hosts = {ep: self._eds_hosts.get(ep) or _host(ep, ep.address) for ep in endpoints}
        self._eds_hosts = hosts
        return list(hosts.values())

    def update_endpoints(self, config: ClusterConfig) -> None:
        """A new assignment for this EDS cluster (nothing else changed): swap the host set,
        keeping the live state (pools, counters, outlier and health state) of hosts that stay."""
        self.config = config
        self._set_hosts(self._hosts_of(config.endpoints))

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        if self.config.discovery in ("STRICT_DNS", "LOGICAL_DNS"):
            self._dns_task = loop.create_task(self._resolve_forever())
        if self.config.discovery == "ORIGINAL_DST":
            interval = self.config.cleanup_interval

            def cleanup() -> None:
                if not self.closed:
                    self._cleanup_original_hosts()
                    self._timers[:] = [loop.call_later(interval, cleanup)]

            self._timers.append(loop.call_later(interval, cleanup))
        if self.config.outlier is not None:
            self.outlier = OutlierDetector(
                self.config.outlier, lambda: self.hosts, self.health_changed, self._rng
            )
            self._schedule_sweep()
        if self.config.health is not None:
            self._health = HealthChecker(
                self.config.health,
                lambda: self.hosts,
                self.health_changed,
                on_result=self._health_checked_host,
            )
            for host in self.hosts:
                host.failed_active_hc = True
            self.health_changed()
            self._maybe_initialized()
            self._health.start()

    def _health_checked_host(self, host: Host, check: Check) -> None:
        """Every active health check verdict (after the host's flags were updated)."""
        if self.outlier is not None and check is Check.PASS:
            self.outlier.health_check_passed(host, asyncio.get_running_loop().time())
        if not self.initialized.is_set():
            self._health_checked.add(host)
            self._maybe_initialized()

    def _maybe_initialized(self) -> None:
        if not self._resolved or self.initialized.is_set():
            return
        if self._health is None or self._health_checked.issuperset(self.hosts):
            self.initialized.set()

    def stop(self) -> None:
        self.closed = True
        for t in self._timers:
            t.cancel()
        if self._dns_task is not None:
            self._dns_task.cancel()
        if self._health is not None:
            self._health.stop()
        if self._health_task is not None:
            self._health_task.cancel()
        for pool in self.pools.values():
            pool.close_idle()

    def health_changed(self) -> None:
        """A host's health flipped: rebuild the balancer over the new health."""
        self.lb = build_load_balancer(self.config.lb, self.hosts, self._rng)
        self.stats.membership_healthy = sum(1 for h in self.hosts if h.healthy)
        if self.outlier is not None:
            self.stats.outlier_detection_ejections_active = self.outlier.ejections_active

    def _set_hosts(self, hosts: list[Host]) -> None:
        self.hosts = hosts
        self.stats.membership_total = len(hosts)
        alive = set(hosts)
        for host in list(self.pools):
            if host not in alive:
                self.pools.pop(host).close_idle()
        if self._health is not None:
            new = [h for h in hosts if h.cx_total == 0 and h.rq_total == 0 and h not in self.pools]
            for host in new:
                host.failed_active_hc = True
            if new and not self._resolved:
                # The first DNS answer: check its hosts now rather than an interval later, so
                # that initialization does not wait for the next round. (Later additions wait
                # for the round: two probes of one host must not share its connection.)
                self._health_task = asyncio.get_running_loop().create_task(self._check(new))
        self.health_changed()

    async def _check(self, hosts: list[Host]) -> None:
        health = self._health
        if health is None:
            return
        checks = await asyncio.gather(*(health.probe(h) for h in hosts))
        if self._health is health and not self.closed:
            health.apply(list(zip(hosts, checks, strict=True)))

    def _schedule_sweep(self) -> None:
        assert self.config.outlier is not None
        loop = asyncio.get_running_loop()
        interval = self.config.outlier.interval

        def sweep() -> None:
            if self.closed or self.outlier is None:
                return
            self.outlier.sweep(loop.time())
            self._timers[:] = [loop.call_later(interval, sweep)]

        self._timers.append(loop.call_later(interval, sweep))

    async def _resolve_forever(self) -> None:
        loop = asyncio.get_running_loop()
        while not self.closed:
            try:
                await self._resolve(loop)
            except Exception:  # a resolver failure keeps the last good host set
                log.exception("cluster %s: DNS resolution failed", self.name)
            self._resolved = True
            self._maybe_initialized()
            await asyncio.sleep(self.config.dns_refresh_rate)

    async def _resolve(self, loop: asyncio.AbstractEventLoop) -> None:
        current = {(h.address, h.port): h for h in self.hosts}
        new: list[Host] = []
        config = self.config
        for i, ep in enumerate(config.endpoints):
            try:
                infos = await loop.getaddrinfo(
                    ep.address, ep.port, family=config.dns_family, type=socket.SOCK_STREAM
                )
            except OSError as e:
                # A failed lookup keeps what the endpoint resolved to last time (Envoy); only a
                # successful answer changes the host set.
                log.warning("cluster %s: cannot resolve %s: %s", self.name, ep.address, e)
                new.extend(self._resolved_hosts.get(i, []))
                continue
            if config.dns_preferred is not None:
                preferred = [info for info in infos if info[0] == config.dns_preferred]
                infos = preferred or infos
            addresses = _unique(str(info[4][0]) for info in infos)
            if config.discovery == "LOGICAL_DNS":
                addresses = addresses[:1]  # only the first address, for new connections
            hosts = [current.get((a, ep.port)) or _host(ep, a) for a in addresses]
            self._resolved_hosts[i] = hosts
            new.extend(hosts)
        if [h.key for h in new] != [h.key for h in self.hosts]:
            self._set_hosts(new)


def _host(ep: EndpointConfig, address: str) -> Host:
    host = Host(
        address,
        ep.port,
        weight=ep.weight,
        priority=ep.priority,
        hostname=ep.hostname or (ep.address if ep.address != address else ""),
        locality=ep.locality,
        socket_match=ep.socket_match,
        peer=endpoint_peer(ep.istio_workload) if ep.istio_workload else None,
    )
    if not ep.healthy:
        host.failed_active_hc = True
    return host


def _only_endpoints_differ(old: ClusterConfig, new: ClusterConfig) -> bool:
    return old.discovery == new.discovery == "EDS" and replace(old, endpoints=()) == replace(
        new, endpoints=()
    )


def _unique(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(items))


class ClusterManager:
    """All clusters of this worker, by name; swapped as a whole when configuration changes."""

    def __init__(self, stats: StatsStore, rng: random.Random | None = None) -> None:
        self._stats = stats
        self._rng = rng or random.Random()
        self._tls_contexts: TlsContexts | None = None
        self.clusters: dict[str, Cluster] = {}

    def __repr__(self) -> str:
        return f"<ClusterManager {len(self.clusters)} clusters>"

    def get(self, name: str) -> Cluster | None:
        return self.clusters.get(name)

    def apply(
        self, configs: Iterable[ClusterConfig], tls_contexts: TlsContexts | None = None
    ) -> None:
        """Install a new set of clusters, keeping the live state of unchanged ones."""
        if tls_contexts is not None:
            self._tls_contexts = tls_contexts
        new: dict[str, Cluster] = {}
        for config in configs:
            old = self.clusters.get(config.name)
            if old is not None and old.config == config:
                new[config.name] = old
            elif old is not None and _only_endpoints_differ(old.config, config):
                old.update_endpoints(config)
                new[config.name] = old
            else:
                cluster = Cluster(
                    config, self._stats.cluster(config.name), self._rng, self._tls_contexts
                )
                new[config.name] = cluster
                cluster.start()
        for name, old in self.clusters.items():
            if new.get(name) is not old:
                old.stop()
        self.clusters = new

    async def initialized(self, timeout: float) -> None:
        """Wait until every cluster has its first host set (DNS clusters resolve once)."""
        waits = [c.initialized.wait() for c in self.clusters.values()]
        if waits:
            await asyncio.wait_for(asyncio.gather(*waits), timeout)

    def stop(self) -> None:
        for cluster in self.clusters.values():
            cluster.stop()
