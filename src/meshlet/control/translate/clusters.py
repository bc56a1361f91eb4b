"""CDS: the clusters of one proxy (istiod's ``BuildClusters``), and Istio's cluster names.

Every visible service port gets ``outbound|<port>||<host>``, and each DestinationRule subset
``outbound|<port>|<subset>|<host>`` (its endpoints are filtered by the subset's labels when
EDS is built; there is no ``lb_subset_config``). Sidecars also get ``inbound|<port>||`` for
each port their workload serves, and the fixed BlackHoleCluster, PassthroughCluster and
InboundPassthroughCluster; gateways only BlackHoleCluster. With an OTLP endpoint in the mesh
options, both also get its STATIC cluster (``telemetry.OTLP_CLUSTER``), named by the tracer.

Rules kept (``ISTIO-TRANSLATION.md`` §1.1, §3):

* Type by resolution: STATIC (a Kubernetes ClusterIP service, a STATIC ServiceEntry) is EDS
  over ADS with ``initial_fetch_timeout: 0s``; DNS is STRICT_DNS and DNS_ROUND_ROBIN
  LOGICAL_DNS, both with an inline ``load_assignment``; NONE (headless, passthrough) is
  ORIGINAL_DST with ``CLUSTER_PROVIDED``.
* Always: ``connect_timeout`` 10s (mesh), one circuit-breaker threshold with every limit at
  4294967295, ``alt_stat_name`` = name + ``;``.
* DestinationRule: loadBalancer (LEAST_REQUEST by default; consistentHash gives RING_HASH
  with ``minimum_ring_size`` 1024, or MAGLEV), connectionPool, outlierDetection (with
  ``healthy_panic_threshold`` = minHealthPercent, default 0), tls; a subset's policy blocks
  replace the rule's, a matching portLevelSettings entry replaces everything.

Where the proxy has a field of its own for what Istio puts in an extension, the proxy's is
used, so that the proxy accepts it today: connection-pool idle timeout and requests per
connection go in the cluster's (deprecated) ``common_http_protocol_options`` instead of
``typed_extension_protocol_options``. Istio's cluster ``metadata`` and the upstream
``istio.metadata_exchange`` network filter are left out (the HTTP filter of that name, in
the HCMs, carries the peer metadata).
"""

from __future__ import annotations

from collections.abc import Sequence

from envoy.config.cluster.v3 import circuit_breaker_pb2, cluster_pb2, outlier_detection_pb2
from envoy.config.core.v3 import (
    address_pb2,
    base_pb2,
    config_source_pb2,
    protocol_pb2,
)
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.extensions.transport_sockets.raw_buffer.v3 import raw_buffer_pb2
from envoy.extensions.transport_sockets.tls.v3 import common_pb2, secret_pb2, tls_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2
from envoy.type.matcher.v3 import string_pb2
from google.protobuf import any_pb2, duration_pb2, wrappers_pb2

from meshlet.api.duration import Duration
from meshlet.api.networking import (
    ClientTLSMode,
    ClientTLSSettings,
    ConnectionPoolSettings,
    LoadBalancerSettings,
    OutlierDetection,
    Resolution,
    SimpleLB,
)
from meshlet.api.security import MTLSMode
from meshlet.control.registry import Service
from meshlet.control.snapshot import (
    OutboundCluster,
    Proxy,
    ProxyType,
    ProxyView,
    Snapshot,
    inbound_cluster_name,
    outbound_cluster_name,
    parse_cluster_name,
)
from meshlet.control.translate.endpoints import load_assignment
from meshlet.control.translate.peer_authn import infer_service_mode
from meshlet.control.translate.telemetry import otlp_cluster

BLACKHOLE_CLUSTER = "BlackHoleCluster"
PASSTHROUGH_CLUSTER = "PassthroughCluster"
INBOUND_PASSTHROUGH_CLUSTER = "InboundPassthroughCluster"
MAX_UINT32 = 4294967295
INBOUND_BIND_ADDRESS = "127.0.0.6"  # Istio's source address for inbound passthrough
SDS_CLUSTER = "sds-grpc"
HTTP_PROTOCOL_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
TRANSPORT_SOCKET_TLS = "envoy.transport_sockets.tls"


def sni_cluster_name(port: int, host: str, subset: str = "") -> str:
    """``outbound_.<port>_.<subset>_.<host>``: the default SNI of ISTIO_MUTUAL clusters."""
    return f"outbound_.{port}_.{subset}_.{host}"


_DISCOVERY = {
    Resolution.STATIC: cluster_pb2.Cluster.EDS,
    Resolution.DNS: cluster_pb2.Cluster.STRICT_DNS,
    Resolution.DNS_ROUND_ROBIN: cluster_pb2.Cluster.LOGICAL_DNS,
}


def discovery_type(c: OutboundCluster) -> cluster_pb2.Cluster.DiscoveryType:
    """EDS, STRICT_DNS, LOGICAL_DNS or ORIGINAL_DST (Istio's ``convertResolution``)."""
    if c.passthrough:
        return cluster_pb2.Cluster.ORIGINAL_DST
    return _DISCOVERY[c.service.resolution]


# -- building ----------------------------------------------------------------------------------


def build_clusters(snapshot: Snapshot, proxy: Proxy) -> list[cluster_pb2.Cluster]:
    """The CDS response for ``proxy``."""
    view = snapshot.view(proxy)
    clusters = [build_outbound_cluster(c, view) for c in view.outbound_clusters()]
    clusters.append(blackhole_cluster(view))
    if proxy.type is ProxyType.SIDECAR:
        clusters.append(passthrough_cluster(view))
        clusters.extend(build_inbound_clusters(view))
        clusters.append(inbound_passthrough_cluster(view))
    collector = otlp_cluster(view.mesh)  # the tracer's http_uri names it
    if collector is not None:
        clusters.append(collector)
    return clusters


def build_outbound_cluster(c: OutboundCluster, view: ProxyView) -> cluster_pb2.Cluster:
    mesh = view.mesh
    cluster = cluster_pb2.Cluster(name=c.name, alt_stat_name=c.name + ";")
    cluster.connect_timeout.CopyFrom(_duration(mesh.connect_timeout))
    discovery = discovery_type(c)
    cluster.type = discovery
    if discovery == cluster_pb2.Cluster.EDS:
        eds = cluster.eds_cluster_config
        eds.service_name = c.name
        _ads(eds.eds_config)
    elif discovery in (cluster_pb2.Cluster.STRICT_DNS, cluster_pb2.Cluster.LOGICAL_DNS):
        cluster.load_assignment.CopyFrom(load_assignment(c, view))
        cluster.dns_refresh_rate.CopyFrom(_duration(mesh.dns_refresh_rate))
        cluster.dns_lookup_family = cluster_pb2.Cluster.V4_ONLY
    policy = c.policy
    _apply_load_balancer(cluster, policy.load_balancer)
    if discovery == cluster_pb2.Cluster.ORIGINAL_DST:
        cluster.lb_policy = cluster_pb2.Cluster.CLUSTER_PROVIDED
    _apply_connection_pool(cluster, policy.connection_pool)
    _apply_outlier_detection(cluster, policy.outlier_detection)
    if c.port.protocol.is_http2:
        _explicit_http2(cluster)
    socket = upstream_tls(policy.tls, c, view)
    if socket is not None:
        cluster.transport_socket.CopyFrom(socket)
    elif policy.tls is None and _auto_mtls(c, view):
        _transport_socket_matches(cluster, upstream_tls(_ISTIO_MUTUAL, c, view))
    _istio_services(cluster, [c.service])
    return cluster


_ISTIO_MUTUAL = ClientTLSSettings(mode=ClientTLSMode.ISTIO_MUTUAL)
TLS_MODE_MATCH = "envoy.transport_socket_match"


def _auto_mtls(c: OutboundCluster, view: ProxyView) -> bool:
    """Istio's auto mTLS applies: mesh setting on, no DR tls, a mesh-internal service that is
    not passthrough, whose inferred mode (namespace or mesh PeerAuthentication) is not
    DISABLE (``cluster_tls.go``, ``BestEffortInferServiceMTLSMode``)."""
    if not view.mesh.enable_auto_mtls or c.service.mesh_external or c.passthrough:
        return False
    mode = infer_service_mode(
        view.snapshot.peer_authentications,
        namespace=c.service.namespace,
        root_namespace=view.mesh.root_namespace,
    )
    return mode is not MTLSMode.DISABLE


def _transport_socket_matches(
    cluster: cluster_pb2.Cluster, tls: base_pb2.TransportSocket | None
) -> None:
    """``tlsMode-istio`` (endpoints labelled ``tlsMode: istio``: the ISTIO_MUTUAL socket),
    then ``tlsMode-disabled`` (everything else: plaintext)."""
    if tls is None:
        return
    istio = cluster.transport_socket_matches.add(name="tlsMode-istio")
    istio.match.update({"tlsMode": "istio"})
    istio.transport_socket.CopyFrom(tls)
    plain = cluster.transport_socket_matches.add(name="tlsMode-disabled")
    plain.match.SetInParent()
    plain.transport_socket.name = "envoy.transport_sockets.raw_buffer"
    plain.transport_socket.typed_config.Pack(raw_buffer_pb2.RawBuffer())


def build_inbound_clusters(view: ProxyView) -> list[cluster_pb2.Cluster]:
    """``inbound|<port>||`` for each port the proxy's workload serves: STATIC to the
    workload's own address (the embedded runtime's pods bind their pod IP), with the
    Sidecar's ``inboundConnectionPool`` if any."""
    proxy = view.proxy
    pool = view.sidecar.spec.inbound_connection_pool if view.sidecar is not None else None
    ports: dict[int, tuple[str, ConnectionPoolSettings | None]] = {}
    services: dict[int, dict[str, Service]] = {}
    for instance in view.instances:
        services.setdefault(instance.endpoint.port, {})[instance.service.hostname] = (
            instance.service
        )
    ingress = view.sidecar.spec.ingress if view.sidecar is not None else ()
    if ingress:
        for listener in ingress:
            endpoint = listener.default_endpoint
            address, _, port_text = endpoint.rpartition(":")
            target = int(port_text) if port_text.isdigit() else listener.port.number
            host = "127.0.0.1" if address in ("127.0.0.1", "[::1]") else proxy.ip
            ports.setdefault(target, (host, listener.connection_pool or pool))
    else:
        for instance in view.instances:
            ports.setdefault(instance.endpoint.port, (proxy.ip, pool))
    out: list[cluster_pb2.Cluster] = []
    for port in sorted(ports):
        host, settings = ports[port]
        name = inbound_cluster_name(port)
        cluster = cluster_pb2.Cluster(name=name, alt_stat_name=name + ";")
        cluster.type = cluster_pb2.Cluster.STATIC
        cluster.connect_timeout.CopyFrom(_duration(view.mesh.connect_timeout))
        cluster.lb_policy = cluster_pb2.Cluster.ROUND_ROBIN
        cluster.load_assignment.CopyFrom(_static_assignment(name, host, port))
        _apply_connection_pool(cluster, settings)
        served = services.get(port, {})
        _istio_services(cluster, [served[h] for h in sorted(served)])
        out.append(cluster)
    return out


def _istio_services(cluster: cluster_pb2.Cluster, services: Sequence[Service]) -> None:
    """istiod's cluster metadata ``filter_metadata.istio.services: [{host, name,
    namespace}]``: the proxy's metrics name ``destination_service`` from the first one (an
    inbound cluster names no service; several services may share the port)."""
    if not services:
        return
    entries = [{"host": s.hostname, "name": s.name, "namespace": s.namespace} for s in services]
    cluster.metadata.filter_metadata["istio"].update({"services": entries})


def blackhole_cluster(view: ProxyView) -> cluster_pb2.Cluster:
    """STATIC with no endpoints: every connection to it fails (REGISTRY_ONLY's sink)."""
    cluster = cluster_pb2.Cluster(name=BLACKHOLE_CLUSTER, alt_stat_name=BLACKHOLE_CLUSTER + ";")
    cluster.type = cluster_pb2.Cluster.STATIC
    cluster.connect_timeout.CopyFrom(_duration(view.mesh.connect_timeout))
    cluster.load_assignment.cluster_name = BLACKHOLE_CLUSTER
    return cluster


def passthrough_cluster(view: ProxyView) -> cluster_pb2.Cluster:
    """ORIGINAL_DST: traffic to hosts the mesh does not know goes where it was sent
    (ALLOW_ANY). Istio gives it a 5m upstream idle timeout."""
    cluster = cluster_pb2.Cluster(name=PASSTHROUGH_CLUSTER, alt_stat_name=PASSTHROUGH_CLUSTER + ";")
    cluster.type = cluster_pb2.Cluster.ORIGINAL_DST
    cluster.lb_policy = cluster_pb2.Cluster.CLUSTER_PROVIDED
    cluster.connect_timeout.CopyFrom(_duration(view.mesh.connect_timeout))
    _default_circuit_breakers(cluster)
    cluster.common_http_protocol_options.idle_timeout.CopyFrom(_duration(300.0))
    return cluster


def inbound_passthrough_cluster(view: ProxyView) -> cluster_pb2.Cluster:
    cluster = cluster_pb2.Cluster(
        name=INBOUND_PASSTHROUGH_CLUSTER, alt_stat_name=INBOUND_PASSTHROUGH_CLUSTER + ";"
    )
    cluster.type = cluster_pb2.Cluster.ORIGINAL_DST
    cluster.lb_policy = cluster_pb2.Cluster.CLUSTER_PROVIDED
    cluster.connect_timeout.CopyFrom(_duration(view.mesh.connect_timeout))
    source = cluster.upstream_bind_config.source_address
    source.address = INBOUND_BIND_ADDRESS
    source.port_value = 0
    _default_circuit_breakers(cluster)
    return cluster


# -- DestinationRule blocks --------------------------------------------------------------------


_SIMPLE = {
    SimpleLB.UNSPECIFIED: cluster_pb2.Cluster.LEAST_REQUEST,
    SimpleLB.LEAST_CONN: cluster_pb2.Cluster.LEAST_REQUEST,
    SimpleLB.LEAST_REQUEST: cluster_pb2.Cluster.LEAST_REQUEST,
    SimpleLB.ROUND_ROBIN: cluster_pb2.Cluster.ROUND_ROBIN,
    SimpleLB.RANDOM: cluster_pb2.Cluster.RANDOM,
}
_DEFAULT_RING_SIZE = 1024


def _apply_load_balancer(cluster: cluster_pb2.Cluster, lb: LoadBalancerSettings | None) -> None:
    """Istio's ``applyLoadBalancer``: LEAST_REQUEST unless the rule says otherwise."""
    cluster.lb_policy = cluster_pb2.Cluster.LEAST_REQUEST
    if lb is None:
        return
    hashing = lb.consistent_hash
    if hashing is not None:
        if hashing.maglev is not None:
            cluster.lb_policy = cluster_pb2.Cluster.MAGLEV
            if hashing.maglev.table_size:
                cluster.maglev_lb_config.table_size.value = hashing.maglev.table_size
        elif hashing.ring_hash is not None:
            cluster.lb_policy = cluster_pb2.Cluster.RING_HASH
            if hashing.ring_hash.minimum_ring_size:
                size = hashing.ring_hash.minimum_ring_size
                cluster.ring_hash_lb_config.minimum_ring_size.value = size
        else:
            cluster.lb_policy = cluster_pb2.Cluster.RING_HASH
            size = hashing.minimum_ring_size or _DEFAULT_RING_SIZE
            cluster.ring_hash_lb_config.minimum_ring_size.value = size
    elif lb.simple is not None and lb.simple in _SIMPLE:
        cluster.lb_policy = _SIMPLE[lb.simple]
    warmup = lb.warmup
    duration = warmup.duration if warmup is not None else lb.warmup_duration_secs
    if duration is not None:
        # slow_start_config (aggression 1.0, minimum weight 10% unless given)
        if cluster.lb_policy == cluster_pb2.Cluster.ROUND_ROBIN:
            slow = cluster.round_robin_lb_config.slow_start_config
        elif cluster.lb_policy == cluster_pb2.Cluster.LEAST_REQUEST:
            slow = cluster.least_request_lb_config.slow_start_config
        else:
            return
        slow.slow_start_window.CopyFrom(_from_duration(duration))
        aggression = warmup.aggression if warmup is not None else None
        slow.aggression.default_value = aggression if aggression is not None else 1.0
        slow.aggression.runtime_key = "aggression"
        minimum = warmup.minimum_percent if warmup is not None else None
        slow.min_weight_percent.value = minimum if minimum is not None else 10.0


def _default_thresholds() -> circuit_breaker_pb2.CircuitBreakers.Thresholds:
    t = circuit_breaker_pb2.CircuitBreakers.Thresholds()
    t.max_connections.value = MAX_UINT32
    t.max_pending_requests.value = MAX_UINT32
    t.max_requests.value = MAX_UINT32
    t.max_retries.value = MAX_UINT32
    return t


def _default_circuit_breakers(cluster: cluster_pb2.Cluster) -> None:
    cluster.circuit_breakers.thresholds.append(_default_thresholds())


def _apply_connection_pool(
    cluster: cluster_pb2.Cluster, pool: ConnectionPoolSettings | None
) -> None:
    """Istio's ``applyConnectionPool``; values of 0 count as unset."""
    threshold = _default_thresholds()
    idle: Duration | None = None
    per_connection = 0
    max_duration: Duration | None = None
    if pool is not None and pool.http is not None:
        http = pool.http
        if http.http2_max_requests > 0:
            threshold.max_requests.value = http.http2_max_requests
        if http.http1_max_pending_requests > 0:
            threshold.max_pending_requests.value = http.http1_max_pending_requests
        if http.max_retries > 0:
            threshold.max_retries.value = http.max_retries
        idle = http.idle_timeout
        per_connection = http.max_requests_per_connection
    if pool is not None and pool.tcp is not None:
        tcp = pool.tcp
        if tcp.connect_timeout is not None:
            cluster.connect_timeout.CopyFrom(_from_duration(tcp.connect_timeout))
        if tcp.max_connections > 0:
            threshold.max_connections.value = tcp.max_connections
        if idle is None:
            idle = tcp.idle_timeout
        max_duration = tcp.max_connection_duration
        keepalive = tcp.tcp_keepalive
        if keepalive is not None:
            ka = cluster.upstream_connection_options.tcp_keepalive
            if keepalive.probes:
                ka.keepalive_probes.value = keepalive.probes
            if keepalive.time is not None:
                ka.keepalive_time.value = keepalive.time.nanos // 1_000_000_000
            if keepalive.interval is not None:
                ka.keepalive_interval.value = keepalive.interval.nanos // 1_000_000_000
    cluster.circuit_breakers.thresholds.append(threshold)
    if idle is not None or per_connection > 0 or max_duration is not None:
        opts = cluster.common_http_protocol_options
        if idle is not None:
            opts.idle_timeout.CopyFrom(_from_duration(idle))
        if per_connection > 0:
            opts.max_requests_per_connection.value = per_connection
        if max_duration is not None:
            opts.max_connection_duration.CopyFrom(_from_duration(max_duration))


def _apply_outlier_detection(
    cluster: cluster_pb2.Cluster, outlier: OutlierDetection | None
) -> None:
    """Istio's ``applyOutlierDetection``; emitted only when the rule sets it."""
    if outlier is None:
        return
    out = outlier_detection_pb2.OutlierDetection()
    out.enforcing_success_rate.value = 0
    if outlier.consecutive_errors > 0:  # deprecated: gateway errors only (istio/api#617)
        out.consecutive_gateway_failure.value = outlier.consecutive_errors
        out.enforcing_consecutive_gateway_failure.value = 100
        out.enforcing_consecutive_5xx.value = 0
    if outlier.consecutive_5xx_errors is not None:
        v = outlier.consecutive_5xx_errors
        out.consecutive_5xx.value = v
        out.enforcing_consecutive_5xx.value = 100 if v > 0 else 0
    if outlier.consecutive_gateway_errors is not None:
        v = outlier.consecutive_gateway_errors
        out.consecutive_gateway_failure.value = v
        out.enforcing_consecutive_gateway_failure.value = 100 if v > 0 else 0
    if outlier.interval is not None:
        out.interval.CopyFrom(_from_duration(outlier.interval))
    if outlier.base_ejection_time is not None:
        out.base_ejection_time.CopyFrom(_from_duration(outlier.base_ejection_time))
    if outlier.max_ejection_percent > 0:
        out.max_ejection_percent.value = outlier.max_ejection_percent
    if outlier.split_external_local_origin_errors:
        out.split_external_local_origin_errors = True
        failures = outlier.consecutive_local_origin_failures
        if failures:
            out.consecutive_local_origin_failure.value = failures
            out.enforcing_consecutive_local_origin_failure.value = 100
        out.enforcing_local_origin_success_rate.value = 0
    cluster.outlier_detection.CopyFrom(out)
    # Panic mode off by default: few endpoints per service make it do more harm than good.
    cluster.common_lb_config.healthy_panic_threshold.value = float(outlier.min_health_percent)


def _explicit_http2(cluster: cluster_pb2.Cluster) -> None:
    options = http_protocol_options_pb2.HttpProtocolOptions()
    options.explicit_http_config.http2_protocol_options.CopyFrom(
        protocol_pb2.Http2ProtocolOptions()
    )
    packed = any_pb2.Any()
    packed.Pack(options)
    cluster.typed_extension_protocol_options[HTTP_PROTOCOL_OPTIONS].CopyFrom(packed)


# -- TLS -----------------------------------------------------------------------------------------


def upstream_tls(
    tls: ClientTLSSettings | None, c: OutboundCluster, view: ProxyView
) -> base_pb2.TransportSocket | None:
    """The DestinationRule's client TLS as Istio builds it (``cluster_tls.go``); None for
    DISABLE or no setting (auto mTLS, when on, is added by ``build_outbound_cluster``)."""
    if tls is None or tls.mode is ClientTLSMode.DISABLE:
        return None
    context = tls_pb2.UpstreamTlsContext()
    common = context.common_tls_context
    h2 = c.port.protocol.is_http2
    if tls.mode is ClientTLSMode.ISTIO_MUTUAL:
        common.tls_params.tls_minimum_protocol_version = common_pb2.TlsParameters.TLSv1_2
        common.tls_params.tls_maximum_protocol_version = common_pb2.TlsParameters.TLSv1_3
        common.tls_certificate_sds_secret_configs.append(sds_secret("default"))
        combined = common.combined_validation_context
        combined.validation_context_sds_secret_config.CopyFrom(sds_secret("ROOTCA"))
        names = tls.subject_alt_names or _service_account_names(c, view)
        for name in names:
            combined.default_validation_context.match_subject_alt_names.append(
                string_pb2.StringMatcher(exact=name)
            )
        common.alpn_protocols.extend(["istio-peer-exchange", "istio", *(["h2"] if h2 else [])])
        context.sni = tls.sni or sni_cluster_name(c.port.port, c.service.hostname, c.subset)
    else:  # SIMPLE, MUTUAL
        if tls.credential_name:
            root = f"kubernetes://{tls.credential_name}-cacert"
            if tls.mode is ClientTLSMode.MUTUAL:
                common.tls_certificate_sds_secret_configs.append(
                    sds_secret(f"kubernetes://{tls.credential_name}")
                )
        else:
            root = f"file-root:{tls.ca_certificates or 'system'}"
            if tls.mode is ClientTLSMode.MUTUAL:
                common.tls_certificate_sds_secret_configs.append(
                    sds_secret(f"file-cert:{tls.client_certificate}~{tls.private_key}")
                )
        if not tls.insecure_skip_verify:
            combined = common.combined_validation_context
            combined.validation_context_sds_secret_config.CopyFrom(sds_secret(root))
            for name in tls.subject_alt_names:
                combined.default_validation_context.match_subject_alt_names.append(
                    string_pb2.StringMatcher(exact=name)
                )
        if h2:
            common.alpn_protocols.append("h2")
        context.sni = tls.sni or c.service.hostname
    packed = any_pb2.Any()
    packed.Pack(context)
    return base_pb2.TransportSocket(name=TRANSPORT_SOCKET_TLS, typed_config=packed)


def _service_account_names(c: OutboundCluster, view: ProxyView) -> list[str]:
    trust = view.mesh.trust_domain
    accounts = sorted(
        {e.service_account for e in view.endpoints(c.service, c.port.port) if e.service_account}
    )
    names = [f"spiffe://{trust}/ns/{c.service.namespace}/sa/{a}" for a in accounts]
    names.extend(c.service.subject_alt_names)
    return names


def sds_secret(name: str) -> secret_pb2.SdsSecretConfig:
    """An SDS secret named as Istio names them. Istio's Envoy fetches them from its agent
    (``sds-grpc``); meshlet's proxy is its own agent and takes them over ADS, where the
    control plane serves ``default`` (the chain) and ``ROOTCA``, and the proxy's identity
    module sets them locally with the key it made."""
    config = secret_pb2.SdsSecretConfig(name=name)
    source = config.sds_config
    source.ads.SetInParent()
    source.initial_fetch_timeout.CopyFrom(duration_pb2.Duration())
    source.resource_api_version = config_source_pb2.V3
    return config


# -- small pieces ------------------------------------------------------------------------------


def _ads(source: config_source_pb2.ConfigSource) -> None:
    source.ads.SetInParent()
    source.initial_fetch_timeout.CopyFrom(duration_pb2.Duration())
    source.resource_api_version = config_source_pb2.V3


def _duration(seconds: float) -> duration_pb2.Duration:
    whole = int(seconds)
    return duration_pb2.Duration(seconds=whole, nanos=round((seconds - whole) * 1e9))


def _from_duration(d: Duration) -> duration_pb2.Duration:
    seconds, nanos = divmod(d.nanos, 1_000_000_000)
    return duration_pb2.Duration(seconds=seconds, nanos=nanos)


def _static_assignment(name: str, host: str, port: int) -> endpoint_pb2.ClusterLoadAssignment:
    cla = endpoint_pb2.ClusterLoadAssignment(cluster_name=name)
    group = cla.endpoints.add()
    group.load_balancing_weight.value = 1
    lbe = group.lb_endpoints.add()
    lbe.endpoint.address.CopyFrom(
        address_pb2.Address(socket_address=address_pb2.SocketAddress(address=host, port_value=port))
    )
    lbe.load_balancing_weight.CopyFrom(wrappers_pb2.UInt32Value(value=1))
    return cla


__all__ = [
    "BLACKHOLE_CLUSTER",
    "INBOUND_PASSTHROUGH_CLUSTER",
    "MAX_UINT32",
    "PASSTHROUGH_CLUSTER",
    "TRANSPORT_SOCKET_TLS",
    "blackhole_cluster",
    "build_clusters",
    "build_inbound_clusters",
    "build_outbound_cluster",
    "discovery_type",
    "inbound_cluster_name",
    "inbound_passthrough_cluster",
    "outbound_cluster_name",
    "parse_cluster_name",
    "passthrough_cluster",
    "sds_secret",
    "sni_cluster_name",
    "upstream_tls",
]
